"""agentwatch.guards.dns: the egress guard's DNS responder. answer() is
tested as a pure function with fake decide/resolve; DnsServer on 127.0.0.1
(and ::1 when the host has it) with ephemeral ports, queried with dnslib's
own client code from a thread. No other address is ever used."""
import asyncio
import socket
import struct
import threading
import time

import pytest
from dnslib import CLASS, EDNS0, OPCODE, QTYPE, RCODE, DNSHeader, DNSQuestion, DNSRecord
from hypothesis import given, settings, strategies as st

from agentwatch.guards.dns import MAX_ANSWERS, TTL, DnsServer, Reply, answer

LOCAL = "127.0.0.1"
ALLOWED = {"allowed.test", "v4only.test", "many.test", "slow.test", "fast.test"}
PINS = {
    "allowed.test": ["192.0.2.1", "2001:db8::1", "192.0.2.2"],
    "v4only.test": ["192.0.2.7"],
    "many.test": [f"192.0.2.{i}" for i in range(1, 40)] + ["192.0.2.1", "bogus", "2001:db8::2"],
    "fast.test": ["192.0.2.9"],
}


class Fakes:
    """decide allows ALLOWED; resolve answers from PINS. Both keep their calls."""

    def __init__(self, pins=PINS):
        self.pins = pins
        self.decided, self.resolved = [], []

    def decide(self, name, qtype):
        self.decided.append((name, qtype))
        return (name in ALLOWED, "allowed by test" if name in ALLOWED else "not in test list")

    def resolve(self, name, qtype):
        self.resolved.append((name, qtype))
        if name not in self.pins:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.pins[name]


def query(name, qtype="A", **kw):
    return DNSRecord.question(name, qtype, **kw).pack()


def ask(name, qtype="A", fakes=None, **kw):
    fakes = fakes or Fakes()
    reply = answer(query(name, qtype, **kw), fakes.decide, fakes.resolve)
    return reply, DNSRecord.parse(reply.data) if reply.data is not None else None, fakes


# ---- answer(): allowed ----

def test_allowed_a():
    q = DNSRecord.question("allowed.test", "A")
    reply = answer(q.pack(), Fakes().decide, Fakes().resolve)
    r = DNSRecord.parse(reply.data)
    assert (reply.name, reply.qtype, reply.decision, reply.addresses) == ("allowed.test", "A", "allow",
                                                                         ["192.0.2.1", "192.0.2.2"])
    assert r.header.id == q.header.id and r.header.qr == 1 and r.header.aa == 1 and r.header.ra == 1
    assert r.header.rcode == RCODE.NOERROR and r.header.rd == 1
    assert r.questions == q.questions
    assert [(str(rr.rname), rr.rtype, str(rr.rdata), rr.ttl) for rr in r.rr] == [
        ("allowed.test.", QTYPE.A, "192.0.2.1", TTL), ("allowed.test.", QTYPE.A, "192.0.2.2", TTL)]


def test_allowed_aaaa():
    reply, r, fakes = ask("allowed.test", "AAAA")
    assert reply.addresses == ["2001:db8::1"]
    assert [(rr.rtype, str(rr.rdata)) for rr in r.rr] == [(QTYPE.AAAA, "2001:db8::1")]
    assert fakes.resolved == [("allowed.test", "AAAA")]


def test_other_family_only_is_nodata():
    reply, r, _ = ask("v4only.test", "AAAA")
    assert (reply.decision, reply.addresses, r.header.rcode, r.rr) == ("allow", [], RCODE.NOERROR, [])


def test_resolve_returning_nothing_is_nodata():
    fakes = Fakes(pins={"allowed.test": []})
    reply, r, _ = ask("allowed.test", "A", fakes)
    assert (r.header.rcode, r.rr, reply.addresses) == (RCODE.NOERROR, [], [])
    fakes = Fakes(pins={"allowed.test": None})
    assert ask("allowed.test", "A", fakes)[1].header.rcode == RCODE.NOERROR


def test_resolve_oserror_is_servfail():
    fakes = Fakes(pins={})
    reply, r, _ = ask("allowed.test", "A", fakes)
    assert r.header.rcode == RCODE.SERVFAIL and reply.decision == "allow" and "resolve failed" in reply.reason


def test_resolve_returning_garbage_is_servfail():
    fakes = Fakes(pins={"allowed.test": 42})
    assert ask("allowed.test", "A", fakes)[1].header.rcode == RCODE.SERVFAIL


def test_answers_are_capped_deduplicated_and_checked():
    reply, r, _ = ask("many.test", "A")
    assert reply.addresses == [f"192.0.2.{i}" for i in range(1, MAX_ANSWERS + 1)]
    assert len(r.rr) == MAX_ANSWERS


def test_largest_reply_fits_in_512_bytes():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    fakes = Fakes(pins={name: [f"2001:db8::{i}" for i in range(1, 20)]})
    reply = answer(query(name, "AAAA"), lambda n, t: (True, ""), fakes.resolve)
    assert len(reply.addresses) == MAX_ANSWERS and len(reply.data) <= 512


def test_name_is_lowercased_without_dot_and_question_case_kept():
    reply, r, fakes = ask("AlLoWeD.TeSt.", "A")
    assert fakes.decided == [("allowed.test", "A")] and fakes.resolved == [("allowed.test", "A")]
    assert str(r.questions[0].qname) == "AlLoWeD.TeSt."           # 0x20 randomisation still checks out
    assert reply.name == "allowed.test"


def test_edns_query_is_answered():
    q = DNSRecord.question("allowed.test", "A")
    q.add_ar(EDNS0(udp_len=1232))
    r = DNSRecord.parse(answer(q.pack(), Fakes().decide, Fakes().resolve).data)
    assert rcode_and_addresses(r) == (RCODE.NOERROR, ["192.0.2.1", "192.0.2.2"])


def test_flags_from_the_query():
    q = DNSRecord.question("allowed.test", "A")
    q.header.rd = 0
    q.header.ad = 1
    q.header.cd = 1
    r = DNSRecord.parse(answer(q.pack(), Fakes().decide, Fakes().resolve).data)
    assert (r.header.rd, r.header.ad, r.header.cd, r.header.aa, r.header.ra) == (0, 0, 0, 1, 1)


@pytest.mark.parametrize("qtype", ["TXT", "MX", "ANY", "SRV", "NS", "CNAME", "PTR", "HTTPS", "SVCB", "NULL"])
def test_allowed_other_types_are_empty_and_never_resolved(qtype):
    reply, r, fakes = ask("allowed.test", qtype)
    assert (reply.decision, reply.qtype, r.header.rcode, r.rr) == ("unsupported", qtype, RCODE.NOERROR, [])
    assert fakes.resolved == []


def test_unknown_type_and_class():
    q = DNSRecord(DNSHeader(id=5), q=DNSQuestion("allowed.test", 65280))
    reply = answer(q.pack(), Fakes().decide, Fakes().resolve)
    assert (reply.decision, reply.qtype) == ("unsupported", "TYPE65280")
    fakes = Fakes()
    q = DNSRecord(DNSHeader(id=6), q=DNSQuestion("allowed.test", QTYPE.A, CLASS.CH))
    reply = answer(q.pack(), fakes.decide, fakes.resolve)
    assert reply.decision == "unsupported" and fakes.resolved == []


# ---- answer(): denied ----

@pytest.mark.parametrize("qtype", ["A", "AAAA", "TXT", "MX", "ANY", "NULL"])
def test_forbidden_is_nxdomain_and_never_resolved(qtype):
    reply, r, fakes = ask("secret-data.forbidden.test", qtype)
    assert (reply.decision, reply.name, reply.qtype, reply.reason) == (
        "deny", "secret-data.forbidden.test", qtype, "not in test list")
    assert r.header.rcode == RCODE.NXDOMAIN and r.header.aa == 1 and r.rr == []
    assert fakes.resolved == []


def test_decide_raising_fails_closed():
    def decide(name, qtype):
        raise RuntimeError("rules broken")
    resolved = []
    reply = answer(query("allowed.test"), decide, lambda n, t: resolved.append(n) or ["192.0.2.1"])
    assert reply.decision == "deny" and DNSRecord.parse(reply.data).header.rcode == RCODE.NXDOMAIN
    assert resolved == [] and "RuntimeError" in reply.reason


def raw_query(labels, qtype=1, qid=0x4242):
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)


@pytest.mark.parametrize("labels", [[b"allowed.test"], [b"allowed", b"te\x00st"], [b"caf\xc3\xa9", b"test"],
                                    [b"_x", b"allowed", b"test"], [], [b"*", b"test"], [b"a", b"b", b"1"]])
def test_implausible_names_are_nxdomain_without_asking(labels):
    fakes = Fakes()
    reply = answer(raw_query(labels), fakes.decide, fakes.resolve)
    assert reply.decision == "deny" and reply.reason == "not a plausible name"
    assert DNSRecord.parse(reply.data).header.rcode == RCODE.NXDOMAIN
    assert fakes.decided == [] and fakes.resolved == []


# ---- answer(): malformed ----

@pytest.mark.parametrize("data", [b"", b"\x12"])
def test_no_header_no_reply(data):
    reply = answer(data, Fakes().decide, Fakes().resolve)
    assert reply.data is None and reply.decision == "malformed"


@pytest.mark.parametrize("data", [b"\x12\x34", b"\x12\x34\x01\x00\x00\x01", b"\x12\x34\x01" + b"\xff" * 40,
                                  raw_query([b"allowed", b"test"], qid=0x1234)[:-2]])
def test_unparsable_is_formerr(data):
    reply = answer(data, Fakes().decide, Fakes().resolve)
    r = DNSRecord.parse(reply.data)
    assert (r.header.id, r.header.qr, r.header.rcode, reply.decision) == (0x1234, 1, RCODE.FORMERR, "malformed")


def test_responses_are_not_answered():
    response = DNSRecord.question("allowed.test").reply().pack()
    assert answer(response, Fakes().decide, Fakes().resolve).data is None
    assert answer(response[:7], Fakes().decide, Fakes().resolve).data is None


def test_question_counts():
    q = DNSRecord(DNSHeader(id=7), questions=[DNSQuestion("allowed.test"), DNSQuestion("forbidden.test")])
    fakes = Fakes()
    reply = answer(q.pack(), fakes.decide, fakes.resolve)
    r = DNSRecord.parse(reply.data)
    assert (r.header.id, r.header.rcode, reply.decision) == (7, RCODE.FORMERR, "malformed")
    assert fakes.decided == []
    empty = answer(DNSRecord(DNSHeader(id=8)).pack(), fakes.decide, fakes.resolve)
    assert DNSRecord.parse(empty.data).header.rcode == RCODE.FORMERR


@pytest.mark.parametrize("opcode", [OPCODE.IQUERY, OPCODE.STATUS, OPCODE.NOTIFY, OPCODE.UPDATE])
def test_other_opcodes_are_notimp(opcode):
    q = DNSRecord(DNSHeader(id=9, opcode=opcode), q=DNSQuestion("forbidden.test"))
    fakes = Fakes()
    reply = answer(q.pack(), fakes.decide, fakes.resolve)
    r = DNSRecord.parse(reply.data)
    assert (r.header.rcode, r.header.opcode, reply.decision) == (RCODE.NOTIMP, opcode, "unsupported")
    assert fakes.decided == [] and fakes.resolved == []


# ---- answer(): properties ----

def check_reply(data, reply):
    assert isinstance(reply, Reply)
    assert reply.decision in ("allow", "deny", "malformed", "unsupported")
    if reply.data is not None:
        r = DNSRecord.parse(reply.data)
        assert r.header.qr == 1 and r.header.id == int.from_bytes(data[:2], "big")


@settings(max_examples=1000)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    fakes = Fakes()
    check_reply(data, answer(data, fakes.decide, fakes.resolve))


@settings(max_examples=500)
@given(st.integers(0, 65535), st.integers(0, 65535), st.binary(max_size=300))
def test_random_bodies_after_a_query_header_never_raise(qid, flags, body):
    data = struct.pack("!HHHHHH", qid, flags & 0x7fff, 1, 0, 0, 0) + body
    check_reply(data, answer(data, Fakes().decide, Fakes().resolve))


LABELS = st.lists(st.binary(min_size=1, max_size=63), min_size=1, max_size=6)


@settings(max_examples=500)
@given(LABELS, st.integers(0, 65535), st.integers(0, 65535))
def test_a_forbidden_name_never_reaches_resolve(labels, qtype, qid):
    resolved = []
    data = raw_query(labels, qtype=qtype, qid=qid)
    reply = answer(data, lambda n, t: (False, "no"), lambda n, t: resolved.append(n) or [])
    assert resolved == []
    check_reply(data, reply)
    if reply.data is not None and reply.decision != "malformed":
        assert DNSRecord.parse(reply.data).header.rcode in (RCODE.NXDOMAIN, RCODE.FORMERR)


# ---- DnsServer ----

def run(coro, timeout=20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Harness:
    """A DnsServer on LOCAL whose every client belongs to one fake run."""

    def __init__(self, fakes=None, **kw):
        self.fakes = fakes or Fakes()
        self.records = []
        self.refuse = False
        self.server = DnsServer(kw.pop("host", LOCAL), 0, self.decide_for, self.on_query, **kw)

    def decide_for(self, peer, proto):
        assert peer[0] in ("127.0.0.1", "::1")
        return None if self.refuse else (self.fakes.decide, self.fakes.resolve)

    def on_query(self, peer, reply):
        self.records.append((peer[0], reply.name, reply.decision))

    async def __aenter__(self):
        await self.server.start()
        return self

    async def __aexit__(self, *exc):
        await self.server.close()

    async def udp(self, name, qtype="A", timeout=3.0):
        q = DNSRecord.question(name, qtype)
        host = self.server.host
        data = await asyncio.to_thread(q.send, host, self.server.ports["udp"], timeout=timeout, ipv6=":" in host)
        r = DNSRecord.parse(data)
        assert r.header.id == q.header.id
        return r

    async def tcp(self, name, qtype="A"):
        q = DNSRecord.question(name, qtype)
        host = self.server.host
        data = await asyncio.to_thread(q.send, host, self.server.ports["tcp"], tcp=True, timeout=3.0, ipv6=":" in host)
        return DNSRecord.parse(data)

    async def connect(self):
        return await asyncio.open_connection(self.server.host, self.server.ports["tcp"])


def rcode_and_addresses(r):
    return r.header.rcode, [str(rr.rdata) for rr in r.rr]


def test_udp_query_and_response():
    async def main():
        async with Harness() as h:
            assert h.server.ports["udp"] > 0 and h.server.ports["tcp"] > 0
            assert rcode_and_addresses(await h.udp("allowed.test")) == (RCODE.NOERROR, ["192.0.2.1", "192.0.2.2"])
            assert rcode_and_addresses(await h.udp("forbidden.test", "TXT")) == (RCODE.NXDOMAIN, [])
            assert h.records == [("127.0.0.1", "allowed.test", "allow"), ("127.0.0.1", "forbidden.test", "deny")]
            assert h.fakes.resolved == [("allowed.test", "A")]
            c = h.server.counters
            assert (c["queries"], c["allowed"], c["denied"]) == (2, 1, 1)
    run(main())


def test_udp_and_tcp_share_a_port_when_they_can():
    async def main():
        async with Harness() as h:
            assert h.server.ports["udp"] == h.server.ports["tcp"]
    run(main())


def test_udp_malformed_and_refused_clients():
    async def main():
        async with Harness() as h:
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (LOCAL, h.server.ports["udp"]))
                await loop.sock_sendall(sock, b"\xab\xcd\x01")
                r = DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(sock, 512), 3))
                assert (r.header.id, r.header.rcode) == (0xabcd, RCODE.FORMERR)
                await loop.sock_sendall(sock, b"\x01")                # no header: dropped
                while h.server.counters["queries"] < 2:
                    await asyncio.sleep(0.01)
                h.refuse = True                                        # not a run's client: dropped
                await loop.sock_sendall(sock, query("allowed.test"))
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(loop.sock_recv(sock, 512), 0.5)
            finally:
                sock.close()
            c = h.server.counters
            assert (c["queries"], c["malformed"], c["dropped"]) == (3, 2, 2)
            assert h.fakes.decided == []
    run(main())


def test_tcp_framing():
    async def main():
        async with Harness() as h:
            assert rcode_and_addresses(await h.tcp("allowed.test", "AAAA")) == (RCODE.NOERROR, ["2001:db8::1"])
            reader, writer = await h.connect()
            # two queries in one write, the second split from its length prefix by nothing
            q1, q2 = query("allowed.test"), query("forbidden.test")
            writer.write(struct.pack("!H", len(q1)) + q1 + struct.pack("!H", len(q2)) + q2[:5])
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(q2[5:])
            for expected in (RCODE.NOERROR, RCODE.NXDOMAIN):
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                assert DNSRecord.parse(await reader.readexactly(size)).header.rcode == expected
            writer.close()
            assert h.server.counters["queries"] == 3
    run(main())


def test_tcp_unanswerable_message_closes_the_connection():
    async def main():
        async with Harness() as h:
            reader, writer = await h.connect()
            writer.write(b"\x00\x01\x00")
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert h.server.counters["dropped"] == 1
    run(main())


def test_a_slow_resolve_does_not_delay_another_query():
    release = threading.Event()

    class Slow(Fakes):
        def resolve(self, name, qtype):
            if name == "slow.test":
                release.wait(10)
                return ["192.0.2.99"]
            return super().resolve(name, qtype)

    async def main():
        async with Harness(Slow(), resolve_timeout=5) as h:
            try:
                slow_udp = asyncio.ensure_future(h.udp("slow.test", timeout=8))
                slow_tcp = asyncio.ensure_future(h.tcp("slow.test"))
                await asyncio.sleep(0.2)
                start = time.monotonic()
                assert rcode_and_addresses(await h.udp("fast.test")) == (RCODE.NOERROR, ["192.0.2.9"])
                assert rcode_and_addresses(await h.tcp("fast.test")) == (RCODE.NOERROR, ["192.0.2.9"])
                assert time.monotonic() - start < 1.0
                assert not slow_udp.done() and not slow_tcp.done()
            finally:
                release.set()
            assert rcode_and_addresses(await slow_udp) == (RCODE.NOERROR, ["192.0.2.99"])
            assert rcode_and_addresses(await slow_tcp) == (RCODE.NOERROR, ["192.0.2.99"])
    run(main())


def test_a_resolve_that_hangs_is_servfail_after_the_timeout():
    release = threading.Event()

    class Hang(Fakes):
        def resolve(self, name, qtype):
            release.wait(10)
            return ["192.0.2.1"]

    async def main():
        async with Harness(Hang(), resolve_timeout=0.3) as h:
            try:
                start = time.monotonic()
                assert (await h.udp("allowed.test")).header.rcode == RCODE.SERVFAIL
                assert 0.25 < time.monotonic() - start < 2
                assert h.server.counters["resolve_timeouts"] == 1
            finally:
                release.set()
    run(main())


def test_udp_lookups_in_flight_are_bounded():
    release = threading.Event()

    class Slow(Fakes):
        def resolve(self, name, qtype):
            release.wait(10)
            return super().resolve(name, qtype)

    async def main():
        async with Harness(Slow(), max_udp_inflight=1, resolve_timeout=5) as h:
            try:
                first = asyncio.ensure_future(h.udp("allowed.test", timeout=8))
                await asyncio.sleep(0.2)
                assert (await h.udp("v4only.test")).header.rcode == RCODE.SERVFAIL
                assert (await h.udp("forbidden.test")).header.rcode == RCODE.NXDOMAIN   # refusals never wait
                assert h.server.counters["overloaded"] == 1
            finally:
                release.set()
            assert (await first).header.rcode == RCODE.NOERROR
    run(main())


def test_an_idle_tcp_client_is_closed():
    async def main():
        async with Harness(tcp_idle_timeout=0.3) as h:
            reader, writer = await h.connect()
            start = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            assert time.monotonic() - start < 2
            writer.close()
            # half a message, then silence: closed too
            reader, writer = await h.connect()
            writer.write(b"\x00\x20abc")
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert h.server.counters["tcp_idle_closed"] == 2
    run(main())


def test_excess_tcp_clients_are_refused_and_counted():
    async def main():
        async with Harness(max_tcp_clients=2) as h:
            clients = []
            for _ in range(2):
                reader, writer = await h.connect()
                q = query("allowed.test")
                writer.write(struct.pack("!H", len(q)) + q)           # served: the slot is taken
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                await reader.readexactly(size)
                clients.append((reader, writer))
            reader, writer = await h.connect()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert h.server.counters["tcp_refused"] == 1
            clients[0][1].close()
            await asyncio.sleep(0.2)
            assert (await h.tcp("allowed.test")).header.rcode == RCODE.NOERROR   # a slot came free
            for _, w in clients[1:]:
                w.close()
            assert h.server.counters["tcp_clients"] == 3
    run(main())


def test_tcp_client_of_no_run_is_closed():
    async def main():
        async with Harness() as h:
            h.refuse = True
            reader, writer = await h.connect()
            assert await asyncio.wait_for(reader.read(), 3) == b""
            writer.close()
            assert h.server.counters["tcp_refused"] == 1 and h.fakes.decided == []
    run(main())


def test_callbacks_that_raise_do_not_stop_the_server():
    async def main():
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx["exception"]))
        async with Harness() as h:
            def boom(peer, reply):
                raise ValueError("records full")
            h.server.on_query = boom
            assert (await h.udp("allowed.test")).header.rcode == RCODE.NOERROR
            h.server.decide_for = lambda peer, proto: 1 / 0
            with pytest.raises(socket.timeout):
                await h.udp("allowed.test", timeout=0.5)
            assert h.server.counters["callback_errors"] == 2
        assert [type(e) for e in errors] == [ValueError, ZeroDivisionError]
    run(main())


def test_close_with_clients_and_lookups_pending():
    release = threading.Event()

    class Slow(Fakes):
        def resolve(self, name, qtype):
            release.wait(10)
            return ["192.0.2.1"]

    async def main():
        h = Harness(Slow())
        await h.server.start()
        try:
            reader, writer = await h.connect()
            q = query("allowed.test")
            writer.write(struct.pack("!H", len(q)) + q)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.sendto(q, (LOCAL, h.server.ports["udp"]))
            await asyncio.sleep(0.2)
            await asyncio.wait_for(h.server.close(), 2)
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()
            sock.close()
        finally:
            release.set()
    run(main())


def has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no ::1 on this host")
def test_ipv6_loopback():
    async def main():
        async with Harness(host="::1") as h:
            assert rcode_and_addresses(await h.udp("allowed.test", "AAAA")) == (RCODE.NOERROR, ["2001:db8::1"])
            assert rcode_and_addresses(await h.tcp("forbidden.test")) == (RCODE.NXDOMAIN, [])
            assert [r[0] for r in h.records] == ["::1", "::1"]
    run(main())
