"""Syscall sensor (bpf/syscalls.bpf.c): which syscalls are watched, what the
BPF side copies for each, and how a raw record becomes a typed event.

Every watched syscall costs every process on the host a little (attaching a
syscalls:* tracepoint turns on the syscall-tracing slow path), so each entry
says why it is here, and a run attaches only the groups it needs.
"""
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace

import signal as _signal

from ..core.events import FileEvent, NetEvent, SignalEvent, SyscallEvent, errno_name
from ..policy.model import SOCKET_FAMILIES
from . import records as R

GROUPS = ("process", "file", "net", "sensitive", "signal")
AT_FDCWD = -100


@dataclass(frozen=True)
class Spec:
    name: str
    group: str
    op: str                 # event op ("open", "connect", ...) or the syscall name
    why: str
    path1: int = None       # argument holding a user string (path, name)
    path2: int = None       # second user string
    dirfd: int = None       # dirfd argument path1 is relative to
    dirfd2: int = None      # dirfd argument path2 is relative to
    addr: int = None        # struct sockaddr * argument
    addrlen: int = None
    msghdr: int = None      # struct user_msghdr * argument
    deref: int = None       # pointer to a struct whose first 16 bytes we copy
    argv: int = None
    flags_arg: int = None   # open flags
    mode_arg: int = None
    target_arg: int = None  # signals: the pid/tgid (or kill's pid, group, 0, -1)
    tid_arg: int = None     # signals: the thread
    pidfd_arg: int = None   # signals: the pidfd naming the target
    sig_arg: int = None     # signals: the signal number
    emit: bool = True       # False: stash only (clone flags for the fork probe)
    need_addr: bool = False
    exec_: bool = False
    exit_group: bool = False
    enter: bool = True      # False: exit tracepoint only (a syscall watched for seccomp denials alone)
    denied: bool = False    # the run's seccomp filter refuses it with EPERM: report those exits
    refuse: int = 0         # R.REFUSE_*: other layers' refusals of a call with no record of its own

    @property
    def attach_exit(self):
        """exit_group never returns; clone & co only stash flags for the fork
        probe, unless the filter may refuse them. Every exit tracepoint costs
        a grace period to detach, so attach only these."""
        return (self.emit and not self.exit_group and self.enter) or self.denied or bool(self.refuse)

    @property
    def priority(self):
        """Records on the priority ring buffer (bpf/common.bpf.c): everything
        but plain file operations, plus chdir, which the correlator needs
        before the relative paths that follow it."""
        return self.group != "file" or self.op == "chdir"

    def packed(self):
        """The struct aw_spec bytes for the BPF "specs" map."""
        def idx(v):
            return R.NOARG if v is None else v
        flags = (R.SPEC_WATCH | (R.SPEC_EMIT if self.emit else 0) | (R.SPEC_NEED_ADDR if self.need_addr else 0)
                 | (R.SPEC_EXEC if self.exec_ else 0) | (R.SPEC_EXIT_GROUP if self.exit_group else 0)
                 | (R.SPEC_DENIED if self.denied else 0) | (R.SPEC_PRIORITY if self.priority else 0)
                 | (R.SPEC_OPEN if self.op == "open" else 0))
        return R.SPEC.pack(flags, idx(self.path1), idx(self.path2), idx(self.addr),
                           idx(self.addrlen), idx(self.msghdr), idx(self.deref), idx(self.argv),
                           self.refuse, b"")


def _s(name, group, op, why, **kw):
    return Spec(name=name, group=group, op=op, why=why, **kw)


_EXEC_WHY = "what the agent runs: filename and argv, read at entry before the old image is gone"
_FORK_WHY = "stash only: clone flags let the fork probe tell processes from threads"

SPECS = [
    # process: always attached, the process tree depends on it
    _s("execve", "process", "exec", _EXEC_WHY, path1=0, argv=1, exec_=True),
    _s("execveat", "process", "exec", _EXEC_WHY, path1=1, dirfd=0, argv=2, exec_=True),
    _s("fork", "process", "fork", _FORK_WHY, emit=False),
    _s("vfork", "process", "fork", _FORK_WHY, emit=False),
    _s("clone", "process", "fork", _FORK_WHY, emit=False),
    _s("clone3", "process", "fork", _FORK_WHY, deref=0, emit=False),
    _s("exit_group", "process", "exit", "the exit status, which the exit tracepoint lacks", exit_group=True),
    # file
    _s("open", "file", "open", "legacy open(2), still callable directly", path1=0, flags_arg=1, mode_arg=2),
    _s("creat", "file", "open", "legacy creat(2): open for write, create, truncate", path1=0, mode_arg=1),
    _s("openat", "file", "open", "every file the agent opens, with read/write/create intent",
       path1=1, dirfd=0, flags_arg=2, mode_arg=3),
    _s("openat2", "file", "open", "openat with struct open_how (flags read from it)",
       path1=1, dirfd=0, deref=2),
    _s("unlink", "file", "unlink", "file deletion", path1=0),
    _s("unlinkat", "file", "unlink", "file and directory deletion", path1=1, dirfd=0),
    _s("rmdir", "file", "rmdir", "directory deletion", path1=0),
    _s("rename", "file", "rename", "moving files (e.g. over a protected one)", path1=0, path2=1),
    _s("renameat", "file", "rename", "moving files", path1=1, dirfd=0, path2=3, dirfd2=2),
    _s("renameat2", "file", "rename", "moving or exchanging files", path1=1, dirfd=0, path2=3, dirfd2=2),
    _s("mkdir", "file", "mkdir", "directory creation", path1=0, mode_arg=1),
    _s("mkdirat", "file", "mkdir", "directory creation", path1=1, dirfd=0, mode_arg=2),
    _s("link", "file", "link", "hard links (a second name for a file)", path1=0, path2=1),
    _s("linkat", "file", "link", "hard links", path1=1, dirfd=0, path2=3, dirfd2=2),
    _s("symlink", "file", "symlink", "symbolic links: path is the link, path2 its target", path1=1, path2=0),
    _s("symlinkat", "file", "symlink", "symbolic links", path1=2, dirfd=1, path2=0),
    _s("chmod", "file", "chmod", "permission changes (e.g. making a file executable)", path1=0, mode_arg=1),
    _s("fchmod", "file", "chmod", "permission changes by fd", mode_arg=1),
    _s("fchmodat", "file", "chmod", "permission changes", path1=1, dirfd=0, mode_arg=2),
    _s("fchmodat2", "file", "chmod", "permission changes", path1=1, dirfd=0, mode_arg=2),
    _s("chown", "file", "chown", "ownership changes", path1=0),
    _s("lchown", "file", "chown", "ownership changes", path1=0),
    _s("fchown", "file", "chown", "ownership changes by fd"),
    _s("fchownat", "file", "chown", "ownership changes", path1=1, dirfd=0),
    _s("truncate", "file", "truncate", "truncating a file by path", path1=0),
    _s("ftruncate", "file", "truncate", "truncating a file by fd"),
    _s("mknod", "file", "mknod", "device, fifo and socket nodes (Landlock never grants devices)",
       path1=0, mode_arg=1),
    _s("mknodat", "file", "mknod", "device, fifo and socket nodes", path1=1, dirfd=0, mode_arg=2),
    _s("chdir", "file", "chdir", "tracks the working directory so relative paths resolve", path1=0),
    _s("fchdir", "file", "chdir", "tracks the working directory (by fd)"),
    # net
    _s("socket", "net", "socket", "socket family and type (raw, packet, netlink...)"),
    _s("connect", "net", "connect", "outgoing connections: address and port", addr=1, addrlen=2),
    _s("bind", "net", "bind", "listening or source addresses", addr=1, addrlen=2),
    _s("sendto", "net", "sendto", "datagrams to an explicit address (connectionless egress, DNS)",
       addr=4, addrlen=5, need_addr=True),
    _s("sendmsg", "net", "sendmsg", "datagrams to an explicit address via msghdr", msghdr=1, need_addr=True),
    _s("sendmmsg", "net", "sendmsg", "batched datagrams; the first message's address", msghdr=1, need_addr=True),
    # sensitive: rare calls that change privilege, reach other processes or the kernel
    _s("ptrace", "sensitive", "ptrace", "debugging or controlling another process"),
    _s("process_vm_readv", "sensitive", "process_vm_readv", "reading another process's memory"),
    _s("process_vm_writev", "sensitive", "process_vm_writev", "writing another process's memory"),
    _s("mount", "sensitive", "mount", "mounting filesystems: path is the target, path2 the source",
       path1=1, path2=0),
    _s("umount2", "sensitive", "umount2", "unmounting", path1=0),
    _s("pivot_root", "sensitive", "pivot_root", "changing the root filesystem", path1=0, path2=1),
    _s("chroot", "sensitive", "chroot", "changing the root directory", path1=0),
    _s("unshare", "sensitive", "unshare", "new namespaces (user, mount, net...)"),
    _s("setns", "sensitive", "setns", "joining another namespace"),
    _s("bpf", "sensitive", "bpf", "loading BPF programs or touching maps"),
    _s("init_module", "sensitive", "init_module", "loading a kernel module"),
    _s("finit_module", "sensitive", "finit_module", "loading a kernel module from a file"),
    _s("delete_module", "sensitive", "delete_module", "unloading a kernel module", path1=0),
    _s("kexec_load", "sensitive", "kexec_load", "replacing the running kernel"),
    _s("kexec_file_load", "sensitive", "kexec_file_load", "replacing the running kernel"),
    _s("io_uring_setup", "sensitive", "io_uring_setup", "io_uring: file and network I/O that bypasses syscall sensors"),
    _s("memfd_create", "sensitive", "memfd_create", "anonymous files (fileless execution)", path1=0),
    _s("setuid", "sensitive", "setuid", "changing user id"),
    _s("setgid", "sensitive", "setgid", "changing group id"),
    _s("setreuid", "sensitive", "setreuid", "changing user ids"),
    _s("setregid", "sensitive", "setregid", "changing group ids"),
    _s("setresuid", "sensitive", "setresuid", "changing user ids"),
    _s("setresgid", "sensitive", "setresgid", "changing group ids"),
    _s("setfsuid", "sensitive", "setfsuid", "changing the filesystem user id"),
    _s("setfsgid", "sensitive", "setfsgid", "changing the filesystem group id"),
    _s("personality", "sensitive", "personality", "execution domain changes (e.g. disabling ASLR)"),
    _s("keyctl", "sensitive", "keyctl", "kernel keyring access"),
    _s("add_key", "sensitive", "add_key", "adding kernel keys", path1=0),
    _s("request_key", "sensitive", "request_key", "requesting kernel keys", path1=0),
    # signal: attached when the policy has a process section (rule process.signal):
    # a signal to a process outside the run (agentwatch, the user's shell)
    _s("kill", "signal", "kill", "signals to a pid, the caller's group (0), a group (-pgid) or all (-1)",
       target_arg=0, sig_arg=1),
    _s("tkill", "signal", "tkill", "signals to a thread by tid alone", tid_arg=0, sig_arg=1),
    _s("tgkill", "signal", "tgkill", "signals to a thread of a given process",
       target_arg=0, tid_arg=1, sig_arg=2),
    _s("pidfd_send_signal", "signal", "pidfd_send_signal",
       "signals through a pidfd (the pid is read from /proc/<pid>/fdinfo)", pidfd_arg=0, sig_arg=1),
    _s("rt_sigqueueinfo", "signal", "rt_sigqueueinfo", "queued signals with data, to a process",
       target_arg=0, sig_arg=1),
    _s("rt_tgsigqueueinfo", "signal", "rt_tgsigqueueinfo", "queued signals with data, to a thread",
       target_arg=0, tid_arg=1, sig_arg=2),
]

BY_NAME = {s.name: s for s in SPECS}


def syscall_number(name):
    """Native syscall number via libseccomp's own table (no hard-coded ABI)."""
    import seccomp
    return seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)


_DENIED_WHY = ("refused by the run's seccomp filter (EPERM): its exit tracepoint alone "
               "reports each refusal (seccomp runs before sys_enter)")
_BY_ARG_WHY = ("refused by the run's seccomp filter for some arguments only (EPERM): the "
               "entry probe stashes every call it lets through, so an exit with EPERM and no "
               "entry is a refusal and an ordinary EPERM is not")


# Refusals by a layer other than seccomp of syscalls that have no record of
# their own (stash only, or exit only): their exit reports these returns
# (bpf/syscalls.bpf.c aw_refused, record AW_EV_REFUSED) and the judge says
# which layer and rule gave them. The fork family is always watched (its
# exit costs one tracepoint hit per fork); ioctl only where the run's filter
# already watches it (its terminal rules: every enforced run).
REFUSABLE = {"clone": R.REFUSE_EAGAIN, "clone3": R.REFUSE_EAGAIN, "fork": R.REFUSE_EAGAIN,
             "vfork": R.REFUSE_EAGAIN,      # the pids limit (pids.max): EAGAIN
             "ioctl": R.REFUSE_EACCES}      # Landlock IOCTL_DEV (ABI 5): EACCES on a device


def specs_for(groups, denied=(), exit_args=False):
    """The specs of `groups` (and "process"), plus one for every syscall in
    `denied`, the names the run's seccomp filter refuses with EPERM: a watched
    one is marked so its refused calls are reported, any other gets its exit
    tracepoint alone (group "seccomp"), so the attached set follows the filter.
    A syscall the filter refuses only for some arguments (socket by family,
    ioctl by request: seccomp_filter.CONDITIONAL) needs its arguments to be
    told from an ordinary call failing with EPERM for its own reasons. With
    exit_args (the exit program reads them from the task's registers, see
    Sensors.exit_args) the exit tracepoint alone does, and the judge
    compares them with the run's filter; without, it gets its entry
    tracepoint too, stash only, so the calls the filter lets through have an
    entry (ioctl is the one called often: see README "Known limits")."""
    from ..sandbox.seccomp_filter import CONDITIONAL
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown sensor group(s): {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(GROUPS)}")
    out = [s for s in SPECS if s.group in groups or s.group == "process"]
    at = {s.name: i for i, s in enumerate(out)}
    for name in dict.fromkeys(denied):
        if name in at:
            out[at[name]] = replace(out[at[name]], denied=True)
        else:
            base = BY_NAME.get(name) or Spec(name=name, group="seccomp", op=name, why=_DENIED_WHY)
            if name in CONDITIONAL and not exit_args:
                out.append(replace(base, emit=False, enter=True, denied=True, why=_BY_ARG_WHY))
            else:
                out.append(replace(base, enter=False, denied=True, why=_DENIED_WHY))
    return [replace(s, refuse=REFUSABLE[s.name]) if s.name in REFUSABLE else s for s in out]


# ---- decoding ---------------------------------------------------------------

_O_ACCMODE, _O_WRONLY, _O_RDWR, _O_CREAT, _O_TRUNC, _O_PATH = 3, 1, 2, 0o100, 0o1000, 0o10000000
_O_TMPFILE = 0o20000000 | 0o200000


def open_access(flags):
    """open flags -> ["read"|"write"|"create"|"truncate"|"path"]."""
    if flags & _O_PATH:
        return ["path"]
    mode = flags & _O_ACCMODE
    access = []
    if mode in (0, _O_RDWR):
        access.append("read")
    if mode in (_O_WRONLY, _O_RDWR):
        access.append("write")
    if flags & _O_CREAT or (flags & _O_TMPFILE) == _O_TMPFILE:
        access.append("create")
    if flags & _O_TRUNC:
        access.append("truncate")
    return access


# the names network.families uses, so the judge can look an event's family up there
_FAMILIES = {number: name for name, number in SOCKET_FAMILIES.items()} | {16: "netlink", 0: "unspec"}
_TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket", 6: "dccp", 10: "packet"}


def family_name(family):
    return _FAMILIES.get(family, f"af{family}")


def parse_sockaddr(raw):
    """Raw struct sockaddr bytes -> (family, addr, port). IPv4-mapped IPv6
    addresses are kept as written (::ffff:a.b.c.d); matchers normalise."""
    if len(raw) < 2:
        return None, None, None
    family = struct.unpack_from("=H", raw)[0]
    name = family_name(family)
    if family == socket.AF_INET and len(raw) >= 8:
        port = struct.unpack_from("!H", raw, 2)[0]
        return name, str(ipaddress.IPv4Address(raw[4:8])), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        port = struct.unpack_from("!H", raw, 2)[0]
        ip = ipaddress.IPv6Address(raw[8:24])
        if ip.ipv4_mapped is not None:          # written the way people write it
            return name, f"::ffff:{ip.ipv4_mapped}", port
        return name, str(ip), port
    if family == socket.AF_UNIX:
        path = raw[2:]
        if not path:
            return name, "", None               # unnamed (autobind)
        if path[0] == 0:                        # abstract: length says where it ends
            return name, "@" + path[1:].decode("utf-8", "surrogateescape"), None
        return name, R.cstr(path), None
    return name, None, None


def _i32(v):
    return ((v & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000


def decode(rec, spec):
    """A raw syscall record -> FileEvent / NetEvent / SyscallEvent (without
    run identity or resolved paths: the engine adds those)."""
    ret = rec["ret"]
    args = rec["args"]
    if spec.group == "file":
        ev = FileEvent(op=spec.op, path=rec["str1"], pid=rec["pid"], tid=rec["tid"], uid=rec["uid"],
                       comm=rec["comm"], ret=ret, error=errno_name(ret) if ret < 0 else None)
        if spec.path2 is not None:
            ev.path2 = R.cstr(rec["data2"])
        if spec.name == "creat":
            flags = _O_WRONLY | _O_CREAT | _O_TRUNC
        elif spec.name == "openat2":
            flags = rec["extra"][0]
        elif spec.flags_arg is not None:
            flags = args[spec.flags_arg]
        else:
            flags = 0
        ev.flags = flags & 0xFFFFFFFF
        if spec.op == "open":
            ev.access = open_access(ev.flags)
            if spec.name == "openat2":
                ev.mode = rec["extra"][1] & 0o7777
        if spec.mode_arg is not None and (spec.op != "open" or ev.flags & _O_CREAT):
            # mknod: the node's type too (S_IFCHR, S_IFIFO...), which says what Landlock checks
            ev.mode = args[spec.mode_arg] & (0o177777 if spec.op == "mknod" else 0o7777)
        if spec.path1 is None:                  # fd-based variant: say which fd
            ev.path = f"fd:{_i32(args[0])}"
        return ev
    base = dict(pid=rec["pid"], tid=rec["tid"], uid=rec["uid"], comm=rec["comm"],
                ret=ret, error=errno_name(ret))
    if spec.group == "net":
        ev = NetEvent(op=spec.op, **base)
        if spec.op == "socket":
            ev.family = family_name(args[0] & 0xFFFF)
            ev.sock_type = _TYPES.get(args[1] & 0xF, f"type{args[1] & 0xF}")
            ev.protocol = _i32(args[2])
        else:
            ev.family, ev.addr, ev.port = parse_sockaddr(bytes(rec["data2"][:rec["len2"]]))
        return ev
    if spec.group == "signal":
        return decode_signal(rec, spec, base)
    ev = SyscallEvent(name=spec.name, nr=rec["nr"], args=list(args), **base)
    if spec.path1 is not None:
        ev.path = rec["str1"]
    return ev


def signal_name(sig):
    """15 -> 'SIGTERM', 34 -> 'SIGRTMIN', 40 -> 'SIGRTMIN+6', 0 -> '0 (existence probe)'."""
    if sig == 0:
        return "0 (existence probe)"
    try:
        return _signal.Signals(sig).name
    except ValueError:
        rtmin = getattr(_signal, "SIGRTMIN", 34)
        return f"SIGRTMIN+{sig - rtmin}" if sig > rtmin else f"signal {sig}"


def decode_signal(rec, spec, base):
    args = rec["args"]
    sig = _i32(args[spec.sig_arg])
    ev = SignalEvent(op=spec.name, signal=sig, signal_name=signal_name(sig), **base)
    if spec.target_arg is not None:
        ev.target = _i32(args[spec.target_arg])
    if spec.tid_arg is not None:
        ev.target_tid = _i32(args[spec.tid_arg])
    if spec.pidfd_arg is not None:
        ev.pidfd = _i32(args[spec.pidfd_arg])
    return ev


PIDFD_SELF_THREAD, PIDFD_SELF_THREAD_GROUP = -10000, -20000


def pidfd_pid(pid, fd):
    """The pid a pidfd of process `pid` refers to, from /proc/<pid>/fdinfo/<fd>
    while the process and the fd live (best effort: None when unknown, -1
    when the target has exited). PIDFD_SELF_* name the caller itself."""
    if fd in (PIDFD_SELF_THREAD, PIDFD_SELF_THREAD_GROUP):
        return pid
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def dirfd_of(spec, rec, second=False):
    """The dirfd a relative path is resolved against (AT_FDCWD when none)."""
    idx = spec.dirfd2 if second else spec.dirfd
    return AT_FDCWD if idx is None else _i32(rec["args"][idx])


def resolve(path, cwd, dirfd, pid):
    """Best-effort absolute path for a path the process named: absolute paths
    are normalised, relative ones joined to the tracked cwd or to the dirfd's
    target (read from /proc while the process still exists). None if unknown."""
    if not path:
        return None
    if path.startswith("/"):
        return _norm(path)
    if dirfd == AT_FDCWD:
        base = cwd
    else:
        try:
            base = os.readlink(f"/proc/{pid}/fd/{dirfd}")
        except OSError:
            base = None
    if not base:
        return None
    return _norm(os.path.join(base, path))


_NORMED = {}            # path -> _norm(path): lexical, so it never goes stale
_NORMED_MAX = 1 << 16


def _norm(path):
    """normpath, and '//x' -> '/x' (POSIX lets normpath keep a leading '//')."""
    done = _NORMED.get(path)
    if done is None:
        done = os.path.normpath(path)
        if done.startswith("//"):
            done = "/" + done.lstrip("/")
        if len(_NORMED) >= _NORMED_MAX:
            _NORMED.clear()
        _NORMED[path] = done
    return done
