"""Judge: every event of a run against its compiled policy -> violations.

The kernel sees what happened; this module says whether the policy allowed
it, with the evidence (pid, ancestry, argv, path or address). It adds what
the kernel cannot express on its own (process counts, writes to the run's
own policy and prompt by anyone) and keeps a looping agent from flooding
the stream: the first occurrence of a (rule, target) is reported in full,
repeats are counted and reported as totals every few seconds and at the end,
so the sum of `count` over a rule's violations is exact.
"""
import errno
import hashlib
import os
import time
from collections import Counter

from ..events import ViolationEvent

REPEAT_FLUSH_S = 5.0
DENIED = ("EACCES", "EPERM", "EROFS")   # the kernel (Landlock, seccomp, a read-only mask) said no

# file op -> the access it needs on path (and on path2)
_FILE_ACCESS = {
    "unlink": ({"delete"}, None), "rmdir": ({"delete"}, None),
    "rename": ({"rename"}, {"create"}), "mkdir": ({"mkdir"}, None),
    "chmod": ({"chmod"}, None), "chown": ({"chown"}, None),
    "truncate": ({"truncate"}, None), "link": ({"link"}, {"link"}),
    "symlink": ({"create"}, None),
}


def file_sha256(path, limit=256 << 20):
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                limit -= len(chunk)
                if limit < 0:
                    return None
        return h.hexdigest()
    except OSError:
        return None


def _real(path):
    """The path with symlinks resolved now (what the kernel followed, unless
    the link changed since): a symlink in the workspace to a secret is judged
    as the secret."""
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return path


class Judge:
    def __init__(self, compiled, correlator, run, emit, on_kill=None, watched_files=(),
                 egress_enforced=False):
        """compiled: CompiledPolicy; run: RunContext; emit(Event); on_kill():
        stops the agent when a rule's action is kill; watched_files:
        [(rule, path)] whose content must not change during the run."""
        self.policy = compiled
        self.correlator = correlator
        self.run = run
        self.emit = emit
        self.on_kill = on_kill
        self.first_seen = {}        # (rule, target) -> ts of the full report
        self.repeats = Counter()    # (rule, target) -> occurrences not yet reported
        self.repeat_info = {}       # (rule, target) -> (category, action)
        self.by_category = Counter()
        self.by_rule = Counter()
        self.unjudged = 0           # events whose path could not be resolved
        self._next_flush = time.monotonic() + REPEAT_FLUSH_S
        self._watched = [(rule, path, file_sha256(path)) for rule, path in watched_files]
        self._exec_hashes = {}
        # the cgroup BPF programs report their own denials; the syscall
        # sensor's view of the same EPERM must not report them twice
        self.egress_enforced = egress_enforced

    # -- entry point ---------------------------------------------------------------------
    def __call__(self, ev):
        proc = self.run.procs.get(ev.pid)
        if proc is not None and proc.launching and ev.kind != "exec":
            return            # the launcher setting up the sandbox, not the agent
        kind = ev.kind
        if kind == "file":
            self._file(ev)
        elif kind == "exec":
            self._exec(ev)
        elif kind == "net":
            self._net(ev)
        elif kind == "syscall":
            self._decide(ev, self.policy.check_syscall(ev.name), ev.name, {"syscall": ev.name,
                                                                         "args": ev.args[:3]})
        elif kind == "fork":
            self._fork(ev)

    # -- per kind --------------------------------------------------------------------------
    def _file(self, ev):
        if ev.error and ev.error not in DENIED:
            return            # ENOENT & co: nothing was touched (probing, PATH search)
        if ev.op == "open":
            access = set(ev.access) - {"path"}
            targets = [(ev.abspath, access)]
        elif ev.op in _FILE_ACCESS:
            a1, a2 = _FILE_ACCESS[ev.op]
            targets = [(ev.abspath, a1)]
            if a2 and ev.path2:
                targets.append((ev.path2, a2))
        else:
            return
        for path, access in targets:
            if not access:
                continue
            if not path or not path.startswith("/"):
                if not (ev.path or "").startswith("fd:"):
                    self.unjudged += 1
                continue
            self._identity_write(ev, path, access)
            for p in {path, _real(path)}:
                d = self.policy.check_file(p, access)
                if d:
                    self._decide(ev, d, p, {"path": p, "named": ev.path, "access": sorted(access),
                                            "op": ev.op})
                    break

    def _identity_write(self, ev, path, access):
        if access <= {"read"}:
            return
        for rule, wpath, _ in self._watched:
            if path == wpath or _real(path) == wpath:
                d = self._identity_decision(rule, f"the agent wrote to {wpath}")
                self._decide(ev, d, wpath, {"path": wpath, "access": sorted(access), "op": ev.op})

    def _identity_decision(self, rule, reason):
        from ..policy.compile import Decision
        return Decision(category="identity", rule=rule,
                        action=self.policy.action_for("identity", rule), reason=reason, pattern=None)

    def _exec(self, ev):
        if ev.ret is not None and ev.ret != 0 and ev.error not in DENIED:
            return            # failed lookups (ENOENT while searching PATH)
        proc = self.run.procs.get(ev.pid)
        named = ev.filename if ev.filename.startswith("/") or not proc else (proc.exe or ev.filename)
        path = _real(named)
        sha = None
        if self.policy.needs_hash(path):
            sha = self._exec_hashes.get(path) or file_sha256(path)
            self._exec_hashes[path] = sha
        d = self.policy.check_exec(path, sha)
        self._decide(ev, d, path, {"path": path, "argv": ev.argv, "sha256": sha})

    def _net(self, ev):
        if self.egress_enforced and ev.error == "EPERM" and ev.family in ("inet", "inet6"):
            return
        if ev.op == "socket":
            d = self.policy.check_socket(ev.family, ev.sock_type)
            self._decide(ev, d, f"{ev.family}/{ev.sock_type}", {"family": ev.family,
                                                                 "type": ev.sock_type})
            return
        if ev.family not in ("inet", "inet6", "unix") or ev.addr is None:
            return
        protocol = "tcp" if ev.op == "connect" else "udp" if ev.op in ("sendto", "sendmsg") else "any"
        d = self.policy.check_connect(ev.family, ev.addr, ev.port, protocol, ev.op)
        target = ev.addr if ev.port is None else f"{ev.addr}:{ev.port}"
        self._decide(ev, d, target, {"op": ev.op, "family": ev.family, "addr": ev.addr,
                                     "port": ev.port, "protocol": protocol})

    def _fork(self, ev):
        limit = getattr(self.policy, "max_processes", None)
        if not limit:
            return
        alive = sum(1 for p in self.run.procs.values() if not p.exited)
        if alive > limit:
            from ..policy.compile import Decision
            d = Decision(category="process", rule="process.max_processes",
                         action=self.policy.action_for("process", "process.max_processes"),
                         reason=f"{alive} processes alive, the policy allows {limit}", pattern=None)
            self._decide(ev, d, "max_processes", {"alive": alive, "limit": limit})

    def limit_reached(self, rule, reason):
        from ..events import Event
        from ..policy.compile import Decision
        d = Decision(category="resource", rule=rule, action="kill", reason=reason, pattern=None)
        ev = Event(kind="lifecycle", ts=round(time.time(), 6), pid=self.run.root_pid)
        self._decide(ev, d, rule, {})

    def kernel_denial(self, ev, category, rule, reason, target, evidence):
        """A denial a kernel layer reported itself (cgroup BPF)."""
        from ..policy.compile import Decision
        d = Decision(category=category, rule=rule, action="deny", reason=reason, pattern=None)
        self._decide(ev, d, target, dict(evidence, kernel="denied (EPERM)"))

    # -- reporting -------------------------------------------------------------------------
    def _decide(self, ev, d, target, evidence):
        if d is None:
            return
        key = (d.rule, target)
        self.by_category[d.category] += 1
        self.by_rule[d.rule] += 1
        if key in self.first_seen:
            self.repeats[key] += 1
            self.repeat_info[key] = (d.category, d.action)
            return
        self.first_seen[key] = ev.ts
        proc = self.run.procs.get(ev.pid)
        detail = dict(evidence, reason=d.reason, pattern=d.pattern, event=ev.kind,
                      ancestry=self.correlator.ancestry(self.run, ev.pid),
                      process_argv=proc.argv if proc else None, process_exe=proc.exe if proc else None)
        if getattr(ev, "error", None) in DENIED:
            detail["kernel"] = f"denied ({ev.error})"
        elif getattr(ev, "ret", 0) is not None and getattr(ev, "ret", 0) >= 0:
            detail["kernel"] = "allowed"
        self._emit(ev, d.category, d.rule, d.action, detail, 1)
        if d.action == "kill" and self.on_kill:
            self.on_kill(d)

    def _emit(self, ev, category, rule, action, detail, count):
        v = ViolationEvent(category=category, rule=rule, action=action, detail=detail, count=count,
                           ts=ev.ts, run_id=self.run.run_id, agent=self.run.agent, pid=ev.pid,
                           tid=ev.tid, ppid=ev.ppid, uid=ev.uid, comm=ev.comm)
        self.emit(v)

    def tick(self, now=None, final=False):
        """Periodic work: repeat totals, and the digest of the run's own
        policy/prompt (a change by anyone, inside or outside the agent)."""
        now = time.monotonic() if now is None else now
        if not final and now < self._next_flush:
            return
        self._next_flush = now + REPEAT_FLUSH_S
        self._check_watched()
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

    def _check_watched(self):
        for i, (rule, path, digest) in enumerate(self._watched):
            now = file_sha256(path)
            if now != digest:
                self._watched[i] = (rule, path, now)
                d = self._identity_decision(rule, f"{path} changed during the run "
                                                  f"(sha256 {str(digest)[:12]} -> {str(now)[:12]})")
                from ..events import Event
                ev = Event(kind="file", ts=round(time.time(), 6), pid=0)
                self._decide(ev, d, path, {"path": path, "old_sha256": digest, "new_sha256": now,
                                           "by": "unknown (seen by content, not by a sensor)"})

    def summary(self):
        return {"violations": sum(self.by_category.values()),
                "by_category": dict(self.by_category), "by_rule": dict(self.by_rule),
                "unjudged": self.unjudged}
