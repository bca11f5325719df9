"""EnforcementPlan: what the kernel will hold for one run, from its policy.

The plan is computed in the parent (before fork) and recorded in the run's
identity: which layer enforces which section, and every rule this kernel
cannot enforce (a *downgrade*). A policy section whose action is `deny` or
`kill` is enforced in the kernel; `alert` sections are only judged by the
engine. The child applies the plan in this order, each step named:
close inherited fds, mask denied paths (mount namespace), Landlock, the
switch to process.run_as (sandbox/credentials.py), seccomp, the capability
drop and its check (run/enforcement.py, Enforcement.child_steps, has the full list).

One module (~550 lines) on purpose: it is the single place that turns a
policy into what the kernel is given, so that every widening (RUNTIME_READ,
runtime_grants) and every downgrade is decided, and recorded, in one file;
the layers themselves live in landlock.py, seccomp_filter.py, mounts.py, ....
"""
import concurrent.futures
import ipaddress
import os
import socket
from dataclasses import dataclass, field

from . import devices, landlock, mounts, namespaces as ns
from .seccomp_filter import SeccompPolicy
from ..policy.matchers import Glob, expand, has_wildcards

ENFORCING = ("deny", "kill")
# What an agent needs to run at all, beyond the policy's own lists, and why.
# Each grant is recorded in the plan (EnforcementPlan.widened: `policy
# explain` and the run identity list it) and dropped where the policy's
# filesystem.deny names it. The agent's terminal is added as the device it
# is (the pty of its stdin, stdout or stderr), never all of /dev/pts.
RUNTIME_READ = {
    "/dev/null": "the empty file every program opens",
    "/dev/zero": "zero pages (allocators, dd)",
    "/dev/urandom": "randomness (TLS, hash seeds)",
    "/dev/random": "randomness (TLS, hash seeds)",
    "/dev/tty": "the agent's controlling terminal, for prompts",
    "/proc": "the run's own procfs (its PID namespace: only the run's processes)",
    "/etc/ld.so.cache": "the dynamic loader's index of libraries",
}
RUNTIME_WRITE = {
    "/dev/null": "the empty file every program opens",
    "/dev/tty": "the agent's controlling terminal, for prompts",
}
# why the host's /proc is granted when the run shares the host's PID namespace
HOST_PROC_WHY = ("the host's /proc (process.host_namespaces shares the PID namespace: every host "
                 "process is listed, and readable where its owner allows)")
PROC_NET_NOTE = ("the run shares the host's network namespace: /proc/net and /proc/<pid>/net list "
                 "every socket of the host (reads outside the policy are reported)")
# where the dynamic loader finds shared libraries: their mappings are
# executable, so the BPF LSM exec allow list must cover them
LANDLOCK_PORTS_MAX = 4096   # beyond this many allowed TCP ports, cgroup BPF alone holds them
RUNTIME_LIBS = ["/usr/lib", "/lib", "/usr/lib64", "/lib64", "/usr/local/lib"]
PATH_FALLBACK = "landlock+seccomp+cgroup-bpf"
PATH_BPF_LSM = "bpf-lsm+" + PATH_FALLBACK


@dataclass
class LsmRules:
    """What the BPF LSM layer (guards/lsm.py) holds on top of Landlock:
    exec and executable mappings only of files below exec_allow (by inode,
    so copies, renames and the dynamic loader cannot widen it; None: rule
    off), and no open of the files below file_deny under any name."""
    exec_allow: list = None
    file_deny: list = field(default_factory=list)
    signals: bool = False      # signals only within the run (Landlock ABI < 6 cannot scope them)
    unix: bool = False         # no unix socket connect/sendmsg (network.unix: false)


@dataclass
class EnforcementPlan:
    path: str = "monitor-only"                 # which enforcement path the run gets
    landlock: object = None                    # landlock.LandlockPlan
    seccomp: SeccompPolicy = None
    egress: object = None                      # guards.egress.EgressRules
    lsm: LsmRules = None                       # BPF LSM layer, where the kernel has it
    map_exec: list = None                      # report mmap(PROT_EXEC) outside these prefixes
    map_exec_kill: bool = False                # ... and kill the process at it
    masks: list = field(default_factory=list)  # mounts.plan_masks output
    limits: dict = field(default_factory=dict)
    wall_time: float = None
    enforced: list = field(default_factory=list)    # sections held by the kernel
    downgrades: list = field(default_factory=list)  # rules the kernel cannot hold here
    notes: list = field(default_factory=list)       # stricter-than-written outcomes, for the record
    resolved: dict = field(default_factory=dict)    # domain -> [ips]
    namespaces: list = field(default_factory=list)  # private ones the run gets: "pid", "ipc", "net" (+ mount)
    relay: list = field(default_factory=list)       # loopback ports relayed into the run's network namespace
    proc: str = None                                # the run's procfs: "pid" (subset=pid), "full", None
    widened: list = field(default_factory=list)     # grants beyond the policy's lists: {path, access, why}
    dev: list = None                                # the run's minimal /dev (devices.plan), None: the host's
    guard: list = None                              # egress guard name rules [(pattern, ports, proto)], None: off

    def describe(self):
        lines = [f"enforcement: {self.path}; kernel holds: {', '.join(self.enforced) or 'nothing'}"]
        lines += [f"downgrade: {d}" for d in self.downgrades]
        lines += [f"note: {n}" for n in self.notes]
        if self.namespaces:
            lines.append(f"namespaces: private {', '.join(self.namespaces + ['mount'])}"
                         + (f"; /proc: {ns.proc_options(self.proc == 'pid')}" if self.proc else "")
                         + (f"; network: only lo, {_relay_text(self.relay)}"
                            if "net" in self.namespaces else ""))
        if self.dev is not None:
            lines.append(f"/dev: a tmpfs of the run's own with {' '.join(os.path.basename(d) for d in self.dev)}, "
                         "pts, shm, mqueue (no disks, consoles or other devices the policy does not name)")
        if self.guard is not None:
            lines.append("egress guard: TCP that no CIDR or loopback rule allows goes to agentwatch's "
                         "proxy, which allows it by name (" + (", ".join(r[0] for r in self.guard) or "none")
                         + "); DNS goes to its responder; other UDP is refused")
        lines += [f"added beyond the policy: {w['access']} {w['path']} ({w['why']})"
                  for w in self.widened]
        if self.map_exec is not None:
            lines.append("filesystem.exec: an executable mapping (ld.so, dlopen) of a file opened "
                         "outside the exec roots is " + ("killed in the kernel at mmap" if self.map_exec_kill
                                                         else "reported from the kernel (not refused)"))
        return lines

    def record(self):
        """The part that goes into the run identity."""
        return {"path": self.path, "enforced": self.enforced, "downgrades": self.downgrades, "notes": self.notes,
                "masked": [p for p, how in self.masks if how in ("dir", "file", "ro")],
                "noexec": [p for p, how in self.masks if how == "noexec"], "limits": self.limits,
                "wall_time": self.wall_time, "resolved_domains": self.resolved,
                "namespaces": self.namespaces,
                "loopback_relay": self.relay if "net" in self.namespaces else None,
                "proc": None if self.proc is None else ns.proc_options(self.proc == "pid"),
                "widened": self.widened, "dev": self.dev,
                "egress_guard": None if self.guard is None else {
                    "names": [{"domain": d, "ports": [list(x) for x in ports] if ports else None,
                               "protocol": proto} for d, ports, proto in self.guard]},
                "bpf_lsm": None if self.lsm is None else {"exec_allow": self.lsm.exec_allow,
                                                          "file_deny": self.lsm.file_deny,
                                                          "signals": self.lsm.signals,
                                                          "unix": self.lsm.unix},
                "map_exec": None if self.map_exec is None else {
                    "action": "kill" if self.map_exec_kill else "report", "roots": self.map_exec}}


def section_action(data, section):
    """The strongest action any rule of a section can take."""
    ov = data.get("on_violation") or {}
    actions = {ov.get(section, ov.get("default", "alert"))}
    for rule, act in (ov.get("rules") or {}).items():
        if rule.split(".", 1)[0] == section:
            actions.add(act)
    return "kill" if "kill" in actions else "deny" if "deny" in actions else "alert"


def rule_action(data, section, rule):
    """on_violation for one rule: rules[rule] > section > default > alert."""
    ov = data.get("on_violation") or {}
    return (ov.get("rules") or {}).get(rule) or ov.get(section) or ov.get("default") or "alert"


def seccomp_actions(data):
    """Seccomp action per rule group: "kill" where the policy's action for the
    group's rule is kill, else "errno" (EPERM). The mount family follows
    process.namespaces; the always-denied syscalls (keyrings, personality,
    the filter's fixed list) follow syscalls.deny."""
    rules = {t: ("process", f"process.{t}") for t in ("ptrace", "change_uid", "namespaces", "bpf",
                                                       "modules", "io_uring", "memfd_exec")}
    rules["mount"] = rules["namespaces"]
    for group in ("keyring", "personality", "other", "deny", "prio_user"):
        rules[group] = ("syscalls", "syscalls.deny")
    rules["terminal"] = ("process", "process.terminal")
    rules["socket"] = ("network", "network.socket")
    return {g: "kill" if rule_action(data, *r) == "kill" else "errno" for g, r in rules.items()}


def _exp(patterns, variables):
    out = []
    for p in patterns or []:
        p = p.get("path") if isinstance(p, dict) else p
        if p:
            out.append(expand(p, variables))
    return out


def resolve_domains(domains, timeout=2.0):
    """domain -> sorted IPs, best effort, bounded in time (no DNS -> [])."""
    def one(d):
        try:
            return d, sorted({ai[4][0] for ai in socket.getaddrinfo(d, None)})
        except OSError:
            return d, []
    if not domains:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(domains)))
    futs = [pool.submit(one, d) for d in domains]
    done, _ = concurrent.futures.wait(futs, timeout=timeout)
    pool.shutdown(wait=False)
    out = {d: [] for d in domains}
    out.update(f.result() for f in done)
    return out


def make_plan(data, variables, policy_files=(), landlock_abi=None, bpf_lsm=False,
              ns_missing=None, ttys=(), pins=None, service_ports=()):
    """bpf_lsm: the host can load agentwatch's BPF LSM programs (doctor's
    bpf-lsm check: BPF LSM active and headers of exactly this kernel).
    ns_missing: {kind: why} for the namespaces this host cannot make
    (default: sandbox.namespaces.probe() as root; none otherwise).
    ttys: the terminal devices on the agent's stdio (granted as such).
    pins: {name: [addresses]} (--resolve): what a domain rule resolves to
    when the egress guard is off, instead of the host's resolver.
    service_ports: loopback ports of agentwatch's own services (the LLM
    gateway, run/services.py) that the agent may reach whatever
    network.loopback says: added to it here, so every layer (cgroup BPF,
    Landlock's port list, the namespace's relay) lets them through."""
    data = _with_service_ports(data, service_ports)
    p = EnforcementPlan()
    fs = data.get("filesystem")
    net = data.get("network")
    proc = data.get("process") or {}
    res = data.get("resources") or {}
    abi = landlock.abi_version() if landlock_abi is None else landlock_abi
    shared = set(proc.get("host_namespaces") or ())
    host_net = _host_network_why(data)
    if ns_missing is None:
        wanted = [k for k in ns.KINDS if k not in shared and (k != "net" or host_net is None)]
        ns_missing = ns.probe(wanted) if os.geteuid() == 0 else {}
    own_pid = "pid" not in shared and "pid" not in ns_missing

    # ---- filesystem: Landlock allow lists + masks for denies inside them
    if fs is not None and section_action(data, "filesystem") in ENFORCING:
        read, notes_r = landlock.globs_to_paths(_exp(fs.get("read"), variables))
        write, notes_w = landlock.globs_to_paths(_exp(fs.get("write"), variables))
        exec_src = fs.get("exec")
        if proc.get("exec"):
            exec_src = proc.get("exec")
        execs, notes_x = landlock.globs_to_paths(_exp(exec_src, variables)) if exec_src else (read, [])
        p.downgrades += [f"filesystem: {n}" for n in notes_r + notes_w + notes_x]
        deny = _exp(fs.get("deny"), variables)
        concrete = [d[:-3] if d.endswith("/**") else d for d in deny]
        wild = [d for d, c in zip(deny, concrete) if has_wildcards(c)]
        exec_ok = [x for x in execs if x not in write]
        own = {"write": _exp(fs.get("write"), variables)}
        own["read"] = _exp(fs.get("read"), variables) + own["write"] + _exp(exec_src, variables)
        rt_read, rt_write = runtime_grants(p, own, deny, own_pid, ttys)
        granted = read + write + exec_ok + rt_read + rt_write
        # Mask only what Landlock would otherwise grant: a denied path outside
        # every allow list is already refused by Landlock (EACCES, reported),
        # whereas a mask answers ENOENT, which hides the attempt.
        masked = [c for c in concrete if not has_wildcards(c)
                  and (abi < 1 or _under_any(os.path.realpath(c), granted))]
        # W^X for mappings too: Landlock's EXECUTE right covers execve only, so
        # the dynamic loader could still map a written file (`ld.so ./tool`,
        # dlopen). Writable directories with no exec path inside are mounted
        # noexec. And every directory between a writable root and a masked
        # path is pinned (bound onto itself) so it cannot be renamed away
        # with the mask (mv .git .git2 && mkdir -p .git/hooks).
        noexec = [w for w in write if os.path.isdir(w) and not w.startswith("/dev")
                  and not any(_under(x, w) for x in exec_ok)]
        pins = []
        for m in map(os.path.realpath, masked):
            for root in map(os.path.realpath, write):
                if _under(m, root) and m != root:
                    d = os.path.dirname(m)
                    while d != root and _under(d, root):
                        pins.append(d)
                        d = os.path.dirname(d)
        p.masks = mounts.plan_masks(masked, policy_files, noexec_dirs=noexec,
                                    pin_dirs=sorted(set(pins), key=len))
        p.downgrades += [_wild_deny(w, rule_action(data, "filesystem", "filesystem.deny")) for w in wild]
        if bpf_lsm:
            p.lsm = lsm_rules(exec_ok, concrete, p.notes)
            p.widened += [{"path": d, "access": "exec (BPF LSM)",
                           "why": "libraries the dynamic loader maps executable"}
                          for d in (p.lsm.exec_allow or ()) if d in RUNTIME_LIBS
                          and not any(_under(d, os.path.realpath(x)) for x in exec_ok)]
        elif not notes_x:
            # no LSM hook refuses a mapping here: the kernel reports it, and kills at it
            # where the rule says kill (bpf/mapexec.bpf.c)
            p.map_exec = map_exec_roots(exec_ok)
            p.map_exec_kill = rule_action(data, "filesystem", "filesystem.exec") == "kill"
        rules = landlock.LandlockRules(read=read + rt_read, write=write + rt_write, exec=exec_ok,
                                       # /dev/null too: it has no ioctls (ENOTTY), and an isatty()
                                       # of `cmd > /dev/null` refused (EACCES) was a violation
                                       ioctl_dev=[t for t in rt_write if t.startswith("/dev/")])
        p.enforced.append("filesystem")
    else:
        rules = None
        if fs is not None:
            p.masks = mounts.plan_masks([], policy_files)

    # ---- network: cgroup BPF egress (+ Landlock TCP ports, + scopes)
    if net is not None and section_action(data, "network") in ENFORCING:
        from ..guards.egress import EgressRules
        allow, ports, any_port = [], set(), False
        guarded = _net_spec(net).guarded()
        domains = [r["domain"] for r in net.get("allow") or [] if r.get("domain")]
        if guarded:
            p.guard = [(r["domain"], [tuple(_port_range(x)) for x in r.get("ports") or []] or None,
                        r.get("protocol", "any")) for r in net.get("allow") or [] if r.get("domain")]
        else:
            pinned = {d: list((pins or {})[d]) for d in domains if d in (pins or {})}
            p.resolved = dict(resolve_domains([d for d in domains if d not in pinned]), **pinned)
        for r in net.get("allow") or []:
            proto = r.get("protocol", "any")
            rng = [_port_range(x) for x in (r.get("ports") or [])] or [(None, None)]
            if guarded and r.get("domain"):
                cidrs = []                 # decided by name, in the guard
            else:
                cidrs = [r["cidr"]] if r.get("cidr") else [
                    f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}"
                    for ip in p.resolved.get(r.get("domain"), [])]
                if r.get("domain") and not cidrs:
                    p.notes.append(f"network.allow domain {r['domain']}: did not resolve; "
                                   "connections to it will be denied")
            for c in cidrs:
                for lo, hi in rng:
                    allow.append((c, lo, hi, proto))
            for lo, hi in rng:
                if lo is None:
                    any_port = True
                else:
                    ports.update(_landlock_ports(lo, hi))
        loop = net.get("loopback", False)
        p.egress = EgressRules(allow=allow, loopback=loop, deny_unix=net.get("unix", False) is False,
                               allow_families=tuple(_net_spec(net).families))
        if p.lsm is not None:   # also where the kernel has no cgroup unix hooks (before 6.7)
            p.lsm.unix = p.egress.deny_unix
        if rules is None:
            rules = landlock.LandlockRules(read=["/"], write=["/"], exec=["/"])
        # with the guard, TCP to any port may be an HTTP proxy's (CONNECT) or
        # DNS: the kernel hands it to the guard, which judges the ports, so
        # Landlock adds no port list
        if loop is not True and not any_port and not guarded:
            # entries are ports or "lo-hi" ranges, as in network.allow
            loop_ports = {port for x in (loop if isinstance(loop, list) else ())
                          for port in _landlock_ports(*_port_range(x))}
            if len(ports | loop_ports) <= LANDLOCK_PORTS_MAX:
                rules.tcp_connect = sorted(ports | loop_ports)
            else:
                p.notes.append(f"network: {len(ports | loop_ports)} TCP ports allowed, more than the "
                               f"{LANDLOCK_PORTS_MAX} Landlock rules agentwatch adds (one per port); "
                               "cgroup BPF alone holds the ports")
        rules.scope_abstract_unix = net.get("unix", False) is False
        if net.get("unix", False) not in (True, False):
            p.downgrades.append("network.unix path list: pathname unix sockets are judged, "
                                "not denied (abstract ones are scoped when unix is false)")
        p.enforced.append("network")

    if rules is not None:
        rules.scope_signals = True      # the agent cannot signal agentwatch or anyone outside
        p.landlock = landlock.plan(rules, abi)
        lost = p.landlock.downgrades
        if p.lsm is not None and not p.landlock.scoped & landlock.SCOPE_SIGNAL:
            p.lsm.signals = True        # the BPF LSM task_kill hook scopes them instead
            lost = [d for d in lost if not d.startswith("signal scoping")]
        p.downgrades += [f"landlock: {d}" for d in lost]
        if abi == 0:
            p.downgrades.append("landlock unavailable: filesystem and TCP rules are detected only")
            p.landlock = None

    # ---- process toggles and syscalls: seccomp. Every run with a section
    # the kernel enforces (filesystem, network, process, syscalls) gets a
    # filter, if only for the rules no policy turns off (terminal injection,
    # host-wide priority changes: seccomp_filter.py); with the network
    # section enforced it also holds the socket families.
    proc_act, sys_act = section_action(data, "process"), section_action(data, "syscalls")
    if p.enforced or proc_act in ENFORCING or sys_act in ENFORCING:
        # EPERM, reported by the syscall sensor's exit probe; kill (SIGSYS)
        # where the policy's on_violation says kill for the rule
        sc = SeccompPolicy(action="errno", actions=seccomp_actions(data))
        if proc_act in ENFORCING:
            for key in ("ptrace", "namespaces", "bpf", "modules", "io_uring", "memfd_exec"):
                setattr(sc, key, bool(proc.get(key, True)))
            sc.change_uid = bool(proc.get("change_uid", True))
            sc.mount = bool(proc.get("namespaces", True))
            sc.keyring = sc.personality = True
            # refusing MFD_EXEC is not enough: a plain memfd is executable
            # (vm.memfd_noexec 0) and Landlock lets fexecve() of it through
            # (measured on 6.18), so no memfd at all, as the judge already says
            sc.memfd = sc.memfd_exec
        else:
            for key in ("ptrace", "namespaces", "bpf", "modules", "io_uring", "memfd_exec",
                        "mount", "keyring", "personality"):
                setattr(sc, key, True)
            sc.other = ()
        if sys_act in ENFORCING:
            sc.deny = list((data.get("syscalls") or {}).get("deny") or [])
        if "network" in p.enforced:
            spec = _net_spec(net)
            sc.socket_families, sc.netlink_protocols = spec.family_numbers(), spec.netlink_numbers()
        p.seccomp = sc
        if proc_act in ENFORCING or sys_act in ENFORCING:
            p.enforced.append("process" if proc_act in ENFORCING else "syscalls")
        if proc_act in ENFORCING and proc.get("exec"):
            p.downgrades.append("process.exec sha256 pins are checked after exec (kill), "
                                "not before")

    # ---- resources
    p.limits = {k: res[k] for k in ("pids", "memory", "cpu") if res.get(k)}
    if proc.get("max_processes") and "pids" not in p.limits:
        p.limits["pids"] = proc["max_processes"]
    if res.get("wall_time"):
        from ..core.units import parse_duration
        p.wall_time = parse_duration(res["wall_time"])
    if p.landlock or p.seccomp or p.egress:
        p.path = PATH_BPF_LSM if p.lsm else PATH_FALLBACK
        _namespaces(p, fs, shared, ns_missing, variables, host_net)
        if "net" in p.namespaces:
            from ..policy.model import relay_ports
            p.relay = relay_ports(_loopback_ranges(net.get("loopback", False)))
    return p


# what sharing each namespace kind with the host leaves the agent (a note
# when the policy asks for it, a downgrade when the host cannot make it)
_SHARED = {"pid": ("it sees every host process and can name them by pid",
                   "host processes stay visible and reachable by pid"),
           "ipc": ("it can reach host SysV IPC objects and POSIX queues",
                   "host SysV IPC objects stay reachable"),
           "net": ("/proc/net lists every socket of the host",
                   "/proc/net and /proc/<pid>/net list every socket of the host")}


def _namespaces(p, fs, shared, missing, variables, host_net):
    """Every enforced run gets private PID and IPC namespaces (and a mount
    namespace for its procfs) unless process.host_namespaces shares them,
    and a network namespace when its policy allows no remote egress
    (host_net: why not, else None); one this host cannot make is a
    downgrade (sandbox/namespaces.py, sandbox/netns.py)."""
    for kind in ns.KINDS:
        if kind in shared:
            p.notes.append(f"process.host_namespaces: the agent shares the host's {kind} namespace "
                           f"({_SHARED[kind][0]})")
        elif kind == "net" and host_net is not None:
            # the coming egress guard routes such runs; until then the host's
            p.notes.append(f"network: {host_net}, so {PROC_NET_NOTE}")
        elif kind in missing:
            p.downgrades.append(f"process: no private {kind} namespace on this host ({missing[kind]}): "
                                f"{_SHARED[kind][1]}")
        else:
            p.namespaces.append(kind)
    if "pid" in p.namespaces:
        p.proc = "full" if _reads_host_proc(fs, variables) else "pid"
    elif "net" in p.namespaces:
        p.notes.append("network: the run's network namespace hides the host's sockets from "
                       "/proc/net, but with the host's PID namespace /proc/<host pid>/net still "
                       "lists them")
    if p.namespaces:        # the run has a mount namespace of its own: and a /dev
        p.dev = devices.plan(_exp([x for k in ("read", "write", "exec") for x in (fs or {}).get(k) or ()],
                                  variables))


def _host_network_why(data):
    """Why an enforced run of this policy keeps the host's network
    namespace (None: it gets its own). No network section held by the
    kernel: the agent may reach anything, so it keeps the host's."""
    from ..policy.model import host_network_why
    net = data.get("network")
    if net is None:
        return "the policy has no network section (the agent may connect anywhere)"
    if section_action(data, "network") not in ENFORCING:
        return "the network section only alerts (no connection is refused)"
    return host_network_why(net.get("allow") or (), _loopback_ranges(net.get("loopback", False)),
                            _net_spec(net).guarded())


def _with_service_ports(data, ports):
    net = data.get("network")
    if not ports or not isinstance(net, dict) or net.get("loopback") is True:
        return data
    have = net.get("loopback") or []
    loop = list(have) if isinstance(have, list) else []
    loop += [p for p in sorted(set(ports)) if p not in loop]
    return dict(data, network=dict(net, loopback=loop))


def _loopback_ranges(loop):
    """network.loopback as True or [(lo, hi)] ((validated) ports or "lo-hi" ranges)."""
    return loop if loop is True else [_port_range(x) for x in (loop or ())]


def _relay_text(ports):
    if not ports:
        return "no loopback port relayed"
    return (f"loopback port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))} relayed "
            "to the host's (TCP)")


def _reads_host_proc(fs, variables):
    """Whether the policy lets the agent read host-wide /proc files
    (/proc/meminfo, /proc/sys, ...): no filesystem section, or a read
    rule that matches one of them."""
    if fs is None:
        return True
    globs = [Glob(g) for g in _exp(list(fs.get("read") or ()) + list(fs.get("write") or ()), variables)]
    return any(g.matches(path) for g in globs for path in ns.HOST_WIDE_PROC)


def runtime_grants(p, own, deny, own_pid, ttys):
    """(read paths, write paths) the agent needs beyond the policy's lists
    (own: {"read": globs, "write": globs}, expanded), each one the policy
    does not grant itself recorded in p.widened with why; a path the
    policy's filesystem.deny covers is not granted (and that is noted)."""
    def covered(path, globs):
        return any(Glob(g).matches(path) or _under(path, g[:-3] if g.endswith("/**") else g)
                   for g in globs)
    terminals = {t: "the agent's terminal (the pty of its stdin, stdout or stderr)" for t in ttys}
    out = []
    for table, access in ((RUNTIME_READ, "read"), (RUNTIME_WRITE, "write")):
        kept = []
        for path, why in list(table.items()) + list(terminals.items()):
            if path == "/proc" and not own_pid:
                why = HOST_PROC_WHY
            if covered(path, deny):
                p.notes.append(f"filesystem.deny covers {path}: not granted for {access} "
                               f"although agents usually need it ({why})")
                continue
            kept.append(path)
            if not covered(path, own[access]):
                p.widened.append({"path": path, "access": access, "why": why})
        out.append(kept)
    return out[0], out[1]


def _net_spec(net):
    """network.families, network.netlink and whether the egress guard is on,
    of the (validated) network section, with their defaults."""
    from ..policy.model import DEFAULT_FAMILIES, DEFAULT_NETLINK, Network
    from ..policy.model import NetRule
    netlink = net.get("netlink", DEFAULT_NETLINK)
    return Network(families=tuple(net.get("families", DEFAULT_FAMILIES)),
                   netlink=() if netlink is False else netlink, guard=net.get("guard"),
                   allow=tuple(NetRule(cidr=r.get("cidr"), domain=r.get("domain"))
                               for r in net.get("allow") or ()))


def lsm_rules(exec_ok, deny, notes):
    """LsmRules from the filesystem section's exec roots and concrete deny
    paths. An exec root of / would put every file of the host in the allow
    set: the exec rule is then left to Landlock (noted)."""
    execs = [x for x in exec_ok if os.path.exists(x)]
    if any(os.path.realpath(x) == "/" for x in execs):
        notes.append("bpf-lsm: filesystem.exec covers /, so the inode exec rule is off "
                     "(Landlock still holds exec by path)")
        exec_allow = None
    else:
        libs = [d for d in RUNTIME_LIBS if os.path.isdir(d)]
        exec_allow = sorted({os.path.realpath(x) for x in execs + libs})
    file_deny = sorted({c for c in deny if not has_wildcards(c) and os.path.exists(c)})
    return LsmRules(exec_allow=exec_allow, file_deny=file_deny)


def _wild_deny(pattern, action):
    """The downgrade a deny glob with wildcards is: Landlock cannot refuse it
    and it cannot be masked. With a kill action, the forms the syscall exit
    program matches (**/name, /a/b/**) are killed at the open's return."""
    from ..policy.compile import kill_forms
    from ..policy.matchers import Glob
    head = f"filesystem.deny {pattern!r}: has wildcards, cannot be masked; "
    if action == "kill" and any(kill_forms(Glob(pattern))):
        return head + ("an open by a name it matches is killed in the kernel before it returns; "
                       "other names (a link to it) are detected and killed by agentwatch")
    return head + "detected only"


def map_exec_roots(exec_ok):
    """Path prefixes outside which the kernel reports (or kills at) an
    executable mapping (bpf/mapexec.bpf.c): the exec roots and the library directories, each
    as written and resolved (the loader opens /lib/... as well as
    /usr/lib/...), directories ending in "/". The kernel matches the path
    an fd was opened by lexically, so these over-approximate what
    filesystem.exec allows: a kill never lands on an allowed file named as
    such. None when a root is / (nothing could be outside)."""
    roots = set()
    for x in list(exec_ok) + RUNTIME_LIBS:
        for p in {os.path.normpath(x), os.path.realpath(x)}:
            if p == "/":
                return None
            roots.add(p + "/" if os.path.isdir(p) else p)
    return sorted(roots)


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _under_any(path, tops):
    return any(_under(path, os.path.realpath(t)) for t in tops)


def _landlock_ports(lo, hi):
    """The ports of a range: Landlock takes one TCP rule per port."""
    return range(lo, hi + 1)


def _port_range(v):
    if isinstance(v, int):
        return v, v
    lo, _, hi = str(v).partition("-")
    return int(lo), int(hi or lo)
