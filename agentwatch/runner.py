"""`agentwatch run`: one agent, its cgroup, its sensors, its log.

Order matters and is the point of this module:
 1. check input (command, policy) before anything is created;
 2. load the BPF sensors and add the run's new cgroup to their filter;
 3. fork the agent, put it in the cgroup, and only then let it exec;
 4. stream events to the run log until the agent exits;
 5. kill whatever the agent left behind, drain the ring buffer, report
    drops, and remove the cgroup and the BPF programs.
Stale state from a crashed agentwatch is swept at start (and by `agentwatch gc`).
"""
import collections
import fnmatch
import getpass
import hashlib
import os
import platform
import select
import signal
import socket
import sys
import threading
import time

from . import integrity
from .core import state
from .core.options import RunOptions  # noqa: F401 - declared once there; the runner takes it
from .engine import Correlator, RunContext
from .engine.bus import EventBus
from .engine.judge import Judge
from .core.errors import (AgentwatchError, KernelFeatureError, LaunchError, PolicyError, PrivilegeError,
                     UsageError)
from .core.events import LifecycleEvent
from .keeper import Keeper
from .policy import load as load_policy
from .policy.model import SENSOR_GROUPS
from .sandbox import launcher
from .sandbox.cgroups import RunCgroup, leftover_cgroups, root_path
from .sinks.console import ConsoleSink
from .sinks.jsonl import JsonlSink

STOP_GRACE_S = 3.0       # after SIGINT/SIGTERM: time the agent gets before SIGKILL
STATS_EVERY_S = 1.0
DRAIN_S = 2.0            # after the agent's end: how long its own monitor reads before drain()
SHARED_DRAIN_S = 300.0   # on a shared monitor: the bound on reading up to the agent's end
SHARED_POLL_S = 0.02     # a run on a shared monitor reads the rings this often (priority records too)
LSM_NAME_WAIT_S = 0.5   # how long a BPF LSM denial may wait for its file's path (see _on_lsm_denial)
LSM_RECENT_OPENS = 16   # files opened per process kept to name a BPF LSM refusal by
LSM_OPENED_PIDS = 4096  # ... for this many processes at most


class Monitor:
    """Loaded sensors plus the correlator that attributes their records. A
    run embeds one; several runs can share one, one after the other (tests)
    or at the same time, each in its own thread (agentwatch/daemon.py).

    Shared state (the rings, the correlator, every run's judge) is touched
    only under `lock`; whichever run holds it reads the rings for all. Child
    exit statuses are reaped here, for every run, and kept in `exits` until
    the run whose agent it was takes its own."""

    def __init__(self, groups=SENSOR_GROUPS, ringbuf_pages=4096, denied=(), map_exec=False):
        """denied: syscalls a run's seccomp filter refuses with EPERM; their
        exit tracepoints report each refusal (see sensors/syscalls.specs_for).
        map_exec: attach the mmap(PROT_EXEC) probes (bpf/mapexec.bpf.c)."""
        # first: kills the runs' processes if we die by a signal (agentwatch/keeper.py)
        self.keeper = Keeper()
        try:
            from .sensors import Sensors   # bcc is imported only here, after input checks
            self.sensors = Sensors(groups, ringbuf_pages, denied, map_exec)
        except BaseException:
            self.keeper.close()
            raise
        self.correlator = Correlator(self.sensors.nr_to_spec)
        self.lock = threading.RLock()
        self.children = set()            # the runs' agent pids
        self.exits = {}                  # agent pid -> wait status, until its run takes it
        self.idle_guards = []            # enforcement objects (LsmGuard, Egress) runs gave back
        self.closed = False

    def reap(self):
        """Reap every exited child (agents, and orphans re-parented to us as
        subreaper) and keep each status for its run. Call with the lock held."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:     # an orphan's status is nobody's
                self.exits[pid] = status

    def take_exit(self, pid):
        """The wait status of agent pid once it exited, else None."""
        with self.lock:
            self.reap()
            status = self.exits.pop(pid, None)
            if status is not None:
                self.children.discard(pid)
            return status

    def take_guard(self, cls, *policy):
        """An enforcement object of class cls for this policy: a released one
        when a run gave one back (its programs are compiled and loaded
        already: about 1 s saved per layer here, 10 s and more under QEMU
        TCG), else None."""
        with self.lock:
            guard = next((g for g in self.idle_guards if type(g) is cls), None)
            if guard is None:
                return None
            self.idle_guards.remove(guard)
        try:
            return guard.use(*policy)
        except Exception:
            self.give_back(guard)
            raise

    def give_back(self, guard):
        """Release a run's enforcement object for the next run, once the
        run's agent is dead. One that cannot be released cleanly is closed
        instead: it is never reused with anything of the old run left."""
        try:
            guard.release()
        except Exception:
            guard.close()
            return
        with self.lock:
            if not self.closed:
                self.idle_guards.append(guard)
                return
        guard.close()              # the monitor closed while the run ended

    def open(self):
        self.sensors.open(self.correlator.handle)
        return self

    def close(self):
        with self.lock:
            self.closed = True
            guards, self.idle_guards = self.idle_guards, []
        for g in guards:
            g.close()
        self.sensors.close()
        self.keeper.close()          # only now: it guards the runs until the very end

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


def policy_variables(workspace=None, env=None):
    """${WORKSPACE}, ${HOME}, ${TMPDIR} for a run (HOME of the invoking user:
    env, the environment the agent gets, else ours)."""
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    return {"WORKSPACE": os.path.abspath(workspace or os.getcwd()), "HOME": home,
            "TMPDIR": env.get("TMPDIR") or "/tmp"}


def gc(log=None):
    """Remove what a crashed agentwatch left: kill and remove run cgroups whose
    owner is gone, and mark their records 'crashed'. Returns the run ids swept."""
    swept = []
    records = {r["run_id"]: r for r in state.list_runs()}
    from .sandbox.limits import Limits, leftover_v1
    for d in leftover_v1():          # v1 limit groups of runs whose owner is gone
        if not state.run_owner_alive(os.path.basename(d)):
            lim = Limits(os.path.basename(d), None)
            lim.dirs = [d]
            lim.remove()
    for run_id in leftover_cgroups():
        if state.run_owner_alive(run_id):
            continue                 # a live run, maybe of another agentwatch / state dir
        cg = RunCgroup(os.path.join(root_path(), run_id))
        if cg.remove():
            state.unregister_owner(run_id)
            swept.append(run_id)
            if log:
                log(f"removed stale cgroup of run {run_id}")
    for run_id, rec in records.items():
        if rec.get("status") == "crashed":
            raw = state.read_json(state.run_path(run_id, "run.json")) or rec
            if raw.get("status") == "running":
                raw["status"] = "crashed"
                state.write_json_atomic(state.run_path(run_id, "run.json"), raw)
                if run_id not in swept:
                    swept.append(run_id)
    return swept


class Run:
    def __init__(self, opts, monitor=None):
        self.opts = opts
        self.run_id = state.new_run_id()
        self.sinks = []
        self.monitor = monitor           # shared, already open; else the run makes its own
        self.own_monitor = monitor is None
        self.sensors = None
        self.cgroup = None
        self.child = None
        self.record = {}
        self.exit_status = None
        self.summary = None              # the one-line summary, once the run ended
        self.stop_requested = 0
        self.stop_deadline = None
        self._last_lost = 0
        self.chain = integrity.Chain(self.run_id)
        self.bus = EventBus()            # every logged event, for other layers (engine/bus.py)
        self.judge = None
        self.killed_for = None
        self.egress = None
        self.lsm = None
        self._lsm_waiting = []           # BPF LSM denials whose file has no path yet
        self._lsm_opened = {}            # pid -> its last files opened (BPF LSM path only)
        self.limits = None
        self.netns = None                # sandbox.netns.RunNetwork: the run's network namespace + relay
        self.init_reaped = True          # False while the run's init (PID namespace) is unreaped
        self.wall_deadline = None
        self.err = opts.stderr or sys.stderr   # agentwatch's own messages

    # -- input ----------------------------------------------------------------------
    def _bpf_lsm_wanted(self):
        """Whether the plan gets the BPF LSM layer: "auto" where the host can
        load it (BPF LSM active, root, headers of exactly this kernel)."""
        mode = self.opts.bpf_lsm
        if mode == "off":
            return False
        from .guards.lsm import LsmGuard
        why = LsmGuard.unavailable()
        if why and mode == "on":
            raise KernelFeatureError(f"--bpf-lsm on: {why}")
        return why is None

    def _check(self):
        o = self.opts
        if o.sensors is None:
            o.sensors = list(SENSOR_GROUPS)
        if not o.argv:
            raise UsageError("no command given: agentwatch run [OPTIONS] -- CMD [ARG...]")
        if o.policy_path and o.require_signed:
            # a tampered file is refused as tampered, before its content is even parsed
            self._need_root()
            integrity.check_signed(o.policy_path, True, None, integrity.trusted_keys(o.trust))
        self.policy = load_policy(o.policy_path) if o.policy_path else None
        self._need_root()
        trusted = integrity.trusted_keys(o.trust)
        self.command = launcher.resolve_command(o.argv, o.env)
        self.agent = (o.name or (self.policy.agent_name if self.policy else "")
                      or os.path.basename(o.argv[0]))
        self.variables = policy_variables(o.workspace or o.cwd, o.env)
        self.compiled = None
        self.plan = None
        self.run_as = None               # sandbox.credentials.Credentials from process.run_as
        self.signer = self.prompt_signer = self.prompt_digest = None
        if self.policy:
            ident = self.policy.data.get("identity") or {}
            pattern = ident.get("name")
            if pattern and not fnmatch.fnmatchcase(self.agent, pattern):
                raise PolicyError(f"{self.policy.path}: agent name {self.agent!r} does not match "
                                  f"identity.name {pattern!r}; pass --name")
            self.signer = integrity.check_signed(self.policy.path, o.require_signed,
                                                 ident.get("required_signer"), trusted)
            from .policy.compile import compile_policy
            from .sandbox.plan import make_plan
            self.compiled = compile_policy(self.policy, self.variables)
            o.sensors = self.compiled.sensor_groups()
            protected = [self.policy.path] + ([os.path.abspath(o.prompt_path)] if o.prompt_path else [])
            self.plan = make_plan(self.policy.data, self.variables, protected,
                                  bpf_lsm=self._bpf_lsm_wanted(), ttys=self._ttys())
            run_as = self.policy.spec.process and self.policy.spec.process.run_as
            if run_as is not None:
                from .sandbox import credentials
                self.run_as = credentials.resolve(run_as, str(run_as.loc))
            if self.plan.seccomp is not None:
                from .sandbox.seccomp_filter import errno_denied
                o.seccomp_denied = errno_denied(self.plan.seccomp)
            if self.plan.downgrades and not o.allow_downgrade:
                raise PolicyError(
                    f"{self.policy.path}: this kernel cannot enforce every rule:\n  "
                    + "\n  ".join(self.plan.downgrades)
                    + "\nrun with --allow-downgrade to accept this (each rule is then recorded "
                      "in the run identity), or relax the policy")
        elif o.require_signed:
            raise PolicyError("--require-signed needs --policy FILE (a signed policy)")
        if o.prompt_path:
            try:
                with open(o.prompt_path, "rb") as f:
                    self.prompt_digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                raise UsageError(f"--prompt {o.prompt_path}: cannot read: {e.strerror}") from None
            self.prompt_signer = integrity.check_signed(o.prompt_path, o.require_signed, None, trusted)

    def _ttys(self):
        """The terminal devices on the agent's stdin, stdout and stderr."""
        out = []
        for fd in self.opts.stdio or (0, 1, 2):
            try:
                name = os.ttyname(fd)
            except OSError:
                continue
            if name.startswith("/dev/") and name not in out:
                out.append(name)
        return out

    def _map_exec_roots(self):
        """The plan's mmap(PROT_EXEC) roots, when this run's sensors have
        the programs attached (a shared monitor may not: the plan then
        notes that the loader's argv alone is judged)."""
        roots = self.plan.map_exec if self.plan else None
        if roots is not None and not self.sensors.map_exec:
            self.plan.notes.append("filesystem.exec: the shared monitor has no mmap(PROT_EXEC) "
                                   "probe attached; the dynamic loader's argv is judged from userspace")
            return None
        return roots

    @staticmethod
    def _need_root():
        if os.geteuid() != 0:
            raise PrivilegeError("agentwatch run needs root (it creates cgroups and loads BPF "
                                 "programs: CAP_SYS_ADMIN, CAP_BPF, CAP_PERFMON); run it with sudo")

    def _identity(self):
        uid = os.getuid()
        try:
            user = getpass.getuser()
        except Exception:
            user = str(uid)
        p = self.policy
        return {
            "run_id": self.run_id, "agent": self.agent,
            "policy": p.path if p else None, "policy_name": p.name if p else None,
            "policy_digest": p.digest if p else None, "signer": self.signer,
            "prompt": os.path.abspath(self.opts.prompt_path) if self.opts.prompt_path else None,
            "prompt_digest": self.prompt_digest, "prompt_signer": self.prompt_signer,
            "variables": self.variables,
            "start_time": time.time(), "uid": uid, "user": user,
            "host": socket.gethostname(), "kernel": platform.release(),
            "command": self.opts.argv, "executable": self.command,
            "cwd": self.opts.cwd or os.getcwd(),
            "enforcement": self.plan.record() if self.plan else {"path": "monitor-only"},
            "agent_credentials": self._agent_credentials(),
            "client": self.opts.client,
        }

    def _pid_ns(self):
        """Whether the agent gets a PID namespace of its own (under the run's init)."""
        return bool(self.plan and "pid" in self.plan.namespaces)

    def _no_new_privs(self):
        """Whether the child sets no_new_privs (and so drops every capability)."""
        return self.run_as is not None or bool(self.plan and (self.plan.landlock or self.plan.seccomp))

    def _agent_credentials(self):
        """Who the agent runs as and with which capabilities: the policy's
        process.run_as, else agentwatch's own ids. The child checks both in
        /proc/self/status right before exec and does not start otherwise."""
        from .sandbox import credentials
        creds = self.run_as or credentials.inherited()
        nnp = self._no_new_privs()
        caps = (credentials.no_capabilities() if nnp
                else credentials.capability_record(credentials.read_status()))
        return {"uid": creds.uid, "gid": creds.gid, "groups": creds.groups, "user": creds.user,
                "source": creds.source, "no_new_privs": nnp, "capabilities": caps}

    # -- output -----------------------------------------------------------------------
    def _emit(self, ev):
        ev.prev = self.chain.prev
        line = ev.to_json()
        self.chain.advance(line)
        for s in self.sinks:
            s.write(ev, line)
        if self.bus.subscribers:         # nobody subscribed: nothing to do (the common case)
            self.bus.publish(ev)

    def _on_event(self, ev):
        """Every event the correlator attributes to this run: log it, judge it."""
        self._emit(ev)
        if self.judge:
            self.judge(ev)
        if self.lsm is not None and ev.kind == "file" and ev.op == "open" and ev.ret >= 0 \
                and ev.abspath:
            # names a BPF LSM refusal (by inode and basename) may need: LD_PRELOAD
            # and dlopen name the library nowhere else
            recent = self._lsm_opened.get(ev.pid)
            if recent is None:
                if len(self._lsm_opened) >= LSM_OPENED_PIDS:      # the oldest process first
                    del self._lsm_opened[next(iter(self._lsm_opened))]
                recent = self._lsm_opened[ev.pid] = collections.deque(maxlen=LSM_RECENT_OPENS)
            recent.append(ev.abspath)

    def _kill_for_violation(self, decision):
        if not self.killed_for:
            self.killed_for = decision.rule
            self._lifecycle("warning", {"message": f"killing the agent: {decision.rule} "
                                                   f"({decision.reason}) has action kill"})
            self.cgroup.kill()

    def _lifecycle(self, phase, detail, pid=None):
        ev = LifecycleEvent(phase=phase, detail=detail, ts=round(time.time(), 6),
                            run_id=self.run_id, agent=self.agent, pid=pid or os.getpid(),
                            ppid=os.getppid(), uid=os.getuid(), comm="agentwatch")
        self._emit(ev)

    def _save_record(self, **changes):
        self.record.update(changes)
        state.write_json_atomic(state.run_path(self.run_id, "run.json"), self.record)

    def _stats(self):
        c = self.sensors.counters()
        stats = {"events": self.ctx.events, "lost_events": c["lost_events"],
                 "lost_events_per_cpu": c["lost_events_per_cpu"], "lost_stash": c["lost_stash"],
                 "records_submitted": c["submitted"], "records_received": c["received"],
                 "rings": c["rings"], "killed_in_kernel": c["killed_in_kernel"],
                 "repeated": self.ctx.repeated, "unmatched_repeats": self.ctx.unmatched_repeats,
                 "folded": c["folded"],
                 "decode_errors": len(self.sensors.errors), "pids": len(self.cgroup.pids()),
                 "updated": time.time()}
        state.write_json_atomic(state.run_path(self.run_id, "stats.json"), stats)
        lost = c["lost_events"] + c["lost_stash"]
        if lost != self._last_lost:
            self._lifecycle("drops", {"lost_events": c["lost_events"], "lost_stash": c["lost_stash"],
                                      "lost_events_per_cpu": c["lost_events_per_cpu"],
                                      "lost_priority": c["rings"]["priority"]["lost"],
                                      "message": f"{lost - self._last_lost} new events lost in the kernel"})
            self._last_lost = lost
        return stats

    # -- signals ------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self.stop(signum)

    def stop(self, signum):
        """Stop the agent (SIGINT, SIGTERM or SIGHUP to agentwatch): signal
        it, SIGKILL after STOP_GRACE_S or at a second request."""
        self.stop_requested += 1
        if self.stop_requested == 1:
            self.stop_signal = signum
            self.stop_deadline = time.monotonic() + STOP_GRACE_S
            # a terminal's Ctrl-C reached the agent already, unless the daemon started it
            remote = self.opts.client is not None
            if self.cgroup and (signum != signal.SIGINT or remote):
                self.cgroup.signal_all(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
        elif self.cgroup:
            self.cgroup.kill()

    # -- main -----------------------------------------------------------------------------
    def execute(self):
        self._check()
        try:
            gc()
        except AgentwatchError:
            pass
        os.makedirs(state.run_path(self.run_id), exist_ok=True)
        self.record = {"run_id": self.run_id, "agent": self.agent, "status": "starting",
                       "owner": {"pid": os.getpid(), "start_time": state.process_start_time(os.getpid())},
                       "identity": self._identity()}
        self._save_record()
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            # else (the daemon) whoever asked for the run forwards its signals to stop()
            old_handlers = {s: signal.signal(s, self._on_signal)
                            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            return self._execute()
        finally:
            self._cleanup()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _execute(self):
        self.sinks.append(JsonlSink(state.run_path(self.run_id, "events.jsonl")))
        if self.opts.events_path:
            try:
                self.sinks.append(JsonlSink(self.opts.events_path, "w"))
            except OSError as e:
                raise UsageError(f"--events {self.opts.events_path}: {e.strerror}") from None
        if self.opts.show:
            self.sinks.append(ConsoleSink(self.err))

        if self.own_monitor:
            self.monitor = Monitor(self.opts.sensors, self.opts.ringbuf_pages, self.opts.seccomp_denied,
                                   map_exec=bool(self.plan and self.plan.map_exec is not None)).open()
        self.sensors = self.monitor.sensors
        self.correlator = self.monitor.correlator
        state.register_owner(self.run_id)      # before the cgroup exists: sweeps skip it
        self.cgroup = RunCgroup.create(self.run_id)
        self.monitor.keeper.watch(self.run_id, self.cgroup.path, state.run_path(self.run_id, "run.json"),
                                  state.owner_path(self.run_id))
        self.ctx = RunContext(run_id=self.run_id, agent=self.agent, cgroup_id=self.cgroup.id,
                              cwd=self.opts.cwd or os.getcwd(), emit=self._on_event,
                              pid_ns=self._pid_ns())
        map_roots = self._map_exec_roots()      # once: it may add a note to the plan
        map_kill = map_roots is not None and self.plan.map_exec_kill
        if self.compiled:
            watched = [("identity.policy_write", self.policy.path)]
            if self.opts.prompt_path:
                watched.append(("identity.prompt_write", os.path.abspath(self.opts.prompt_path)))
            self.judge = Judge(self.compiled, self.correlator, self.ctx, self._emit,
                               on_kill=self._kill_for_violation, watched_files=watched,
                               egress_enforced=bool(self.plan and self.plan.egress is not None),
                               lsm_enforced=bool(self.plan and self.plan.lsm is not None),
                               map_exec_roots=map_roots, map_exec_kill=map_kill,
                               seccomp_denied=self.opts.seccomp_denied,
                               seccomp_rules=self._seccomp_rules(), plan=self.plan)
        # the policy's denied paths (and the run's identity files), so their
        # records travel the priority ring buffer (bpf/priority.bpf.c)
        routes = kills = ([], [])
        if self.compiled:
            prefixes, names = self.compiled.kernel_routes()
            routes = (prefixes + [os.path.abspath(p) for _, p in watched], names)
            kills = self.compiled.kernel_kills()
        with self.monitor.lock:
            if not self.own_monitor:
                self.sensors.add_denied(self.opts.seccomp_denied)
            self.correlator.add_run(self.ctx)
            self.sensors.watch(self.cgroup.id, routes, kills, map_roots, map_kill, fold=self.opts.fold)
        launcher.set_child_subreaper()

        identity = dict(self.record["identity"], cgroup=self.cgroup.path, cgroup_id=self.cgroup.id,
                        sensors=self.sensors.groups, tracepoints=len(self.sensors.attached),
                        keeper=self.monitor.keeper.pid)
        self._setup_enforcement(identity)
        if self.plan:
            for line in self.plan.describe():
                print(f"agentwatch: {line}", file=self.err)
        if self.run_as:
            print(f"agentwatch: agent runs as {self.run_as.describe()} (process.run_as), "
                  "no capabilities", file=self.err)
        self.err.flush()
        if self.stop_requested:
            raise LaunchError(f"agent not started: stopped by signal {self.stop_signal} "
                              "while agentwatch was setting up", exit_code=128 + self.stop_signal)
        with self.monitor.lock:
            self.child = launcher.spawn(self.opts.argv, env=self.opts.env, cwd=self.opts.cwd,
                                        setup=self._child_steps(), stdio=self.opts.stdio,
                                        pid_ns=self._pid_ns())
            self.monitor.children.add(self.child.pid)
            self.init_reaped = not self._pid_ns()
            identity["root_pid"] = self.child.pid
            self.correlator.set_root(self.ctx, self.child.pid, os.getpid())
            try:
                self.cgroup.add(self.child.pid)
                if self.limits:
                    self.limits.add(self.child.pid)
            except OSError as e:
                self.child.abort()
                self.monitor.children.discard(self.child.pid)   # reaped by abort()
                raise LaunchError(f"agent did not start: joining cgroup {self.cgroup.path} failed: {e}")
            self._save_record(status="running", identity=identity, root_pid=self.child.pid)
            self._lifecycle("start", identity)
        try:   # not under the lock: release waits for the exec (see launcher.spawn)
            self.child.release()
        except LaunchError:
            while self.monitor.take_exit(self.child.pid) is None:
                time.sleep(0.005)
            self.child = None
            raise
        self._loop()
        return self.exit_status

    def _setup_enforcement(self, identity):
        """Parent side of the sandbox: limits and cgroup BPF on the run's
        cgroup, before the agent exists."""
        plan = self.plan
        if not plan:
            return
        if plan.limits:
            from .sandbox.limits import Limits
            self.limits = Limits(self.run_id, self.cgroup.path, **plan.limits)
            self.limits.setup()
            identity["enforcement"]["limits_applied"] = self.limits.applied
            if self.limits.missing:
                identity["enforcement"]["downgrades"].append(
                    f"resources: no {', '.join(self.limits.missing)} controller")
        if plan.lsm is not None:
            from .guards.lsm import LsmGuard
            try:
                self.lsm = self._guard(LsmGuard, plan.lsm.exec_allow, plan.lsm.file_deny, None,
                                       plan.lsm.signals, plan.lsm.unix).open(
                    self.cgroup.path, self._on_lsm_denial)
            except AgentwatchError as e:
                raise LaunchError(f"agent not started: loading the BPF LSM layer failed: {e} "
                                  "(agentwatch run --bpf-lsm off uses Landlock, seccomp and "
                                  "cgroup BPF alone)") from None
        if plan.egress is not None:
            from .guards.egress import Egress
            self.egress = self._guard(Egress, plan.egress).open(self.cgroup.path,
                                                                 self._on_egress_denial)
            if self.egress.unix_hooks is False and not (plan.lsm and plan.lsm.unix):
                identity["enforcement"]["notes"].append(
                    "network.unix: this kernel has no cgroup unix socket hooks (Linux 6.7+): "
                    "connections to pathname unix sockets are judged, not denied")
        if "net" in plan.namespaces:
            from .sandbox.netns import RunNetwork
            try:
                self.netns = RunNetwork(plan.relay, uid=self.run_as.uid if self.run_as else None).open()
            except AgentwatchError as e:
                raise LaunchError(f"agent not started: {e}") from None
        if plan.wall_time:
            self.wall_deadline = time.monotonic() + plan.wall_time

    def _guard(self, cls, *policy):
        """A new enforcement object for the policy, or one a finished run gave
        back to the shared monitor (not to a monitor of our own: it ends
        with this run)."""
        guard = None if self.own_monitor else self.monitor.take_guard(cls, *policy)
        return cls(*policy) if guard is None else guard

    def _child_steps(self):
        """(step, callable) run by the child between fork and exec, in order.
        Mounts need CAP_SYS_ADMIN and Landlock opens its rule paths as root,
        so both come before the switch to process.run_as; the bounding set
        needs CAP_SETPCAP, so it is emptied before the switch; the switch
        comes before seccomp, which refuses the set*id family. Without
        run_as the agent keeps agentwatch's ids, and drops every capability
        when a sandbox layer set no_new_privs (unchanged since before run_as)."""
        from .sandbox import credentials, landlock, mounts, namespaces, seccomp_filter
        plan, creds = self.plan, self.run_as
        last_cap = credentials.cap_last_cap()
        steps = [("close inherited fds", launcher.close_inherited_fds),
                 ("disable core dumps", launcher.no_core_dumps)]
        private = bool(plan and plan.namespaces)
        if private:
            steps.append((f"enter private {', '.join(plan.namespaces)} and mount namespaces",
                          lambda: namespaces.enter(ipc="ipc" in plan.namespaces, proc=plan.proc,
                                                   dev=plan.dev,
                                                   net_fd=self.netns.fd if self.netns else None)))
        if plan and plan.masks:
            steps.append(("mask denied paths", lambda: mounts.apply(plan.masks, new_ns=not private)))
        if plan and plan.landlock:
            steps.append(("apply Landlock", lambda: landlock.apply(plan.landlock)))
        if creds is not None:
            parent = 0 if self._pid_ns() else os.getpid()   # pid 1's parent is outside its namespace
            steps += [("set no_new_privs", credentials.set_no_new_privs),
                      ("drop capabilities from the bounding set",
                       lambda: credentials.drop_bounding_set(last_cap)),
                      (f"switch to {creds.describe()}", lambda: credentials.switch(creds)),
                      ("set parent-death signal again", lambda: launcher.pdeath_signal(parent)),
                      ("drop capabilities", credentials.clear_capabilities)]
            for what, path, mode in self._dirs_for(creds):
                steps.append((f"check {what} is usable by uid {creds.uid}",
                              lambda w=what, p=path, m=mode: credentials.check_usable(p, m, w, creds)))
        if plan and plan.seccomp:
            steps.append(("load seccomp filter", lambda: seccomp_filter.apply(plan.seccomp)))
        if creds is None and self._no_new_privs():
            steps.append(("drop capabilities", lambda: credentials.drop_capabilities(last_cap)))
        if self._no_new_privs():
            steps.append(("verify credentials and capabilities", lambda: credentials.verify(creds)))
        return steps

    def _dirs_for(self, creds):
        """(what, dir, access mode) the run_as user needs: the workspace and
        TMPDIR, readable and searchable, and writable where the policy lets
        the agent write there (no filesystem.write list: everywhere)."""
        out = []
        for name in ("WORKSPACE", "TMPDIR"):
            path = self.variables[name]
            if name == "TMPDIR" and not os.path.isdir(path):
                continue
            mode = os.R_OK | os.X_OK
            probe = os.path.join(path, ".agentwatch-probe")
            if self.compiled is None or self.compiled.check_file(probe, {"write"}) is None:
                mode |= os.W_OK
            elif name == "TMPDIR" and self.compiled.check_file(probe, {"read"}) is not None:
                continue               # neither readable nor writable: nothing to check
            out.append(("workspace" if name == "WORKSPACE" else "TMPDIR", path, mode))
        return out

    def _seccomp_rules(self):
        """The run's filter rules, for the judge to tell a by-argument refusal
        from an ordinary EPERM (None: no filter)."""
        if self.plan is None or self.plan.seccomp is None:
            return None
        from .sandbox.seccomp_filter import plan
        return list(plan(self.plan.seccomp))

    def _on_egress_denial(self, d):
        from .core.events import NetEvent
        if d.get("family") == "unix":
            return    # counted; the syscall sensor reports it with the socket's name (EPERM)
        rule = {"loopback-not-allowed": "network.loopback", "raw-socket": "network.socket",
                "family-not-allowed": "network.socket",
                "protocol-not-allowed": "network.socket",
                "bind-not-allowed": "network.bind"}.get(d.get("rule"), "network.egress")
        proc = self.ctx.procs.get(d["pid"])
        ev = NetEvent(op=d.get("op"), family=d.get("family"), addr=d.get("addr"), port=d.get("port"),
                      ts=round(time.time(), 6), run_id=self.run_id, agent=self.agent, pid=d["pid"],
                      tid=d.get("tid", d["pid"]), ppid=proc.ppid if proc else 0, uid=d.get("uid", 0),
                      comm=d.get("comm", ""), ret=-1, error="EPERM")
        target = d.get("addr") if d.get("port") is None else f"{d.get('addr')}:{d.get('port')}"
        if self.judge:
            self.judge.kernel_denial(ev, "network", rule, f"cgroup BPF: {d.get('rule')}", target,
                                     {"op": d.get("op"), "family": d.get("family"),
                                      "addr": d.get("addr"), "port": d.get("port"),
                                      "proto": d.get("proto")})

    def _on_lsm_denial(self, d):
        """A refusal by a BPF LSM program (guards/lsm.py): exec or executable
        mapping of a file outside the allow set, or open of a denied file.
        The program names the file by inode and basename; a name not found
        yet waits (up to LSM_NAME_WAIT_S) for the process's exec record,
        which carries the dynamic loader's argv, to reach the correlator.
        A refused signal or unix socket address is counted only: the signal
        and syscall sensors report it, with the EPERM the hook gave and the
        socket's name (one attempt, one report)."""
        if d.get("op") == "kill" or d.get("family") == "unix":
            return
        d["_until"] = time.monotonic() + LSM_NAME_WAIT_S
        self._lsm_waiting.append(d)
        self._report_lsm_denials()

    def _report_lsm_denials(self, final=False):
        from .core.events import FileEvent
        waiting, self._lsm_waiting = self._lsm_waiting, []
        for d in waiting:
            proc = self.ctx.procs.get(d["pid"])
            path = (d.get("path") or _fd_path(d["pid"], d.get("ino"))
                    or _named_by(proc, d.get("name"), d.get("ino"), self._lsm_opened.get(d["pid"])))
            if not path and not final and time.monotonic() < d["_until"]:
                self._lsm_waiting.append(d)
                continue
            path = path or d.get("name") or ""
            op = "exec" if d["op"] in ("exec", "mmap", "mprotect") else "open"
            ev = FileEvent(op=op, path=path, abspath=path if path.startswith("/") else None,
                           ts=round(time.time(), 6), run_id=self.run_id, agent=self.agent,
                           pid=d["pid"], tid=d.get("tid", d["pid"]),
                           ppid=proc.ppid if proc else 0, uid=d.get("uid", 0),
                           comm=d.get("comm", ""), ret=-1, error="EPERM")
            rule = "filesystem.deny" if d["rule"] == "file-denied" else "filesystem.exec"
            if self.judge:
                self.judge.kernel_denial(
                    ev, "filesystem", rule, f"BPF LSM {d['hook']}: {d['rule']}", path,
                    {"op": d["op"], "hook": d["hook"], "path": path, "ino": d.get("ino"),
                     "dev": d.get("dev")}, layer="bpf-lsm")

    def _guards(self):
        return [g for g in (self.lsm, self.egress) if g is not None]

    def _loop(self):
        next_stats = time.monotonic() + STATS_EVERY_S
        if self.own_monitor:
            while self.exit_status is None:
                next_stats = self._step(next_stats, 100)
            return
        # a shared monitor: hold its lock only to read what is there (for
        # every run), then let the other runs have it; wake early when the
        # agent exits (its pidfd turns readable)
        try:
            pidfd = os.pidfd_open(self.child.pid)
        except OSError:
            pidfd = None
        try:
            while self.exit_status is None:
                with self.monitor.lock:
                    next_stats = self._step(next_stats, 0)
                if self.sensors.backlog:
                    continue                # records are waiting: read on
                wake = [fd for fd in (pidfd, self.child.status_fd) if fd is not None]
                if wake:
                    select.select(wake, [], [], SHARED_POLL_S)
                else:
                    time.sleep(SHARED_POLL_S)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _step(self, next_stats, timeout_ms):
        """One turn of the loop: read the rings, reap, check deadlines, flush.
        Returns when the next stats are due."""
        self.sensors.poll(timeout_ms)
        for g in self._guards():
            g.poll(0)
        if self._lsm_waiting:
            self._report_lsm_denials()
        self._reap()
        if self.wall_deadline and time.monotonic() > self.wall_deadline:
            self.wall_deadline = None
            self._lifecycle("warning", {"message": "wall time limit reached: stopping the agent"})
            if self.judge:
                self.judge.limit_reached("resources.wall_time",
                                         f"ran longer than {self.plan.wall_time:g} s")
            self.cgroup.kill()
        now = time.monotonic()
        if self.stop_deadline and now > self.stop_deadline:
            self.cgroup.kill()
            self.stop_deadline = None
        if self.judge:
            self.judge.tick(now)
        for s in self.sinks:
            s.flush()
        if now >= next_stats:
            self._stats()
            next_stats = now + STATS_EVERY_S
        return next_stats

    def _reap(self):
        """Take the agent's exit status once it exited (the monitor reaps
        every child: the agents, and orphans re-parented to us)."""
        if self.child and self.exit_status is None:
            status = self.child.agent_status()       # the run's init says it (PID namespace)
            if status is None:
                status = self.monitor.take_exit(self.child.pid)
                self.init_reaped = self.init_reaped or status is not None
            if status is not None:
                code = os.waitstatus_to_exitcode(status)
                self.exit_status = code if code >= 0 else 128 - code

    def _finish(self):
        """After the agent exited: kill leftovers, drain, report."""
        lock = self.monitor.lock
        leftover = [p for p in self.cgroup.pids() if p != self.child.pid]   # not the run's init
        if leftover:
            with lock:
                self._lifecycle("warning", {"message": f"killed {len(leftover)} process(es) the "
                                                       "agent left running", "killed": leftover})
            self.cgroup.kill()
        elif not self.init_reaped:
            self.cgroup.kill()           # the init waits for nothing more: no need to wait for it
        deadline = time.monotonic() + 5
        while self.cgroup.pids() and time.monotonic() < deadline:
            with lock:
                self.sensors.poll(20)
                self.monitor.reap()
        while not self.init_reaped and time.monotonic() < deadline:   # the monitor keeps it else
            self.init_reaped = self.monitor.take_exit(self.child.pid) is not None
            time.sleep(0.005)
        # Every process of the run has exited, so each of its records was
        # submitted by now (BPF programs run in the process, before it
        # leaves the cgroup): read until the rings were read to their end
        # past this moment. A monitor of our own then drains what is left
        # at once (drain()); a shared one must read on in order, however
        # long the backlog (other runs' records interleave with ours), or
        # records of this run read after its end would be dropped unseen.
        t_empty = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        deadline = time.monotonic() + (DRAIN_S if self.own_monitor else SHARED_DRAIN_S)
        done = False
        while not done and time.monotonic() < deadline:
            with lock:
                self.sensors.poll(5)
                done = self.sensors.delivered_until(t_empty)
        with lock:
            if not done and not self.own_monitor:
                self._lifecycle("warning", {"message": "the shared monitor did not read up to the "
                                                       f"agent's end within {SHARED_DRAIN_S:g} s: "
                                                       "the log may lack its last records"})
            self._drained()

    def _drained(self):
        """The agent's records are read: deliver them, judge, report."""
        if self.own_monitor:
            self.sensors.drain()   # and deliver what was still held back for ordering
        self.monitor.reap()
        for g in self._guards():
            g.poll(0)
        self._report_lsm_denials(final=True)
        self.correlator.finish(self.ctx)
        if self.judge:
            self.judge.tick(final=True)
        stats = self._stats()
        lost = stats["lost_events"] + stats["lost_stash"] + stats["unmatched_repeats"]
        verdict = self.judge.summary() if self.judge else None
        self._lifecycle("end", {"exit_status": self.exit_status, "events": self.ctx.events,
                                "violations": verdict,
                                "killed_for": self.killed_for,
                                "lost_events": stats["lost_events"], "lost_stash": stats["lost_stash"],
                                "lost_events_per_cpu": stats["lost_events_per_cpu"],
                                "records_submitted": stats["records_submitted"],
                                "records_received": stats["records_received"],
                                "repeated": stats["repeated"],
                                "unmatched_repeats": stats["unmatched_repeats"],
                                "folded": stats["folded"],
                                "rings": stats["rings"],
                                "decode_errors": stats["decode_errors"],
                                "kernel_denials": {g.enforcement: g.counters() for g in self._guards()},
                                "killed_in_kernel": stats["killed_in_kernel"],
                                "bus": self.bus.counters(),
                                "loopback_relay": self.netns.counters() if self.netns else None,
                                "stopped_by_signal": getattr(self, "stop_signal", None)})
        counts = {"events": self.ctx.events, "lost": lost,
                  "violations": verdict["violations"] if verdict else 0}
        key = integrity.host_key()
        self._lifecycle("seal", integrity.seal(self.chain, self.run_id, counts, key))
        self.summary = (f"agentwatch: run {self.run_id} ({self.agent}) exited {self.exit_status}: "
                        f"{self.ctx.events} events, {lost} lost")
        if stats["lost_events"]:
            per_cpu = ", ".join(f"{n} on CPU #{i}" for i, n in enumerate(stats["lost_events_per_cpu"]) if n)
            rings = stats["rings"]
            self.summary += (f" (ring buffers full: {per_cpu}; {rings['bulk']['lost']} bulk, "
                             f"{rings['priority']['lost']} priority)")
        if verdict is not None:
            cats = ", ".join(f"{c} {n}" for c, n in sorted(verdict["by_category"].items())) or "none"
            self.summary += f"; violations: {verdict['violations']} ({cats})"
        self.summary += f"; log: {state.run_path(self.run_id, 'events.jsonl')}"

    def _cleanup(self):
        status = "exited"
        try:
            if self.exit_status is not None and self.sensors and self.cgroup:
                self._finish()
            elif self.child is not None:
                status = "failed"
                self.cgroup.kill()
        except Exception:
            status = "failed"
            raise
        finally:
            lock = self.monitor.lock if self.monitor else threading.RLock()
            with lock:
                for s in self.sinks:
                    s.close()
                if self.sensors and self.cgroup:
                    self.sensors.unwatch(self.cgroup.id)
                    self.correlator.remove_run(self.ctx)
            if self.sensors and self.own_monitor:
                self.monitor.close()
            if self.cgroup:
                self.cgroup.kill()
            if self.child is not None:
                self.child.close()
            if self.netns is not None:
                self.netns.close()
            self.bus.close()
            for g in self._guards():   # only once the agent tree is dead
                if self.own_monitor:
                    g.close()
                else:
                    self.monitor.give_back(g)
            if self.limits:
                self.limits.remove()
            if self.cgroup:
                if self.cgroup.remove():
                    state.unregister_owner(self.run_id)
            if self.record:
                if self.exit_status is None:
                    status = "failed"
                self._save_record(status=status, exit_status=self.exit_status, end_time=time.time())
            if self.cgroup:
                self.monitor.keeper.forget(self.run_id)


def _fd_path(pid, ino):
    """The path of pid's open file with inode ino (what the loader was about
    to map), while the process lives; else None."""
    if not ino:
        return None
    d = f"/proc/{pid}/fd"
    try:
        for fd in os.listdir(d):
            try:
                if os.stat(os.path.join(d, fd)).st_ino == ino:
                    return os.readlink(os.path.join(d, fd))
            except OSError:
                continue
    except OSError:
        pass
    return None


def _named_by(proc, name, ino, opened=()):
    """The path of a file the BPF LSM reported by basename and inode: one of
    the process's arguments (the dynamic loader's program), a file it opened
    lately (LD_PRELOAD, dlopen) or the name in its cwd, whichever is that
    inode; else None."""
    if not proc or not name or not ino:
        return None
    cands = [a for a in proc.argv or () if os.path.basename(a) == name]
    cands += [p for p in reversed(opened or ()) if os.path.basename(p) == name]
    cands.append(name)
    for c in cands:
        path = os.path.normpath(c if c.startswith("/") else os.path.join(proc.cwd or "/", c))
        try:
            if os.stat(path).st_ino == ino:
                return path
        except OSError:
            continue
    return None
