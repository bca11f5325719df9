"""The egress guard's pure parts: the verdict on a flow, which names DNS
answers, --resolve pins, and what a policy's plan, lint, explain and diff
say about the guard (issue #16). The guard on the real kernel:
tests/kernel/test_egress_guard.py."""
import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from agentwatch.core.errors import UsageError
from agentwatch.guards.guard import NameRule, judge_flow, name_allowed, name_rules
from agentwatch.policy import load
from agentwatch.policy.diff import diff
from agentwatch.policy.explain import explain
from agentwatch.policy.lint import lint
from agentwatch.run.prepare import parse_pins
from agentwatch.sandbox.plan import make_plan

RULES = name_rules([("pypi.org", [(443, 443)], "tcp"), ("*.example.com", None, "any"),
                    ("udp-only.test", [(53, 53)], "udp")])
PYPI = {"151.101.0.223", "2a04:4e42::223"}


@pytest.mark.parametrize("name, source, addr, port, allowed, why", [
    ("pypi.org", "sni", "151.101.0.223", 443, True, "allowed by pypi.org"),
    ("pypi.org", "host", "::ffff:151.101.0.223", 443, True, "allowed"),      # mapped = IPv4
    ("pypi.org", "sni", "2a04:4e42::223", 443, True, "allowed"),
    ("pypi.org", "sni", "10.1.2.3", 443, False, "10.1.2.3 is not an address of pypi.org"),
    ("pypi.org", "sni", "151.101.0.223", 80, False, "port 80/tcp is not allowed"),
    ("evil.test", "sni", "151.101.0.223", 443, False, "evil.test is not in network.allow"),
    (None, None, "151.101.0.223", 443, False, "no name"),
    ("pypi.org", "connect", "127.0.0.9", 443, True, "allowed"),   # CONNECT: the guard picks the address
    ("a.b.example.com", "sni", "151.101.0.223", 8443, True, "allowed by *.example.com"),
    ("example.com", "sni", "151.101.0.223", 443, False, "not in network.allow"),
    ("udp-only.test", "sni", "151.101.0.223", 53, False, "port 53/tcp is not allowed"),
])
def test_judge_flow(name, source, addr, port, allowed, why):
    v = judge_flow(RULES, name, source, addr, port, PYPI)
    assert v.allowed is allowed and why in v.reason
    assert v.rule == ("network.domain" if not allowed else v.rule)


def test_an_unnamed_flow_to_this_host_breaks_network_loopback():
    from agentwatch.guards.guard import refusal_rule
    assert refusal_rule(None, "127.0.0.5") == refusal_rule(None, "::1") == "network.loopback"
    assert refusal_rule(None, "0.0.0.0") == "network.loopback"
    assert refusal_rule(None, "10.0.0.1") == refusal_rule("x.test", "127.0.0.1") == "network.domain"
    assert judge_flow(RULES, None, None, "::ffff:127.0.0.1", 80, set()).rule == "network.loopback"


def test_a_name_that_did_not_resolve_has_no_address():
    v = judge_flow(RULES, "pypi.org", "sni", "151.101.0.223", 443, set())
    assert not v.allowed and "did not resolve" in v.reason


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.integers(0, 65535), st.sampled_from(["sni", "host"]))
def test_only_an_address_of_the_name_passes(ip, port, source):
    v = judge_flow(RULES, "pypi.org", source, str(ip), port, PYPI)
    mine = ipaddress.ip_address(str(ip)) in {ipaddress.ip_address(a) for a in PYPI}
    assert v.allowed == (mine and port == 443)


def test_dns_answers_exactly_the_names_some_rule_names():
    assert name_allowed(RULES, "pypi.org") and name_allowed(RULES, "x.example.com")
    assert not name_allowed(RULES, "pypi.org.evil.test") and not name_allowed(RULES, "example.com")
    assert not name_allowed(RULES, None) and not name_allowed((), "pypi.org")
    assert NameRule("a.test", ((1, 2),), "udp").allows_port(1, "udp")


def test_parse_pins():
    assert parse_pins(["Allowed.Test.:127.0.0.2", "allowed.test:[::1]", "allowed.test:127.0.0.2",
                       "b.test:::1"]) == {"allowed.test": ["127.0.0.2", "::1"], "b.test": ["::1"]}
    for bad, says in (("allowed.test", "NAME:ADDR"), ("x:300.1.1.1", "not an IPv4 or IPv6"),
                      ("*.x.test:1.2.3.4", "not a wildcard"), ("1.2.3.4:1.2.3.4", "an address, not")):
        with pytest.raises(UsageError, match=says):
            parse_pins([bad])


def _policy(tmp_path, network, action="deny", name="p.yaml"):
    path = tmp_path / name
    path.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n"
                    f"network: {network}\non_violation: {{network: {action}}}\n")
    return path


def _plan(tmp_path, network, action="deny", pins=None):
    path = _policy(tmp_path, network, action)
    pol = load(str(path))
    return make_plan(pol.data, {"WORKSPACE": str(tmp_path)}, [str(path)], landlock_abi=7,
                     ns_missing={}, pins=pins)


def test_domain_rules_turn_the_guard_on_and_are_not_resolved(tmp_path):
    p = _plan(tmp_path, "{allow: [{domain: pypi.org, ports: [443], protocol: tcp}, "
                        "{cidr: 10.0.0.0/8, ports: [5432]}]}")
    assert p.guard == [("pypi.org", [(443, 443)], "tcp")]
    assert p.resolved == {} and p.egress.allow == [("10.0.0.0/8", 5432, 5432, "any")]
    assert p.landlock.ports == [], "the guard judges TCP ports (a proxy's CONNECT port is the agent's)"
    assert p.record()["egress_guard"]["names"][0]["domain"] == "pypi.org"
    assert any(line.startswith("egress guard:") for line in p.describe())
    assert "net" not in p.namespaces


def test_guard_false_resolves_names_at_start_from_the_pins(tmp_path):
    p = _plan(tmp_path, "{guard: false, allow: [{domain: pypi.org, ports: [443]}]}",
              pins={"pypi.org": ["192.0.2.7"]})
    assert p.guard is None and p.resolved == {"pypi.org": ["192.0.2.7"]}
    assert p.egress.allow == [("192.0.2.7/32", 443, 443, "any")]


def test_guard_true_without_domains_keeps_the_host_network_for_its_listeners(tmp_path):
    p = _plan(tmp_path, "{guard: true}")
    assert p.guard == [] and "net" not in p.namespaces


def test_alert_only_gets_no_guard(tmp_path):
    p = _plan(tmp_path, "{allow: [{domain: pypi.org}]}", action="alert")
    assert p.guard is None and p.egress is None


def test_lint_explain_and_diff_know_the_guard(tmp_path):
    bad = _policy(tmp_path, "{guard: 1}")
    assert any("network.guard: expected true or false" in str(x) for x in lint([str(bad)]).problems)
    off = _policy(tmp_path, "{guard: false, allow: [{domain: pypi.org}]}", name="off.yaml")
    warns = [str(x) for x in lint([str(off)]).problems]
    assert any("network.guard: false with domain rules" in w and "off.yaml:" in w for w in warns), warns
    on = _policy(tmp_path, "{allow: [{domain: pypi.org}]}", name="on.yaml")
    text = explain(load(str(on)), {"WORKSPACE": str(tmp_path)})
    assert "Egress guard: on" in text and "TLS SNI" in text
    assert "Egress guard: off (network.guard: false)" in explain(load(str(off)), {"WORKSPACE": str(tmp_path)})
    changes = "\n".join(diff(load(str(on)), load(str(off))))
    assert "egress guard is off" in changes
    assert "egress guard now decides TCP by name" in "\n".join(diff(load(str(off)), load(str(on))))


# -- the splice (real loopback sockets, no BPF) ---------------------------------------------
def _tcp_pair():
    import socket
    ls = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(ls.getsockname())
    b, _ = ls.accept()
    ls.close()
    return a, b


def _splice_on(g, c, u):
    """g._splice(c, u, rec) started on the guard's loop: (rec, its future)."""
    import asyncio
    for s in (c, u):
        s.setblocking(False)
    rec = {"bytes_out": 0, "bytes_in": 0}
    return rec, asyncio.run_coroutine_threadsafe(g._splice(c, u, rec), g.loop)


@pytest.mark.parametrize("slow_reader", [False, True])
def test_the_splice_moves_every_byte_in_order_also_to_a_lagging_reader(slow_reader, monkeypatch):
    """Guard._splice: socket -> the loop's pipe -> socket, both ways. A
    reader that lags (a small receive buffer, reads with pauses) makes the
    destination push back, so part goes the other way (out of the pipe,
    then sent); the bytes and their order are the same, each end sees the
    other's EOF, and the pipe is empty after, with no callback left."""
    import hashlib
    import os
    import socket
    import threading
    import time
    from agentwatch.guards import guard
    taken = []
    take = guard._Pipe.take
    monkeypatch.setattr(guard._Pipe, "take", lambda self, n: taken.append(n) or take(self, n))
    g = guard.EgressGuard().start()
    agent, c = _tcp_pair()          # the agent's end, the guard's accepted socket
    u, server = _tcp_pair()         # the guard's upstream socket, the server's end
    if slow_reader:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    data = os.urandom(4 << 20)
    got = []

    def read():
        while True:
            chunk = server.recv(1 << 16)
            if not chunk:
                server.sendall(b"bye")          # the other way, then its EOF
                server.shutdown(socket.SHUT_WR)
                return
            got.append(chunk)
            if slow_reader and len(got) % 8 == 0:
                time.sleep(0.002)
    reader = threading.Thread(target=read)
    reader.start()
    writer = threading.Thread(target=lambda: (agent.sendall(data), agent.shutdown(socket.SHUT_WR)))
    writer.start()
    try:
        rec, fut = _splice_on(g, c, u)
        fut.result(120)
        writer.join(60)
        reader.join(60)
        assert rec["bytes_out"] == len(data) and rec["bytes_in"] == 3
        assert agent.recv(16) == b"bye" and agent.recv(16) == b""
        assert not any(g.loop._selector.get_map().get(s.fileno()) for s in (c, u))
        assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()
        with pytest.raises(BlockingIOError):
            os.read(g._splice_pipe.r, 1)      # nothing left behind for the next flow
        assert taken or not slow_reader     # the lagging reader made part go the other way
    finally:
        for s in (agent, c, u, server):
            s.close()
        g.close()


@pytest.mark.parametrize("addr, decision, rule", [
    ("203.0.113.5", "closed", None),                     # remote: sent nothing anywhere
    ("127.0.0.4", "deny", "network.loopback"),           # this host: the connect the policy forbids
])
def test_a_flow_closed_before_a_byte_is_a_refusal_only_to_this_host(addr, decision, rule):
    """Guard._flow on a real loopback socket pair (no BPF: the kernel's
    record of the redirected connect is given). A client that connects and
    closes without a byte (a happy-eyeballs loser) refused nothing remote."""
    import asyncio
    from agentwatch.guards.guard import EgressGuard, RunSession
    g = EgressGuard().start()
    got = []
    s = RunSession("run-x", "agent", (), {}, got.append)
    s.flow_of = lambda a, p: {"pid": 7, "tid": 7, "uid": 0, "comm": "curl", "cgroup": 1,
                              "family": "inet", "addr": addr, "port": 443, "ts": 0}
    agent, c = _tcp_pair()
    agent.close()
    c.setblocking(False)
    s.active, g.active = 1, 1                  # as _accept counts it
    try:
        asyncio.run_coroutine_threadsafe(g._flow(s, c, c.getpeername()), g.loop).result(10)
    finally:
        g.close()
    (rec,) = got
    assert (rec["decision"], rec.get("rule")) == (decision, rule), rec
    assert s.counters["closed_unsent"] == (decision == "closed") and s.active == 0


def test_a_flow_ends_after_idle_s_with_no_byte_either_way_and_not_before():
    """Limits.idle_s counts quiet on the flow as a whole: bytes one way
    every 0.15 s keep a 0.5 s flow open past 0.5 s; then 0.5 s of nothing
    ends it."""
    import time
    from agentwatch.guards import guard
    g = guard.EgressGuard(limits=guard.Limits(idle_s=0.5)).start()
    agent, c = _tcp_pair()
    u, server = _tcp_pair()
    try:
        t0 = time.monotonic()
        rec, fut = _splice_on(g, c, u)
        for _ in range(8):
            server.sendall(b"x")
            time.sleep(0.15)
        assert not fut.done()              # 1.2 s in: the trickle kept it open
        fut.result(5)
        took = time.monotonic() - t0
        assert 1.2 + 0.5 - 0.15 <= took < 1.2 + 0.5 + 1.0, took
        assert rec["bytes_in"] == 8
    finally:
        for s in (agent, c, u, server):
            s.close()
        g.close()


def test_the_upstream_connect_succeeds_or_names_the_kernels_error():
    """guard._connect on loopback: a listener is connected (mostly before
    connect() returns, so without a wait on the loop); a closed port raises
    ECONNREFUSED, which the flow record then names."""
    import asyncio
    import errno
    import socket
    from agentwatch.guards import guard
    ls = socket.create_server(("127.0.0.1", 0))
    free = socket.create_server(("127.0.0.1", 0))
    closed = free.getsockname()
    free.close()

    async def go(addr):
        s = socket.socket()
        s.setblocking(False)
        try:
            await guard._connect(asyncio.get_running_loop(), s, addr, 5)
            return s.getpeername()
        finally:
            s.close()
    try:
        assert asyncio.run(go(ls.getsockname())) == ls.getsockname()
        with pytest.raises(OSError) as e:
            asyncio.run(go(closed))
        assert e.value.errno == errno.ECONNREFUSED and "refused" in e.value.strerror
    finally:
        ls.close()


def test_an_agent_that_never_reads_stops_the_upstream_reads_and_is_closed_after_idle_s():
    """The upstream sends more than the agent's socket takes and the agent
    reads nothing: the guard stops reading upstream (its one chunk waits),
    and ends the flow once idle_s passed with no byte moved: a write that
    cannot go on counts as quiet."""
    import socket
    import threading
    import time
    from agentwatch.guards import guard
    g = guard.EgressGuard(limits=guard.Limits(idle_s=0.5, chunk=1 << 16)).start()
    agent, c = _tcp_pair()
    u, server = _tcp_pair()
    for s in (agent, c, u, server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    server.settimeout(0.1)
    pushed = [0]

    def push():
        chunk = b"x" * 65536
        while True:
            try:
                pushed[0] += server.send(chunk)
            except (socket.timeout, BlockingIOError):
                if fut.done():
                    return
            except OSError:
                return
    try:
        t0 = time.monotonic()
        rec, fut = _splice_on(g, c, u)
        pusher = threading.Thread(target=push)
        pusher.start()
        fut.result(10)
        took = time.monotonic() - t0
        pusher.join(5)
        assert 0.5 <= took < 5, took
        assert rec["bytes_in"] < 4 << 20          # it stopped reading upstream
        assert pushed[0] >= rec["bytes_in"]
    finally:
        for s in (agent, c, u, server):
            s.close()
        g.close()
