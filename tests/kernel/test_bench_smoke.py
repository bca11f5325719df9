"""Every benchmark of bench/run.py at a tiny size, on the real kernel: it runs
and its results are well formed (figures present, numbers positive). No
timing target is asserted here: benchmarks are not pass/fail tests."""
import glob
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.kernel
sys.path.insert(0, REPO)
from bench.benchmarks import BENCHMARKS  # noqa: E402


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
    for name in ("host_tax", "storm"):
        progs = suite["doc"]["benchmarks"][name]["bpf_programs"]
        ran = {k: v for k, v in progs.items() if v["run_cnt"]}
        assert ran, f"{name}: no aw_* program ran with statistics on"
        assert all(v["ns_per_run"] > 0 for v in ran.values())
    # openat (4 arguments) runs the entry program at least once per call of the storm loop
    storm = suite["doc"]["benchmarks"]["storm"]
    assert storm["bpf_programs"]["aw_sys_enter4"]["run_cnt"] >= storm["params"]["n"]


def test_drop_accounting_and_violation_fields(suite):
    tp = suite["doc"]["benchmarks"]["throughput"]
    for t in tp["trials"]:
        assert t["records_received"] <= t["records_submitted"] + t["lost_reported"]
        assert t["logged_opens"] + t["lost_actual"] == t["n"] or not t["exact"]
        assert t["producer_rate"] > 0 and t["log_rate"] > 0
    assert tp["sweep"] and all(x["achieved"] > 0 for x in tp["sweep"])
    fv = suite["doc"]["benchmarks"]["flood_violation"]
    assert fv["trials"] and all(t["opened"] for t in fv["trials"])
    phases = suite["doc"]["benchmarks"]["startup"]["cold_phases"]
    assert phases["compile_and_attach_s"] > 0 and phases["tracepoints"] > 0
