"""The egress guard: egress decided by name, in a proxy the kernel forces
every flow of a run through.

The run's cgroup BPF programs (egress.py, ``EgressRules.guard``) rewrite
every TCP connect that no CIDR or loopback rule allows to this run's proxy
listener, and every port-53 connect or send to this run's DNS responder
(dns.py). Nothing in the agent opts in or out: no proxy variable is needed,
and a client that ignores them is routed all the same.

For each flow accepted here:

1. who: the kernel's record of the socket (``Egress.flow_of``, filed by
   sock_ops under the agent socket's local end, which is our peer): the
   original destination, pid, uid, comm and cgroup at connect. A socket with
   no record is not one the kernel redirected: refused.
2. which name: the first bytes, never anything else the agent says: a TLS
   ClientHello's server_name, an HTTP ``CONNECT host:port``, or a plain
   HTTP request's Host (wire.py). Within FIRST_BYTES_S, at most
   wire.MAX_HELLO / MAX_HEAD bytes.
3. the verdict (``judge_flow``, pure): the name and port must match a
   ``network.allow`` domain rule, and for SNI and Host the original
   destination must be an address of that name: one it resolves to (the
   run's ``--resolve`` pins, else the host's resolver) or one our DNS
   responder handed out for it. This closes "allowed name, any address".
   For CONNECT the guard picks the address itself, from the same resolution.
4. allowed: connect upstream and splice the bytes both ways.
   refused: CONNECT and plain HTTP get ``403`` with a text body and
   ``X-Agentwatch-Denied: network.domain``; TLS and anything unnamed get a
   TCP reset (the ClientHello is never answered).

Every flow ends as one record (``on_record``): who, name, where the name
came from, original address and port, the DNS answer behind the address,
the verdict and reason, bytes each way, duration. run/enforcement.py makes
a ``flow`` event of it, and a ``network.domain`` violation of a refusal.

Bounds, so one agent cannot stall another: each run has its own listeners
and at most ``Limits.flows_per_run`` open flows, all runs together at most
``flows_total`` (less where the descriptor limit is lower, and one run
never more than a quarter of that); the excess is reset at once and counted. A client that
sends no name within ``first_bytes_s`` is closed. Once allowed, a flow's
bytes move in the kernel, splice(2) through the loop's one pipe; where a
side lags, at most one chunk of it waits in memory (``_Splice``).

One guard serves every run of a Monitor (the daemon's, or a run's own) on
one asyncio loop in a thread of its own; its sessions are per run.
"""
import asyncio
import concurrent.futures
import errno
import fcntl
import functools
import ipaddress
import os
import resource
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from ..core.peer import of_datagram as peer_of_datagram
from ..policy.matchers import canonical_ip, domain_matches
from . import wire
from .egress import GuardPorts

RULE = "network.domain"
LOOPBACK_RULE = "network.loopback"


def refusal_rule(name, orig_addr):
    """The rule a refusal breaks: a flow that named nothing, to this host's
    own address, is the connect network.loopback forbids (and reads as the
    kernel's refusal of it would); anything else is network.domain."""
    ip = canonical_ip(orig_addr) if orig_addr else None
    if not name and ip is not None and (ip.is_loopback or ip.is_unspecified):
        return LOOPBACK_RULE
    return RULE


@dataclass(frozen=True)
class Limits:
    flows_per_run: int = 512         # open flows of one run; more are reset and counted
    flows_total: int = 4096          # of all runs together
    first_bytes_s: float = 5.0       # a client must name its destination within this
    connect_s: float = 10.0          # upstream connect
    idle_s: float = 600.0            # an established flow with no byte either way
    chunk: int = 1024 * 1024         # bytes spliced at once (the pipe's size; fs.pipe-max-size)
    resolve_s: float = 2.0           # one host-resolver lookup
    cache_s: float = 30.0            # how long a host lookup is reused


@dataclass(frozen=True)
class NameRule:
    """A network.allow domain rule as the guard applies it."""
    pattern: str
    ports: tuple = None              # ((lo, hi), ...); None: any port
    protocol: str = "any"

    def allows_port(self, port, protocol="tcp"):
        if self.protocol not in ("any", protocol):
            return False
        return self.ports is None or any(lo <= port <= hi for lo, hi in self.ports)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str                      # why, in words
    rule: str = None                 # the pattern that allowed it, or the rule it broke


def name_rules(pattern_rows):
    """[(pattern, ports, protocol)] -> (NameRule, ...)."""
    return tuple(NameRule(p, tuple(ports) if ports else None, proto or "any")
                 for p, ports, proto in pattern_rows)


def name_allowed(rules, name):
    """Whether any domain rule names this name (any port): DNS answers it."""
    return bool(name) and any(domain_matches(r.pattern, name) for r in rules)


def judge_flow(rules, name, source, orig_addr, port, addresses):
    """The verdict on one flow (pure). source: "sni", "host", "connect" or
    None; addresses: what name resolves to for this run, and what our DNS
    handed out for it. For "connect" the guard picks the upstream address
    from those, so the original destination (the agent's idea of a proxy)
    is not judged."""
    if not name:
        return Verdict(False, "no name: not a TLS ClientHello with server_name, "
                              "an HTTP CONNECT or a request with Host", refusal_rule(name, orig_addr))
    named = [r for r in rules if domain_matches(r.pattern, name)]
    if not named:
        return Verdict(False, f"{name} is not in network.allow", RULE)
    fitting = [r for r in named if r.allows_port(port)]
    if not fitting:
        return Verdict(False, f"{name}: port {port}/tcp is not allowed "
                              f"(rules for it: {', '.join(r.pattern for r in named)})", RULE)
    if source != "connect":
        ip = canonical_ip(orig_addr)
        if not addresses:
            return Verdict(False, f"{name} did not resolve, so no address is its", RULE)
        if ip is None or ip not in {canonical_ip(a) for a in addresses}:
            return Verdict(False, f"{orig_addr} is not an address of {name} "
                                  f"({', '.join(sorted(addresses))})", RULE)
    return Verdict(True, f"{name} allowed by {fitting[0].pattern}", fitting[0].pattern)


# -- one run's share of the guard ------------------------------------------------------
@dataclass(eq=False)
class RunSession:
    """The guard's state for one run: its listeners, rules, pins, the
    answers its DNS responder gave, and its counters."""
    run_id: str
    agent: str
    rules: tuple
    pins: dict                       # name -> [addresses] (--resolve NAME:ADDR)
    on_record: object                # callable(dict), called on the guard's thread
    flow_of: object = None           # callable(addr, port) -> kernel record (Egress.flow_of)
    ports: GuardPorts = None
    handed: dict = field(default_factory=dict)      # name -> {address: ts} our DNS answered
    counters: dict = field(default_factory=lambda: dict.fromkeys(
        ("flows", "allowed", "denied", "errors", "busy", "unknown_socket", "dns_queries",
         "dns_denied", "dns_dropped", "dns_unknown_socket", "closed_unsent"), 0))
    active: int = 0
    servers: list = field(default_factory=list)
    _cache: dict = field(default_factory=dict)      # name -> (expires, [addresses])

    def count(self, key, n=1):
        self.counters[key] = self.counters.get(key, 0) + n

    def answer_for(self, addr):
        """(name, ts) of the DNS answer of ours that handed out addr, or None."""
        ip = canonical_ip(addr)
        best = None
        for name, given in self.handed.items():
            for a, ts in given.items():
                if canonical_ip(a) == ip and (best is None or ts > best[1]):
                    best = (name, ts)
        return best


class EgressGuard:
    """The proxy and DNS responder of every run of one Monitor. start() runs
    its asyncio loop in a thread; open_run()/close_run() are called from the
    runs' threads."""

    def __init__(self, limits=None, resolver=None):
        self.limits = limits or Limits()
        self._resolver = resolver or socket.getaddrinfo
        self.loop = None
        self.thread = None
        self.sessions = set()
        self.active = 0
        self.flows_total = self.limits.flows_total
        self.flows_per_run = self.limits.flows_per_run
        self.v6 = _has_ipv6_loopback()
        self._splice_pipe = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8,
                                                           thread_name_prefix="aw-guard-dns")

    # -- life -------------------------------------------------------------------------
    def start(self):
        if self.thread is not None:
            return self
        self.flows_total = min(self.limits.flows_total, _fd_budget())
        # one run never holds more than a quarter of what all may hold
        self.flows_per_run = max(1, min(self.limits.flows_per_run, self.flows_total // 4))
        ready = threading.Event()

        def main():
            self.loop = asyncio.new_event_loop()
            self.loop.set_default_executor(self._pool)
            ready.set()
            self.loop.run_forever()
            self.loop.close()
            if self._splice_pipe is not None:
                self._splice_pipe.close()
                self._splice_pipe = None
        self.thread = threading.Thread(target=main, name="aw-egress-guard", daemon=True)
        self.thread.start()
        ready.wait()
        return self

    def _call(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        """Close every session, stop the loop. Idempotent."""
        if self.thread is None:
            return
        for s in list(self.sessions):
            self.close_run(s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- runs ---------------------------------------------------------------------------
    def open_run(self, run_id, agent, rules, pins, on_record):
        """A session with listeners of its own (their ports go into the run's
        EgressRules.guard). Set session.flow_of before the agent starts."""
        s = RunSession(run_id, agent, tuple(rules), {k.lower().rstrip("."): list(v)
                                                     for k, v in (pins or {}).items()}, on_record)
        self._call(self._open(s))
        self.sessions.add(s)
        return s

    def close_run(self, session):
        """Stop the session's listeners and flows; returns its counters."""
        if session in self.sessions:
            self.sessions.discard(session)
            try:
                self._call(self._close(session))
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        return dict(session.counters)

    async def _open(self, s):
        p4 = self._listen(s, "127.0.0.1")
        p6 = self._listen(s, "::1") if self.v6 else 0
        dns = []
        for host in ("127.0.0.1", "::1") if self.v6 else ("127.0.0.1",):
            d = await self._dns_server(s, host)
            s.servers.append(d)
            dns.append(d.ports["udp"])
        s.ports = GuardPorts(proxy4=p4, proxy6=p6, dns4=dns[0], dns6=dns[1] if len(dns) > 1 else 0)

    def _listen(self, s, host):
        """A listener of the session's on host, any free port; accepted on
        the loop (plain non-blocking sockets: no stream objects per flow)."""
        ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            ls.bind((host, 0))
            ls.listen(1024)
            ls.setblocking(False)
        except OSError:
            ls.close()
            raise
        s.servers.append(ls)
        self.loop.add_reader(ls.fileno(), self._accept, s, ls)
        return ls.getsockname()[1]

    def _accept(self, s, ls):
        for _ in range(64):                  # a batch, then the other ready sockets get a turn
            try:
                c, peer = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                  # out of descriptors: pause, as asyncio's servers do
                s.count("errors")
                self.loop.remove_reader(ls.fileno())
                self.loop.call_later(1, self._resume, s, ls)
                return
            if s.active >= self.flows_per_run or self.active >= self.flows_total:
                s.count("busy")
                _reset(c)
                continue
            c.setblocking(False)
            s.active += 1
            self.active += 1
            self.loop.create_task(self._flow(s, c, peer)).aw_session = s

    def _resume(self, s, ls):
        if ls in s.servers and ls.fileno() >= 0:
            self.loop.add_reader(ls.fileno(), self._accept, s, ls)

    async def _dns_server(self, s, host):
        """The run's DNS responder on host: UDP and TCP on one port, which
        the kernel sends both to (AW_EG_CFG_DNS4/6)."""
        from .dns import DnsServer
        run = (self._dns_decide(s), self._dns_resolve(s))
        for _ in range(20):
            d = DnsServer(host, 0, None, lambda peer, reply: self._dns_record(s, peer, reply))
            d.decide_for = functools.partial(self._dns_client, s, d, run)
            await d.start()
            if d.ports["udp"] == d.ports["tcp"]:
                return d
            await d.close()           # that UDP port's TCP twin was taken: another
        raise OSError(f"no free port on {host} for both UDP and TCP DNS")

    @staticmethod
    def _dns_client(s, server, run, peer, proto):
        """The run's (decide, resolve) for a DNS client the kernel ties to
        this run, else None (dropped or closed, and counted). The port says
        nothing: a run allowed all of loopback can send to another run's
        responder, which must neither answer nor judge it as that run's.
        TCP: the kernel filed the redirected socket (flow_of). UDP: the
        socket our answer would go to is looked up, with its cgroup."""
        if proto == "tcp":
            ok = bool(s.flow_of and s.flow_of(peer[0], peer[1]))
        else:
            family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
            local = (server.host, server.ports["udp"])
            ok = peer_of_datagram(family, local, peer[:2]).run_id == s.run_id
        if not ok:
            s.count("dns_unknown_socket")
        return run if ok else None

    async def _close(self, s):
        from .dns import DnsServer
        for srv in s.servers:
            if isinstance(srv, DnsServer):
                await srv.close()
            elif srv.fileno() >= 0:
                self.loop.remove_reader(srv.fileno())
                srv.close()
        for task in [t for t in asyncio.all_tasks() if getattr(t, "aw_session", None) is s]:
            task.cancel()
        s.servers = []

    # -- names --------------------------------------------------------------------------
    async def addresses_of(self, s, name):
        """What name resolves to for this run: its pins, else the host's
        resolver (cached for cache_s), plus what our DNS handed out for it."""
        handed = set(s.handed.get(name, {}))
        if name in s.pins:
            return set(s.pins[name]) | handed, "pinned"
        now = time.monotonic()
        hit = s._cache.get(name)
        if hit and hit[0] > now:
            return set(hit[1]) | handed, "resolved"
        try:
            infos = await asyncio.wait_for(
                self.loop.run_in_executor(None, lambda: self._resolver(name, None, 0,
                                                                       socket.SOCK_STREAM)),
                self.limits.resolve_s)
            found = sorted({str(canonical_ip(i[4][0])) for i in infos if canonical_ip(i[4][0])})
        except (OSError, UnicodeError, asyncio.TimeoutError):
            found = []
        s._cache[name] = (now + self.limits.cache_s, found)
        return set(found) | handed, "resolved"

    def _dns_decide(self, s):
        def decide(name, qtype):
            s.count("dns_queries")
            if name_allowed(s.rules, name):
                return True, f"{name} is in network.allow"
            s.count("dns_denied")
            return False, f"{name} is not in network.allow"
        return decide

    def _dns_resolve(self, s):
        def resolve(name, qtype):
            fam = socket.AF_INET6 if qtype == "AAAA" else socket.AF_INET
            if name in s.pins:
                return [a for a in s.pins[name] if (ipaddress.ip_address(a).version == 6) ==
                        (fam == socket.AF_INET6)]
            infos = self._resolver(name, None, fam, socket.SOCK_STREAM)
            return sorted({i[4][0] for i in infos})
        return resolve

    def _dns_record(self, s, peer, reply):
        now = time.time()
        if reply.decision == "allow":
            given = s.handed.setdefault(reply.name, {})
            for a in reply.addresses:
                given[a] = now
        elif reply.decision == "malformed":
            s.count("dns_dropped")
        _deliver(s, {"proto": "dns", "peer": list(peer[:2]) if peer else None,
                     "name": reply.name, "qtype": reply.qtype, "decision": reply.decision,
                     "reason": reply.reason, "addresses": list(reply.addresses), "ts": now,
                     "rule": RULE if reply.decision == "deny" else None})

    # -- one flow -------------------------------------------------------------------------
    async def _flow(self, s, c, peer):
        """One accepted connection (counted active by _accept)."""
        t0 = time.monotonic()
        rec = {"proto": "tcp", "ts": time.time(), "name": None, "source": None, "decision": "deny",
               "bytes_out": 0, "bytes_in": 0}
        try:
            kflow = s.flow_of(peer[0], peer[1]) if s.flow_of else None
            if kflow is None:
                s.count("unknown_socket")     # not redirected by this run's programs
                _reset(c)
                return
            s.count("flows")
            rec.update(pid=kflow["pid"], tid=kflow["tid"], uid=kflow["uid"], comm=kflow["comm"],
                       cgroup=kflow["cgroup"], family=kflow["family"], addr=kflow["addr"],
                       port=kflow["port"])
            await self._handle(s, c, rec)
        except (ConnectionError, OSError) as e:
            rec.setdefault("reason", f"connection: {e}")
        except asyncio.CancelledError:
            rec.setdefault("reason", "the run ended")
            raise
        except Exception as e:        # a bug must cost one flow, never the guard
            s.count("errors")
            rec.update(decision="error", reason=f"guard error: {type(e).__name__}: {e}")
            _reset(c)
        finally:
            s.active -= 1
            self.active -= 1
            if "pid" in rec:
                rec["duration"] = round(time.monotonic() - t0, 6)
                _deliver(s, rec)
            c.close()

    async def _handle(self, s, c, rec):
        lim, loop = self.limits, self.loop
        buf, head, hello = b"", None, None
        deadline = time.monotonic() + lim.first_bytes_s
        while True:
            try:
                chunk = c.recv(wire.MAX_HELLO)     # mostly there already: no wait to set up
            except (BlockingIOError, InterruptedError):
                try:
                    await _ready(loop, c, max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    return self._refuse(s, c, rec, f"sent no name within {lim.first_bytes_s:g} s")
                continue
            if not chunk and not buf and refusal_rule(None, rec["addr"]) == RULE:
                # nothing was sent to a remote address, so nothing was
                # refused: a client racing IPv4 against IPv6 drops the loser
                # so, and must not be reported (or killed) for it. To this
                # host it stays the connect network.loopback forbids, as the
                # kernel would have refused it
                s.count("closed_unsent")
                rec.update(decision="closed", reason="closed before sending a byte")
                return
            if not chunk:
                return self._refuse(s, c, rec, "closed before naming a destination")
            buf += chunk
            if buf[:1] == b"\x16":
                hello = wire.parse_client_hello(buf)
                if hello.status == "need_more" and len(buf) < wire.MAX_HELLO:
                    continue
                if hello.ok:
                    rec.update(name=hello.sni, source="sni" if hello.sni else None,
                               alpn=list(hello.alpn))
                else:
                    return self._refuse(s, c, rec, f"TLS ClientHello: {hello.reason or hello.status}")
            elif buf[:1].isupper():
                head = wire.parse_http_head(buf)
                if head.status == "need_more":
                    continue
                if not head.ok:
                    return self._refuse(s, c, rec, f"HTTP request: {head.reason}", http=True)
                rec.update(name=head.host, source="connect" if head.kind == "connect" else "host",
                           method=head.method)
            else:
                return self._refuse(s, c, rec, "neither TLS nor HTTP: no name to judge")
            break
        port = head.port if head is not None and head.kind == "connect" else rec["port"]
        if head is not None and head.kind == "http" and head.port is None:
            port = rec["port"]
        # a name no rule allows is never looked up: names leave the host only when allowed
        addresses, how = ((await self.addresses_of(s, rec["name"])) if name_allowed(s.rules, rec["name"])
                          else (set(), None))
        verdict = judge_flow(s.rules, rec["name"], rec["source"], rec["addr"], port, addresses)
        answer = s.answer_for(rec["addr"])
        rec["dns"] = ({"name": answer[0], "answered_at": round(answer[1], 6), "by": "agentwatch-dns"}
                      if answer and answer[0] == rec["name"] else
                      {"name": rec["name"], "addresses": sorted(addresses), "by": how} if how
                      else None)
        if not verdict.allowed:
            return self._refuse(s, c, rec, verdict.reason, http=head is not None)
        if head is not None and head.kind == "connect":
            pick = sorted(addresses, key=lambda a: ipaddress.ip_address(a).version)
            upstream, first = (str(canonical_ip(pick[0])), port), buf[head.head_len:]
        else:
            upstream, first = (str(canonical_ip(rec["addr"])), rec["port"]), buf
        u = socket.socket(socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET, socket.SOCK_STREAM)
        try:
            u.setblocking(False)
            try:
                await _connect(loop, u, upstream, lim.connect_s)
            except (OSError, asyncio.TimeoutError) as e:
                rec.update(decision="error", reason=f"upstream {upstream[0]}:{upstream[1]}: "
                                                    f"{e.strerror if isinstance(e, OSError) and e.strerror else 'timed out'}")
                s.count("errors")
                if head is not None:
                    _send_now(c, wire.http_error(502, "Bad Gateway", rec["reason"] + "\n"))
                else:
                    _reset(c)
                return
            rec.update(decision="allow", reason=verdict.reason, rule=None, pattern=verdict.rule,
                       upstream=f"{upstream[0]}:{upstream[1]}")
            s.count("allowed")
            if head is not None and head.kind == "connect":
                await loop.sock_sendall(c, b"HTTP/1.1 200 Connection established\r\n\r\n")
            if first:
                await loop.sock_sendall(u, first)
                rec["bytes_out"] += len(first)
            await self._splice(c, u, rec)
        finally:
            u.close()

    async def _splice(self, c, u, rec):
        """Both directions until each has ended (or one failed, or the flow
        sat idle for idle_s), moved in the kernel: splice(2) through the
        loop's one pipe (_Pipe), driven by the loop's reader and writer
        callbacks (_Splice): no task, future or timer per wakeup, which on
        loopback costs more than the bytes."""
        sp = _Splice(self.loop, self._pipe(), c, u, rec, self.limits)
        try:
            await sp.done
        finally:          # a reset either way, or the run's end, ends both
            sp.stop()

    def _pipe(self):
        if self._splice_pipe is None:
            self._splice_pipe = _Pipe(self.limits.chunk)
        return self._splice_pipe

    def _refuse(self, s, c, rec, reason, http=False):
        """Refuse the flow, the one way its protocol shows (module docstring)."""
        rule = refusal_rule(rec.get("name"), rec.get("addr"))
        rec.update(decision="deny", reason=reason, rule=rule)
        s.count("denied")
        if http:
            _send_now(c, wire.http_error(403, "Forbidden",
                                         f"agentwatch: {rule}: {reason}\n", rule=rule))
        else:
            _reset(c)


def _deliver(s, rec):
    rec.setdefault("run_id", s.run_id)
    try:
        s.on_record(rec)
    except Exception:          # the run's side must not break the guard
        s.count("errors")


def _reset(sock):
    """Close with a TCP reset (SO_LINGER 0), so the client sees the refusal
    at once instead of an orderly end it may mistake for a server's."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _send_now(sock, data):
    """A short answer (an error page) into a fresh socket's empty buffer;
    what does not fit is dropped: the flow closes next anyway."""
    try:
        sock.send(data)
    except OSError:
        pass


async def _ready(loop, sock, timeout, writable=False):
    """Until sock is readable (or writable); asyncio.TimeoutError after
    timeout s. A future and a timer handle: no task, as wait_for makes."""
    fut = loop.create_future()
    fd = sock.fileno()
    wake = lambda: fut.done() or fut.set_result(None)                     # noqa: E731
    late = lambda: fut.done() or fut.set_exception(asyncio.TimeoutError())  # noqa: E731
    (loop.add_writer if writable else loop.add_reader)(fd, wake)
    timer = loop.call_later(timeout, late)
    try:
        await fut
    finally:
        timer.cancel()
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def _connect(loop, sock, addr, timeout):
    """sock (non-blocking) connected to addr; OSError, or
    asyncio.TimeoutError after timeout s. To a local upstream the
    handshake is mostly over when connect() returns, and then the loop is
    not waited on."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and not _connected(sock):
            await _ready(loop, sock, timeout, writable=True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _connected(sock):
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class _Splice:
    """One allowed flow's two directions, each src -> pipe -> dst by
    splice(2) in a reader callback on the loop (the bytes never enter
    Python). The pipe is empty again when a callback returns, so one pipe
    serves every flow. What dst cannot take at once is read out of the pipe
    and sent by a writer callback as dst drains; src is not read meanwhile,
    so at most one chunk of a lagging side waits in memory.

    The callbacks are plain handles on the loop: no task, future or timer
    per wakeup, which on loopback cost more than the bytes (the guard's
    1 MiB transfers ran at about 0.4x direct with a task per direction
    awaiting a future per wakeup; bench/README.md has today's figure).
    ROUNDS bounds how long one flat-out flow holds the loop per wakeup.

    A direction ends at src's EOF (then dst's write side is shut); ``done``
    resolves when both have ended, fails with the first OSError, or
    resolves after idle_s with no byte either way."""

    ROUNDS = 8          # splices per wakeup

    def __init__(self, loop, pipe, c, u, rec, limits):
        self.loop, self.pipe, self.rec, self.lim = loop, pipe, rec, limits
        self.done = loop.create_future()
        self.dirs = [_Direction(c, u, "bytes_out"), _Direction(u, c, "bytes_in")]
        self.last = loop.time()
        self.timer = loop.call_later(limits.idle_s, self._idle)
        for d in self.dirs:
            loop.add_reader(d.src.fileno(), self._readable, d)

    def _readable(self, d):
        pipe, src, dst = self.pipe, d.src.fileno(), d.dst.fileno()
        try:
            for _ in range(self.ROUNDS):
                try:
                    n = os.splice(src, pipe.w, pipe.size, flags=_SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    return
                if n == 0:
                    return self._ended(d)
                self.rec[d.key] += n
                self.last = self.loop.time()
                left = n
                try:
                    while left:
                        moved = os.splice(pipe.r, dst, left, flags=_SPLICE_FLAGS)
                        if not moved:
                            break
                        left -= moved
                except (BlockingIOError, InterruptedError):
                    pass
                if left:                        # dst pushes back: wait for it
                    d.pending = pipe.take(left)
                    self.loop.remove_reader(src)
                    self.loop.add_writer(dst, self._writable, d)
                    return
        except OSError as e:
            pipe.reset()
            self._fail(e)

    def _writable(self, d):
        try:
            sent = d.dst.send(d.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._fail(e)
        d.pending = d.pending[sent:]
        if not d.pending:
            self.loop.remove_writer(d.dst.fileno())
            self.loop.add_reader(d.src.fileno(), self._readable, d)

    def _ended(self, d):
        self.loop.remove_reader(d.src.fileno())
        d.ended = True
        try:
            d.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if all(x.ended for x in self.dirs) and not self.done.done():
            self.done.set_result(None)

    def _fail(self, e):
        if not self.done.done():
            self.done.set_exception(e)

    def _idle(self):
        quiet = self.loop.time() - self.last
        if quiet >= self.lim.idle_s:
            if not self.done.done():
                self.done.set_result(None)
        else:
            self.timer = self.loop.call_later(self.lim.idle_s - quiet, self._idle)

    def stop(self):
        """No callback of this flow is left on the loop (before its sockets close)."""
        self.timer.cancel()
        for d in self.dirs:
            for fd, remove in ((d.src.fileno(), self.loop.remove_reader),
                               (d.dst.fileno(), self.loop.remove_writer)):
                if fd >= 0:
                    remove(fd)


@dataclass
class _Direction:
    src: socket.socket
    dst: socket.socket
    key: str                    # the record's byte count: bytes_out (agent to upstream), bytes_in
    pending: bytes = b""
    ended: bool = False


class _Pipe:
    """The pipe a guard loop splices every flow through. It is empty
    whenever the loop waits (_Splice), so it holds no flow's bytes across
    flows; take() empties it into memory where a socket lagged."""

    def __init__(self, size):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:         # over fs.pipe-max-size: the default (64 KiB)
            self.size = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def take(self, n):
        out = b""
        while len(out) < n:
            out += os.read(self.r, n - len(out))
        return out

    def reset(self):
        """Drop what a failed splice left in the pipe."""
        try:
            while os.read(self.r, self.size):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self):
        os.close(self.r)
        os.close(self.w)


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _fd_budget():
    """Flows this process can hold: each takes two descriptors, and the
    rest of agentwatch keeps 256. The limit is not raised: the agents we
    start inherit it. So the flow bounds, never EMFILE, decide who waits."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft - 256) // 2) if soft != resource.RLIM_INFINITY else 1 << 20


__all__ = ["EgressGuard", "Limits", "NameRule", "RunSession", "Verdict", "judge_flow",
           "name_allowed", "name_rules", "refusal_rule", "RULE"]
