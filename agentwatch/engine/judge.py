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
import re
import signal
import time
from collections import Counter

from ..core.events import ViolationEvent
from ..policy.compile import Decision
from ..policy.matchers import normalize
from ..policy.model import CATEGORY_SECTION
from ..sensors.records import PREFIX_LEN
from .refusals import Refusals, rule_for

REPEAT_FLUSH_S = 5.0
LIMITS_EVERY_S = 0.5    # how often the resource limits' counters are read
# the kernel (Landlock, seccomp, a read-only mask) said no; EXDEV is Landlock's
# answer to a link or rename it refuses (and a mount boundary's), EBUSY a
# mask or pinned directory that cannot be renamed or removed
DENIED = ("EACCES", "EPERM", "EROFS", "EXDEV", "EBUSY")
# connects that reached no one: probing, not egress (glibc's NSS tries nscd)
_UNIX_NOBODY = ("ENOENT", "ECONNREFUSED")
# /proc/<pid>/<entry> that the kernel guards with a ptrace access check:
# reading them for a process outside the run is ptrace-class access
_PTRACE_ENTRIES = frozenset(("environ", "mem", "maps", "smaps", "smaps_rollup", "numa_maps",
                             "pagemap", "auxv", "fd", "fdinfo", "map_files", "root", "cwd",
                             "exe", "stack", "syscall", "io", "personality", "ns"))
_PROC_PID = re.compile(r"^/proc/(\d+)/(?:task/\d+/)?([^/]+)")
_PROC_NUM = re.compile(r"^/proc/(\d+)(/.*)?$")
# the ELF interpreter: run by hand, it maps the program named in its argv
# with PROT_EXEC, which Landlock's EXECUTE right (execve only) never sees
_LOADER = re.compile(r"^ld(-linux)?([-.].*)?\.so(\.\d+)*$")
_LOADER_OPTS_WITH_ARG = frozenset(("--library-path", "--preload", "--audit", "--argv0",
                                   "--inhibit-rpath", "--glibc-hwcaps-prepend",
                                   "--glibc-hwcaps-mask"))

# two views of one kernel verdict, each reported once (Judge._paired): a BPF
# LSM refusal seen by the LSM program and by the syscall sensor or loader
# argv; an mmap(PROT_EXEC) kill seen by mapexec.bpf.c and by the loader argv
_TWIN = {"bpf-lsm": "sensor", "sensor": "bpf-lsm", "mapexec": "loader", "loader": "mapexec"}
_MAPEXEC_KILLED = ("killed at the mmap(PROT_EXEC) of the file (bpf_send_signal SIGKILL): "
                   "none of its code ran")
_MAPEXEC_SEEN = ("not refused: mapped PROT_EXEC (Landlock's exec right covers execve only and "
                 "no BPF LSM hook loads here); seen by the kernel at the mmap")

# file op -> the access it needs on path (and on path2)
_FILE_ACCESS = {
    "unlink": ({"delete"}, None), "rmdir": ({"delete"}, None),
    "rename": ({"rename"}, {"create"}), "mkdir": ({"mkdir"}, None),
    "chmod": ({"chmod"}, None), "chown": ({"chown"}, None),
    "truncate": ({"truncate"}, None), "link": ({"link"}, {"link"}),
    "symlink": ({"create"}, None), "mknod": ({"create"}, None),
}
_FORKS = frozenset(("clone", "clone3", "fork", "vfork"))


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


def _realpath(path, follow=True):
    """The path with symlinks resolved now (what the kernel followed, unless
    the link changed since): a symlink in the workspace to a secret is judged
    as the secret. follow=False resolves the directories only, for calls
    that act on a link itself (symlink, unlink, rename, link, mkdir)."""
    try:
        if follow:
            return os.path.realpath(path)
        head, tail = os.path.split(path)
        return os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(path)
    except (OSError, ValueError):
        return path


# _realpath costs an lstat per path component (~4 us for /dev/null), on every
# file event. Paths that resolve to themselves (no symlink on the way: most
# of them) are remembered: such a path only resolves elsewhere once a symlink
# appears on it (symlink, rename, link) or a mount changes the tree. Those
# operations by any run's agent clear the cache as they are judged (in
# timestamp order, so before the events that follow them); changes made
# outside the runs are seen within REAL_CACHE_S. /proc is never cached: its
# magic links change with a process's fds and cwd, not with the tree.
REAL_CACHE_S = 0.5
REAL_CACHE_MAX = 1 << 16
_RELINKING_OPS = frozenset(("symlink", "rename", "link"))
_canonical = set()          # (path, follow) that resolved to path itself
_canonical_until = 0.0      # time.monotonic() when _canonical is emptied


def _real(path, follow=True):
    """_realpath(), from the cache of canonical paths when it holds the path."""
    global _canonical_until
    key = (path, follow)
    now = time.monotonic()
    if now >= _canonical_until or len(_canonical) >= REAL_CACHE_MAX:
        _canonical.clear()
        _canonical_until = now + REAL_CACHE_S
    elif key in _canonical:
        return path
    real = _realpath(path, follow)
    if real == path and not path.startswith("/proc/"):
        _canonical.add(key)
    return real


def forget_resolved():
    """Empty the canonical-path cache (a symlink, rename, link or mount)."""
    _canonical.clear()


def _own_proc(path, pid):
    """/proc/self and /proc/thread-self name the agent's process, not ours."""
    if path and path.startswith("/proc/"):
        for alias in ("/proc/self", "/proc/thread-self"):
            if path == alias or path.startswith(alias + "/"):
                return f"/proc/{pid}" + path[len(alias):]
    return path


def _loaded_program(argv):
    """The program an explicitly run ELF interpreter loads, or None."""
    args = list(argv[1:])
    while args:
        a = args.pop(0)
        if a == "--":
            return args[0] if args else None
        if a in _LOADER_OPTS_WITH_ARG:
            if args:
                args.pop(0)
            continue
        if a.startswith("--"):
            continue
        return a
    return None


def _proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.split(None, 1)[1].strip()
    except (OSError, IndexError, TypeError):
        pass
    return None


def _tgid(tid):
    """The process a thread id belongs to, while it lives."""
    v = _proc_status(tid, "Tgid")
    return int(v) if v and v.isdigit() else None


def _comm(pid):
    return _proc_status(pid, "Name")


def _ns_pid(pid):
    """A live process's pid in its own (innermost) PID namespace."""
    v = _proc_status(pid, "NSpid")
    last = v.split()[-1] if v else None
    return int(last) if last and last.isdigit() else None


def _pgid(pid):
    """The process group of a live process (field 5 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


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


_CATEGORY_OF = {section: category for category, section in CATEGORY_SECTION.items()}


class Judge:
    def __init__(self, compiled, correlator, run, emit, on_kill=None, watched_files=(),
                 egress_enforced=False, lsm_enforced=False, map_exec_roots=None,
                 map_exec_kill=False, seccomp_denied=None, seccomp_rules=None, plan=None):
        """compiled: CompiledPolicy; run: RunContext; emit(Event); on_kill():
        stops the agent when a rule's action is kill; watched_files:
        [(rule, path)] whose content must not change during the run;
        seccomp_denied: the syscalls this run's filter refuses with EPERM
        (None: take every refusal the sensors report as the filter's);
        seccomp_rules: the filter's rules (seccomp_filter.plan), against which
        the arguments of a refusal, where the sensor could read them, are
        checked (None: not checked); plan: the run's EnforcementPlan, which
        says which layer refused a call (engine/refusals.py; None: a plan
        with no Landlock, masks or limits)."""
        self.policy = compiled
        self.seccomp_denied = None if seccomp_denied is None else set(seccomp_denied)
        self.seccomp_rules = seccomp_rules
        self.refusals = Refusals(plan)
        self._pids_seen = 0         # forks refused at the pids limit, reported by syscall
        self._pids_credited = 0     # ... of which already set against the pids.events counter
        self._limit_pending = {}    # counter file -> an excess seen once, reported if it stays
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
        self._ns_pids = {}          # pid in the run's PID namespace -> host pid (_host_proc)
        self._next_flush = time.monotonic() + REPEAT_FLUSH_S
        self._watched = [(rule, path, file_sha256(path)) for rule, path in watched_files]
        self._exec_hashes = {}
        # the cgroup BPF programs report their own denials; the syscall
        # sensor's view of the same EPERM must not report them twice
        self.egress_enforced = egress_enforced
        # BPF LSM refusals are seen twice too: by the LSM program and by the
        # syscall sensor (EPERM) or the dynamic loader's argv; one attempt is
        # one violation (see _paired)
        self.lsm_enforced = lsm_enforced
        # the kernel reports (and with map_exec_kill kills at) an mmap(PROT_EXEC)
        # of a file opened by a path outside these prefixes (bpf/mapexec.bpf.c);
        # its report and the loader argv's are one attempt too
        self.map_exec_roots = map_exec_roots
        self.map_exec_kill = map_exec_kill
        self._unpaired = Counter()  # (layer, pid, rule, basename) -> reports awaiting their twin
        self._limits_next = 0.0
        self._limit_files = None    # [(rule, counters file, key)], found on first use
        self._limit_counts = {}     # counter file -> last value reported

    # -- entry point ---------------------------------------------------------------------
    def __call__(self, ev):
        kind = ev.kind
        if (kind == "file" and ev.op in _RELINKING_OPS) or kind == "syscall":
            forget_resolved()   # a path may resolve elsewhere from now on (mounts: syscall kind)
        proc = self.run.procs.get(ev.pid)
        if proc is not None and proc.launching and kind != "exec":
            return            # the launcher setting up the sandbox, not the agent
        if kind == "file":
            self._file(ev)
        elif kind == "exec":
            self._exec(ev)
        elif kind == "net":
            self._net(ev)
        elif kind == "syscall" and ev.no_entry:
            self._seccomp_denied(ev)
        elif kind == "syscall" and ev.refused:
            self._refused(ev)
        elif kind == "syscall":
            self._decide(ev, self.policy.check_syscall(ev.name), ev.name, {"syscall": ev.name,
                                                                         "args": ev.args[:3]})
        elif kind == "signal":
            self._signal(ev)
        elif kind == "fork":
            self._fork(ev)
        elif kind == "exit" and ev.signal == signal.SIGSYS:
            self._seccomp_kill(ev)

    # -- per kind --------------------------------------------------------------------------
    def _file(self, ev):
        if ev.error and ev.error not in DENIED:
            return            # ENOENT & co: nothing was touched (probing, PATH search)
        if ev.op == "mmap":
            return self._mapped(ev)
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
        follow = ev.op in ("open", "chmod", "chown", "truncate")
        refused = ev.error in DENIED
        for path, access in targets:
            if not access:
                continue
            if not path or not path.startswith("/"):
                if not (ev.path or "").startswith("fd:"):
                    self.unjudged += 1
                continue
            path = _own_proc(path, ev.pid)
            if self.run.pid_ns:
                path = self._host_proc(path)
            if self._other_process(ev, path):
                refused = False
                continue
            if self._identity_write(ev, path, access):
                refused = False
            real = _real(path, follow)
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
                    self._decide(ev, d, p, evidence)
                    refused = False      # reported
                    break
        for path, access in targets if refused else ():
            # the source, else the destination (a rename onto a mount point: EBUSY)
            if path and self._unexplained(ev, _real(_own_proc(path, ev.pid), follow), access):
                break

    def _file_layer(self, ev, path, access):
        return self.refusals.file_layer(ev.error, path, access, ev.op, getattr(ev, "mode", None),
                                        self.lsm_enforced)

    def _unexplained(self, ev, path, access, named=None):
        """The kernel refused a file operation the policy allows: report it
        when a layer of the sandbox did (a right Landlock cannot grant, a
        mask, a pin), with the rule behind that layer's rule; the kernel's
        own checks (a file's mode, a host read-only mount) are not the
        sandbox's and are not violations."""
        if not path or not path.startswith("/"):
            return False
        layer = self._file_layer(ev, path, access)
        if layer == "mount":
            rule, why = self.refusals.mask_rule(path, "exec" in access)
        elif layer == "landlock":
            rule = rule_for(access, ev.op)
            why = (f"{ev.op} of {path}: the run's Landlock rules do not grant it "
                   + ("(device nodes are never granted)" if ev.op == "mknod" else
                      "(the policy's patterns reach further than the kernel's rules)"))
        elif layer == "bpf-lsm":
            rule, why = rule_for(access, ev.op), f"{ev.op} of {path}: refused by the BPF LSM"
        else:
            return False
        category = _CATEGORY_OF[rule.split(".", 1)[0]]
        d = Decision(category=category, rule=rule, reason=why, pattern=None,
                     action=self.policy.action_for(category, rule))
        return self._decide(ev, d, path, {"path": path, "named": named or getattr(ev, "path", None),
                                   "access": sorted(access), "op": getattr(ev, "op", "exec"),
                                   "layer": layer})

    def _other_process(self, ev, path):
        """/proc/<pid>/environ, mem, fd/, root/... of a process outside the
        run (agentwatch itself, the host): judged as ptrace when the policy
        forbids ptrace. True when reported."""
        m = _PROC_PID.match(path)
        if not m or m.group(2) not in _PTRACE_ENTRIES or int(m.group(1)) in self.run.procs:
            return False
        if self.run.pid_ns:
            return False      # its /proc lists only the run's own processes
        proc = getattr(self.policy.spec, "process", None)
        if proc is None or proc.toggles.get("ptrace") is not False:
            return False
        d = Decision(category="process", rule="process.ptrace",
                     action=self.policy.action_for("process", "process.ptrace"),
                     reason=f"{m.group(2)} of process {m.group(1)}, which is not part of the run: "
                            "process.ptrace is false", pattern=None)
        self._decide(ev, d, path, {"path": path, "named": ev.path, "target_pid": int(m.group(1)),
                                   "op": ev.op})
        return True

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
                inner = _ns_pid(pid)
                if inner is not None:
                    self._ns_pids[inner] = pid
            host = self._ns_pids.get(n)
        return path if host is None else f"/proc/{host}{m.group(2) or ''}"

    def _identity_write(self, ev, path, access):
        """A write to the run's own policy or prompt: True when reported."""
        if access <= {"read"}:
            return False
        hit = False
        for rule, wpath, _ in self._watched:
            if path == wpath or _real(path) == wpath:
                d = self._identity_decision(rule, f"the agent wrote to {wpath}")
                evidence = {"path": wpath, "access": sorted(access), "op": ev.op}
                if ev.error in DENIED:
                    evidence["layer"] = self._file_layer(ev, wpath, access)
                hit = self._decide(ev, d, wpath, evidence) or hit
        return hit

    def _identity_decision(self, rule, reason):
        return Decision(category="identity", rule=rule,
                        action=self.policy.action_for("identity", rule), reason=reason, pattern=None)

    def _exec(self, ev):
        if ev.ret is not None and ev.ret != 0 and ev.error not in DENIED:
            return            # failed lookups (ENOENT while searching PATH)
        proc = self.run.procs.get(ev.pid)
        if not ev.filename:
            return self._fd_exec(ev, proc)
        if ev.filename.startswith("/"):
            named = _own_proc(ev.filename, ev.pid)
        elif ev.ret == 0 and proc and proc.exe:
            named = proc.exe           # resolved by the correlator after the exec
        elif proc and proc.cwd:
            named = os.path.join(proc.cwd, ev.filename)   # a refused ./tool
        else:
            named = ev.filename
        path = _real(named)
        if not self._judge_program(ev, path) and ev.error in DENIED:
            self._unexplained(ev, path, {"exec"}, named=ev.filename)
        if ev.ret in (0, None) and _LOADER.match(os.path.basename(path)):
            prog = _loaded_program(ev.argv or [])
            if prog:
                named = prog
                if not prog.startswith("/") and proc and proc.cwd:
                    prog = os.path.join(proc.cwd, prog)
                self._judge_program(ev, _real(_own_proc(prog, ev.pid)), loader=path, named=named)

    def _fd_exec(self, ev, proc):
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
        what = exe or "an open file descriptor"
        d = Decision(category="filesystem", rule="filesystem.exec",
                     action=self.policy.action_for("filesystem", "filesystem.exec"),
                     reason=f"exec of {what} (fexecve/execveat AT_EMPTY_PATH): no path in "
                            "filesystem.exec", pattern=None)
        self._decide(ev, d, f"fd:{what}", {"path": exe, "argv": ev.argv, "fd_exec": True})

    def _judge_program(self, ev, path, loader=None, named=None):
        sha = None
        if self.policy.needs_hash(path):
            sha = self._exec_hashes.get(path) or file_sha256(path)
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
                if self._paired("loader", ev.pid, d.rule, path):
                    return True   # the kernel's report of the mapping came first
                evidence["kernel"] = self._map_exec_verdict
            else:
                evidence["kernel"] = ("not refused at exec: the loader maps the file itself "
                                      "(refused only where its mount is noexec)")
        elif d is not None and ev.error in DENIED:
            evidence["layer"] = self.refusals.file_layer(ev.error, path, {"exec"}, "exec", None,
                                                         self.lsm_enforced)
        return self._decide(ev, d, path, evidence)

    @property
    def _map_exec_verdict(self):
        """What the kernel did at a mapping bpf/mapexec.bpf.c sees."""
        return _MAPEXEC_KILLED if self.map_exec_kill else _MAPEXEC_SEEN

    def _map_exec_sees(self, named):
        """Whether bpf/mapexec.bpf.c reports (or kills at) a mapping of a
        file the loader opens as `named`: an absolute, lexically clean path
        (it fits a key) outside every exec root."""
        roots = self.map_exec_roots
        if roots is None or not named or not named.startswith("/") or len(named) >= PREFIX_LEN:
            return False
        if named != os.path.normpath(named) or named.startswith("//"):
            return False
        return not any(named.startswith(r) for r in roots)

    def _mapped(self, ev):
        """The kernel saw (and with map_exec_kill killed the process at) an
        mmap(PROT_EXEC) of a file it opened outside the exec roots (ld.so,
        LD_PRELOAD, dlopen). A kill stands whatever the path resolves to now."""
        real = _real(ev.abspath)
        if self._paired("mapexec", ev.pid, "filesystem.exec", real):
            return                # the loader's argv already reported this attempt
        action = "kill" if self.map_exec_kill else self.policy.action_for("filesystem", "filesystem.exec")
        d = Decision(category="filesystem", rule="filesystem.exec", action=action, pattern=None,
                     reason=f"executable mapping of {ev.abspath}: outside filesystem.exec and "
                            "the library directories")
        self._decide(ev, d, real, {"path": real, "named": ev.path, "op": "mmap", "prot": ev.flags,
                                   "kernel": self._map_exec_verdict})

    def _net(self, ev):
        if ev.op == "socket":
            # judged here even when refused: a capability check or the cgroup
            # BPF program may have said no (kernel_denial leaves raw sockets and
            # families to us); a family seccomp refused has no event here (_seccomp_denied)
            d = self.policy.check_socket(ev.family, ev.sock_type, ev.protocol)
            evidence = {"family": ev.family, "type": ev.sock_type}
            target = f"{ev.family}/{ev.sock_type}"
            if ev.family == "netlink":
                evidence["protocol"] = ev.protocol
                target += f"/{ev.protocol}"
            if ev.error in DENIED:
                evidence["layer"] = "cgroup-bpf" if self.egress_enforced and ev.error == "EPERM" \
                    else "dac"    # a raw socket without CAP_NET_RAW
            self._decide(ev, d, target, evidence)
            return
        if self.egress_enforced and ev.error == "EPERM" and ev.family in ("inet", "inet6"):
            return
        if ev.family not in ("inet", "inet6", "unix") or ev.addr is None:
            return
        if ev.family == "unix" and ev.error in _UNIX_NOBODY:
            return
        addr = ev.addr
        if ev.family == "unix" and not addr and ev.op != "bind":
            # a connect or send names a socket; an empty name means the sensor
            # did not capture it (short sockaddr lengths), not that none was given
            addr = "<name not captured>"
        protocol = "tcp" if ev.op == "connect" else "udp" if ev.op in ("sendto", "sendmsg") else "any"
        d = self.policy.check_connect(ev.family, addr, ev.port, protocol, ev.op)
        target = addr if ev.port is None else f"{addr}:{ev.port}/{protocol}"
        evidence = {"op": ev.op, "family": ev.family, "addr": addr, "port": ev.port,
                    "protocol": protocol}
        if ev.error in DENIED:
            evidence["layer"] = self._net_layer(ev, addr)
        self._decide(ev, d, target, evidence)

    def _net_layer(self, ev, addr):
        """Landlock answers EACCES to a TCP port it does not grant (ABI 4) and
        EPERM to an abstract unix socket outside the run's domain (ABI 6); the
        cgroup BPF programs answer EPERM to addresses (their own report
        comes from their ring, kernel_denial) and unix sockets (6.7+)."""
        ll = self.refusals.landlock
        if ev.error == "EACCES" and ll is not None and ll.handled_net:
            return "landlock"
        if ev.error == "EPERM" and ev.family == "unix" and (addr or "").startswith("@") \
                and ll is not None and ll.scoped & 1:      # SCOPE_ABSTRACT_UNIX_SOCKET
            return "landlock"
        if ev.error == "EPERM" and (self.egress_enforced or self.lsm_enforced):
            return "bpf-lsm" if self.lsm_enforced and ev.family == "unix" else "cgroup-bpf"
        return "dac"

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
        if not outside:
            return
        evidence = {"op": ev.op, "target": what, "target_pid": pid, "signal": ev.signal,
                    "signal_name": ev.signal_name}
        if ev.target_tid is not None:
            evidence["target_tid"] = ev.target_tid
        if ev.pidfd is not None:
            evidence["pidfd"] = ev.pidfd
        if ev.ret == 0 and pid is None:
            # kill(0) / kill(-pgid) / kill(-1) succeed when any one process got it
            evidence["kernel"] = "delivered to at least one process of the target set"
        self._decide(ev, self.policy.check_signal(what), f"{what} {ev.signal_name}", evidence)

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
            pgid = _pgid(ev.pid) if ev.target == 0 else -ev.target
            if pgid is None:
                return None, "the caller's process group", None
            # a group a process of the run created stays the run's (setpgid
            # cannot move a process into another session's group); the
            # agent's first group is agentwatch's own
            return pgid not in self.run.procs, f"process group {pgid}", None
        if ev.op == "tkill":
            tgid = _tgid(ev.target_tid)
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
        tgid = _tgid(pid)                # kill() of a thread id reaches its process
        if tgid in self.run.procs or self._in_run_cgroup(pid):
            return False, None, pid
        comm = _comm(pid)
        if pid == os.getpid():
            what = f"agentwatch (pid {pid})"
        else:
            what = f"pid {pid}" + (f" ({comm})" if comm else "")
        return True, what, pid

    def _in_run_cgroup(self, pid):
        """A process of the run the correlator has not seen yet (lost fork record)."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                return any(line.startswith("0::") and self.run.run_id in line.split("/")
                           for line in f.read().split("\n"))
        except OSError:
            return False

    def _fork(self, ev):
        proc = getattr(self.policy.spec, "process", None)
        limit = getattr(proc, "max_processes", None)
        if not limit:
            return
        alive = sum(1 for p in self.run.procs.values() if not p.exited)
        if alive > limit:
            d = Decision(category="process", rule="process.max_processes",
                         action=self.policy.action_for("process", "process.max_processes"),
                         reason=f"{alive} processes alive, the policy allows {limit}", pattern=None)
            self._decide(ev, d, "max_processes", {"alive": alive, "limit": limit})

    def _seccomp_denied(self, ev):
        """A syscall the seccomp filter refused with EPERM before its entry
        tracepoint (its arguments only as read from the registers at exit, where
        the kernel allows it). Judged by name like any sensitive
        syscall; one the policy names nowhere (the filter's always-denied
        list, the mount family) is syscalls.deny, or the toggle it belongs
        to. The kernel refused it, so the action is deny unless the rule says
        kill (then the agent is stopped as the policy asks)."""
        from ..sandbox.seccomp_filter import BY_ARGUMENT, CONDITIONAL, toggle_of
        if self.seccomp_denied is not None and ev.name not in self.seccomp_denied:
            return   # a shared monitor watches it for another run's filter: not ours
        evidence = {"syscall": ev.name, "args": ev.args[:3] or None,
                    "kernel": f"denied ({ev.error}, seccomp)", "layer": "seccomp"}
        hit = None
        if ev.args and self.seccomp_rules is not None and ev.name in CONDITIONAL:
            # the arguments, read from the registers at exit: which rule refused it,
            # or none (an ordinary EPERM of a call the filter let through)
            hit = next((r for r in self.seccomp_rules if r.syscall == ev.name and r.action == "errno"
                        and all(c.matches(ev.args) for c in r.conds)), None)
            if hit is None:
                return
            evidence["refused"] = hit.why
        d = self.policy.check_syscall(ev.name)
        proc = getattr(self.policy.spec, "process", None)
        if d is None and hit is not None and hit.group and proc is not None \
                and proc.toggles.get(hit.group) is False:
            # refused for its arguments under a process toggle (clone with CLONE_NEW*)
            rule = f"process.{hit.group}"
            d = Decision(category="process", rule=rule, pattern=None,
                         reason=f"{ev.name}: {hit.why}: {rule} is false",
                         action=self.policy.action_for("process", rule))
        if d is None and ev.name in BY_ARGUMENT:
            # refused for its arguments (a socket family, a terminal ioctl), which
            # the filter compared and nobody else saw: the rule says which kind
            rule, why = BY_ARGUMENT[ev.name]
            category = _CATEGORY_OF[rule.split(".", 1)[0]]
            d = Decision(category=category, rule=rule, reason=f"{ev.name}: {why}", pattern=None,
                         action=self.policy.action_for(category, rule))
        if d is None:
            toggle = toggle_of(ev.name)
            proc = getattr(self.policy.spec, "process", None)
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
        self._decide(ev, d, ev.name, evidence)

    def _seccomp_kill(self, ev):
        """SIGSYS as a fatal signal: seccomp killed the process (a syscall of
        another ABI, x32 or i386, or a kill-action rule). The call never
        reached a tracepoint, so its exit is the only trace."""
        d = Decision(category="syscall", rule="syscalls.deny",
                     action=self.policy.action_for("syscall", "syscalls.deny"),
                     reason="killed by seccomp (SIGSYS): a syscall of a non-native ABI "
                            "(x32, i386) or one the filter kills", pattern=None)
        self._decide(ev, d, f"sigsys:{ev.pid}", {"signal": ev.signal, "kernel": "killed (seccomp)",
                                                 "layer": "seccomp"})

    def _refused(self, ev):
        """A call with no record of its own that a layer other than seccomp
        refused (bpf/syscalls.bpf.c aw_refused): a fork at the pids limit, a
        device ioctl Landlock refuses. Reported where the run's plan explains
        it (else the errno is the kernel's own: EAGAIN of memory, a driver's
        EACCES)."""
        if ev.name in _FORKS and ev.error == "EAGAIN":
            if not self.refusals.pids:
                return
            self._pids_seen += 1
            rule = "resources.pids"
            d = Decision(category="resource", rule=rule, pattern=None,
                         reason=f"{ev.name}: the run's pids limit (pids.max) is reached",
                         action=self.policy.action_for("resource", rule))
            self._decide(ev, d, rule, {"syscall": ev.name, "args": ev.args[:1], "layer": "pids",
                                       "kernel": "denied (EAGAIN, pids limit)"})
        elif ev.name == "ioctl" and ev.error == "EACCES":
            from ..sandbox.landlock import FS_IOCTL_DEV
            ll = self.refusals.landlock
            if ll is None or not ll.handled_fs & FS_IOCTL_DEV:
                return
            fd = ev.args[0] & 0xFFFFFFFF if ev.args else None
            path = ev.path or f"fd:{fd}"
            rule = "filesystem.write"
            # deny, never the rule's kill: the policy names no device ioctls, and
            # programs probe their stdio with them (isatty on /dev/null)
            d = Decision(category="filesystem", rule=rule, pattern=None, action="deny",
                         reason=f"ioctl on {path}: Landlock grants device ioctls (IOCTL_DEV) only on "
                                "the agent's terminal")
            self._decide(ev, d, f"ioctl:{path}", {"syscall": "ioctl", "path": path, "fd": fd,
                                                  "request": hex(ev.args[1] & 0xFFFFFFFF) if ev.args else None,
                                                  "layer": "landlock", "kernel": "denied (EACCES)"})

    def _check_limits(self, final=False):
        """The kernel refused forks (pids limit) or OOM-killed (memory limit):
        read the run's cgroup counters (v2, or the v1 hierarchies of a hybrid
        host) and report each increase."""
        if self._limit_files is None:
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
            if "pids" in v1:     # the v1 groups sandbox/limits.py makes on hybrid hosts
                files.append(("resources.pids", os.path.join(v1["pids"], "agentwatch",
                                                             self.run.run_id, "pids.events"), "max"))
            if "memory" in v1:
                files.append(("resources.memory", os.path.join(v1["memory"], "agentwatch",
                                                               self.run.run_id, "memory.oom_control"),
                              "oom_kill"))
            self._limit_files = files
        for rule, path, key in self._limit_files:
            n = _read_counter(path, key)
            if not n or n <= self._limit_counts.get(path, 0):
                continue
            new = n - self._limit_counts.get(path, 0)
            if rule == "resources.pids":
                # the forks the syscall sensor reported one by one (_refused) are
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
            from ..core.events import Event
            what = (f"the pids limit refused {new} fork(s)" if rule == "resources.pids"
                    else f"the memory limit OOM-killed {new} process(es)")
            d = Decision(category="resource", rule=rule, action=self.policy.action_for("resource", rule),
                         reason=what, pattern=None)
            ev = Event(kind="lifecycle", ts=round(time.time(), 6), pid=self.run.root_pid)
            self._decide(ev, d, rule, {"counter": os.path.basename(path), key: n,
                                       "kernel": "denied (pids limit)" if rule == "resources.pids"
                                       else "OOM-killed (memory limit)",
                                       "layer": "pids" if rule == "resources.pids" else "memory"})

    def limit_reached(self, rule, reason):
        from ..core.events import Event
        d = Decision(category="resource", rule=rule, action="kill", reason=reason, pattern=None)
        ev = Event(kind="lifecycle", ts=round(time.time(), 6), pid=self.run.root_pid)
        self._decide(ev, d, rule, {})

    def daemon_refused(self, pid, op):
        """A process of this run asked agentwatch's daemon to act (op: run,
        shutdown, status); the daemon refused: an agent never starts runs
        outside its own sandbox or stops others'. Who asked is the kernel's
        word (the socket's peer credentials, the pid's cgroup)."""
        from ..core.events import Event
        proc = self.run.procs.get(pid)
        d = Decision(category="identity", rule="identity.daemon", action="deny", pattern=None,
                     reason=f"an agent asked the agentwatch daemon to {op}")
        ev = Event(kind="lifecycle", ts=round(time.time(), 6), pid=pid,
                   ppid=proc.ppid if proc else 0)
        self._decide(ev, d, f"daemon:{op}", {"op": op, "kernel": "refused (peer in the run's cgroup)"})

    def kernel_denial(self, ev, category, rule, reason, target, evidence, layer="cgroup-bpf"):
        """A denial a kernel layer reported itself (cgroup BPF, BPF LSM)."""
        if evidence.get("op") == "socket" and reason.endswith(("raw-socket", "family-not-allowed")):
            # the syscall sensor's socket event reports it (see _net: check_socket
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
            if self._paired("bpf-lsm", ev.pid, rule, target):
                return
            self._decide(ev, d, target, dict(evidence, kernel=f"denied (EPERM) by BPF LSM {evidence.get('hook')}",
                                             layer=layer))
            return
        d = Decision(category=category, rule=rule, action="deny", reason=reason, pattern=None)
        self._decide(ev, d, target, dict(evidence, kernel="denied (EPERM)", layer=layer))

    def _paired(self, layer, pid, rule, target):
        """True when this report's twin from the other view of the same
        kernel verdict was already counted (see _TWIN); else remember it so
        that its twin is not."""
        key = (pid, rule, os.path.basename(str(target)))
        other = _TWIN[layer]
        if self._unpaired[(other,) + key] > 0:
            self._unpaired[(other,) + key] -= 1
            return True
        self._unpaired[(layer,) + key] += 1
        return False

    # -- reporting -------------------------------------------------------------------------
    def _decide(self, ev, d, target, evidence):
        """Report (or count) d; False when there was nothing to decide."""
        if d is None:
            return False
        if (self.lsm_enforced and d.category == "filesystem" and ev.kind != "lifecycle"
                and (getattr(ev, "error", None) == "EPERM" or "loader" in evidence)
                and "hook" not in evidence and self._paired("sensor", ev.pid, d.rule, target)):
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

    def tick(self, now=None, final=False):
        """Periodic work: repeat totals, and the digest of the run's own
        policy/prompt (a change by anyone, inside or outside the agent)."""
        now = time.monotonic() if now is None else now
        if final or now >= self._limits_next:
            self._limits_next = now + LIMITS_EVERY_S
            self._check_limits(final)
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
                from ..core.events import Event
                ev = Event(kind="file", ts=round(time.time(), 6), pid=0)
                self._decide(ev, d, path, {"path": path, "old_sha256": digest, "new_sha256": now,
                                           "by": "unknown (seen by content, not by a sensor)"})

    def summary(self):
        return {"violations": sum(self.by_category.values()),
                "by_category": dict(self.by_category), "by_rule": dict(self.by_rule),
                "unjudged": self.unjudged}
