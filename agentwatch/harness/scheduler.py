"""Inference scheduler: token-weighted fair queueing of LLM calls between agents.

Pure logic on one asyncio loop, no HTTP: the gateway asks `acquire` before
it sends a call upstream and `release`s the grant when the call is over.

Fairness (VTC, "Fairness in Serving LLMs", 2024)
  Each agent (key: its run id) has a weight, 1..10000, default 100 (the
  same number becomes its cgroup cpu.weight), one FIFO queue, and a
  virtual service counter. A call's service is
      input_weight * tokens_in + output_weight * tokens_out
  (defaults 1 and 2: an output token costs the upstream more), and the
  agent's counter grows by service / weight. When a slot is free the head
  of the backlogged queue whose agent has the least counter is granted
  (ties: the older request). The estimate given to `acquire` is charged at
  grant time; `Grant.release` corrects the charge to the tokens really
  served, as VTC charges what was served.
  No banking: an agent that becomes backlogged (its queue was empty) has
  its counter lifted to the least counter of the agents still backlogged
  (with none backlogged, to the counter of the last fair grant), so time
  spent idle is not credit for a later burst.

Ageing, and the wait bound
  A request that has been the head of its agent's queue for age_s or longer
  is granted before fairness order, oldest first. Fair order alone would
  let a weight-1 agent behind weight-1000 agents wait for a thousand of
  their calls per call of its own; ageing caps that.
  Age counts from when the request became the head of its queue, not from
  when it was enqueued: a request behind its own agent's earlier ones waits
  on its agent's backlog, not on the others, and counting that wait would
  make every request of a low-weight agent with a deep queue "aged", served
  first come first served instead of by weight (with enqueue age the 1:2:4
  shares test gave the weight-1 agent 17% instead of 14%).

  Let C = max_concurrent, A = age_s, D = the longest time a grant is held
  (grant to release: the gateway's upstream timeout bounds it), and k the
  number of agents with requests queued (r's own included). A request r
  that becomes the head of agent a's queue at t1 (for an agent that makes
  one call at a time: when it is enqueued) is granted by

      t1 + max(A, D) + ceil(k / C) * D                    (wait_bound)

  and a request enqueued at t0 with j of its own agent's requests ahead of
  it by t0 + (j + 1) * that (k then counts the agents queued at any time
  during the wait). In the common case D <= A this is age_s plus the
  time for the heads that aged before it and the calls in flight to finish.

  Why. While r is head, a gets no grant (its queue is FIFO), so a's calls in
  flight at t1 only end, each by t1 + D: from t1 + D on (or at once, if a is
  under its per-agent cap at t1) a is under its cap and r is eligible. From
  t1 + A on r is aged. So from t1 + max(A, D) on, r is aged and eligible,
  and every grant goes to the oldest aged eligible head: r, or a head that
  became head before t1. Each agent has one head at a time, and an agent's
  next head, once its head is granted, became head after t1; so at most
  k - 1 grants go before r. The scheduler is work-conserving (every
  arrival, release and cancellation dispatches), so while r waits eligible
  all C slots are busy. Cut time into windows of length D: each call in
  flight at a window's start ends within it and its slot is granted to r
  or to one of the k - 1 older heads; so each window makes at least C such
  grants, and within ceil(k / C) windows r is granted.

Caps: at most max_concurrent grants are held at once, and at most
per_agent per agent; counted at every grant, never exceeded.

Cancellation: a waiter that is cancelled leaves its queue; a grant issued
to a waiter cancelled at the same moment is released at once (charged
nothing, since nothing was served), never leaked.
"""
import asyncio
import collections
import dataclasses
import itertools
import math
import time

from agentwatch.core.errors import AgentwatchError

DEFAULT_WEIGHT = 100
MIN_WEIGHT, MAX_WEIGHT = 1, 10000      # cgroup v2 cpu.weight's range


class AgentRemoved(AgentwatchError):
    """The agent was removed from the scheduler while its request waited."""


def check_weight(weight):
    """weight as an int in 1..10000, or ValueError naming the range."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight {weight!r}: must be an integer {MIN_WEIGHT}..{MAX_WEIGHT} "
                         f"(the cgroup cpu.weight range; default {DEFAULT_WEIGHT})")
    return weight


def wait_bound(max_concurrent, age_s, longest_call_s, agents, own_ahead=0):
    """The longest a request can wait (module docstring), from its enqueue:
    (own_ahead + 1) * (max(age_s, longest_call_s) + ceil(agents / max_concurrent)
    * longest_call_s), where agents counts those with requests queued, its
    own included, and own_ahead its own agent's requests queued ahead of it."""
    if agents < 1 or own_ahead < 0 or longest_call_s < 0:
        raise ValueError("agents must be >= 1, own_ahead and longest_call_s >= 0")
    per_head = max(age_s, longest_call_s) + math.ceil(agents / max_concurrent) * longest_call_s
    return (own_ahead + 1) * per_head


@dataclasses.dataclass(frozen=True)
class AgentStats:
    weight: int
    queued: int
    in_flight: int
    service: float          # the virtual counter fairness compares (weighted tokens / weight)
    granted: int
    cancelled: int          # waiters cancelled (before or at their grant)
    tokens_in: int          # tokens served, as corrected at release
    tokens_out: int
    wait_last_s: float
    wait_max_s: float
    wait_mean_s: float
    oldest_queued_s: float  # how long the head of its queue has waited so far (0 if none)


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    in_flight: int
    cap: int
    per_agent: int
    queued: int
    agents: dict            # agent -> AgentStats


class _Agent:
    __slots__ = ("name", "weight", "queue", "in_flight", "service", "granted", "cancelled",
                 "tokens_in", "tokens_out", "wait_last", "wait_max", "wait_total", "removed")

    def __init__(self, name, weight):
        self.name, self.weight = name, weight
        self.removed = False            # removed, kept until its calls in flight end
        self.queue = collections.deque()
        self.in_flight = self.granted = self.cancelled = 0
        self.tokens_in = self.tokens_out = 0
        self.service = self.wait_last = self.wait_max = self.wait_total = 0.0


class _Waiter:
    __slots__ = ("agent", "estimate_in", "estimate_out", "enqueued", "head_since", "seq", "future")

    def __init__(self, agent, estimate_in, estimate_out, enqueued, seq, future):
        self.agent, self.estimate_in, self.estimate_out = agent, estimate_in, estimate_out
        self.enqueued, self.seq, self.future = enqueued, seq, future
        self.head_since = None          # when it became the head of its queue (ageing counts from it)


class Grant:
    """A slot held for one upstream call. release() frees it; idempotent."""

    def __init__(self, scheduler, agent, estimate_in, estimate_out, wait_s, granted_at):
        self._scheduler, self._agent = scheduler, agent
        self.agent = agent.name
        self.weight = agent.weight               # the weight the charge was made at
        self.estimate_in, self.estimate_out = estimate_in, estimate_out
        self.wait_s = wait_s
        self.granted_at = granted_at
        self.released = False

    def release(self, tokens_in=None, tokens_out=None):
        """Correct the charge to the tokens really served (None: keep that
        part of the estimate) and free the slot. A second call does nothing."""
        if self.released:
            return
        tokens_in = self.estimate_in if tokens_in is None else tokens_in
        tokens_out = self.estimate_out if tokens_out is None else tokens_out
        if tokens_in < 0 or tokens_out < 0:         # refused before the slot is touched
            raise ValueError("token counts must be >= 0")
        self.released = True
        self._scheduler._release(self, tokens_in, tokens_out)

    def __repr__(self):
        return (f"Grant({self.agent!r}, est={self.estimate_in}+{self.estimate_out}, "
                f"wait={self.wait_s:.3f}s{', released' if self.released else ''})")


class Scheduler:
    def __init__(self, max_concurrent=8, per_agent=4, input_weight=1.0, output_weight=2.0,
                 age_s=30.0, clock=time.monotonic):
        if max_concurrent < 1 or per_agent < 1:
            raise ValueError("max_concurrent and per_agent must be >= 1")
        if input_weight < 0 or output_weight < 0 or age_s < 0:
            raise ValueError("input_weight, output_weight and age_s must be >= 0")
        self.max_concurrent, self.per_agent = max_concurrent, per_agent
        self.input_weight, self.output_weight = input_weight, output_weight
        self.age_s = age_s
        self._clock = clock
        self._agents = {}
        self._in_flight = 0
        self._floor = 0.0                # counter of the last fair grant (lift with none backlogged)
        self._seq = itertools.count()

    # -------------------------------------------------------------- agents

    def _agent(self, name):
        a = self._agents.get(name)
        if a is None:
            a = self._agents[name] = _Agent(name, DEFAULT_WEIGHT)
        a.removed = False
        return a

    def set_weight(self, agent, weight):
        """Set (or create) an agent's weight, 1..10000. Its counter keeps its
        value; calls in flight are corrected at the weight they were charged at."""
        self._agent(agent).weight = check_weight(weight)
        self._dispatch()

    def remove(self, agent):
        """Forget an agent: its waiters raise AgentRemoved. Its calls in flight
        keep their slots (global and its own) until released; the agent is
        forgotten when the last one ends, unless it asks again before."""
        a = self._agents.get(agent)
        if a is None:
            return
        a.removed = True
        if not a.in_flight:
            del self._agents[agent]
        queue, a.queue = a.queue, collections.deque()
        for w in queue:
            if not w.future.done():
                w.future.set_exception(AgentRemoved(
                    f"agent {agent!r} was removed from the inference scheduler while its "
                    f"request waited (the run ended or was taken down); the call was not sent"))
        self._dispatch()

    # -------------------------------------------------------------- grants

    def cost(self, tokens_in, tokens_out):
        return self.input_weight * tokens_in + self.output_weight * tokens_out

    async def acquire(self, agent, estimate_in, estimate_out=0):
        """Wait for a slot for one call of `agent`; returns its Grant. The
        estimate is charged at grant time and corrected by Grant.release."""
        if estimate_in < 0 or estimate_out < 0:
            raise ValueError("token estimates must be >= 0")
        a = self._agent(agent)
        fut = asyncio.get_running_loop().create_future()
        w = _Waiter(a, estimate_in, estimate_out, self._clock(), next(self._seq), fut)
        if not self._live(a):
            self._lift(a)
        a.queue.append(w)
        self._promote(a)
        self._dispatch()
        try:
            return await fut
        except asyncio.CancelledError:
            a.cancelled += 1
            if fut.done() and not fut.cancelled():
                if fut.exception() is None:        # granted at the moment we were cancelled
                    fut.result().release(0, 0)
            else:
                try:
                    a.queue.remove(w)
                except ValueError:
                    pass
                self._promote(a)
                self._dispatch()
            raise

    def _live(self, a):
        """Whether a has a waiter still waiting (cancelled ones may linger briefly)."""
        return any(not w.future.done() for w in a.queue)

    def _lift(self, a):
        others = [b.service for b in self._agents.values() if b is not a and self._live(b)]
        a.service = max(a.service, min(others) if others else self._floor)

    def _promote(self, a):
        """Start the ageing clock of a's head, if it has a new one."""
        q = a.queue
        while q and q[0].future.done():            # cancelled, not yet removed by its task
            q.popleft()
        if q and q[0].head_since is None:
            q[0].head_since = self._clock()

    def _pick(self):
        now = self._clock()
        aged = fair = None
        for a in self._agents.values():
            self._promote(a)
            q = a.queue
            if not q or a.in_flight >= self.per_agent:
                continue
            head = q[0]
            if now - head.head_since >= self.age_s:
                if aged is None or (head.head_since, head.seq) < (aged.head_since, aged.seq):
                    aged = head
            if fair is None or (a.service, head.seq) < (fair.agent.service, fair.seq):
                fair = head
        if aged is None and fair is not None:
            self._floor = max(self._floor, fair.agent.service)
        return aged or fair

    def _dispatch(self):
        while self._in_flight < self.max_concurrent:
            w = self._pick()
            if w is None:
                return
            a = w.agent
            a.queue.popleft()
            self._promote(a)
            now = self._clock()
            grant = Grant(self, a, w.estimate_in, w.estimate_out, now - w.enqueued, now)
            a.service += self.cost(w.estimate_in, w.estimate_out) / a.weight
            a.in_flight += 1
            self._in_flight += 1
            a.granted += 1
            a.wait_last = grant.wait_s
            a.wait_max = max(a.wait_max, grant.wait_s)
            a.wait_total += grant.wait_s
            w.future.set_result(grant)

    def _release(self, grant, tokens_in, tokens_out):
        a = grant._agent
        a.service += (self.cost(tokens_in, tokens_out)
                      - self.cost(grant.estimate_in, grant.estimate_out)) / grant.weight
        a.tokens_in += tokens_in
        a.tokens_out += tokens_out
        a.in_flight -= 1
        self._in_flight -= 1
        if a.removed and not a.in_flight and self._agents.get(a.name) is a:
            del self._agents[a.name]
        self._dispatch()

    # -------------------------------------------------------------- views

    def stats(self):
        now = self._clock()
        agents = {}
        for name, a in self._agents.items():
            waiting = [w for w in a.queue if not w.future.done()]
            agents[name] = AgentStats(
                weight=a.weight, queued=len(waiting), in_flight=a.in_flight, service=a.service,
                granted=a.granted, cancelled=a.cancelled, tokens_in=a.tokens_in,
                tokens_out=a.tokens_out, wait_last_s=a.wait_last, wait_max_s=a.wait_max,
                wait_mean_s=a.wait_total / a.granted if a.granted else 0.0,
                oldest_queued_s=now - waiting[0].enqueued if waiting else 0.0)
        return SchedulerStats(in_flight=self._in_flight, cap=self.max_concurrent,
                              per_agent=self.per_agent,
                              queued=sum(s.queued for s in agents.values()), agents=agents)

    def wait_bound(self, longest_call_s, agent=None):
        """The bound (module docstring) on the wait of a request `agent`
        enqueues now, given that no grant is held longer than longest_call_s.
        Counts as possibly backlogged every agent known and `agent` (or one
        newcomer), and as ahead of it the requests `agent` has queued."""
        known = set(self._agents)
        agents = len(known | {agent}) if agent is not None else len(known) + 1
        own = self.stats().agents.get(agent)
        return wait_bound(self.max_concurrent, self.age_s, longest_call_s, agents,
                          own.queued if own else 0)
