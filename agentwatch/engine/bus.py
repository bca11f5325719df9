"""The event bus: other layers subscribe to a run's decoded events.

Memory invalidation, termination conditions and API clients (RunHandle.events)
all want the events a run logs, as they happen. They must never slow the
sensors' reader: `publish` runs on the reader's thread, under the monitor's
lock, so it only appends to each subscriber's bounded queue and returns. A
subscriber that falls behind loses the events it has no room for (its queue
keeps, in order, what it has not read yet), and each one it loses is
counted: `Subscription.missed`, and the bus's total in the run's end event
(`bus`), so nothing is lost silently.

    sub = bus.subscribe(maxsize=10000, kinds={"file", "exec"})
    for ev in sub:              # blocks; ends when the run ends (bus.close)
        ...
    sub.missed                  # events that did not fit

A subscriber may also pass `callback`: called on the publisher's thread for
each event, so it must be quick and must not block (it gets the Event
object); an exception in it is counted (`errors`), never raised into the
reader, and the callback gets nothing more (every later event counts as
missed).
"""
import collections
import threading


class Subscription:
    """One subscriber's bounded queue of events (or its callback)."""

    def __init__(self, bus, maxsize, kinds=None, callback=None):
        if maxsize < 1:
            raise ValueError("a subscription holds at least one event")
        self._bus = bus
        self.maxsize = maxsize
        self.kinds = frozenset(kinds) if kinds else None
        self.callback = callback
        self.missed = 0                  # events that did not fit (or a failed callback's)
        self.errors = 0                  # callback exceptions (the callback is then dropped)
        self.delivered = 0
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def _offer(self, ev):
        if self.kinds is not None and ev.kind not in self.kinds:
            return
        if self.errors:                  # its callback failed: every later event is lost to it
            self._miss()
            return
        if self.callback is not None:
            try:
                self.callback(ev)
                self.delivered += 1
            except Exception:            # noqa: BLE001 - a subscriber never breaks the reader
                self.errors += 1
                self._bus.callback_errors += 1
                self.callback = None
                self._miss()
            return
        with self._cond:
            if len(self._queue) >= self.maxsize:
                self._miss()
                return
            self._queue.append(ev)
            self._cond.notify()

    def _miss(self):
        self.missed += 1
        self._bus.missed += 1

    def _close(self):
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def get(self, timeout=None):
        """The next event; None once the bus is closed and the queue is
        empty, or when timeout (seconds) passes first."""
        with self._cond:
            if not self._queue and not self.closed:
                self._cond.wait(timeout)
            if self._queue:
                self.delivered += 1
                return self._queue.popleft()
            return None

    def __iter__(self):
        while True:
            ev = self.get()
            if ev is None:
                if self.closed:
                    return
                continue
            yield ev

    def cancel(self):
        """Stop receiving; what is queued is dropped (not counted as missed)."""
        self._bus._remove(self)
        self._close()
        with self._cond:
            self._queue.clear()


class EventBus:
    """Fan-out of one run's events to its subscribers, never blocking."""

    def __init__(self):
        self.subscribers = []            # replaced, never changed in place: publish reads it unlocked
        self._lock = threading.Lock()
        self.published = 0               # events offered to at least one subscriber
        self.missed = 0                  # by every subscriber, cancelled ones included
        self.callback_errors = 0
        self.closed = False

    def subscribe(self, maxsize=10000, kinds=None, callback=None):
        sub = Subscription(self, maxsize, kinds, callback)
        with self._lock:
            if self.closed:
                sub._close()
            else:
                self.subscribers = self.subscribers + [sub]
        return sub

    def _remove(self, sub):
        with self._lock:
            self.subscribers = [s for s in self.subscribers if s is not sub]

    def publish(self, ev):
        self.published += 1
        for sub in self.subscribers:
            sub._offer(ev)

    def counters(self):
        """What the end event reports: subscribers, and what they missed."""
        return {"published": self.published, "subscribers": len(self.subscribers),
                "missed": self.missed, "callback_errors": self.callback_errors}

    def close(self):
        """The run ended: iterators finish once they read what is queued."""
        with self._lock:
            self.closed = True
            subs = self.subscribers
        for s in subs:
            s._close()
