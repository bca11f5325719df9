"""The policy format as a typed model, and the one validator that both
``load`` and ``lint`` use.

``validate(doc)`` takes the effective document (a located Map, see
source.py) and returns the typed ``PolicySpec`` and every problem found, each
a ``Problem`` with FILE:LINE:COL. Errors make a policy unusable; warnings
(shadowed rules, W^X...) are reported by lint and kept on the Policy.
The format itself is documented in docs/policy.md and, for editors, in
policies/agentpolicy.schema.json; tests keep the three in step.
"""
import difflib
import functools
import ipaddress
import re
from dataclasses import dataclass, field

from ..core import units
from ..core.events import ACTIONS          # the violation actions (the contract in events.py)
from . import matchers as M
from .source import Loc, yaml_type

API_VERSION = "agentwatch/v1"
SENSOR_GROUPS = ("process", "file", "net", "sensitive", "signal")   # = agentwatch.sensors.syscalls.GROUPS
SECTIONS = ("filesystem", "network", "process", "syscalls", "resources", "identity")
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

RULES = ("filesystem.read", "filesystem.write", "filesystem.exec", "filesystem.deny",
         "network.egress", "network.loopback", "network.unix", "network.bind", "network.socket",
         "process.exec", "process.max_processes", *(f"process.{t}" for t in TOGGLES), "process.signal",
         "process.terminal",
         "syscalls.deny", "resources.memory", "resources.cpu", "resources.pids",
         "resources.wall_time", "identity.name", "identity.signer")

# violation categories (events.CATEGORIES; docs/policy.md "Rules") -> policy section names
CATEGORY_SECTION = {"filesystem": "filesystem", "network": "network", "process": "process",
                    "syscall": "syscalls", "resource": "resources", "identity": "identity"}

_SIGNER = re.compile(r"ed25519:[0-9a-fA-F]{64}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# a user or group name as shadow-utils accepts it (no all-digit names: those are ids)
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
MAX_ID = 4294967294              # (uid_t)-1 means "unchanged" to the set*id calls
# what the kernel takes as a limit (sandbox/limits.py writes them; more or
# less is refused with EINVAL/ERANGE, measured on 6.18):
MAX_PIDS = 4194304               # PID_MAX_LIMIT, the largest pids.max
MIN_CPU, MAX_CPU = 0.01, 4096    # a CFS quota of at least 1 ms per 100 ms period
RUN_AS_KEYS = ("user", "group", "groups")
PROCESS_KEYS = ("exec", "max_processes", *TOGGLES, "run_as", "host_namespaces")


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
        if self.filesystem is not None or self.identity is not None:
            groups.append("file")
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


# --------------------------------------------------------------- validation helpers

def _did_you_mean(word, choices):
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


MAX_PROBLEMS = 100


class _TooMany(Exception):
    pass


class _Checker:
    """Collects problems; stops the validation at MAX_PROBLEMS (a file of
    70,000 unknown keys needs its first hundred reported, not all)."""

    def __init__(self):
        self.problems = []

    def _add(self, problem):
        self.problems.append(problem)
        if len(self.problems) >= MAX_PROBLEMS:
            raise _TooMany()

    def error(self, loc, message):
        self._add(Problem(loc, message))

    def warn(self, loc, message):
        self._add(Problem(loc, message, "warning"))

    def mapping(self, value, loc, name, known):
        """value if it is a mapping (reporting unknown keys), else None."""
        if not isinstance(value, dict):
            self.error(loc, f"{name}: expected a mapping, got {yaml_type(value)}")
            return None
        for key in value:
            if key not in known:
                where = f" in {name}" if name != "policy" else ""
                self.error(value.key_locs[key], f"unknown key {key!r}{where}{_did_you_mean(key, known)}")
        return value

    def entries(self, m, known):
        """(key, value, value_loc) of the known keys present, in schema order."""
        for key in known:
            if key in m:
                yield key, m[key], m.val_locs[key]

    def string(self, value, loc, name, what="a string"):
        if not isinstance(value, str):
            self.error(loc, f"{name}: expected {what}, got {yaml_type(value)}")
            return None
        return value

    def boolean(self, value, loc, name):
        if not isinstance(value, bool):
            self.error(loc, f"{name}: expected true or false, got {yaml_type(value)}")
            return None
        return value

    def integer(self, value, loc, name, minimum=1, maximum=None):
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(loc, f"{name}: expected an integer, got {yaml_type(value)}")
            return None
        if value < minimum:
            self.error(loc, f"{name}: must be at least {minimum}, got {value}")
            return None
        if maximum is not None and value > maximum:
            self.error(loc, f"{name}: must be at most {maximum}, got {value}")
            return None
        return value

    def unit(self, parse, value, loc, name):
        """A duration or size parsed by agentwatch.core.units, the parser the
        sandbox applies it with; None (reported) when it is not one."""
        try:
            return parse(value)
        except units.UnitError as e:
            self.error(loc, f"{name}: {e}")
            return None

    def items(self, value, loc, name, what):
        """(index, item, loc) of a list; reports a non-list and exact
        duplicates (dropped)."""
        if not isinstance(value, list):
            self.error(loc, f"{name}: expected a list of {what}, got {yaml_type(value)}")
            return None
        seen, out = {}, []
        for i, (item, iloc) in enumerate(zip(value, value.item_locs)):
            key = repr(item)
            if key in seen:
                self.warn(iloc, f"{name}: duplicate entry {item!r} (already at {seen[key].ref(iloc)})")
                continue
            seen[key] = iloc
            out.append((i, item, iloc))
        return out

    def strings(self, value, loc, name, what, one):
        """Items of a list of strings (``what``; each ``one``), as Item;
        None if value is not a list."""
        triples = self.items(value, loc, name, what)
        if triples is None:
            return None
        out = []
        for i, item, iloc in triples:
            if isinstance(item, str):
                out.append(Item(item, iloc))
            else:
                self.error(iloc, f"{name}[{i}]: expected {one}, got {yaml_type(item)}")
        return out

    def globs(self, value, loc, name):
        out = self.strings(value, loc, name, "path globs", "a path glob")
        if out is None:
            return None
        good = []
        for item in out:
            if self.glob(item, name):
                good.append(item)
        return tuple(good)

    def glob(self, item, name):
        errors, warnings = M.check_glob(item.value)
        for message in errors:
            self.error(item.loc, f"{name}: {message}")
        for message in warnings:
            self.warn(item.loc, f"{name}: {message}")
        return not errors

    def action(self, value, loc, name):
        if value not in ACTIONS:
            shown = value if isinstance(value, str) else yaml_type(value)
            hint = _did_you_mean(value, ACTIONS) if isinstance(value, str) else ""
            self.error(loc, f"{name}: unknown action {shown!r}{hint}; expected one of {', '.join(ACTIONS)}")
            return None
        return value


# --------------------------------------------------------------- sections

TOP_KEYS = ("apiVersion", "kind", "metadata", "extends", "identity", "filesystem", "network",
            "process", "syscalls", "resources", "on_violation", "monitor")


def _metadata(ck, value, loc, spec):
    m = ck.mapping(value, loc, "metadata", ("name", "description"))
    if m is None:
        return
    if "name" not in m:
        ck.error(loc, "metadata: missing required key 'name'")
    for key, v, vloc in ck.entries(m, ("name", "description")):
        s = ck.string(v, vloc, f"metadata.{key}")
        if key == "name" and s is not None:
            if not _NAME.fullmatch(s):
                ck.error(vloc, f"metadata.name: {s!r} is not a name (letters, digits, '.', '_', '-'; "
                               f"at most 63)")
            spec.name = s
        elif key == "description" and s is not None:
            spec.description = s


def _identity(ck, value, loc, spec):
    keys = ("name", "owner", "required_signer")
    m = ck.mapping(value, loc, "identity", keys)
    if m is None:
        return
    ident = spec.identity = Identity()
    for key, v, vloc in ck.entries(m, keys):
        s = ck.string(v, vloc, f"identity.{key}")
        if s is None:
            continue
        if key == "name":
            for message in M.check_name_glob(s, "agent name glob"):
                ck.error(vloc, f"identity.name: {message}")
        elif key == "required_signer" and not _SIGNER.fullmatch(s):
            ck.error(vloc, f"identity.required_signer: expected 'ed25519:' and the key's 64 hex "
                           f"digit fingerprint, got {s!r}")
            continue
        setattr(ident, key, s.lower() if key == "required_signer" else s)


def _filesystem(ck, value, loc, spec):
    keys = ("read", "write", "exec", "deny")
    m = ck.mapping(value, loc, "filesystem", keys)
    if m is None:
        return
    fs = spec.filesystem = Filesystem()
    for key, v, vloc in ck.entries(m, keys):
        globs = ck.globs(v, vloc, f"filesystem.{key}")
        if globs is not None:
            setattr(fs, key, globs)
            spec.locs[f"filesystem.{key}"] = vloc
    fs.deny = fs.deny or ()


def _ports(ck, value, loc, name):
    triples = ck.items(value, loc, name, 'ports (443 or "8000-8100")')
    if triples is None:
        return None
    out = []
    for _, item, iloc in triples:
        rng, err = M.parse_port(item)
        if err:
            ck.error(iloc, f"{name}: {err}")
        else:
            out.append(rng)
    return tuple(out)


def _net_rule(ck, value, loc, name):
    keys = ("cidr", "domain", "ports", "protocol")
    m = ck.mapping(value, loc, name, keys)
    if m is None:
        return None
    if ("cidr" in m) == ("domain" in m):
        ck.error(loc, f"{name}: give exactly one of 'cidr' or 'domain'")
        return None
    rule = {"loc": loc}
    for key, v, vloc in ck.entries(m, keys):
        if key == "ports":
            rule["ports"] = _ports(ck, v, vloc, f"{name}.ports")
            continue
        s = ck.string(v, vloc, f"{name}.{key}")
        if s is None:
            return None
        if key == "cidr":
            net, err = M.parse_cidr(s)
            if err:
                ck.error(vloc, f"{name}.cidr: {err}")
                return None
            rule["cidr"] = str(net)
        elif key == "domain":
            err = M.check_domain(s)
            if err:
                ck.error(vloc, f"{name}.domain: {err}")
                return None
            rule["domain"] = s.lower().rstrip(".")
        elif s not in PROTOCOLS:
            ck.error(vloc, f"{name}.protocol: unknown protocol {s!r}{_did_you_mean(s, PROTOCOLS)}; "
                           f"expected tcp, udp or any")
            return None
        else:
            rule["protocol"] = s
    return NetRule(**rule)


def _unix_entries(ck, value, loc, name):
    items = ck.strings(value, loc, name, 'socket path globs ("@name" for abstract)', "a socket path glob")
    if items is None:
        return None
    good = []
    for item in items:
        if item.value.startswith("@"):
            errors = M.check_name_glob(item.value[1:], "abstract socket name")
            for message in errors:
                ck.error(item.loc, f"{name}: {message}")
            ok = not errors
        else:
            ok = ck.glob(item, name)
        if ok:
            good.append(item)
    return tuple(good)


def _names(ck, value, loc, name, table, what):
    """A list of names from table (socket families, netlink protocols), or None."""
    items = ck.strings(value, loc, name, f"{what} names", f"a {what} name")
    if items is None:
        return None
    good = []
    for item in items:
        if item.value in table:
            good.append(item.value)
        elif name == "network.families" and item.value == "netlink":
            ck.error(item.loc, "network.families: netlink is allowed by protocol: list them in "
                               "network.netlink (default [route])")
        else:
            ck.error(item.loc, f"{name}: unknown {what} {item.value!r}"
                               f"{_did_you_mean(item.value, table)}; known: {', '.join(sorted(table))}")
    return tuple(dict.fromkeys(good))


def _network(ck, value, loc, spec):
    keys = ("allow", "loopback", "unix", "families", "netlink")
    m = ck.mapping(value, loc, "network", keys)
    if m is None:
        return
    net = spec.network = Network()
    for key, v, vloc in ck.entries(m, keys):
        spec.locs[f"network.{key}"] = vloc
        if key == "families":
            net.families = _names(ck, v, vloc, "network.families", SOCKET_FAMILIES, "socket family") or ()
        elif key == "netlink" and not isinstance(v, bool):
            net.netlink = _names(ck, v, vloc, "network.netlink", NETLINK_PROTOCOLS, "netlink protocol") or ()
        elif key == "netlink":
            net.netlink = True if v else ()
        elif key == "allow":
            triples = ck.items(v, vloc, "network.allow", "rules ({cidr: ...} or {domain: ...})")
            rules = [_net_rule(ck, item, iloc, f"network.allow[{i}]") for i, item, iloc in triples or ()]
            net.allow = tuple(r for r in rules if r is not None)
        elif isinstance(v, bool):
            setattr(net, key, v)
        elif not isinstance(v, list):
            what = "a list of ports" if key == "loopback" else "a list of socket path globs"
            ck.error(vloc, f"network.{key}: expected true, false or {what}, got {yaml_type(v)}")
        elif key == "loopback":
            net.loopback = _ports(ck, v, vloc, "network.loopback") or ()
        else:
            net.unix = _unix_entries(ck, v, vloc, "network.unix") or ()


def _exec_entry(ck, item, iloc, name):
    if isinstance(item, str):
        entry = Item(item, iloc)
        return ExecRule(item, None, iloc) if ck.glob(entry, name) else None
    m = ck.mapping(item, iloc, name, ("path", "sha256"))
    if m is None:
        return None
    if "path" not in m:
        ck.error(iloc, f"{name}: missing required key 'path'")
        return None
    path = ck.string(m["path"], m.val_locs["path"], f"{name}.path", "a path")
    if path is None or not ck.glob(Item(path, m.val_locs["path"]), f"{name}.path"):
        return None
    digest = None
    if "sha256" in m:
        sloc = m.val_locs["sha256"]
        digest = ck.string(m["sha256"], sloc, f"{name}.sha256", "64 hex digits")
        if digest is None:
            return None
        if not _SHA256.fullmatch(digest):
            ck.error(sloc, f"{name}.sha256: expected 64 hex digits, got {digest!r}")
            return None
        if M.has_wildcards(path):
            ck.error(sloc, f"{name}.sha256: a pinned hash needs a literal path, not the glob {path!r}")
            return None
    return ExecRule(path, digest.lower() if digest else None, iloc)


def _account(ck, value, loc, name, what):
    """A user or group as written: a name (str) or an id (int, or a string
    of digits); None (reported) when it is neither."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_ID:
            ck.error(loc, f"{name}: {what} id must be between 0 and {MAX_ID}, got {value}")
            return None
        return value
    if not isinstance(value, str):
        ck.error(loc, f"{name}: expected a {what} name or numeric id, got {yaml_type(value)}")
        return None
    if not _ACCOUNT.fullmatch(value):
        ck.error(loc, f"{name}: {value!r} is not a {what} name (letters, digits, '_', '.', '-'; "
                      f"at most 32; not starting with a digit or '-')")
        return None
    return value


def _host_has(kind, value):
    """Whether a named user/group exists on this host (ids always count)."""
    if isinstance(value, int):
        return True
    import grp
    import pwd
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(value)
        return True
    except KeyError:
        return False


def _run_as(ck, value, loc):
    m = ck.mapping(value, loc, "process.run_as", RUN_AS_KEYS)
    if m is None:
        return None
    if "user" not in m:
        ck.error(loc, "process.run_as: missing required key 'user'")
        return None
    fields, ok = {}, True
    for key, v, vloc in ck.entries(m, RUN_AS_KEYS):
        kind = "user" if key == "user" else "group"
        if key == "groups":
            triples = ck.items(v, vloc, "process.run_as.groups", "groups (names or ids)")
            written = [(g, gloc, f"process.run_as.groups[{i}]") for i, g, gloc in triples or ()]
            ok = ok and triples is not None
        else:
            written = [(v, vloc, f"process.run_as.{key}")]
        accounts = []
        for value_, aloc, name in written:
            account = _account(ck, value_, aloc, name, kind)
            ok = ok and account is not None
            accounts.append(account)
            # the policy may be written for another host: a missing account is a
            # warning here, and `agentwatch run` refuses to start on such a host
            if account is not None and not _host_has(kind, account):
                ck.warn(aloc, f"{name}: no {kind} {account!r} on this host; agentwatch run "
                              f"refuses to start here (use a numeric id, or create the {kind})")
        fields[key] = tuple(accounts) if key == "groups" else accounts[0]
    if not ok:
        return None
    if isinstance(fields["user"], int) and fields.get("group") is None:
        import pwd
        try:
            pwd.getpwuid(fields["user"])
        except KeyError:
            ck.warn(m.val_locs["user"], f"process.run_as.user: uid {fields['user']} has no passwd "
                                        f"entry on this host, so it has no primary group here: give "
                                        f"process.run_as.group (agentwatch run refuses to start "
                                        f"without one)")
    return RunAs(loc=loc, **fields)


def _process(ck, value, loc, spec):
    keys = PROCESS_KEYS
    m = ck.mapping(value, loc, "process", keys)
    if m is None:
        return
    proc = spec.process = Process()
    for key, v, vloc in ck.entries(m, keys):
        spec.locs[f"process.{key}"] = vloc
        if key == "exec":
            triples = ck.items(v, vloc, "process.exec", "programs (paths or {path, sha256})")
            if triples is not None:
                rules = [_exec_entry(ck, item, iloc, f"process.exec[{i}]") for i, item, iloc in triples]
                proc.exec = tuple(r for r in rules if r is not None)
        elif key == "max_processes":
            proc.max_processes = ck.integer(v, vloc, "process.max_processes", maximum=MAX_PIDS)
        elif key == "run_as":
            proc.run_as = _run_as(ck, v, vloc)
        elif key == "host_namespaces":
            proc.host_namespaces = _host_namespaces(ck, v, vloc)
        else:
            b = ck.boolean(v, vloc, f"process.{key}")
            if b is not None:
                proc.toggles[key] = b


HOST_NAMESPACES = ("pid", "ipc", "net")
_SHARED_RISK = {"net": "the agent reads the host's network tables in /proc/net and /proc/<pid>/net "
                       "(every socket of the host: addresses, ports, unix socket paths) and shares "
                       "the host's abstract unix sockets",
                "pid": "the agent sees every host process in /proc (command lines, and more where "
                       "their owner allows) and can name them by pid (prlimit, setpriority, signals "
                       "where no other layer refuses)",
                "ipc": "the agent can attach host SysV shared memory, semaphores and message queues "
                       "and host POSIX queues"}


# at most this many network.loopback ports are relayed into a run's own
# network namespace (one listener each, per family): more keeps the host's
MAX_RELAY_PORTS = 64


def host_network_why(allow, loopback):
    """Why an enforced network section keeps the host's network namespace,
    or None: the run then gets one of its own, with only lo, and its
    loopback ports relayed to the host's (sandbox/netns.py). allow: the
    network.allow rules; loopback: True, False or port ranges [(lo, hi)]."""
    if allow:
        return "network.allow permits remote egress"
    if loopback is True:
        return "network.loopback: true allows every loopback port, which no relay can listen on"
    n = len(relay_ports(loopback))
    if n > MAX_RELAY_PORTS:
        return f"network.loopback lists {n} ports, more than the {MAX_RELAY_PORTS} the relay serves"
    return None


def relay_ports(loopback):
    """The loopback ports a run of its own network namespace gets relayed."""
    return sorted({p for lo, hi in (loopback or ()) if loopback is not True for p in range(lo, hi + 1)})


def _host_namespaces(ck, value, loc):
    """process.host_namespaces: the private namespaces an enforced run gives
    up (sandbox/namespaces.py); each one shared is a warning with its risk."""
    items = ck.strings(value, loc, "process.host_namespaces", "namespace names", "a namespace name")
    out = []
    for item in items or ():
        if item.value not in HOST_NAMESPACES:
            ck.error(item.loc, f"process.host_namespaces: unknown namespace {item.value!r} "
                               f"(one of: {', '.join(HOST_NAMESPACES)})")
            continue
        ck.warn(item.loc, f"process.host_namespaces: {item.value}: {_SHARED_RISK[item.value]}")
        out.append(item.value)
    return tuple(dict.fromkeys(out))


def _syscalls(ck, value, loc, spec):
    m = ck.mapping(value, loc, "syscalls", ("deny",))
    if m is None:
        return
    spec.syscalls = ()
    if "deny" not in m:
        return
    items = ck.strings(m["deny"], m.val_locs["deny"], "syscalls.deny", "syscall names", "a syscall name")
    good = []
    for item in items or ():
        status = syscall_status(item.value)
        if status == "unknown":
            ck.error(item.loc, f"syscalls.deny: unknown syscall {item.value!r}"
                               f"{_did_you_mean(item.value.lower(), native_syscalls())}")
            continue
        if status == "other-arch":
            ck.warn(item.loc, f"syscalls.deny: {item.value!r} does not exist on this architecture")
        good.append(item)
    spec.syscalls = tuple(good)


def _resources(ck, value, loc, spec):
    keys = ("memory", "cpu", "pids", "wall_time")
    m = ck.mapping(value, loc, "resources", keys)
    if m is None:
        return
    res = spec.resources = Resources()
    for key, v, vloc in ck.entries(m, keys):
        res.written[key] = v
        if key == "memory":
            res.memory = ck.unit(units.parse_size, v, vloc, "resources.memory")
        elif key == "cpu":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and MIN_CPU <= v <= MAX_CPU
            if not ok:
                got = repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else yaml_type(v)
                ck.error(vloc, f"resources.cpu: expected a number of CPUs like 1.5 "
                               f"({MIN_CPU}-{MAX_CPU}), got {got}")
            res.cpu = float(v) if ok else None
        elif key == "pids":
            res.pids = ck.integer(v, vloc, "resources.pids", maximum=MAX_PIDS)
        else:
            res.wall_time = ck.unit(units.parse_duration, v, vloc, "resources.wall_time")


def _on_violation(ck, value, loc, spec):
    keys = ("default", *SECTIONS, "rules")
    m = ck.mapping(value, loc, "on_violation", keys)
    if m is None:
        return
    ov = spec.on_violation
    for key, v, vloc in ck.entries(m, keys):
        if key == "rules":
            rules = ck.mapping(v, vloc, "on_violation.rules", RULES)
            for rule, action in (rules or {}).items():
                if rule in RULES and ck.action(action, rules.val_locs[rule], f"on_violation.rules.{rule}"):
                    ov.rules[rule] = action
        elif ck.action(v, vloc, f"on_violation.{key}"):
            if key == "default":
                ov.default = v
            else:
                ov.sections[key] = v


def _monitor(ck, value, loc, spec):
    items = ck.strings(value, loc, "monitor", "sensor groups", "a sensor group")
    if items is None:
        return
    good = []
    for item in items:
        if item.value in SENSOR_GROUPS:
            good.append(item.value)
        else:
            ck.error(item.loc, f"monitor: unknown sensor group {item.value!r}"
                               f"{_did_you_mean(item.value, SENSOR_GROUPS)}; expected {', '.join(SENSOR_GROUPS)}")
    spec.monitor = tuple(good)
    spec.locs["monitor"] = loc


_SECTIONS = {"metadata": _metadata, "identity": _identity, "filesystem": _filesystem,
             "network": _network, "process": _process, "syscalls": _syscalls,
             "resources": _resources, "on_violation": _on_violation, "monitor": _monitor}


# --------------------------------------------------------------- cross checks (lint)

def _check_shadowed(ck, spec):
    """An allow entry inside a deny pattern never applies: deny wins."""
    fs = spec.filesystem
    if fs is None or not fs.deny:
        return
    allows = [(f"filesystem.{k}", i.value, i.loc) for k in ("read", "write", "exec")
              for i in (getattr(fs, k) or ())]
    if spec.process is not None:
        allows += [("process.exec", e.path, e.loc) for e in spec.process.exec or ()]
    for name, pattern, loc in allows:
        same = [d for d in fs.deny if d.value == pattern]
        if same:
            ck.error(loc, f"{name}: {pattern!r} is also in filesystem.deny ({same[0].loc.ref(loc)}); "
                          f"deny wins, so this allow never applies")
            continue
        for deny in fs.deny:
            if M.covers(pattern, deny.value):
                ck.warn(loc, f"{name}: {pattern!r} is shadowed by filesystem.deny {deny.value!r} "
                             f"({deny.loc.ref(loc)}): deny wins, so it never applies")
                break


def _check_wx(ck, spec):
    """W^X: a path the agent may write and then execute defeats an exec allow list."""
    fs = spec.filesystem
    if fs is None or not fs.write:
        return
    if fs.exec is not None:
        execs = [(e.value, e.loc, "filesystem.exec") for e in fs.exec]
    elif spec.process is not None and spec.process.exec is not None:
        execs = [(e.path, e.loc, "process.exec") for e in spec.process.exec]
    else:
        return
    for w in fs.write:
        for pattern, xloc, name in execs:
            if M.overlap(w.value, pattern):
                ck.warn(w.loc, f"filesystem.write: {w.value!r} is also executable ({name} {pattern!r}, "
                               f"{xloc.ref(w.loc)}): the agent could run what it writes (W^X)")
                break


def _check_exec_reachable(ck, spec):
    fs, proc = spec.filesystem, spec.process
    if fs is None or fs.exec is None or proc is None or not proc.exec:
        return
    for e in proc.exec:
        if not any(M.covers(e.path, x.value) for x in fs.exec):
            ck.warn(e.loc, f"process.exec: {e.path!r} is not under filesystem.exec, so it can never run")


def _check_toggles(ck, spec):
    if spec.process is None or not spec.syscalls:
        return
    for toggle, allowed in spec.process.toggles.items():
        if not allowed:
            continue
        for item in spec.syscalls:
            if item.value in TOGGLES[toggle]:
                ck.error(item.loc, f"syscalls.deny: {item.value!r} contradicts process.{toggle}: true "
                                   f"({spec.locs[f'process.{toggle}'].ref(item.loc)})")


_LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _check_network(ck, spec):
    if spec.network is None:
        return
    if "network.families" in spec.locs:
        missing = [f for f in DEFAULT_FAMILIES if f not in spec.network.families]
        if missing:
            ck.warn(spec.locs["network.families"],
                    f"network.families: without {', '.join(missing)} the agent cannot create "
                    f"{'that kind' if len(missing) == 1 else 'those kinds'} of socket, which most "
                    f"programs need; the list replaces the default [unix, inet, inet6]")
    for rule in spec.network.allow:
        if rule.cidr:
            net = ipaddress.ip_network(rule.cidr)
            if any(net.version == lo.version and net.subnet_of(lo) for lo in _LOOPBACK_NETS):
                ck.warn(rule.loc, f"network.allow: {rule.cidr} is loopback, which only "
                                  f"network.loopback judges; this rule never applies")


def _check_coverage(ck, spec):
    fs = spec.filesystem
    if fs is not None and fs.read is not None and fs.write is None:
        ck.warn(spec.locs["filesystem.read"], "filesystem.read is set but filesystem.write is not, "
                                              "so writes are not restricted (write 'write: []' to forbid them)")
    if spec.monitor is not None:
        missing = [g for g in spec.needed_groups() if g not in spec.monitor]
        if missing:
            ck.warn(spec.locs["monitor"], f"monitor: without {', '.join(missing)} some rules of this "
                                          f"policy are never judged")


_CROSS_CHECKS = (_check_shadowed, _check_wx, _check_exec_reachable, _check_toggles,
                 _check_network, _check_coverage)


# --------------------------------------------------------------- entry point

def _top(ck, root):
    ck.mapping(root, root.loc, "policy", TOP_KEYS)
    for key in ("apiVersion", "kind", "metadata"):
        if key not in root:
            ck.error(root.loc, f"missing required key {key!r}")
    api = root.get("apiVersion", API_VERSION)
    if "apiVersion" in root and api != API_VERSION:
        ck.error(root.val_locs["apiVersion"], f"apiVersion {api!r} is not supported; "
                                              f"this agentwatch reads {API_VERSION}")


def validate(doc):
    """Effective document (located Map) -> (PolicySpec, [Problem]) in file order."""
    ck, spec, stopped = _Checker(), PolicySpec(), []
    try:
        _top(ck, doc)
        for key, value, loc in ck.entries(doc, tuple(_SECTIONS)):
            _SECTIONS[key](ck, value, loc, spec)
        for check in _CROSS_CHECKS:
            check(ck, spec)
    except _TooMany:
        stopped.append(Problem(ck.problems[-1].loc, f"stopped after {MAX_PROBLEMS} problems; "
                                                    f"fix these first"))
    order = {}
    problems = sorted(ck.problems, key=lambda p: (order.setdefault(p.loc.file, len(order)),
                                                  p.loc.line or 0, p.loc.col or 0))
    return spec, problems + stopped
