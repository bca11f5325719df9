"""bench/broker_bench.py (issue #18): the agent-to-agent broker benchmark at
the smoke test's size, in-process on a unix socket in a scratch directory (no
root, no kernel features beyond SO_PEERCRED and a pidfd): it runs, its
figures are well formed, every request was answered with a result, and it
leaves no process or scratch directory behind. No timing is asserted. The
kernel smoke test (tests/kernel/test_bench_smoke.py) runs it again inside
bench/run.py."""
import os
import sys

from conftest import REPO

sys.path.insert(0, REPO)
from bench import broker_load, lib  # noqa: E402
from bench.benchmarks import BENCHMARKS, PROFILES, TITLES, Ctx  # noqa: E402
from bench.broker_bench import LOAD_CONC, LOAD_PROCS, assemble  # noqa: E402


def test_broker_benchmark_registered():
    assert "broker" in BENCHMARKS and TITLES["broker"] == "10. agent-to-agent broker (issue #18)"
    for p in PROFILES.values():
        assert p["br_reps"] >= 1 and p["br_latency_n"] >= 1 and p["br_load_s"] > 0
        assert p["br_verify_n"] >= 1 and p["br_peer_n"] >= 1


def test_load_tool_arguments_and_lines():
    a = broker_load.parse(["load", "--socket", "/x.sock", "-c", "3", "-t", "0.5", "--method", "whoami"])
    assert (a.mode, a.socket, a.c, a.t, a.method, a.recipient) == ("load", "/x.sock", 3, 0.5, "whoami", "sink")
    a = broker_load.parse(["latency", "--socket", "/x.sock", "--agent", "me", "-n", "7"])
    assert (a.mode, a.agent, a.n, a.uses) == ("latency", "me", 7, 1000)
    from agentwatch.harness import a2a
    line = broker_load.send_line(5, "m-1", "sink")
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    req = a2a.parse_request(line)
    msg = a2a.parse_message(req["params"]["message"])
    assert req["method"] == "SendMessage" and req["params"]["recipient"] == "sink"
    assert msg["messageId"] == "m-1" and len(msg["parts"]) == 2
    assert broker_load.is_result(b'{"jsonrpc":"2.0","id":1,"result":{"task":{}}}')
    assert not broker_load.is_result(b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602}}')


def _load(method, rps):
    return {"method": method, "rps": rps, "requests": int(rps), "per_process": [rps / 2, rps / 2],
            "errors": 0, "first_error": None, "client_cpu": [0.1, 0.1], "broker_cpu": 0.9,
            "store_cpu": 0.2, "seconds": 1.0}


def test_figures_from_measurements():
    lat = [{"send": [900.0, 1000.0, 1100.0], "whoami": [100.0, 110.0, 120.0], "call": [400.0, 420.0, 440.0]}]
    res = assemble(PROFILES["tiny"], 2, [_load("whoami", 20000.0)], [_load("send", 6000.0)], lat,
                   [50.0, 52.0, 51.0], [40.0, 41.0, 42.0], [20.0, 21.0, 22.0], [0.5, 0.5, 0.6], None, [])
    figs = {f["figure"].split(",")[0]: f for f in res["figures"]}
    mps = figs["broker: SendMessage/s"]
    assert mps["met"] is True and mps["result"]["median"] == 6000.0
    assert f"{LOAD_PROCS * LOAD_CONC} connections" in mps["figure"]
    assert figs["broker: SendMessage/s vs agentwatch.Whoami/s (no store write)"]["result"]["median"] == 0.3
    p50 = figs["broker: SendMessage latency p50"]
    assert p50["result"]["median"] == 1000.0 and p50["met"] is True
    tok = figs["broker: token checks and spend (CallTool - Whoami"]
    assert tok["result"]["median"] == 310.0 and tok["compare"] == "delta"
    assert len(res["figures"]) == 7
    res = assemble(PROFILES["tiny"], 2, [_load("whoami", 20000.0)], [_load("send", 6000.0)], lat,
                   [50.0], [40.0], [20.0], [0.5], None, [], lat_normal=lat)
    normal = [f for f in res["figures"] if "synchronous=NORMAL" in f["figure"]]
    assert len(normal) == 1 and normal[0]["result"]["median"] == 1000.0 and normal[0]["met"] is True


def test_broker_benchmark_runs_tiny():
    ws = lib.Workspace()
    try:
        res = BENCHMARKS["broker"](Ctx(ws, "tiny"))
    finally:
        root = ws.root
        ws.cleanup()
    assert not os.path.exists(root)
    names = [f["figure"] for f in res["figures"]]
    assert len(names) == 8, names
    for f in res["figures"]:
        assert f["text"] and f["text"] != "-", f
        assert f["result"] is not None, f
        if f["compare"] != "value":
            for side in ("baseline", "monitored"):
                assert f[side]["median"] > 0, (side, f)
    tr = res["trials"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in tr["send"] + tr["whoami"])
    assert all(len(r["per_process"]) == LOAD_PROCS and all(r["per_process"]) for r in tr["send"])
    n = PROFILES["tiny"]["br_latency_n"]
    assert all(len(r[k]) == n for r in tr["latency"] for k in ("send", "whoami", "call"))
    # every message was delivered (a receive on sink's log), every tool call ran
    assert tr["events"]["receive"] == tr["events"]["send"] >= sum(r["requests"] for r in tr["send"])
    assert tr["events"]["tool"] == tr["events"]["call_tool"] == n + 20     # the client's warm-up: 20
