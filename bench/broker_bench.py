"""The agent-to-agent broker benchmark (issue #18), in-process, on the
broker's unix socket.

The broker (agentwatch.harness.broker.Broker, its SQLite store in WAL with
synchronous=FULL and group commit, an Ed25519 signer) runs in this process,
on its own thread and loop, as in the daemon; the clients are
bench/broker_load.py processes (a client in this interpreter would share the
broker's GIL). No `agentwatch run`: the caller's identity is faked,
resolve_caller names the run by the client process's pid from SO_PEERCRED
(a table filled as each client process is started), where production calls
core.peer.of_socket once per connection (SO_PEERCRED, a pidfd, the
/proc/PID/cgroup read): that cost is measured by itself, as its own figure.
Runs: "sink" (receives from every agent), bench-0..P-1 (the load
processes, one run each), bench-lat (the latency client); every sender may
message sink and grant and accept tool "noop" (/bin/true, whose spawn here
returns at once without a process); rates far above the load.

1. messages/s: P processes x C connections (8 in all), SendMessage flat out
   (each connection one request at a time) for a few seconds, their windows
   started together; alternating with the same load of agentwatch.Whoami
   (no store write), for scale. On 2 cores (this process and its children
   are pinned to CPUs 0-1 when the machine has more).
2. latency: one client, one kept connection, rounds of SendMessage,
   agentwatch.Whoami and agentwatch.CallTool one at a time (order rotated
   each round): p50 and p99 of SendMessage; CallTool - Whoami (median of the
   paired differences) is the token checks (verify, the store's known /
   revoked / issuer-live checks, holder and scope) and the group-committed
   spend (use count and nonce), and the worker-thread hop of a no-op spawn.
3. tokens.Signer.verify in a loop: µs per token (the Ed25519 check alone
   in the note).
4. core.peer.of_socket on an accepted unix socket: µs per call.
"""
import collections
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

from . import lib
from .gateway_bench import _pct, _pin_two_cores, _thread_cpu_s
from .lib import alternate, compare_figure, log, value_figure

LOAD = os.path.join(lib.BENCH, "broker_load.py")
LOAD_PROCS = 2              # client processes in the messages-per-second part
LOAD_CONC = 4               # connections each
SINK = "sink"
TOOL = "noop"
RATE = 10 ** 6              # peers.rate of every run: far above the load
TARGET_MPS = 5000
TARGET_P50_US = 1000


def _peers(agent):
    from agentwatch.policy.model import Item, Peers, Tool
    if agent == SINK:
        return Peers(receive=(Item("*", None),), rate=RATE)
    return Peers(send=(Item(SINK, None),), receive=(), grant=(Item(TOOL, None),),
                 accept=(Item(TOOL, None),), tools={TOOL: Tool(TOOL, ("/bin/true",))}, rate=RATE)


def _spawn(argv, timeout):
    """A tool that returns at once, without a process: the call's cost is the broker's."""
    return 0, b"", b"", False


class Rig:
    """A Broker on a unix socket in the workspace, with the runs above;
    callers named by their pid (SO_PEERCRED) through self.pids."""

    def __init__(self, ws, procs=LOAD_PROCS, synchronous="FULL"):
        from agentwatch.harness.broker import Broker, BrokerRun, Limits
        from agentwatch.harness.broker_store import Store
        from agentwatch.harness.tokens import Signer
        d = ws.path("broker")
        os.makedirs(d, exist_ok=True)
        self.store = Store(os.path.join(d, "broker.db"), synchronous=synchronous)
        self.signer = Signer.load_or_create(os.path.join(d, "token-key.pem"))
        self.socket_path = os.path.join(d, "broker.sock")
        self.pids = {}                  # client pid -> run id
        self.events = collections.Counter()
        self.runs = {}
        self.loads = [f"bench-{i}" for i in range(procs)]
        try:
            self.broker = Broker(self.store, self.signer, self.socket_path,
                                 limits=Limits(default_rate=RATE), resolve_caller=self._resolve).start()
        except BaseException:
            self.store.close()
            raise
        for agent in [SINK, "bench-lat", *self.loads]:
            run = BrokerRun(run_id=f"run-{agent}", agent=agent, cgroup=f"/agentwatch/run-{agent}",
                            peers=_peers(agent), policed=True, spawn=_spawn, emit=self._emit)
            self.runs[agent] = run
            self.broker.register_run(run)

    def _emit(self, rec):
        self.events[rec.get("op")] += 1

    def _resolve(self, sock):
        import struct

        from agentwatch.core.peer import Peer
        pid, uid, _ = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        run_id = self.pids.get(pid)
        if run_id is None:
            return None                 # refused: not one of the bench's clients
        return Peer(uid=uid, pid=pid, cgroup=f"/agentwatch/{run_id}", run_id=run_id)

    def name(self, pid, agent):
        self.pids[pid] = self.runs[agent].run_id

    def store_thread(self):
        """The store's writer thread (it starts on the first write), or None."""
        for t in threading.enumerate():
            if t.name == "aw-broker-store":
                return t.native_id
        return None

    def close(self):
        self.broker.close()
        self.store.close()


def _tool(*args):
    return [sys.executable, LOAD, *[str(a) for a in args]]


def _readline(p, timeout, what):
    line = p.stdout.readline() if select.select([p.stdout], [], [], timeout)[0] else ""
    if not line:
        err = ""
        if p.poll() is not None:
            err = p.stderr.read()[-1500:]
        raise RuntimeError(f"broker_load {what}: no answer in {timeout} s (exit {p.poll()}): {err}")
    return json.loads(line)


def _load(ws, rig, method, seconds, procs=LOAD_PROCS, conc=LOAD_CONC):
    """procs load processes of conc connections, windows started together:
    {rps (all), per_process, errors, broker_cpu, store_cpu, client_cpu}."""
    ps = []
    try:
        for i in range(procs):
            p = ws.popen(_tool("load", "--socket", rig.socket_path, "-c", conc, "-t", seconds,
                               "--method", method, "--recipient", SINK),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            rig.name(p.pid, rig.loads[i])
            ps.append(p)
        for p in ps:
            _readline(p, 30, "load (connect)")
        tb, ts = rig.broker.thread.native_id, rig.store_thread()
        # no writer yet: it starts on the window's first write, so all its CPU is the window's
        b0, s0 = _thread_cpu_s(tb), _thread_cpu_s(ts) if ts else 0.0
        for p in ps:                    # go
            p.stdin.write("\n")
            p.stdin.flush()
        out = [_readline(p, seconds + 60, "load") for p in ps]
        b1 = _thread_cpu_s(tb)
        ts = ts or rig.store_thread()
        s1 = _thread_cpu_s(ts) if ts else None
    finally:
        for p in ps:
            lib.stop_process(p, timeout=10)
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    f.close()
                except OSError:
                    pass
            ws.procs.remove(p)
            rig.pids.pop(p.pid, None)
    window = max(r["seconds"] for r in out)
    return {"method": method, "rps": round(sum(r["rps"] for r in out), 1),
            "requests": sum(r["requests"] for r in out), "per_process": [r["rps"] for r in out],
            "errors": sum(r["errors"] for r in out),
            "first_error": next((r["first_error"] for r in out if r["first_error"]), None),
            "client_cpu": [r["client_cpu"] for r in out],
            "broker_cpu": None if b0 is None or b1 is None else round((b1 - b0) / window, 3),
            "store_cpu": None if s0 is None or s1 is None else round((s1 - s0) / window, 3),
            "seconds": window}


def _latency(ws, rig, n):
    p = ws.popen(_tool("latency", "--socket", rig.socket_path, "--agent", "bench-lat",
                       "--recipient", SINK, "-n", n),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig.name(p.pid, "bench-lat")
    try:
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            lib.stop_process(p)
        ws.procs.remove(p)
        rig.pids.pop(p.pid, None)
    if p.returncode != 0:
        raise RuntimeError(f"broker_load latency exited {p.returncode}: {err[-1500:]}")
    return lib.last_json_line(out)["us"]


def _verify_cost(signer, n, blocks):
    """µs per tokens.Signer.verify of one token, and per Ed25519 check alone, per block of n."""
    from agentwatch.harness import tokens
    claims = tokens.new_claims(issuer={"run": "run-a", "agent": "a"},
                               holder={"run": "run-b", "agent": "b", "cgroup": "/agentwatch/run-b"},
                               scope={"tool": TOOL, "paths": [], "args": []}, ttl_s=600, uses=1000,
                               now=time.time())
    text = signer.sign(claims)
    assert signer.verify(text) == claims
    signed, _, sig = tokens._split(text)
    key = signer.public_key
    per, raw = [], []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(n):
            signer.verify(text)
        t1 = time.perf_counter()
        for _ in range(n):
            key.verify(sig, signed)
        per.append((t1 - t0) / n * 1e6)
        raw.append((time.perf_counter() - t1) / n * 1e6)
    return per, raw, len(text)


def _peer_cost(path, n, blocks):
    """µs per core.peer.of_socket call on an accepted unix socket, per block
    of n; and the SO_PEERCRED read alone."""
    from agentwatch.core import peer
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    s, _ = ls.accept()
    try:
        got = peer.of_socket(s)
        per, cred = [], []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(n):
                peer.of_socket(s)
            t1 = time.perf_counter()
            for _ in range(n):
                s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            per.append((t1 - t0) / n * 1e6)
            cred.append((time.perf_counter() - t1) / n * 1e6)
        return per, cred, got
    finally:
        for x in (s, c, ls):
            x.close()
        os.unlink(path)


def broker(ctx):
    """The agent-to-agent broker (issue #18), in-process, clients in
    processes of their own; see this module's docstring."""
    s, ws = ctx.size, ctx.ws
    notes = []
    old_mask = _pin_two_cores()
    cpus = len(os.sched_getaffinity(0))
    rig = Rig(ws)
    try:
        # -- 1: messages per second (and Whoami for scale) --
        log(f"broker: messages/s, {s['br_reps']} x (whoami, send), {LOAD_PROCS} processes x "
            f"{LOAD_CONC} connections, {s['br_load_s']} s")
        whoami, send = alternate(lambda: _load(ws, rig, "whoami", s["br_load_s"]),
                                 lambda: _load(ws, rig, "send", s["br_load_s"]), s["br_reps"])
        for r in whoami + send:
            if r["errors"]:
                notes.append(f"load {r['method']}: {r['errors']} error answers, e.g. {r['first_error']}")
        # -- 2: latency of one request at a time --
        log(f"broker: latency, {s['br_reps']} x {s['br_latency_n']} rounds (send, whoami, call)")
        lat = [_latency(ws, rig, s["br_latency_n"]) for _ in range(s["br_reps"])]
        counters = dict(rig.broker.counters)
        events = dict(rig.events)
        stored = rig.store.messages_count()
    finally:
        rig.close()
    # -- 2b: the same latency with synchronous=NORMAL (no fsync per commit:
    # an acknowledged message survives a crash of the daemon, not of the machine)
    try:
        rig = Rig(ws, synchronous="NORMAL")
        try:
            lat_normal = [_latency(ws, rig, s["br_latency_n"]) for _ in range(s["br_reps"])]
        finally:
            rig.close()
    finally:
        if old_mask is not None:
            os.sched_setaffinity(0, old_mask)

    # -- 3, 4: the token signature, and the kernel lookup production makes per connection --
    blocks = max(3, s["br_reps"])
    log(f"broker: tokens.Signer.verify x {s['br_verify_n']}, core.peer.of_socket x {s['br_peer_n']}")
    verify_us, ed_us, token_chars = _verify_cost(rig.signer, s["br_verify_n"], blocks)
    try:
        peer_us, cred_us, peer_got = _peer_cost(ws.path("peer-cost.sock"), s["br_peer_n"], blocks)
    except OSError as e:
        peer_us, cred_us, peer_got = [], [], None
        notes.append(f"core.peer.of_socket failed here: {e}")
    return assemble(s, cpus, whoami, send, lat, verify_us, ed_us, peer_us, cred_us, peer_got, notes,
                    counters=counters, events=events, stored=stored, token_chars=token_chars,
                    lat_normal=lat_normal)


def assemble(s, cpus, whoami, send, lat, verify_us, ed_us, peer_us, cred_us, peer_got, notes,
             counters=None, events=None, stored=None, token_chars=None, lat_normal=None):
    """The benchmark's result document from its measurements (pure)."""
    conns = LOAD_PROCS * LOAD_CONC
    rps = [r["rps"] for r in send]
    m = lib.summarize(rps)
    bcpu = lib.summarize([r["broker_cpu"] for r in send])
    scpu = lib.summarize([r["store_cpu"] for r in send])
    ccpu = lib.summarize([sum(r["client_cpu"]) for r in send])
    cpu_note = []
    if bcpu:
        cpu_note.append(f"the broker's loop thread at {100 * bcpu['median']:.0f}% of a CPU")
    if scpu:
        cpu_note.append(f"the store's writer at {100 * scpu['median']:.0f}%")
    if ccpu:
        cpu_note.append(f"the clients at {100 * ccpu['median']:.0f}% in all")
    mps_fig = value_figure(f"broker: SendMessage/s, {conns} connections in {LOAD_PROCS} processes, "
                           f"{cpus} CPUs", "msg/s", rps, target=f">= {TARGET_MPS:,}/s",
                           met=m is not None and m["median"] >= TARGET_MPS,
                           note=", ".join(cpu_note) or None)
    ratio_fig = compare_figure(f"broker: SendMessage/s vs agentwatch.Whoami/s (no store write), "
                               f"{conns} connections", "msg/s", [r["rps"] for r in whoami], rps, "x",
                               target="report")
    w = lib.summarize([r["rps"] for r in whoami])
    if ratio_fig["result"] is not None:
        ratio_fig["text"] = (f"{ratio_fig['result']['median']:.2f}x [{ratio_fig['result']['min']:.2f}.."
                             f"{ratio_fig['result']['max']:.2f}] of {w['median']:,.0f} Whoami/s")
    kinds = ("send", "whoami", "call")
    allk = {k: [x for r in lat for x in r[k]] for k in kinds}
    p = {k: {q: _pct(allk[k], q) for q in (0.5, 0.9, 0.99)} for k in kinds}
    p50s = [_pct(r["send"], 0.5) for r in lat]
    p99s = [_pct(r["send"], 0.99) for r in lat]
    s50 = lib.summarize(p50s)
    p50_fig = value_figure("broker: SendMessage latency p50, one client, kept connection", "µs", p50s,
                           target=f"<= {TARGET_P50_US / 1000:g} ms",
                           met=s50 is not None and s50["median"] <= TARGET_P50_US,
                           note=f"p90 {p['send'][0.9]:,.0f} µs; {len(allk['send']):,} requests")
    p99_fig = value_figure("broker: SendMessage latency p99", "µs", p99s, target="report")
    normal_figs = []
    if lat_normal:
        n50 = [_pct(r["send"], 0.5) for r in lat_normal]
        sn = lib.summarize(n50)
        normal_figs.append(value_figure(
            "broker: SendMessage latency p50, store synchronous=NORMAL (AGENTWATCH_BROKER_SYNC=normal)",
            "µs", n50, target=f"<= {TARGET_P50_US / 1000:g} ms",
            met=sn is not None and sn["median"] <= TARGET_P50_US,
            note=f"p99 {_pct([x for r in lat_normal for x in r['send']], 0.99):,.0f} µs; no fsync per commit: "
                 "survives a crash of the daemon, not a power loss"))
    tok_fig = compare_figure("broker: token checks and spend (CallTool - Whoami, median of paired "
                             "differences)", "µs", allk["whoami"], allk["call"], "delta", target="report",
                             note=f"p50 CallTool {p['call'][0.5]:,.0f} µs, Whoami {p['whoami'][0.5]:,.0f} µs, "
                                  f"SendMessage {p['send'][0.5]:,.0f} µs; p99 "
                                  f"{p['call'][0.99]:,.0f} / {p['whoami'][0.99]:,.0f} / "
                                  f"{p['send'][0.99]:,.0f} µs")
    figs = [mps_fig, ratio_fig, p50_fig, p99_fig, *normal_figs, tok_fig]
    vs = lib.summarize(verify_us)
    if vs:
        figs.append(value_figure("tokens.Signer.verify (Ed25519), per token", "µs", verify_us,
                                 target="report",
                                 text=f"{vs['median']:.1f} µs [{vs['min']:.1f}..{vs['max']:.1f}]",
                                 note=f"the Ed25519 check alone {lib.summarize(ed_us)['median']:.1f} µs"
                                      + (f"; a {token_chars}-character token" if token_chars else "")))
    ps = lib.summarize(peer_us)
    if ps:
        figs.append(value_figure("core.peer.of_socket, unix socket (per connection in production)", "µs",
                                 peer_us, target="report",
                                 text=f"{ps['median']:.1f} µs per call [{ps['min']:.1f}..{ps['max']:.1f}]",
                                 note=f"the SO_PEERCRED read alone {lib.summarize(cred_us)['median']:.1f} µs"))
    d_send = lib.summarize(lib.paired(allk["whoami"], allk["send"], "delta"))
    if d_send:
        notes.append(f"SendMessage - Whoami (parse, checks, stamp, the group-committed insert and its "
                     f"fsync), median of paired differences: {d_send['median']:+,.0f} µs")
    if peer_got is not None:
        notes.append(f"of_socket named the bench's own socket: uid {peer_got.uid}, pid {peer_got.pid}, "
                     f"cgroup {peer_got.cgroup}, run {peer_got.run_id}")
    if counters:
        notes.append("broker counters: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counters.items()) if v)
                     + (f"; {stored:,} messages stored" if stored is not None else ""))
    return {"params": {"reps": s["br_reps"], "latency_n": s["br_latency_n"], "load_s": s["br_load_s"],
                       "verify_n": s["br_verify_n"], "peer_n": s["br_peer_n"], "procs": LOAD_PROCS,
                       "conc_per_proc": LOAD_CONC, "cpus": cpus, "percentiles_us": p},
            "figures": figs, "notes": notes,
            "trials": {"whoami": whoami, "send": send, "latency": lat, "verify_us": verify_us,
                       "ed25519_us": ed_us, "peer_us": peer_us, "peercred_us": cred_us,
                       "events": events or {}}}
