"""The egress guard's kernel half (bpf/egress.bpf.c with EgressRules.guard):
what no rule allows goes to the guard's listeners instead of failing, and
the guard learns each flow's original destination from the kernel.

Every destination here is a loopback address (loopback is not allowed by
the rules, so it is redirected like any other); the listeners are this
test's own on 127.0.0.1 and ::1.
"""
import socket
import threading

import pytest

from agentwatch.guards.egress import GuardPorts, EgressRules, attached_program_ids
from tests.kernel.test_egress import cgroup, egress, in_cgroup  # noqa: F401 (fixtures)

pytestmark = pytest.mark.kernel
AF4, AF6 = socket.AF_INET, socket.AF_INET6


class Listeners:
    """A TCP proxy stand-in on 127.0.0.1 and ::1 that reads one line from
    each client and answers with its peer address, and a UDP 'DNS' on
    127.0.0.1 that echoes what it got."""

    def __init__(self):
        self.tcp4 = socket.create_server(("127.0.0.1", 0))
        self.tcp6 = socket.create_server(("::1", 0), family=AF6)
        self.udp4 = socket.socket(AF4, socket.SOCK_DGRAM)
        self.udp4.bind(("127.0.0.1", 0))
        self.dns_tcp4 = socket.create_server(("127.0.0.1", self.udp4.getsockname()[1]))
        self.accepted = []        # (peer, first bytes)
        self.datagrams = []
        self.stop = False
        self.threads = [threading.Thread(target=self._tcp, args=(s,), daemon=True)
                        for s in (self.tcp4, self.tcp6, self.dns_tcp4)]
        self.threads.append(threading.Thread(target=self._udp, daemon=True))
        for t in self.threads:
            t.start()

    def ports(self):
        return GuardPorts(proxy4=self.tcp4.getsockname()[1], proxy6=self.tcp6.getsockname()[1],
                          dns4=self.udp4.getsockname()[1])

    def _tcp(self, srv):
        srv.settimeout(0.2)
        while not self.stop:
            try:
                c, peer = srv.accept()
            except (socket.timeout, OSError):
                continue
            with c:
                c.settimeout(3)
                data = c.recv(100)
                self.accepted.append((srv.getsockname()[1], peer[:2], data))
                c.sendall(b"ok")

    def _udp(self):
        self.udp4.settimeout(0.2)
        while not self.stop:
            try:
                data, peer = self.udp4.recvfrom(512)
            except (socket.timeout, OSError):
                continue
            self.datagrams.append((peer, data))
            self.udp4.sendto(b"answer:" + data, peer)

    def close(self):
        self.stop = True
        for t in self.threads:
            t.join()
        for s in (self.tcp4, self.tcp6, self.udp4, self.dns_tcp4):
            s.close()


@pytest.fixture
def listeners():
    ls = Listeners()
    yield ls
    ls.close()


def tcp_talk(fam, host, port):
    """Connect, send a line, read the answer; (answer, getpeername)."""
    with socket.socket(fam) as s:
        s.settimeout(3)
        s.connect((host, port))
        s.sendall(b"hello")
        return s.recv(10), s.getpeername()[:2]


def udp_ask(host, port, connected):
    """A query to host:port; (answer, where it came from)."""
    with socket.socket(AF4, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        if connected:
            s.connect((host, port))
            s.send(b"q1")
            return s.recv(100), s.getpeername()
        s.sendto(b"q2", (host, port))
        data, frm = s.recvfrom(100)
        return data, frm


def test_tcp_goes_to_the_proxy_and_the_kernel_names_the_original(cgroup, egress, listeners):
    eg, denials = egress(EgressRules(allow=[], loopback=False, guard=listeners.ports()))
    pid, (answer, peer) = in_cgroup(cgroup, lambda: tcp_talk(AF4, "127.0.0.7", 4443))
    assert answer == b"ok"
    assert peer == ("127.0.0.7", 4443), "getpeername shows the address the agent connected to"
    assert len(listeners.accepted) == 1
    lport, client, data = listeners.accepted[0]
    assert lport == listeners.ports().proxy4 and data == b"hello"
    flow = eg.flow_of(*client)
    assert flow["addr"] == "127.0.0.7" and flow["port"] == 4443 and flow["pid"] == pid
    assert flow["family"] == "inet" and flow["cgroup"] > 0
    assert eg.flow_of(*client) is None, "a flow is taken once"
    assert denials == []
    assert eg.counters()["proxied"] == 1


def test_ipv6_and_mapped_go_to_the_listener_of_their_family(cgroup, egress, listeners):
    eg, denials = egress(EgressRules(allow=[], loopback=False, guard=listeners.ports()))
    _, r6 = in_cgroup(cgroup, lambda: tcp_talk(AF6, "::1", 4443))
    _, rm = in_cgroup(cgroup, lambda: tcp_talk(AF6, "::ffff:127.0.0.9", 8080))
    assert r6 == (b"ok", ("::1", 4443)) and rm == (b"ok", ("::ffff:127.0.0.9", 8080))
    by_port = {}
    for lport, client, _ in listeners.accepted:
        by_port.setdefault(lport, []).append(eg.flow_of(*client))
    p = listeners.ports()
    assert [(f["family"], f["addr"], f["port"]) for f in by_port[p.proxy6]] == [("inet6", "::1", 4443)]
    assert [(f["family"], f["addr"], f["port"]) for f in by_port[p.proxy4]] == \
        [("inet6", "::ffff:127.0.0.9", 8080)]


def test_port_53_goes_to_the_dns_responder_and_answers_read_as_from_the_resolver(cgroup, egress,
                                                                                   listeners):
    eg, denials = egress(EgressRules(allow=[], loopback=False, guard=listeners.ports()))
    _, (a1, frm1) = in_cgroup(cgroup, lambda: udp_ask("127.0.0.53", 53, connected=True))
    _, (a2, frm2) = in_cgroup(cgroup, lambda: udp_ask("127.0.0.54", 53, connected=False))
    assert (a1, frm1) == (b"answer:q1", ("127.0.0.53", 53))
    assert (a2, frm2) == (b"answer:q2", ("127.0.0.54", 53))
    assert [d for _, d in listeners.datagrams] == [b"q1", b"q2"]
    _, (a3, _) = in_cgroup(cgroup, lambda: tcp_talk(AF4, "127.0.0.53", 53))
    assert a3 == b"ok" and listeners.accepted[-1][0] == listeners.ports().dns4
    assert eg.counters()["dns"] == 3 and denials == []


def test_other_udp_is_still_refused_and_allowed_cidrs_are_not_redirected(cgroup, egress, listeners):
    direct = socket.create_server(("127.0.0.1", 0))
    try:
        dport = direct.getsockname()[1]
        eg, denials = egress(EgressRules(allow=[], loopback=[dport], guard=listeners.ports()))

        def go():
            out = {}
            with socket.socket(AF4, socket.SOCK_DGRAM) as s:
                try:
                    s.sendto(b"x", ("127.0.0.1", 4443))
                    out["udp"] = 0
                except OSError as e:
                    out["udp"] = e.errno
            with socket.socket(AF4) as s:
                s.settimeout(3)
                s.connect(("127.0.0.1", dport))
                out["peer"] = s.getpeername()
            return out
        _, out = in_cgroup(cgroup, go)
        assert out["udp"] == 1, "UDP other than DNS is refused (EPERM)"
        assert out["peer"] == ("127.0.0.1", dport)
        c, _ = direct.accept()
        c.close()
        assert listeners.accepted == []
        assert [(d["op"], d["port"], d["proto"]) for d in (eg.poll(0) or denials)] == \
            [("sendmsg", 4443, "udp")]
    finally:
        direct.close()


def test_the_guard_programs_attach_only_with_the_guard(cgroup, egress, listeners):
    eg, _ = egress(EgressRules(allow=[], loopback=False))
    ids = attached_program_ids(cgroup)
    assert ids["CGROUP_SOCK_OPS"] == [] and ids["CGROUP_UDP4_RECVMSG"] == []
    eg.close()
    eg2, _ = egress(EgressRules(allow=[], loopback=False, guard=listeners.ports()))
    ids = attached_program_ids(cgroup)
    assert len(ids["CGROUP_SOCK_OPS"]) == 1 and len(ids["CGROUP_INET6_GETPEERNAME"]) == 1
