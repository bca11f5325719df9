"""Export for fleets, on a real daemon: after a run with a violation, its
/metrics endpoint (scraped with urllib) counts the events, the violation
by category, rule and agent, and the run; the BPF programs' statistics
count under --bpf-stats (and the sysctl is as before once it stopped);
an OTLP/HTTP receiver on loopback got the violation as a log record with
the run's identity and the run as a span, flushed at the daemon's stop."""
import os
import sys
import time
import urllib.request

import pytest
from conftest import REPO, aw, read_events

sys.path.insert(0, os.path.join(REPO, "tests", "unit"))
from otlp_receiver import Receiver, attrs  # noqa: E402
from test_daemon import _assert_gone, _client  # noqa: E402

pytestmark = pytest.mark.kernel
POLICIES = os.path.join(REPO, "policies")
SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def _scrape(url):
    """{(name, {labels}) as a frozenset key: value} of the exposition text."""
    out = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = frozenset(tuple(p.split("=", 1)) for p in labels.rstrip("}").split(",") if p) if labels else frozenset()
        out[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def _value(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_metrics_and_otlp_of_a_run_with_a_violation(tmp_path):
    with open(SYSCTL) as f:
        stats_before = f.read().strip()
    rx = Receiver()
    state = tmp_path / "state"
    state.mkdir()
    env = {"AGENTWATCH_STATE_DIR": str(state)}
    r = aw("daemon", "start", "--metrics", "127.0.0.1:0", "--otlp", rx.url, "--bpf-stats", env=env, timeout=180)
    assert r.returncode == 0, r.stderr + r.stdout
    pid = int(r.stdout.split("pid ")[1].split(",")[0])
    try:
        url = r.stdout.split("metrics on ")[1].split(";")[0].strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), r.stdout
        # the policy denies ${HOME}/.ssh: a read of a key there is the violation
        key = tmp_path / "home" / ".ssh" / "id_rsa"
        key.parent.mkdir(parents=True)
        key.write_text("SECRET-KEY\n")
        (tmp_path / "ws").mkdir()
        out, err = _client(dict(env, HOME=str(key.parent.parent)), "--daemon", "--allow-downgrade", "--policy",
                           os.path.join(POLICIES, "sandboxed-agent.yaml"), "--", "/bin/cat", str(key),
                           cwd=str(tmp_path / "ws")).communicate(timeout=120)
        assert "SECRET-KEY" not in out, out
        run_id = err.split("agentwatch: run ")[1].split()[0]
        evs = read_events(state / "runs" / run_id / "events.jsonl")
        viol = next(e for e in evs if e["kind"] == "violation" and e["rule"] == "filesystem.deny")
        agent = viol["agent"]

        s = _scrape(url)
        # every event the run logged is counted (the seal included), by kind
        assert _value(s, "agentwatch_events_total") == len(evs)
        assert _value(s, "agentwatch_events_total", kind="violation") == sum(1 for e in evs if e["kind"] == "violation")
        assert _value(s, "agentwatch_violations_total", category="filesystem", rule="filesystem.deny",
                      agent=agent) >= 1
        assert _value(s, "agentwatch_runs_started_total") == 1
        assert _value(s, "agentwatch_runs_finished_total") == 1
        assert _value(s, "agentwatch_runs_active") == 0
        assert _value(s, "agentwatch_ring_records_received_total") > 0
        assert ("agentwatch_ring_records_lost_total", frozenset({("ring", "bulk")})) in s
        # the sensors' programs ran while stats were on (BPF_ENABLE_STATS: the sysctl itself may read 0)
        assert _value(s, "agentwatch_bpf_stats_enabled") == 1
        assert _value(s, "agentwatch_bpf_prog_run_count_total") > 0
        assert _value(s, "agentwatch_bpf_prog_run_time_seconds_total") > 0
        assert any(n == "agentwatch_bpf_prog_run_count_total" and dict(ls)["name"] for n, ls in s)
    finally:
        t0 = time.monotonic()
        stop = aw("daemon", "stop", env=env, timeout=60)
        _assert_gone(pid, state)
        rx.close()
    assert stop.returncode == 0, stop.stderr
    assert time.monotonic() - t0 < 30
    with open(SYSCTL) as f:
        assert f.read().strip() == stats_before          # the kernel's setting, as it was

    logs = [attrs(rec.attributes) for _, rec in rx.logs]
    v = next(a for a in logs if a.get("agentwatch.violation.rule") == "filesystem.deny")
    assert v["agentwatch.run_id"] == run_id and v["agentwatch.agent"] == agent
    assert v["agentwatch.violation.category"] == "filesystem" and v["agentwatch.violation.action"]
    assert v["agentwatch.cgroup"].endswith(run_id) and v["agentwatch.root_pid"] > 0
    assert v["agentwatch.pid"] == viol["pid"]
    assert {a["agentwatch.lifecycle.phase"] for a in logs if a["agentwatch.event.kind"] == "lifecycle"} >= {"start", "end"}
    assert not any(a["agentwatch.event.kind"] == "file" for a in logs)    # violations and lifecycle only
    [(res, span)] = [(res, sp) for res, sp in rx.spans if attrs(sp.attributes)["agentwatch.run_id"] == run_id]
    assert res["service.name"] == "agentwatch"
    end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
    assert span.end_time_unix_nano == int(end["ts"] * 1e9) and span.start_time_unix_nano < span.end_time_unix_nano
    assert attrs(span.attributes)["agentwatch.exit_status"] == end["detail"]["exit_status"]
