"""The egress guard's DNS responder.

The kernel redirects every UDP and TCP port-53 packet of an agent here. A
DNS query is a channel out in itself ("secret.evil.example" reaches
evil.example's name server through any recursive resolver), so this responder
forwards nothing: it answers from the guard's own name rules and lookups.

  answer(query, decide, resolve) -> Reply   the pure core, one query in,
                                             one response (or nothing) out
  DnsServer                                  serves answer() over UDP and
                                             TCP with asyncio

answer() asks decide(name, qtype) first. A name it refuses gets NXDOMAIN, and
resolve is never called for it, so a forbidden name goes nowhere, not even to
the host's resolver. An allowed A or AAAA query is resolved through
resolve(name, qtype) (the caller's pins, or getaddrinfo) and answered with
the addresses of that family. Any other type of an allowed name (TXT, MX,
ANY, ...) gets an empty NOERROR: those are the types that carry data, and
answering them would need a real upstream.

Limits, and why:
- TTL 30 s: the guard's rules and pins can change during a run; a short TTL
  keeps the agent's cache from outliving them by much.
- at most MAX_ANSWERS (8) addresses: 8 AAAA records and the longest name fit
  in 512 bytes, so a UDP reply never needs truncation and EDNS.
- resolve runs in the default executor with a timeout (2 s): getaddrinfo
  blocks, and one slow name must not hold up other clients. A lookup that
  times out keeps its worker thread until getaddrinfo returns.
- at most max_udp_inflight (256) UDP lookups at once; more get SERVFAIL.
  Refusals are answered on the spot and never wait for this.
- TCP: at most max_tcp_clients at once (more are closed on accept), one query
  at a time per client, a client idle for tcp_idle_timeout is closed, and its
  stream reader buffers about max_tcp_pending bytes before it stops reading.
  A message is at most 65535 bytes (the 2-byte length prefix).
"""
import asyncio
import dataclasses
import ipaddress
from typing import List, Optional

from dnslib import AAAA, CLASS, OPCODE, QTYPE, RCODE, RR, A, DNSHeader, DNSRecord

from agentwatch.guards.wire import normalize_name

TTL = 30
MAX_ANSWERS = 8
RESOLVE_TIMEOUT = 2.0
MAX_UDP_INFLIGHT = 256
MAX_TCP_CLIENTS = 64
TCP_IDLE_TIMEOUT = 10.0
MAX_TCP_PENDING = 2 * (65535 + 2)


@dataclasses.dataclass(frozen=True)
class Reply:
    """What answer() made of one query. data is the response to send, or
    None when the query is too broken to answer (drop it). decision is
    "allow", "deny", "malformed" or "unsupported"; addresses are the ones
    handed out."""
    data: Optional[bytes]
    name: Optional[str] = None
    qtype: Optional[str] = None
    decision: str = "malformed"
    reason: str = ""
    addresses: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Lookup:
    """An allowed A/AAAA query waiting for resolve()."""
    query: DNSRecord
    name: str
    qtype: str
    reason: str


def answer(query_bytes, decide, resolve):
    """The response to one DNS query (see the module docstring)."""
    step = _decide(query_bytes, decide)
    if isinstance(step, Reply):
        return step
    try:
        addresses = resolve(step.name, step.qtype)
    except Exception as e:                   # OSError from getaddrinfo, or the caller's bug: SERVFAIL either way
        return _resolved(step, error=e)
    return _resolved(step, addresses)


def _decide(query_bytes, decide):
    """A final Reply, or a _Lookup when the name is allowed and needs addresses."""
    try:
        query = DNSRecord.parse(query_bytes)
    except Exception:
        return _unparsed(bytes(query_bytes))
    header = query.header
    if header.qr:                            # a response: answering it could loop two responders
        return Reply(None, reason="not a query")
    if header.opcode != OPCODE.QUERY:
        return _reply(query, RCODE.NOTIMP, "unsupported", f"opcode {OPCODE.get(header.opcode)}")
    if len(query.questions) != 1:
        return _reply(query, RCODE.FORMERR, "malformed", f"{len(query.questions)} questions")
    question = query.questions[0]
    qtype = _type_name(question.qtype)
    name = _name(question.qname.label)
    if name is None:
        shown = str(question.qname).rstrip(".").lower()[:300]
        return _reply(query, RCODE.NXDOMAIN, "deny", "not a plausible name", name=shown, qtype=qtype)
    try:
        allowed, reason = decide(name, qtype)
    except Exception as e:                   # fail closed
        allowed, reason = False, f"decide failed: {type(e).__name__}: {e}"
    if not allowed:
        return _reply(query, RCODE.NXDOMAIN, "deny", reason, name=name, qtype=qtype)
    if question.qclass != CLASS.IN or qtype not in ("A", "AAAA"):
        return _reply(query, RCODE.NOERROR, "unsupported", reason, name=name, qtype=qtype)
    return _Lookup(query, name, qtype, reason)


def _type_name(qtype):
    name = QTYPE.get(qtype, None)            # dnslib gives "65280" for a type it has no name for
    return name if isinstance(name, str) and not name.isdigit() else f"TYPE{qtype}"


def _name(labels):
    # A label holding a dot would read as two labels once joined.
    try:
        text = [label.decode("ascii") for label in labels]
    except UnicodeDecodeError:
        return None
    if any("." in label for label in text):
        return None
    return normalize_name(".".join(text))


def _resolved(step, addresses=(), error=None):
    """The reply to a _Lookup, given what resolve returned or raised."""
    if error is not None:
        return _reply(step.query, RCODE.SERVFAIL, "allow", f"{step.reason}; resolve failed: {error}",
                      name=step.name, qtype=step.qtype)
    family = ipaddress.IPv4Address if step.qtype == "A" else ipaddress.IPv6Address
    found = []
    try:
        for address in addresses or ():
            try:
                ip = ipaddress.ip_address(str(address))
            except ValueError:
                continue
            if isinstance(ip, family) and not getattr(ip, "scope_id", None) and str(ip) not in found:
                found.append(str(ip))
    except TypeError:                        # resolve returned something that is not a list
        return _resolved(step, error="resolve returned no list")
    found = found[:MAX_ANSWERS]
    rdata = A if step.qtype == "A" else AAAA
    qname = step.query.questions[0].qname
    answers = [RR(qname, getattr(QTYPE, step.qtype), rdata=rdata(ip), ttl=TTL) for ip in found]
    return _reply(step.query, RCODE.NOERROR, "allow", step.reason, name=step.name, qtype=step.qtype,
                  answers=answers, addresses=found)


def _reply(query, rcode, decision, reason, name=None, qtype=None, answers=(), addresses=()):
    # Only id, opcode and RD come from the query; its other flags (AD, CD, Z)
    # say nothing true about this answer.
    header = DNSHeader(id=query.header.id, qr=1, opcode=query.header.opcode, aa=1, ra=1,
                       rd=query.header.rd, rcode=rcode)
    questions = query.questions if rcode != RCODE.FORMERR else []
    response = DNSRecord(header, questions=list(questions), rr=list(answers))
    try:
        data = response.pack()
    except Exception as e:                   # nothing here should fail to pack; never raise if it does
        return Reply(None, name, qtype, "malformed", f"cannot pack the reply: {type(e).__name__}")
    return Reply(data, name, qtype, decision, reason, list(addresses))


def _unparsed(data):
    """FORMERR for a query dnslib cannot parse, when its id can be read."""
    if len(data) < 2:
        return Reply(None, reason="no DNS header")
    if len(data) > 2 and data[2] & 0x80:     # QR: a response
        return Reply(None, reason="not a query")
    header = DNSHeader(id=int.from_bytes(data[:2], "big"), qr=1, ra=1, rcode=RCODE.FORMERR)
    return Reply(DNSRecord(header).pack(), reason="unparsable query")


class DnsServer:
    """answer() over UDP and TCP on host:port (port 0: any free port, the
    same one for both when it can). decide_for(peer, proto) ("udp" or
    "tcp") names the run a client belongs to: it returns that run's (decide, resolve), or None to refuse the
    client (UDP: dropped; TCP: closed). on_query(peer, reply) is called for
    every query that came from a run's client, answered or not. After
    start(), ports is {"udp": n, "tcp": n}.

    counters: queries (every UDP packet and TCP message), allowed, denied,
    malformed, unsupported (by decision), dropped (UDP packets of no run,
    and queries too broken to answer), overloaded (SERVFAIL for too many
    lookups in flight), resolve_timeouts, tcp_clients (served), tcp_refused
    (over max_tcp_clients, or of no run), tcp_idle_closed, callback_errors
    (decide_for or on_query raised; also passed to the loop's exception
    handler)."""

    def __init__(self, host, port, decide_for, on_query=None, *, resolve_timeout=RESOLVE_TIMEOUT,
                 max_udp_inflight=MAX_UDP_INFLIGHT, max_tcp_clients=MAX_TCP_CLIENTS,
                 tcp_idle_timeout=TCP_IDLE_TIMEOUT, max_tcp_pending=MAX_TCP_PENDING):
        self.host, self.port = host, port
        self.decide_for, self.on_query = decide_for, on_query
        self.resolve_timeout = resolve_timeout
        self.max_udp_inflight = max_udp_inflight
        self.max_tcp_clients = max_tcp_clients
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_pending = max_tcp_pending
        self.ports = None
        self.counters = dict.fromkeys(
            ("queries", "allowed", "denied", "malformed", "unsupported", "dropped", "overloaded",
             "resolve_timeouts", "tcp_clients", "tcp_refused", "tcp_idle_closed", "callback_errors"), 0)
        self._udp = self._tcp = None
        self._udp_inflight = 0
        self._tasks = set()                  # UDP lookups
        self._tcp_tasks = set()              # one per TCP client

    async def start(self):
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self),
                                                           local_addr=(self.host, self.port))
        udp_port = self._udp.get_extra_info("sockname")[1]
        try:
            try:
                self._tcp = await self._listen(udp_port)
            except OSError:
                if self.port:
                    raise
                self._tcp = await self._listen(0)
        except BaseException:
            self._udp.close()
            raise
        self.ports = {"udp": udp_port, "tcp": self._tcp.sockets[0].getsockname()[1]}

    def _listen(self, port):
        # the reader's limit is what bounds the bytes it buffers per client
        return asyncio.start_server(self._tcp_client, self.host, port, limit=max(1, self.max_tcp_pending // 2))

    async def close(self):
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        tasks = list(self._tasks | self._tcp_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # ---- shared ----

    def _run_for(self, peer, proto):
        try:
            return self.decide_for(peer, proto)
        except Exception as e:               # fail closed: an unknown client gets nothing
            self._callback_failed("decide_for", e)
            return None

    async def _lookup(self, step, resolve):
        loop = asyncio.get_running_loop()
        try:
            addresses = await asyncio.wait_for(loop.run_in_executor(None, resolve, step.name, step.qtype),
                                               self.resolve_timeout)
        except asyncio.TimeoutError:
            self.counters["resolve_timeouts"] += 1
            return _resolved(step, error="timed out")
        except Exception as e:
            return _resolved(step, error=e)
        return _resolved(step, addresses)

    def _record(self, peer, reply):
        if reply.data is None:
            self.counters["dropped"] += 1
        key = {"allow": "allowed", "deny": "denied"}.get(reply.decision, reply.decision)
        self.counters[key] = self.counters.get(key, 0) + 1
        if self.on_query is not None:
            try:
                self.on_query(peer, reply)
            except Exception as e:
                self._callback_failed("on_query", e)

    def _callback_failed(self, what, error):
        # The loop's exception handler is how the guard hears of it; one bad
        # callback must not stop the responder.
        self.counters["callback_errors"] += 1
        asyncio.get_running_loop().call_exception_handler(
            {"message": f"DnsServer: {what} raised", "exception": error})

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- UDP ----

    def _datagram(self, data, peer):
        self.counters["queries"] += 1
        run = self._run_for(peer, "udp")
        if run is None:
            self.counters["dropped"] += 1
            return
        decide, resolve = run
        step = _decide(data, decide)
        if isinstance(step, _Lookup):
            if self._udp_inflight >= self.max_udp_inflight:
                self.counters["overloaded"] += 1
                step = _resolved(step, error="too many lookups in flight")
            else:
                self._udp_inflight += 1
                self._spawn(self._udp_lookup(step, resolve, peer))
                return
        self._udp_send(peer, step)

    async def _udp_lookup(self, step, resolve, peer):
        try:
            reply = await self._lookup(step, resolve)
        finally:
            self._udp_inflight -= 1
        self._udp_send(peer, reply)

    def _udp_send(self, peer, reply):
        if reply.data is not None and not self._udp.is_closing():
            self._udp.sendto(reply.data, peer)
        self._record(peer, reply)

    # ---- TCP ----

    async def _tcp_client(self, reader, writer):
        peer = writer.get_extra_info("peername")
        run = self._run_for(peer, "tcp") if len(self._tcp_tasks) < self.max_tcp_clients else None
        if run is None:
            self.counters["tcp_refused"] += 1
            writer.transport.abort()
            return
        self.counters["tcp_clients"] += 1
        task = asyncio.current_task()
        self._tcp_tasks.add(task)
        try:
            await self._tcp_serve(reader, writer, peer, *run)
        finally:
            self._tcp_tasks.discard(task)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()     # a client that stopped reading: do not keep its replies
            else:
                writer.close()

    async def _tcp_serve(self, reader, writer, peer, decide, resolve):
        while True:
            try:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout), "big")
                query = await asyncio.wait_for(reader.readexactly(size), self.tcp_idle_timeout)
            except asyncio.TimeoutError:
                self.counters["tcp_idle_closed"] += 1
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            self.counters["queries"] += 1
            step = _decide(query, decide)
            reply = await self._lookup(step, resolve) if isinstance(step, _Lookup) else step
            self._record(peer, reply)
            if reply.data is None:
                return
            writer.write(len(reply.data).to_bytes(2, "big") + reply.data)
            try:
                await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout)
            except (asyncio.TimeoutError, ConnectionError):
                return


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server):
        self.server = server

    def datagram_received(self, data, addr):
        self.server._datagram(data, addr)

    def error_received(self, exc):
        pass                                 # ICMP unreachable from a client gone away: nothing to do
