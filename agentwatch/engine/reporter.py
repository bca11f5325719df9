"""Reporter: a run's decisions -> ViolationEvents, without flooding.

The first occurrence of a (rule, target) is reported in full, with the
process's ancestry and argv; repeats are counted and reported as totals
every few seconds and at the end, so the sum of `count` over a rule's
violations is exact. Two views of one kernel verdict (see TWIN) are one
violation. A decision whose action is kill asks the run to stop its agent.
"""
import os
import time
from collections import Counter

from ..core.events import ViolationEvent
from .refusals import DENIED

REPEAT_FLUSH_S = 5.0

# two views of one kernel verdict, each reported once (Reporter.paired): a BPF
# LSM refusal seen by the LSM program and by the syscall sensor or loader
# argv; an mmap(PROT_EXEC) kill seen by mapexec.bpf.c and by the loader argv
TWIN = {"bpf-lsm": "sensor", "sensor": "bpf-lsm", "mapexec": "loader", "loader": "mapexec"}


class Reporter:
    def __init__(self, correlator, run, emit, on_kill=None, lsm_enforced=False):
        """emit(Event): the run's sinks; on_kill(Decision): stops the agent."""
        self.correlator = correlator
        self.run = run
        self.emit = emit
        self.on_kill = on_kill
        # BPF LSM refusals are seen twice: by the LSM program and by the
        # syscall sensor (EPERM) or the dynamic loader's argv; one attempt is
        # one violation (see paired)
        self.lsm_enforced = lsm_enforced
        self.first_seen = {}        # (rule, target) -> ts of the full report
        self.repeats = Counter()    # (rule, target) -> occurrences not yet reported
        self.repeat_info = {}       # (rule, target) -> (category, action)
        self.by_category = Counter()
        self.by_rule = Counter()
        self._unpaired = Counter()  # (layer, pid, rule, basename) -> reports awaiting their twin
        self._next_flush = time.monotonic() + REPEAT_FLUSH_S

    def paired(self, layer, pid, rule, target):
        """True when this report's twin from the other view of the same
        kernel verdict was already counted (see TWIN); else remember it so
        that its twin is not."""
        key = (pid, rule, os.path.basename(str(target)))
        other = TWIN[layer]
        if self._unpaired[(other,) + key] > 0:
            self._unpaired[(other,) + key] -= 1
            return True
        self._unpaired[(layer,) + key] += 1
        return False

    def decide(self, ev, d, target, evidence):
        """Report (or count) d; False when there was nothing to decide."""
        if d is None:
            return False
        if (self.lsm_enforced and d.category == "filesystem" and ev.kind != "lifecycle"
                and (getattr(ev, "error", None) == "EPERM" or "loader" in evidence)
                and "hook" not in evidence and self.paired("sensor", ev.pid, d.rule, target)):
            return True
        key = (d.rule, target)
        n = getattr(ev, "repeat", None) or 1    # a line the kernel folded n calls into
        self.by_category[d.category] += n
        self.by_rule[d.rule] += n
        seen = key in self.first_seen
        again = n if seen else n - 1    # calls after the first of this rule and target
        if again:
            self.repeats[key] += again
            self.repeat_info[key] = (d.category, d.action)
        if seen:
            return True
        self.first_seen[key] = ev.ts
        proc = self.run.procs.get(ev.pid)
        detail = dict(evidence, reason=d.reason, pattern=d.pattern, event=ev.kind,
                      ancestry=self.correlator.ancestry(self.run, ev.pid),
                      process_argv=proc.argv if proc else None, process_exe=proc.exe if proc else None)
        if "kernel" in evidence:
            pass              # the caller knows better (limits, seccomp kills, cgroup BPF)
        elif getattr(ev, "error", None) in DENIED:
            detail["kernel"] = f"denied ({ev.error})"
        elif getattr(ev, "ret", 0) is not None and getattr(ev, "ret", 0) >= 0:
            detail["kernel"] = "allowed"
        self._emit(ev, d.category, d.rule, d.action, detail, 1)
        if d.action == "kill" and self.on_kill:
            self.on_kill(d)
        return True

    def _emit(self, ev, category, rule, action, detail, count):
        v = ViolationEvent(category=category, rule=rule, action=action, detail=detail, count=count,
                           ts=ev.ts, run_id=self.run.run_id, agent=self.run.agent, pid=ev.pid,
                           tid=ev.tid, ppid=ev.ppid, uid=ev.uid, comm=ev.comm)
        self.emit(v)

    def due(self, now, final=False):
        """True (once a period, and at the end) when the repeat totals are due."""
        if not final and now < self._next_flush:
            return False
        self._next_flush = now + REPEAT_FLUSH_S
        return True

    def flush_repeats(self):
        """Report the repeats counted since the last flush, as totals."""
        for key, n in sorted(self.repeats.items()):
            if not n:
                continue
            category, action = self.repeat_info[key]
            v = ViolationEvent(category=category, rule=key[0], action=action, count=n,
                               detail={"repeat": True, "target": key[1],
                                       "message": f"{n} more since the first report"},
                               ts=round(time.time(), 6), run_id=self.run.run_id, agent=self.run.agent,
                               pid=self.run.root_pid)
            self.emit(v)
            self.repeats[key] = 0

    def summary(self, unjudged=0):
        return {"violations": sum(self.by_category.values()),
                "by_category": dict(self.by_category), "by_rule": dict(self.by_rule),
                "unjudged": unjudged}
