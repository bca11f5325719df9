#!/usr/bin/env python3
"""The broker benchmark's client processes (bench/broker_bench.py), on the
broker's unix socket, standard library only, each printing JSON lines:

    broker_load.py load --socket PATH -c C -t S [--method send|whoami] [--recipient NAME]
        C connections (asyncio), one JSON-RPC request at a time each: once
        all are connected it prints {"ready": true} and waits for a line on
        stdin (the benchmark starts every load process's window at once),
        then sends flat out for S seconds and prints the counts.
    broker_load.py latency --socket PATH --agent NAME -n N [--recipient NAME]
        one kept connection, N rounds of SendMessage, agentwatch.Whoami and
        agentwatch.CallTool (a token minted for this agent on the same
        connection, outside the timing), one request at a time, the order
        of the three rotated each round: every request's time (µs).

Who the caller is comes from the kernel (the benchmark names the run by
this process's pid, SO_PEERCRED), never from the request. Separate
processes: the broker runs in the benchmark's, and a client in the same
interpreter would share its GIL."""
import argparse
import asyncio
import json
import os
import socket
import sys
import time

TOOL = "noop"


def send_line(rid, message_id, recipient):
    """One SendMessage request (a text part and a fact), as a line."""
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": "SendMessage",
                       "params": {"recipient": recipient,
                                  "message": {"messageId": message_id, "role": "ROLE_USER",
                                              "parts": [{"text": "please review change 42"},
                                                        {"data": {"ticket": 42, "ok": True},
                                                         "metadata": {"tag": "fact"}}]}}},
                      separators=(",", ":")).encode() + b"\n"


def call_line(rid, method, params):
    return json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params},
                      separators=(",", ":")).encode() + b"\n"


def is_result(line):
    """A JSON-RPC success answer (cheap: the broker writes compact JSON)."""
    return b'"result":' in line and b'"error":{' not in line


# -- load: many connections flat out ----------------------------------------------------

async def _client(i, args, state):
    reader, writer = await asyncio.open_unix_connection(args.socket, limit=1 << 22)
    prefix = f"m{os.getpid()}-{i}-{time.monotonic_ns()}-"
    whoami = call_line(0, "agentwatch.Whoami", {})
    state["connected"] += 1
    await state["go"].wait()
    n = 0
    while not state["stop"]:
        n += 1
        writer.write(send_line(n, prefix + str(n), args.recipient) if args.method == "send" else whoami)
        line = await reader.readline()
        if not line:
            raise RuntimeError("the broker closed the connection")
        if not is_result(line):
            state["errors"] += 1
            if state["first_error"] is None:
                state["first_error"] = line[:300].decode(errors="replace")
            continue
        if state["stop"]:             # answered after the window: not counted
            break
        state["counts"][i] += 1
    writer.close()


async def _load(args):
    state = {"connected": 0, "stop": False, "errors": 0, "first_error": None,
             "counts": [0] * args.c, "go": asyncio.Event()}
    tasks = [asyncio.ensure_future(_client(i, args, state)) for i in range(args.c)]
    while state["connected"] < args.c:
        done = [t for t in tasks if t.done() and t.exception()]
        if done:
            raise done[0].exception()
        await asyncio.sleep(0.002)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    if not args.no_wait:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
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
        elif t.exception() and state["first_error"] is None:
            state["first_error"] = repr(t.exception())
    n = sum(state["counts"])
    print(json.dumps({"c": args.c, "method": args.method, "seconds": round(elapsed, 3), "requests": n,
                      "rps": round(n / elapsed, 1), "per_connection": state["counts"],
                      "errors": state["errors"], "first_error": state["first_error"],
                      "client_cpu": round(cpu / elapsed, 3)}), flush=True)


# -- latency: one connection, one request at a time --------------------------------------

class Conn:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""
        self.n = 0

    def call(self, line):
        """Send one request line; (µs to its answer, the answer line)."""
        t0 = time.perf_counter_ns()
        self.sock.sendall(line)
        while b"\n" not in self.buf:
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("the broker closed the connection")
            self.buf += data
        answer, _, self.buf = self.buf.partition(b"\n")
        return (time.perf_counter_ns() - t0) / 1000, answer

    def rpc(self, method, params):
        self.n += 1
        _, answer = self.call(call_line(self.n, method, params))
        out = json.loads(answer)
        if "error" in out:
            raise RuntimeError(f"{method}: {out['error']}")
        return out["result"]


def latency(args):
    c = Conn(args.socket)
    prefix = f"l{os.getpid()}-{time.monotonic_ns()}-"
    token, left, nonce = None, 0, [0]

    def mint():
        return c.rpc("agentwatch.MintToken", {"holder": args.agent, "scope": {"tool": TOOL},
                                              "ttlSeconds": 600, "uses": args.uses})["token"]

    def line(kind):
        c.n += 1
        if kind == "send":
            return send_line(c.n, prefix + str(c.n), args.recipient)
        if kind == "whoami":
            return call_line(c.n, "agentwatch.Whoami", {})
        nonce[0] += 1
        return call_line(c.n, "agentwatch.CallTool", {"token": token, "args": [],
                                                       "nonce": f"{prefix}nonce-{nonce[0]:08d}"})
    kinds = ("send", "whoami", "call")
    out = {k: [] for k in kinds}
    for i in range(args.warmup + args.n):
        if left == 0:                 # a fresh token, outside the timing
            token, left = mint(), args.uses
        order = kinds[i % 3:] + kinds[:i % 3]
        for kind in order:
            us, answer = c.call(line(kind))
            if not is_result(answer):
                raise RuntimeError(f"{kind}: {answer[:300]!r}")
            if i >= args.warmup:
                out[kind].append(round(us, 1))
        left -= 1
    print(json.dumps({"n": args.n, "us": out}), flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    ld = sub.add_parser("load")
    ld.add_argument("--socket", required=True)
    ld.add_argument("-c", type=int, default=4)
    ld.add_argument("-t", type=float, default=3.0)
    ld.add_argument("--method", choices=("send", "whoami"), default="send")
    ld.add_argument("--recipient", default="sink")
    ld.add_argument("--no-wait", action="store_true", help="start at once (not on a line on stdin)")
    lat = sub.add_parser("latency")
    lat.add_argument("--socket", required=True)
    lat.add_argument("--agent", required=True, help="this run's agent name (the token's holder)")
    lat.add_argument("--recipient", default="sink")
    lat.add_argument("-n", type=int, default=1000)
    lat.add_argument("--warmup", type=int, default=20)
    lat.add_argument("--uses", type=int, default=1000, help="uses per token (at most 1000)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.mode == "latency":
        latency(args)
    else:
        asyncio.run(_load(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
