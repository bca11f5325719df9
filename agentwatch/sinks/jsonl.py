"""JSON Lines sink: one event per line, flushed so followers see it live."""

PENDING_MAX = 4096   # lines held before they are handed to the file without a flush


class JsonlSink:
    """Lines are collected and written in one piece at flush() (the runner
    flushes after every poll of the sensors, and at the end) or when
    PENDING_MAX are waiting: one write per batch instead of one per event."""

    def __init__(self, path, mode="a"):
        self.path = path
        self._f = open(path, mode, encoding="utf-8", buffering=1 << 16)
        self._pending = []
        self.written = 0

    def write(self, event, line=None):
        """line: the event's JSON when the caller already has it (serialise once)."""
        pending = self._pending
        pending.append(line if line is not None else event.to_json())
        self.written += 1
        if len(pending) >= PENDING_MAX:
            self._spill()

    def _spill(self):
        if self._pending:
            self._pending.append("")
            self._f.write("\n".join(self._pending))
            self._pending = []

    def flush(self):
        self._spill()
        self._f.flush()

    def close(self):
        if not self._f.closed:
            try:
                self._spill()
            finally:
                self._f.close()
