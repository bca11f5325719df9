"""What the kernel enforcement layers (egress.py, lsm.py) share: a ring
buffer of denial records delivered to a callback, and per-CPU counters of
denials and lost records. Only the record decoding differs."""
import ctypes

from . import records as R

# indexes of the per-CPU counter map, the same in both guards (bpf/guards.h)
CNT_DENIED, CNT_LOST = R.EG_CNT_DENIED, R.EG_CNT_LOST


class DenialStream:
    """Mixin. Subclasses set COUNTERS (the counter map's name) and
    enforcement (the layer's name in run records), keep
    self.bpf, self.received, self.errors, self._on_denial, and define
    _decode(raw) -> dict and close() (also run at the end of a with block)."""

    COUNTERS = None
    _base = (0, 0)         # counter totals when the stream (re)started

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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

    def _totals(self):
        table = self.bpf[self.COUNTERS]
        return tuple(sum(int(v) for v in table[ctypes.c_int(idx)]) for idx in (CNT_DENIED, CNT_LOST))

    def counters(self):
        """denials counted in the kernel, records lost (ring buffer full),
        records received here; since the last _start_stream()."""
        denied, lost = self._totals()
        return {"denials": denied - self._base[0], "lost": lost - self._base[1],
                "received": self.received, "errors": len(self.errors)}

    def _start_stream(self, on_denial):
        """Deliver records to on_denial from here on and count from zero: a
        reused object's earlier records and counts belong to an earlier run."""
        self._base = self._totals()
        self.received = 0
        self.errors = []
        self._on_denial = on_denial

    def _end_stream(self):
        """Once nothing is attached: discard whatever record is still in the
        ring (its run has ended and read its own), so none reaches the next."""
        self._on_denial = lambda _d: None
        self.poll(0)
        self._on_denial = None


def clear_map(table, what):
    """Delete every key of a BPF hash or LPM map; raise if it is not empty
    afterwards (a reused enforcement object must not keep an old rule)."""
    for _ in range(3):
        keys = list(table.keys())
        if not keys:
            return
        for k in keys:
            try:
                del table[k]
            except KeyError:
                pass
    raise RuntimeError(f"could not clear BPF map {what}")
