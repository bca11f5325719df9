"""Rules: one event (and what the judge resolved about it) + the run's
compiled policy -> a Finding (the decision, its target and evidence), or
None when the policy has nothing to say.

Pure: no /proc, no file system, no clock. What needs the kernel's word (a
path's symlinks, a signal's target process, a cgroup counter) is resolved by
engine/judge.py and passed in; what follows from a Finding (dedup, repeats,
kill requests) is engine/reporter.py's.
"""
import os
import re
from typing import NamedTuple

from ..policy.compile import Decision
from ..policy.matchers import canonical_ip
from ..policy.model import CATEGORY_SECTION
from ..sensors.records import PREFIX_LEN
from .refusals import DENIED, rule_for

RULE_DOMAIN = "network.domain"   # the egress guard refused a flow (guards/guard.py RULE)

# connects that reached no one: probing, not egress (glibc's NSS tries nscd)
_UNIX_NOBODY = ("ENOENT", "ECONNREFUSED")
# /proc/<pid>/<entry> that the kernel guards with a ptrace access check:
# reading them for a process outside the run is ptrace-class access
_PTRACE_ENTRIES = frozenset(("environ", "mem", "maps", "smaps", "smaps_rollup", "numa_maps",
                             "pagemap", "auxv", "fd", "fdinfo", "map_files", "root", "cwd",
                             "exe", "stack", "syscall", "io", "personality", "ns"))
_PROC_PID = re.compile(r"^/proc/(\d+)/(?:task/\d+/)?([^/]+)")
MAPEXEC_KILLED = ("killed at the mmap(PROT_EXEC) of the file (bpf_send_signal SIGKILL): "
                  "none of its code ran")
MAPEXEC_SEEN = ("not refused: mapped PROT_EXEC (Landlock's exec right covers execve only and "
                "no BPF LSM hook loads here); seen by the kernel at the mmap")

# file op -> the access it needs on path (and on path2)
_FILE_ACCESS = {
    "unlink": ({"delete"}, None), "rmdir": ({"delete"}, None),
    "rename": ({"rename"}, {"create"}), "mkdir": ({"mkdir"}, None),
    "chmod": ({"chmod"}, None), "chown": ({"chown"}, None),
    "truncate": ({"truncate"}, None), "link": ({"link"}, {"link"}),
    "symlink": ({"create"}, None), "mknod": ({"create"}, None),
}
FOLLOWING_OPS = frozenset(("open", "chmod", "chown", "truncate"))   # act on a link's target
FORKS = frozenset(("clone", "clone3", "fork", "vfork"))
CATEGORY_OF = {section: category for category, section in CATEGORY_SECTION.items()}


class Finding(NamedTuple):
    decision: Decision
    target: str
    evidence: dict


def _decision(policy, category, rule, reason, action=None):
    """A decision with no pattern, its action the policy's for rule unless given."""
    return Decision(category=category, rule=rule, pattern=None, reason=reason,
                    action=action or policy.action_for(category, rule))


def _toggle_off(policy, toggle):
    proc = getattr(policy.spec, "process", None)
    return proc is not None and proc.toggles.get(toggle) is False


# -- filesystem ----------------------------------------------------------------------------
def file_targets(ev):
    """[(path, access)] a file event touches, or None for an op not judged."""
    if ev.op == "open":
        return [(ev.abspath, set(ev.access) - {"path"})]
    if ev.op in _FILE_ACCESS:
        a1, a2 = _FILE_ACCESS[ev.op]
        targets = [(ev.abspath, a1)]
        if a2 and ev.path2:
            targets.append((ev.path2, a2))
        return targets
    return None


def other_process(policy, ev, path, procs, pid_ns=False):
    """/proc/<pid>/environ, mem, fd/, root/... of a process outside the run
    (agentwatch itself, the host): judged as ptrace when the policy forbids
    ptrace. A run with its own PID namespace sees only its own processes."""
    m = _PROC_PID.match(path)
    if not m or m.group(2) not in _PTRACE_ENTRIES or int(m.group(1)) in procs or pid_ns:
        return None
    if not _toggle_off(policy, "ptrace"):
        return None
    d = _decision(policy, "process", "process.ptrace",
                  f"{m.group(2)} of process {m.group(1)}, which is not part of the run: "
                  "process.ptrace is false")
    return Finding(d, path, {"path": path, "named": ev.path, "target_pid": int(m.group(1)),
                             "op": ev.op})


def unexplained(policy, refusals, ev, path, access, layer, named=None):
    """The kernel refused a file operation the policy allows: a finding when
    a layer of the sandbox did (a right Landlock cannot grant, a mask, a
    pin), with the rule behind that layer's rule; the kernel's own checks
    (a file's mode, a host read-only mount: layer "dac") are not the
    sandbox's and are not violations."""
    if layer == "mount":
        rule, why = refusals.mask_rule(path, "exec" in access)
    elif layer == "landlock":
        rule = rule_for(access, ev.op)
        why = (f"{ev.op} of {path}: the run's Landlock rules do not grant it "
               + ("(device nodes are never granted)" if ev.op == "mknod" else
                  "(the policy's patterns reach further than the kernel's rules)"))
    elif layer == "bpf-lsm":
        rule, why = rule_for(access, ev.op), f"{ev.op} of {path}: refused by the BPF LSM"
    else:
        return None
    d = _decision(policy, CATEGORY_OF[rule.split(".", 1)[0]], rule, why)
    return Finding(d, path, {"path": path, "named": named or getattr(ev, "path", None),
                             "access": sorted(access), "op": getattr(ev, "op", "exec"),
                             "layer": layer})


def fd_exec(policy, ev, exe):
    """A refused fexecve/execveat(AT_EMPTY_PATH), or one of a file with no
    path (a memfd, a deleted file): outside every exec allow list."""
    what = exe or "an open file descriptor"
    d = _decision(policy, "filesystem", "filesystem.exec",
                  f"exec of {what} (fexecve/execveat AT_EMPTY_PATH): no path in filesystem.exec")
    return Finding(d, f"fd:{what}", {"path": exe, "argv": ev.argv, "fd_exec": True})


def map_exec_sees(roots, named):
    """Whether bpf/mapexec.bpf.c reports (or kills at) a mapping of a file
    the loader opens as `named`: an absolute, lexically clean path (it fits
    a key) outside every exec root (roots None: the program is not loaded)."""
    if roots is None or not named or not named.startswith("/") or len(named) >= PREFIX_LEN:
        return False
    if named != os.path.normpath(named) or named.startswith("//"):
        return False
    return not any(named.startswith(r) for r in roots)


def mapping(policy, ev, real, kill):
    """The kernel saw (kill: and killed the process at) an mmap(PROT_EXEC)
    of a file opened outside the exec roots; real: the path resolved."""
    action = "kill" if kill else None
    d = _decision(policy, "filesystem", "filesystem.exec",
                  f"executable mapping of {ev.abspath}: outside filesystem.exec and "
                  "the library directories", action)
    return Finding(d, real, {"path": real, "named": ev.path, "op": "mmap", "prot": ev.flags,
                             "kernel": MAPEXEC_KILLED if kill else MAPEXEC_SEEN})


# -- network -------------------------------------------------------------------------------
def network(policy, refusals, ev, egress_enforced=False, lsm_enforced=False, guarded=False,
            service_ports=frozenset()):
    """A socket, connect, bind or send against the network section.
    guarded: the egress guard is on, so an inet connect or send the kernel
    let through was allowed by a rule or handed to the guard, which judges
    the flow itself (guard_flow); it is not judged by address here.
    service_ports: agentwatch's own loopback services (the LLM gateway),
    which every run may connect to."""
    if ev.op == "socket":
        # judged here even when refused: a capability check or the cgroup
        # BPF program may have said no (kernel_denial leaves raw sockets and
        # families to us); a family seccomp refused has no event here (seccomp_refusal)
        d = policy.check_socket(ev.family, ev.sock_type, ev.protocol)
        evidence = {"family": ev.family, "type": ev.sock_type}
        target = f"{ev.family}/{ev.sock_type}"
        if ev.family == "netlink":
            evidence["protocol"] = ev.protocol
            target += f"/{ev.protocol}"
        if ev.error in DENIED:
            evidence["layer"] = "cgroup-bpf" if egress_enforced and ev.error == "EPERM" \
                else "dac"    # a raw socket without CAP_NET_RAW
        return Finding(d, target, evidence) if d else None
    if egress_enforced and ev.error == "EPERM" and ev.family in ("inet", "inet6"):
        return None           # the cgroup BPF programs report it themselves
    if guarded and ev.family in ("inet", "inet6") and ev.op != "bind" and ev.error not in DENIED:
        return None           # allowed, or the guard's to judge
    if ev.family not in ("inet", "inet6", "unix") or ev.addr is None:
        return None
    if (ev.op == "connect" and ev.port in service_ports and ev.family != "unix"
            and _is_loopback(ev.addr)):
        return None
    if ev.family == "unix" and ev.error in _UNIX_NOBODY:
        return None
    addr = ev.addr
    if ev.family == "unix" and not addr and ev.op != "bind":
        # a connect or send names a socket; an empty name means the sensor
        # did not capture it (short sockaddr lengths), not that none was given
        addr = "<name not captured>"
    protocol = "tcp" if ev.op == "connect" else "udp" if ev.op in ("sendto", "sendmsg") else "any"
    d = policy.check_connect(ev.family, addr, ev.port, protocol, ev.op)
    if d is None:
        return None
    target = addr if ev.port is None else f"{addr}:{ev.port}/{protocol}"
    evidence = {"op": ev.op, "family": ev.family, "addr": addr, "port": ev.port,
                "protocol": protocol}
    if ev.error in DENIED:
        evidence["layer"] = refusals.net_layer(ev.error, ev.family, addr, egress_enforced,
                                               lsm_enforced)
    return Finding(d, target, evidence)


def guard_flow(policy, ev):
    """A flow the egress guard refused (FlowEvent, decision deny): the
    violation, worded as the guard decided it. The guard did refuse it, so
    the action is deny whatever the policy's on_violation says, except kill,
    which the reporter carries out."""
    if ev.decision != "deny":
        return None
    rule = ev.rule or RULE_DOMAIN       # network.loopback for an unnamed flow to this host
    action = policy.action_for("network", rule)
    d = Decision(category="network", rule=rule, action="kill" if action == "kill" else "deny",
                 reason=ev.reason or "refused by the egress guard", pattern=None)
    if ev.proto != "tcp":
        target = f"{ev.name} {ev.qtype}"
    else:
        target = f"{ev.name} at {ev.addr}:{ev.port}" if ev.name else f"{ev.addr}:{ev.port}"
    evidence = {"proto": ev.proto, "name": ev.name, "source": ev.source, "addr": ev.addr,
                "port": ev.port, "family": ev.family, "dns": ev.dns, "qtype": ev.qtype,
                "layer": "egress-guard",
                "kernel": ("redirected to the egress guard (cgroup BPF), refused there" if ev.proto == "tcp"
                           else "sent to the egress guard's DNS responder (cgroup BPF), answered NXDOMAIN")}
    return Finding(d, target, {k: v for k, v in evidence.items() if v is not None})


def _service_finding(policy, f, default_rule, default_reason, target, evidence, keep_out=()):
    """A service's finding (an event's `finding`: category, rule, reason and
    its detail) as the violation, its action the policy's for the rule."""
    rule = f.get("rule") or default_rule
    d = Decision(category=f.get("category"), rule=rule, action=policy.action_for(f.get("category"), rule),
                 reason=f.get("reason") or default_reason, pattern=None)
    skip = ("category", "rule", "reason", *keep_out)
    evidence = {**evidence, **{k: v for k, v in f.items() if k not in skip}}
    return Finding(d, target, {k: v for k, v in evidence.items() if v is not None})


def llm_call(policy, ev):
    """What the LLM gateway found wrong with a call (LlmEvent.finding: a
    system prompt that is not the run's signed one, an exhausted budget):
    the violation, its action the policy's for the rule. The gateway has
    already refused the call where it said so (detail.refused)."""
    f = ev.finding
    if not f:
        return None
    refused = bool(f.get("refused"))
    evidence = {"layer": "llm-gateway", "api": ev.api, "path": ev.path, "model": ev.model,
                "status": ev.status, "refused": refused,
                "kernel": (f"refused by the LLM gateway (HTTP {ev.status})" if refused
                           else "passed on by the LLM gateway")}
    return _service_finding(policy, f, f"{f.get('category')}.llm", "the LLM gateway refused the call",
                            f"{ev.api} {ev.path} {ev.model}", evidence, keep_out=("refused",))


def broker_call(policy, ev):
    """What the agent-to-agent broker refused (MsgEvent.finding: a message
    to or from an agent the policies do not allow, a sender claim that is
    not the kernel's, changed facts, a refused scope token, a flood): the
    violation, its action the policy's for the rule. The broker has already
    refused the request."""
    f = ev.finding
    if not f:
        return None
    evidence = {"layer": "broker", "method": ev.method, "op": ev.op, "peer": ev.peer,
                "message_id": ev.message_id, "task_id": ev.task_id, "token": ev.token, "tool": ev.tool,
                "kernel": "sender named by the kernel (socket peer -> cgroup -> run); refused by the broker"}
    target = " ".join(str(x) for x in (ev.method, ev.peer or ev.tool) if x)
    return _service_finding(policy, f, f"{f.get('category')}.peer", "the broker refused the request",
                            target, evidence)


def _is_loopback(addr):
    ip = canonical_ip(addr)
    return ip is not None and ip.is_loopback


# -- process -------------------------------------------------------------------------------
def signal(policy, ev, what, pid):
    """A signal to `what` (pid: its process, None for a group or kill -1),
    a target outside the run."""
    d = policy.check_signal(what)
    if d is None:
        return None
    evidence = {"op": ev.op, "target": what, "target_pid": pid, "signal": ev.signal,
                "signal_name": ev.signal_name}
    if ev.target_tid is not None:
        evidence["target_tid"] = ev.target_tid
    if ev.pidfd is not None:
        evidence["pidfd"] = ev.pidfd
    if ev.ret == 0 and pid is None:
        # kill(0) / kill(-pgid) / kill(-1) succeed when any one process got it
        evidence["kernel"] = "delivered to at least one process of the target set"
    return Finding(d, f"{what} {ev.signal_name}", evidence)


def max_processes(policy, procs):
    """process.max_processes against the run's live processes."""
    limit = getattr(getattr(policy.spec, "process", None), "max_processes", None)
    if not limit:
        return None
    alive = sum(1 for p in procs.values() if not p.exited)
    if alive <= limit:
        return None
    d = _decision(policy, "process", "process.max_processes",
                  f"{alive} processes alive, the policy allows {limit}")
    return Finding(d, "max_processes", {"alive": alive, "limit": limit})


# -- syscalls ------------------------------------------------------------------------------
def seccomp_refusal(policy, ev, denied=None, rules=None):
    """A syscall the seccomp filter refused with EPERM before its entry
    tracepoint (its arguments only as read from the registers at exit, where
    the kernel allows it). Judged by name like any sensitive syscall; one
    the policy names nowhere (the filter's always-denied list, the mount
    family) is syscalls.deny, or the toggle it belongs to. The kernel
    refused it, so the action is deny unless the rule says kill (then the
    agent is stopped as the policy asks). denied: the names this run's
    filter refuses (None: all); rules: the filter's rules, against which
    the arguments are checked (None: not checked)."""
    from ..sandbox.seccomp_filter import BY_ARGUMENT, CONDITIONAL, toggle_of
    if denied is not None and ev.name not in denied:
        return None   # a shared monitor watches it for another run's filter: not ours
    evidence = {"syscall": ev.name, "args": ev.args[:3] or None,
                "kernel": f"denied ({ev.error}, seccomp)", "layer": "seccomp"}
    hit = None
    if ev.args and rules is not None and ev.name in CONDITIONAL:
        # the arguments, read from the registers at exit: which rule refused it,
        # or none (an ordinary EPERM of a call the filter let through)
        hit = next((r for r in rules if r.syscall == ev.name and r.action == "errno"
                    and all(c.matches(ev.args) for c in r.conds)), None)
        if hit is None:
            return None
        evidence["refused"] = hit.why
    d = policy.check_syscall(ev.name)
    if d is None and hit is not None and hit.group and _toggle_off(policy, hit.group):
        # refused for its arguments under a process toggle (clone with CLONE_NEW*)
        rule = f"process.{hit.group}"
        d = _decision(policy, "process", rule, f"{ev.name}: {hit.why}: {rule} is false")
    if d is None and ev.name in BY_ARGUMENT:
        # refused for its arguments (a socket family, a terminal ioctl), which
        # the filter compared and nobody else saw: the rule says which kind
        rule, why = BY_ARGUMENT[ev.name]
        d = _decision(policy, CATEGORY_OF[rule.split(".", 1)[0]], rule, f"{ev.name}: {why}")
    if d is None:
        toggle = toggle_of(ev.name)
        proc = getattr(policy.spec, "process", None)
        if toggle and (proc is None or proc.toggles.get(toggle) is not False):
            toggle = None
        rule = f"process.{toggle}" if toggle else "syscalls.deny"
        why = (f"{ev.name}: process.{toggle} is false" if toggle else
               f"{ev.name} is always denied by the sandbox's seccomp filter")
        d = Decision(category="process" if toggle else "syscall", rule=rule, action="deny",
                     reason=why, pattern=None)
    if d.action != "kill":
        d = Decision(category=d.category, rule=d.rule, action="deny", reason=d.reason,
                     pattern=d.pattern)
    return Finding(d, ev.name, evidence)


def seccomp_kill(policy, ev):
    """SIGSYS as a fatal signal: seccomp killed the process (a syscall of
    another ABI, x32 or i386, or a kill-action rule). The call never
    reached a tracepoint, so its exit is the only trace."""
    d = _decision(policy, "syscall", "syscalls.deny",
                  "killed by seccomp (SIGSYS): a syscall of a non-native ABI "
                  "(x32, i386) or one the filter kills")
    return Finding(d, f"sigsys:{ev.pid}", {"signal": ev.signal, "kernel": "killed (seccomp)",
                                           "layer": "seccomp"})


def refused_call(policy, refusals, ev):
    """A call with no record of its own that a layer other than seccomp
    refused (bpf/syscalls.bpf.c aw_refused): a fork at the pids limit, a
    device ioctl Landlock refuses. A finding where the run's plan explains
    it (else the errno is the kernel's own: EAGAIN of memory, a driver's
    EACCES)."""
    if ev.name in FORKS and ev.error == "EAGAIN":
        if not refusals.pids:
            return None
        rule = "resources.pids"
        d = _decision(policy, "resource", rule, f"{ev.name}: the run's pids limit (pids.max) is reached")
        return Finding(d, rule, {"syscall": ev.name, "args": ev.args[:1], "layer": "pids",
                                 "kernel": "denied (EAGAIN, pids limit)"})
    if ev.name == "ioctl" and ev.error == "EACCES":
        from ..sandbox.landlock import FS_IOCTL_DEV
        ll = refusals.landlock
        if ll is None or not ll.handled_fs & FS_IOCTL_DEV:
            return None
        fd = ev.args[0] & 0xFFFFFFFF if ev.args else None
        path = ev.path or f"fd:{fd}"
        # deny, never the rule's kill: the policy names no device ioctls, and
        # programs probe their stdio with them (isatty on /dev/null)
        d = _decision(policy, "filesystem", "filesystem.write",
                      f"ioctl on {path}: Landlock grants device ioctls (IOCTL_DEV) only on "
                      "the agent's terminal", "deny")
        return Finding(d, f"ioctl:{path}", {"syscall": "ioctl", "path": path, "fd": fd,
                                            "request": hex(ev.args[1] & 0xFFFFFFFF) if ev.args else None,
                                            "layer": "landlock", "kernel": "denied (EACCES)"})
    return None


# -- resources -----------------------------------------------------------------------------
def limit_counter(policy, rule, counter, key, n, new):
    """A rise of `new` in a cgroup counter (pids.events max, memory.events
    oom_kill) to n: the kernel refused forks or OOM-killed."""
    pids = rule == "resources.pids"
    what = (f"the pids limit refused {new} fork(s)" if pids
            else f"the memory limit OOM-killed {new} process(es)")
    d = _decision(policy, "resource", rule, what)
    return Finding(d, rule, {"counter": os.path.basename(counter), key: n,
                             "kernel": "denied (pids limit)" if pids else "OOM-killed (memory limit)",
                             "layer": "pids" if pids else "memory"})
