"""The inference scheduler (agentwatch/harness/scheduler.py): shares by
weight, no banking of idle time, the wait bound, caps, cancellation.

Every test runs on a real asyncio loop whose clock is virtual: when
nothing is ready the loop jumps to its next timer instead of sleeping
(VirtualLoop), so `asyncio.sleep(2.0)` is a fake upstream call that lasts
two seconds of scheduler time and no wall time, and each run is
deterministic.
"""
import asyncio
import collections
import math
import random
import selectors

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agentwatch.harness.scheduler import AgentRemoved, Scheduler, check_weight, wait_bound


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self):
        super().__init__()
        self.loop = None

    def select(self, timeout=None):
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("deadlock: nothing ready and no timer set")
        self.loop._now += timeout            # jump to the next timer
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self):
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0

    def time(self):
        return self._now


def run(main):
    """main(loop) on a fresh virtual-time loop; its result."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main(loop))
    finally:
        # a failed test leaves tasks behind: end them on this loop, not at GC
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending))
        loop.close()


async def at_once(acquire):
    """The grant of `acquire`, which must come without waiting."""
    g = await asyncio.wait_for(acquire, 1e-6)
    assert g.wait_s == 0.0
    return g


class Upstream:
    """A fake upstream that counts calls in flight, globally and per agent,
    and fails the test the moment a cap would be exceeded."""

    def __init__(self, cap, per_agent):
        self.cap, self.per_agent = cap, per_agent
        self.now = 0
        self.peak = 0
        self.per = collections.Counter()
        self.per_peak = collections.Counter()
        self.calls = 0

    async def call(self, agent, duration):
        self.enter(agent)
        try:
            await asyncio.sleep(duration)
        finally:
            self.leave(agent)

    def enter(self, agent):
        self.now += 1
        self.per[agent] += 1
        self.calls += 1
        assert self.now <= self.cap, f"{self.now} calls in flight, cap {self.cap}"
        assert self.per[agent] <= self.per_agent, f"{agent}: {self.per[agent]} in flight"
        self.peak = max(self.peak, self.now)
        self.per_peak[agent] = max(self.per_peak[agent], self.per[agent])

    def leave(self, agent):
        self.now -= 1
        self.per[agent] -= 1


def assert_consistent(s):
    """Caps hold, and no slot is idle while an eligible request waits."""
    st_ = s.stats()
    assert st_.in_flight <= st_.cap
    # a removed agent's calls still hold slots but are no longer listed
    assert sum(a.in_flight for a in st_.agents.values()) <= st_.in_flight
    for name, a in st_.agents.items():
        assert a.in_flight <= st_.per_agent, name
        if a.queued and a.in_flight < st_.per_agent:
            assert st_.in_flight == st_.cap, f"{name} waits with a slot free"


# ------------------------------------------------------------------ shares

SAME = {"in": 200, "out": 100, "est_out": 256, "dur": 1.0}
MIXED = {"a": {"in": 300, "out": 100, "est_out": 256, "dur": 1.0},
         "b": {"in": 100, "out": 50, "est_out": 512, "dur": 0.5},
         "c": {"in": 50, "out": 200, "est_out": 200, "dur": 2.0}}


def saturate(weights, shapes, total=700, cap=2, per_agent=4, workers=6):
    """Agents kept backlogged (workers > what caps let in flight) for
    `total` grants; returns (served weighted tokens, raw tokens, grants) per agent."""
    async def main(loop):
        s = Scheduler(max_concurrent=cap, per_agent=per_agent, clock=loop.time)
        up = Upstream(cap, per_agent)
        for name, w in weights.items():
            s.set_weight(name, w)
        served, tokens, grants = collections.Counter(), collections.Counter(), collections.Counter()
        n = [0]

        async def worker(name):
            sh = shapes[name]
            while n[0] < total:
                g = await s.acquire(name, sh["in"], sh["est_out"])
                if n[0] >= total:
                    g.release(0, 0)
                    return
                n[0] += 1
                stats = s.stats()
                if n[0] > cap:      # the first grants go before every worker has asked
                    assert all(stats.agents[a].queued > 0 for a in weights), "an agent was not backlogged"
                assert_consistent(s)
                grants[name] += 1
                served[name] += s.cost(sh["in"], sh["out"])
                tokens[name] += sh["in"] + sh["out"]
                await up.call(name, sh["dur"])
                g.release(sh["in"], sh["out"])

        await asyncio.gather(*(worker(a) for a in weights for _ in range(workers)))
        assert up.peak == cap
        assert s.stats().in_flight == 0
        return served, tokens, grants
    return run(main)


@pytest.mark.parametrize("shapes, measure", [
    ({a: SAME for a in "abc"}, "tokens"),        # same calls: raw token shares
    (MIXED, "served"),                           # different calls: weighted-token shares
], ids=["same-calls", "mixed-calls"])
def test_shares_follow_weights_1_2_4(shapes, measure):
    served, tokens, grants = saturate({"a": 1, "b": 2, "c": 4}, shapes)
    assert sum(grants.values()) == 700
    use = tokens if measure == "tokens" else served
    total = sum(use.values())
    for name, w in (("a", 1), ("b", 2), ("c", 4)):
        share = use[name] / total
        assert abs(share - w / 7) <= 0.10 * (w / 7), (name, share, w / 7, dict(grants))


def test_equal_weights_share_equally():
    served, tokens, grants = saturate({"a": 100, "b": 100, "c": 100}, MIXED, total=300)
    total = sum(served.values())
    for name in "abc":
        assert abs(served[name] / total - 1 / 3) <= 0.05, dict(served)


# ------------------------------------------------------------------ no banking

def grants_log(late_start, idle=None, lift=True):
    """a, b (weight 1) saturated from t=0; c (weight 1) saturated from
    late_start, or active, idle over `idle` = (from, to), then back.
    Returns [(time, agent)] of every grant."""
    async def main(loop):
        s = Scheduler(max_concurrent=2, per_agent=4, clock=loop.time)
        if not lift:
            s._lift = lambda a: None                # the control: VTC's rule off
        log = []
        end = 400.0

        async def worker(name, start=0.0, stop=math.inf):
            await asyncio.sleep(start)
            while loop.time() < min(end, stop):
                g = await s.acquire(name, 100, 100)
                log.append((loop.time(), name))
                await asyncio.sleep(1.0)
                g.release(100, 50)

        tasks = [worker(n) for n in "ab" for _ in range(5)]
        if idle is None:
            tasks += [worker("c", start=late_start) for _ in range(5)]
        else:
            tasks += [worker("c", stop=idle[0]) for _ in range(5)]
            tasks += [worker("c", start=idle[1]) for _ in range(5)]
        for n in "abc":
            s.set_weight(n, 1)
        await asyncio.gather(*tasks)
        return log
    return run(main)


def window(log, since, n=60):
    """Grants per agent among the first n grants from time `since` on."""
    return collections.Counter(a for t, a in [x for x in log if x[0] >= since][:n])


def test_late_arrival_gets_its_share_not_a_burst():
    log = grants_log(late_start=200.0)
    w = window(log, 200.0)
    assert 20 - 3 <= w["c"] <= 20 + 3, w


def test_idle_time_is_not_banked():
    log = grants_log(late_start=None, idle=(20.0, 200.0))
    w = window(log, 200.0)
    assert w["c"] <= 20 + 3, w


def test_without_the_lift_idle_time_would_be_banked():
    # the control: the same scenario with VTC's lift switched off bursts
    log = grants_log(late_start=None, idle=(20.0, 200.0), lift=False)
    assert window(log, 200.0)["c"] >= 55


# ------------------------------------------------------------------ wait bound

def late_light_agent(age_s, calls=8, longest=2.0, timeout=None):
    """Heavy agents h1, h2 (weight 1000) saturated; from t=100 a weight-1
    agent makes `calls` calls one at a time. Returns its (wait, bound) pairs."""
    async def main(loop):
        s = Scheduler(max_concurrent=2, per_agent=4, age_s=age_s, clock=loop.time)
        up = Upstream(2, 4)
        s.set_weight("h1", 1000)
        s.set_weight("h2", 1000)
        s.set_weight("light", 1)
        rng = random.Random(7)
        done = [False]
        out = []

        async def heavy(name):
            while not done[0]:
                g = await s.acquire(name, 200, 200)
                await up.call(name, rng.uniform(0.5, longest))
                g.release(200, 150)

        async def light():
            await asyncio.sleep(100.0)
            for _ in range(calls):
                bound = s.wait_bound(longest, "light")
                t0 = loop.time()
                g = await asyncio.wait_for(s.acquire("light", 300, 300), timeout)
                assert abs((loop.time() - t0) - g.wait_s) < 1e-9
                out.append((g.wait_s, bound))
                await up.call("light", longest)
                g.release(300, 200)
            done[0] = True

        heavies = [asyncio.ensure_future(heavy(n)) for n in ("h1", "h2") for _ in range(3)]
        try:
            await light()
        finally:
            done[0] = True
            await asyncio.gather(*heavies)
        return out
    return run(main)


@pytest.mark.parametrize("age_s", [30.0, 3.0])
def test_light_agent_waits_no_longer_than_the_bound(age_s):
    out = late_light_agent(age_s)
    assert len(out) == 8
    for wait, bound in out:
        assert wait <= bound, (wait, bound)
    # the scenario is one where ageing is what serves it: after its first
    # call its counter is ~1000 heavy calls ahead, so it waits until aged
    assert max(w for w, _ in out) >= age_s


def test_without_ageing_the_light_agent_starves():
    with pytest.raises(asyncio.TimeoutError):
        late_light_agent(math.inf, calls=2, timeout=200.0)


def test_wait_bound_formula():
    assert wait_bound(2, 30.0, 2.0, agents=1) == 32.0
    assert wait_bound(2, 30.0, 2.0, agents=3) == 34.0
    assert wait_bound(2, 30.0, 2.0, agents=3, own_ahead=2) == 3 * 34.0
    assert wait_bound(8, 0.0, 1.0, agents=8) == 2.0          # max(A, D): D when calls outlast A
    with pytest.raises(ValueError):
        wait_bound(2, 30.0, 2.0, agents=0)

    async def main(loop):
        s = Scheduler(max_concurrent=4, per_agent=1, age_s=10.0, clock=loop.time)
        assert s.wait_bound(3.0) == 10.0 + 3.0            # k = 1: a newcomer alone
        g = await s.acquire("a", 1)
        t = asyncio.ensure_future(s.acquire("a", 1))
        await asyncio.sleep(0)
        assert s.wait_bound(3.0, "b") == 10.0 + 3.0       # k = 2 (a, b), C = 4
        assert s.wait_bound(3.0, "a") == 2 * 13.0         # one of its own ahead
        g.release()
        (await t).release()
    run(main)


# ------------------------------------------------------------------ caps

def test_caps_never_exceeded_at_any_grant():
    async def main(loop):
        s = Scheduler(max_concurrent=3, per_agent=2, clock=loop.time)
        up = Upstream(3, 2)

        async def call(agent, d):
            g = await s.acquire(agent, 10, 10)
            assert_consistent(s)
            await up.call(agent, d)
            g.release(10, 5)

        await asyncio.gather(*(call(f"a{i % 4}", 0.5 + (i % 5) * 0.3) for i in range(200)))
        assert up.calls == 200
        assert up.peak == 3
        assert max(up.per_peak.values()) == 2
    run(main)


def test_per_agent_cap_lets_others_through():
    async def main(loop):
        s = Scheduler(max_concurrent=4, per_agent=1, clock=loop.time)
        g1 = await s.acquire("x", 1)
        t = asyncio.ensure_future(s.acquire("x", 1))      # x is at its cap
        g2 = await at_once(s.acquire("y", 1))  # y is granted at once
        await asyncio.sleep(0)
        assert not t.done()
        assert s.stats().agents["x"].queued == 1
        g1.release()
        g3 = await t
        for g in (g2, g3):
            g.release()
        assert s.stats().in_flight == 0
    run(main)


# ------------------------------------------------------------------ cancellation

def test_cancelled_waiters_leave_no_slot():
    async def main(loop):
        s = Scheduler(max_concurrent=2, per_agent=2, clock=loop.time)
        held = [await s.acquire("a", 1), await s.acquire("b", 1)]
        for _ in range(50):
            waiters = [asyncio.ensure_future(s.acquire(n, 5, 5)) for n in "abc" for _ in range(4)]
            await asyncio.sleep(0.1)
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            assert all(w.cancelled() for w in waiters)
            assert s.stats().queued == 0
        for g in held:
            g.release()
        assert s.stats().in_flight == 0
        # the caps are whole: two grants at once, the third waits
        g1 = await at_once(s.acquire("c", 1))
        g2 = await at_once(s.acquire("c", 1))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.acquire("c", 1), 1.0)
        g1.release()
        g2.release()
        assert s.stats().agents["c"].cancelled == 4 * 50 + 1
    run(main)


def test_grant_to_a_waiter_cancelled_at_the_same_moment_is_released():
    async def main(loop):
        s = Scheduler(max_concurrent=1, per_agent=1, clock=loop.time)
        g1 = await s.acquire("a", 10)
        t = asyncio.ensure_future(s.acquire("b", 100, 100))
        await asyncio.sleep(0)
        before = s.stats().agents["b"].service
        g1.release()                  # grants b's waiter now...
        assert s.stats().in_flight == 1
        t.cancel()                    # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await t
        st_ = s.stats()
        assert st_.in_flight == 0
        assert st_.agents["b"].service == before          # nothing served, nothing charged
        g = await at_once(s.acquire("c", 1))
        g.release()
    run(main)


def test_remove_fails_waiters_and_keeps_in_flight_slots():
    async def main(loop):
        s = Scheduler(max_concurrent=1, per_agent=1, clock=loop.time)
        g = await s.acquire("gone", 1)
        waiters = [asyncio.ensure_future(s.acquire("gone", 1)) for _ in range(3)]
        other = asyncio.ensure_future(s.acquire("other", 1))
        await asyncio.sleep(0)
        s.remove("gone")
        for w in waiters:
            with pytest.raises(AgentRemoved, match="removed from the inference scheduler"):
                await w
        gone = s.stats().agents["gone"]                    # its call still holds the slot
        assert (gone.queued, gone.in_flight) == (0, 1)
        assert s.stats().in_flight == 1 and not other.done()
        g.release()
        assert "gone" not in s.stats().agents
        (await other).release()
        assert s.stats().in_flight == 0
        s.remove("nobody")
    run(main)


def test_a_removed_agent_asking_again_stays_under_its_cap():
    async def main(loop):
        s = Scheduler(max_concurrent=4, per_agent=1, clock=loop.time)
        g = await s.acquire("r", 1)
        s.remove("r")
        t = asyncio.ensure_future(s.acquire("r", 1))        # same run id, its call still in flight
        await asyncio.sleep(1.0)
        assert not t.done() and s.stats().agents["r"].in_flight == 1
        g.release()
        (await t).release()
        assert s.stats().agents["r"].granted == 2           # the same record, revived
    run(main)


def test_weight_change_applies_to_later_grants():
    async def main(loop):
        s = Scheduler(max_concurrent=1, per_agent=1, age_s=math.inf, clock=loop.time)
        up = Upstream(1, 1)
        count = collections.Counter()
        stop = [False]

        async def worker(name):
            while not stop[0]:
                g = await s.acquire(name, 100, 0)
                count[name, loop.time() >= 100.0] += 1
                await up.call(name, 1.0)
                g.release(100, 0)

        async def flip():
            await asyncio.sleep(100.0)
            s.set_weight("x", 300)                           # x: 1:1 -> 3:1
            await asyncio.sleep(200.0)
            stop[0] = True
        await asyncio.gather(flip(), *(worker(n) for n in "xy" for _ in range(3)))
        assert abs(count["x", False] - count["y", False]) <= 2
        assert 2.5 <= count["x", True] / count["y", True] <= 3.5
    run(main)


# ------------------------------------------------------------------ charges and stats

def test_release_corrects_the_estimate_and_is_idempotent():
    async def main(loop):
        s = Scheduler(input_weight=1.0, output_weight=2.0, clock=loop.time)
        s.set_weight("a", 4)
        g = await s.acquire("a", 100, 1000)
        assert s.stats().agents["a"].service == (100 + 2000) / 4
        g.release(100, 50)
        assert s.stats().agents["a"].service == (100 + 100) / 4
        g.release(999, 999)
        a = s.stats().agents["a"]
        assert a.service == 50.0 and (a.tokens_in, a.tokens_out) == (100, 50)
        assert s.stats().in_flight == 0
        g2 = await s.acquire("a", 10, 10)
        with pytest.raises(ValueError):
            g2.release(-1, 0)                        # refused, and the slot still held
        assert s.stats().in_flight == 1 and not g2.released
        g2.release()                                 # None: the estimate stands
        assert s.stats().agents["a"].tokens_out == 60 and s.stats().in_flight == 0
    run(main)


def test_stats_show_queue_and_waits():
    async def main(loop):
        s = Scheduler(max_concurrent=1, per_agent=1, clock=loop.time)
        g = await s.acquire("a", 1)
        t = asyncio.ensure_future(s.acquire("b", 1))
        await asyncio.sleep(3.0)
        st_ = s.stats()
        assert (st_.in_flight, st_.cap, st_.queued) == (1, 1, 1)
        assert st_.agents["b"].queued == 1 and st_.agents["b"].oldest_queued_s == 3.0
        g.release()
        gb = await t
        assert gb.wait_s == 3.0
        b = s.stats().agents["b"]
        assert (b.granted, b.in_flight, b.wait_last_s, b.wait_max_s, b.wait_mean_s) == (1, 1, 3.0, 3.0, 3.0)
        gb.release()
        g = await s.acquire("b", 1)
        b = s.stats().agents["b"]
        assert (b.wait_last_s, b.wait_max_s, b.wait_mean_s, b.weight) == (0.0, 3.0, 1.5, 100)
        g.release()
    run(main)


def test_weights_are_checked():
    for bad in (0, 10001, 1.5, True, "100"):
        with pytest.raises(ValueError, match="1..10000"):
            check_weight(bad)
    assert check_weight(1) == 1 and check_weight(10000) == 10000
    with pytest.raises(ValueError):
        Scheduler(max_concurrent=0)


# ------------------------------------------------------------------ property

OPS = st.lists(st.tuples(
    st.sampled_from(["call", "call", "call", "cancel", "remove", "weight"]),
    st.integers(0, 3),                     # agent
    st.integers(0, 20),                    # start, tenths of a second
    st.integers(0, 30),                    # hold or cancel-after, tenths
    st.integers(0, 500),                   # tokens
), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, cap=st.integers(1, 4), per_agent=st.integers(1, 3), age=st.sampled_from([0.0, 0.5, 30.0]))
def test_caps_and_bound_hold_under_random_arrivals_releases_cancellations(ops, cap, per_agent, age):
    async def main(loop):
        s = Scheduler(max_concurrent=cap, per_agent=per_agent, age_s=age, clock=loop.time)
        up = Upstream(cap, per_agent)
        outcomes = collections.Counter()

        async def call(agent, start, hold, tokens, cancel_after):
            await asyncio.sleep(start / 10)
            own = s.stats().agents.get(agent)
            # holds are at most 3 s; at most 4 agents (a0..a3) ever queue here
            bound = wait_bound(cap, age, 3.0, agents=4, own_ahead=own.queued if own else 0)
            try:
                g = await asyncio.wait_for(s.acquire(agent, tokens, tokens), cancel_after)
            except asyncio.TimeoutError:
                outcomes["cancelled"] += 1
                return
            except AgentRemoved:
                outcomes["removed"] += 1
                return
            assert_consistent(s)
            assert g.wait_s <= bound + 1e-9, (g.wait_s, bound)
            try:
                await up.call(agent, hold / 10)
            finally:
                g.release(tokens // 2, tokens // 3)
            assert_consistent(s)
            outcomes["served"] += 1

        async def other(kind, agent, start, value):
            await asyncio.sleep(start / 10)
            if kind == "remove":
                s.remove(agent)
            else:
                s.set_weight(agent, 1 + value * 19)
            assert_consistent(s)

        tasks = []
        for kind, agent, start, t, tokens in ops:
            name = f"a{agent}"
            if kind == "call":
                tasks.append(call(name, start, t, tokens, None))
            elif kind == "cancel":
                tasks.append(call(name, start, 5, tokens, t / 10))
            else:
                tasks.append(other(kind, name, start, tokens))
        await asyncio.gather(*tasks)
        st_ = s.stats()
        assert st_.in_flight == 0 and st_.queued == 0 and up.now == 0
        # nothing leaked: the whole cap can be taken at once
        grants = [await at_once(s.acquire(f"fresh{i}", 1)) for i in range(cap)]
        for g in grants:
            g.release()
    run(main)
