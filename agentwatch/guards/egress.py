"""In-kernel network egress enforcement for one agent cgroup (cgroup BPF).

``Egress(rules).open(cgroup_path, on_denial)`` compiles bpf/egress.bpf.c,
fills its allow maps from ``EgressRules`` and attaches to the cgroup:

  connect4/6   connect() of TCP and UDP sockets (TCP fast open goes through it)
  sendmsg4/6   sendto()/sendmsg() with a destination: unconnected UDP, DNS included
  sock_create  socket(AF_INET/AF_INET6): SOCK_RAW and protocols other than
               TCP/UDP (ICMP ping, SCTP) refused; inet/inet6 refused when not in
               allow_families

With ``EgressRules.guard`` set (the run's egress guard ports, guards/guard.py)
connect4/6 hand every TCP connect no rule allows to the guard's proxy, and
every port-53 connect or send to its DNS responder, instead of refusing
them; sock_ops files each such socket's original destination where
``flow_of()`` finds it, and recvmsg4/6 and getpeername4/6 make the guard's
answers read as coming from where the agent sent.

A refused call fails with EPERM in the agent and a denial record reaches
``on_denial`` through ``poll()``. Everything not allowed is denied. Programs
are attached with BPF_F_ALLOW_MULTI, so other layers' programs on the same
cgroup keep running and every one of them must allow.

The kernel hands a UDP send to an IPv4-mapped address (or an AF_INET sockaddr
on an AF_INET6 socket) to its IPv4 code, so such denials are recorded by
sendmsg4 with family "inet"; TCP connects to mapped addresses come through
connect6 and are recorded as "inet6" ::ffff:a.b.c.d.

What this layer cannot see (the seccomp/Landlock layers cover it):
- socket() of any family other than inet/inet6 (AF_PACKET, AF_VSOCK, netlink
  by protocol, ...): the kernel runs the sock_create hook from
  inet_create/inet6_create only, so ``allow_families`` is enforced here for
  inet/inet6 alone. The seccomp filter refuses the rest before any of this
  runs (sandbox/seccomp_filter.py ``socket_families``, from the policy's
  network.families and network.netlink, sandbox/plan.py), including the
  obsolete socket(AF_INET, SOCK_PACKET), which the kernel turns into
  AF_PACKET before this hook. A family seccomp refuses never reaches this
  hook, so a refused inet6 (network.families without it) is reported once,
  from the filter's refusal, and "family-not-allowed" here is a second
  layer that only fires if the two disagree.
- bind() and listen(): allowed (binding does not send; inbound is not egress).
- sockets created outside the cgroup and handed in (inherited fds,
  SCM_RIGHTS): cgroup hooks judge a socket by the cgroup it was created in.
- the host's own non-loopback addresses are judged by the CIDR they are in.

Rule semantics:
- ``allow`` is a union of (cidr, port_lo, port_hi, proto). A CIDR inside
  ::ffff:0:0/96 is an IPv4 rule, because the kernel programs judge
  IPv4-mapped destinations as their IPv4 address.
- loopback (127.0.0.0/8, ::1, and 0.0.0.0 / :: which connect to the local
  host) is its own zone: only ``loopback`` and rules naming addresses inside
  it open it, a wide rule such as 0.0.0.0/0 does not.

bcc is imported only inside methods, so the rule logic is usable anywhere.
"""
import ctypes
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field

from ..core.errors import AgentwatchError, KernelFeatureError, PrivilegeError
from ..policy.model import SOCKET_FAMILIES
from . import records as R
from .denials import CNT_DENIED, CNT_LOST, DenialStream, clear_map  # noqa: F401 (counter indexes)

# ---- constants of bpf/guards.h (records.py mirrors them; tests/unit/test_guard_records.py checks)
MAX_RANGES = R.EG_MAX_RANGES
P_TCP, P_UDP, P_OTHER, P_ANY = R.EG_P_TCP, R.EG_P_UDP, R.EG_P_OTHER, R.EG_P_ANY
PROTO_BITS = {"tcp": P_TCP, "udp": P_UDP, "any": P_ANY}
F_LOOPBACK = R.EG_F_LOOPBACK
CFG_INET, CFG_INET6, CFG_GUARD = R.EG_CFG_INET, R.EG_CFG_INET6, R.EG_CFG_GUARD
OPS = {R.EG_OP_CONNECT4: ("connect", "inet"), R.EG_OP_CONNECT6: ("connect", "inet6"),
       R.EG_OP_SENDMSG4: ("sendmsg", "inet"), R.EG_OP_SENDMSG6: ("sendmsg", "inet6"),
       R.EG_OP_SOCKET: ("socket", None), R.EG_OP_CONNECT_UNIX: ("connect", "unix"),
       R.EG_OP_SENDMSG_UNIX: ("sendmsg", "unix"), R.EG_OP_BIND4: ("bind", "inet"),
       R.EG_OP_BIND6: ("bind", "inet6")}
REASONS = {R.EG_R_NO_RULE: "no-allow-rule", R.EG_R_PORT: "port-not-allowed",
           R.EG_R_LOOPBACK: "loopback-not-allowed", R.EG_R_RAW: "raw-socket",
           R.EG_R_FAMILY: "family-not-allowed", R.EG_R_PROTOCOL: "protocol-not-allowed",
           R.EG_R_UNIX: "unix-not-allowed", R.EG_R_BIND: "bind-not-allowed"}


# socket families by name (linux/socket.h); only inet and inet6 are enforced here
FAMILIES = dict(SOCKET_FAMILIES, netlink=16)
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp",
               136: "udplite", 255: "raw", 262: "mptcp"}

# Loopback zones: destinations that reach the local host.
LOOPBACK4 = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("0.0.0.0/32"))
LOOPBACK6 = (ipaddress.ip_network("::1/128"), ipaddress.ip_network("::/128"))
MAPPED = ipaddress.ip_network("::ffff:0:0/96")

BPF_F_ALLOW_MULTI = 2   # several programs per hook: ours and any other layer's all must allow
# (program name, bcc program type attribute, attach type name, enum bpf_attach_type)
PROGRAMS = (("aw_sock_create", "CGROUP_SOCK", "CGROUP_INET_SOCK_CREATE", 2),
            ("aw_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT", 10),
            ("aw_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT", 11),
            ("aw_sendmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG", 14),
            ("aw_sendmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG", 15),
            ("aw_bind4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_BIND", 8),
            ("aw_bind6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_BIND", 9))
# unix socket addresses (Linux 6.7+), attached when the policy allows no unix
# sockets; older kernels refuse the attach type and the run says so
UNIX_PROGRAMS = (("aw_connect_unix", "CGROUP_SOCK_ADDR", "CGROUP_UNIX_CONNECT", 49),
                 ("aw_sendmsg_unix", "CGROUP_SOCK_ADDR", "CGROUP_UNIX_SENDMSG", 50))
UNIX_ATTACH_TYPES = {at for _, _, _, at in UNIX_PROGRAMS}
# the egress guard's (EgressRules.guard): where a redirected socket went, and
# its answers read back as from there
GUARD_PROGRAMS = (("aw_sock_ops", "SOCK_OPS", "CGROUP_SOCK_OPS", 3),
                  ("aw_recvmsg4", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG", 19),
                  ("aw_recvmsg6", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG", 20),
                  ("aw_getpeername4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_GETPEERNAME", 29),
                  ("aw_getpeername6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_GETPEERNAME", 30))
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"


def kernel_knows(*attach_types, btf=VMLINUX_BTF):
    """False when the running kernel's BTF lacks one of these enum
    bpf_attach_type names ("CGROUP_UNIX_CONNECT"): loading a program for it
    would only fail, and bcc prints the refusal to stderr on every run.
    True when they are there, or when there is no BTF to tell (then the
    load decides)."""
    try:
        with open(btf, "rb") as f:
            data = f.read()
    except OSError:
        return True
    return all(b"BPF_" + name.encode() + b"\0" in data for name in attach_types)


class EgressRuleError(AgentwatchError, ValueError):
    """An allow rule that cannot be compiled; the message names it."""


@dataclass
class EgressRules:
    # (cidr, port_lo, port_hi, proto 'tcp'|'udp'|'any'); port None = any
    allow: list = field(default_factory=list)
    # True, False, or the loopback ports allowed (127.0.0.0/8, ::1, mapped)
    loopback: object = False
    # socket() families allowed; only inet/inet6 are enforced here (seccomp holds the rest)
    allow_families: tuple = ("unix", "inet", "inet6")
    # refuse every connect()/sendmsg() that names a unix socket (network.unix: false)
    deny_unix: bool = False
    # the run's egress guard ports (GuardPorts), or None: refuse what no rule allows
    guard: object = None


@dataclass(frozen=True)
class GuardPorts:
    """Where the kernel sends what it hands to the run's egress guard; 0 =
    no listener for that family (its connects are refused instead)."""
    proxy4: int = 0
    proxy6: int = 0
    dns4: int = 0
    dns6: int = 0


@dataclass(frozen=True)
class Entry:
    """One allow-map element: a prefix and every (lo, hi, proto mask) range
    that applies to it."""
    prefix: object            # ipaddress.IPv4Network / IPv6Network
    ranges: tuple
    flags: int = 0

    def key_bytes(self):
        """struct aw_eg_key4/6: prefix length (host order), address (network order)."""
        packed = self.prefix.network_address.packed
        words = struct.unpack(f"={len(packed) // 4}I", packed)   # the bytes as they are, in u32s
        if len(words) == 1:
            return bytes(R.EgKey4(self.prefix.prefixlen, words[0]))
        return bytes(R.EgKey6(self.prefix.prefixlen, (ctypes.c_uint32 * 4)(*words)))

    def value_bytes(self):
        """struct aw_eg_allow."""
        v = R.EgAllow(n=len(self.ranges), flags=self.flags)
        for i, (lo, hi, mask) in enumerate(self.ranges):
            v.r[i] = R.EgRange(lo, hi, mask)
        return bytes(v)


@dataclass(frozen=True)
class Compiled:
    entries4: tuple
    entries6: tuple
    cfg: int
    bind4: tuple = ()      # the allow rules alone (bind is always allowed on loopback)
    bind6: tuple = ()
    guard: GuardPorts = None

    def cfg_words(self):
        """egress_cfg, index by index (bpf/guards.h AW_EG_CFG_*)."""
        g = self.guard or GuardPorts()
        words = [0] * R.EG_CFG_MAX
        words[R.EG_CFG_FLAGS] = self.cfg | (CFG_GUARD if self.guard else 0)
        words[R.EG_CFG_PROXY4], words[R.EG_CFG_PROXY6] = g.proxy4, g.proxy6
        words[R.EG_CFG_DNS4], words[R.EG_CFG_DNS6] = g.dns4, g.dns6
        return words


# ---- rule compilation (pure) -----------------------------------------------------

def parse_prefix(cidr):
    """A CIDR (or bare address) as a network; IPv4-mapped IPv6 becomes IPv4.
    Host bits must be zero: '10.1.2.3/8' is refused rather than widened."""
    try:
        net = ipaddress.ip_network(str(cidr).strip(), strict=True)
    except ValueError as e:
        raise EgressRuleError(f"egress rule {cidr!r}: not a CIDR ({e})") from None
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        net = ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}")
    return net


def parse_ports(lo, hi, where):
    """(lo, hi) inclusive; None/None is every port, lo alone is one port."""
    if lo is None and hi is None:
        return 0, 65535
    if lo is None:
        raise EgressRuleError(f"egress rule {where}: port_hi without port_lo")
    if hi is None:
        hi = lo
    for p in (lo, hi):
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 65535:
            raise EgressRuleError(f"egress rule {where}: port {p!r} is not 0..65535")
    if lo > hi:
        raise EgressRuleError(f"egress rule {where}: port range {lo}-{hi} is reversed")
    return lo, hi


def parse_rule(rule):
    """(network, lo, hi, proto mask) of one allow tuple."""
    if len(rule) != 4:
        raise EgressRuleError(f"egress rule {rule!r}: expected (cidr, port_lo, port_hi, proto)")
    cidr, lo, hi, proto = rule
    if proto not in PROTO_BITS:
        raise EgressRuleError(f"egress rule {rule!r}: proto must be tcp, udp or any")
    lo, hi = parse_ports(lo, hi, repr(rule))
    return parse_prefix(cidr), lo, hi, PROTO_BITS[proto]


def loopback_ranges(loopback):
    if loopback is True:
        return [(0, 65535, P_ANY)]
    if loopback is False or loopback is None:
        return []
    return [(*parse_ports(p, p, f"loopback port {p!r}"), P_ANY) for p in loopback]


def merge_ranges(ranges):
    """Union of (lo, hi, mask) ranges, merged per protocol bit: overlapping or
    adjacent intervals join, identical intervals share one mask."""
    out = {}
    for bit in (P_TCP, P_UDP, P_OTHER):
        merged = []
        for lo, hi in sorted((lo, hi) for lo, hi, m in ranges if m & bit):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            out[(lo, hi)] = out.get((lo, hi), 0) | bit
    return tuple(sorted((lo, hi, m) for (lo, hi), m in out.items()))


def _zone(net):
    for z in (LOOPBACK4 if net.version == 4 else LOOPBACK6):
        if net.subnet_of(z):
            return z
    return None


def compile_entries(own):
    """{network: [ranges]} -> [Entry]. An LPM lookup returns only the longest
    matching prefix, so each entry also carries the ranges of every enclosing
    prefix of the same zone (a wide rule does not reach into loopback)."""
    entries = []
    for net, ranges in own.items():
        zone = _zone(net)
        acc = list(ranges)
        for other, more in own.items():
            if (other.prefixlen < net.prefixlen and net.subnet_of(other)
                    and _zone(other) == zone):
                acc += more
        merged = merge_ranges(acc)
        if len(merged) > MAX_RANGES:
            raise EgressRuleError(f"egress rules: {net} needs {len(merged)} port ranges, "
                                  f"at most {MAX_RANGES} per prefix are supported")
        entries.append(Entry(net, merged, F_LOOPBACK if zone else 0))
    return tuple(sorted(entries, key=lambda e: (e.prefix.prefixlen, int(e.prefix.network_address))))


def compile_rules(rules):
    """EgressRules -> the contents of the kernel maps."""
    own4, own6 = {}, {}
    for rule in rules.allow:
        net, lo, hi, mask = parse_rule(rule)
        (own4 if net.version == 4 else own6).setdefault(net, []).append((lo, hi, mask))
    bind4, bind6 = compile_entries(dict(own4)), compile_entries(dict(own6))
    lb = loopback_ranges(rules.loopback)
    for z in LOOPBACK4:
        own4.setdefault(z, []).extend(lb)
    for z in LOOPBACK6:
        own6.setdefault(z, []).extend(lb)
    fams = allowed_family_numbers(rules)
    cfg = (CFG_INET if AF_INET in fams else 0) | (CFG_INET6 if AF_INET6 in fams else 0)
    guard = rules.guard
    if guard is not None:
        for name in ("proxy4", "proxy6", "dns4", "dns6"):
            port = getattr(guard, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise EgressRuleError(f"guard port {name}={port!r} is not 0..65535")
    return Compiled(compile_entries(own4), compile_entries(own6), cfg, bind4, bind6, guard)


def allowed_family_numbers(rules):
    """AF_* numbers of allow_families (the inet and inet6 bits of the
    sock_create program's configuration come from them)."""
    out = set()
    for name in rules.allow_families:
        if name not in FAMILIES:
            raise EgressRuleError(f"allow_families: unknown family {name!r} "
                                  f"(known: {', '.join(sorted(FAMILIES))})")
        out.add(FAMILIES[name])
    return sorted(out)


# ---- records (pure) ----------------------------------------------------------------

def format_addr(family, raw):
    if family == AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    a = ipaddress.IPv6Address(raw)
    return f"::ffff:{a.ipv4_mapped}" if a.ipv4_mapped else str(a)


def _mapped_v6(addr):
    """An address string as the 16 bytes the flow map keys by (IPv4 as ::ffff:a.b.c.d)."""
    if ":" in addr:
        return socket.inet_pton(socket.AF_INET6, addr)
    return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, addr)


def decode_denial(data):
    """A struct aw_egress_event as the dict given to on_denial."""
    ev = R.decode(R.EgressEvent, data)
    opname, _ = OPS.get(ev.op, (f"op{ev.op}", None))
    is_socket = opname == "socket"
    return {"pid": ev.pid, "tid": ev.tid, "uid": ev.uid,
            "comm": ev.comm.decode(errors="replace"), "cgroup": ev.cgroup,
            "family": {AF_INET: "inet", AF_INET6: "inet6", AF_UNIX: "unix"}.get(
                ev.family, str(ev.family)),
            "addr": None if is_socket else format_addr(ev.family, bytes(ev.addr)),
            "port": None if is_socket else ev.port,
            "proto": PROTO_NAMES.get(ev.protocol, str(ev.protocol)), "op": opname,
            "rule": REASONS.get(ev.reason, f"reason{ev.reason}"),
            "sock_type": ev.sock_type, "protocol": ev.protocol, "ts": ev.ts}


# ---- cgroup attachments (no bcc) ----------------------------------------------------

_BPF_PROG_QUERY = 16


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


def attached_program_ids(cgroup_path):
    """{attach type name: [program ids]} attached directly to the cgroup for
    the hooks Egress uses (BPF_PROG_QUERY), to prove attach and detach."""
    from ..sensors.inventory import bpf_syscall
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = {}
        for _, _, atype, at in PROGRAMS + UNIX_PROGRAMS + GUARD_PROGRAMS:
            ids = (ctypes.c_uint32 * 64)()
            a = _QueryAttr(target_fd=fd, attach_type=at,
                           prog_ids=ctypes.addressof(ids), prog_cnt=64)
            ret, err = bpf_syscall(_BPF_PROG_QUERY, a)
            if ret < 0 and err == errno.EINVAL and at in UNIX_ATTACH_TYPES:
                continue          # a kernel before 6.7: no unix hooks to list
            if ret < 0:
                raise OSError(err, f"BPF_PROG_QUERY {atype}: {os.strerror(err)}")
            out[atype] = list(ids[:a.prog_cnt])
        return out
    finally:
        os.close(fd)


# ---- the kernel side ---------------------------------------------------------------

class Egress(DenialStream):
    """The egress programs attached to one cgroup. Reusable: release() detaches
    and forgets the rules but keeps the programs loaded, so a shared monitor
    (the daemon) compiles them once, not once per run."""

    COUNTERS = b"egress_counters"
    enforcement = "cgroup-bpf"

    def __init__(self, rules, ringbuf_pages=64):
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.cgroup_fd = None
        self._guard_base = {}
        self._flows_fd = None
        self.attached = []                     # (fn, attach type) in attach order
        self.unix_hooks = None                 # deny_unix: attached (True) or not on this kernel
        self.received = 0
        self.errors = []                       # records that failed to decode or deliver
        self._on_denial = None
        self.use(rules)

    def use(self, rules):
        """The rules the next open() enforces (bad rules fail here, before
        anything loads). Not while attached."""
        if self.cgroup_fd is not None:
            raise RuntimeError("Egress is attached to a cgroup: release() it first")
        self.compiled = compile_rules(rules)
        self.rules = rules
        return self

    def open(self, cgroup_path, on_denial):
        """Compile and load (once), fill the maps, then attach (so the cgroup
        is never judged by half-filled maps; an empty map denies everything
        anyway)."""
        if self.cgroup_fd is not None:
            raise RuntimeError("Egress is already open")
        if os.geteuid() != 0:
            raise PrivilegeError("attaching cgroup BPF programs needs root (CAP_BPF, "
                                 "CAP_NET_ADMIN, CAP_SYS_ADMIN)")
        from ..sensors import bpf_dir, compile_bpf, import_bcc
        bcc = import_bcc()
        if self.bpf is None:
            with open(os.path.join(bpf_dir(), "egress.bpf.c")) as f:
                text = f.read()
            self.bpf = compile_bpf(text, [f"-I{bpf_dir()}", f"-DAW_EG_RINGBUF_PAGES={self.ringbuf_pages}",
                                          "-Wno-unused-function"], "bpf/egress.bpf.c")
            self.bpf[b"egress_events"].open_ring_buffer(self._on_record)
        try:
            self._fill_maps()
            self._start_stream(on_denial)
            table = self.bpf[self.COUNTERS]
            self._guard_base = {name: sum(int(v) for v in table[ctypes.c_int(idx)])
                                for name, idx in (("proxied", R.EG_CNT_PROXIED), ("dns", R.EG_CNT_DNS))}
            self.cgroup_fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
            for name, ptype, _, at in PROGRAMS:
                fn = self.bpf.load_func(name.encode(), getattr(bcc.BPF, ptype), attach_type=at)
                bcc.BPF.attach_func(fn, self.cgroup_fd, at, flags=BPF_F_ALLOW_MULTI)
                self.attached.append((fn, at))
            if self.rules.guard is not None:
                for name, ptype, atype, at in GUARD_PROGRAMS:
                    try:
                        fn = self.bpf.load_func(name.encode(), getattr(bcc.BPF, ptype), attach_type=at)
                        bcc.BPF.attach_func(fn, self.cgroup_fd, at, flags=BPF_F_ALLOW_MULTI)
                    except Exception as e:
                        raise KernelFeatureError(
                            f"the egress guard needs the cgroup hook {atype} ({name}), which this "
                            f"kernel refused: {e}; 'agentwatch doctor' checks it. network.guard: false "
                            "turns domain rules into the addresses they resolve to at start") from None
                    self.attached.append((fn, at))
            if self.rules.deny_unix:
                self.unix_hooks = self._attach_unix(bcc)
        except Exception:
            self.close()
            raise
        return self

    def _attach_unix(self, bcc):
        """Attach the unix hooks; False when this kernel has none (< 6.7:
        the load is refused), after detaching a half-done pair."""
        if not kernel_knows(*(aname for _, _, aname, _ in UNIX_PROGRAMS)):
            return False                 # before 6.7: no load to fail noisily
        done = []
        for name, ptype, _, at in UNIX_PROGRAMS:
            try:
                fn = self.bpf.load_func(name.encode(), getattr(bcc.BPF, ptype), attach_type=at)
                bcc.BPF.attach_func(fn, self.cgroup_fd, at, flags=BPF_F_ALLOW_MULTI)
            except Exception:
                for fn, at in done:
                    bcc.BPF.detach_func(fn, self.cgroup_fd, at)
                    self.attached.remove((fn, at))
                return False
            done.append((fn, at))
            self.attached.append((fn, at))
        return True

    def _fill_maps(self):
        for table, entries in ((self.bpf[b"egress_allow4"], self.compiled.entries4),
                               (self.bpf[b"egress_allow6"], self.compiled.entries6),
                               (self.bpf[b"egress_bind4"], self.compiled.bind4),
                               (self.bpf[b"egress_bind6"], self.compiled.bind6)):
            for e in entries:
                table[table.Key.from_buffer_copy(e.key_bytes())] = \
                    table.Leaf.from_buffer_copy(e.value_bytes())
        for i, word in enumerate(self.compiled.cfg_words()):
            self.bpf[b"egress_cfg"][ctypes.c_int(i)] = ctypes.c_uint32(word)

    def _clear_maps(self):
        for name in (b"egress_allow4", b"egress_allow6", b"egress_bind4", b"egress_bind6",
                     b"egress_orig", b"egress_flows"):
            clear_map(self.bpf[name], name.decode())
        for i in range(R.EG_CFG_MAX):
            self.bpf[b"egress_cfg"][ctypes.c_int(i)] = ctypes.c_uint32(0)

    def flow_of(self, addr, port):
        """The kernel's record of the redirected TCP socket whose local end
        is (addr, port): the peer of a socket the guard accepted. A dict
        (pid, tid, uid, comm, cgroup id, family, the original addr and port),
        taken out of the map; None when there is none (not one of this
        run's redirected sockets)."""
        if self.bpf is None:
            return None
        from bcc.libbcc import lib      # the map by its fd: one lookup and one delete, no copies
        if self._flows_fd is None:
            self._flows_fd = self.bpf[b"egress_flows"].map_fd
        key = R.EgFlowKey(port=port)
        ctypes.memmove(key.addr, _mapped_v6(addr), 16)
        f = R.EgFlow()
        if lib.bpf_lookup_elem(self._flows_fd, ctypes.byref(key), ctypes.byref(f)) != 0:
            return None
        lib.bpf_delete_elem(self._flows_fd, ctypes.byref(key))
        family = {AF_INET: "inet", AF_INET6: "inet6"}.get(f.family, str(f.family))
        return {"pid": f.pid, "tid": f.tid, "uid": f.uid, "cgroup": f.cgroup,
                "comm": f.comm.decode(errors="replace"), "family": family,
                "addr": format_addr(f.family, bytes(f.addr)), "port": f.port, "ts": f.ts}

    def counters(self):
        """DenialStream's, plus the connects and sends handed to the guard."""
        out = super().counters()
        if self.rules.guard is not None and self.bpf is not None:
            table = self.bpf[self.COUNTERS]
            for name, idx in (("proxied", R.EG_CNT_PROXIED), ("dns", R.EG_CNT_DNS)):
                out[name] = sum(int(v) for v in table[ctypes.c_int(idx)]) - self._guard_base.get(name, 0)
        return out

    def _detach(self):
        """Detach every program from the cgroup. A program that fails to
        detach stays attached (fail closed) until the cgroup is removed;
        the error is kept, and raised by release()."""
        from bcc import BPF
        failed = []
        for fn, at in reversed(self.attached):
            try:
                BPF.detach_func(fn, self.cgroup_fd, at)
            except Exception as e:
                failed.append(f"detach {fn.name}: {e}")
        self.errors += failed
        self.attached = []
        self.unix_hooks = None
        if self.cgroup_fd is not None:
            os.close(self.cgroup_fd)
            self.cgroup_fd = None
        return failed

    def release(self):
        """Detach from the cgroup, forget its rules and records; the programs
        stay loaded for the next use() and open(). Raises if anything of the
        old run could remain (then close() instead: never reuse it)."""
        if self.bpf is None:
            raise RuntimeError("Egress is not loaded")
        failed = self._detach()
        if failed:
            raise RuntimeError("; ".join(failed))
        self._end_stream()
        self._clear_maps()

    def close(self):
        """Detach every program, then unload. Idempotent. From here on the
        cgroup is unrestricted: stop the agent first."""
        if self.bpf is None:
            return
        self._detach()
        self.bpf.cleanup()
        self.bpf, self._flows_fd = None, None

    def _decode(self, raw):
        return decode_denial(raw)


__all__ = ["Egress", "EgressRules", "GuardPorts", "EgressRuleError", "compile_rules",
           "allowed_family_numbers", "attached_program_ids", "decode_denial"]
