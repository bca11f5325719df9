"""The agent-to-agent broker's server: JSON-RPC 2.0 (methods shaped after
A2A v1.0, harness/broker_rpc.py) on a unix socket, one request a line,
and the same methods over HTTP on loopback for A2A clients (POST with a
JSON-RPC body; GET of the agent cards). The daemon serves it to every run
(BrokerService below, a run/services.py RunService).

Who asks is the kernel's word, once per connection (core.peer.of_socket:
SO_PEERCRED and a pidfd for the unix socket, inet_diag for TCP, the
network namespace relay's filing for runs of their own namespace): a
process in a registered run is that run; root outside every run is the
operator (the CLI); anyone else is refused. Nothing a request says about
its sender counts (broker_rpc checks the claims and reports them).

Bounds: at most limits.max_clients connections, limits.per_run_clients of
them for one run; a request is at most limits.max_request bytes (a longer
line or body is refused and the connection closed); a connection idle
for limits.idle_timeout_s is closed; an answer a client does not read
within limits.write_timeout_s closes its connection; each run's requests
are rate-limited (peers.rate a second, refused past it and counted). One
asyncio loop in a thread of its own serves every client, so a slow or
vanished one stalls only itself; the token-gated tools run in worker
threads (limits.tool_workers at once).
"""
import asyncio
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import h11

from ..core import peer
from ..core.loops import start_loop_thread, stop_loop_thread, within
from ..run.services import RunService
from . import a2a
from .a2a import RpcError
from .broker_rpc import Methods


@dataclass
class Limits:
    max_clients: int = 1024
    per_run_clients: int = 64
    max_request: int = a2a.MAX_REQUEST_BYTES
    idle_timeout_s: float = 900.0
    write_timeout_s: float = 10.0
    head_timeout_s: float = 10.0
    tool_workers: int = 4
    default_rate: int = 200           # requests a second of a run whose policy names no peers.rate


@dataclass
class BrokerRun:
    """One run as the broker knows it: its kernel identity and its policy's
    peers section (None: no such section; policed False: no policy at all,
    which allows everything, as for any unconfined run)."""
    run_id: str
    agent: str
    cgroup: str
    peers: object = None              # policy.model.Peers
    policed: bool = True
    policy_digest: str = None
    spawn: object = None              # callable(argv, timeout_s) -> (exit, out, err, truncated)
    emit: object = None               # callable(record): an event of the run
    check_read: object = None         # callable(path) -> why its policy refuses reading it, or None
    started: float = field(default_factory=time.time)
    clients: int = 0
    allowance: float = None           # the rate limit's token bucket
    checked: float = 0.0
    rate_limited: int = 0
    rate_reported: float = 0.0

    @property
    def rate(self):
        return getattr(self.peers, "rate", None)

    def identity(self):
        return {"agent": self.agent, "run_id": self.run_id, "cgroup": self.cgroup}


OPERATOR = "operator"                 # root outside every run: the CLI


@dataclass
class Caller:
    """Who is on a connection, as the kernel said at connect."""
    peer: object                      # core.peer.Peer
    run_id: str = None                # None: the operator
    transport: str = "unix"

    @property
    def operator(self):
        return self.run_id is None


class Broker:
    """The server. store: broker_store.Store; signer: tokens.Signer;
    resolve_caller(sock) -> core.peer.Peer (injected for unit tests)."""

    def __init__(self, store, signer, socket_path, host="127.0.0.1", port=0, limits=None,
                 resolve_caller=peer.of_socket, log=None):
        self.store = store
        self.signer = signer
        self.socket_path = socket_path
        self.host = host
        self._want_port = port
        self.port = None
        self.limits = limits or Limits()
        self.resolve_caller = resolve_caller
        self.log = log or (lambda msg: None)
        self.runs = {}                 # run id -> BrokerRun
        self.lock = threading.Lock()
        self.counters = {k: 0 for k in ("connections", "requests", "errors", "busy", "unknown_callers",
                                        "too_large", "idle_closed", "slow_closed", "rate_limited",
                                        "refused", "messages", "tool_calls")}
        self.methods = Methods(self)
        self.loop = None
        self.thread = None
        self._servers = []
        self._tasks = set()
        self._active = 0
        self._closed = False
        self._tool_slots = None

    # -- life ---------------------------------------------------------------------------
    def start(self):
        if self.thread is None:
            self.loop, self.thread = start_loop_thread("aw-broker", self._open, self)
        return self

    async def _open(self):
        self._tool_slots = asyncio.Semaphore(self.limits.tool_workers)
        d = os.path.dirname(self.socket_path)
        os.makedirs(d, exist_ok=True)
        try:
            os.unlink(self.socket_path)      # stale: the daemon checked nobody serves it
        except FileNotFoundError:
            pass
        unix = await asyncio.start_unix_server(self._unix_client, self.socket_path,
                                               limit=self.limits.max_request + 2, backlog=1024)
        # every run may connect (the policy's peers section decides what it
        # may do); who it is comes from the kernel, not the file's mode
        os.chmod(self.socket_path, 0o666)
        tcp = await asyncio.start_server(self._http_client, self.host, self._want_port, backlog=1024)
        self.port = tcp.sockets[0].getsockname()[1]
        self._servers = [unix, tcp]

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def close(self):
        """Stop listening, close every connection, stop the loop. Idempotent."""
        self._closed = True
        if self.thread is None:
            return
        stop_loop_thread(self.loop, self.thread, self._shutdown())
        self.thread = None
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    async def _shutdown(self):
        for s in self._servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    # -- runs (any thread) ---------------------------------------------------------------
    def register_run(self, run):
        with self.lock:
            self.runs[run.run_id] = run

    def unregister_run(self, run_id):
        """The run ended: its tokens are revoked (and theirs, attenuated
        from them); its counters."""
        with self.lock:
            run = self.runs.pop(run_id, None)
        revoked = self.store.revoke_issuer(run_id, time.time())
        if run is None:
            return None
        return {"tokens_revoked": revoked, "rate_limited": run.rate_limited}

    def live(self, agent=None, run_id=None):
        """Registered runs, by agent name or run id, newest first."""
        with self.lock:
            runs = list(self.runs.values())
        runs = [r for r in runs if (agent is None or r.agent == agent) and (run_id is None or r.run_id == run_id)]
        return sorted(runs, key=lambda r: r.started, reverse=True)

    def count(self, key, n=1):
        self.counters[key] = self.counters.get(key, 0) + n

    # -- who -----------------------------------------------------------------------------
    def _identify(self, sock, transport):
        """The Caller of a new connection, or an RpcError to answer and close."""
        try:
            p = self.resolve_caller(sock)
        except Exception:
            p = None
        if p is None:
            self.count("unknown_callers")
            raise RpcError(a2a.PERMISSION_DENIED, "the broker could not name this caller from the kernel")
        if p.run_id is not None:
            run = self.runs.get(p.run_id)
            if run is None:
                self.count("unknown_callers")
                raise RpcError(a2a.PERMISSION_DENIED, f"run {p.run_id} is not served by this broker "
                                                      "(it runs under another agentwatch)")
            if run.clients >= self.limits.per_run_clients:
                self.count("busy")
                raise RpcError(a2a.RATE_LIMITED, f"run {run.run_id} has {run.clients} broker connections "
                                                 f"open already (at most {self.limits.per_run_clients})")
            return Caller(p, p.run_id, transport)
        if p.uid == 0:
            return Caller(p, None, transport)
        self.count("unknown_callers")
        raise RpcError(a2a.PERMISSION_DENIED, "only agentwatch runs and root may use the broker "
                                              f"(this caller is uid {p.uid}, in no run)")

    def _admit(self, caller):
        run = self.runs.get(caller.run_id) if caller.run_id else None
        if run is not None:
            run.clients += 1
        self._active += 1

    def _leave(self, caller):
        run = self.runs.get(caller.run_id) if caller and caller.run_id else None
        if run is not None:
            run.clients -= 1
        self._active -= 1

    def rate_ok(self, run):
        """The run's token bucket: False past its rate (counted; reported
        as a protocol.rate violation at most once a second)."""
        rate = run.rate or self.limits.default_rate
        now = time.monotonic()
        if run.allowance is None:
            run.allowance, run.checked = float(rate), now
        run.allowance = min(float(rate), run.allowance + (now - run.checked) * rate)
        run.checked = now
        if run.allowance >= 1.0:
            run.allowance -= 1.0
            return True
        run.rate_limited += 1
        self.count("rate_limited")
        if now - run.rate_reported >= 1.0 and run.policed:
            run.rate_reported = now
            self.emit(run, {"op": "rate", "status": "refused",
                            "finding": {"category": "protocol", "rule": "protocol.rate",
                                        "reason": f"over peers.rate ({rate} requests a second): "
                                                  f"{run.rate_limited} refused so far",
                                        "refused_total": run.rate_limited}})
        return False

    def emit(self, run, record):
        """A msg event on run's log."""
        if run is not None and run.emit is not None:
            run.emit({"kind": "msg", "ts": round(time.time(), 6), **record})

    # -- one request ---------------------------------------------------------------------
    async def handle(self, caller, data, recipient=None):
        """bytes of one JSON-RPC request -> the response dict (None for a
        notification)."""
        self.count("requests")
        rid = None
        try:
            req = a2a.parse_request(data)
            rid = req.get("id")
            run = self.runs.get(caller.run_id) if caller.run_id else None
            if caller.run_id and run is None:
                raise RpcError(a2a.PERMISSION_DENIED, f"run {caller.run_id} has ended")
            if run is not None and not self.rate_ok(run):
                raise RpcError(a2a.RATE_LIMITED, f"run {run.run_id} is over its rate of "
                                                 f"{run.rate or self.limits.default_rate} requests a second")
            params = req.get("params") or {}
            if recipient is not None and req.get("method") == "SendMessage":
                params = dict(params, recipient=params.get("recipient", recipient))
            result = await self.methods.call(caller, run, req["method"], params)
            out = a2a.response(rid, result)
        except RpcError as e:
            self.count("errors")
            out = a2a.error_response(rid, e)
        except Exception as e:             # a bug must answer, not kill the connection
            self.count("errors")
            self.log(f"internal error: {type(e).__name__}: {e}")
            out = a2a.error_response(rid, RpcError(a2a.INTERNAL_ERROR, f"internal error in the broker: "
                                                                       f"{type(e).__name__}"))
        return out

    async def run_tool(self, fn, *args):
        """fn(*args) in a worker thread, at most limits.tool_workers at once."""
        async with self._tool_slots:
            return await asyncio.to_thread(fn, *args)

    # -- the unix socket: one JSON-RPC request a line ---------------------------------------
    async def _unix_client(self, reader, writer):
        await self._serve_connection(reader, writer, "unix", self._unix_requests)

    async def _serve_connection(self, reader, writer, transport, serve):
        self.count("connections")
        task = asyncio.current_task()
        self._tasks.add(task)
        caller = None
        try:
            if self._active >= self.limits.max_clients:
                self.count("busy")
                raise RpcError(a2a.RATE_LIMITED, f"the broker has {self._active} clients; retry later")
            caller = self._identify(writer.get_extra_info("socket"), transport)
            self._admit(caller)
            await serve(caller, reader, writer)
        except RpcError as e:
            await self._refuse(writer, transport, e)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, TimeoutError):
            pass
        finally:
            if caller is not None:
                self._leave(caller)
            self._tasks.discard(task)
            writer.close()

    async def _refuse(self, writer, transport, err):
        body = json.dumps(a2a.error_response(None, err)).encode()
        try:
            if transport == "unix":
                writer.write(body + b"\n")
            else:
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await self._drained(writer)
        except (ConnectionError, TimeoutError, asyncio.TimeoutError):
            pass

    async def _unix_requests(self, caller, reader, writer):
        while not self._closed:
            try:
                line = await within(reader.readuntil(b"\n"), self.limits.idle_timeout_s)
            except asyncio.TimeoutError:
                self.count("idle_closed")
                return
            except asyncio.LimitOverrunError:
                self.count("too_large")
                await self._answer(writer, a2a.error_response(None, RpcError(
                    a2a.TOO_LARGE, f"a request is at most {self.limits.max_request} bytes (one line)")))
                return
            except asyncio.IncompleteReadError as e:
                if e.partial.strip():
                    await self._answer(writer, await self.handle(caller, e.partial))
                return
            if not line.strip():
                continue
            out = await self.handle(caller, line)
            if out is not None and not await self._answer(writer, out):
                return

    async def _answer(self, writer, out):
        writer.write(json.dumps(out, separators=(",", ":")).encode() + b"\n")
        try:
            await self._drained(writer)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            self.count("slow_closed")
            return False

    async def _drained(self, writer):
        """Until what was written has gone out; asyncio.TimeoutError when
        the client has not taken it within write_timeout_s. No wait when
        the write went out at once, as it mostly does."""
        if writer.transport.get_write_buffer_size():
            await within(writer.drain(), self.limits.write_timeout_s)

    # -- HTTP on loopback (A2A's JSON-RPC binding) ------------------------------------------
    async def _http_client(self, reader, writer):
        sock = writer.get_extra_info("socket")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        await self._serve_connection(reader, writer, "http", self._http_requests)

    async def _http_requests(self, caller, reader, writer):
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while not self._closed:
            req = await self._http_event(conn, reader, h11.Request)
            if req is None:
                return
            body = bytearray()
            while True:
                ev = await self._http_event(conn, reader, (h11.Data, h11.EndOfMessage))
                if ev is None:
                    return
                if isinstance(ev, h11.EndOfMessage):
                    break
                body += ev.data
                if len(body) > self.limits.max_request:
                    self.count("too_large")
                    await self._http_send(conn, writer, 413, a2a.error_response(None, RpcError(
                        a2a.TOO_LARGE, f"a request is at most {self.limits.max_request} bytes")), close=True)
                    return
            status, out = await self._http_route(caller, req, bytes(body))
            if not await self._http_send(conn, writer, status, out):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _http_event(self, conn, reader, want):
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError:
                return None
            if isinstance(ev, want):
                return ev
            if ev is h11.NEED_DATA:
                wait = self.limits.idle_timeout_s if conn.their_state is h11.IDLE else self.limits.head_timeout_s
                try:
                    data = await within(reader.read(65536), wait)
                except asyncio.TimeoutError:
                    self.count("idle_closed")
                    return None
                conn.receive_data(data)
                if not data:
                    return None
                continue
            return None                     # closed, paused, or out of order

    async def _http_route(self, caller, req, body):
        target = req.target.decode("latin-1").split("?", 1)[0].rstrip("/") or "/"
        method = req.method.decode()
        parts = [p for p in target.split("/") if p]
        if method == "GET" and parts[-2:] == [".well-known", "agent-card.json"]:
            name = parts[1] if len(parts) == 4 and parts[0] in ("a2a", "agents") else None
            out = await self.handle(caller, json.dumps({"jsonrpc": "2.0", "id": 0, "method": "GetAgentCard",
                                                        "params": {"name": name} if name else {}}).encode())
            return (200, out["result"]) if "result" in out else (404, out)
        if method != "POST":
            return 405, a2a.error_response(None, RpcError(a2a.INVALID_REQUEST, "POST a JSON-RPC request, "
                                                                                "or GET an agent card"))
        recipient = parts[1] if len(parts) == 2 and parts[0] in ("a2a", "agents") else None
        if parts and recipient is None:
            return 404, a2a.error_response(None, RpcError(a2a.INVALID_REQUEST, f"no endpoint {target}: POST "
                                                                                "to / or /a2a/<agent>"))
        out = await self.handle(caller, body, recipient=recipient)
        return 200, out

    async def _http_send(self, conn, writer, status, out, close=False):
        body = json.dumps(out, separators=(",", ":")).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if close:
            headers.append(("Connection", "close"))
        try:
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
            writer.write(conn.send(h11.Data(data=body)))
            writer.write(conn.send(h11.EndOfMessage()))
            await self._drained(writer)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            self.count("slow_closed")
            return False
        except h11.LocalProtocolError:
            return False

    def stats(self):
        return {"socket": self.socket_path, "url": self.url, "clients": self._active,
                "runs": len(self.runs), **self.counters}


# -- the daemon's service ------------------------------------------------------------------
class BrokerService(RunService):
    """The broker as a service of a Monitor (run/services.py): the daemon
    starts one (state under <state dir>/broker/: broker.sock, broker.db,
    token-key.pem), and every run of that daemon is registered with it,
    its agent environment told where it is (AGENTWATCH_BROKER: the unix
    socket; AGENTWATCH_BROKER_URL: the HTTP binding; AGENTWATCH_BROKER_CLIENT:
    the standard-library client, harness/broker_client.py)."""

    name = "broker"

    def __init__(self, directory=None, limits=None, log=None):
        from ..core import state
        from .broker_store import Store
        from .sqlite_store import SYNC_MODES
        from .tokens import Signer
        self.directory = directory or os.path.join(state.state_dir(), "broker")
        os.makedirs(self.directory, exist_ok=True)
        os.chmod(self.directory, 0o711)           # the socket is reachable; the files are 0600
        sync = os.environ.get("AGENTWATCH_BROKER_SYNC", "full").upper()
        if sync not in SYNC_MODES:
            from ..core.errors import UsageError
            raise UsageError(f"AGENTWATCH_BROKER_SYNC={sync.lower()}: expected full (every acknowledged "
                             "message survives a power loss) or normal (a crash of the daemon; faster)")
        self.store = Store(os.path.join(self.directory, "broker.db"), synchronous=sync)
        try:
            # the issuers of tokens a previous daemon left died with it
            revoked = self.store.revoke_all(time.time())
            if revoked and log:
                log(f"broker: revoked {revoked} token(s) of runs a previous daemon served")
            self.signer = Signer.load_or_create(os.path.join(self.directory, "token-key.pem"))
            self.broker = Broker(self.store, self.signer, os.path.join(self.directory, "broker.sock"),
                                 limits=limits, log=log)
            # agents' memory (harness/memory.py) on the same socket: memory.* methods
            from .memory import MemoryStore
            from .memory_service import MemoryKeeper
            self.memory = self.broker.memory = MemoryStore(os.path.join(self.directory, "memory.db"))
            self.keeper = self.broker.keeper = MemoryKeeper(self.memory, log=log).start()
            self.broker.start()
        except BaseException:
            self._close_stores()
            raise

    def loopback_ports(self):
        return [self.broker.port]

    def open_run(self, run):
        spec = run.policy
        self.broker.register_run(BrokerRun(
            run_id=run.run_id, agent=run.agent, cgroup=run.cgroup,
            peers=getattr(spec, "peers", None), policed=spec is not None,
            policy_digest=run.policy_digest, spawn=run.spawn, emit=run.emit, check_read=run.check_read))
        if run.subscribe is not None:
            self.keeper.subscribe_run(run.run_id, run.agent, run.subscribe)
        return {"AGENTWATCH_BROKER": self.broker.socket_path, "AGENTWATCH_BROKER_URL": self.broker.url,
                "AGENTWATCH_BROKER_CLIENT": client_path()}

    def close_run(self, run_id):
        return self.broker.unregister_run(run_id)

    def close(self):
        self.broker.close()
        self._close_stores()

    def _close_stores(self):
        for part in (getattr(self, "keeper", None), getattr(self, "memory", None), self.store):
            if part is not None:
                part.close()

    def stats(self):
        return dict(self.broker.stats(), messages_stored=self.store.messages_count(),
                    signer=self.signer.fingerprint, memory=dict(self.memory.stats(), **self.keeper.stats()))


def client_path():
    """The standard-library client's file, for agents to import or run."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "broker_client.py")
