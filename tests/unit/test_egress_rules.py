"""EgressRules -> allow-map entries (agentwatch/guards/egress.py), no kernel.

The kernel does one longest-prefix lookup per destination, so the entries
must carry the ranges of enclosing prefixes; a small model of that lookup is
checked against the plain meaning of the rules. The records and constants
of bpf/guards.h are checked against the mirror in tests/unit/test_guard_records.py.
"""
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentwatch.guards import egress as E
from agentwatch.guards import records as R

HYP = settings(database=None, derandomize=True, deadline=None, max_examples=300)


def entry(compiled, cidr):
    net = ipaddress.ip_network(cidr)
    for e in compiled.entries4 + compiled.entries6:
        if e.prefix == net:
            return e
    raise KeyError(cidr)


# ---- parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("cidr,want", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("1.2.3.4", "1.2.3.4/32"),
    (" 2001:db8::/32 ", "2001:db8::/32"),
    ("::1", "::1/128"),
    ("::ffff:127.0.0.0/104", "127.0.0.0/8"),      # mapped: an IPv4 rule
    ("::ffff:10.1.2.3", "10.1.2.3/32"),
    ("::ffff:0:0/96", "0.0.0.0/0"),
])
def test_parse_prefix(cidr, want):
    assert E.parse_prefix(cidr) == ipaddress.ip_network(want)


@pytest.mark.parametrize("cidr", ["10.1.2.3/8", "example.com", "10.0.0.0/33", "", "::1/129"])
def test_parse_prefix_refuses(cidr):
    with pytest.raises(E.EgressRuleError, match="not a CIDR"):
        E.parse_prefix(cidr)


@pytest.mark.parametrize("lo,hi,want", [(None, None, (0, 65535)), (443, None, (443, 443)),
                                        (20000, 20010, (20000, 20010)), (0, 0, (0, 0))])
def test_parse_ports(lo, hi, want):
    assert E.parse_ports(lo, hi, "t") == want


@pytest.mark.parametrize("lo,hi", [(None, 80), (90, 80), (-1, 5), (1, 65536), (True, 5), ("80", 80)])
def test_parse_ports_refuses(lo, hi):
    with pytest.raises(E.EgressRuleError):
        E.parse_ports(lo, hi, "t")


def test_parse_rule_checks_shape_and_proto():
    assert E.parse_rule(("10.0.0.0/8", 53, None, "udp"))[1:] == (53, 53, E.P_UDP)
    with pytest.raises(E.EgressRuleError, match="proto"):
        E.parse_rule(("10.0.0.0/8", 53, 53, "icmp"))
    with pytest.raises(E.EgressRuleError, match="expected"):
        E.parse_rule(("10.0.0.0/8", 53))


# ---- ranges -----------------------------------------------------------------------

def test_merge_ranges_joins_overlaps_and_neighbours_per_protocol():
    T, U, A = E.P_TCP, E.P_UDP, E.P_ANY
    assert E.merge_ranges([(10, 20, T), (15, 30, T), (31, 40, T)]) == ((10, 40, T),)
    assert E.merge_ranges([(53, 53, U), (53, 53, T)]) == ((53, 53, T | U),)
    assert E.merge_ranges([(80, 80, T), (0, 65535, A)]) == ((0, 65535, A),)
    assert E.merge_ranges([(80, 80, T), (443, 443, U)]) == ((80, 80, T), (443, 443, U))
    assert E.merge_ranges([]) == ()


# ---- compiled entries ---------------------------------------------------------------

def test_loopback_false_keeps_loopback_entries_empty():
    c = E.compile_rules(E.EgressRules())
    for cidr in ("127.0.0.0/8", "0.0.0.0/32", "::1/128", "::/128"):
        e = entry(c, cidr)
        assert e.ranges == () and e.flags == E.F_LOOPBACK
    assert len(c.entries4) == 2 and len(c.entries6) == 2


def test_loopback_true_and_port_list():
    c = E.compile_rules(E.EgressRules(loopback=True))
    assert entry(c, "127.0.0.0/8").ranges == ((0, 65535, E.P_ANY),)
    assert entry(c, "::1/128").ranges == ((0, 65535, E.P_ANY),)
    c = E.compile_rules(E.EgressRules(loopback=[8080, 5432]))
    assert entry(c, "127.0.0.0/8").ranges == ((5432, 5432, E.P_ANY), (8080, 8080, E.P_ANY))
    assert entry(c, "::/128").ranges == entry(c, "::1/128").ranges


def test_longer_prefix_inherits_enclosing_ranges():
    c = E.compile_rules(E.EgressRules(allow=[("10.0.0.0/8", 443, 443, "tcp"),
                                             ("10.1.0.0/16", 80, 80, "tcp")]))
    assert entry(c, "10.1.0.0/16").ranges == ((80, 80, E.P_TCP), (443, 443, E.P_TCP))
    assert entry(c, "10.0.0.0/8").ranges == ((443, 443, E.P_TCP),)


def test_wide_rule_does_not_open_loopback():
    c = E.compile_rules(E.EgressRules(allow=[("0.0.0.0/0", None, None, "any"),
                                             ("::/0", None, None, "any")]))
    assert entry(c, "0.0.0.0/0").ranges == ((0, 65535, E.P_ANY),)
    for cidr in ("127.0.0.0/8", "0.0.0.0/32", "::1/128", "::/128"):
        assert entry(c, cidr).ranges == ()


def test_rule_inside_loopback_with_loopback_false():
    c = E.compile_rules(E.EgressRules(allow=[("127.0.0.0/8", 20000, 20010, "tcp")]))
    e = entry(c, "127.0.0.0/8")
    assert e.ranges == ((20000, 20010, E.P_TCP),) and e.flags == E.F_LOOPBACK
    c = E.compile_rules(E.EgressRules(allow=[("127.0.0.1", 53, 53, "udp")], loopback=[80]))
    assert entry(c, "127.0.0.1/32").ranges == ((53, 53, E.P_UDP), (80, 80, E.P_ANY))


def test_mapped_rule_is_an_ipv4_entry():
    c = E.compile_rules(E.EgressRules(allow=[("::ffff:10.0.0.0/104", 22, 22, "tcp")]))
    assert entry(c, "10.0.0.0/8").ranges == ((22, 22, E.P_TCP),)
    assert all(e.prefix.version == 6 for e in c.entries6)


def test_too_many_ranges_for_one_prefix():
    rules = [("10.0.0.0/8", p, p, "tcp") for p in range(1000, 1000 + 2 * E.MAX_RANGES + 2, 2)]
    with pytest.raises(E.EgressRuleError, match="port ranges"):
        E.compile_rules(E.EgressRules(allow=rules))
    # adjacent ports merge into one range, so many rules may still fit
    rules = [("10.0.0.0/8", p, p, "tcp") for p in range(1000, 1100)]
    assert entry(E.compile_rules(E.EgressRules(allow=rules)), "10.0.0.0/8").ranges == ((1000, 1099, E.P_TCP),)


def test_families():
    assert E.compile_rules(E.EgressRules()).cfg == E.CFG_INET | E.CFG_INET6
    assert E.compile_rules(E.EgressRules(allow_families=("unix", "inet"))).cfg == E.CFG_INET
    assert E.compile_rules(E.EgressRules(allow_families=("unix",))).cfg == 0
    assert E.allowed_family_numbers(E.EgressRules()) == [1, 2, 10]   # seccomp holds netlink &co
    with pytest.raises(E.EgressRuleError, match="unknown family"):
        E.compile_rules(E.EgressRules(allow_families=("inet", "raw")))


def test_entry_encoding():
    e = E.Entry(ipaddress.ip_network("10.0.0.0/8"), ((53, 53, E.P_UDP), (80, 443, E.P_TCP)), 0)
    assert e.key_bytes() == struct.pack("=I", 8) + bytes([10, 0, 0, 0])
    v = e.value_bytes()
    assert len(v) == 8 + 8 * E.MAX_RANGES
    assert struct.unpack_from("=II", v) == (2, 0)
    assert struct.unpack_from("=HHB", v, 8) == (53, 53, E.P_UDP)
    assert struct.unpack_from("=HHB", v, 16) == (80, 443, E.P_TCP)
    assert v[24:] == b"\0" * (8 * (E.MAX_RANGES - 2))
    k6 = E.Entry(ipaddress.ip_network("2001:db8::/32"), ()).key_bytes()
    assert k6 == struct.pack("=I", 32) + ipaddress.IPv6Address("2001:db8::").packed


# ---- the kernel's lookup, modelled -----------------------------------------------------

def kernel_allows(c, addr, port, pbit):
    """What bpf/egress.bpf.c does: mapped -> IPv4, longest prefix, any range."""
    a = ipaddress.ip_address(addr)
    if a.version == 6 and a.ipv4_mapped:
        a = a.ipv4_mapped
    hits = [e for e in (c.entries4 if a.version == 4 else c.entries6) if a in e.prefix]
    if not hits:
        return False
    best = max(hits, key=lambda e: e.prefix.prefixlen)
    return any(m & pbit and lo <= port <= hi for lo, hi, m in best.ranges)


def rules_allow(rules, addr, port, pbit):
    """The plain meaning: some rule of the destination's zone covers it."""
    a = ipaddress.ip_address(addr)
    if a.version == 6 and a.ipv4_mapped:
        a = a.ipv4_mapped
    host = ipaddress.ip_network(a)
    cands = [E.parse_rule(r) for r in rules.allow]
    for lo, hi, m in E.loopback_ranges(rules.loopback):
        cands += [(z, lo, hi, m) for z in E.LOOPBACK4 + E.LOOPBACK6]
    return any(net.version == a.version and a in net and E._zone(net) == E._zone(host)
               and lo <= port <= hi and m & pbit for net, lo, hi, m in cands)


ADDRS4 = ["10.0.0.1", "10.1.2.3", "10.1.255.1", "127.0.0.1", "127.9.9.9", "0.0.0.0",
          "192.168.1.1", "8.8.8.8"]
ADDRS6 = ["::1", "::", "2001:db8::1", "2001:db8:1::5", "fe80::1"]
PREFIXES = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "127.0.0.0/8",
            "127.0.0.1/32", "192.168.0.0/16", "::/0", "2001:db8::/32", "2001:db8:1::/48",
            "::1/128", "::ffff:10.0.0.0/104", "::ffff:127.0.0.0/104", "96.0.0.0/3"]
PORTS = [0, 22, 53, 80, 443, 20000, 20005, 20010, 20011, 65535]

rule_st = st.tuples(st.sampled_from(PREFIXES), st.sampled_from(PORTS), st.sampled_from(PORTS),
                    st.sampled_from(["tcp", "udp", "any"])).map(
    lambda r: (r[0], min(r[1], r[2]), max(r[1], r[2]), r[3]))
loop_st = st.one_of(st.booleans(), st.lists(st.sampled_from(PORTS), max_size=3))
dest_st = st.one_of(st.sampled_from(ADDRS4 + ADDRS6),
                    st.sampled_from(ADDRS4).map(lambda a: f"::ffff:{a}"))


@HYP
@given(st.lists(rule_st, max_size=6), loop_st, dest_st, st.sampled_from(PORTS),
       st.sampled_from([E.P_TCP, E.P_UDP, E.P_OTHER]))
def test_longest_prefix_lookup_equals_rule_union(allow, loopback, dest, port, pbit):
    rules = E.EgressRules(allow=allow, loopback=loopback)
    c = E.compile_rules(rules)
    assert kernel_allows(c, dest, port, pbit) == rules_allow(rules, dest, port, pbit)


def test_examples_of_the_model():
    rules = E.EgressRules(allow=[("127.0.0.1/32", 53, 53, "udp")], loopback=[8080])
    c = E.compile_rules(rules)
    assert kernel_allows(c, "127.0.0.1", 53, E.P_UDP)
    assert not kernel_allows(c, "127.0.0.2", 53, E.P_UDP)       # resolver not allowed
    assert not kernel_allows(c, "127.0.0.1", 53, E.P_TCP)
    assert kernel_allows(c, "::ffff:127.0.0.1", 8080, E.P_TCP)  # mapped = IPv4
    assert kernel_allows(c, "::1", 8080, E.P_TCP)
    assert not kernel_allows(c, "::1", 53, E.P_UDP)              # 127.0.0.1 rule is IPv4 only
    assert not kernel_allows(c, "8.8.8.8", 53, E.P_UDP)


# ---- records -------------------------------------------------------------------------

def pack_event(family, addr, port, op, reason, sock_type=1, protocol=6):
    ev = R.EgressEvent(ts=123, cgroup=4567, pid=10, tid=11, uid=1000, sock_type=sock_type,
                       protocol=protocol, family=family, port=port, op=op, reason=reason,
                       comm=b"curl")
    ev.addr[:] = list(addr.ljust(16, b"\0"))
    return bytes(ev)


def test_decode_denial():
    d = E.decode_denial(pack_event(2, bytes([127, 0, 0, 2]), 53, 3, 1, 2, 17))
    assert d == {"pid": 10, "tid": 11, "uid": 1000, "comm": "curl", "cgroup": 4567,
                 "family": "inet", "addr": "127.0.0.2", "port": 53, "proto": "udp",
                 "op": "sendmsg", "rule": "no-allow-rule", "sock_type": 2, "protocol": 17,
                 "ts": 123}
    d = E.decode_denial(pack_event(10, ipaddress.IPv6Address("::ffff:127.0.0.1").packed, 80, 2, 3))
    assert (d["family"], d["addr"], d["op"], d["rule"]) == ("inet6", "::ffff:127.0.0.1", "connect",
                                                            "loopback-not-allowed")
    d = E.decode_denial(pack_event(2, b"", 0, 5, 4, 3, 1))
    assert (d["op"], d["addr"], d["port"], d["proto"], d["rule"]) == ("socket", None, None,
                                                                      "icmp", "raw-socket")


# ---- C side, compiled by the host compiler ------------------------------------------

def test_attach_types_the_kernel_knows_come_from_its_btf(tmp_path):
    """Linux < 6.7 has no CGROUP_UNIX_* attach types: the unix hooks are not
    even loaded there (a refused load is printed by bcc on every run)."""
    from agentwatch.guards.egress import kernel_knows
    btf = tmp_path / "vmlinux"
    btf.write_bytes(b"\0BPF_CGROUP_INET4_CONNECT\0BPF_CGROUP_UNIX_CONNECT\0BPF_CGROUP_UNIX_SENDMSGX\0")
    assert kernel_knows("CGROUP_INET4_CONNECT", "CGROUP_UNIX_CONNECT", btf=str(btf))
    assert not kernel_knows("CGROUP_UNIX_CONNECT", "CGROUP_UNIX_SENDMSG", btf=str(btf))   # a longer name only
    assert kernel_knows("CGROUP_UNIX_SENDMSG", btf=str(tmp_path / "none"))   # no BTF: the load decides
