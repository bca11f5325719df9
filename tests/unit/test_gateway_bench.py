"""bench/gateway_bench.py (issue #17): the LLM gateway benchmark at the smoke
test's size, in-process and loopback only (no root, no kernel features beyond
a sock_diag lookup): it runs, its figures are well formed, and it leaves no
process or scratch directory behind. No timing is asserted. The kernel smoke
test (tests/kernel/test_bench_smoke.py) runs it again inside bench/run.py."""
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, REPO)
from bench import lib  # noqa: E402
from bench.benchmarks import BENCHMARKS, PROFILES, TITLES, Ctx  # noqa: E402
from bench.gateway_bench import config_text, jain, shares  # noqa: E402


def test_jain_index_and_shares():
    assert jain([5, 5, 5, 5]) == pytest.approx(1.0)
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([1, 2]) == pytest.approx(9 / 10)
    assert jain([0, 0]) is None
    assert shares([1, 2, 4]) == pytest.approx([1 / 7, 2 / 7, 4 / 7])


def test_the_bench_config_parses():
    from agentwatch.harness.gateway_config import parse_config
    cfg = parse_config(config_text(4321), "<t>", environ={"AW_BENCH_UPSTREAM_KEY": "sk-x"})
    assert cfg.routes["gpt-bench"].upstream.base_url == "http://127.0.0.1:4321"
    assert cfg.keys() == ("sk-x",)


def test_gateway_benchmark_registered():
    assert "gateway" in BENCHMARKS and "gateway" in TITLES
    assert all(p["gw_reps"] >= 1 for p in PROFILES.values())


def test_gateway_benchmark_runs_tiny():
    ws = lib.Workspace()
    try:
        res = BENCHMARKS["gateway"](Ctx(ws, "tiny"))
    finally:
        root = ws.root
        ws.cleanup()
    assert not os.path.exists(root)
    names = [f["figure"] for f in res["figures"]]
    assert len(names) == 6, names
    for f in res["figures"]:
        assert f["text"] and f["text"] != "-", f
        assert f["result"] is not None, f
        if f["compare"] != "value":
            for side in ("baseline", "monitored"):
                assert f[side]["median"] > 0, (side, f)
    lat = res["figures"][0]
    assert lat["compare"] == "delta" and lat["unit"] == "µs"
    assert 0 < res["figures"][3]["result"]["median"] <= 1.0        # Jain's index
    tr = res["trials"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in tr["direct"] + tr["through"])
    # every connection of the fairness part was named as its run: all 4 (and 3) got service
    assert all(len(r["tokens"]) == 4 and all(r["tokens"]) for r in tr["equal"])
    assert all(len(r["tokens"]) == 3 and all(r["tokens"]) for r in tr["weighted"])
    assert len(tr["latency"][0]["direct"]) == PROFILES["tiny"]["gw_latency_n"]
