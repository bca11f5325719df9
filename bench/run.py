#!/usr/bin/env python3
"""agentwatch benchmark suite (issue #5).

    .venv/bin/python bench/run.py [--quick] [--only NAME[,NAME...]]

Runs as root on the real kernel. Every figure compares baseline and
monitored runs made side by side in this one invocation (interleaved,
repeated; median and spread). Writes bench/results/<timestamp>.json and
bench/results/latest.md, and prints the markdown table.
Benchmarks: host_tax realistic storm throughput flood_violation startup footprint guard gateway broker
memory termination.
"""
import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import lib  # noqa: E402
from bench.benchmarks import BENCHMARKS, PROFILES, TITLES, Ctx  # noqa: E402

RESULTS = os.path.join(lib.BENCH, "results")


def machine():
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg": load,
            "foreign_aw_programs": len(lib.aw_programs())}


def render(doc):
    """The markdown table (and notes) of a results document."""
    lines = [f"## agentwatch benchmarks ({doc['profile']}, {doc['started']})", "",
             f"{doc['machine']['cpus']} CPUs, Linux {doc['machine']['kernel']}; load before "
             f"{' '.join(doc['machine']['loadavg'])}, after {' '.join(doc.get('loadavg_after', []))}. "
             "Ratios and differences are medians of interleaved pairs [min..max].", "",
             "| benchmark | figure | baseline | agentwatch | result [spread] | target | met |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for name, res in doc["benchmarks"].items():
        title = TITLES.get(name, name)
        if res.get("error"):
            lines.append(f"| {title} | **error** | | | {res['error'].strip().splitlines()[-1][:120]} | | missed |")
            continue
        for f in res["figures"]:
            base = lib.fmt(f["baseline"]["median"], f["unit"]) if f.get("baseline") else ""
            mon = lib.fmt(f["monitored"]["median"], f["unit"]) if f.get("monitored") and f["compare"] != "value" else ""
            met = {True: "met", False: "**missed**", None: ""}[f.get("met")]
            text = f["text"] + (f" ({f['note']})" if f.get("note") else "")
            lines.append(f"| {title} | {f['figure']} | {base} | {mon} | {text} | {f.get('target') or ''} | {met} |")
            title = ""
        for n in res.get("notes", []):
            notes.append(f"- {name}: {n}")
        progs = res.get("bpf_programs") or {}
        # one {program: stats}, or one per policy ({policy: {program: stats}})
        nested = progs and all("run_cnt" not in v for v in progs.values())
        for label, group in (progs.items() if nested else [("", progs)] if progs else []):
            per = ", ".join(f"{k} {v['ns_per_run']} ns x {v['run_cnt']:,}" for k, v in group.items()
                            if v["run_cnt"])
            under = f" under {label}" if label else ""
            notes.append(f"- {name}: BPF ns per program run{under} (kernel.bpf_stats): {per or 'no runs'}")
    if doc.get("killed_retries"):
        notes.append(f"- {doc['killed_retries']} sample(s) were retried because another agentwatch on "
                     "this machine SIGKILLed our agent (its start-up sweep removes run cgroups it has "
                     f"no record of); {doc.get('waited_for_quiet_s', 0):.0f} s spent waiting for it to go")
    if doc.get("warm_close_s") is not None:
        notes.append(f"- shared monitor unload (detach) took {doc['warm_close_s']:.2f} s")
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # the smoke test's size
    ap.add_argument("--only", help="comma-separated benchmark names: " + ", ".join(BENCHMARKS))
    ap.add_argument("--out", default=RESULTS, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (it loads BPF programs and creates cgroups)", file=sys.stderr)
        return 2
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}",
                  file=sys.stderr)
            return 2
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    # the smoke test (tiny) checks that benchmarks run, not clean figures: it
    # does not wait long for other agentwatch instances to go
    lib.QUIET_TIMEOUT["s"] = 5.0 if args.tiny else 120.0

    # SIGTERM/SIGHUP end the suite like Ctrl-C does: through the clean-up below
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    started = time.strftime("%Y%m%d-%H%M%S")
    doc = {"started": started, "profile": profile, "sizes": PROFILES[profile],
           "machine": machine(), "benchmarks": {}}
    ws = lib.Workspace()
    ctx = Ctx(ws, profile)
    t_all = time.monotonic()
    try:
        for name in names:
            lib.log(f"== {name} ({profile})")
            if lib.foreign_programs():
                lib.log(f"another agentwatch is loaded on this machine: waiting (up to "
                        f"{lib.QUIET_TIMEOUT['s']:.0f} s) for it to go")
                if not lib.wait_quiet():
                    lib.log("still there: measuring anyway (see the notes)")
            t0 = time.monotonic()
            foreign_at_start = len(lib.foreign_programs())
            try:
                res = BENCHMARKS[name](ctx)
            except KeyboardInterrupt:
                raise
            except Exception:
                res = {"error": traceback.format_exc(), "figures": []}
                lib.log(f"{name} failed:\n{res['error']}")
            res["seconds"] = round(time.monotonic() - t0, 1)
            if foreign_at_start:
                res.setdefault("notes", []).append(
                    f"another agentwatch had {foreign_at_start} programs loaded when this benchmark started")
            doc["benchmarks"][name] = res
    finally:
        ctx.close()
        doc["warm_close_s"] = ctx.warm_close_s
        doc["killed_retries"] = lib.KILLED["retries"]
        doc["waited_for_quiet_s"] = round(lib.KILLED["waited_s"], 1)
        ws.cleanup()
    with open("/proc/loadavg") as f:
        doc["loadavg_after"] = f.read().split()[:3]
    doc["seconds"] = round(time.monotonic() - t_all, 1)
    table = render(doc)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{started}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(table)
    print(table)
    lib.log(f"results: {path} ({doc['seconds']} s)")
    return 1 if any(r.get("error") for r in doc["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
