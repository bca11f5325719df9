"""Semantic termination and trials (issue #20).

1. The cost of termination checks per event: engine.termination.Terminator
   fed a realistic mix of events (exec, its exit, file writes in and out of
   the workspace, reads, forks), in-process: µs per feed() with a policy's
   loop, no_progress and budget conditions against a Terminator with none
   (every run keeps the progress signals `ps` shows), and µs per check()
   (the run loop calls it every 150 ms).
2. The overhead of a trial: `agentwatch trial -n N -- true` against N
   plain `agentwatch run -- true`, one after the other, both on one daemon
   (what a trial adds: its bookkeeping, reading each run's log, the
   statistics, the store).
"""
import os
import subprocess
import time

from . import lib
from .lib import alternate, compare_figure, log, value_figure

MIX = 1000          # events per feed batch


def _events(ws):
    from agentwatch.core.events import ExecEvent, ExitEvent, FileEvent, ForkEvent
    evs = []
    for i in range(MIX // 10):
        argv = ["/usr/bin/make", "test"] if i % 3 else ["/bin/sh", "-c", f"step {i % 7}"]
        evs += [ForkEvent(pid=100 + i, child=200 + i), ExecEvent(pid=200 + i, argv=argv, filename=argv[0]),
                FileEvent(pid=200 + i, op="open", path=f"{ws}/src/f{i % 20}.py", abspath=f"{ws}/src/f{i % 20}.py",
                          access=["write", "truncate"]),
                FileEvent(pid=200 + i, op="open", path="/usr/lib/x.so", abspath="/usr/lib/x.so", access=["read"]),
                FileEvent(pid=200 + i, op="open", path="/etc/passwd", abspath="/etc/passwd", access=["read"]),
                FileEvent(pid=200 + i, op="open", path="/tmp/out.log", abspath="/tmp/out.log",
                          access=["write", "create"]),
                FileEvent(pid=200 + i, op="unlink", path=f"{ws}/tmp{i}", abspath=f"{ws}/tmp{i}"),
                FileEvent(pid=200 + i, op="open", path=f"{ws}/README", abspath=f"{ws}/README", access=["read"]),
                FileEvent(pid=200 + i, op="rename", path=f"{ws}/a", abspath=f"{ws}/a", path2=f"{ws}/b"),
                ExitEvent(pid=200 + i, code=i % 2)]
    return evs


def _feed_us(term, evs, batches):
    t0 = time.perf_counter()
    for b in range(batches):
        now = b * 0.001
        for ev in evs:
            term.feed(ev, now)
    return (time.perf_counter() - t0) / (batches * len(evs)) * 1e9


def feed_cost(ws_dir, batches, reps):
    """(ns per event without rules, with them; ns per check) over reps blocks."""
    from agentwatch.engine.termination import Terminator
    from agentwatch.policy.model import TerminationRules
    os.makedirs(os.path.join(ws_dir, "src"), exist_ok=True)
    evs = _events(ws_dir)
    rules = TerminationRules(no_progress=120.0, loop={"exec": 50, "failing": 50, "workspace": 3},
                             budget={"execs": 10 ** 9, "processes": 10 ** 9, "llm_tokens": 10 ** 9})

    def with_rules():
        return _feed_us(Terminator(rules, ws_dir, {"WORKSPACE": ws_dir}, 0.0), evs, batches)

    def without():
        return _feed_us(Terminator(None, ws_dir, {"WORKSPACE": ws_dir}, 0.0), evs, batches)
    bare, ruled = alternate(without, with_rules, reps)
    term = Terminator(rules, ws_dir, {"WORKSPACE": ws_dir}, 0.0)
    for ev in evs:
        term.feed(ev, 0.0)
    checks = []
    for r in range(reps):
        t0 = time.perf_counter()
        n = 200
        for i in range(n):
            term.check(1.0 + r + i * 0.15)
        checks.append((time.perf_counter() - t0) / n * 1e9)
    return bare, ruled, checks


def _trial_s(ws, n):
    t0 = time.monotonic()
    p = subprocess.run(lib.client_cmd("trial", "-n", str(n), "--daemon", "--", "true"), cwd=ws.root,
                       env=lib.aw_env(ws), capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"agentwatch trial exited {p.returncode}: {p.stderr[-1500:]}")
    return time.monotonic() - t0


def termination(ctx):
    s, ws = ctx.size, ctx.ws
    log(f"termination: Terminator.feed x {s['term_batches']} x {MIX} events, {s['term_reps']} reps")
    bare, ruled, checks = feed_cost(ws.path("term-ws"), s["term_batches"], s["term_reps"])
    n = s["trial_n"]
    log(f"termination: trial -n {n} -- true vs {n} runs, {s['term_reps']} reps, on a daemon")
    d = lib.Daemon(ws)
    try:
        d.run(["true"])                               # untimed warm-up

        def plain():
            return sum(d.run(["true"]) for _ in range(n))
        runs, trials = alternate(plain, lambda: _trial_s(ws, n), s["term_reps"])
    finally:
        d.close()
    return assemble(bare, ruled, checks, runs, trials, n)


def assemble(bare, ruled, checks, runs, trials, n):
    """The benchmark's figures from its measurements (pure)."""
    figs = [
        compare_figure("termination: Terminator.feed per event, a policy's loop, no_progress and budget "
                       "conditions vs none (the signals every run keeps for ps)", "ns", bare, ruled, "delta",
                       target="report"),
        value_figure("termination: Terminator.feed per event, with the conditions", "ns", ruled, target="report"),
        value_figure("termination: Terminator.check, every 150 ms in the run loop", "ns", checks,
                     target="report"),
        compare_figure(f"trial: `agentwatch trial -n {n} -- true` vs {n} `agentwatch run --daemon -- true` "
                       "one after the other, on one daemon", "s", runs, trials, "ratio", target="report"),
    ]
    per = lib.summarize([(t - r) / n for r, t in zip(runs, trials)])
    notes = [f"trial: {per['median'] * 1000:+.0f} ms a run (median)"] if per else []
    return {"figures": figs, "notes": notes, "trials": {"feed_bare_us": bare, "feed_rules_us": ruled,
                                                        "check_us": checks, "runs_s": runs, "trial_s": trials}}
