"""What the kernel enforcement layers (egress.py, lsm.py) share: a ring
buffer of denial records delivered to a callback, and per-CPU counters of
denials and lost records. Only the record decoding differs."""
import ctypes

CNT_DENIED, CNT_LOST = 0, 1   # indexes of the per-CPU counter map


class DenialStream:
    """Mixin. Subclasses set COUNTERS (the counter map's name) and
    enforcement (the layer's name in run records), keep
    self.bpf, self.received, self.errors, self._on_denial, and define
    _decode(raw) -> dict."""

    COUNTERS = None

    def _on_record(self, _ctx, data, size):
        self.received += 1
        try:
            self._on_denial(self._decode(ctypes.string_at(data, size)))
        except Exception as e:   # one bad record or callback must not stop the stream
            self.errors.append(f"{type(e).__name__}: {e}")
        return 0

    def poll(self, timeout_ms=0):
        """Deliver the denial records that are ready, waiting up to timeout_ms."""
        if self.bpf is not None:
            self.bpf.ring_buffer_poll(timeout_ms)

    def counters(self):
        """denials counted in the kernel, records lost (ring buffer full),
        records received here."""
        table = self.bpf[self.COUNTERS]

        def total(idx):
            return sum(int(v) for v in table[ctypes.c_int(idx)])
        return {"denials": total(CNT_DENIED), "lost": total(CNT_LOST),
                "received": self.received, "errors": len(self.errors)}
