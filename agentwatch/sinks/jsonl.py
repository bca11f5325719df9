"""JSON Lines sink: one event per line, flushed so followers see it live."""


class JsonlSink:
    def __init__(self, path, mode="a"):
        self.path = path
        self._f = open(path, mode, encoding="utf-8", buffering=1 << 16)
        self.written = 0

    def write(self, event, line=None):
        """line: the event's JSON when the caller already has it (serialise once)."""
        self._f.write(line if line is not None else event.to_json())
        self._f.write("\n")
        self.written += 1

    def flush(self):
        self._f.flush()

    def close(self):
        if not self._f.closed:
            self._f.close()
