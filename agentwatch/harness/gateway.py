"""The LLM gateway: an OpenAI- and Anthropic-compatible HTTP endpoint on
loopback that runs reach instead of the API (their OPENAI_BASE_URL and
ANTHROPIC_BASE_URL point here, with a dummy per-run key).

For each request:

1. who: the caller's run, from the kernel (``resolve_caller(sock)``, in
   production core.peer.of_socket of the accepted socket mapped to a
   registered run), once per connection. Nothing the client sends is
   identity: not its headers (none is forwarded; the upstream request's
   headers are built here), not its API key (replaced by the upstream's
   real one). A caller in no run, or in a run not registered here, is
   refused (403) unless the config allows outside callers.
2. what: the path picks the API (/v1/chat/completions, /v1/completions,
   /v1/models: OpenAI; /v1/messages: Anthropic); the body's ``model`` picks
   the upstream from the model map. Errors are answered in the API's own
   JSON error shape (llm_wire.error_body).
3. checks: the run's system prompt, when registered, against the
   request's (a mismatch is an ``identity`` finding; with
   prompt_action "deny" the request is refused, 403); the run's ledger
   (``ledger.check()``: a reason is a 429 and a ``resource`` finding).
4. when: ``scheduler.acquire(run_id, estimate_in, estimate_out)`` waits for
   the run's turn; its grant is released with the tokens actually used.
5. the call: the upstream's real key, the upstream's model name, a body
   otherwise as sent. Streams (``"stream": true``) pass through event by
   event as they arrive (OpenAI streams are asked for their usage with
   stream_options.include_usage, and that extra chunk is kept from a
   client that did not ask for it). The real keys are scrubbed from
   everything sent back.
6. the record: ``on_call(run_id, record)`` for every request, refused ones
   too (run_id None for a caller in no run). See ``CallRecord`` below for
   its fields.

Bounds: at most ``limits.max_clients`` open client connections (more get
503 and are closed, counted ``busy``); one task per connection, so a slow
client stalls only itself; a request head must arrive within
head_timeout (else 408), a kept-alive connection idles at most
idle_timeout; a body over max_body is refused (413) from its
Content-Length without being read, or as soon as a chunked body passes the
cap; a non-streamed upstream body is read up to max_response (else 502);
upstream connect and read (silence) timeouts answer 504, an upstream that
cannot be reached 502, each with a message naming the upstream. A client
that goes away while its call runs cancels the upstream request (its
connection is closed); the tokens so far are still recorded and charged
(from the usage seen, else estimated: tokens_counted).

Like the egress guard, the gateway runs one asyncio loop in a thread of its
own: start() / close() from any thread, register_run() / unregister_run()
too. on_call is called on the gateway's thread; it must not block.
"""
import asyncio
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass

import h11
import httpx

from ..core.loops import start_loop_thread, stop_loop_thread
from . import llm_wire
from .gateway_config import GatewayConfig

PROMPT_RULE = "gateway.prompt"
BUDGET_RULE = "gateway.budget"
PROMPT_ACTIONS = ("alert", "deny")
OUTSIDE = "(outside)"                # the scheduler key of callers in no run

# The headers a client may have forwarded upstream: content negotiation and
# API versions only. Anything else (Authorization, x-api-key, cookies,
# identity headers of any name) stays here.
FORWARD_HEADERS = ("content-type", "anthropic-version", "anthropic-beta", "openai-beta")
# The upstream response headers passed back to the client.
RETURN_HEADERS = ("content-type", "x-request-id", "request-id", "retry-after")
ANTHROPIC_VERSION = "2023-06-01"
READ_CHUNK = 65536

COUNTERS = ("connections", "requests", "busy", "head_timeouts", "bad_requests", "too_large",
            "not_found", "unknown_model", "refused_outside", "refused_unregistered",
            "prompt_mismatch", "refused_prompt", "refused_budget", "upstream_unreachable",
            "upstream_timeouts", "upstream_errors", "client_closed", "on_call_errors",
            "streams", "scheduler_errors", "accept_errors", "internal_errors",
            "resolve_errors")


@dataclass
class RunEntry:
    run_id: str
    agent: str
    weight: int = 100
    budget: object = None
    prompt: str = None
    prompt_action: str = "alert"

    @property
    def prompt_digest(self):
        return None if self.prompt is None else _digest(self.prompt)


def _digest(text):
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _Refusal(Exception):
    """A request answered with an error; status, message, outcome."""

    def __init__(self, status, message, outcome="refused", counter=None, close=False):
        super().__init__(message)
        self.status, self.message, self.outcome = status, message, outcome
        self.counter, self.close = counter, close


class _ClientGone(Exception):
    pass


class Gateway:
    """The LLM endpoint. ``resolve_caller(sock)`` -> run id (or an object
    with .run_id, such as a core.peer.Peer) or None; ``on_call(run_id,
    record)`` gets every call's record; ``scheduler`` (optional) grants
    upstream calls; ``ledger_for(run_id)`` (optional) -> the run's budget
    ledger or None."""

    def __init__(self, config, resolve_caller, on_call, scheduler=None, ledger_for=None,
                 host="127.0.0.1", port=0):
        if not isinstance(config, GatewayConfig):
            raise TypeError("config must be a GatewayConfig (GatewayConfig.load(path))")
        self.config = config
        self.limits = config.limits
        self.resolve_caller = resolve_caller
        self.on_call = on_call
        self.scheduler = scheduler
        self.ledger_for = ledger_for
        self.host, self._want_port = host, port
        self.port = None
        self.loop = None
        self.thread = None
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.active = 0
        self._runs = {}
        self._lock = threading.Lock()
        self._listener = None
        self._client = None
        self._tasks = set()
        self._keys = tuple(k.encode() for k in config.keys())
        self._closed = False

    # -- life -------------------------------------------------------------------------
    def start(self):
        if self.thread is not None:
            return self
        if self._closed:
            raise RuntimeError("this gateway was closed; make a new one")
        self.loop, self.thread = start_loop_thread("aw-llm-gateway", self._open, self)
        return self

    async def _open(self):
        lim = self.limits
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=lim.connect_timeout, read=lim.read_timeout,
                                  write=lim.read_timeout, pool=lim.connect_timeout),
            limits=httpx.Limits(max_connections=lim.max_clients,
                                max_keepalive_connections=min(64, lim.max_clients)),
            # no proxy or netrc from agentwatch's own environment: where the
            # keys go is the config's word alone
            trust_env=False, follow_redirects=False)
        ls = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        try:
            ls.bind((self.host, self._want_port))
            ls.listen(1024)
            ls.setblocking(False)
        except OSError:
            ls.close()
            raise
        self._listener = ls
        self.port = ls.getsockname()[1]
        self.loop.add_reader(ls.fileno(), self._accept)

    def _accept(self):
        """Accepted on the loop, each socket at once a task of ours, so
        close() finds every connection (asyncio's start_server takes loop
        turns from accept to its callback, and a close in between would
        leave the socket to no one)."""
        for _ in range(64):                  # a batch, then other ready sockets get a turn
            try:
                c, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:                  # out of descriptors: pause, as asyncio's servers do
                self._count("accept_errors")
                self.loop.remove_reader(self._listener.fileno())
                self.loop.call_later(1, self._resume)
                return
            c.setblocking(False)
            # a response is written as head, body and end: without NODELAY
            # the body waits for the client's delayed ACK of the head (~40
            # ms a request). asyncio sets it only on sockets whose proto is
            # IPPROTO_TCP, and an accepted socket of ours says 0
            try:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            t = self.loop.create_task(self._socket(c))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _resume(self):
        if self._listener is not None:
            self.loop.add_reader(self._listener.fileno(), self._accept)

    async def _socket(self, c):
        try:
            reader, writer = await asyncio.open_connection(sock=c)
        except BaseException:
            c.close()
            raise
        await self._connection(reader, writer)

    @property
    def url(self):
        return f"http://{self.host}:{self.port}"

    def close(self):
        """Stop listening, end every connection and upstream call, stop the
        loop. Idempotent."""
        self._closed = True
        if self.thread is None:
            return
        stop_loop_thread(self.loop, self.thread, self._shutdown())
        self.thread = None

    async def _shutdown(self):
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._client is not None:
            await self._client.aclose()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- runs ---------------------------------------------------------------------------
    def register_run(self, run_id, agent, weight=100, budget=None, prompt=None,
                     prompt_action="alert"):
        """A run whose processes may call; its weight goes to the scheduler
        (keyed by run id). prompt: the run's system prompt text, checked
        against every request's."""
        if prompt_action not in PROMPT_ACTIONS:
            raise ValueError(f"prompt_action must be one of {', '.join(PROMPT_ACTIONS)}, "
                             f"got {prompt_action!r}")
        entry = RunEntry(run_id, agent, weight, budget, prompt, prompt_action)
        if self.scheduler is not None:       # weight first: the run's first call queues with it
            self._on_loop(self.scheduler.set_weight, run_id, weight)
        with self._lock:
            self._runs[run_id] = entry
        return entry

    def unregister_run(self, run_id):
        with self._lock:
            entry = self._runs.pop(run_id, None)
        if entry is not None and self.scheduler is not None:
            self._on_loop(self.scheduler.remove, run_id)
        return entry

    def _on_loop(self, fn, *args):
        """fn(*args) on the gateway's loop (the scheduler lives there), and
        its result; directly when the loop is not running or this is it."""
        loop = self.loop
        if loop is None or not loop.is_running() or threading.current_thread() is self.thread:
            return fn(*args)

        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    def runs(self):
        with self._lock:
            return dict(self._runs)

    def stats(self):
        out = {"port": self.port, "active_clients": self.active, "counters": dict(self.counters),
               "runs": len(self._runs)}
        if self.scheduler is not None:
            try:
                out["scheduler"] = self.scheduler.stats()
            except Exception:
                out["scheduler"] = None
        return out

    def _count(self, key, n=1):
        self.counters[key] = self.counters.get(key, 0) + n

    # -- connections ---------------------------------------------------------------------
    async def _connection(self, reader, writer):
        self._count("connections")
        if self._closed:
            await _close_writer(writer)
            return
        if self.active >= self.limits.max_clients:
            self._count("busy")
            body = llm_wire.error_body("openai", 503, f"the LLM gateway has "
                                       f"{self.limits.max_clients} clients already; retry later")
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nRetry-After: 1\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await _close_writer(writer)
            return
        linger = False          # read away an unread body before closing
        self.active += 1
        try:
            caller = self._caller(writer.get_extra_info("socket"))
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
            first = True
            while True:
                try:
                    req = await self._read_head(conn, reader, first)
                except _Refusal as r:
                    await self._send_error(conn, writer, "openai", r.status, r.message, close=True)
                    linger = True
                    break
                if req is None:
                    break
                first = False
                keep = await self._request(conn, reader, writer, req, caller)
                if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    linger = conn.their_state is not h11.DONE
                    break
                conn.start_next_cycle()
        except (_ClientGone, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.active -= 1
            await _close_writer(writer, reader if linger and not self._closed else None)

    def _caller(self, sock):
        """The caller's run id, from the kernel; None when it has none."""
        try:
            got = self.resolve_caller(sock)
        except Exception:                # unnamed is refused, never guessed
            self._count("resolve_errors")
            return None
        got = getattr(got, "run_id", got)
        return got if isinstance(got, str) and got else None

    async def _read_head(self, conn, reader, first):
        """The next h11.Request, or None when the client is done. The first
        byte of a next request may take idle_timeout; the head, head_timeout."""
        if not first and not conn.trailing_data[0]:
            try:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), self.limits.idle_timeout)
            except asyncio.TimeoutError:
                return None
            if not data:
                return None
            conn.receive_data(data)
        deadline = time.monotonic() + self.limits.head_timeout
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._count("bad_requests")
                raise _Refusal(e.error_status_hint or 400, f"bad HTTP request: {e}") from None
            if isinstance(ev, h11.Request):
                return ev
            if isinstance(ev, h11.ConnectionClosed) or ev is h11.PAUSED:
                return None
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                data = await asyncio.wait_for(reader.read(READ_CHUNK), left)
            except asyncio.TimeoutError:
                self._count("head_timeouts")
                if conn.their_state is h11.IDLE and not conn.trailing_data[0] and not first:
                    return None
                raise _Refusal(408, f"the request head did not arrive within "
                                    f"{self.limits.head_timeout:g}s") from None
            if not data:
                return None
            conn.receive_data(data)

    async def _read_body(self, conn, reader, writer):
        """The whole body, at most max_body bytes; refusals past it."""
        cap = self.limits.max_body
        if conn.client_is_waiting_for_100_continue:      # curl's Expect: 100-continue
            await self._write(conn, writer, h11.InformationalResponse(status_code=100, headers=[]))
        parts, size = [], 0
        while True:
            try:
                ev = conn.next_event()
            except h11.RemoteProtocolError as e:
                self._count("bad_requests")
                raise _Refusal(400, f"bad HTTP request body: {e}", close=True) from None
            if isinstance(ev, h11.Data):
                size += len(ev.data)
                if size > cap:
                    self._count("too_large")
                    raise _Refusal(413, f"the request body is over the gateway's limit of "
                                        f"{cap} bytes", close=True)
                parts.append(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                return b"".join(parts)
            elif ev is h11.NEED_DATA:
                try:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), self.limits.head_timeout)
                except asyncio.TimeoutError:
                    self._count("head_timeouts")
                    raise _Refusal(408, f"the request body stalled for more than "
                                        f"{self.limits.head_timeout:g}s", close=True) from None
                if not data:
                    raise _ClientGone()
                conn.receive_data(data)
            else:
                raise _ClientGone()

    # -- one request ---------------------------------------------------------------------
    async def _request(self, conn, reader, writer, req, run_id):
        """Serve one request; returns whether the connection may be reused."""
        self._count("requests")
        t0 = time.monotonic()
        path = req.target.decode("ascii", "replace")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        found = llm_wire.api_of_path(path)
        api = found[0] if found else ("anthropic" if "anthropic-version" in headers else "openai")
        entry = self._runs.get(run_id) if run_id else None
        rec = CallRecord.start(run_id, entry, api, path, req.method.decode("ascii", "replace"))
        try:
            try:
                keep = await self._serve(conn, reader, writer, req, headers, found, entry, run_id, rec)
            except _Refusal as r:
                if r.counter:
                    self._count(r.counter)
                rec.status, rec.outcome, rec.error = r.status, r.outcome, r.message
                await self._send_error(conn, writer, api, r.status, r.message, close=r.close,
                                       rec=rec)
                keep = not r.close
            except (_ClientGone, asyncio.CancelledError, ConnectionError):
                raise
            except Exception as e:           # a bug here fails one request, not the gateway
                self._count("internal_errors")
                rec.status, rec.outcome = 500, "error"
                rec.error = f"internal error in the LLM gateway: {type(e).__name__}"
                await self._send_error(conn, writer, api, 500, rec.error, close=True, rec=rec)
                keep = False
            return keep
        except _ClientGone:
            rec.outcome = "client_closed"
            raise
        finally:
            rec.latency_s = round(time.monotonic() - t0, 6)
            self._emit(run_id if entry is not None else None, rec)

    async def _serve(self, conn, reader, writer, req, headers, found, entry, run_id, rec):
        cfg = self.config
        if found is None:
            raise _Refusal(404, f"{rec.path} is not served here: the gateway serves "
                                f"{', '.join(llm_wire.PATHS)}", "not_found", "not_found", close=True)
        api, kind = found
        method = rec.method
        if (kind == "models") != (method == "GET") or method not in ("GET", "POST"):
            raise _Refusal(405, f"{method} {rec.path} is not supported "
                                f"(use {'GET' if kind == 'models' else 'POST'})", "not_found",
                           "not_found", close=True)
        if entry is None and not cfg.allow_outside_callers:
            if run_id is None:
                raise _Refusal(403, "the LLM gateway serves agentwatch runs only, and the kernel "
                                    "puts this caller in no run", counter="refused_outside",
                               close=True)
            raise _Refusal(403, f"run {run_id} is not registered with the LLM gateway",
                           counter="refused_unregistered", close=True)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            raise _Refusal(413, f"the request body ({length} bytes) is over the gateway's limit "
                                f"of {self.limits.max_body} bytes", counter="too_large", close=True)
        raw = await self._read_body(conn, reader, writer)
        rec.bytes_in = len(raw)
        rec.keep_request(raw, cfg.keep_bodies)
        if kind == "models":
            await self._send(conn, writer, 200, self._models_body(api, headers), rec=rec)
            rec.status, rec.outcome = 200, "ok"
            return True
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise _Refusal(400, f"the request body is not valid JSON: {str(e)[:120]}",
                           counter="bad_requests") from None
        if not isinstance(body, dict):
            raise _Refusal(400, "the request body must be a JSON object", counter="bad_requests")
        model = body.get("model")
        rec.model = model if isinstance(model, str) else None
        if not isinstance(model, str) or not model:
            raise _Refusal(400, "the request names no model ('model' is required)",
                           counter="bad_requests")
        route = cfg.route(model)
        if route is None or route.upstream.api != api:
            served = sorted(m for m, r in cfg.routes.items() if r.upstream.api == api)
            raise _Refusal(404, f"model {model!r} is not served by this gateway on the {api} API "
                                f"(served: {', '.join(served) or 'none'})", "not_found",
                           "unknown_model")
        rec.upstream, rec.upstream_model = route.upstream.name, route.upstream_model
        stream = body.get("stream") is True
        rec.stream = stream
        if entry is not None:
            self._check_prompt(api, body, entry, rec)
            ledger = self._ledger(run_id)
            if ledger is not None:
                reason = ledger.check()
                if reason:
                    which = {"budget": reason.budget} if hasattr(reason, "budget") else {}
                    rec.findings.append(_finding("resource", BUDGET_RULE, "deny", reason=str(reason),
                                                 **which))
                    raise _Refusal(429, f"run {run_id}'s budget is exhausted: {reason}",
                                   counter="refused_budget")
        else:
            ledger = None
        text_in = llm_wire.request_text(api, body)
        est_in = llm_wire.estimate_tokens(text_in)
        est_out = next((body[k] for k in ("max_tokens", "max_completion_tokens")
                        if isinstance(body.get(k), int) and not isinstance(body.get(k), bool)), 0)
        grant = await self._acquire(run_id if entry is not None else OUTSIDE, est_in, est_out)
        rec.queue_wait_s = round(getattr(grant, "wait_s", 0.0) or 0.0, 6) if grant else 0.0
        client_wants_usage = True
        if stream and api == "openai":
            opts = body.get("stream_options")
            client_wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            if not client_wants_usage:
                body["stream_options"] = dict(opts if isinstance(opts, dict) else {},
                                              include_usage=True)
        body["model"] = route.upstream_model
        try:
            keep = await self._upstream(conn, reader, writer, api, route, body, headers, stream,
                                        client_wants_usage, rec, est_in)
        finally:
            if rec.tokens_in is None:
                rec.tokens_in = 0
            if rec.tokens_out is None:
                rec.tokens_out = 0
            rec.cost_usd = route.cost(rec.tokens_in, rec.tokens_out)
            if grant is not None:
                try:
                    grant.release(rec.tokens_in, rec.tokens_out)
                except Exception:
                    self._count("scheduler_errors")
            if ledger is not None and rec.upstream_called:
                try:
                    ledger.charge(model, rec.tokens_in, rec.tokens_out)
                except Exception:
                    pass
        return keep

    def _check_prompt(self, api, body, entry, rec):
        if entry.prompt is None:
            return
        got = llm_wire.system_prompt(api, body)
        if got is not None and got.strip() == entry.prompt.strip():
            return
        self._count("prompt_mismatch")
        detail = {"expected": entry.prompt_digest,
                  "got": None if got is None else _digest(got),
                  "reason": "the request has no system prompt" if got is None else
                            "the request's system prompt differs from the run's"}
        rec.findings.append(_finding("identity", PROMPT_RULE, entry.prompt_action, **detail))
        if entry.prompt_action == "deny":
            raise _Refusal(403, f"{detail['reason']} (run {entry.run_id}; prompt integrity is "
                                f"enforced: send the run's own system prompt)",
                           counter="refused_prompt")

    def _ledger(self, run_id):
        if self.ledger_for is None:
            return None
        return self.ledger_for(run_id)

    async def _acquire(self, key, est_in, est_out):
        if self.scheduler is None:
            return None
        try:
            return await self.scheduler.acquire(key, est_in, est_out)
        except Exception as e:
            self._count("scheduler_errors")
            raise _Refusal(503, f"the gateway's scheduler could not queue the call: "
                                f"{type(e).__name__}", "refused") from None

    def _models_body(self, api, headers):
        routes = self.config.routes
        if api == "anthropic" or "anthropic-version" in headers:
            data = [{"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
                    for m, r in routes.items() if r.upstream.api == "anthropic"]
            return json.dumps({"data": data, "has_more": False,
                               "first_id": data[0]["id"] if data else None,
                               "last_id": data[-1]["id"] if data else None}).encode()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": r.upstream.name}
                for m, r in routes.items()]
        return json.dumps({"object": "list", "data": data}).encode()

    # -- upstream ------------------------------------------------------------------------
    def _upstream_headers(self, api, route, headers):
        out = {k: headers[k] for k in FORWARD_HEADERS if k in headers}
        out["content-type"] = "application/json"
        out["accept-encoding"] = "identity"      # SSE is read here as it comes
        if api == "anthropic":
            out["x-api-key"] = route.upstream.key
            out.setdefault("anthropic-version", ANTHROPIC_VERSION)
        else:
            out["authorization"] = f"Bearer {route.upstream.key}"
        return out

    async def _upstream(self, conn, reader, writer, api, route, body, headers, stream,
                        client_wants_usage, rec, est_in):
        url = route.upstream.base_url + rec.path.split("?", 1)[0]
        content = json.dumps(body).encode()
        request = self._client.build_request("POST", url, content=content,
                                             headers=self._upstream_headers(api, route, headers))
        up = _UpstreamCall(api, stream, client_wants_usage)
        watch = _ClientWatch(conn, reader)
        call = asyncio.ensure_future(self._call_upstream(conn, writer, request, route, up, rec))
        try:
            keep = await watch.run(call)
        except _ClientGone:
            self._count("client_closed")
            rec.outcome = "client_closed"
            rec.error = "the client closed the connection before the response ended"
            raise
        finally:
            if not call.done():
                call.cancel()
                try:
                    await call
                except (asyncio.CancelledError, Exception):
                    pass
            self._settle_tokens(api, up, rec, est_in)
        return keep

    def _settle_tokens(self, api, up, rec, est_in):
        """tokens from the upstream's usage, else estimated (tokens_counted)."""
        if not rec.upstream_called or up.failed:
            rec.tokens_in, rec.tokens_out = 0, 0
            return
        tin, tout = up.tokens()
        counted = False
        if tin is None:
            tin, counted = est_in, True
        if tout is None:
            tout, counted = llm_wire.estimate_tokens(up.text()), True
        elif up.sse is not None and not up.sse.out_final:
            # a stream cut short: message_start's output count is a start, not the end
            tout, counted = max(tout, llm_wire.estimate_tokens(up.text())), True
        rec.tokens_in, rec.tokens_out, rec.tokens_counted = tin, tout, counted

    async def _call_upstream(self, conn, writer, request, route, up, rec):
        name = route.upstream.name
        try:
            resp = await self._client.send(request, stream=True)
        except httpx.TimeoutException as e:
            up.failed = True
            self._count("upstream_timeouts")
            raise _Refusal(504, f"upstream {name} did not answer in time ({_what_timed_out(e)}, "
                                f"limit {self._timeout_of(e):g}s)", "upstream_timeout",
                           close=False) from None
        except httpx.HTTPError as e:
            up.failed = True
            self._count("upstream_unreachable")
            raise _Refusal(502, f"upstream {name} ({route.upstream.base_url}) cannot be reached: "
                                f"{self._scrub_text(str(e))[:200] or type(e).__name__}",
                           "upstream_unreachable") from None
        rec.upstream_called = True
        try:
            rec.upstream_status = resp.status_code
            ctype = resp.headers.get("content-type", "")
            if up.stream and resp.status_code == 200 and "text/event-stream" in ctype:
                return await self._pump_stream(conn, writer, resp, route, up, rec)
            return await self._pass_body(conn, writer, resp, route, up, rec)
        finally:
            await resp.aclose()

    async def _pass_body(self, conn, writer, resp, route, up, rec):
        parts, size = [], 0
        try:
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > self.limits.max_response:
                    up.failed = True
                    self._count("upstream_errors")
                    raise _Refusal(502, f"upstream {route.upstream.name}'s response is over "
                                        f"{self.limits.max_response} bytes", "upstream_error")
                parts.append(chunk)
        except httpx.TimeoutException as e:
            up.failed = True
            self._count("upstream_timeouts")
            raise _Refusal(504, f"upstream {route.upstream.name} stalled mid-response "
                                f"(limit {self._timeout_of(e):g}s)", "upstream_timeout") from None
        except httpx.HTTPError as e:
            up.failed = True
            self._count("upstream_errors")
            raise _Refusal(502, f"upstream {route.upstream.name} broke off its response: "
                                f"{type(e).__name__}", "upstream_error") from None
        raw = self._scrub(b"".join(parts))
        if 200 <= resp.status_code < 300:
            up.usage, text = llm_wire.usage_of_json(up.api, raw)
            up.text_parts.append(text)
        else:
            up.failed = True                 # an upstream's refusal uses no tokens
            self._count("upstream_errors")
        rec.status = resp.status_code
        rec.outcome = "ok" if 200 <= resp.status_code < 300 else "upstream_status"
        rec.keep_response(raw, self.config.keep_bodies)
        headers = [(k, resp.headers[k]) for k in RETURN_HEADERS if k in resp.headers]
        await self._send(conn, writer, resp.status_code, raw, headers=headers, rec=rec)
        return True

    async def _pump_stream(self, conn, writer, resp, route, up, rec):
        self._count("streams")
        sse = llm_wire.SseReader(up.api)
        up.sse = sse
        headers = [("content-type", resp.headers.get("content-type", "text/event-stream")),
                   ("cache-control", "no-cache")]
        headers += [(k, resp.headers[k]) for k in ("x-request-id", "request-id") if k in resp.headers]
        rec.status, rec.outcome = 200, "ok"
        await self._write(conn, writer, h11.Response(status_code=200, headers=headers))
        kept = bytearray()
        try:
            async for chunk in resp.aiter_bytes():
                out = []
                for raw, obj in sse.feed(chunk):
                    if not up.client_wants_usage and sse.is_usage_only(obj):
                        continue
                    out.append(raw)
                if out:
                    data = self._scrub(b"".join(out))
                    await self._write(conn, writer, h11.Data(data=data))
                    rec.bytes_out += len(data)
                    if len(kept) < self.config.keep_bodies:
                        kept += data[:self.config.keep_bodies - len(kept)]
            tail = sse.rest()
            if tail:
                data = self._scrub(tail)
                await self._write(conn, writer, h11.Data(data=data))
                rec.bytes_out += len(data)
        except httpx.TimeoutException as e:
            self._count("upstream_timeouts")
            rec.status, rec.outcome = 504, "upstream_timeout"
            rec.error = (f"upstream {route.upstream.name} went silent mid-stream "
                         f"(limit {self._timeout_of(e):g}s)")
            await self._end_stream_with_error(conn, writer, up.api, 504, rec)
            return False
        except httpx.HTTPError as e:
            self._count("upstream_errors")
            rec.status, rec.outcome = 502, "upstream_error"
            rec.error = f"upstream {route.upstream.name} broke off its stream: {type(e).__name__}"
            await self._end_stream_with_error(conn, writer, up.api, 502, rec)
            return False
        finally:
            if self.config.keep_bodies:
                rec.keep_response(bytes(kept), self.config.keep_bodies, rec.bytes_out)
        await self._write(conn, writer, h11.EndOfMessage())
        return True

    async def _end_stream_with_error(self, conn, writer, api, status, rec):
        data = llm_wire.sse_error(api, status, rec.error)
        await self._write(conn, writer, h11.Data(data=data))
        rec.bytes_out += len(data)
        await self._write(conn, writer, h11.EndOfMessage())

    def _timeout_of(self, e):
        if isinstance(e, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return self.limits.connect_timeout
        return self.limits.read_timeout

    def _scrub(self, data):
        for k in self._keys:
            if k in data:
                data = data.replace(k, b"[key withheld by agentwatch]")
        return data

    def _scrub_text(self, text):
        return self._scrub(text.encode("utf-8", "replace")).decode("utf-8", "replace")

    # -- responses -----------------------------------------------------------------------
    async def _write(self, conn, writer, event):
        try:
            data = conn.send(event)
        except h11.LocalProtocolError:
            raise _ClientGone() from None
        if data:
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, RuntimeError):
                raise _ClientGone() from None

    async def _send(self, conn, writer, status, body, ctype="application/json", headers=(),
                    close=False, rec=None):
        hdrs = [(k, v) for k, v in headers if k != "content-type"]
        hdrs += [("content-type", ctype), ("content-length", str(len(body)))]
        if close:
            hdrs.append(("connection", "close"))
        await self._write(conn, writer, h11.Response(status_code=status, headers=hdrs))
        await self._write(conn, writer, h11.Data(data=body))
        await self._write(conn, writer, h11.EndOfMessage())
        if rec is not None:
            rec.bytes_out += len(body)

    async def _send_error(self, conn, writer, api, status, message, close=False, rec=None):
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return                       # a response is on its way already
        # (IDLE: a head that never came whole; h11 lets a server answer it)
        body = llm_wire.error_body(api, status, self._scrub_text(message))
        await self._send(conn, writer, status, body, close=close or conn.their_state is h11.ERROR,
                         rec=rec)

    # -- records ------------------------------------------------------------------------
    def _emit(self, run_id, rec):
        try:
            self.on_call(run_id, rec.as_dict())
        except Exception:
            self._count("on_call_errors")


class _UpstreamCall:
    """What one upstream call has said so far (for the tokens)."""

    def __init__(self, api, stream, client_wants_usage):
        self.api, self.stream, self.client_wants_usage = api, stream, client_wants_usage
        self.usage = None
        self.sse = None
        self.text_parts = []
        self.failed = False

    def tokens(self):
        if self.sse is not None:
            return self.sse.tokens_in, self.sse.tokens_out
        return self.usage if self.usage is not None else (None, None)

    def text(self):
        return self.sse.output_text() if self.sse is not None else "".join(self.text_parts)


class _ClientWatch:
    """Runs an upstream call while watching the client's side: the client
    closing its connection cancels the call (and so the upstream request).
    Bytes the client sends meanwhile (a pipelined request) are kept for h11."""

    def __init__(self, conn, reader):
        self.conn, self.reader = conn, reader

    async def run(self, call):
        while True:
            watch = asyncio.ensure_future(self.reader.read(READ_CHUNK))
            try:
                done, _ = await asyncio.wait({call, watch}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                watch.cancel()
                raise
            if call in done:
                watch.cancel()
                try:
                    await watch
                except (asyncio.CancelledError, Exception):
                    pass
                return call.result()
            try:
                data = watch.result()
            except (ConnectionError, OSError):
                data = b""
            if not data:
                raise _ClientGone()
            self.conn.receive_data(data)


def _what_timed_out(e):
    if isinstance(e, httpx.ConnectTimeout):
        return "connect timed out"
    if isinstance(e, httpx.PoolTimeout):
        return "no free upstream connection"
    return "no response"


def _finding(category, rule, action, **detail):
    return {"category": category, "rule": rule, "action": action, "detail": detail}


async def _close_writer(writer, reader=None, linger_s=1.0, linger_bytes=1 << 20):
    """Close a client's connection. With reader: shut our side first and
    read away what the client still sends for a moment (a body refused
    unread), so the kernel does not answer it with a reset that would
    destroy our response before the client reads it."""
    if reader is not None and not writer.is_closing():
        try:
            if writer.can_write_eof():
                writer.write_eof()
            deadline = time.monotonic() + linger_s
            left = linger_bytes
            while left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                data = await asyncio.wait_for(reader.read(READ_CHUNK), wait)
                if not data:
                    break
                left -= len(data)
        except (Exception, asyncio.CancelledError):
            pass
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1)
    except (Exception, asyncio.CancelledError):
        pass


@dataclass
class CallRecord:
    """One request, as on_call gets it (as_dict()):

    ts (wall clock at the request head), run_id, agent, api ("openai" |
    "anthropic"), path, method, model (asked), upstream, upstream_model,
    stream, status (what the client got), upstream_status, outcome ("ok",
    "refused", "not_found", "upstream_status", "upstream_unreachable",
    "upstream_timeout", "upstream_error", "client_closed"), error (the
    message the client got, or why it got nothing more), tokens_in,
    tokens_out, tokens_counted (true: estimated from the text, the usage
    was missing), cost_usd (from the model's prices; None without),
    queue_wait_s, latency_s, bytes_in (request body), bytes_out (response
    body), findings (a list of {category, rule, action, detail}:
    ``identity`` for a system prompt that is not the run's, ``resource`` for
    a budget refusal), and request_body / response_body (text, at most
    keep_bodies bytes each, with *_truncated) when keep_bodies is set."""
    ts: float
    run_id: str
    agent: str
    api: str
    path: str
    method: str
    model: str = None
    upstream: str = None
    upstream_model: str = None
    stream: bool = False
    status: int = None
    upstream_status: int = None
    outcome: str = None
    error: str = None
    tokens_in: int = None
    tokens_out: int = None
    tokens_counted: bool = False
    cost_usd: float = None
    queue_wait_s: float = 0.0
    latency_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_called: bool = False
    findings: list = None
    bodies: dict = None

    @classmethod
    def start(cls, run_id, entry, api, path, method):
        return cls(time.time(), run_id, entry.agent if entry else None, api, path, method,
                   findings=[], bodies={})

    def keep_request(self, raw, cap):
        if cap:
            self.bodies["request_body"] = raw[:cap].decode("utf-8", "replace")
            self.bodies["request_body_truncated"] = len(raw) > cap

    def keep_response(self, raw, cap, total=None):
        if cap:
            self.bodies["response_body"] = raw[:cap].decode("utf-8", "replace")
            self.bodies["response_body_truncated"] = (len(raw) if total is None else total) > cap

    def as_dict(self):
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("bodies",)}
        d["tokens_in"] = d["tokens_in"] or 0
        d["tokens_out"] = d["tokens_out"] or 0
        d.update(self.bodies or {})
        return d
