"""How far a long read is, as one status line on a terminal's stderr:
'agentwatch: replaying 12.0 of 80.0 MB (15%)' (tail's replays, report's big logs)."""
import time


class StatusLine:
    """progress(done, total) callbacks drawn as one line, redrawn at most
    every `every` seconds, cleared before other output (clear()) and gone
    for good once done reaches total; nothing for totals under min_total."""

    def __init__(self, stream, verb, every=0.2, min_total=0):
        self.stream, self.verb, self.every, self.min_total = stream, verb, every, min_total
        self.shown = False
        self._next = 0.0

    def __call__(self, done, total):
        if done >= total:
            self.clear()
            return
        now = time.monotonic()
        if total < self.min_total or now < self._next:
            return
        self._next = now + self.every
        self.stream.write(f"\ragentwatch: {self.verb} {done / 1e6:.1f} of {total / 1e6:.1f} MB "
                          f"({100 * done // total}%)\033[K")
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False
            self._next = 0.0


def status_line(stream, verb, **kw):
    """A StatusLine on stream when it is a terminal, else None (nothing when piped)."""
    return StatusLine(stream, verb, **kw) if stream.isatty() else None
