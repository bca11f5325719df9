"""The benchmarks of issue #5 (and guard, of issue #16; gateway, of issue #17, in
bench/gateway_bench.py; broker, of issue #18, in bench/broker_bench.py), one function each. Each takes a Ctx and
returns {"params": ..., "figures": [...], "bpf_programs": ..., "notes": [...]}
(figures from lib.compare_figure / lib.value_figure)."""
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sysconfig
import time

from . import lib
from .broker_bench import broker
from .gateway_bench import gateway
from .memory_bench import memory
from .termination_bench import termination
from .lib import POLICY, STRICT_POLICY, alternate, compare_figure, log, value_figure

# Sizes per profile: tiny is the smoke test's, quick is --quick, full the default.
PROFILES = {
    "tiny": dict(host_reps=1, loop_n=20_000, reps=1, compile_tree="tiny", files=300,
                 storm_n=20_000, burst_n=20_000, burst_trials=1, rates=[20_000], paced_s=0.25,
                 flood_n=30_000, flood_trials=1, cold_reps=1, warm_reps=2, agents=2,
                 guard_reps=1, guard_latency_n=20, guard_bulk_n=2, guard_flood_s=0.5,
                 gw_reps=1, gw_latency_n=50, gw_load_s=0.5, gw_fair_s=0.5, gw_peer_n=200,
                 br_reps=1, br_latency_n=50, br_load_s=0.5, br_verify_n=200, br_peer_n=200,
                 mem_records=3_000, mem_reps=1, mem_window_s=0.3, mem_inval_n=20,
                 term_batches=5, term_reps=1, trial_n=3),
    "quick": dict(host_reps=3, loop_n=1_000_000, reps=3, compile_tree="stdlib", files=20_000,
                  storm_n=300_000, burst_n=300_000, burst_trials=2,
                  rates=[50_000, 100_000, 250_000], paced_s=1.0,
                  flood_n=300_000, flood_trials=3, cold_reps=2, warm_reps=10, agents=10,
                  guard_reps=3, guard_latency_n=300, guard_bulk_n=20, guard_flood_s=3.0,
                  gw_reps=3, gw_latency_n=1000, gw_load_s=3.0, gw_fair_s=3.0, gw_peer_n=2000,
                  br_reps=3, br_latency_n=1000, br_load_s=3.0, br_verify_n=5000, br_peer_n=2000,
                  mem_records=30_000, mem_reps=3, mem_window_s=1.5, mem_inval_n=200,
                  term_batches=50, term_reps=3, trial_n=10),
    "full": dict(host_reps=5, loop_n=2_000_000, reps=7, compile_tree="stdlib+dist", files=20_000,
                 storm_n=1_000_000, burst_n=500_000, burst_trials=3,
                 rates=[25_000, 50_000, 100_000, 150_000, 250_000], paced_s=2.0,
                 flood_n=500_000, flood_trials=100, cold_reps=5, warm_reps=20, agents=10,
                 guard_reps=7, guard_latency_n=1000, guard_bulk_n=50, guard_flood_s=5.0,
                 gw_reps=5, gw_latency_n=3000, gw_load_s=5.0, gw_fair_s=5.0, gw_peer_n=10000,
                 br_reps=5, br_latency_n=3000, br_load_s=5.0, br_verify_n=10000, br_peer_n=10000,
                 mem_records=100_000, mem_reps=5, mem_window_s=3.0, mem_inval_n=250,
                 term_batches=200, term_reps=5, trial_n=20),
}


class Ctx:
    """What every benchmark gets: the workspace, the sizes, and a warm
    runner (one loaded Monitor) started on first use and shared."""

    def __init__(self, ws, profile):
        self.ws = ws
        self.profile = profile
        self.size = PROFILES[profile]
        self._warm = None
        self.warm_close_s = None

    def warm(self):
        if self._warm is None or self._warm.proc.poll() is not None:
            log("loading a shared monitor (warm runner)")
            self._warm = lib.WarmRunner(self.ws)
        return self._warm

    def close(self):
        if self._warm is not None:
            self.warm_close_s = self._warm.close()
            self._warm = None


def _loop_once(exe, n, outfile=None):
    """Run syscall_loop plainly; its {getppid_ns, openclose_ns}."""
    argv = [exe, str(n)] + ([outfile] if outfile else [])
    r = subprocess.run(argv, capture_output=True, text=True, check=True)
    return lib.read_json_file(outfile) if outfile else lib.last_json_line(r.stdout)


def _loop_best(exe, n, best_of=3):
    """The fastest of best_of syscall_loop runs, per loop: a sample that
    other tenants of a shared machine disturbed less."""
    rs = [_loop_once(exe, n) for _ in range(best_of)]
    return {k: min(r[k] for r in rs) for k in ("getppid_ns", "openclose_ns")}


def _wait_programs_gone(ids, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not set(lib.aw_programs()) & set(ids):
            return True
        time.sleep(0.1)
    return False


# -- 1 -------------------------------------------------------------------------------------

def host_tax(ctx):
    """A C loop outside any agent, with agentwatch monitoring an idle agent
    (coding-agent policy) vs with no agentwatch loaded; load and unload
    alternate with the repetitions. Then the same under the strict
    sandboxed-agent policy, whose filesystem.exec kill attaches mmap, close,
    dup2, dup3 and close_range probes too (bpf/mapexec.bpf.c), and with an
    idle `agentwatch daemon` (every sensor group and the mapexec probes
    attached, no run): reported."""
    s, ws = ctx.size, ctx.ws
    ctx.close()             # the baseline is "no agentwatch loaded": not even our shared monitor
    exe = ws.build("syscall_loop")
    foreign, prog_stats, notes = [], {}, []
    info = {}

    def unloaded():
        lib.wait_quiet()        # "no agentwatch loaded": wait (a while) for anyone else's to go
        foreign.append(len(lib.aw_programs()))
        return _loop_best(exe, s["loop_n"])

    def loaded(policy=POLICY):
        return lib.retry_killed(lambda: loaded_once(policy))

    def loaded_once(policy):
        before = set(lib.aw_programs())
        bg = lib.BackgroundRun(ws, ["sleep", "600"], policy=policy)
        ours = []
        try:
            rec = bg.wait_running()
            info.setdefault("tracepoints", {})[os.path.basename(policy)] = \
                (rec.get("identity") or {}).get("tracepoints")
            ours = sorted(set(lib.aw_programs()) - before)
            time.sleep(0.3)
            r = _loop_best(exe, s["loop_n"])
            # an untimed pass with BPF statistics on: what each program costs on this path
            _, st = lib.measure_prog_stats(lambda: _loop_once(exe, s["loop_n"]), ids=set(ours))
            bg.check_alive()              # still monitoring after the measurement?
            prog_stats[os.path.basename(policy)] = st
        finally:
            bg.stop()
        if not _wait_programs_gone(ours):
            notes.append("agentwatch programs still loaded 60 s after the idle run stopped")
        return r

    def daemon_idle():
        before = set(lib.aw_programs())
        d = lib.Daemon(ws)
        ours = []
        try:
            info.setdefault("tracepoints", {})["daemon"] = d.status()["sensors"]["tracepoints"]
            ours = sorted(set(lib.aw_programs()) - before)
            time.sleep(0.3)
            r = _loop_best(exe, s["loop_n"])
            _, prog_stats["daemon"] = lib.measure_prog_stats(lambda: _loop_once(exe, s["loop_n"]),
                                                             ids=set(ours))
        finally:
            d.close()
        if not _wait_programs_gone(ours):
            notes.append("agentwatch programs still loaded 60 s after the daemon stopped")
        return r

    base, mon = alternate(unloaded, loaded, s["host_reps"])
    base2, strict = alternate(unloaded, lambda: loaded(STRICT_POLICY), s["host_reps"])
    base3, idle_daemon = alternate(unloaded, daemon_idle, s["host_reps"])
    if any(foreign):
        notes.append(f"another agentwatch was loaded during {sum(1 for f in foreign if f)} "
                     "baseline sample(s): the baseline is not clean")
    pick = lambda rs, k: [r[k] if r else None for r in rs]   # noqa: E731
    figs = [
        compare_figure("host tax: getppid outside agents", "ns", pick(base, "getppid_ns"),
                       pick(mon, "getppid_ns"), "delta", target="<= +25 ns", limit=25),
        compare_figure("host tax: openat+close outside agents", "ns", pick(base, "openclose_ns"),
                       pick(mon, "openclose_ns"), "delta", target="report"),
        compare_figure("host tax: getppid outside agents, sandboxed-agent", "ns", pick(base2, "getppid_ns"),
                       pick(strict, "getppid_ns"), "delta", target="report"),
        compare_figure("host tax: openat+close outside agents, sandboxed-agent (close probe)", "ns",
                       pick(base2, "openclose_ns"), pick(strict, "openclose_ns"), "delta", target="report"),
        compare_figure("host tax: getppid, idle agentwatch daemon", "ns", pick(base3, "getppid_ns"),
                       pick(idle_daemon, "getppid_ns"), "delta", target="report"),
        compare_figure("host tax: openat+close, idle agentwatch daemon", "ns", pick(base3, "openclose_ns"),
                       pick(idle_daemon, "openclose_ns"), "delta", target="report"),
    ]
    return {"params": {"loop_n": s["loop_n"], "reps": s["host_reps"], "best_of": 3,
                       "policy": "coding-agent, then sandboxed-agent, then an idle daemon",
                       "tracepoints": info.get("tracepoints")},
            "figures": figs, "bpf_programs": prog_stats, "notes": notes}


# -- 2 -------------------------------------------------------------------------------------

def _copy_py_tree(src, dst):
    def ignore(d, names):
        return [n for n in names if n == "__pycache__" or
                (not n.endswith(".py") and not os.path.isdir(os.path.join(d, n)))]
    shutil.copytree(src, dst, ignore=ignore, symlinks=True, ignore_dangling_symlinks=True)


def _compile_tree(ctx):
    """A copy of the system Python's stdlib (and dist-packages) .py files."""
    root = ctx.ws.path("compile")
    py3 = subprocess.run(["/usr/bin/python3", "-c", "import sysconfig;print(sysconfig.get_paths()['stdlib'])"],
                         capture_output=True, text=True)
    stdlib = py3.stdout.strip() or sysconfig.get_paths()["stdlib"]
    if ctx.size["compile_tree"] == "tiny":
        for pkg in ("json", "email"):
            _copy_py_tree(os.path.join(stdlib, pkg), os.path.join(root, pkg))
        return root
    _copy_py_tree(stdlib, os.path.join(root, "stdlib"))
    if ctx.size["compile_tree"] == "stdlib+dist" and os.path.isdir("/usr/lib/python3/dist-packages"):
        _copy_py_tree("/usr/lib/python3/dist-packages", os.path.join(root, "dist-packages"))
    return root


def _small_files_tarball(ctx, n):
    """A tarball of n small files (0.5-4 KiB, 100 a directory), made once."""
    src, tar = ctx.ws.path("files-src"), ctx.ws.path("files.tar")
    rnd = random.Random(5)
    for i in range(n):
        d = os.path.join(src, f"d{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:06d}.txt"), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(512, 4096)))
    subprocess.run(["tar", "cf", tar, "-C", src, "."], check=True)
    shutil.rmtree(src)
    return tar


def _timed(ctx, tag, cmd):
    """One workload's two sides: returns (plain, monitored, runs, status, cpu).
    plain() and monitored() run cmd under bench/csrc/stopwatch ("{I}" in cmd
    becomes a fresh scratch name, removed after) and return the workload's own
    wall seconds; runs collects the warm runner's answers, status the exit
    statuses and cpu the workload's (user_s, sys_s), per side."""
    ws = ctx.ws
    stopwatch = ws.build("stopwatch")
    work = ws.path("work")
    os.makedirs(work, exist_ok=True)
    seq = iter(range(1 << 30))
    runs, status = [], {"plain": set(), "monitored": set()}
    cpu = {"plain": [], "monitored": []}      # (user_s, sys_s) of the workload

    def argv_for():
        i = next(seq)
        out = ws.path(f"{tag}-{i}.json")
        return i, out, [stopwatch, out] + [a.replace("{I}", str(i)) for a in cmd]

    def finish(i, out, side):
        r = lib.read_json_file(out)
        os.unlink(out)
        shutil.rmtree(ws.path(f"{tag}-x{i}"), ignore_errors=True)
        status[side].add(r["status"])
        cpu[side].append((r.get("user_s"), r.get("sys_s")))
        return r["elapsed_ns"] / 1e9

    def plain():
        i, out, argv = argv_for()
        subprocess.run(argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return finish(i, out, "plain")

    def monitored():
        i, out, argv = argv_for()
        r = ctx.warm().run(argv, policy=POLICY, cwd=work)
        runs.append(r)
        lib.drop_run(ws, r["run_id"])
        return finish(i, out, "monitored")
    return plain, monitored, runs, status, cpu


def realistic(ctx):
    """compileall over a copy of the stdlib, and unpack + hash ~20k small
    files, as the agent (coding-agent policy, shared monitor) vs plain; the
    figure is the workload's own time, measured inside the agent."""
    s, ws = ctx.size, ctx.ws
    tree = _compile_tree(ctx)
    tar = _small_files_tarball(ctx, s["files"])
    scratch = ws.path("file-heavy-x{I}")
    workloads = {
        "compile": ["/usr/bin/python3", "-m", "compileall", "-q", "-f", tree],
        # rm first: a retried run (agent killed from outside) must not find a half-made tree
        "file-heavy": ["/bin/sh", "-c",
                       f"rm -rf {scratch} && mkdir {scratch} && tar xf {tar} -C {scratch}"
                       f" && cd {scratch} && find . -type f -print0 | xargs -0 sha256sum > /dev/null"],
    }
    limits = {"compile": (3, "<= 3%"), "file-heavy": (5, "<= 5%")}
    figs, params = [], {"reps": s["reps"], "files": s["files"], "compile_tree": s["compile_tree"],
                        "compile_py_files": sum(len([f for f in fs if f.endswith(".py")])
                                                for _, _, fs in os.walk(tree))}
    notes = []
    for name, cmd in workloads.items():
        plain, monitored, runs, status, cpu = _timed(ctx, name, cmd)
        log(f"realistic/{name}: warm-up")
        plain()
        monitored()
        runs.clear()
        cpu["plain"].clear()
        cpu["monitored"].clear()
        log(f"realistic/{name}: {s['reps']} x (plain, monitored)")
        base, mon = alternate(plain, monitored, s["reps"])
        limit, target = limits[name]
        figs.append(compare_figure(f"agent overhead: {name}", "s", base, mon, "ratio",
                                   target=target, limit=1 + limit / 100))
        events = [r["events"] for r in runs]
        lost = [r["counters"]["lost_events"] + r["counters"]["lost_stash"] for r in runs]
        rate = [r["counters"]["received"] / m for r, m in zip(runs, mon) if m]
        figs.append(value_figure(f"{name}: events logged per run", "", events,
                                 text=f"{int(min(events)) if events else 0}-{int(max(events)) if events else 0} "
                                      f"events, lost {max(lost) if lost else 0} (max), "
                                      f"~{(sorted(rate)[len(rate) // 2] if rate else 0):,.0f} records/s",
                                 target="0 lost", met=not any(lost)))
        med = {side: [lib.summarize([c[j] for c in cpu[side]])["median"] for j in (0, 1)]
               for side in cpu if cpu[side] and cpu[side][0][0] is not None}
        if len(med) == 2:
            notes.append(f"{name}: workload CPU (median) user {med['plain'][0]:.2f} -> "
                         f"{med['monitored'][0]:.2f} s, sys {med['plain'][1]:.2f} -> "
                         f"{med['monitored'][1]:.2f} s (plain -> as the agent)")
        if status["plain"] != status["monitored"]:
            notes.append(f"{name}: exit statuses differ: plain {sorted(status['plain'])}, as the agent "
                         f"{sorted(status['monitored'])} (an agent killed from outside?)")
    return {"params": params, "figures": figs, "notes": notes}


# -- 3 -------------------------------------------------------------------------------------

def storm(ctx):
    """The C loops run as the agent (coding-agent policy, shared monitor) vs plain."""
    s, ws = ctx.size, ctx.ws
    exe = ws.build("syscall_loop")
    n = s["storm_n"]
    out = ws.path("storm.json")
    runs = []

    def plain():
        return _loop_once(exe, n, out)

    def monitored():
        r = ctx.warm().run([exe, str(n), out], policy=POLICY, cwd=ws.root)
        runs.append(r)
        lib.drop_run(ws, r["run_id"])
        if r["exit"] != 0:
            raise RuntimeError(f"syscall_loop as the agent exited {r['exit']}")
        return lib.read_json_file(out)

    base, mon = alternate(plain, monitored, max(s["reps"], 1))
    warm = ctx.warm()
    r, prog_stats = lib.measure_prog_stats(
        lambda: warm.run([exe, str(n), out], policy=POLICY, cwd=ws.root), ids=set(warm.prog_ids))
    lib.drop_run(ws, r["run_id"])
    pick = lambda rs, k: [r[k] for r in rs]   # noqa: E731
    lost = [r["counters"]["lost_events"] + r["counters"]["lost_stash"] for r in runs]
    sub = [r["counters"]["submitted"] + r["counters"]["lost_events"] for r in runs]
    figs = [
        compare_figure("storm: getppid as the agent", "ns", pick(base, "getppid_ns"),
                       pick(mon, "getppid_ns"), "x", target="report; <= 2x", limit=2),
        compare_figure("storm: openat+close as the agent", "ns", pick(base, "openclose_ns"),
                       pick(mon, "openclose_ns"), "x", target="report; <= 2x", limit=2),
        value_figure("storm: events lost (ring buffer full)", "", lost,
                     text=f"{min(lost)}-{max(lost)} of ~{max(sub)} records" if lost else "-"),
    ]
    return {"params": {"n": n, "reps": s["reps"], "policy": "coding-agent"}, "figures": figs,
            "bpf_programs": prog_stats,
            "samples": {"plain": base, "monitored": mon}}


# -- 4 -------------------------------------------------------------------------------------

BURST_PATHS = ("/dev/null", "/dev/zero")
# the two kinds of flood: the same call over and over (folded in the kernel
# into one record and a count), and two calls in turn (a record each)
BURST_MODES = {"repeated": [], "distinct": ["-a", BURST_PATHS[1]]}


def _burst_accounting(events, n):
    """From one burst run's log: what was logged and whether the drop
    accounting adds up (see the docstring of throughput())."""
    end = lib.lifecycle(events, "end")["detail"]
    start = lib.lifecycle(events, "start")
    mine = [e for e in events if e["kind"] == "file" and e.get("path") in BURST_PATHS]
    opens = sum(e.get("repeat") or 1 for e in mine)            # calls the log accounts for
    repeat_lines = sum(1 for e in mine if e.get("repeat"))
    other = [e for e in events if e["kind"] not in ("lifecycle", "violation")
             and not (e["kind"] == "file" and e.get("path") in BURST_PATHS)]
    other_records = sum(2 if e["kind"] == "exec" else 1 for e in other)   # exec: entry + return
    produced = n + other_records            # calls, as records if nothing were folded
    lost = end["lost_events"] + end["lost_stash"] + end.get("unmatched_repeats", 0)
    # records written = one per call not folded + one per repeat count
    kernel = (end["records_submitted"] - repeat_lines + end.get("repeated", 0) + end["lost_events"]
              == produced)
    return {
        "n": n, "logged_opens": opens, "logged_lines": len(mine), "repeat_lines": repeat_lines,
        "logged_events": opens + len(other),
        "lost_reported": lost, "lost_actual": produced - (opens + other_records),
        "records_submitted": end["records_submitted"], "records_received": end["records_received"],
        "kernel_consistent": kernel,
        "userspace_lossless": end["records_received"] == end["records_submitted"],
        "exact": (lost == produced - (opens + other_records) and kernel
                  and end["records_received"] == end["records_submitted"]),
        "log_span_s": lib.lifecycle(events, "end")["ts"] - start["ts"],
    }


def _throughput_mode(ctx, burst, mode):
    s, ws = ctx.size, ctx.ws
    n = s["burst_n"]
    extra = BURST_MODES[mode]
    trials = []
    for t in range(s["burst_trials"]):
        log(f"throughput ({mode} calls): flat-out burst {t + 1}/{s['burst_trials']} ({n} opens)")
        r = lib.run_cli(ws, [burst, "-n", str(n)] + extra, policy=POLICY)
        if r["exit"] != 0 or not r["run_id"]:
            raise RuntimeError(f"burst run failed ({r['exit']}): {r['stderr'][-1500:]}")
        acc = _burst_accounting(lib.run_events(ws, r["run_id"]), n)
        acc["producer_rate"] = lib.last_json_line(r["stdout"])["rate"]
        acc["log_rate"] = acc["logged_events"] / acc["log_span_s"] if acc["log_span_s"] > 0 else None
        acc["cli_wall_s"] = r["wall_s"]
        trials.append(acc)
        lib.drop_run(ws, r["run_id"])
    sweep = []
    out = ws.path("paced.json")
    warm = ctx.warm()
    for rate in s["rates"]:
        k = max(int(rate * s["paced_s"]), 1000)
        log(f"throughput ({mode} calls): paced {rate:,}/s x {k} opens")
        r = warm.run([burst, "-n", str(k), "-r", str(rate), "-o", out] + extra, policy=POLICY, cwd=ws.root)
        achieved = lib.read_json_file(out)["rate"]
        lib.drop_run(ws, r["run_id"])
        c = r["counters"]
        lost = c["lost_events"] + c["lost_stash"]
        sweep.append({"rate": rate, "n": k, "achieved": achieved, "lost": lost,
                      "received": c["received"], "submitted": c["submitted"],
                      "lossless": lost == 0 and c["received"] == c["submitted"]
                      and achieved >= 0.9 * rate})
    return trials, sweep


def throughput(ctx):
    """Event throughput and loss, for a flood of the same call (which the
    kernel folds into one record and a count) and of two calls in turn
    (a record each: what the monitor's per-record cost allows).
    (a) Flat out: `agentwatch run --policy coding-agent -- burst -n N` (its own
        process, so the end event's counters are the run's). Drop accounting
        is exact when the lost calls (lost_events + lost_stash +
        unmatched_repeats) == produced - logged, where produced = N opens +
        the run's other records (exec = 2 records) and a line stands for
        `repeat` calls (1 without); the kernel's own count is consistent when
        records_submitted - repeat lines + repeated + lost_events == produced
        (a lost repeat record counts its calls in lost_events), and
        received == submitted.
    (b) Paced: burst at fixed rates (shared monitor) for paced_s seconds each,
        far more than the ring buffer holds; lossless when nothing was lost
        and the producer reached 90% of the rate."""
    s = ctx.size
    burst = ctx.ws.build("burst")
    figs, by_mode = [], {}
    for mode in BURST_MODES:
        trials, sweep = _throughput_mode(ctx, burst, mode)
        by_mode[mode] = {"trials": trials, "sweep": sweep}
        ok = [x["rate"] for x in sweep if x["lossless"]]
        best = max(ok) if ok else 0
        exact = sum(1 for t in trials if t["exact"])
        figs += [
            value_figure(f"throughput ({mode} calls): lossless rate (paced sweep)", "events/s", best,
                         target=">= 250,000/s", met=best >= 250_000,
                         text=(f"{best:,}/s lossless; " if best else "none lossless; ")
                         + ", ".join(f"{x['rate'] // 1000}k:{'ok' if x['lossless'] else 'lost ' + str(x['lost'])}"
                                     f"{'' if x['achieved'] >= 0.9 * x['rate'] else ' (producer at ' + format(int(x['achieved']), ',') + '/s)'}"
                                     for x in sweep)),
            value_figure(f"throughput ({mode} calls): log rate, flat out", "events/s",
                         [t["log_rate"] for t in trials], target="report",
                         note=f"{sum(t['logged_lines'] for t in trials):,} lines for "
                              f"{sum(t['logged_opens'] for t in trials):,} calls" if trials else None),
            value_figure(f"throughput ({mode} calls): lost in a flat-out burst", "",
                         [t["lost_reported"] for t in trials],
                         text=", ".join(f"{t['lost_reported']:,} of {t['n']:,} lost at "
                                        f"{t['producer_rate']:,.0f}/s produced" for t in trials)),
            value_figure(f"drop accounting ({mode} calls): reported == produced - logged", "", exact,
                         text=f"exact in {exact}/{len(trials)} runs", target="exact",
                         met=exact == len(trials)),
        ]
    return {"params": {"n": s["burst_n"], "trials": s["burst_trials"], "rates": s["rates"],
                       "paced_s": s["paced_s"], "policy": "coding-agent", "modes": BURST_MODES},
            "figures": figs, **by_mode}


# -- 5 -------------------------------------------------------------------------------------

def _violations(ws, run_id):
    out = []
    with open(os.path.join(ws.state, "runs", run_id, "events.jsonl")) as f:
        for line in f:
            if '"violation"' in line:
                e = json.loads(line)
                if e.get("kind") == "violation":
                    out.append(e)
    return out


def flood_violation(ctx):
    """While the agent floods benign opens beyond capacity (of two files in
    turn, so that the kernel folds none into a repeat count), it reads a
    fixture ~/.ssh/id_rsa (HOME is a scratch home) once, halfway through; the
    coding-agent policy denies ${HOME}/.ssh/**. Was the violation reported?"""
    s, ws = ctx.size, ctx.ws
    burst = ws.build("burst")
    home = ws.path("home")
    os.makedirs(os.path.join(home, ".ssh"), exist_ok=True)
    key = os.path.join(home, ".ssh", "id_rsa")
    with open(key, "w") as f:
        f.write("-----BEGIN OPENSSH PRIVATE KEY-----\nbench fixture, not a key\n")
    out = ws.path("flood.json")
    warm = ctx.warm()
    trials = []
    for t in range(s["flood_trials"]):
        r = warm.run([burst, "-n", str(s["flood_n"]), "-a", "/dev/zero", "-x", key, "-o", out], policy=POLICY,
                     cwd=ws.root, home=home)
        opened = r["exit"] == 0 and lib.read_json_file(out)["extra_opened"] == 1
        # the file read itself (not, say, the exec violation whose argv names the key)
        hits = [v for v in _violations(ws, r["run_id"])
                if v.get("category") == "filesystem" and "id_rsa" in json.dumps(v.get("detail"))]
        c = r["counters"]
        trials.append({"reported": bool(hits), "opened": opened, "lost": c["lost_events"] + c["lost_stash"],
                       "lost_priority": c["lost_priority"], "rule": hits[0].get("rule") if hits else None})
        lib.drop_run(ws, r["run_id"])
    valid = [t for t in trials if t["opened"]]
    rep = sum(1 for t in valid if t["reported"])
    pct = 100.0 * rep / len(valid) if valid else 0.0
    lost = sorted(t["lost"] for t in trials)
    lost_prio = sum(t["lost_priority"] for t in trials)
    figs = [value_figure("violation under flood: reported", "%", pct, target="100%", met=pct == 100.0,
                         text=f"{rep}/{len(valid)} ({pct:.0f}%); lost per trial "
                              f"{lost[0]:,}-{lost[-1]:,} of {s['flood_n']:,} (bulk ring), "
                              f"{lost_prio} on the priority ring in all")]
    return {"params": {"flood_n": s["flood_n"], "trials": s["flood_trials"], "policy": "coding-agent"},
            "figures": figs, "trials": trials}


# -- 6 -------------------------------------------------------------------------------------

def startup(ctx):
    """`agentwatch run -- true` vs plain `true`. Cold: a fresh agentwatch
    process each time (compile, attach, run, detach). Warm: runs on an already
    loaded Monitor, timed from Run.execute() to the agent's exit (and to
    execute()'s return), vs a plain subprocess of true from the same process."""
    s, ws = ctx.size, ctx.ws

    def plain():
        t0 = time.monotonic()
        subprocess.run(["true"], check=True)
        return time.monotonic() - t0

    def cold():
        r = lib.run_cli(ws, ["true"])
        if r["exit"] != 0:
            raise RuntimeError(f"agentwatch run -- true exited {r['exit']}: {r['stderr'][-1500:]}")
        return r["wall_s"]
    log(f"startup: cold x {s['cold_reps']}")
    cb, cm = alternate(plain, cold, s["cold_reps"])
    # where a cold run's time goes: a fresh process that loads, runs true once, unloads
    t0 = time.monotonic()
    fresh = lib.WarmRunner(ws)
    ready_s = time.monotonic() - t0
    one = fresh.run(["true"])
    close_s = fresh.close()
    phases = {"start_and_import_s": ready_s - fresh.ready["construct_s"] - fresh.ready["open_s"],
              "compile_and_attach_s": fresh.ready["construct_s"] + fresh.ready["open_s"],
              "run_to_agent_exit_s": one["to_exit_s"], "run_teardown_s": one["teardown_s"],
              "detach_s": close_s, "tracepoints": fresh.ready["tracepoints"]}
    total = sum(v for k, v in phases.items() if k.endswith("_s") and v)
    phases["teardown_share"] = ((close_s or 0) + (one["teardown_s"] or 0)) / total if total else None

    warm = ctx.warm()
    log(f"startup: warm x {s['warm_reps']}")
    warm_runs = []

    def warm_run():
        r = warm.run(["true"])
        warm_runs.append(r)
        return r["to_exit_s"]
    wb, wm = alternate(lambda: warm.plain(["true"])["total_s"], warm_run, s["warm_reps"])
    totals = [r["total_s"] for r in warm_runs]
    tshare = lib.summarize([r["teardown_s"] / r["total_s"] for r in warm_runs if r["teardown_s"]])
    pol = [warm.run(["true"], policy=POLICY)["to_exit_s"] for _ in range(min(3, s["warm_reps"]))]
    # what a user gets: the CLI's thin client, end to end, on `agentwatch daemon`
    log(f"startup: agentwatch run --daemon -- true x {s['warm_reps']}")
    d = lib.Daemon(ws)
    try:
        d.run(["true"])                                  # untimed warm-up
        db, dm = alternate(plain, lambda: d.run(["true"]), s["warm_reps"])
        dpol = [d.run(["true"], policy=POLICY) for _ in range(min(3, s["warm_reps"]))]
    finally:
        d.close()
    figs = [
        value_figure("start-up cold: agentwatch run -- true", "s", cm, target="<= 2 s",
                     met=lib.summarize(cm)["median"] <= 2.0,
                     note=f"plain true: {lib.summarize(cb)['median'] * 1000:.1f} ms"),
        value_figure("start-up cold: teardown share", "%", 100 * (phases["teardown_share"] or 0),
                     text=f"{100 * (phases['teardown_share'] or 0):.0f}% (detach {phases['detach_s'] or 0:.2f} s of "
                          f"{phases['tracepoints']} tracepoints; compile+attach "
                          f"{phases['compile_and_attach_s']:.2f} s)"),
        compare_figure("start-up warm: agentwatch run -- true on the daemon (CLI, end to end)", "s",
                       db, dm, "delta", target="<= +100 ms", limit=0.100,
                       note=f"daemon ready in {d.ready_s:.1f} s"),
        compare_figure("start-up warm, on the daemon, coding-agent policy", "s", db[:len(dpol)], dpol,
                       "delta", target="report"),
        compare_figure("start-up warm: execute() to agent exit (in-process)", "s", wb, wm, "delta",
                       target="report"),
        compare_figure("start-up warm: execute() total", "s", wb, totals, "delta", target="report",
                       note=f"teardown share median {100 * tshare['median']:.0f}%" if tshare else None),
        compare_figure("start-up warm, coding-agent policy: to agent exit", "s",
                       wb[:len(pol)], pol, "delta", target="report"),
    ]
    return {"params": {"cold_reps": s["cold_reps"], "warm_reps": s["warm_reps"]},
            "figures": figs, "cold_phases": phases}


# -- 7 -------------------------------------------------------------------------------------

def _memory(pid):
    return {"rss": lib.rss_kb(pid), "pss": lib.pss_kb(pid), "bpf": lib.bpf_memlock_kb(pid)}


def _footprint_sample(ctx, k, settle=1.0):
    """k concurrent `agentwatch run --policy coding-agent -- sleep 600`,
    started one after the other (each waits for the previous to be running:
    `run`'s start-up sweep could remove a cgroup created between its reads).
    Returns (memory of the first while alone, memory of each with all k up),
    in KiB: RSS, PSS and BPF memlock."""
    runs, alone = [], None

    def check():
        for b in runs:
            b.check_alive()
    try:
        for i in range(k):
            bg = lib.BackgroundRun(ctx.ws, ["sleep", "600"], policy=POLICY)
            runs.append(bg)
            bg.wait_running(timeout=180)
            if i == 0:
                time.sleep(settle)
                check()
                alone = _memory(bg.pid)
        time.sleep(settle)
        check()
        return alone, [_memory(b.pid) for b in runs]
    finally:
        for b in runs:                      # SIGTERM all first: they detach in parallel
            b.terminate()
        for b in runs:
            b.stop(timeout=120)


def _daemon_footprint(ctx, k, settle=1.0):
    """k concurrent `agentwatch run --daemon --policy coding-agent -- sleep
    600` on one daemon: its memory idle and with all k running, and each
    client's RSS (KiB)."""
    d = lib.Daemon(ctx.ws)
    clients = []
    try:
        time.sleep(settle)
        idle = _memory(d.pid)
        for _ in range(k):
            clients.append(d.client(["sleep", "600"], policy=POLICY, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True))
        deadline = time.monotonic() + 300
        while sum(1 for r in d.status()["runs"] if r["root_pid"]) < k:
            dead = [p for p in clients if p.poll() is not None]
            if dead:
                raise RuntimeError(f"agentwatch run --daemon ended early ({dead[0].returncode}): "
                                   f"{dead[0].stderr.read().decode(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{k} runs did not start on the daemon in time")
            time.sleep(0.1)
        time.sleep(settle)
        return idle, _memory(d.pid), [lib.rss_kb(p.pid) or 0 for p in clients]
    finally:
        for p in clients:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in clients:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        d.close()


def footprint(ctx):
    """Resident memory of the monitor with 1 agent and with N agents at once:
    N `agentwatch run --no-daemon` are N monitor processes (RSS counts the
    shared bcc/LLVM pages in each, PSS splits them); on `agentwatch daemon`
    the N runs share one monitor, each with a thin client."""
    s = ctx.size
    k = s["agents"]
    mb = lambda kb: (kb or 0) / 1024   # noqa: E731
    one, many = lib.retry_killed(lambda: _footprint_sample(ctx, k))
    log(f"footprint: {k} agents on the daemon")
    d_idle, d_busy, d_clients = _daemon_footprint(ctx, k)
    warm = ctx.warm()
    shared = {"rss": lib.rss_kb(warm.proc.pid), "pss": lib.pss_kb(warm.proc.pid),
              "bpf": lib.bpf_memlock_kb(warm.proc.pid)}
    sum_rss = sum(mb(x["rss"]) for x in many)
    figs = [
        value_figure("footprint: monitor RSS, 1 agent", "MB", mb(one["rss"]),
                     text=f"{mb(one['rss']):.0f} MB RSS, {mb(one['pss']):.0f} MB PSS, "
                          f"+{mb(one['bpf']):.0f} MB kernel (BPF maps/progs)"),
        value_figure(f"footprint: monitor RSS, {k} agents on the daemon", "MB", mb(d_busy["rss"]),
                     target="<= 200 MB" if k >= 10 else "report",
                     met=(mb(d_busy["rss"]) <= 200) if k >= 10 else None,
                     text=f"{mb(d_busy['rss']):.0f} MB RSS, {mb(d_busy['pss']):.0f} MB PSS, "
                          f"+{mb(d_busy['bpf']):.0f} MB kernel (idle: {mb(d_idle['rss']):.0f} MB RSS); "
                          f"+{k} thin clients, {sum(mb(x) for x in d_clients):.0f} MB RSS in all"),
        value_figure(f"footprint: monitor RSS, {k} agents without the daemon (sum)", "MB", sum_rss,
                     target="report",
                     text=f"{sum_rss:.0f} MB RSS, {sum(mb(x['pss']) for x in many):.0f} MB PSS, "
                          f"+{sum(mb(x['bpf']) for x in many):.0f} MB kernel ({k} monitor processes)"),
        value_figure("footprint: one shared monitor (warm runner), idle", "MB", mb(shared["rss"]),
                     text=f"{mb(shared['rss']):.0f} MB RSS, +{mb(shared['bpf']):.0f} MB kernel"),
    ]
    return {"params": {"agents": k}, "figures": figs,
            "samples": {"one": one, "many": many, "shared": shared,
                        "daemon": {"idle": d_idle, "busy": d_busy, "clients_rss": d_clients}}}


# -- 8 -------------------------------------------------------------------------------------

GUARD_NAME, GUARD_ADDR = "bench.test", "127.0.0.2"
GUARD_CONC = 32         # flows open at once in the flow-rate part


def guard_policy(port, direct):
    """The guard benchmark's two policies, identical but for one line. Both
    have the domain rule, so both runs get the guard (its listeners, its DNS
    responder, the host's network namespace); the direct one also allows the
    server's port by network.loopback, which the kernel lets through without
    the redirect. (For a remote server that would be a cidr rule, but a
    loopback address is judged by network.loopback only: docs/policy.md,
    "Network rules".)"""
    loopback = f"  loopback: [{port}]\n" if direct else ""
    return ("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: bench-guard}\n"
            f"network:\n{loopback}  allow:\n"
            f"    - {{domain: {GUARD_NAME}, ports: [{port}], protocol: tcp}}\n"
            "on_violation: {network: deny}\n")


def guard_counters(events):
    """From a run's log: (connects the kernel redirected to the guard, the
    guard's own counters), from the end event."""
    kd = lib.lifecycle(events, "end")["detail"].get("kernel_denials") or {}
    return (kd.get("cgroup-bpf") or {}).get("proxied"), kd.get("egress-guard") or {}


def _flow_server(ws, exe, timeout=10):
    """csrc/flows.c serving on GUARD_ADDR, any free port: (process, port)."""
    p = ws.popen([exe, "serve", GUARD_ADDR, "0"], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline() if select.select([p.stdout], [], [], timeout)[0] else ""
    if not line.startswith("listening "):
        lib.stop_process(p)
        raise RuntimeError(f"flows serve did not start: {line!r}")
    return p, int(line.split()[1])


def guard(ctx):
    """The egress guard (issue #16) against direct, on loopback: one C
    server (csrc/flows.c) on 127.0.0.2, one C client as the agent under
    `agentwatch run --resolve bench.test:127.0.0.2`; every flow sends
    `GET ... Host: bench.test`. Direct: the policy's network.loopback allows
    the port, so the kernel lets the connect through; guarded: the same
    policy without that line, so the connect is redirected to the guard,
    which reads the Host, checks the pin, connects upstream and splices.
    Each run: connect latency (socket() to the first response byte, one flow
    at a time), 1 MiB transfers one at a time (socket() to the last byte),
    then short flows flat out, GUARD_CONC at once. Direct and guarded runs
    alternate; each run's end event must show the kernel redirected nothing
    (direct) or its flows (guarded)."""
    s, ws = ctx.size, ctx.ws
    exe = ws.build("flows")
    server, port = _flow_server(ws, exe)
    trials = {"direct": [], "guarded": []}
    notes = []
    try:
        policies = {}
        for side in trials:
            policies[side] = ws.path(f"guard-{side}.yaml")
            with open(policies[side], "w") as f:
                f.write(guard_policy(port, side == "direct"))
        client = [exe, "client", GUARD_ADDR, str(port), GUARD_NAME, "-l", str(s["guard_latency_n"]),
                  "-b", str(s["guard_bulk_n"]), "-t", str(s["guard_flood_s"]), "-c", str(GUARD_CONC)]

        def trial(side):
            r = lib.run_cli(ws, client, policy=policies[side],
                            opts=["--resolve", f"{GUARD_NAME}:{GUARD_ADDR}"])
            if r["exit"] != 0 or not r["run_id"]:
                raise RuntimeError(f"flows client ({side}) exited {r['exit']}: {r['stderr'][-1500:]}")
            res = lib.last_json_line(r["stdout"])
            proxied, g = guard_counters(lib.run_events(ws, r["run_id"]))
            lib.drop_run(ws, r["run_id"])
            res.update(proxied=proxied, guard=g, run_id=r["run_id"])
            # the path is the only difference: direct flows never reach the guard, guarded ones all do
            if side == "direct" and proxied:
                raise RuntimeError(f"direct run: the kernel redirected {proxied} connects to the guard")
            if side == "guarded" and not g.get("allowed"):
                raise RuntimeError(f"guarded run: no flow went through the guard ({g})")
            trials[side].append(res)
            return res

        # once outside any agent, for scale (not a figure)
        plain = lib.last_json_line(subprocess.run(client, capture_output=True, text=True,
                                                  check=True, timeout=300).stdout)
        log(f"guard: {s['guard_reps']} x (direct, guarded)")
        direct, guarded = alternate(lambda: trial("direct"), lambda: trial("guarded"), s["guard_reps"])
    finally:
        lib.stop_process(server)

    def pick(rs, *keys):
        out = []
        for r in rs:
            for k in keys:
                r = r[k]
            out.append(r)
        return out
    med = lambda xs: lib.summarize(xs)["median"] if xs else None   # noqa: E731
    # the transfer itself (first byte to last): what the splice costs; the
    # whole flow (socket() to last byte) adds the connect latency above
    bulk = {side: [med(r["stream_mibps"]) for r in rs] for side, rs in trials.items()}
    tput = compare_figure("guard: 1 MiB transfer throughput (first to last byte, one at a time)", "MiB/s",
                          bulk["direct"], bulk["guarded"], "x", target=">= 0.80x direct")
    tput["met"] = tput["result"] is not None and tput["result"]["median"] >= 0.8
    whole = {side: [med(r["bulk_mibps"]) for r in rs] for side, rs in trials.items()}
    whole_fig = compare_figure("guard: 1 MiB flow, socket() to last byte", "MiB/s",
                               whole["direct"], whole["guarded"], "x", target="report")
    rate = compare_figure(f"guard: new flows per second ({GUARD_CONC} at once)", "flows/s",
                          pick(direct, "flows_per_s"), pick(guarded, "flows_per_s"), "x",
                          target=">= 2,000/s through the guard")
    g_rate = lib.summarize(pick(guarded, "flows_per_s"))
    if rate["result"] is not None:
        rate["met"] = g_rate["median"] >= 2000
        rate["text"] = (f"{g_rate['median']:,.0f}/s [{g_rate['min']:,.0f}..{g_rate['max']:,.0f}] "
                        f"through the guard, {rate['result']['median']:.2f}x direct")
    figs = [
        compare_figure("guard: connect latency p50 (socket() to first response byte)", "µs",
                       pick(direct, "ttfb_us", "p50"), pick(guarded, "ttfb_us", "p50"), "delta",
                       target="<= +1 ms", limit=1000),
        compare_figure("guard: connect latency p90", "µs", pick(direct, "ttfb_us", "p90"),
                       pick(guarded, "ttfb_us", "p90"), "delta", target="report"),
        compare_figure("guard: connect() alone p50 (returns at once through the guard)", "µs",
                       pick(direct, "connect_us", "p50"), pick(guarded, "connect_us", "p50"), "delta",
                       target="report"),
        tput, whole_fig, rate,
    ]
    errors = {side: sum(r["latency_errors"] + r["bulk_errors"] + r["flow_errors"] for r in rs)
              for side, rs in trials.items()}
    if any(errors.values()):
        notes.append(f"failed flows: {errors['direct']} direct, {errors['guarded']} guarded")
    busy = sum(r["guard"].get("busy", 0) + r["guard"].get("errors", 0) for r in guarded)
    if busy:
        notes.append(f"the guard reset or failed {busy} flows (busy + errors counters)")
    # every flow the client completed went through the guard, allowed, and no other did
    done = [r["latency_n"] + len(r["bulk_mibps"]) + r["flows"] + r["flows_drained"] for r in guarded]
    allowed = [r["guard"].get("allowed") for r in guarded]
    if done != allowed:
        notes.append(f"guard allowed {allowed} flows where the client completed {done}")
    notes.append(f"outside any agent, for scale: connect latency p50 {plain['ttfb_us']['p50']:.0f} µs, "
                 f"1 MiB at {med(plain['bulk_mibps']) or 0:,.0f} MiB/s, {plain['flows_per_s']:,.0f} flows/s")
    return {"params": {"reps": s["guard_reps"], "latency_n": s["guard_latency_n"],
                       "bulk_n": s["guard_bulk_n"], "flood_s": s["guard_flood_s"], "conc": GUARD_CONC,
                       "server": f"{GUARD_ADDR}:{port}", "name": GUARD_NAME},
            "figures": figs, "notes": notes, "trials": trials, "plain": plain}


BENCHMARKS = {
    "host_tax": host_tax,
    "realistic": realistic,
    "storm": storm,
    "throughput": throughput,
    "flood_violation": flood_violation,
    "startup": startup,
    "footprint": footprint,
    "guard": guard,
    "gateway": gateway,
    "broker": broker,
    "memory": memory,
    "termination": termination,
}
TITLES = {
    "host_tax": "1. host tax (outside agents)",
    "realistic": "2. agent overhead, realistic",
    "storm": "3. agent overhead, syscall storm",
    "throughput": "4. event throughput and loss",
    "flood_violation": "5. violation under flood",
    "startup": "6. start-up",
    "footprint": "7. footprint",
    "guard": "8. egress guard (issue #16)",
    "gateway": "9. LLM gateway (issue #17)",
    "broker": "10. agent-to-agent broker (issue #18)",
    "memory": "11. agents' memory (issue #19)",
    "termination": "12. termination checks and trials (issue #20)",
}
