"""The seccomp layer: a deny-list filter the agent's child loads before exec.

Why a deny list on a default-ALLOW filter: agents run arbitrary toolchains
(compilers, interpreters, package managers) whose syscall sets cannot be
enumerated, so an allow list would break them in ways nobody can predict.
What this layer removes is the small set of syscalls that widen the kernel's
attack surface or escape the other layers (ptrace, bpf, namespaces, mounts,
modules, io_uring, keyrings, ...) and the calls whose register arguments
say enough to refuse them: socket families, terminal ioctls (below). File
and network address rules are Landlock's and cgroup BPF's job; seccomp
cannot see paths or socket addresses (they are behind pointers).

Denied means EPERM or a kill, per rule group (SeccompPolicy.actions, from
the policy's on_violation in sandbox/plan.py). An EPERM refusal happens
before the sys_enter tracepoint, so it is reported from the syscall's exit
tracepoint: errno_denied() lists what the syscall sensor must watch. For
the syscalls refused only for some arguments (BY_ARGUMENT: socket by
family, ioctl by request, ...) the sensor also attaches the entry
tracepoint, so that an ordinary call that fails with EPERM for another
reason has an entry and is not taken for a refusal (sensors/syscalls.py).

Refused in every run that has a filter at all (sandbox/plan.py loads one
for any run with a kernel-enforced section), whatever the policy says:
  * terminal input injection and console take-over (TERMINAL_IOCTLS):
    TIOCSTI and friends write into the input queue of the terminal the
    agent was started from, which the user's shell reads after the agent
    exits (CVE-2017-5226). Refused here rather than left to the kernel's
    dev.tty.legacy_tiocsti sysctl (Linux 6.2+; Debian 12's 6.1 has none),
    so it holds on every kernel. The request is compared on its low 32 bits
    (the kernel takes an unsigned int; CVE-2019-10063 bypassed flatpak's
    64-bit compare with high bits set).
  * setpriority(PRIO_USER) and ioprio_set(IOPRIO_WHO_USER): they reach
    every process of a uid on the host, whatever pid namespace the agent
    is in (the PRIO_PROCESS/PGRP forms are left to the pid namespace).
With a network section enforced, socket() and socketpair() of a family the
policy does not list (SeccompPolicy.socket_families; default unix, inet,
inet6), and of a netlink protocol it does not list (netlink_protocols;
default NETLINK_ROUTE, which getaddrinfo's AI_ADDRCONFIG, getifaddrs and
if_nameindex use), are refused here: cgroup BPF's sock_create hook runs
for inet and inet6 sockets only (guards/egress.py).

A relayed pty (a session of the agent's own, as script(1) gives) was
considered and not done: the refusal above closes TIOCSTI on every kernel,
and a relay would change job control, window size and raw mode for
interactive agents. An agent keeps the user's terminal as its stdio.

Three steps, so each can be tested without the next:
    plan(policy)     pure: the list of rules, with warnings for skipped names
    build(policy)    a libseccomp SyscallFilter (not loaded)
    apply(policy)    build + load, in the forked child just before exec

What is killed rather than denied (measured on x86_64, libseccomp 2.5.4,
Linux 6.18; tests/kernel/test_seccomp.py checks it):
  * i386 syscalls (``int $0x80``, AUDIT_ARCH_I386): only the native
    architecture is in the filter, and Attr.ACT_BADARCH is KILL_PROCESS, so
    the arch check at the top of the filter kills the process (SIGSYS).
  * x32 syscalls (nr | 0x40000000, same AUDIT_ARCH_X86_64): libseccomp
    itself emits, right after the x86_64 arch check, ``if nr >= 0x40000000
    and nr != -1: ACT_BADARCH`` whenever SCMP_ARCH_X32 is not in the filter.
    No explicit rule is needed (and none could be written: libseccomp rules
    match single syscall numbers, not ranges). This kernel has no x32 ABI
    (CONFIG_X86_X32_ABI unset: unfiltered, such a call returns ENOSYS), but
    the filter kills it anyway, so the rule holds on kernels that have it.
  * nr == -1 passes: tracers use it to skip a syscall (see seccomp(2)).

Gaps, said out loud:
  * fexecve() of a memfd is an execve of /proc/self/fd/N (or execveat with
    AT_EMPTY_PATH); seccomp sees a pointer, not the path. The memfd_exec
    toggle refuses memfd_create(MFD_EXEC); a memfd created with neither
    MFD_EXEC nor MFD_NOEXEC_SEAL is still executable unless the
    vm.memfd_noexec sysctl says otherwise. Executing it is left to Landlock
    (execute rights) and exec monitoring.
  * clone3() takes its flags in a struct in memory, which a filter cannot
    read. With namespaces off it returns ENOSYS, which makes glibc (threads,
    posix_spawn) fall back to clone(), whose flags register is checked.
  * A syscall libseccomp does not know by name (newer than its table) cannot
    be named in a rule; plan() skips it with a warning instead of failing.
  * Sockets made through io_uring (IORING_OP_SOCKET, Linux 5.19+) never
    pass socket(): the family rules hold only where io_uring is refused
    too (process.io_uring: false, enforced, as in every shipped policy).
  * On architectures that still have socketcall(2) (s390x, ppc64, not
    x86_64 or aarch64), socket() through it is not checked by family.

One module (~510 lines) on purpose: the groups of refused calls, their
argument rules and the filter built from them must be read together to
see what the filter holds (tests pin the comments against the filter).
"""
from __future__ import annotations

import errno
import termios
from dataclasses import dataclass, field
from typing import Sequence

from agentwatch.core.errors import KernelFeatureError

try:   # imported here, not in apply(): the child after fork should only build and load
    import seccomp
except ImportError:   # pragma: no cover - python3-seccomp is installed by scripts/setup.sh
    seccomp = None

ACTIONS = ("errno", "kill")

CLONE_NEW_FLAGS = {   # clone(2) flags that create namespaces. CLONE_NEWTIME (0x80) is
    "CLONE_NEWNS": 0x00020000,      # not here: in clone() that bit is part of CSIGNAL
    "CLONE_NEWCGROUP": 0x02000000,  # (exit signal); only unshare/clone3 accept it,
    "CLONE_NEWUTS": 0x04000000,     # and both are denied.
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
MFD_EXEC = 0x10
PER_LINUX = 0
PER_QUERY = 0xFFFFFFFF
U32 = 0xFFFFFFFF        # mask for an int argument: the kernel reads its low 32 bits

# ioctl requests refused in every filtered run, and why (x86_64/generic values;
# the TIOC* numbers differ on a few architectures, so they come from termios)
TERMINAL_IOCTLS = {
    "TIOCSTI": (getattr(termios, "TIOCSTI", 0x5412),
                "pushes bytes into the terminal's input queue: the user's shell runs them "
                "after the agent exits"),
    "TIOCLINUX": (getattr(termios, "TIOCLINUX", 0x541C),
                  "virtual console services: paste the selection into the input queue "
                  "(CVE-2023-1523), set the selection, blank or switch consoles"),
    "TIOCCONS": (getattr(termios, "TIOCCONS", 0x541D),
                 "redirects the console's output (kernel messages) to the agent's terminal"),
    "TIOCSETD": (getattr(termios, "TIOCSETD", 0x5423),
                 "changes the terminal's line discipline: the user's terminal stays broken "
                 "after exit, and rare disciplines (n_hdlc, n_gsm) were kernel exploits"),
    "KDSKBENT": (0x4B47, "rewrites a key of a virtual console's keymap: the user's next "
                         "keystroke types what the agent chose"),
    "KDSKBSENT": (0x4B49, "rewrites a function key's string on a virtual console (input "
                          "injection at the next key press)"),
    "KDSETKEYCODE": (0x4B4D, "remaps a virtual console's scancodes to keycodes"),
}
# Considered and left allowed: TIOCSCTTY (taking a terminal another session
# holds needs CAP_SYS_ADMIN, which the agent does not have), TIOCSIG and
# TIOCPKT (pty master only: the agent holds no master of the user's
# terminal), KDSKBMODE/KDSETMODE (a keyboard or display mode: denial of
# service on a console, not injection), TIOCSWINSZ (resizing is ordinary).
PRIO_USER = 2
IOPRIO_WHO_USER = 3
AF_INET, AF_NETLINK = 2, 16
SOCK_PACKET, SOCK_TYPE_MASK = 10, 0xF     # socket(AF_INET, SOCK_PACKET) is AF_PACKET to the kernel
FAMILY_RULES_UPTO = 64    # families 1..63 by number, >= 64 by one compare (AF_MAX is 46 on 6.18)
NETLINK_MAX_LINKS = 32    # the kernel refuses a netlink protocol outside 0..31 itself

# syscalls the filter may refuse for some arguments only, and the rule their
# refusals are reported under (clone, personality and memfd_create follow
# their process toggles, see toggle_of); the sensor attaches their entry
# probe so that ordinary calls failing with EPERM are not taken for refusals
BY_ARGUMENT = {
    "socket": ("network.socket", "a socket family or netlink protocol the policy does not list "
                                 "(network.families, network.netlink)"),
    "socketpair": ("network.socket", "a socket family the policy does not list (network.families)"),
    "ioctl": ("process.terminal", "an ioctl that writes into a terminal's input or takes over a "
                                  "console (" + ", ".join(TERMINAL_IOCTLS) + ")"),
    "setpriority": ("syscalls.deny", "setpriority(PRIO_USER): reaches every process of a uid on "
                                     "the host"),
    "ioprio_set": ("syscalls.deny", "ioprio_set(IOPRIO_WHO_USER): reaches every process of a uid "
                                    "on the host"),
}
CONDITIONAL = frozenset(BY_ARGUMENT) | {"clone", "personality", "memfd_create"}

# policy toggle -> (syscalls denied when it is False, why)
GROUPS = {
    "ptrace": (("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
               "reads or writes another process's memory or file descriptors"),
    "change_uid": (("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                    "setfsuid", "setfsgid", "setgroups"),
                   "changes user or group identity"),
    "namespaces": (("unshare", "setns"), "enters or creates namespaces"),
    "bpf": (("bpf",), "loads BPF programs or edits BPF maps, which could blind the monitor"),
    "modules": (("init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load"),
                "loads kernel code"),
    "io_uring": (("io_uring_setup", "io_uring_enter", "io_uring_register"),
                 "runs file and network operations that seccomp and syscall tracepoints never see"),
    "mount": (("mount", "umount2", "pivot_root", "move_mount", "fsopen", "fsconfig", "fsmount",
               "fspick", "open_tree", "open_tree_attr", "mount_setattr", "chroot"),
              "changes the filesystem view"),
    "keyring": (("keyctl", "add_key", "request_key"),
                "kernel keyrings: a large attack surface agents rarely need"),
}

# seccomp groups judged under another policy toggle's rule (process.<toggle>)
_RULE_TOGGLE = {"mount": "namespaces"}
_POLICY_TOGGLES = ("ptrace", "change_uid", "namespaces", "bpf", "modules", "io_uring")


def toggle_of(name):
    """The process toggle whose `false` makes the filter refuse `name`
    (io_uring_enter -> io_uring, fsopen -> namespaces), or None."""
    for group, (names, _) in GROUPS.items():
        if name in names:
            toggle = _RULE_TOGGLE.get(group, group)
            return toggle if toggle in _POLICY_TOGGLES else None
    return None


# Real Linux syscalls missing from libseccomp 2.5.4's table. Naming one is not a
# typo: it is skipped with a warning (a newer libseccomp resolves it and filters it).
LATER_SYSCALLS = frozenset((
    "statmount", "listmount", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules",
    "mseal", "setxattrat", "getxattrat", "listxattrat", "removexattrat", "open_tree_attr",
    "file_getattr", "file_setattr", "uretprobe",
))

_ARCHES = ("X86_64", "X86", "X32", "AARCH64", "ARM", "RISCV64", "PPC64LE", "S390X", "MIPS64")


@dataclass
class SeccompPolicy:
    """What the agent may do; every False toggle denies a group (see GROUPS)."""
    deny: Sequence[str] = ()
    ptrace: bool = False
    change_uid: bool = True
    namespaces: bool = False
    bpf: bool = False
    modules: bool = False
    io_uring: bool = False
    mount: bool = False
    keyring: bool = False
    personality: bool = False
    memfd_exec: bool = False
    memfd: bool = True          # False: every memfd_create refused (memfd_exec's rule), not just MFD_EXEC
    other: Sequence[str] = ("userfaultfd", "perf_event_open", "kcmp", "lookup_dcookie", "quotactl",
                            "swapon", "swapoff", "reboot", "acct", "settimeofday", "clock_settime",
                            "adjtimex", "iopl", "ioperm", "syslog", "vhangup")
    terminal: bool = False      # False: TERMINAL_IOCTLS refused
    prio_user: bool = False     # False: setpriority(PRIO_USER), ioprio_set(IOPRIO_WHO_USER) refused
    # AF_* numbers socket()/socketpair() may create; None: no family rule (no
    # network section enforced). AF_UNSPEC (0) is never refused: the kernel
    # has no such family and says EAFNOSUPPORT itself.
    socket_families: Sequence[int] = None
    netlink_protocols: Sequence[int] = (0,)   # with AF_NETLINK allowed: NETLINK_ROUTE only
    action: str = "errno"
    # per rule group, overriding `action`: a toggle name (see GROUPS), "personality",
    # "memfd_exec", "other", "deny", "terminal", "prio_user" or "socket"; the
    # policy's on_violation decides (sandbox/plan.py)
    actions: dict = field(default_factory=dict)

    def action_of(self, group):
        return self.actions.get(group, self.action)


@dataclass(frozen=True)
class Cond:
    """Matches when (args[arg] & mask) == value (libseccomp MASKED_EQ), or
    with op "ge" when args[arg] >= value, all 64 bits unsigned (mask unused).

    Masks below 2**32 look at the low 32 bits only, which is what the kernel
    reads for `int` and `unsigned int` arguments (personality, memfd_create
    flags, socket families, ioctl requests)."""
    arg: int
    mask: int
    value: int
    op: str = "eq"

    def matches(self, args):
        v = args[self.arg]
        return v >= self.value if self.op == "ge" else v & self.mask == self.value


@dataclass(frozen=True)
class Rule:
    """One filter rule. action: "errno" (EPERM), "kill" (KILL_PROCESS) or
    "enosys" (clone3 only). The rule fires when all conds match."""
    syscall: str
    action: str
    conds: tuple = ()
    why: str = ""
    group: str = ""      # the SeccompPolicy key that made it (a process toggle, "deny", ...)


class Plan(list):
    """A list of Rule, plus `warnings`: names that could not be filtered here."""

    def __init__(self, rules=(), warnings=()):
        super().__init__(rules)
        self.warnings = list(warnings)


def _need_seccomp():
    if seccomp is None:
        raise KernelFeatureError("libseccomp's Python bindings are missing: install Debian/Ubuntu "
                                 "python3-seccomp and use a venv made with --system-site-packages")


def _classify(name):
    """'native' if libseccomp can filter `name` here; 'elsewhere' (a syscall of
    other architectures only) or 'too new' (missing from libseccomp's table)
    if it is real but cannot be filtered; 'unknown' otherwise. libseccomp
    returns -1 for names it does not know and other negative pseudo-numbers
    for names that exist on other architectures only."""
    if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) >= 0:
        return "native"
    if name in LATER_SYSCALLS:
        return "too new"
    for arch in _ARCHES:
        if seccomp.resolve_syscall(getattr(seccomp.Arch, arch), name) != -1:
            return "elsewhere"
    return "unknown"


def _personality_rules(action):
    """personality(p) is denied unless p's low 32 bits (the kernel takes an
    unsigned int) are 0 (PER_LINUX) or 0xffffffff (query). That is: deny when
    the 32 bits are not all equal. libseccomp allows one comparison per
    argument per rule, so this is written as 32 masked compares around a ring
    of bits: "bit i is 1 and bit i+1 (mod 32) is 0". Any word that is neither
    all zeros nor all ones has such a 1->0 step somewhere around the ring."""
    rules = []
    for i in range(32):
        hi, lo = 1 << i, 1 << ((i + 1) % 32)
        rules.append(Rule("personality", action, (Cond(0, hi | lo, hi),),
                          "personality other than PER_LINUX or the query"))
    return rules


def _socket_rules(p, action):
    """socket() and socketpair() of a family outside p.socket_families, or
    of a netlink protocol outside p.netlink_protocols. libseccomp takes one
    comparison per argument per rule (conditions ANDed), so "not in the
    set" is one rule per refused value: families 1..63 each on their low 32
    bits, everything from 64 up by one 64-bit compare (over-refusing only
    values with high bits set, which no libc passes); netlink protocols
    0..31 each (the kernel refuses the rest itself, EPROTONOSUPPORT)."""
    from ..policy.model import NETLINK_PROTOCOLS, SOCKET_FAMILIES
    family = {n: f for f, n in SOCKET_FAMILIES.items()}
    protocol = {n: f for f, n in NETLINK_PROTOCOLS.items()}
    allowed = set(p.socket_families)
    conds = [((Cond(0, U32, f),), f"family {family.get(f, f)}: not in network.families")
             for f in range(1, FAMILY_RULES_UPTO) if f not in allowed]
    conds.append(((Cond(0, 0, FAMILY_RULES_UPTO, "ge"),), "an unknown family (64 or more)"))
    if AF_NETLINK in allowed:
        conds += [((Cond(0, U32, AF_NETLINK), Cond(2, U32, proto)),
                   f"netlink protocol {protocol.get(proto, proto)}: not in network.netlink")
                  for proto in range(NETLINK_MAX_LINKS) if proto not in set(p.netlink_protocols)]
    if 17 not in allowed:   # AF_PACKET
        conds.append(((Cond(0, U32, AF_INET), Cond(1, SOCK_TYPE_MASK, SOCK_PACKET)),
                      "SOCK_PACKET, a packet socket: packet is not in network.families"))
    return [Rule(name, action, c, why) for name in ("socket", "socketpair") for c, why in conds]


def plan(p: SeccompPolicy) -> Plan:
    """The rules for policy p, in order. Pure: loads nothing.

    Raises ValueError naming every syscall name that is not a Linux syscall.
    A syscall that exists but cannot be filtered on this architecture or by
    this libseccomp is skipped and listed in the result's `warnings`."""
    _need_seccomp()
    if p.action not in ACTIONS:
        raise ValueError(f"seccomp action must be one of {', '.join(ACTIONS)}, not {p.action!r}")
    for group, act in p.actions.items():
        if act not in ACTIONS:
            raise ValueError(f"seccomp action for {group} must be one of {', '.join(ACTIONS)}, "
                             f"not {act!r}")
    act = p.action_of
    rules = []
    for toggle, (names, why) in GROUPS.items():
        if not getattr(p, toggle):
            rules += [Rule(n, act(toggle), (), why) for n in names]
    if not p.namespaces:
        rules.append(Rule("clone3", "enosys", (), "flags unreadable: glibc falls back to clone"))
        rules += [Rule("clone", act("namespaces"), (Cond(0, bit, bit),), f"clone with {flag}",
                       "namespaces")
                  for flag, bit in CLONE_NEW_FLAGS.items()]
    if not p.personality:
        rules += _personality_rules(act("personality"))
    if not p.memfd:
        rules.append(Rule("memfd_create", act("memfd_exec"), (), "every memfd (fileless execution)"))
    if not p.memfd_exec:
        rules.append(Rule("memfd_create", act("memfd_exec"), (Cond(1, MFD_EXEC, MFD_EXEC),),
                          "with MFD_EXEC"))
    if not p.terminal:
        rules += [Rule("ioctl", act("terminal"), (Cond(1, U32, req),), f"{name}: {why}")
                  for name, (req, why) in TERMINAL_IOCTLS.items()]
    if not p.prio_user:
        rules += [Rule("setpriority", act("prio_user"), (Cond(0, U32, PRIO_USER),),
                       "PRIO_USER reaches every process of a uid on the host"),
                  Rule("ioprio_set", act("prio_user"), (Cond(0, U32, IOPRIO_WHO_USER),),
                       "IOPRIO_WHO_USER reaches every process of a uid on the host")]
    if p.socket_families is not None:
        rules += _socket_rules(p, act("socket"))
    rules += [Rule(n, act("other"), (), "always denied (policy: other)") for n in p.other]
    rules += [Rule(n, act("deny"), (), "denied by policy (syscalls.deny)") for n in p.deny]

    kinds = {r.syscall: _classify(r.syscall) for r in rules}
    unknown = sorted(n for n, k in kinds.items() if k == "unknown")
    if unknown:
        raise ValueError(f"unknown syscall name(s): {', '.join(unknown)}")
    why_not = {"elsewhere": f"not a syscall on {_native_arch_name()}",
               "too new": "newer than this libseccomp's syscall table"}
    warnings = [f"{n}: {why_not[k]}; not filtered" for n, k in kinds.items() if k in why_not]

    # One action per syscall (libseccomp refuses conflicting ones), and an
    # unconditional rule makes conditional rules for that syscall redundant:
    # the first unconditional rule wins (so clone3 stays ENOSYS, which keeps
    # glibc's threads working, even if syscalls.deny names it).
    unconditional = {}
    for r in rules:
        if not r.conds:
            unconditional.setdefault(r.syscall, r)
    out, seen = [], set()
    for r in rules:
        if kinds[r.syscall] != "native":
            continue
        u = unconditional.get(r.syscall)
        if u is not None:
            if r is u:
                out.append(r)
        elif (r.syscall, r.conds) not in seen:
            seen.add((r.syscall, r.conds))
            out.append(r)
    return Plan(out, warnings)


def errno_denied(p: SeccompPolicy) -> list[str]:
    """Names of the syscalls the filter refuses with EPERM (some calls of them,
    for conditional rules): the syscall sensor watches their exits, since a
    refused call never reaches sys_enter. Kill rules need no sensor: the
    SIGSYS exit reports them."""
    return list(dict.fromkeys(r.syscall for r in plan(p) if r.action == "errno"))


def _native_arch_name():
    native = seccomp.system_arch() & 0xFFFFFFFF   # Arch.* are signed, system_arch() is not
    for arch in _ARCHES:
        if getattr(seccomp.Arch, arch) & 0xFFFFFFFF == native:
            return arch.lower()
    return f"arch {native:#x}"


def _action(name):
    if name == "errno":
        return seccomp.ERRNO(errno.EPERM)
    if name == "enosys":
        return seccomp.ERRNO(errno.ENOSYS)
    if name == "kill":
        return seccomp.KILL_PROCESS
    raise ValueError(f"unknown rule action {name!r}")


def build(p: SeccompPolicy):
    """A seccomp.SyscallFilter for p: default ALLOW, the plan's denies, only the
    native architecture (other ABIs hit ACT_BADARCH = KILL_PROCESS; on x86_64
    that includes x32 numbers, see the module docstring), no_new_privs on load."""
    rules = plan(p)
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    f.set_attr(seccomp.Attr.CTL_NNP, 1)
    for r in rules:
        args = [seccomp.Arg(c.arg, seccomp.GE, c.value) if c.op == "ge" else
                seccomp.Arg(c.arg, seccomp.MASKED_EQ, c.mask, c.value) for c in r.conds]
        f.add_rule(_action(r.action), r.syscall, *args)
    return f


def apply(p: SeccompPolicy) -> None:
    """Build and load p's filter into the calling process. Call it in the
    forked child just before exec (it is inherited across exec and by every
    descendant, and cannot be removed). Sets no_new_privs. Raises on failure:
    the launcher reports the step and the child exits without exec."""
    build(p).load()


def describe(p: SeccompPolicy) -> list[str]:
    """Human lines for `policy explain` and the run start banner."""
    rules = plan(p)
    verbs = {"errno": "EPERM", "kill": "kill the process (SIGSYS)"}
    kills = sorted(g for g, a in p.actions.items() if a != p.action)
    but = f" ({', '.join(kills)}: {verbs['kill' if p.action == 'errno' else 'errno']})" if kills else ""
    lines = [f"seccomp: default allow; denied syscalls -> {verbs[p.action]}{but}; "
             "non-native ABIs (i386 int 0x80, x32) -> kill the process"]
    present = {r.syscall for r in rules}
    for toggle, (names, why) in GROUPS.items():
        if not getattr(p, toggle):
            lines.append(f"  {toggle}: {', '.join(n for n in names if n in present)} denied ({why})")
            if toggle == "namespaces":
                lines.append("  namespaces: clone with CLONE_NEW* flags denied; clone3 -> ENOSYS "
                             "(its flags cannot be read; glibc falls back to clone)")
    if not p.personality:
        lines.append("  personality: only PER_LINUX (0) and the query 0xffffffff")
    if not p.memfd:
        lines.append("  memfd_create: refused (no memfd at all: one without MFD_EXEC is "
                     "executable too)")
    elif not p.memfd_exec:
        lines.append("  memfd_create: MFD_EXEC refused; exec of a memfd (fexecve) is invisible "
                     "to seccomp and left to Landlock and exec monitoring")
    if not p.terminal:
        lines.append(f"  ioctl: {', '.join(TERMINAL_IOCTLS)} refused (terminal input injection, "
                     "console take-over; compared on the low 32 bits)")
    if not p.prio_user:
        lines.append("  setpriority(PRIO_USER), ioprio_set(IOPRIO_WHO_USER) refused (they reach "
                     "every process of a uid on the host)")
    if p.socket_families is not None:
        from ..policy.model import NETLINK_PROTOCOLS, SOCKET_FAMILIES
        fam_name = {n: f for f, n in SOCKET_FAMILIES.items()} | {AF_NETLINK: "netlink"}
        proto_name = {n: f for f, n in NETLINK_PROTOCOLS.items()}
        fams = [fam_name.get(f, str(f)) for f in sorted(p.socket_families)]
        protos = [proto_name.get(n, str(n)) for n in sorted(p.netlink_protocols)]
        netlink = (f" (netlink: {', '.join(protos)} only)" if AF_NETLINK in p.socket_families
                   and len(protos) < NETLINK_MAX_LINKS else "")
        lines.append(f"  socket, socketpair: only {', '.join(fams)}{netlink}; other families "
                     "refused (compared on the low 32 bits)")
    other = [n for n in p.other if n in present]
    if other:
        lines.append(f"  always denied: {', '.join(other)}")
    deny = [n for n in p.deny if n in present]
    if deny:
        lines.append(f"  denied by policy: {', '.join(deny)}")
    lines += [f"  warning: {w}" for w in rules.warnings]
    return lines
