"""`agentwatch run`: one agent, its cgroup, its sensors, its log.

Order matters and is the point of this module:
 1. check input (command, policy) before anything is created (run/prepare.py);
 2. load the BPF sensors and add the run's new cgroup to their filter;
 3. fork the agent, put it in the cgroup, and only then let it exec;
 4. stream events to the run log until the agent exits;
 5. kill whatever the agent left behind, drain the ring buffer, report
    drops, and remove the cgroup and the BPF programs.
Stale state from a crashed agentwatch is swept at start (and by `agentwatch gc`).

Run composes the parts: Prepared (what the run is), RunLog (what it
writes), Enforcement (the kernel guards and the child's steps), the
Monitor (the sensors, maybe shared) and the Judge."""
import os
import select
import signal
import sys
import threading
import time

from ..core import state
from ..core.errors import AgentwatchError, LaunchError
from ..engine import RunContext
from ..engine.judge import Judge
from ..engine.termination import LocalIO, Termination, Terminator
from ..sandbox import launcher
from ..sandbox.cgroups import RunCgroup
from . import sweep
from .enforcement import Enforcement
from .log import END_STATS, RunLog, summary_line
from .monitor import Monitor
from .prepare import prepare

STOP_GRACE_S = 3.0       # after SIGINT/SIGTERM: time the agent gets before SIGKILL
STATS_EVERY_S = 1.0
DRAIN_S = 2.0            # after the agent's end: how long its own monitor reads before drain()
SHARED_DRAIN_S = 300.0   # on a shared monitor: the bound on reading up to the agent's end
SHARED_POLL_S = 0.02     # a run on a shared monitor reads the rings this often (priority records too)
TERM_CHECK_S = 0.15      # the terminator's conditions are checked this often
TERM_KINDS = frozenset(("file", "exec", "exit", "fork", "llm", "msg"))


class Run:
    """One run of an agent, start to clean-up: execute() prepares it,
    creates its cgroup, watches it with the monitor's sensors, starts the
    agent, logs and judges its events until it exits, then drains and
    removes everything. stop() from any thread (or a signal) stops it.

    About 370 lines, over the guide's 300, and kept whole: what is left
    here is the order of one run's life (set-up, spawn, loop, drain,
    clean-up), each step holding the monitor's lock, the cgroup and the
    agent's status together; the parts with a responsibility of their own
    (preparation, log, enforcement, sensors) are objects it composes."""

    def __init__(self, opts, monitor=None):
        self.opts = opts
        self.run_id = state.new_run_id()
        self.log = RunLog(self.run_id)
        self.bus = self.log.bus          # every logged event, for other layers (engine/bus.py)
        self.monitor = monitor           # shared, already open; else the run makes its own
        self.own_monitor = monitor is None
        self.subreaper_was = True        # until execute() makes this process a subreaper
        self.prepared = None             # run/prepare.Prepared, once execute() checked the input
        self.enforcement = None          # run/enforcement.Enforcement
        self.sensors = None
        self.correlator = None
        self.ctx = None                  # engine.RunContext: the run's processes and counts
        self.judge = None                # engine.judge.Judge, with a policy
        self.cgroup = None
        self.child = None
        self.exit_status = None
        self.summary = None              # the one-line summary, once the run ended
        self.stop_requested = 0
        self.stop_signal = None
        self.stop_deadline = None
        self.killed_for = None
        self.init_reaped = True          # False while the run's init (PID namespace) is unreaped
        self.wall_deadline = None
        self.terminator = None           # engine/termination.Terminator: progress signals, conditions
        self.termination = None          # the Termination that ended the run, once one did
        self._next_term_check = 0.0
        self.err = opts.stderr or sys.stderr   # agentwatch's own messages

    # -- for callers (the API, the daemon) -------------------------------------------
    @property
    def agent(self):
        return self.prepared.agent if self.prepared else None

    def info(self):
        """What the daemon's status says of a run."""
        return {"run_id": self.run_id, "agent": self.agent,
                "root_pid": self.log.record.get("root_pid"),   # once it runs in its cgroup
                "client": self.opts.client}

    def refuse_request(self, pid, op):
        """Report on this run that pid, one of its agents, was refused op
        (a daemon request or signal)."""
        if self.judge is not None:
            with self.monitor.lock:
                self.judge.daemon_refused(pid, str(op))

    def stop(self, signum):
        """Stop the agent (SIGINT, SIGTERM or SIGHUP to agentwatch): signal
        it, SIGKILL after STOP_GRACE_S or at a second request."""
        self.stop_requested += 1
        if self.stop_requested == 1:
            self.stop_signal = signum
            if self.termination is None:
                self.termination = Termination("stopped", f"signal {signal.Signals(signum).name}",
                                               {"signal": int(signum)})
            # a terminal's Ctrl-C reached the agent already, unless the daemon started it
            remote = self.opts.client is not None
            self._stop_tree(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM, STOP_GRACE_S,
                            send=signum != signal.SIGINT or remote)
        elif self.cgroup:
            self.cgroup.kill()

    def _stop_tree(self, sig, grace, send=True):
        """sig to every process of the run, SIGKILL after grace seconds
        (the _step loop) unless the tree is gone by then."""
        deadline = time.monotonic() + grace
        self.stop_deadline = min(self.stop_deadline or deadline, deadline)
        if self.cgroup and send:
            self.cgroup.signal_all(sig)

    def _terminate(self, termination):
        """A termination condition holds: log why and stop the agent's tree
        (SIGTERM, termination.grace, SIGKILL)."""
        if self.termination is not None:
            return
        self.termination = termination
        grace = self.terminator.rules.grace if self.terminator.rules else STOP_GRACE_S
        self.log.lifecycle("warning", {"message": f"stopping the agent: {termination.reason} "
                                                  f"({termination.condition})",
                                       "termination": termination.to_dict()})
        self._stop_tree(signal.SIGTERM, grace)

    def _on_signal(self, signum, _frame):
        self.stop(signum)

    # -- events ---------------------------------------------------------------------------
    def _on_event(self, ev):
        """Every event the correlator attributes to this run: log it, judge it."""
        self.log.emit(ev)
        if self.judge:
            self.judge(ev)
        self.enforcement.note_open(ev)

    def _kill_for_violation(self, decision):
        if not self.killed_for:
            self.killed_for = decision.rule
            if self.termination is None:
                self.termination = Termination("violation", decision.rule, {"reason": decision.reason})
            self.log.lifecycle("warning", {"message": f"killing the agent: {decision.rule} "
                                                      f"({decision.reason}) has action kill"})
            self.cgroup.kill()

    def _stats(self):
        progress = self.terminator.progress(time.monotonic()) if self.terminator else None
        return self.log.stats(self.sensors, self.ctx, len(self.cgroup.pids()), progress)

    # -- termination (engine/termination.py) ----------------------------------------------
    def _start_terminator(self):
        """The run's Terminator, fed by its own bus (a callback: O(1), on the
        reader's thread), its done commands run in the run's sandbox."""
        p = self.prepared
        rules = p.policy.spec.termination if p.policy else None
        self.terminator = Terminator(rules, p.variables["WORKSPACE"], p.variables, time.monotonic(),
                                     LocalIO(start_command=self._start_check))
        self.bus.subscribe(1, TERM_KINDS, callback=self.terminator.feed)

    def _start_check(self, index, argv, timeout):
        """Run termination.done[index]'s command as the agent would (its
        sandbox, cgroup, cwd and environment), in a thread; its processes'
        events are no progress (Terminator.ignore)."""
        def check():
            t0 = time.monotonic()
            try:
                status = self.spawn_tool(argv, timeout, max_output=4096,
                                         on_spawn=self.terminator.ignore)[0]
            except LaunchError:
                status = None
            self.terminator.command_result(index, status, time.monotonic() - t0)
        threading.Thread(target=check, name=f"termination.done[{index}]", daemon=True).start()

    def _check_termination(self, now):
        if self.terminator is None or self.termination is not None or now < self._next_term_check:
            return
        self._next_term_check = now + TERM_CHECK_S
        t = self.terminator.check(now)
        if t is not None:
            self._terminate(t)

    # -- main -----------------------------------------------------------------------------
    def execute(self):
        """Run the agent to its end; its exit status (128+N for signal N)."""
        self.prepared = p = prepare(self.opts, service_ports=self.monitor.service_ports()
                                    if self.monitor else ())
        self.log.agent = p.agent
        self.enforcement = Enforcement(p, self.run_id)
        try:
            sweep.gc()
        except AgentwatchError:
            pass
        os.makedirs(state.run_path(self.run_id), exist_ok=True)
        self.log.save_record(run_id=self.run_id, agent=p.agent, status="starting",
                             owner={"pid": os.getpid(),
                                    "start_time": state.process_start_time(os.getpid())},
                             identity=p.identity(self.run_id))
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
        p, opts = self.prepared, self.opts
        self.log.open(opts.events_path, self.err if opts.show else None, environ=opts.env)
        if self.own_monitor:
            self.monitor = Monitor(p.sensor_groups, opts.ringbuf_pages, p.seccomp_denied,
                                   map_exec=bool(p.plan and p.plan.map_exec is not None)).open()
        self.sensors = self.monitor.sensors
        self.correlator = self.monitor.correlator
        state.register_owner(self.run_id)      # before the cgroup exists: sweeps skip it
        self.cgroup = RunCgroup.create(self.run_id)
        self.monitor.keeper.watch(self.run_id, self.cgroup.path, state.run_path(self.run_id, "run.json"),
                                  state.owner_path(self.run_id))
        self.ctx = RunContext(run_id=self.run_id, agent=p.agent, cgroup_id=self.cgroup.id,
                              cwd=opts.cwd or os.getcwd(), emit=self._on_event, pid_ns=p.pid_ns)
        map_roots = p.map_exec_roots(self.sensors.map_exec)   # once: it may add a note to the plan
        map_kill = map_roots is not None and p.plan.map_exec_kill
        watched = p.watched_files()
        if p.compiled:
            self.judge = Judge(p.compiled, self.correlator, self.ctx, self.log.emit,
                               on_kill=self._kill_for_violation, watched_files=watched,
                               egress_enforced=bool(p.plan and p.plan.egress is not None),
                               guarded=bool(p.plan and p.plan.guard is not None),
                               lsm_enforced=bool(p.plan and p.plan.lsm is not None),
                               map_exec_roots=map_roots, map_exec_kill=map_kill,
                               seccomp_denied=p.seccomp_denied,
                               seccomp_rules=self.enforcement.seccomp_rules(), plan=p.plan,
                               service_ports=p.service_ports)
        # the policy's denied paths (and the run's identity files), so their
        # records travel the priority ring buffer (bpf/priority.bpf.c)
        routes = kills = ([], [])
        if p.compiled:
            prefixes, names = p.compiled.kernel_routes()
            routes = (prefixes + [os.path.abspath(f) for _, f in watched], names)
            kills = p.compiled.kernel_kills()
        with self.monitor.lock:
            if not self.own_monitor:
                self.sensors.add_denied(p.seccomp_denied)
            self.correlator.add_run(self.ctx)
            self.sensors.watch(self.cgroup.id, routes, kills, map_roots, map_kill, fold=opts.fold)
        self.subreaper_was = launcher.set_child_subreaper()

        identity = dict(self.log.record["identity"], cgroup=self.cgroup.path, cgroup_id=self.cgroup.id,
                        sensors=self.sensors.groups, tracepoints=len(self.sensors.attached),
                        keeper=self.monitor.keeper.pid)
        self.enforcement.setup(self.cgroup, identity, self.ctx, self.judge,
                               None if self.own_monitor else self.monitor.take_guard,
                               egress_guard=self.monitor.egress_guard, emit=self._on_event)
        self.agent_env = self._service_env(identity)
        self._start_terminator()
        if p.plan and p.plan.wall_time:
            self.wall_deadline = time.monotonic() + p.plan.wall_time
        if p.plan:
            for line in p.plan.describe():
                print(f"agentwatch: {line}", file=self.err)
        if p.run_as:
            print(f"agentwatch: agent runs as {p.run_as.describe()} (process.run_as), "
                  "no capabilities", file=self.err)
        self.err.flush()
        if self.stop_requested:
            raise LaunchError(f"agent not started: stopped by signal {self.stop_signal} "
                              "while agentwatch was setting up", exit_code=128 + self.stop_signal)
        self._spawn(identity)
        self._loop()
        return self.exit_status

    def _service_env(self, identity):
        """The agent's environment with what the monitor's services add
        (run/services.py: the LLM gateway's base URLs and the run's dummy
        key); their names go into the identity, never their values."""
        services = list(self.monitor.services)
        if not services:
            return self.opts.env
        p = self.prepared
        prompt = None
        if p.opts.prompt_path:
            with open(p.opts.prompt_path, encoding="utf-8", errors="replace") as f:
                prompt = f.read()
        action_for = p.compiled.action_for if p.compiled else (lambda category, rule=None: "alert")
        added = self.enforcement.open_services(services, self.cgroup.path, prompt, action_for,
                                               policy=p.compiled.spec if p.compiled else None,
                                               spawn=self.spawn_tool, subscribe=self.bus.subscribe,
                                               check_read=self._check_read)
        identity["services"] = {"names": [s.name for s in services],
                                "env": sorted(k for k, v in added.items() if v is not None),
                                "env_removed": sorted(k for k, v in added.items() if v is None)}
        env = dict(os.environ if self.opts.env is None else self.opts.env)
        for k, v in added.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def _spawn(self, identity):
        """Fork the agent, put it in the run's cgroup, log the start, let it exec."""
        with self.monitor.lock:
            self.child = launcher.spawn(self.opts.argv, env=self.agent_env, cwd=self.opts.cwd,
                                        setup=self.enforcement.child_steps(), stdio=self.opts.stdio,
                                        pid_ns=self.prepared.pid_ns)
            self.monitor.children.add(self.child.pid)
            self.init_reaped = not self.prepared.pid_ns
            identity["root_pid"] = self.child.pid
            self.correlator.set_root(self.ctx, self.child.pid, os.getpid())
            try:
                self.cgroup.add(self.child.pid)
                self.enforcement.join(self.child.pid)
            except OSError as e:
                self.child.abort()
                self.monitor.children.discard(self.child.pid)   # reaped by abort()
                raise LaunchError(f"agent did not start: joining cgroup {self.cgroup.path} failed: {e}")
            self.log.save_record(status="running", identity=identity, root_pid=self.child.pid)
            self.log.lifecycle("start", identity)
        try:   # not under the lock: release waits for the exec (see launcher.spawn)
            self.child.release()
        except LaunchError:
            while self.monitor.take_exit(self.child.pid) is None:
                time.sleep(0.005)
            self.child = None
            raise

    def _check_read(self, path):
        """Why this run's policy refuses reading path (its real path too:
        a symlink names what it points at), or None."""
        compiled = self.prepared.compiled
        if compiled is None:
            return None
        for p in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
            d = compiled.check_file(p, {"read"})
            if d is not None:
                return d.reason
        return None

    def spawn_tool(self, argv, timeout_s, max_output=1 << 20, on_spawn=None):
        """Run argv inside this run's sandbox, as the agent would: its
        cgroup (so its sensors see it, and the run's end kills it), its
        namespaces, masks, Landlock, credentials and seccomp filter, with
        stdin from /dev/null. For the broker's token-gated tools
        (harness/broker.py). -> (exit status, stdout, stderr, truncated);
        a tool still running after timeout_s is killed (exit status 137).
        on_spawn(pid): called with the tool's pid before it execs.
        LaunchError when the run has ended or the tool cannot start."""
        if self.child is None or self.exit_status is not None or self.cgroup is None:
            raise LaunchError("the run has ended")
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self.monitor.lock:
                child = launcher.spawn(argv, env=self.agent_env, cwd=self.opts.cwd,
                                       setup=self.enforcement.child_steps(), stdio=(null, out_w, err_w),
                                       pid_ns=self.prepared.pid_ns)
                self.monitor.children.add(child.pid)
                if on_spawn is not None:
                    on_spawn(child.pid)
                try:
                    self.cgroup.add(child.pid)
                    self.enforcement.join(child.pid)
                except OSError as e:
                    child.abort()
                    self.monitor.children.discard(child.pid)
                    raise LaunchError(f"tool did not start: joining cgroup {self.cgroup.path} failed: {e}")
        finally:
            for fd in (out_w, err_w, null):
                os.close(fd)
        try:
            try:
                child.release()
            except LaunchError as e:
                raise LaunchError(str(e).replace("agent did not start", "tool did not start"),
                                  exit_code=e.exit_code) from None
            out, err, truncated = _read_both(out_r, err_r, time.monotonic() + timeout_s, max_output)
            status = self._wait_tool(child, time.monotonic() + (0 if truncated is None else 5))
        finally:
            os.close(out_r)
            os.close(err_r)
            child.close()
        return status, out, err, bool(truncated)

    def _wait_tool(self, child, deadline):
        """The tool's exit status; killed (SIGKILL, by its pid: ours) once
        the deadline passed."""
        killed = False
        while True:
            status = child.agent_status()
            if status is None:
                status = self.monitor.take_exit(child.pid)
            if status is not None:
                if child.status_fd is not None:      # its init reaped: its word is gone with it
                    child.close()
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code
            if not killed and time.monotonic() >= deadline:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                killed = True
            time.sleep(0.005)

    # -- while the agent runs ---------------------------------------------------------
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
                    # poll, not select: a daemon (its egress guard's flows) holds
                    # descriptors beyond select's 1024
                    poller = select.poll()
                    for fd in wake:
                        poller.register(fd, select.POLLIN)
                    poller.poll(SHARED_POLL_S * 1000)
                else:
                    time.sleep(SHARED_POLL_S)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _step(self, next_stats, timeout_ms):
        """One turn of the loop: read the rings, reap, check deadlines, flush.
        Returns when the next stats are due."""
        self.sensors.poll(timeout_ms)
        self.enforcement.poll()
        self._reap()
        if self.wall_deadline and time.monotonic() > self.wall_deadline:
            self.wall_deadline = None
            self.log.lifecycle("warning", {"message": "wall time limit reached: stopping the agent"})
            if self.termination is None:
                self.termination = Termination("timeout", "resources.wall_time",
                                               {"limit": self.prepared.plan.wall_time})
            if self.judge:
                self.judge.limit_reached("resources.wall_time",
                                         f"ran longer than {self.prepared.plan.wall_time:g} s")
            self.cgroup.kill()
        now = time.monotonic()
        if self.stop_deadline and now > self.stop_deadline:
            self.cgroup.kill()
            self.stop_deadline = None
        if self.judge:
            self.judge.tick(now)
        self._check_termination(now)
        self.log.flush()
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

    # -- after the agent's end ---------------------------------------------------------
    def _finish(self):
        """After the agent exited: kill leftovers, drain, report."""
        lock = self.monitor.lock
        leftover = [p for p in self.cgroup.pids() if p != self.child.pid]   # not the run's init
        if leftover:
            with lock:
                self.log.lifecycle("warning", {"message": f"killed {len(leftover)} process(es) the "
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
                self.log.lifecycle("warning", {"message": "the shared monitor did not read up to the "
                                                          f"agent's end within {SHARED_DRAIN_S:g} s: "
                                                          "the log may lack its last records"})
            self._drained()

    def _drained(self):
        """The agent's records are read: deliver them, judge, report."""
        if self.own_monitor:
            self.sensors.drain()   # and deliver what was still held back for ordering
        self.monitor.reap()
        for g in self.enforcement.guards():
            g.poll(0)
        self.enforcement.end_guard()
        self.enforcement.end_services()
        self.enforcement.report_lsm_denials(final=True)
        self.correlator.finish(self.ctx)
        if self.judge:
            self.judge.tick(final=True)
        stats = self._stats()
        lost = stats["lost_events"] + stats["lost_stash"] + stats["unmatched_repeats"]
        verdict = self.judge.summary() if self.judge else None
        netns = self.enforcement.netns
        term = self.termination or Termination("exit", None, {"exit_status": self.exit_status})
        self.log.lifecycle("end", {"exit_status": self.exit_status, "events": self.ctx.events,
                                   "violations": verdict, "killed_for": self.killed_for,
                                   **{k: stats[k] for k in END_STATS},
                                   "kernel_denials": self.enforcement.counters(),
                                   "killed_in_kernel": stats["killed_in_kernel"],
                                   "bus": self.bus.counters(),
                                   "loopback_relay": netns.counters() if netns else None,
                                   "stopped_by_signal": self.stop_signal,
                                   "termination": term.to_dict()})
        self.log.seal({"events": self.ctx.events, "lost": lost,
                       "violations": verdict["violations"] if verdict else 0})
        self.summary = summary_line(self.run_id, self.agent, self.exit_status, self.ctx.events, lost,
                                    stats, verdict)

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
                self.log.close()
                if self.sensors and self.cgroup:
                    self.sensors.unwatch(self.cgroup.id)
                    self.correlator.remove_run(self.ctx)
            if self.sensors and self.own_monitor:
                self.monitor.close()
            if self.cgroup:
                self.cgroup.kill()
            if self.child is not None:
                self.child.close()
            self.bus.close()
            if self.enforcement is not None:   # only once the agent tree is dead
                self.enforcement.close(None if self.own_monitor else self.monitor.give_back)
            if self.cgroup:
                if self.cgroup.remove():
                    state.unregister_owner(self.run_id)
            if self.log.record:
                if self.exit_status is None:
                    status = "failed"
                self.log.save_record(status=status, exit_status=self.exit_status, end_time=time.time())
            if self.cgroup:
                self.monitor.keeper.forget(self.run_id)
            if self.own_monitor and not self.subreaper_was:
                # the run's tree is dead: orphans of the caller's own children
                # go to init again (a harness running agents in-process)
                launcher.set_child_subreaper(False)


def _read_both(out_fd, err_fd, deadline, cap):
    """Read two pipes to their end or the deadline, each up to cap bytes
    (the rest is read and dropped). -> (stdout, stderr, truncated), where
    truncated is None when the deadline passed first."""
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    over = False
    poller = select.poll()
    for fd in bufs:
        poller.register(fd, select.POLLIN)
    open_fds = set(bufs)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(bufs[out_fd]), bytes(bufs[err_fd]), None
        for fd, _ in poller.poll(left * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            room = cap - len(bufs[fd])
            over = over or len(chunk) > room
            bufs[fd] += chunk[:max(0, room)]
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), over
