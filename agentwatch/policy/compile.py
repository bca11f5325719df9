"""A validated policy compiled for judging events: globs expanded with the
run's variables and compiled once, networks parsed once, and one method per
kind of event that answers None (allowed) or a Decision.

The engine calls these for every file, exec, connect and sensitive syscall
of an agent, so they are built for speed: prefix/exact globs are string
comparisons, file verdicts are cached per (path, access), and nothing here
does I/O except ``resolve_domains``, which the caller runs when it chooses.
"""
import functools
import socket
import threading
import time
from dataclasses import dataclass

from ..core.errors import PolicyError
from . import matchers as M
from .model import TOGGLES, PolicySpec

_TOGGLE_OF = {sc: toggle for toggle, calls in TOGGLES.items() for sc in calls}
_PROTOCOLS = {"tcp": "tcp", "stream": "tcp", "udp": "udp", "dgram": "udp"}
_CACHE_MAX = 8192


@dataclass(frozen=True)
class Decision:
    """Why an event is out of policy. ``pattern`` is the deciding pattern as
    written in the policy (None when the event matched no allow entry)."""
    category: str       # filesystem | network | process | syscall
    rule: str           # e.g. filesystem.deny (see docs/policy.md, "Rules")
    action: str         # alert | deny | kill
    reason: str
    pattern: str = None


def _globset(items, variables):
    if items is None:
        return None
    return M.GlobSet((i.value, M.expand(i.value, variables)) for i in items)


class CompiledPolicy:
    """The judging side of a policy. Build with :func:`compile_policy`."""

    def __init__(self, spec, variables):
        self.spec = spec
        self.variables = dict(variables)
        fs, net, proc = spec.filesystem, spec.network, spec.process
        self._fs = fs is not None
        self._read = _globset(fs.read, variables) if fs else None
        self._write = _globset(fs.write, variables) if fs else None
        self._fexec = _globset(fs.exec, variables) if fs else None
        self._deny = _globset(fs.deny, variables) if fs else M.GlobSet(())
        self._pexec = None
        if proc is not None and proc.exec is not None:
            self._pexec = [(r, M.Glob(M.expand(r.path, variables))) for r in proc.exec]
        self._toggles = dict(proc.toggles) if proc else {}
        self._syscalls = {i.value for i in spec.syscalls or ()}
        self._net = net
        if net is not None:
            self._cidrs = [(r, M.parse_cidr(r.cidr)[0]) for r in net.allow if r.cidr]
            self._domains = [r for r in net.allow if r.domain]
            self._unix = net.unix if isinstance(net.unix, bool) else self._unix_matchers(net.unix)
        self.domain_ips = {}         # domain -> {ip, ...}; filled by resolve_domains() or the caller
        self._file_cache = {}

    def _unix_matchers(self, items):
        out = []
        for item in items:
            if item.value.startswith("@"):
                out.append((item.value, "abstract", M.name_matcher(item.value)))
            else:
                out.append((item.value, "path", M.Glob(M.expand(item.value, self.variables))))
        return out

    def _decide(self, category, rule, reason, pattern=None):
        return Decision(category, rule, self.action_for(category, rule), reason, pattern)

    # ----------------------------------------------------------- files

    def check_file(self, path, access, cwd=None):
        """Judge an access to ``path``; access is a set of read, write, create,
        truncate, delete, rename, chmod, chown, mkdir, link ("read" needs
        filesystem.read, any other filesystem.write; filesystem.deny denies all)."""
        if not self._fs:
            return None
        key = (path, frozenset(access), cwd)
        cache = self._file_cache
        if key in cache:
            return cache[key]
        verdict = self._judge_file(M.normalize(path, cwd), key[1])
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[key] = verdict
        return verdict

    def _judge_file(self, p, access):
        denied = self._deny.first(p)
        if denied is not None:
            ops = ",".join(sorted(access)) or "access"
            return self._decide("filesystem", "filesystem.deny",
                                f"{ops} of {p} matches filesystem.deny {denied}", denied)
        if "read" in access and self._read is not None and self._read.first(p) is None:
            return self._decide("filesystem", "filesystem.read", f"read of {p} is outside filesystem.read")
        writes = access - {"read"}
        if writes and self._write is not None and self._write.first(p) is None:
            ops = ",".join(sorted(writes))
            return self._decide("filesystem", "filesystem.write", f"{ops} of {p} is outside filesystem.write")
        return None

    # ----------------------------------------------------------- exec

    def needs_hash(self, path):
        """True when an entry pins this program's sha256: pass it to check_exec."""
        if not self._pexec:
            return False
        p = M.normalize(path)
        return any(rule.sha256 and glob.matches(p) for rule, glob in self._pexec)

    def check_exec(self, path, sha256=None):
        """Judge executing ``path`` (sha256: hex digest of the file, when
        needs_hash said so). filesystem.deny, then process.exec, then filesystem.exec."""
        p = M.normalize(path)
        denied = self._deny.first(p)
        if denied is not None:
            return self._decide("filesystem", "filesystem.deny",
                                f"exec of {p} matches filesystem.deny {denied}", denied)
        if self._pexec is not None:
            verdict = self._judge_program(p, sha256)
            if verdict is not None:
                return verdict
        if self._fexec is not None and self._fexec.first(p) is None:
            return self._decide("filesystem", "filesystem.exec", f"exec of {p} is outside filesystem.exec")
        return None

    def _judge_program(self, p, sha256):
        pinned = None
        for rule, glob in self._pexec:
            if not glob.matches(p):
                continue
            if rule.sha256 is None or (sha256 and sha256.lower() == rule.sha256):
                return None
            pinned = rule
        if pinned is None:
            return self._decide("process", "process.exec", f"{p} is not in process.exec")
        got = f"has sha256 {sha256}" if sha256 else "has an unknown sha256"
        return self._decide("process", "process.exec",
                            f"{p} {got}; process.exec pins {pinned.sha256}", pinned.path)

    # ----------------------------------------------------------- network

    def check_socket(self, family, sock_type, protocol=None):
        """With a network section: raw inet sockets (and the obsolete
        SOCK_PACKET) always, families outside network.families, and netlink
        protocols outside network.netlink are out of policy (network.socket).
        The seccomp filter refuses the same families and protocols when the
        section is enforced (sandbox/seccomp_filter.py)."""
        net = self._net
        if net is None:
            return None
        if family in ("inet", "inet6") and sock_type in ("raw", "packet"):
            if sock_type == "packet" and "packet" in net.families:
                return None
            return self._decide("network", "network.socket", f"{sock_type} {family} socket")
        if family == "netlink":
            if net.netlink is True or (net.netlink and protocol in net.netlink_numbers()):
                return None
            return self._decide("network", "network.socket",
                                f"netlink protocol {protocol} socket: not in network.netlink")
        if family not in net.families:
            return self._decide("network", "network.socket",
                                f"{family} socket: not in network.families")
        return None

    def check_connect(self, family, addr, port=None, protocol=None, op="connect"):
        """Judge connect/sendto/sendmsg/bind to ``addr``. unix: addr is a path
        or "@abstract"; loopback (and 0.0.0.0/::, which reach this host) is
        judged by network.loopback only; anything else by network.allow.
        bind is allowed on loopback and ephemeral ports (port 0), else only
        to allowed addresses (rule network.bind)."""
        if self._net is None or addr is None:
            return None
        if family == "unix":
            return self._judge_unix(addr)
        if family not in ("inet", "inet6"):
            return None
        ip = M.canonical_ip(addr)
        if ip is None:
            return self._decide("network", "network.egress", f"{op} to unparsable address {addr!r}")
        proto = _PROTOCOLS.get(protocol)
        if op == "bind":
            if ip.is_loopback or not port or self._allowed(ip, port, proto):
                return None
            return self._decide("network", "network.bind", f"bind to {_hostport(ip, port)} is outside network.allow")
        if ip.is_loopback or ip.is_unspecified:
            return self._judge_loopback(ip, port, op)
        if self._allowed(ip, port, proto):
            return None
        return self._decide("network", "network.egress", f"{op} to {_hostport(ip, port)} is outside network.allow")

    def _judge_loopback(self, ip, port, op):
        lo = self._net.loopback
        if lo is True or (lo and M.port_in(port, lo)):
            return None
        allowed = "no loopback" if not lo else "loopback ports " + ",".join(
            str(a) if a == b else f"{a}-{b}" for a, b in lo)
        return self._decide("network", "network.loopback",
                            f"{op} to {_hostport(ip, port)}: policy allows {allowed}")

    def _judge_unix(self, addr):
        rules = self._unix
        if rules is True or addr == "":       # "" = unnamed socket: no one to reach
            return None
        if rules is not False:
            if addr.startswith("@"):
                if any(kind == "abstract" and m(addr) for _, kind, m in rules):
                    return None
            else:
                p = M.normalize(addr)
                if any(kind == "path" and m.matches(p) for _, kind, m in rules):
                    return None
        return self._decide("network", "network.unix", f"unix socket {addr} is outside network.unix")

    def _allowed(self, ip, port, proto):
        for rule, net in self._cidrs:
            if ip.version == net.version and ip in net and _port_proto_ok(rule, port, proto):
                return True
        if self._domains:
            text = str(ip)
            for rule in self._domains:
                if _port_proto_ok(rule, port, proto) and self._domain_has(rule.domain, text):
                    return True
        return False

    def _domain_has(self, pattern, ip_text):
        for name, ips in self.domain_ips.items():
            if M.domain_matches(pattern, name):
                if ip_text in ips or any(str(M.canonical_ip(x)) == ip_text for x in ips):
                    return True
        return False

    def resolve_domains(self, timeout=2.0):
        """Fill domain_ips for every non-wildcard domain rule with
        socket.getaddrinfo, in parallel, best effort within ``timeout``
        seconds; never raises. Returns domain_ips."""
        names = sorted({r.domain for r in (self._domains if self._net is not None else ())
                        if not r.domain.startswith("*.")})
        found = {}

        def lookup(name):
            try:
                infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
                found[name] = {str(M.canonical_ip(i[4][0])) for i in infos if M.canonical_ip(i[4][0])}
            except (OSError, UnicodeError):
                pass

        threads = [threading.Thread(target=lookup, args=(n,), daemon=True) for n in names]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for name, ips in list(found.items()):
            self.domain_ips.setdefault(name, set()).update(ips)
        return self.domain_ips

    # ----------------------------------------------------------- syscalls

    def check_syscall(self, name):
        """syscalls.deny by name, then the process toggles (ptrace,
        change_uid, namespaces, bpf, modules, io_uring, memfd_exec) set false."""
        if name in self._syscalls:
            return self._decide("syscall", "syscalls.deny", f"{name} is in syscalls.deny", name)
        toggle = _TOGGLE_OF.get(name)
        if toggle is not None and self._toggles.get(toggle) is False:
            return self._decide("process", f"process.{toggle}", f"{name}: process.{toggle} is false")
        return None

    def check_signal(self, target):
        """A signal sent to `target` (described), a process outside the run:
        out of policy whenever the policy has a process section. Signals
        within the run's own tree are the caller's business, never asked."""
        if self.spec.process is None:
            return None
        return self._decide("process", "process.signal",
                            f"signal to {target}, which is not a process of this run")

    # ----------------------------------------------------------- identity

    def check_identity(self, agent_name, signer=None):
        """The run's agent name must match identity.name; when
        identity.required_signer is set, ``signer`` ("ed25519:<hex>", the
        fingerprint that signed the run, None when unsigned) must equal it."""
        ident = self.spec.identity
        if ident is None:
            return None
        if ident.name and not M.name_matcher(ident.name)(agent_name or ""):
            return self._decide("identity", "identity.name",
                                f"agent name {agent_name!r} does not match {ident.name!r}", ident.name)
        if ident.required_signer and (signer or "").lower() != ident.required_signer:
            got = f"signed by {signer}" if signer else "unsigned"
            return self._decide("identity", "identity.signer",
                                f"run is {got}; policy requires {ident.required_signer}")
        return None

    # ----------------------------------------------------------- policy-wide

    def action_for(self, category, rule=None):
        """on_violation: rules[rule] > section of the category > default > alert."""
        return self.spec.action_for(category, rule)

    def sensor_groups(self):
        """Sensor groups to attach: ``monitor:`` or what the rules need."""
        return self.spec.sensor_groups()

    def kernel_routes(self):
        """(prefixes, basenames): filesystem.deny as the BPF sensor can match
        it cheaply to send a file record to its priority ring buffer (see
        bpf/priority.bpf.c). A pattern gives its leading literal directories
        (${HOME}/.ssh/** -> /home/u/.ssh) and, when its last segment is
        literal, that basename (**/.env -> .env), which also catches
        relative paths. Patterns with neither (**/*.pem) are judged on
        whichever ring their records travel."""
        prefixes, names = set(), set()
        for _, glob in self._deny.items:
            last = glob.parts[-1] if glob.parts else None
            if last and last[0] == M.LIT and last[1]:
                names.add(last[1])
            if glob.literal_prefix():
                prefixes.add(glob.literal_prefix())
        return sorted(prefixes), sorted(names)

    def kernel_kills(self):
        """(prefixes, basenames) on which the kernel itself kills at the
        open's return (bpf_send_signal, bpf/syscalls.bpf.c), when the
        policy's filesystem.deny action is kill: only the exact forms of
        kill_forms, so a kill never lands on a path the policy allows."""
        return self._kills

    @functools.cached_property
    def _kills(self):
        if self.action_for("filesystem", "filesystem.deny") != "kill":
            return [], []
        prefixes, names = set(), set()
        for _, glob in self._deny.items:
            prefix, name = kill_forms(glob)
            if prefix:
                prefixes.add(prefix)
            if name:
                names.add(name)
        return sorted(prefixes), sorted(names)

    def killed_in_kernel(self, named):
        """Whether the kernel killed an open of ``named`` (as the process
        wrote it), by the forms kernel_kills() gives."""
        prefixes, names = self.kernel_kills()
        return (any(named.startswith(p) for p in prefixes)
                or (named.rsplit("/", 1)[-1] in names))


def kill_forms(glob):
    """(prefix, basename) a deny glob gives the kernel's kill-on-open, when
    a lexical match of the path as written is exact: /a/b/** -> "/a/b/"
    (everything below), **/name -> "name" (any file so named); else
    (None, None)."""
    kinds = [p[0] for p in glob.parts]
    if len(kinds) >= 2 and kinds[-1] == M.ANY and all(k == M.LIT for k in kinds[:-1]) \
            and kinds[0] == M.LIT:
        return glob.literal_prefix() + "/", None
    if kinds == [M.ANY, M.LIT] and glob.parts[1][1]:
        return None, glob.parts[1][1]
    return None, None


def _port_proto_ok(rule, port, proto):
    if rule.protocol != "any" and proto is not None and proto != rule.protocol:
        return False
    return rule.ports is None or M.port_in(port, rule.ports)


def _hostport(ip, port):
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return host if port is None else f"{host}:{port}"


def compile_policy(policy, variables):
    """Policy (from load) or PolicySpec -> CompiledPolicy. ``variables`` gives
    WORKSPACE, HOME and TMPDIR (see matchers.default_variables)."""
    spec = policy if isinstance(policy, PolicySpec) else policy.spec
    try:
        return CompiledPolicy(spec, variables)
    except KeyError as e:
        raise PolicyError(f"policy uses ${{{e.args[0]}}} but no value was given for it") from None
