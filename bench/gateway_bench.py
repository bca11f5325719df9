"""The LLM gateway benchmark (issue #17), in-process, loopback only.

The gateway (agentwatch.harness.gateway.Gateway) runs in this process, on
its own thread and loop, as in the daemon; the fake upstream and the
clients are bench/gateway_load.py processes (a client or an upstream in
this interpreter would share the gateway's GIL). No `agentwatch run`: the
caller's identity is faked, resolve_caller names the run by the client's
source port (port % runs; the load client binds ports to match), where
production calls core.peer.of_socket once per connection (one netlink
sock_diag request): that cost is measured by itself, as its own figure.

1. added latency: one client, one kept-alive connection to the upstream
   and one to the gateway, requests in turn (direct, gateway; gateway,
   direct; ...), a small non-streamed chat completion with usage, the
   upstream answering at once; p50/p90 of each side and the median of the
   paired differences.
2. requests per second: 32 kept-alive connections flat out for a few
   seconds, through the gateway (4 runs of weight 100, the daemon's
   default Scheduler()) and direct (for scale: the client and upstream are
   not the limit), alternating; on 2 cores (this process and its children
   are pinned to CPUs 0-1 when the machine has more).
3. fairness: 4 runs of weight 100, 4 connections each, saturating
   Scheduler(max_concurrent=2), the upstream answering after 5 ms with
   fixed token counts; Jain's index over the tokens each run got in the
   window. Then 3 runs of weights 100:200:400 (1:2:4): token shares vs
   1/7, 2/7, 4/7 (report only).
4. core.peer.of_socket on an accepted loopback TCP socket: µs per call.
"""
import json
import os
import select
import subprocess
import sys
import time

from . import lib
from .lib import alternate, compare_figure, log, value_figure

LOAD = os.path.join(lib.BENCH, "gateway_load.py")
KEY_ENV = "AW_BENCH_UPSTREAM_KEY"
LOAD_CONC = 32              # connections in the requests-per-second part
FAIR_LATENCY_S = 0.005      # the upstream's answer time in the fairness part
FAIR_TOKENS = (100, 50)     # its usage: prompt, completion tokens
FAIR_CAP = 2                # Scheduler(max_concurrent=...) in the fairness part
FAIR_CONC = 4               # connections per run there
WEIGHTS = (100, 200, 400)   # the 1:2:4 part


def jain(xs):
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n when one has all."""
    xs = [float(x) for x in xs]
    sq = sum(x * x for x in xs)
    return (sum(xs) ** 2) / (len(xs) * sq) if sq else None


def shares(xs):
    total = float(sum(xs))
    return [x / total for x in xs] if total else [0.0] * len(xs)


def config_text(upstream_port):
    return ("upstreams:\n"
            f"  - {{name: fake, api: openai, base_url: 'http://127.0.0.1:{upstream_port}',"
            f" api_key_env: {KEY_ENV}}}\n"
            "models:\n  gpt-bench: {upstream: fake}\n"
            "limits: {max_clients: 256, connect_timeout: 5s, read_timeout: 30s, idle_timeout: 120s}\n")


class Rig:
    """A Gateway in front of one fake upstream, with runs bench-0..k-1 of the
    given weights, callers named by source port % k; tokens per run from
    on_call."""

    def __init__(self, upstream_port, weights, scheduler):
        from agentwatch.harness.gateway import Gateway
        from agentwatch.harness.gateway_config import parse_config
        cfg = parse_config(config_text(upstream_port), "<bench gateway config>",
                           environ={KEY_ENV: "sk-bench-real-upstream-key"})
        self.runs = [f"bench-{i}" for i in range(len(weights))]
        self.tokens = dict.fromkeys(self.runs, 0)
        self.calls = dict.fromkeys(self.runs, 0)
        self.bad = []
        k = len(self.runs)
        self.gw = Gateway(cfg, lambda sock: self.runs[sock.getpeername()[1] % k], self._on_call,
                          scheduler=scheduler).start()
        for run, w in zip(self.runs, weights):
            self.gw.register_run(run, run, weight=w)

    def _on_call(self, run_id, rec):          # rec: CallRecord.as_dict()
        if rec["status"] != 200 or run_id not in self.tokens:
            self.bad.append((run_id, rec["status"], rec["outcome"], rec["error"]))
            return
        self.calls[run_id] += 1
        self.tokens[run_id] += rec["tokens_in"] + rec["tokens_out"]

    def reset(self):
        self.tokens = dict.fromkeys(self.runs, 0)
        self.calls = dict.fromkeys(self.runs, 0)

    @property
    def port(self):
        return self.gw.port

    def close(self):
        self.gw.close()


def _tool(*args):
    return [sys.executable, LOAD, *[str(a) for a in args]]


def _upstream(ws, latency=0.0, tokens=(12, 4), timeout=20):
    p = ws.popen(_tool("upstream", "--latency", latency, "--tokens-in", tokens[0],
                       "--tokens-out", tokens[1]), stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline() if select.select([p.stdout], [], [], timeout)[0] else ""
    try:
        return p, json.loads(line)["port"]
    except (ValueError, KeyError):
        lib.stop_process(p)
        raise RuntimeError(f"fake upstream did not start: {line!r}")


def _run_tool(*args, timeout=300):
    r = subprocess.run(_tool(*args), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"gateway_load {args[0]} exited {r.returncode}: {r.stderr[-1500:]}")
    return lib.last_json_line(r.stdout)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def _thread_cpu_s(tid):
    """CPU seconds (user + system) of one thread of this process."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _peer_cost(n, blocks):
    """µs per core.peer.of_socket call on an accepted loopback TCP socket, per block of n."""
    import socket

    from agentwatch.core import peer
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    try:
        got = peer.of_socket(s)
        local, remote = s.getsockname(), s.getpeername()
        per, diag = [], []
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(n):
                peer.of_socket(s)
            t1 = time.perf_counter()
            for _ in range(n):          # the netlink request alone (pyroute2 encode, send, decode)
                peer._inet_diag(s.family, src=remote, dst=local)
            per.append((t1 - t0) / n * 1e6)
            diag.append((time.perf_counter() - t1) / n * 1e6)
        return per, diag, got
    finally:
        for x in (s, c, ls):
            x.close()


def _pin_two_cores():
    """Pin this thread (and so the gateway's, and the children) to 2 CPUs
    when there are more; returns the old mask, to restore."""
    try:
        old = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    if len(old) <= 2:
        return None
    os.sched_setaffinity(0, sorted(old)[:2])
    return old


def gateway(ctx):
    """The LLM gateway (issue #17) against direct calls to a fake upstream,
    in-process; see this module's docstring."""
    from agentwatch.harness.scheduler import Scheduler
    s, ws = ctx.size, ctx.ws
    notes = []
    old_mask = _pin_two_cores()
    cpus = len(os.sched_getaffinity(0))
    procs = []
    try:
        up0, port0 = _upstream(ws)
        procs.append(up0)
        # -- 1, 2: latency and requests per second, upstream answering at once --
        rig = Rig(port0, [100] * 4, Scheduler())
        try:
            log(f"gateway: latency, {s['gw_reps']} x {s['gw_latency_n']} pairs")
            lat = []
            for _ in range(s["gw_reps"]):
                lat.append(_run_tool("latency", "--direct", port0, "--gateway", rig.port,
                                     "-n", s["gw_latency_n"])["us"])
            gw_cpu = []

            tid = rig.gw.thread.native_id

            def load(port, through):
                c0 = _thread_cpu_s(tid)
                r = _run_tool("load", "--port", port, "-c", LOAD_CONC, "-t", s["gw_load_s"])
                c1 = _thread_cpu_s(tid)
                if through and c0 is not None and c1 is not None:
                    gw_cpu.append((c1 - c0) / r["seconds"])   # the window's: connects are few
                if r["errors"]:
                    notes.append(f"load {'gateway' if through else 'direct'}: {r['errors']} non-200 answers")
                return r
            log(f"gateway: requests/s, {s['gw_reps']} x (direct, gateway), {LOAD_CONC} connections")
            direct, through = alternate(lambda: load(port0, False), lambda: load(rig.port, True),
                                        s["gw_reps"])
            if rig.bad:
                notes.append(f"latency/rps gateway: {len(rig.bad)} calls not 200, e.g. {rig.bad[0]}")
        finally:
            rig.close()

        # -- 3: fairness under contention, upstream answering after 5 ms --
        up5, port5 = _upstream(ws, FAIR_LATENCY_S, FAIR_TOKENS)
        procs.append(up5)

        def fair(weights):
            rig = Rig(port5, weights, Scheduler(max_concurrent=FAIR_CAP))
            try:
                k = len(weights)
                r = _run_tool("load", "--port", rig.port, "-c", FAIR_CONC * k, "-t", s["gw_fair_s"],
                              "--runs", k)
                r["gateway_tokens"] = [rig.tokens[x] for x in rig.runs]
                r["gateway_calls"] = [rig.calls[x] for x in rig.runs]
                if rig.bad:
                    notes.append(f"fairness {weights}: {len(rig.bad)} calls not 200, e.g. {rig.bad[0]}")
                return r
            finally:
                rig.close()
        log(f"gateway: fairness, {s['gw_reps']} x (4 equal runs, 1:2:4)")
        equal, weighted = alternate(lambda: fair([100] * 4), lambda: fair(list(WEIGHTS)), s["gw_reps"])
    finally:
        for p in procs:
            lib.stop_process(p)
        if old_mask is not None:
            os.sched_setaffinity(0, old_mask)

    # -- 4: the kernel lookup production makes per connection --
    log(f"gateway: core.peer.of_socket x {s['gw_peer_n']}")
    try:
        peer_us, diag_us, peer_got = _peer_cost(s["gw_peer_n"], max(3, s["gw_reps"]))
    except OSError as e:
        peer_us, diag_us, peer_got = [], [], None
        notes.append(f"core.peer.of_socket failed here: {e}")

    # -- figures --
    d_all = [x for r in lat for x in r["direct"]]
    g_all = [x for r in lat for x in r["gateway"]]
    p = {side: {q: _pct([x for r in lat for x in r[side]], q) for q in (0.5, 0.9, 0.99)}
         for side in ("direct", "gateway")}
    lat_fig = compare_figure("gateway: added latency per request (median of paired differences)", "µs",
                             d_all, g_all, "delta", target="<= +2 ms p50", limit=2000,
                             note=f"p50 {p['direct'][0.5]:.0f} -> {p['gateway'][0.5]:.0f} µs, "
                                  f"p90 {p['direct'][0.9]:.0f} -> {p['gateway'][0.9]:.0f} µs, "
                                  f"p99 {p['direct'][0.99]:.0f} -> {p['gateway'][0.99]:.0f} µs")
    p90_fig = compare_figure("gateway: latency p90 (per repetition)", "µs",
                             [_pct(r["direct"], 0.9) for r in lat], [_pct(r["gateway"], 0.9) for r in lat],
                             "delta", target="report")
    rps_fig = compare_figure(f"gateway: requests/s, {LOAD_CONC} connections, {cpus} CPUs", "req/s",
                             [r["rps"] for r in direct], [r["rps"] for r in through], "x", target="report")
    g = lib.summarize([r["rps"] for r in through])
    if rps_fig["result"] is not None:
        rps_fig["text"] = (f"{g['median']:,.0f}/s [{g['min']:,.0f}..{g['max']:,.0f}] through the gateway, "
                           f"{rps_fig['result']['median']:.2f}x direct")
    cpu = lib.summarize(gw_cpu)
    if cpu:
        rps_fig["note"] = f"the gateway's thread at {100 * cpu['median']:.0f}% of a CPU"
    js = [jain(r["tokens"]) for r in equal]
    jsum = lib.summarize(js)
    jain_fig = value_figure("gateway: Jain's fairness index, 4 runs of equal weight (tokens)", "", js,
                            target=">= 0.99", met=jsum is not None and jsum["median"] >= 0.99,
                            text=(f"{jsum['median']:.4f} [{jsum['min']:.4f}..{jsum['max']:.4f}]"
                                  if jsum else "-"),
                            note=f"cap {FAIR_CAP}, {FAIR_CONC} connections per run, upstream "
                                 f"{FAIR_LATENCY_S * 1000:g} ms, {sum(FAIR_TOKENS)} tokens a call")
    expect = shares(WEIGHTS)
    got = [shares(r["tokens"]) for r in weighted]
    mean = [sum(x[i] for x in got) / len(got) for i in range(len(WEIGHTS))] if got else []
    dev = [max(abs(a / b - 1) for a, b in zip(x, expect)) * 100 for x in got]
    share_fig = value_figure("gateway: token shares, weights 1:2:4", "%", dev, target="report",
                             text=" / ".join(f"{100 * m:.1f}%" for m in mean)
                             + f" (expected {' / '.join(f'{100 * e:.1f}%' for e in expect)}); "
                               f"worst {max(dev):.1f}% off" if dev else "-")
    psum = lib.summarize(peer_us)
    figs = [lat_fig, p90_fig, rps_fig, jain_fig, share_fig]
    if psum:
        figs.append(value_figure("core.peer.of_socket, loopback TCP (per connection in production)", "µs",
                                 peer_us, target="report",
                                 text=f"{psum['median']:.1f} µs per call [{psum['min']:.1f}..{psum['max']:.1f}]",
                                 note=f"the sock_diag request alone {lib.summarize(diag_us)['median']:.1f} µs"))
    # the client counts the answers inside the window, the gateway every call it made
    gj = lib.summarize([jain(r["gateway_tokens"]) for r in equal])
    notes.append(f"Jain's index from the gateway's own call records (every call, the window's edges "
                 f"too): {gj['median']:.4f}; 1:2:4 shares by the gateway: "
                 + " / ".join(f"{100 * x:.1f}%" for x in shares(
                     [sum(r["gateway_tokens"][i] for r in weighted) for i in range(len(WEIGHTS))])))
    d_rps = lib.summarize([r["rps"] for r in direct])
    notes.append(f"direct, for scale: {d_rps['median']:,.0f} req/s with the client at "
                 f"{100 * lib.summarize([r['client_cpu'] for r in direct])['median']:.0f}% of a CPU "
                 f"(through the gateway: client at "
                 f"{100 * lib.summarize([r['client_cpu'] for r in through])['median']:.0f}%)")
    if peer_got is not None:
        notes.append(f"of_socket named the bench's own socket: uid {peer_got.uid}, cgroup "
                     f"{peer_got.cgroup}, run {peer_got.run_id}")
    return {"params": {"reps": s["gw_reps"], "latency_n": s["gw_latency_n"], "load_s": s["gw_load_s"],
                       "fair_s": s["gw_fair_s"], "peer_n": s["gw_peer_n"], "conc": LOAD_CONC,
                       "cpus": cpus, "fair_cap": FAIR_CAP, "fair_conc_per_run": FAIR_CONC,
                       "fair_latency_s": FAIR_LATENCY_S, "fair_tokens": FAIR_TOKENS,
                       "weights": WEIGHTS, "percentiles_us": p},
            "figures": figs, "notes": notes,
            "trials": {"latency": lat, "direct": direct, "through": through,
                       "equal": equal, "weighted": weighted, "peer_us": peer_us,
                       "inet_diag_us": diag_us}}
