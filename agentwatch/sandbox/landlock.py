"""Landlock: the kernel-enforced allow list for files, TCP ports and scopes.

Three steps, split so that the only code running between fork and exec is
small and allocation-light:

    rules = LandlockRules(read=[...], write=[...], exec=[...])
    p = plan(rules)        # parent: ABI negotiation, stat paths, pack structs
    ...fork...
    apply(p)               # child: 5 kinds of syscall, then exec

Why a plan: Landlock is "best effort" across kernel versions. A right the
running kernel does not know cannot be handled (the kernel would reject the
ruleset with EINVAL), so it is dropped, and the plan *says so* in
``downgrades`` instead of silently enforcing less than the policy asked.

Semantics (what the kernel enforces once ``apply`` returns):
- every filesystem right the ABI knows is *handled*: anything not granted
  beneath a rule path is denied (EACCES; EXDEV for cross-directory
  link/rename). MAKE_CHAR and MAKE_BLOCK are never granted.
- ``write`` paths get read + write rights but not EXECUTE, and ``exec`` paths
  read + EXECUTE but no write rights: W^X by construction.
- rules attach to inodes, not names: symlinks are resolved by the kernel to
  the target, and a detour through /proc/self/root or a bind mount lands on
  the same denied inode.
- TCP (ABI >= 4) is restricted only when ``tcp_connect``/``tcp_bind`` is not
  None; UDP and other protocols are never restricted by Landlock.
- scopes (ABI >= 6) cut abstract unix sockets and signals to processes
  outside the sandbox's domain.
- Files opened *before* ``apply`` (inherited fds, the tty) keep working:
  Landlock checks at open time.

The syscall numbers 444-446 are the same on every architecture (they come
after the 424 unification), so no per-arch table is needed.
"""
import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass, field

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38

# Filesystem rights (uapi linux/landlock.h), with the ABI that introduced them.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13       # ABI 2
FS_TRUNCATE = 1 << 14    # ABI 3
FS_IOCTL_DEV = 1 << 15   # ABI 5
NET_BIND_TCP = 1 << 0    # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1                # ABI 6

LATEST_ABI = 7   # newest ABI this module knows; a newer kernel is treated as 7

FS_NAMES = {FS_EXECUTE: "EXECUTE", FS_WRITE_FILE: "WRITE_FILE", FS_READ_FILE: "READ_FILE",
            FS_READ_DIR: "READ_DIR", FS_REMOVE_DIR: "REMOVE_DIR", FS_REMOVE_FILE: "REMOVE_FILE",
            FS_MAKE_CHAR: "MAKE_CHAR", FS_MAKE_DIR: "MAKE_DIR", FS_MAKE_REG: "MAKE_REG",
            FS_MAKE_SOCK: "MAKE_SOCK", FS_MAKE_FIFO: "MAKE_FIFO", FS_MAKE_BLOCK: "MAKE_BLOCK",
            FS_MAKE_SYM: "MAKE_SYM", FS_REFER: "REFER", FS_TRUNCATE: "TRUNCATE",
            FS_IOCTL_DEV: "IOCTL_DEV"}
NET_NAMES = {NET_BIND_TCP: "BIND_TCP", NET_CONNECT_TCP: "CONNECT_TCP"}

FS_ABI1 = (1 << 13) - 1          # EXECUTE .. MAKE_SYM
FS_BY_ABI = {1: FS_ABI1, 2: FS_ABI1 | FS_REFER, 3: FS_ABI1 | FS_REFER | FS_TRUNCATE,
             4: FS_ABI1 | FS_REFER | FS_TRUNCATE}
FS_BY_ABI[5] = FS_BY_ABI[6] = FS_BY_ABI[7] = FS_BY_ABI[4] | FS_IOCTL_DEV

# Rights that mean something on a non-directory; the kernel rejects the others
# (EINVAL) in a rule whose path is a file.
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

READ = FS_READ_FILE | FS_READ_DIR
WRITE = (READ | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
         | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE)
EXEC = READ | FS_EXECUTE

# sizeof(struct landlock_ruleset_attr) as each ABI knows it: the kernel
# rejects a larger struct with nonzero fields it does not know (E2BIG).
RULESET_ATTR_SIZE = {1: 8, 2: 8, 3: 8, 4: 16, 5: 16, 6: 24, 7: 24}

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl


def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when the kernel lacks it (ENOSYS) or it
    is not enabled at boot (EOPNOTSUPP)."""
    abi = _syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                   ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi >= 1:
        return int(abi)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EOPNOTSUPP):
        return 0
    raise OSError(err, f"landlock_create_ruleset(VERSION): {os.strerror(err)}")


def access_names(mask: int, names=FS_NAMES) -> str:
    """'READ_FILE|READ_DIR' for a mask: for plans shown to people."""
    return "|".join(n for bit, n in names.items() if mask & bit) or "-"


@dataclass
class LandlockRules:
    """What the agent may do; everything else Landlock handles is denied."""
    read: list = field(default_factory=list)    # read files, list dirs beneath
    write: list = field(default_factory=list)   # + create/remove/write/truncate/refer beneath
    exec: list = field(default_factory=list)    # + execute beneath (never write)
    ioctl_dev: list = ()                        # device ioctls beneath (ABI >= 5)
    tcp_connect: list | None = None   # None: unrestricted; []: no TCP connect at all
    tcp_bind: list | None = None
    scope_abstract_unix: bool = False
    scope_signals: bool = False


@dataclass
class LandlockPlan:
    """Everything ``apply`` needs, computed in the parent.

    ``paths`` and ``ports`` are (path, allowed_access) and (port,
    allowed_access); ``missing`` lists rule paths that do not exist (skipped);
    ``downgrades`` says in words what the ABI could not enforce."""
    abi: int
    handled_fs: int = 0
    handled_net: int = 0
    scoped: int = 0
    paths: list = field(default_factory=list)
    ports: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    downgrades: list = field(default_factory=list)

    def ruleset_attr(self) -> bytes:
        """struct landlock_ruleset_attr, cut to the size the ABI knows."""
        raw = struct.pack("=QQQ", self.handled_fs, self.handled_net, self.scoped)
        return raw[:RULESET_ATTR_SIZE.get(min(self.abi, LATEST_ABI), 8)]

    def describe(self) -> list[str]:
        """One line per rule, for `--show`, logs and tests."""
        lines = [f"landlock ABI {self.abi}: handles fs={access_names(self.handled_fs)}"
                 f" net={access_names(self.handled_net, NET_NAMES)} scoped={self.scoped:#x}"]
        lines += [f"  {p}: {access_names(a)}" for p, a in self.paths]
        lines += [f"  tcp/{port}: {access_names(a, NET_NAMES)}" for port, a in self.ports]
        lines += [f"  missing (skipped): {p}" for p in self.missing]
        lines += [f"  downgrade: {d}" for d in self.downgrades]
        return lines


def plan(rules: LandlockRules, abi: int | None = None) -> LandlockPlan:
    """Turn rules into handled masks and per-path/per-port rules for ``abi``
    (default: the running kernel's). Stats each path: a missing one is
    listed in ``missing``; a file gets only the rights valid on files."""
    if abi is None:
        abi = abi_version()
    p = LandlockPlan(abi=abi)
    if abi < 1:
        p.downgrades.append("Landlock unavailable (ABI 0): no filesystem, TCP or scope "
                            "restriction can be enforced")
        return p
    level = min(abi, LATEST_ABI)
    p.handled_fs = FS_BY_ABI[level]
    if level < 2:
        p.downgrades.append("REFER needs ABI 2: links and renames across directories "
                            "are always denied (EXDEV), even inside write paths")
    if level < 3:
        p.downgrades.append("TRUNCATE needs ABI 3: truncate(2) is not restricted, so files "
                            "outside the write paths can be emptied")
    if level < 5:
        p.downgrades.append("IOCTL_DEV needs ABI 5: ioctl() on device files is not restricted"
                            + (f" (ioctl_dev rules ignored: {', '.join(rules.ioctl_dev)})"
                               if rules.ioctl_dev else ""))

    wanted = {}   # path -> access, in first-seen order
    for paths, access in ((rules.read, READ), (rules.write, WRITE), (rules.exec, EXEC),
                          (rules.ioctl_dev, FS_IOCTL_DEV)):
        for path in paths:
            wanted[path] = wanted.get(path, 0) | access
    for path, access in wanted.items():
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            p.missing.append(path)
            continue
        if not stat.S_ISDIR(st.st_mode):
            access &= FS_FILE_RIGHTS
        access &= p.handled_fs
        if access:
            p.paths.append((path, access))

    by_port = {}
    for name, ports, bit in (("connect", rules.tcp_connect, NET_CONNECT_TCP),
                             ("bind", rules.tcp_bind, NET_BIND_TCP)):
        if ports is None:          # not restricted at all
            continue
        if level < 4:
            p.downgrades.append(f"TCP {name} rules need ABI 4: TCP {name} is not restricted "
                                f"(wanted only ports {sorted(ports) or 'none'})")
            continue
        p.handled_net |= bit       # handled with no port rule = denied everywhere
        for port in ports:
            if not 0 <= int(port) <= 65535:
                raise ValueError(f"tcp_{name}: port {port} out of range")
            by_port[int(port)] = by_port.get(int(port), 0) | bit
    p.ports = sorted(by_port.items())

    for want, bit, what in ((rules.scope_abstract_unix, SCOPE_ABSTRACT_UNIX_SOCKET,
                             "abstract unix socket scoping"),
                            (rules.scope_signals, SCOPE_SIGNAL, "signal scoping")):
        if not want:
            continue
        if level < 6:
            p.downgrades.append(f"{what} needs ABI 6: not enforced")
        else:
            p.scoped |= bit
    return p


def _fail(step, path=None):
    e = ctypes.get_errno()
    return OSError(e, f"landlock {step}: {os.strerror(e)}", path)


def apply(p: LandlockPlan) -> None:
    """Restrict the calling process (and its future children) for good.

    Call IN THE CHILD after fork, before exec: it is irreversible and also
    sets no_new_privs. Landlock restricts only the calling thread (and what it
    later forks/execs), which is the whole process in a freshly forked child. Raises OSError naming the step (and path) that failed;
    then nothing was restricted except possibly no_new_privs. Raises
    OSError(EOPNOTSUPP) for an ABI-0 plan: refusing beats running unconfined
    when the caller asked for a sandbox (it can check ``plan.abi`` first).
    """
    if p.abi < 1:
        raise OSError(errno.EOPNOTSUPP, "landlock: not supported by this kernel")
    attr = p.ruleset_attr()
    rfd = _syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), attr,
                   ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if rfd < 0:
        raise _fail("create_ruleset")
    try:
        for path, access in p.paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                raise OSError(e.errno, f"landlock open(O_PATH): {e.strerror}", path) from None
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):   # changed since plan()?
                    access &= FS_FILE_RIGHTS
                # struct landlock_path_beneath_attr: u64 allowed_access, s32 parent_fd; packed
                rule = struct.pack("=Qi", access, fd)
                if _syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(rfd),
                            ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), rule, ctypes.c_uint32(0)) < 0:
                    raise _fail("add_rule(path_beneath)", path)
            finally:
                os.close(fd)
        for port, access in p.ports:
            rule = struct.pack("=QQ", access, port)   # struct landlock_net_port_attr
            if _syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(rfd),
                        ctypes.c_int(LANDLOCK_RULE_NET_PORT), rule, ctypes.c_uint32(0)) < 0:
                raise _fail(f"add_rule(net_port {port})")
        # restrict_self requires no_new_privs (or CAP_SYS_ADMIN); set it anyway so
        # a setuid binary cannot run with more privilege than the sandbox.
        if _prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        if _syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(rfd),
                    ctypes.c_uint32(0)) < 0:
            raise _fail("restrict_self")
    finally:
        os.close(rfd)


_GLOB_CHARS = "*?[{"


def globs_to_paths(globs: list[str]) -> tuple[list[str], list[str]]:
    """Policy allow globs (variables already expanded) -> Landlock rule paths.

    Landlock grants a whole subtree, so a glob maps to its longest literal
    directory prefix: "/usr/**" -> "/usr" exactly, "/home/u/*.txt" ->
    "/home/u" *widened* (noted in the second list). A glob that is not
    anchored ("**/.env") or that would widen to "/" ("/*") cannot be an
    allow rule: it is skipped and noted. Paths beneath another kept path are
    dropped (the subtree already covers them); duplicates too.
    """
    notes, out = [], []
    for g in globs:
        if not g.startswith("/"):
            notes.append(f"'{g}' cannot be expressed in Landlock (not an absolute path); skipped")
            continue
        parts = [x for x in g.split("/") if x not in ("", ".")]
        while parts and parts[-1] == "**":     # "dir/**" is exactly the subtree "dir"
            parts.pop()
        literal = []
        for part in parts:
            if any(c in part for c in _GLOB_CHARS):
                break
            literal.append(part)
        path = os.path.normpath("/" + "/".join(literal))
        if len(literal) < len(parts):          # a wildcard remains: widen to its parent
            if path == "/":
                notes.append(f"'{g}' cannot be expressed in Landlock (widening would allow "
                             f"the whole filesystem); skipped")
                continue
            notes.append(f"'{g}' widened to {path}")
        out.append(path)
    kept = []
    for path in out:
        if any(_beneath(path, k) for k in kept):
            continue
        kept = [k for k in kept if not _beneath(k, path)] + [path]
    return sorted(kept, key=out.index), notes


def _beneath(path, top):
    return path == top or top == "/" or path.startswith(top + "/")
