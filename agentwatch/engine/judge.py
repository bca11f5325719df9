"""Judge: every event of a run against its compiled policy -> violations.

The kernel sees what happened; the judge says whether the policy allowed
it, with the evidence (pid, ancestry, argv, path or address). It adds what
the kernel cannot express on its own (process counts, writes to the run's
own policy and prompt by anyone) and keeps a looping agent from flooding
the stream.

This module is the facade the runner and the daemon use: it resolves what
needs the kernel's word (a path's symlinks, /proc, a signal's target, the
cgroup counters; engine/paths.py, core/procfs.py), asks the pure rules
(engine/rules.py) for a finding, and hands it to the reporter
(engine/reporter.py: dedup, repeat totals, kill requests). Which layer
refused a call is engine/refusals.py's.
"""
import os
import re
import signal
import time

from ..core import procfs
from ..core.events import Event
from ..policy.compile import Decision
from ..policy.matchers import normalize
from . import paths, rules
from .refusals import DENIED, Refusals
from .reporter import Reporter

LIMITS_EVERY_S = 0.5    # how often the resource limits' counters are read
_PROC_NUM = re.compile(r"^/proc/(\d+)(/.*)?$")


def _read_counter(path, key):
    """The value of `key N` in a cgroup counters file, or None."""
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return None


def _lifecycle(pid, ppid=0):
    """The event of a finding no sensor record carries (a counter, a daemon request)."""
    return Event(kind="lifecycle", ts=round(time.time(), 6), pid=pid, ppid=ppid)


class Judge:
    """One run's judge. It stays one class because its state is one run's:
    the resolved paths and PID-namespace pids, the identity files' digests,
    the exec hashes and the cgroup counters; the decisions themselves are
    engine/rules.py's functions and the reporting engine/reporter.py's."""

    def __init__(self, compiled, correlator, run, emit, on_kill=None, watched_files=(),
                 egress_enforced=False, lsm_enforced=False, map_exec_roots=None, guarded=False,
                 map_exec_kill=False, seccomp_denied=None, seccomp_rules=None, plan=None,
                 service_ports=()):
        """compiled: CompiledPolicy; run: RunContext; emit(Event); on_kill():
        stops the agent when a rule's action is kill; watched_files:
        [(rule, path)] whose content must not change during the run;
        seccomp_denied: the syscalls this run's filter refuses with EPERM
        (None: take every refusal the sensors report as the filter's);
        seccomp_rules: the filter's rules (seccomp_filter.plan), against which
        the arguments of a refusal, where the sensor could read them, are
        checked (None: not checked); plan: the run's EnforcementPlan, which
        says which layer refused a call (engine/refusals.py; None: a plan
        with no Landlock, masks or limits); service_ports: the loopback
        ports of the monitor's services (run/services.py), which every run
        may reach."""
        self.service_ports = frozenset(service_ports)
        self.policy = compiled
        self.seccomp_denied = None if seccomp_denied is None else set(seccomp_denied)
        self.seccomp_rules = seccomp_rules
        self.refusals = Refusals(plan)
        self._pids_seen = 0         # forks refused at the pids limit, reported by syscall
        self._pids_credited = 0     # ... of which already set against the pids.events counter
        self._limit_pending = {}    # counter file -> an excess seen once, reported if it stays
        self.correlator = correlator
        self.run = run
        self.on_kill = on_kill
        self.reporter = Reporter(correlator, run, emit, on_kill=self._kill,
                                 lsm_enforced=lsm_enforced)
        self.unjudged = 0           # events whose path could not be resolved
        self._ns_pids = {}          # pid in the run's PID namespace -> host pid (_host_proc)
        self._watched = [(rule, path, paths.file_sha256(path)) for rule, path in watched_files]
        self._exec_hashes = {}
        # the cgroup BPF programs report their own denials; the syscall
        # sensor's view of the same EPERM must not report them twice
        self.egress_enforced = egress_enforced
        self.guarded = guarded
        # BPF LSM refusals are seen twice too (Reporter.paired)
        self.lsm_enforced = lsm_enforced
        # the kernel reports (and with map_exec_kill kills at) an mmap(PROT_EXEC)
        # of a file opened by a path outside these prefixes (bpf/mapexec.bpf.c);
        # its report and the loader argv's are one attempt too
        self.map_exec_roots = map_exec_roots
        self.map_exec_kill = map_exec_kill
        self._limits_next = 0.0
        self._limit_files = None    # [(rule, counters file, key)], found on first use
        self._limit_counts = {}     # counter file -> last value reported

    by_category = property(lambda self: self.reporter.by_category)
    by_rule = property(lambda self: self.reporter.by_rule)

    def _kill(self, d):
        if self.on_kill:
            self.on_kill(d)

    def _report(self, ev, finding):
        """Hand a finding (or None) to the reporter; False when there was none."""
        if finding is None:
            return False
        return self.reporter.decide(ev, *finding)

    # -- entry point ---------------------------------------------------------------------
    def __call__(self, ev):
        kind = ev.kind
        if (kind == "file" and ev.op in paths.RELINKING_OPS) or kind == "syscall":
            paths.forget_resolved()   # a path may resolve elsewhere from now on (mounts: syscall kind)
        proc = self.run.procs.get(ev.pid)
        if proc is not None and proc.launching and kind != "exec":
            return            # the launcher setting up the sandbox, not the agent
        if kind == "file":
            self._file(ev)
        elif kind == "exec":
            self._exec(ev)
        elif kind == "net":
            self._report(ev, rules.network(self.policy, self.refusals, ev, self.egress_enforced,
                                           self.lsm_enforced, self.guarded, self.service_ports))
        elif kind == "flow":
            self._report(ev, rules.guard_flow(self.policy, ev))
        elif kind == "llm":
            self._report(ev, rules.llm_call(self.policy, ev))
        elif kind == "msg":
            self._report(ev, rules.broker_call(self.policy, ev))
        elif kind == "syscall" and ev.no_entry:
            self._report(ev, rules.seccomp_refusal(self.policy, ev, self.seccomp_denied,
                                                   self.seccomp_rules))
        elif kind == "syscall" and ev.refused:
            finding = rules.refused_call(self.policy, self.refusals, ev)
            if finding is not None and finding.decision.rule == "resources.pids":
                self._pids_seen += 1
            self._report(ev, finding)
        elif kind == "syscall":
            self.reporter.decide(ev, self.policy.check_syscall(ev.name), ev.name,
                                 {"syscall": ev.name, "args": ev.args[:3]})
        elif kind == "signal":
            self._signal(ev)
        elif kind == "fork":
            self._report(ev, rules.max_processes(self.policy, self.run.procs))
        elif kind == "exit" and ev.signal == signal.SIGSYS:
            self._report(ev, rules.seccomp_kill(self.policy, ev))

    # -- files ---------------------------------------------------------------------------
    def _file(self, ev):
        if ev.error and ev.error not in DENIED:
            return            # ENOENT & co: nothing was touched (probing, PATH search)
        if ev.op == "mmap":
            return self._mapped(ev)
        targets = rules.file_targets(ev)
        if targets is None:
            return
        follow = ev.op in rules.FOLLOWING_OPS
        refused = ev.error in DENIED
        for path, access in targets:
            if not access:
                continue
            if not path or not path.startswith("/"):
                if not (ev.path or "").startswith("fd:"):
                    self.unjudged += 1
                continue
            path = paths.own_proc(path, ev.pid)
            if self.run.pid_ns:
                path = self._host_proc(path)
            if self._report(ev, rules.other_process(self.policy, ev, path, self.run.procs,
                                                    self.run.pid_ns)):
                refused = False
                continue
            if self._identity_write(ev, path, access):
                refused = False
            real = paths.real(path, follow)
            for p in ([path, real] if real != path else [path]):
                d = self.policy.check_file(p, access)
                if d:
                    p = normalize(p)      # /proc/<pid>/root detours: the path they reach
                    evidence = {"path": p, "named": ev.path, "access": sorted(access), "op": ev.op}
                    if refused:
                        evidence["layer"] = self._file_layer(ev, p, access)
                    if (d.rule == "filesystem.deny" and d.action == "kill" and ev.op == "open"
                            and (ev.ret or 0) >= 0 and self.policy.killed_in_kernel(ev.path)):
                        evidence["kernel"] = ("killed at the open's return (bpf_send_signal "
                                              "SIGKILL): the content never reached the agent")
                    self.reporter.decide(ev, d, p, evidence)
                    refused = False      # reported
                    break
        for path, access in targets if refused else ():
            # the source, else the destination (a rename onto a mount point: EBUSY)
            if path and self._unexplained(ev, paths.real(paths.own_proc(path, ev.pid), follow),
                                          access):
                break

    def _file_layer(self, ev, path, access):
        return self.refusals.file_layer(ev.error, path, access, ev.op, getattr(ev, "mode", None),
                                        self.lsm_enforced)

    def _unexplained(self, ev, path, access, named=None):
        """The kernel refused a file operation the policy allows: reported
        when a layer of the sandbox did (rules.unexplained)."""
        if not path or not path.startswith("/"):
            return False
        layer = self._file_layer(ev, path, access)
        return self._report(ev, rules.unexplained(self.policy, self.refusals, ev, path, access,
                                                  layer, named))

    def _host_proc(self, path):
        """A run with its own PID namespace names its processes by that
        namespace's pids: /proc/<n>/... is the same path with n's host pid
        (read from the NSpid line of each live process of the run), so the
        path is judged, and resolved, as the process it names. Unchanged
        when no live process of the run has n (then it names nothing)."""
        m = _PROC_NUM.match(path)
        if not m:
            return path
        n = int(m.group(1))
        host = self._ns_pids.get(n)
        if host is None or host not in self.run.procs:
            self._ns_pids = {}
            for pid in list(self.run.procs):
                inner = procfs.ns_pid(pid)
                if inner is not None:
                    self._ns_pids[inner] = pid
            host = self._ns_pids.get(n)
        return path if host is None else f"/proc/{host}{m.group(2) or ''}"

    # -- identity ------------------------------------------------------------------------
    def _identity_write(self, ev, path, access):
        """A write to the run's own policy or prompt: True when reported."""
        if access <= {"read"}:
            return False
        hit = False
        for rule, wpath, _ in self._watched:
            if path == wpath or paths.real(path) == wpath:
                d = self._identity_decision(rule, f"the agent wrote to {wpath}")
                evidence = {"path": wpath, "access": sorted(access), "op": ev.op}
                if ev.error in DENIED:
                    evidence["layer"] = self._file_layer(ev, wpath, access)
                hit = self.reporter.decide(ev, d, wpath, evidence) or hit
        return hit

    def _identity_decision(self, rule, reason):
        return Decision(category="identity", rule=rule,
                        action=self.policy.action_for("identity", rule), reason=reason, pattern=None)

    def _check_watched(self):
        for i, (rule, path, digest) in enumerate(self._watched):
            now = paths.file_sha256(path)
            if now != digest:
                self._watched[i] = (rule, path, now)
                d = self._identity_decision(rule, f"{path} changed during the run "
                                                  f"(sha256 {str(digest)[:12]} -> {str(now)[:12]})")
                ev = Event(kind="file", ts=round(time.time(), 6), pid=0)
                self.reporter.decide(ev, d, path, {"path": path, "old_sha256": digest,
                                                   "new_sha256": now,
                                                   "by": "unknown (seen by content, not by a sensor)"})

    # -- exec ----------------------------------------------------------------------------
    def _exec(self, ev):
        if ev.ret is not None and ev.ret != 0 and ev.error not in DENIED:
            return            # failed lookups (ENOENT while searching PATH)
        proc = self.run.procs.get(ev.pid)
        if not ev.filename:
            return self._fd_exec(ev)
        if ev.filename.startswith("/"):
            named = paths.own_proc(ev.filename, ev.pid)
        elif ev.ret == 0 and proc and proc.exe:
            named = proc.exe           # resolved by the correlator after the exec
        elif proc and proc.cwd:
            named = os.path.join(proc.cwd, ev.filename)   # a refused ./tool
        else:
            named = ev.filename
        path = paths.real(named)
        if not self._judge_program(ev, path) and ev.error in DENIED:
            self._unexplained(ev, path, {"exec"}, named=ev.filename)
        if ev.ret in (0, None) and paths.LOADER.match(os.path.basename(path)):
            prog = paths.loaded_program(ev.argv or [])
            if prog:
                named = prog
                if not prog.startswith("/") and proc and proc.cwd:
                    prog = os.path.join(proc.cwd, prog)
                self._judge_program(ev, paths.real(paths.own_proc(prog, ev.pid)), loader=path,
                                    named=named)

    def _fd_exec(self, ev):
        """execveat(fd, "", AT_EMPTY_PATH) / fexecve: no path was named. A
        file that ran is judged by what /proc says it is; a refused one (or a
        memfd, which has no path) is outside every exec allow list."""
        exe = None
        if ev.ret == 0:
            try:
                exe = os.readlink(f"/proc/{ev.pid}/exe")
            except OSError:
                pass
        if exe and exe.startswith("/") and not exe.endswith(" (deleted)"):
            return self._judge_program(ev, exe)
        self._report(ev, rules.fd_exec(self.policy, ev, exe))

    def _judge_program(self, ev, path, loader=None, named=None):
        sha = None
        if self.policy.needs_hash(path):
            sha = self._exec_hashes.get(path) or paths.file_sha256(path)
            self._exec_hashes[path] = sha
        d = self.policy.check_exec(path, sha)
        evidence = {"path": path, "argv": ev.argv, "sha256": sha}
        if loader and d is not None:
            d = Decision(category=d.category, rule=d.rule, action=d.action, pattern=d.pattern,
                         reason=f"{d.reason}, mapped by the dynamic loader {loader}")
            evidence["loader"] = loader
            if self.lsm_enforced:
                evidence["kernel"] = "mapping refused by BPF LSM mmap_file (EPERM)"
            elif self._map_exec_sees(named):
                if self.reporter.paired("loader", ev.pid, d.rule, path):
                    return True   # the kernel's report of the mapping came first
                evidence["kernel"] = rules.MAPEXEC_KILLED if self.map_exec_kill else rules.MAPEXEC_SEEN
            else:
                evidence["kernel"] = ("not refused at exec: the loader maps the file itself "
                                      "(refused only where its mount is noexec)")
        elif d is not None and ev.error in DENIED:
            evidence["layer"] = self.refusals.file_layer(ev.error, path, {"exec"}, "exec", None,
                                                         self.lsm_enforced)
        return self.reporter.decide(ev, d, path, evidence)

    def _map_exec_sees(self, named):
        return rules.map_exec_sees(self.map_exec_roots, named)

    def _mapped(self, ev):
        """The kernel saw (and with map_exec_kill killed the process at) an
        mmap(PROT_EXEC) of a file it opened outside the exec roots (ld.so,
        LD_PRELOAD, dlopen). A kill stands whatever the path resolves to now."""
        real = paths.real(ev.abspath)
        if self.reporter.paired("mapexec", ev.pid, "filesystem.exec", real):
            return                # the loader's argv already reported this attempt
        self._report(ev, rules.mapping(self.policy, ev, real, self.map_exec_kill))

    # -- signals -------------------------------------------------------------------------
    def _signal(self, ev):
        """A signal to a process outside the run (agentwatch, the user's
        shell, the host) is process.signal; within the run's own tree it is
        ordinary job control. kill(pid, 0) delivers nothing (a probe), and
        ESRCH/EINVAL mean no process was signalled: neither is judged."""
        if ev.signal == 0 or (ev.error and ev.error not in DENIED):
            return
        outside, what, pid = self._signal_target(ev)
        if outside is None:
            self.unjudged += 1          # the target could not be told (pidfd closed, thread gone)
            return
        if outside:
            self._report(ev, rules.signal(self.policy, ev, what, pid))

    def _signal_target(self, ev):
        """(outside the run: True/False/None when unknown, description, pid or None)."""
        if self.run.pid_ns and ev.pidfd is None and not (ev.op == "kill" and ev.target == 0):
            # a pid, tid or group the agent names is one of its own PID namespace,
            # which holds the run's processes only (kill -1 included); its own group
            # (kill 0) is agentwatch's, judged below, and a pidfd is read from the host
            return False, None, None
        if ev.op == "kill" and ev.target is not None and ev.target <= 0:
            if ev.target == -1:
                return True, "every process the agent may signal (kill -1)", None
            pgid = procfs.pgid(ev.pid) if ev.target == 0 else -ev.target
            if pgid is None:
                return None, "the caller's process group", None
            # a group a process of the run created stays the run's (setpgid
            # cannot move a process into another session's group); the
            # agent's first group is agentwatch's own
            return pgid not in self.run.procs, f"process group {pgid}", None
        if ev.op == "tkill":
            tgid = procfs.tgid(ev.target_tid)
            if tgid is None:
                return (False, None, None) if ev.target_tid in self.run.procs else \
                    (None, f"thread {ev.target_tid}", None)
            pid = tgid
        else:
            pid = ev.target
        if pid is None:
            return None, "the process behind a pidfd", None
        if pid in self.run.procs:
            return False, None, pid
        tgid = procfs.tgid(pid)          # kill() of a thread id reaches its process
        # a process of the run the correlator has not seen yet (lost fork record)
        if tgid in self.run.procs or procfs.run_of_cgroup(procfs.cgroup(pid)) == self.run.run_id:
            return False, None, pid
        comm = procfs.comm(pid)
        if pid == os.getpid():
            what = f"agentwatch (pid {pid})"
        else:
            what = f"pid {pid}" + (f" ({comm})" if comm else "")
        return True, what, pid

    # -- resource limits -----------------------------------------------------------------
    def _limit_counters(self):
        """[(rule, counters file, key)] of the run's cgroups (v2, or the v1
        hierarchies sandbox/limits.py makes on a hybrid host)."""
        from ..sandbox import cgroups
        from ..sandbox.limits import v1_mounts
        try:
            v1 = v1_mounts()
            v2 = os.path.join(cgroups.root_path(), self.run.run_id)
        except Exception:   # noqa: BLE001 - best effort, never stops the run
            v1, v2 = {}, None
        files = []
        if v2:
            files += [("resources.pids", os.path.join(v2, "pids.events"), "max"),
                      ("resources.memory", os.path.join(v2, "memory.events"), "oom_kill")]
        if "pids" in v1:
            files.append(("resources.pids", os.path.join(v1["pids"], "agentwatch",
                                                         self.run.run_id, "pids.events"), "max"))
        if "memory" in v1:
            files.append(("resources.memory", os.path.join(v1["memory"], "agentwatch",
                                                           self.run.run_id, "memory.oom_control"),
                          "oom_kill"))
        return files

    def _check_limits(self, final=False):
        """The kernel refused forks (pids limit) or OOM-killed (memory limit):
        read the run's cgroup counters and report each increase."""
        if self._limit_files is None:
            self._limit_files = self._limit_counters()
        for rule, path, key in self._limit_files:
            n = _read_counter(path, key)
            if not n or n <= self._limit_counts.get(path, 0):
                continue
            new = n - self._limit_counts.get(path, 0)
            if rule == "resources.pids":
                # the forks the syscall sensor reported one by one (refused_call) are
                # not reported again; a rise they do not explain is, once it has
                # stayed a period (their records may still be on the way)
                credit = min(new, self._pids_seen - self._pids_credited)
                self._pids_credited += credit
                self._limit_counts[path] = self._limit_counts.get(path, 0) + credit
                new -= credit
                if not new:
                    continue
                if not final and self._limit_pending.get(path) != n:
                    self._limit_pending[path] = n
                    continue
            self._limit_counts[path] = n
            self._report(_lifecycle(self.run.root_pid),
                         rules.limit_counter(self.policy, rule, path, key, n, new))

    def limit_reached(self, rule, reason):
        d = Decision(category="resource", rule=rule, action="kill", reason=reason, pattern=None)
        self.reporter.decide(_lifecycle(self.run.root_pid), d, rule, {})

    # -- what other parts of agentwatch saw ----------------------------------------------
    def daemon_refused(self, pid, op):
        """A process of this run asked agentwatch's daemon to act (op: run,
        shutdown, status); the daemon refused: an agent never starts runs
        outside its own sandbox or stops others'. Who asked is the kernel's
        word (the socket's peer credentials, the pid's cgroup)."""
        proc = self.run.procs.get(pid)
        d = Decision(category="identity", rule="identity.daemon", action="deny", pattern=None,
                     reason=f"an agent asked the agentwatch daemon to {op}")
        self.reporter.decide(_lifecycle(pid, proc.ppid if proc else 0), d, f"daemon:{op}",
                             {"op": op, "kernel": "refused (peer in the run's cgroup)"})

    def kernel_denial(self, ev, category, rule, reason, target, evidence, layer="cgroup-bpf"):
        """A denial a kernel layer reported itself (cgroup BPF, BPF LSM)."""
        if evidence.get("op") == "socket" and reason.endswith(("raw-socket", "family-not-allowed")):
            # the syscall sensor's socket event reports it (see rules.network: check_socket
            # judges raw sockets and network.families alike); one attempt, one report
            return
        if rule == "network.egress" and evidence.get("addr"):
            from ..policy.matchers import canonical_ip
            ip = canonical_ip(evidence["addr"])
            if ip is not None and (ip.is_loopback or ip.is_unspecified):
                rule = "network.loopback"     # as check_connect judges it
        if evidence.get("port") is not None and evidence.get("proto"):
            target = f"{target}/{evidence['proto']}"   # a TCP and a UDP attempt are two
        if layer == "bpf-lsm":
            d = Decision(category=category, rule=rule, pattern=None, reason=reason,
                         action=self.policy.action_for(category, rule))
            if self.reporter.paired("bpf-lsm", ev.pid, rule, target):
                return
            self.reporter.decide(ev, d, target, dict(
                evidence, kernel=f"denied (EPERM) by BPF LSM {evidence.get('hook')}", layer=layer))
            return
        d = Decision(category=category, rule=rule, action="deny", reason=reason, pattern=None)
        self.reporter.decide(ev, d, target, dict(evidence, kernel="denied (EPERM)", layer=layer))

    # -- periodic work and the end -------------------------------------------------------
    def tick(self, now=None, final=False):
        """Periodic work: repeat totals, and the digest of the run's own
        policy/prompt (a change by anyone, inside or outside the agent)."""
        now = time.monotonic() if now is None else now
        if final or now >= self._limits_next:
            self._limits_next = now + LIMITS_EVERY_S
            self._check_limits(final)
        if not self.reporter.due(now, final):
            return
        self._check_watched()
        self.reporter.flush_repeats()

    def summary(self):
        return self.reporter.summary(self.unjudged)
