"""A run's enforcement, from its plan (run/prepare.py): the parent's side
(resource limits, the kernel guards on the run's cgroup: cgroup BPF egress
and BPF LSM, the network namespace and its relay), the child's set-up steps
between fork and exec, and the guards' refusals turned into events for the
judge (with the /proc look-ups that name a file the BPF LSM refused)."""
import collections
import dataclasses
import os
import time

from ..core.errors import AgentwatchError, LaunchError
from ..core.events import FileEvent, FlowEvent, LlmEvent, MsgEvent, NetEvent
from ..core.procfs import fd_with_inode
from ..sandbox import launcher

LSM_NAME_WAIT_S = 0.5   # how long a BPF LSM denial may wait for its file's path (see on_lsm_denial)
LSM_RECENT_OPENS = 16   # files opened per process kept to name a BPF LSM refusal by
LSM_OPENED_PIDS = 4096  # ... for this many processes at most

EGRESS_RULES = {"loopback-not-allowed": "network.loopback", "raw-socket": "network.socket",
                "family-not-allowed": "network.socket", "protocol-not-allowed": "network.socket",
                "bind-not-allowed": "network.bind"}


class Enforcement:
    """The kernel side of one run's plan. Created with the run's Prepared;
    setup() applies the parent's side on the run's cgroup before the agent
    exists; child_steps() is what the child does before exec; close() once
    the agent's tree is dead."""

    def __init__(self, prepared, run_id):
        self.prepared = prepared
        self.run_id = run_id
        self.lsm = None                  # guards.lsm.LsmGuard
        self.egress = None               # guards.egress.Egress
        self.limits = None               # sandbox.limits.Limits
        self.netns = None                # sandbox.netns.RunNetwork: the run's network namespace + relay
        self.guard = None                # guards.guard.RunSession: the run's share of the egress guard
        self.guard_counters = None       # its counters, once closed
        self._guard_service = None
        self._flows = collections.deque()    # guard records, appended on the guard's thread
        self.ctx = None                  # engine.RunContext, and the judge refusals go to (setup)
        self.judge = None
        self._lsm_waiting = []           # BPF LSM denials whose file has no path yet
        self._lsm_opened = {}            # pid -> its last files opened (BPF LSM path only)
        self.services = {}               # RunService -> its ServiceRun (run/services.py)
        self.service_counters = {}       # service name -> its counters, once closed

    def guards(self):
        return [g for g in (self.lsm, self.egress) if g is not None]

    def counters(self):
        out = {g.enforcement: g.counters() for g in self.guards()}
        out.update(self.service_counters)
        if self.guard is not None or self.guard_counters is not None:
            out["egress-guard"] = dict(self.guard.counters if self.guard else self.guard_counters)
        return out

    # -- the parent's side ------------------------------------------------------------
    def setup(self, cgroup, identity, ctx, judge, take_guard=None, egress_guard=None, emit=None):
        """Limits and cgroup BPF on the run's cgroup, before the agent
        exists; notes what applied in identity["enforcement"]. Refusals go to
        judge (ctx: whose processes). take_guard(cls, *policy): a released
        guard of a shared monitor, or None. egress_guard(): the monitor's
        EgressGuard (the plan's guard needs it); emit(event): the run's
        own events (the guard's flows) go there, to be logged and judged."""
        self.ctx, self.judge, self.emit = ctx, judge, emit
        plan = self.prepared.plan
        self._setup_limits(cgroup, identity["enforcement"])
        if not plan:
            return

        def guard(cls, *policy):
            reused = take_guard(cls, *policy) if take_guard else None
            return cls(*policy) if reused is None else reused
        if plan.lsm is not None:
            from ..guards.lsm import LsmGuard
            try:
                self.lsm = guard(LsmGuard, plan.lsm.exec_allow, plan.lsm.file_deny, None,
                                 plan.lsm.signals, plan.lsm.unix).open(cgroup.path, self.on_lsm_denial)
            except AgentwatchError as e:
                raise LaunchError(f"agent not started: loading the BPF LSM layer failed: {e} "
                                  "(agentwatch run --bpf-lsm off uses Landlock, seccomp and "
                                  "cgroup BPF alone)") from None
        if plan.egress is not None:
            from ..guards.egress import Egress
            rules = plan.egress
            if plan.guard is not None:
                rules = self._open_guard(egress_guard, plan, rules)
            self.egress = guard(Egress, rules).open(cgroup.path, self.on_egress_denial)
            if self.guard is not None:
                self.guard.flow_of = self.egress.flow_of
                identity["enforcement"]["egress_guard"] = dict(
                    identity["enforcement"].get("egress_guard") or {},
                    ports=dataclasses.asdict(self.guard.ports), pins=self.prepared.pins or {})
            if self.egress.unix_hooks is False and not (plan.lsm and plan.lsm.unix):
                identity["enforcement"]["notes"].append(
                    "network.unix: this kernel has no cgroup unix socket hooks (Linux 6.7+): "
                    "connections to pathname unix sockets are judged, not denied")
        if "net" in plan.namespaces:
            from ..sandbox.netns import RunNetwork
            run_as = self.prepared.run_as
            try:
                self.netns = RunNetwork(plan.relay, uid=run_as.uid if run_as else None,
                                        run_id=self.run_id).open()
            except AgentwatchError as e:
                raise LaunchError(f"agent not started: {e}") from None

    def _setup_limits(self, cgroup, record):
        """The plan's resource limits and the run's weight (a run option:
        with or without a policy) on the run's cgroups; how each applied
        goes into record (the identity's enforcement)."""
        from ..sandbox.limits import CONTROLLER, Limits
        plan, weight = self.prepared.plan, self.prepared.opts.weight
        limits = dict(plan.limits) if plan else {}
        if weight is not None:
            limits["weight"] = weight
            record["weight"] = weight
        if not limits:
            return
        self.limits = Limits(self.run_id, cgroup.path, **limits)
        self.limits.setup()
        record["limits_applied"] = self.limits.applied
        if self.limits.missing:
            missing = sorted({CONTROLLER.get(n, n) for n in self.limits.missing})
            record.setdefault("downgrades", []).append(
                f"resources: no {', '.join(missing)} controller"
                + (" (the run's weight is not applied)" if "weight" in self.limits.missing else ""))

    def _open_guard(self, egress_guard, plan, rules):
        """The run's session of the egress guard; the egress rules with its ports."""
        from ..guards.guard import name_rules
        if egress_guard is None:
            raise LaunchError("agent not started: the policy's egress guard needs a monitor "
                              "that runs one")
        self._guard_service = egress_guard()
        try:
            self.guard = self._guard_service.open_run(self.run_id, self.prepared.agent,
                                                      name_rules(plan.guard), self.prepared.pins,
                                                      self._flows.append)
        except OSError as e:
            raise LaunchError(f"agent not started: the egress guard could not listen on "
                              f"loopback: {e}") from None
        return dataclasses.replace(rules, guard=self.guard.ports)

    # -- the monitor's services (run/services.py) --------------------------------------
    def open_services(self, services, cgroup, prompt=None, action_for=None, policy=None, spawn=None,
                      subscribe=None, check_read=None):
        """Each service's share of this run; the environment variables they
        add for the agent."""
        from .services import ServiceRun
        env = {}
        for svc in services:
            sr = ServiceRun(run_id=self.run_id, agent=self.prepared.agent, cgroup=cgroup,
                            options=self.prepared.opts, prompt=prompt,
                            prompt_digest=self.prepared.prompt_digest, action_for=action_for,
                            policy=policy, policy_digest=self.prepared.policy.digest
                            if self.prepared.policy else None, spawn=spawn, subscribe=subscribe,
                            check_read=check_read)
            env.update(svc.open_run(sr) or {})
            self.services[svc] = sr
        return env

    def report_service_records(self, runs=None):
        """What the services emitted for this run, as its events."""
        for sr in self.services.values() if runs is None else runs:
            while sr.records:
                rec = sr.records.popleft()
                cls = _SERVICE_EVENTS.get(rec.get("kind"))
                if cls is None or not self.emit:
                    continue
                fields = {k: v for k, v in rec.items() if k in cls.__dataclass_fields__
                          and k not in ("kind", "run_id", "agent")}
                fields.setdefault("ts", round(time.time(), 6))
                fields.setdefault("pid", 0)
                self.emit(cls(run_id=self.run_id, agent=self.prepared.agent, **fields))

    def end_services(self):
        """The agent has ended: close each service's share (idempotent)."""
        services, self.services = self.services, {}
        for svc, sr in services.items():
            try:
                counters = svc.close_run(self.run_id)
            except Exception as e:        # a service's bug must not lose the run's end
                counters = {"error": f"{type(e).__name__}: {e}"}
            self.report_service_records([sr])      # the records of its last calls
            if counters:
                self.service_counters[svc.name] = counters

    def end_guard(self):
        """Close the run's egress guard session (its flows end) and report
        what it recorded. Idempotent."""
        if self.guard is not None:
            self.guard_counters = self._guard_service.close_run(self.guard)
            self.guard = None
        self.report_flows()

    def join(self, pid):
        """Put the agent (before exec) under the run's limits."""
        if self.limits:
            self.limits.add(pid)

    def close(self, give_back=None):
        """Once the agent's tree is dead: the network namespace, the guards
        (give_back(guard): to a shared monitor for the next run, else
        closed), the limits."""
        if self.netns is not None:
            self.netns.close()
        self.end_guard()
        self.end_services()
        for g in self.guards():
            if give_back is None:
                g.close()
            else:
                give_back(g)
        if self.limits:
            self.limits.remove()

    # -- the child's side -------------------------------------------------------------
    def child_steps(self):
        """(step, callable) run by the child between fork and exec, in order.
        Mounts need CAP_SYS_ADMIN and Landlock opens its rule paths as root,
        so both come before the switch to process.run_as; the bounding set
        needs CAP_SETPCAP, so it is emptied before the switch; the switch
        comes before seccomp, which refuses the set*id family. Without
        run_as the agent keeps agentwatch's ids, and drops every capability
        when a sandbox layer set no_new_privs (unchanged since before run_as)."""
        from ..sandbox import credentials, landlock, mounts, namespaces, seccomp_filter
        plan, creds = self.prepared.plan, self.prepared.run_as
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
            parent = 0 if self.prepared.pid_ns else os.getpid()   # pid 1's parent is outside its namespace
            steps += [("set no_new_privs", credentials.set_no_new_privs),
                      ("drop capabilities from the bounding set",
                       lambda: credentials.drop_bounding_set(last_cap)),
                      (f"switch to {creds.describe()}", lambda: credentials.switch(creds)),
                      ("set parent-death signal again", lambda: launcher.pdeath_signal(parent)),
                      ("drop capabilities", credentials.clear_capabilities)]
            for what, path, mode in self.dirs_for(creds):
                steps.append((f"check {what} is usable by uid {creds.uid}",
                              lambda w=what, p=path, m=mode: credentials.check_usable(p, m, w, creds)))
        if plan and plan.seccomp:
            steps.append(("load seccomp filter", lambda: seccomp_filter.apply(plan.seccomp)))
        nnp = self.prepared.no_new_privs
        if creds is None and nnp:
            steps.append(("drop capabilities", lambda: credentials.drop_capabilities(last_cap)))
        if nnp:
            steps.append(("verify credentials and capabilities", lambda: credentials.verify(creds)))
        return steps

    def dirs_for(self, creds):
        """(what, dir, access mode) the run_as user needs: the workspace and
        TMPDIR, readable and searchable, and writable where the policy lets
        the agent write there (no filesystem.write list: everywhere)."""
        out = []
        compiled = self.prepared.compiled
        for name in ("WORKSPACE", "TMPDIR"):
            path = self.prepared.variables[name]
            if name == "TMPDIR" and not os.path.isdir(path):
                continue
            mode = os.R_OK | os.X_OK
            probe = os.path.join(path, ".agentwatch-probe")
            if compiled is None or compiled.check_file(probe, {"write"}) is None:
                mode |= os.W_OK
            elif name == "TMPDIR" and compiled.check_file(probe, {"read"}) is not None:
                continue               # neither readable nor writable: nothing to check
            out.append(("workspace" if name == "WORKSPACE" else "TMPDIR", path, mode))
        return out

    def seccomp_rules(self):
        """The run's filter rules, for the judge to tell a by-argument refusal
        from an ordinary EPERM (None: no filter)."""
        plan = self.prepared.plan
        if plan is None or plan.seccomp is None:
            return None
        from ..sandbox.seccomp_filter import plan as filter_plan
        return list(filter_plan(plan.seccomp))

    # -- refusals into events -----------------------------------------------------------
    def poll(self):
        """Read the guards' refusals and the egress guard's flows; report the
        BPF LSM ones named since."""
        for g in self.guards():
            g.poll(0)
        if self._flows:
            self.report_flows()
        if self.services:
            self.report_service_records()
        if self._lsm_waiting:
            self.report_lsm_denials()

    def note_open(self, ev):
        """An event of the run: a file it opened may name a later BPF LSM
        refusal (by inode and basename): LD_PRELOAD and dlopen name the
        library nowhere else."""
        if self.lsm is None or ev.kind != "file" or ev.op != "open" or ev.ret < 0 or not ev.abspath:
            return
        recent = self._lsm_opened.get(ev.pid)
        if recent is None:
            if len(self._lsm_opened) >= LSM_OPENED_PIDS:      # the oldest process first
                del self._lsm_opened[next(iter(self._lsm_opened))]
            recent = self._lsm_opened[ev.pid] = collections.deque(maxlen=LSM_RECENT_OPENS)
        recent.append(ev.abspath)

    def _event(self, cls, d, **fields):
        proc = self.ctx.procs.get(d["pid"])
        return cls(**fields, ts=round(time.time(), 6), run_id=self.run_id, agent=self.prepared.agent,
                   pid=d["pid"], tid=d.get("tid", d["pid"]), ppid=proc.ppid if proc else 0,
                   uid=d.get("uid", 0), comm=d.get("comm", ""), ret=-1, error="EPERM")

    def on_egress_denial(self, d):
        """A refusal by the cgroup BPF egress guard (guards/egress.py)."""
        if d.get("family") == "unix":
            return    # counted; the syscall sensor reports it with the socket's name (EPERM)
        rule = EGRESS_RULES.get(d.get("rule"), "network.egress")
        ev = self._event(NetEvent, d, op=d.get("op"), family=d.get("family"), addr=d.get("addr"),
                         port=d.get("port"))
        target = d.get("addr") if d.get("port") is None else f"{d.get('addr')}:{d.get('port')}"
        if self.judge:
            self.judge.kernel_denial(ev, "network", rule, f"cgroup BPF: {d.get('rule')}", target,
                                     {"op": d.get("op"), "family": d.get("family"),
                                      "addr": d.get("addr"), "port": d.get("port"),
                                      "proto": d.get("proto")})

    def report_flows(self):
        """The egress guard's records since the last call, as flow events of
        the run (its judge makes a network.domain violation of a refusal)."""
        while self._flows:
            rec = self._flows.popleft()
            # a DNS datagram names no process: the run is known by the
            # responder port the kernel sent it to, the sender is pid 0
            pid = rec.get("pid") or 0
            proc = self.ctx.procs.get(pid) if self.ctx else None
            ev = FlowEvent(ts=round(rec.get("ts") or time.time(), 6), run_id=self.run_id,
                           agent=self.prepared.agent, pid=pid, tid=rec.get("tid", pid),
                           ppid=proc.ppid if proc else 0, uid=rec.get("uid", 0),
                           comm=rec.get("comm") or "",
                           exe=proc.exe if proc else None,
                           **{k: rec.get(k) for k in ("proto", "name", "source", "family", "addr",
                                                      "port", "decision", "reason", "rule",
                                                      "pattern", "upstream", "dns", "qtype",
                                                      "addresses", "duration")},
                           bytes_out=rec.get("bytes_out", 0), bytes_in=rec.get("bytes_in", 0))
            if ev.proto == "dns":
                ev.source = "question"
            if self.emit:
                self.emit(ev)

    def on_lsm_denial(self, d):
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
        self.report_lsm_denials()

    def report_lsm_denials(self, final=False):
        """Report the BPF LSM refusals whose file is named now (final: all)."""
        waiting, self._lsm_waiting = self._lsm_waiting, []
        for d in waiting:
            proc = self.ctx.procs.get(d["pid"])
            path = (d.get("path") or fd_with_inode(d["pid"], d.get("ino"))
                    or named_by(proc, d.get("name"), d.get("ino"), self._lsm_opened.get(d["pid"])))
            if not path and not final and time.monotonic() < d["_until"]:
                self._lsm_waiting.append(d)
                continue
            path = path or d.get("name") or ""
            op = "exec" if d["op"] in ("exec", "mmap", "mprotect") else "open"
            ev = self._event(FileEvent, d, op=op, path=path,
                             abspath=path if path.startswith("/") else None)
            rule = "filesystem.deny" if d["rule"] == "file-denied" else "filesystem.exec"
            if self.judge:
                self.judge.kernel_denial(
                    ev, "filesystem", rule, f"BPF LSM {d['hook']}: {d['rule']}", path,
                    {"op": d["op"], "hook": d["hook"], "path": path, "ino": d.get("ino"),
                     "dev": d.get("dev")}, layer="bpf-lsm")


_SERVICE_EVENTS = {"llm": LlmEvent, "msg": MsgEvent}    # the kinds services emit (run/services.py)


def named_by(proc, name, ino, opened=()):
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
