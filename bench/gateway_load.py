#!/usr/bin/env python3
"""The gateway benchmark's processes (bench/gateway_bench.py), loopback only,
standard library only, each printing one JSON line (the upstream: its port):

    gateway_load.py upstream [--latency S] [--tokens-in N] [--tokens-out N]
        a fake OpenAI upstream: any POST is answered a fixed chat completion
        with usage, after S seconds, on a kept-alive connection (asyncio).
    gateway_load.py latency --direct PORT --gateway PORT -n N
        one kept-alive connection to each, N requests to each, in turn
        (direct, gateway; gateway, direct; ...): every request's time (µs).
    gateway_load.py load --port PORT -c C -t S [--runs K]
        C kept-alive connections flat out for S seconds (asyncio); with
        --runs, connection i binds a source port p with p % K == i % K (the
        benchmark names a caller's run by its source port), and the
        responses' tokens are totalled per run.

Separate processes: the gateway runs in the benchmark's, and a client or an
upstream in the same interpreter would share its GIL."""
import argparse
import asyncio
import json
import random
import socket
import sys
import time

MODEL = "gpt-bench"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}],
                   "max_tokens": 16}).encode()


def request(port):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer sk-agentwatch-bench-dummy\r\n"
            b"Content-Length: %d\r\n\r\n" % (port, len(BODY))) + BODY


def content_length(head):
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v)
    return 0


# -- the fake upstream -----------------------------------------------------------

def upstream(args):
    usage = {"prompt_tokens": args.tokens_in, "completion_tokens": args.tokens_out,
             "total_tokens": args.tokens_in + args.tokens_out}
    body = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion", "model": MODEL,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}], "usage": usage}).encode()
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(body)) + body
    latency = args.latency

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = content_length(head)
                if n:
                    await reader.readexactly(n)
                if latency:
                    await asyncio.sleep(latency)
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# -- latency: one request at a time, direct and through the gateway in turn ----------

class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.req = request(port)
        self.buf = b""

    def call(self):
        t0 = time.perf_counter_ns()
        self.sock.sendall(self.req)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"answer {head[:200]!r}")
        n = content_length(head)
        self.buf = rest
        while len(self.buf) < n:
            self._more()
        self.buf = self.buf[n:]
        return (time.perf_counter_ns() - t0) / 1000

    def _more(self):
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("connection closed")
        self.buf += data


def latency(args):
    sides = {"direct": Conn(args.direct), "gateway": Conn(args.gateway)}
    for c in sides.values():         # warm: the gateway's upstream connection, caches
        for _ in range(args.warmup):
            c.call()
    out = {"direct": [], "gateway": []}
    for i in range(args.n):
        order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
        for side in order:
            out[side].append(round(sides[side].call(), 1))
    print(json.dumps({"n": args.n, "us": out}), flush=True)


# -- load: many connections flat out --------------------------------------------------

def _bound_socket(run, runs):
    """A TCP socket bound to a source port p with p % runs == run."""
    for _ in range(200):
        p = random.randrange(20000, 60000)
        p += (run - p) % runs
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return s
        except OSError:
            s.close()
    raise RuntimeError("no free source port")


async def _client(i, args, counts, tokens, state):
    run = i % args.runs if args.runs else 0
    if args.runs:
        s = _bound_socket(run, args.runs)
        s.setblocking(False)
        await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", args.port))
        reader, writer = await asyncio.open_connection(sock=s)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = request(args.port)
    state["connected"] += 1
    await state["go"].wait()
    while not state["stop"]:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(content_length(head))
        if not head.startswith(b"HTTP/1.1 200"):
            state["errors"] += 1
            continue
        if state["stop"]:             # answered after the window: not counted
            break
        counts[run] += 1
        if args.runs:
            u = json.loads(body).get("usage") or {}
            tokens[run] += u.get("prompt_tokens", 0) + u.get("completion_tokens", 0)
    writer.close()


async def _load(args):
    k = args.runs or 1
    counts, tokens = [0] * k, [0] * k
    state = {"connected": 0, "stop": False, "errors": 0, "go": asyncio.Event()}
    tasks = [asyncio.ensure_future(_client(i, args, counts, tokens, state)) for i in range(args.c)]
    while state["connected"] < args.c:
        done = [t for t in tasks if t.done() and t.exception()]
        if done:
            raise done[0].exception()
        await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    state["go"].set()
    await asyncio.sleep(args.t)
    state["stop"] = True
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        if not t.done():
            t.cancel()
    n = sum(counts)
    print(json.dumps({"c": args.c, "seconds": round(elapsed, 3), "requests": n,
                      "rps": round(n / elapsed, 1), "per_run": counts, "tokens": tokens,
                      "errors": state["errors"], "client_cpu": round(cpu / elapsed, 3)}), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    u = sub.add_parser("upstream")
    u.add_argument("--latency", type=float, default=0.0)
    u.add_argument("--tokens-in", type=int, default=12)
    u.add_argument("--tokens-out", type=int, default=4)
    lat = sub.add_parser("latency")
    lat.add_argument("--direct", type=int, required=True)
    lat.add_argument("--gateway", type=int, required=True)
    lat.add_argument("-n", type=int, default=1000)
    lat.add_argument("--warmup", type=int, default=20)
    ld = sub.add_parser("load")
    ld.add_argument("--port", type=int, required=True)
    ld.add_argument("-c", type=int, default=32)
    ld.add_argument("-t", type=float, default=3.0)
    ld.add_argument("--runs", type=int, default=0)
    args = ap.parse_args(argv)
    if args.mode == "upstream":
        upstream(args)
    elif args.mode == "latency":
        latency(args)
    else:
        asyncio.run(_load(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
