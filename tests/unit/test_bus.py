"""The engine's event bus: subscribers get a run's events in order, a slow
one never blocks the publisher, and what it misses is counted."""
import threading
import time

import pytest

from agentwatch.engine.bus import EventBus
from agentwatch.core.events import Event


def ev(i, kind="file"):
    return Event(kind=kind, ts=float(i), pid=i)


def test_subscribers_get_every_event_in_order_until_the_bus_closes():
    bus = EventBus()
    a, b = bus.subscribe(), bus.subscribe(kinds={"exec"})
    for i in range(5):
        bus.publish(ev(i, "exec" if i % 2 else "file"))
    bus.close()
    assert [e.pid for e in a] == [0, 1, 2, 3, 4]
    assert [e.pid for e in b] == [1, 3]
    assert bus.counters() == {"published": 5, "subscribers": 2, "missed": 0, "callback_errors": 0}


def test_a_slow_subscriber_never_blocks_and_its_losses_are_counted():
    bus = EventBus()
    slow = bus.subscribe(maxsize=10)
    t0 = time.monotonic()
    for i in range(100000):
        bus.publish(ev(i))
    assert time.monotonic() - t0 < 5           # never waited for the reader
    assert slow.missed == 99990 and bus.counters()["missed"] == 99990
    assert [slow.get(0).pid for _ in range(10)] == list(range(10))   # what it kept, in order
    assert slow.get(0) is None


def test_a_reader_thread_wakes_for_events_and_ends_at_close():
    bus = EventBus()
    sub = bus.subscribe()
    got = []
    t = threading.Thread(target=lambda: got.extend(e.pid for e in sub))
    t.start()
    for i in range(3):
        bus.publish(ev(i))
    bus.close()
    t.join(5)
    assert not t.is_alive() and got == [0, 1, 2]


def test_a_failing_callback_is_dropped_and_counted_never_raised():
    bus = EventBus()
    seen = []
    bus.subscribe(callback=lambda e: seen.append(e.pid))

    def boom(e):
        raise RuntimeError("subscriber bug")
    bus.subscribe(callback=boom)
    bus.publish(ev(1))
    bus.publish(ev(2))
    assert seen == [1, 2]
    c = bus.counters()
    assert c["callback_errors"] == 1 and c["missed"] == 2    # the bad one lost both


def test_cancel_and_late_subscribers():
    bus = EventBus()
    sub = bus.subscribe()
    sub.cancel()
    bus.publish(ev(1))
    assert sub.get(0) is None and bus.counters()["subscribers"] == 0
    bus.close()
    late = bus.subscribe()
    assert list(late) == []
    with pytest.raises(ValueError):
        bus.subscribe(maxsize=0)
