"""What a policy IS: the typed model that ``validate`` (schema.py) builds
from a document, and the tables its words come from.

The dataclasses (``PolicySpec`` and its sections, ``Problem``, ``Item``...)
are what load, lint, explain, diff, compile and the sandbox read; the tables
(SECTIONS, RULES, TOGGLES, SOCKET_FAMILIES, NETLINK_PROTOCOLS,
HOST_NAMESPACES...) are the vocabulary, shared by the validator and by the
layers that apply a policy, with the syscall names this host knows (for
syscalls.deny, from libseccomp). Nothing here reads a document.
"""
import functools
import shlex
from dataclasses import dataclass, field

from .matchers import name_matcher
from .source import Loc

# --------------------------------------------------------------- tables

API_VERSION = "agentwatch/v1"
SENSOR_GROUPS = ("process", "file", "net", "sensitive", "signal")   # = agentwatch.sensors.syscalls.GROUPS
SECTIONS = ("filesystem", "network", "process", "syscalls", "resources", "identity", "peers")
PROTOCOLS = ("tcp", "udp", "any")
# socket families by name (linux/socket.h) for network.families; netlink is
# network.netlink's (by protocol), so it is not listed here
SOCKET_FAMILIES = {"unix": 1, "inet": 2, "ax25": 3, "ipx": 4, "appletalk": 5, "x25": 9,
                   "inet6": 10, "key": 15, "packet": 17, "rds": 21, "llc": 26, "ib": 27,
                   "mpls": 28, "can": 29, "tipc": 30, "bluetooth": 31, "alg": 38, "nfc": 39,
                   "vsock": 40, "kcm": 41, "qipcrtr": 42, "smc": 43, "xdp": 44, "mctp": 45}
DEFAULT_FAMILIES = ("unix", "inet", "inet6")
# netlink protocols by name (linux/netlink.h) for network.netlink
NETLINK_PROTOCOLS = {"route": 0, "usersock": 2, "sock_diag": 4, "nflog": 5, "xfrm": 6,
                     "selinux": 7, "iscsi": 8, "audit": 9, "fib_lookup": 10, "connector": 11,
                     "netfilter": 12, "ip6_fw": 13, "dnrtmsg": 14, "kobject_uevent": 15,
                     "generic": 16, "scsitransport": 18, "ecryptfs": 19, "rdma": 20,
                     "crypto": 21, "smc": 22}
DEFAULT_NETLINK = ("route",)

# process toggles -> the syscalls that exercise them (check_syscall judges by name)
TOGGLES = {
    "ptrace": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
    "change_uid": ("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                   "setfsuid", "setfsgid", "setgroups"),
    "namespaces": ("unshare", "setns"),
    "bpf": ("bpf",),
    "modules": ("init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load"),
    "io_uring": ("io_uring_setup",),
    "memfd_exec": ("memfd_create",),
}

# why the broker refuses a scope token (protocol.token_<reason>, docs/policy.md "Rules")
TOKEN_REFUSALS = ("invalid", "expired", "widened", "replayed", "exhausted", "holder", "revoked",
                  "scope")

RULES = ("filesystem.read", "filesystem.write", "filesystem.exec", "filesystem.deny",
         "network.egress", "network.loopback", "network.unix", "network.bind", "network.socket",
         "network.domain",
         "process.exec", "process.max_processes", *(f"process.{t}" for t in TOGGLES), "process.signal",
         "process.terminal",
         "syscalls.deny", "resources.memory", "resources.cpu", "resources.pids",
         "resources.wall_time", "resources.llm_tokens", "resources.llm_requests", "resources.llm_cost",
         "identity.name", "identity.signer", "identity.prompt", "identity.sender",
         # the agent-to-agent broker (peers section; category protocol)
         "protocol.peer", "protocol.facts", "protocol.grant", "protocol.rate",
         *(f"protocol.token_{t}" for t in TOKEN_REFUSALS))

# violation categories (events.CATEGORIES; docs/policy.md "Rules") -> policy section names
CATEGORY_SECTION = {"filesystem": "filesystem", "network": "network", "process": "process",
                    "syscall": "syscalls", "resource": "resources", "identity": "identity",
                    "protocol": "peers"}

# the namespaces process.host_namespaces may share with the host (sandbox/namespaces.py)
HOST_NAMESPACES = ("pid", "ipc", "net")

# at most this many network.loopback ports are relayed into a run's own
# network namespace (one listener each, per family): more keeps the host's
MAX_RELAY_PORTS = 64

# peers (the agent-to-agent broker): defaults and bounds, in seconds
DEFAULT_MAX_TTL, MAX_MAX_TTL = 3600.0, 86400.0      # a scope token's longest lifetime
DEFAULT_TOOL_TIMEOUT, MAX_TOOL_TIMEOUT = 10.0, 300.0
DEFAULT_RATE, MAX_RATE = 200, 100000                 # messages per second

# termination (engine/termination.py): defaults and bounds, in seconds
DEFAULT_CHECK_EVERY, MIN_CHECK_EVERY = 30.0, 1.0     # a done command's period
DEFAULT_CHECK_TIMEOUT, MAX_CHECK_TIMEOUT = 10.0, 300.0
DEFAULT_GRACE, MAX_GRACE = 5.0, 300.0                # SIGTERM, then this long, then SIGKILL
MIN_NO_PROGRESS = 1.0
# termination.loop: the same thing this many times is a loop (at least 2)
LOOP_KEYS = ("exec", "failing", "workspace")
BUDGET_KEYS = ("execs", "bytes_written", "processes", "llm_tokens", "wall_time")


def host_network_why(allow, loopback, guard=False):
    """Why an enforced network section keeps the host's network namespace,
    or None: the run then gets one of its own, with only lo, and its
    loopback ports relayed to the host's (sandbox/netns.py). allow: the
    network.allow rules; loopback: True, False or port ranges [(lo, hi)];
    guard: the egress guard is on (network.guard)."""
    if allow:
        return "network.allow permits remote egress"
    if guard:
        return "network.guard: the egress guard listens on the host's loopback"
    if loopback is True:
        return "network.loopback: true allows every loopback port, which no relay can listen on"
    n = len(relay_ports(loopback))
    if n > MAX_RELAY_PORTS:
        return f"network.loopback lists {n} ports, more than the {MAX_RELAY_PORTS} the relay serves"
    return None


def relay_ports(loopback):
    """The loopback ports a run of its own network namespace gets relayed."""
    return sorted({p for lo, hi in (loopback or ()) if loopback is not True for p in range(lo, hi + 1)})



# --------------------------------------------------------------- model

@dataclass(frozen=True)
class Problem:
    loc: Loc
    message: str
    severity: str = "error"            # "error" | "warning"

    def __str__(self):
        tag = "warning: " if self.severity == "warning" else ""
        return f"{self.loc}: {tag}{self.message}"


@dataclass(frozen=True)
class Item:
    """A string as written in the policy (a glob, a syscall name) and where."""
    value: str
    loc: Loc


@dataclass(frozen=True)
class NetRule:
    cidr: str = None
    domain: str = None
    ports: tuple = None                # ((lo, hi), ...); None = any port
    protocol: str = "any"
    loc: Loc = None

    @property
    def target(self):
        return self.cidr or self.domain

    def ports_text(self):
        """'443/tcp', '8000-8100', 'any port', 'any udp port'."""
        if not self.ports:
            return "any port" if self.protocol == "any" else f"any {self.protocol} port"
        text = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        return text if self.protocol == "any" else f"{text}/{self.protocol}"

    def describe(self):
        """'443/tcp to pypi.org', '10.0.0.0/8 (any port)'."""
        if not self.ports:
            return f"{self.target} ({self.ports_text()})"
        return f"{self.ports_text()} to {self.target}"


@dataclass(frozen=True)
class ExecRule:
    path: str
    sha256: str = None
    loc: Loc = None

    def describe(self):
        return f"{self.path} (sha256 {self.sha256[:12]}...)" if self.sha256 else self.path


@dataclass
class Filesystem:
    read: tuple = None                 # tuple[Item]; None = not restricted
    write: tuple = None
    exec: tuple = None
    deny: tuple = ()


@dataclass
class Network:
    allow: tuple = ()                  # tuple[NetRule]
    loopback: object = False           # bool | ((lo, hi), ...)
    unix: object = False               # bool | tuple[Item]
    families: tuple = DEFAULT_FAMILIES     # socket families (names), netlink aside
    netlink: object = DEFAULT_NETLINK      # True (any protocol) | tuple of protocol names ((): none)
    guard: object = None               # the egress guard: True, False, None (on with domain rules)

    def guarded(self):
        """Whether the egress guard decides this section's TCP and DNS."""
        return self.guard if self.guard is not None else any(r.domain for r in self.allow)

    def family_numbers(self):
        """AF_* numbers socket() may create: the families, and netlink when
        any netlink protocol is allowed."""
        nums = {SOCKET_FAMILIES[f] for f in self.families}
        return sorted(nums | ({16} if self.netlink else set()))

    def netlink_numbers(self):
        """Netlink protocol numbers allowed (all 32 for True)."""
        return list(range(32)) if self.netlink is True else sorted(NETLINK_PROTOCOLS[n] for n in self.netlink)


@dataclass(frozen=True)
class RunAs:
    """process.run_as as written: user and group are names (str) or ids (int);
    group None = the user's primary group; groups None = no supplementary
    groups. Resolved against this host by agentwatch.sandbox.credentials."""
    user: object
    group: object = None
    groups: tuple = None
    loc: Loc = None

    def describe(self):
        """'agent', 'uid 65534, group 65534, groups: 100, docker'."""
        text = f"uid {self.user}" if isinstance(self.user, int) else str(self.user)
        if self.group is not None:
            text += f", group {self.group}"
        if self.groups:
            text += ", groups: " + ", ".join(map(str, self.groups))
        return text


@dataclass
class Process:
    exec: tuple = None                 # tuple[ExecRule]; None = any program
    max_processes: int = None
    toggles: dict = field(default_factory=dict)   # name -> bool, only those written
    run_as: RunAs = None               # None: the agent runs as agentwatch's user (root)
    host_namespaces: tuple = ()        # namespaces the agent shares with the host: "pid", "ipc"


@dataclass
class Identity:
    name: str = None
    owner: str = None
    required_signer: str = None


@dataclass(frozen=True)
class Tool:
    """peers.tools.NAME: a program the broker runs inside this run's sandbox
    for a token holder; the call's arguments are appended to argv."""
    name: str
    argv: tuple
    timeout: float = DEFAULT_TOOL_TIMEOUT
    loc: Loc = None

    def describe(self):
        """'/usr/bin/wc -l (+ the call's arguments), timeout 10s'."""
        return f"{shlex.join(self.argv)} (+ the call's arguments), timeout {duration_text(self.timeout)}"


@dataclass
class Peers:
    """The peers section: this run's agent card and what it may say to, hear
    from and lend to other runs through the broker. Absent lists allow
    nothing; globs in send/receive are over agent names (identity.name's)."""
    description: str = None
    skills: tuple = ()                 # ({"name": str, "description": str | None}, ...)
    send: tuple = ()                   # tuple[Item] of agent-name globs
    receive: tuple = ()
    grant: tuple = ()                  # tuple[Item] of tool names
    accept: tuple = ()
    tools: dict = field(default_factory=dict)     # name -> Tool
    max_ttl: float = DEFAULT_MAX_TTL   # seconds
    rate: int = DEFAULT_RATE           # messages per second

    @staticmethod
    def _matches(globs, agent):
        return any(name_matcher(g.value)(agent or "") for g in globs)

    def may_send(self, agent):
        """Whether a message to the agent named ``agent`` is allowed."""
        return self._matches(self.send, agent)

    def may_receive(self, agent):
        """Whether a message from the agent named ``agent`` is accepted."""
        return self._matches(self.receive, agent)

    def may_grant(self, tool):
        """Whether this run may mint scope tokens for its tool ``tool``."""
        return any(i.value == tool for i in self.grant)

    def may_accept(self, tool):
        """Whether this run may hold and use a token for a tool ``tool``."""
        return any(i.value == tool for i in self.accept)


def duration_text(seconds):
    """3600 -> '1h', 90 -> '1m30s', 0.5 -> '0.5s' (a duration the units parser reads)."""
    rest, parts = float(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        n = int(rest // size)
        if n:
            parts.append(f"{n}{unit}")
            rest -= n * size
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)


@dataclass(frozen=True)
class DoneCondition:
    """One of termination.done: a file exists (and its content matches a
    regex), or a command exits 0. Paths as written (variables unexpanded)."""
    file: str = None
    matches: str = None                # Python regex, searched with re.MULTILINE
    command: tuple = None              # argv, run in the run's sandbox (argv[0] absolute)
    message: dict = None               # {"to": agent, "tag": tag}: this run's broker message so tagged reached it
    every: float = DEFAULT_CHECK_EVERY
    timeout: float = DEFAULT_CHECK_TIMEOUT
    loc: Loc = None

    def describe(self):
        """'the file ${WORKSPACE}/DONE exists', "make -q test exits 0 (...)"."""
        if self.file is not None:
            text = f"the file {self.file} exists"
            return text + (f" and its content matches /{self.matches}/" if self.matches else "")
        if self.message is not None:
            return (f"a broker message of this run tagged {self.message['tag']!r} reaches agent "
                    f"{self.message['to']!r}")
        return (f"{shlex.join(self.command)} exits 0 (run in the run's sandbox when the workspace "
                f"changes and every {duration_text(self.every)}, at most {duration_text(self.timeout)} each)")


@dataclass
class TerminationRules:
    """The termination section: when a run is over although its agent still
    runs. None/absent keys: that condition is not checked."""
    done: tuple = ()                   # tuple[DoneCondition]; any one holding ends the run
    no_progress: float = None          # seconds without a workspace write or an exec
    loop: dict = field(default_factory=dict)     # LOOP_KEYS -> K (the same thing K times)
    budget: dict = field(default_factory=dict)   # BUDGET_KEYS -> a count, bytes or seconds
    grace: float = DEFAULT_GRACE


def size_text(n):
    """104857600 -> '100MiB', 1536 -> '1.5KiB', 100 -> '100 bytes'."""
    for unit, size in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n} bytes"


@dataclass
class Resources:
    memory: int = None                 # bytes
    cpu: float = None                  # CPUs
    pids: int = None
    wall_time: float = None            # seconds
    written: dict = field(default_factory=dict)   # as written, for explain/diff


@dataclass
class OnViolation:
    default: str = None
    sections: dict = field(default_factory=dict)
    rules: dict = field(default_factory=dict)


@dataclass
class PolicySpec:
    name: str = ""
    description: str = ""
    identity: Identity = None
    filesystem: Filesystem = None
    network: Network = None
    process: Process = None
    syscalls: tuple = None             # tuple[Item] of syscalls.deny
    resources: Resources = None
    peers: Peers = None                # None: no agent-to-agent messages at all
    termination: TerminationRules = None   # None: the run ends when its agent exits
    on_violation: OnViolation = field(default_factory=OnViolation)
    monitor: tuple = None
    locs: dict = field(default_factory=dict)      # "process.ptrace" -> Loc of the value

    def action_for(self, category, rule=None):
        """rules[rule] > section > default > alert."""
        ov = self.on_violation
        section = CATEGORY_SECTION.get(category, category)
        return ov.rules.get(rule) or ov.sections.get(section) or ov.default or "alert"

    def needed_groups(self):
        """Sensor groups the rules need to be judged at all."""
        groups = ["process"]
        if self.filesystem is not None or self.identity is not None or self.termination is not None:
            groups.append("file")         # termination: workspace writes are progress
        if self.network is not None:
            groups.append("net")
        if (self.process is not None and False in self.process.toggles.values()) or self.syscalls:
            groups.append("sensitive")
        if self.process is not None:
            groups.append("signal")       # process.signal: signals to processes outside the run
        return groups

    def sensor_groups(self):
        """``monitor:`` when given, else what the rules need."""
        return list(self.monitor) if self.monitor is not None else self.needed_groups()


# --------------------------------------------------------------- syscall names

@functools.lru_cache(maxsize=1)
def _seccomp():
    try:
        import seccomp             # Debian python3-seccomp; see README
        return seccomp
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def native_syscalls():
    """Names of the native architecture's syscalls, from libseccomp's table."""
    sc = _seccomp()
    if sc is None:
        return ()
    names = []
    for nr in range(0, 1024):
        try:
            name = sc.resolve_syscall(sc.Arch.NATIVE, nr)
        except (ValueError, OSError):
            continue
        if name:
            names.append(name.decode() if isinstance(name, bytes) else name)
    return tuple(names)


def syscall_status(name):
    """'native', 'other-arch' (known to libseccomp, absent here), 'unknown',
    or 'unchecked' when libseccomp's bindings are missing."""
    sc = _seccomp()
    if sc is None:
        return "unchecked"
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    return "native" if nr >= 0 else ("unknown" if nr == -1 else "other-arch")

