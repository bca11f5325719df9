"""bench/ (issue #5): every benchmark of bench/run.py at a tiny size on the
real kernel: it runs and its results are well formed (figures present,
numbers positive). No timing target is asserted: benchmarks are not pass/fail
tests. The suite's plumbing (statistics, interleaving, figures, the table,
the bpf_prog_info layout, the C programs) is tested first, without BPF.

(One file: a tests/unit/test_bench_smoke.py next to this one would share its
basename, which pytest's default import mode refuses to collect.)"""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.kernel
sys.path.insert(0, REPO)
from bench import lib  # noqa: E402
from bench.benchmarks import BENCHMARKS, PROFILES, TITLES, guard_counters, guard_policy  # noqa: E402
from bench.run import render  # noqa: E402

HAVE_GCC = shutil.which("gcc") is not None


def test_summarize_median_spread_and_quartiles():
    s = lib.summarize([5, 1, 3, None, 4, 2])
    assert s["n"] == 5 and s["median"] == 3 and s["min"] == 1 and s["max"] == 5
    assert s["q1"] == 2 and s["q3"] == 4
    assert lib.summarize([]) is None and lib.summarize([None]) is None
    one = lib.summarize([7])
    assert one["median"] == one["q1"] == one["q3"] == 7


def test_paired_ratio_and_delta_skip_missing_samples():
    assert lib.paired([2, 4, None], [3, 6, 1], "ratio") == [1.5, 1.5]
    assert lib.paired([100, 110], [130, 150], "delta") == [30, 40]


def test_alternate_interleaves_and_flips_the_order():
    calls = []
    a, b = lib.alternate(lambda: calls.append("A") or len(calls),
                         lambda: calls.append("B") or len(calls), 4)
    assert calls == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert len(a) == len(b) == 4


def test_compare_figure_targets_on_the_median_of_pairs():
    f = lib.compare_figure("x", "ns", [100, 100, 100], [120, 130, 200], "delta", target="<= +25 ns", limit=25)
    assert f["result"]["median"] == 30 and f["met"] is False
    assert f["text"].startswith("+30.0 [+20.0..+100.0]")
    g = lib.compare_figure("y", "s", [10.0, 10.0], [10.2, 10.1], "ratio", target="<= 3%", limit=1.03)
    assert g["met"] is True and g["text"].startswith("+1.5%")
    h = lib.compare_figure("z", "ns", [100], [250], "x", limit=2)
    assert h["met"] is False and h["text"].startswith("2.50x")
    assert lib.compare_figure("w", "s", [], [], "ratio")["text"] == "-"


def test_value_figure_and_render_make_a_table():
    doc = {"profile": "tiny", "started": "t", "loadavg_after": ["0", "0", "0"],
           "machine": {"cpus": 2, "kernel": "k", "loadavg": ["0", "0", "0"]},
           "benchmarks": {
               "throughput": {"figures": [lib.value_figure("rate", "events/s", [1000, 2000, 3000],
                                                           target=">= 250,000/s", met=False)],
                              "notes": ["a note"]},
               "storm": {"figures": [lib.compare_figure("s", "ns", [100], [150], "x", limit=2)],
                         "bpf_programs": {"aw_sys_exit": {"run_cnt": 10, "ns_per_run": 40.5}}},
               "startup": {"error": "Traceback\nRuntimeError: boom", "figures": []}}}
    md = render(doc)
    assert "| 4. event throughput and loss | rate |" in md and "2,000/s [1,000/s..3,000/s]" in md
    assert "**missed**" in md and "| met |" in md
    assert "RuntimeError: boom" in md and "a note" in md and "aw_sys_exit 40.5 ns x 10" in md


def test_profiles_and_titles_cover_every_benchmark():
    keys = set(PROFILES["full"])
    assert all(set(p) == keys for p in PROFILES.values())
    assert set(TITLES) == set(BENCHMARKS)
    assert PROFILES["full"]["flood_trials"] == 100 and PROFILES["quick"]["flood_trials"] == 3
    assert PROFILES["full"]["agents"] == PROFILES["quick"]["agents"] == 10


@pytest.mark.skipif(not (HAVE_GCC and os.path.exists("/usr/include/linux/bpf.h")),
                    reason="needs gcc and the uapi headers")
def test_bpf_prog_info_offsets_match_the_uapi_header(tmp_path):
    src = tmp_path / "off.c"
    src.write_text('#include <stdio.h>\n#include <stddef.h>\n#include <linux/bpf.h>\n'
                   'int main(void){printf("%zu %zu %zu %zu\\n", offsetof(struct bpf_prog_info, name),'
                   'offsetof(struct bpf_prog_info, run_time_ns), offsetof(struct bpf_prog_info, run_cnt),'
                   'sizeof(struct bpf_prog_info));return 0;}\n')
    subprocess.run(["gcc", "-o", str(tmp_path / "off"), str(src)], check=True)
    name, rt, cnt, size = map(int, subprocess.run([str(tmp_path / "off")], capture_output=True,
                                                  text=True, check=True).stdout.split())
    assert (name, rt, cnt) == (lib.OFF_NAME, lib.OFF_RUN_TIME_NS, lib.OFF_RUN_CNT)
    assert size <= lib.PROG_INFO_LEN or lib.PROG_INFO_LEN >= cnt + 8
    raw = bytearray(lib.PROG_INFO_LEN)
    raw[name:name + 8] = b"aw_exit\0"
    raw[rt:rt + 8] = (1234).to_bytes(8, "little")
    raw[cnt:cnt + 8] = (10).to_bytes(8, "little")
    assert lib.parse_prog_info(bytes(raw)) == ("aw_exit", 1234, 10)


def test_prog_stats_delta_per_name():
    before = {1: ("aw_sys_exit", 100, 1), 2: ("aw_sys_exit", 0, 0), 3: ("aw_fork", 5, 1)}
    after = {1: ("aw_sys_exit", 500, 5), 2: ("aw_sys_exit", 100, 5), 3: ("aw_fork", 5, 1),
             4: ("aw_exit", 300, 3)}
    d = lib.prog_stats_delta(before, after)
    assert d["aw_sys_exit"] == {"progs": 2, "run_cnt": 9, "run_time_ns": 500, "ns_per_run": 55.6}
    assert d["aw_fork"]["ns_per_run"] is None and d["aw_exit"]["ns_per_run"] == 100
    assert set(lib.prog_stats_delta(before, after, ids={4})) == {"aw_exit"}


def test_guard_policies_differ_only_by_the_loopback_port_and_both_get_the_guard(tmp_path):
    from agentwatch.policy import load
    texts = {side: guard_policy(8080, side == "direct") for side in ("direct", "guarded")}
    extra = set(texts["direct"].splitlines()) - set(texts["guarded"].splitlines())
    assert extra == {"  loopback: [8080]"}
    assert set(texts["guarded"].splitlines()) <= set(texts["direct"].splitlines())
    for side, text in texts.items():
        (tmp_path / f"{side}.yaml").write_text(text)
        net = load(str(tmp_path / f"{side}.yaml")).spec.network
        assert net.guarded(), side
        assert bool(net.loopback) == (side == "direct")


def test_guard_counters_read_the_end_event():
    end = {"kind": "lifecycle", "phase": "end", "detail": {"kernel_denials": {
        "cgroup-bpf": {"proxied": 7}, "egress-guard": {"flows": 7, "allowed": 6, "errors": 1}}}}
    assert guard_counters([{"kind": "lifecycle", "phase": "start"}, end]) == (7, {"flows": 7, "allowed": 6,
                                                                                 "errors": 1})
    assert guard_counters([{"kind": "lifecycle", "phase": "end", "detail": {}}]) == (None, {})


@pytest.mark.skipif(not HAVE_GCC, reason="needs gcc")
def test_c_programs_build_and_report_json(tmp_path):
    ws = lib.Workspace()
    try:
        loop = lib.last_json_line(subprocess.run([ws.build("syscall_loop"), "2000"], capture_output=True,
                                                 text=True, check=True).stdout)
        assert loop["n"] == 2000 and loop["getppid_ns"] > 0 and loop["openclose_ns"] > 0
        fixture = tmp_path / "secret"
        fixture.write_text("x")
        out = tmp_path / "burst.json"
        subprocess.run([ws.build("burst"), "-n", "3000", "-r", "1000000", "-x", str(fixture),
                        "-o", str(out)], check=True)
        b = json.loads(out.read_text())
        assert b["n"] == 3000 and b["extra_opened"] == 1 and b["elapsed_ns"] > 0
        sw = tmp_path / "sw.json"
        r = subprocess.run([ws.build("stopwatch"), str(sw), "sh", "-c", "exit 3"])
        assert r.returncode == 3
        assert json.loads(sw.read_text())["status"] == 3
        flows = ws.build("flows")
        server = ws.popen([flows, "serve", "127.0.0.2", "0"], stdout=subprocess.PIPE, text=True)
        port = server.stdout.readline().split()[1]
        fl = tmp_path / "flows.json"
        subprocess.run([flows, "client", "127.0.0.2", port, "bench.test", "-l", "20", "-b", "2",
                        "-t", "0.2", "-c", "4", "-o", str(fl)], check=True, timeout=60)
        f = json.loads(fl.read_text())
        assert f["latency_n"] == 20 and f["latency_errors"] == 0 and f["ttfb_us"]["p50"] > 0
        assert len(f["bulk_mibps"]) == 2 and f["bulk_errors"] == 0
        assert f["flows"] > 0 and f["flow_errors"] == 0 and f["conc"] == 4
    finally:
        root = ws.root
        ws.cleanup()
    assert not os.path.exists(root)


def test_bench_run_refuses_unknown_names_and_non_root():
    r = subprocess.run([os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(
        os.path.join(REPO, ".venv", "bin", "python")) else "python3",
        os.path.join(REPO, "bench", "run.py"), "--only", "nope"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 2
    assert ("unknown benchmark" in r.stderr) or ("needs root" in r.stderr)


# -- the suite, tiny, on the real kernel ----------------------------------------

@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    scratch_before = set(glob.glob("/tmp/aw-bench-*"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "run.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=240, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=REPO))
    seconds = time.monotonic() - t0
    docs = glob.glob(str(out / "*.json"))
    assert len(docs) == 1, f"exit {r.returncode}: {r.stderr[-4000:]}"
    with open(docs[0]) as f:
        doc = json.load(f)
    return {"doc": doc, "proc": r, "out": out, "seconds": seconds,
            "scratch_left": set(glob.glob("/tmp/aw-bench-*")) - scratch_before}


def _numbers(summary):
    return [summary[k] for k in ("median", "min", "max", "q1", "q3")]


def test_suite_ran_every_benchmark_and_wrote_table(suite):
    doc, r = suite["doc"], suite["proc"]
    assert r.returncode == 0, r.stderr[-4000:]
    assert list(doc["benchmarks"]) == list(BENCHMARKS)
    md = (suite["out"] / "latest.md").read_text()
    assert md.startswith("## agentwatch benchmarks (tiny") and "| benchmark | figure |" in md
    assert md in r.stdout
    assert not suite["scratch_left"], "bench left its scratch directory behind"
    print(f"tiny suite: {suite['seconds']:.0f} s")


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_benchmark_results_well_formed(suite, name):
    res = suite["doc"]["benchmarks"][name]
    assert not res.get("error"), res.get("error")
    assert res["figures"], f"{name}: no figures"
    for f in res["figures"]:
        assert f["text"] and f["text"] != "-", f
        assert f["met"] in (True, False, None)
        if f["compare"] == "value":
            assert f["result"] is not None and f["result"]["median"] >= 0, f
            continue
        for side in ("baseline", "monitored"):
            assert f[side] and all(v > 0 for v in _numbers(f[side])), (side, f)
        if f["compare"] in ("ratio", "x"):
            assert all(v > 0 for v in _numbers(f["result"])), f


def test_bpf_statistics_reported(suite):
    host = suite["doc"]["benchmarks"]["host_tax"]["bpf_programs"]   # per policy, and the idle daemon
    assert sorted(host) == ["coding-agent.yaml", "daemon", "sandboxed-agent.yaml"]
    for name, progs in [("storm", suite["doc"]["benchmarks"]["storm"]["bpf_programs"])] + sorted(host.items()):
        ran = {k: v for k, v in progs.items() if v["run_cnt"]}
        assert ran, f"{name}: no aw_* program ran with statistics on"
        assert all(v["ns_per_run"] > 0 for v in ran.values())
    # the strict policy's exec kill puts a probe on close, which the host loop calls
    assert host["sandboxed-agent.yaml"]["aw_mapx_close"]["run_cnt"] > 0
    assert "aw_mapx_close" not in host["coding-agent.yaml"]
    # the daemon attaches every group and the mapexec probes, with no run at all
    assert host["daemon"]["aw_mapx_close"]["run_cnt"] > 0
    # openat (4 arguments) runs the entry program at least once per call of the storm loop
    storm = suite["doc"]["benchmarks"]["storm"]
    assert storm["bpf_programs"]["aw_sys_enter4"]["run_cnt"] >= storm["params"]["n"]


def test_drop_accounting_and_violation_fields(suite):
    tp = suite["doc"]["benchmarks"]["throughput"]
    for mode in ("repeated", "distinct"):
        for t in tp[mode]["trials"]:
            assert t["records_received"] <= t["records_submitted"] + t["lost_reported"]
            assert t["logged_opens"] + t["lost_actual"] == t["n"] or not t["exact"]
            assert t["kernel_consistent"], t
            assert t["producer_rate"] > 0 and t["log_rate"] > 0
        assert tp[mode]["sweep"] and all(x["achieved"] > 0 for x in tp[mode]["sweep"])
    # the same call over and over is folded into a few lines; calls in turn are a line each
    assert all(t["logged_lines"] < t["n"] / 100 for t in tp["repeated"]["trials"]), tp["repeated"]["trials"]
    assert all(t["repeat_lines"] == 0 for t in tp["distinct"]["trials"])
    fv = suite["doc"]["benchmarks"]["flood_violation"]
    assert fv["trials"] and all(t["opened"] for t in fv["trials"])
    phases = suite["doc"]["benchmarks"]["startup"]["cold_phases"]
    assert phases["compile_and_attach_s"] > 0 and phases["tracepoints"] > 0
