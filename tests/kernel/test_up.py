"""`agentwatch up | ps | down` (issue #17) on the real kernel, on a daemon
of its own state directory: a manifest's agents all start as daemon runs
with their weights in their cgroups, show in ps, and all stop with down,
leaving no cgroup and no supervisor behind; a supervisor killed with
SIGKILL still stops its runs (a client that dies stops its run); an agent
that cannot start stops the others and `up` says which and why."""
import json
import os
import signal
import sys

import pytest

from conftest import REPO, aw, own_daemon, wait_for

sys.path.insert(0, REPO)
from bench.lib import process_gone  # noqa: E402

pytestmark = pytest.mark.kernel

POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {name: sleepers}
identity: {name: "sleeper-*"}
"""
WEIGHTS = {"sleeper-1": 100, "sleeper-2": 300, "sleeper-3": 1000}


@pytest.fixture(scope="module")
def up_daemon(tmp_path_factory):
    yield from own_daemon(tmp_path_factory, "updaemon")


@pytest.fixture
def on_daemon(up_daemon, monkeypatch):
    """The daemon's state dir and env, also for this process's look-ups."""
    d, env = up_daemon
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(d))
    return d, env


def manifest(tmp_path, name, agents):
    (tmp_path / "p.yaml").write_text(POLICY)
    lines = ["apiVersion: agentwatch/v1", "kind: AgentManifest", f"metadata: {{name: {name}}}", "agents:"]
    for agent, weight, command in agents:
        lines.append(f"  - {{name: {agent}, command: {json.dumps(command)}, policy: p.yaml, "
                     f"weight: {weight}, workspace: ., env: {{UP_TEST: '1'}}}}")
    path = tmp_path / "m.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def sleepers(tmp_path, name):
    return manifest(tmp_path, name, [(a, w, ["/bin/sleep", "600"]) for a, w in WEIGHTS.items()])


def record(state, name):
    with open(state / "up" / f"{name}.json") as f:
        return json.load(f)


def ps_rows(env):
    r = aw("ps", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def cpu_weight_file(run_id, applied):
    """The file that holds the run's weight: cgroup v2 cpu.weight, or the
    v1 cpu hierarchy's cpu.shares (sandbox/limits.py)."""
    from agentwatch.sandbox import cgroups
    from agentwatch.sandbox.limits import v1_mounts
    if applied == "v2":
        return os.path.join(cgroups.root_path(), run_id, "cpu.weight")
    return os.path.join(v1_mounts()["cpu"], "agentwatch", run_id, "cpu.shares")


def expected_value(applied, weight):
    return weight if applied == "v2" else min(262144, max(2, weight * 1024 // 100))


def left_behind(run_ids):
    from agentwatch.sandbox.cgroups import leftover_cgroups
    from agentwatch.sandbox.limits import leftover_v1
    return ({r for r in leftover_cgroups() if r in run_ids}
            | {os.path.basename(d) for d in leftover_v1() if os.path.basename(d) in run_ids})


def test_up_ps_down(tmp_path, on_daemon):
    state, env = on_daemon
    path = sleepers(tmp_path, "trio")
    r = aw("up", path, env=env, timeout=180)
    assert r.returncode == 0, r.stderr + r.stdout
    rec = record(state, "trio")
    assert rec["state"] == "running" and len(rec["agents"]) == 3
    supervisor = rec["pid"]
    run_ids = {e["name"]: e["run_id"] for e in rec["agents"]}
    assert all(run_ids.values()), rec
    assert all(run_ids[a] in r.stdout for a in WEIGHTS), r.stdout

    # ps: all three running, with their weights and the manifest's name
    rows = {row["agent"]: row for row in ps_rows(env) if row["manifest"] == "trio"}
    assert set(rows) == set(WEIGHTS)
    for agent, weight in WEIGHTS.items():
        row = rows[agent]
        assert (row["run_id"], row["status"], row["weight"]) == (run_ids[agent], "running", weight)
        assert row["uptime"] is not None and row["stats"] == {}
    table = aw("ps", env=env).stdout.splitlines()
    assert table[0].split()[:6] == ["RUN_ID", "AGENT", "STATUS", "MANIFEST", "WEIGHT", "UPTIME"]
    assert sum(" trio " in line for line in table) == 3

    # each run's cgroup holds its weight, and its start event says so
    from agentwatch import api
    for agent, weight in WEIGHTS.items():
        enf = api.find_run(run_ids[agent]).identity["enforcement"]
        applied = enf["limits_applied"]["weight"]
        assert enf["weight"] == weight
        with open(cpu_weight_file(run_ids[agent], applied)) as f:
            assert int(f.read()) == expected_value(applied, weight)
        # the agent's environment has the manifest's env, its log is under up/
        assert api.find_run(run_ids[agent]).identity["cwd"] == str(tmp_path)
    assert os.path.isfile(state / "up" / "trio" / "sleeper-1.events.jsonl")

    # a second up of the same manifest is refused while it is up
    again = aw("up", path, env=env)
    assert again.returncode != 0 and "already up" in again.stderr, again.stderr

    d = aw("down", "trio", env=env, timeout=120)
    assert d.returncode == 0, d.stderr + d.stdout
    assert "trio: down" in d.stdout
    for agent in WEIGHTS:
        run = api.find_run(run_ids[agent])
        assert run.status == "exited" and run.exit_status == 128 + signal.SIGTERM, run
    assert not (state / "up" / "trio.json").exists()
    assert process_gone(supervisor), "the supervisor outlived down"
    assert left_behind(set(run_ids.values())) == set()
    assert [row for row in ps_rows(env) if row["manifest"] == "trio"] == []


def test_a_killed_supervisor_still_stops_its_runs(tmp_path, on_daemon):
    state, env = on_daemon
    r = aw("up", sleepers(tmp_path, "doomed"), env=env, timeout=180)
    assert r.returncode == 0, r.stderr + r.stdout
    rec = record(state, "doomed")
    run_ids = {e["run_id"] for e in rec["agents"]}
    os.kill(rec["pid"], signal.SIGKILL)
    from agentwatch import api
    wait_for(lambda: all(api.find_run(i).status != "running" for i in run_ids), timeout=30,
             what="the runs of a killed supervisor to stop")
    wait_for(lambda: left_behind(run_ids) == set(), timeout=30, what="their cgroups to go")
    rows = [row for row in ps_rows(env) if row["manifest"] == "doomed"]
    assert len(rows) == 3 and all(row["status"] == "exited" for row in rows), rows
    d = aw("down", "doomed", env=env)               # the stale record is cleared
    assert d.returncode == 0, d.stderr
    assert not (state / "up" / "doomed.json").exists()


def test_an_agent_that_cannot_start_stops_the_others(tmp_path, on_daemon):
    state, env = on_daemon
    path = manifest(tmp_path, "broken", [("sleeper-1", 100, ["/bin/sleep", "600"]),
                                         ("sleeper-2", 100, ["/no/such/agent"])])
    r = aw("up", path, env=env, timeout=180)
    assert r.returncode == 1, r.stderr + r.stdout
    assert "broken/sleeper-2:" in r.stderr and "not found" in r.stderr, r.stderr
    assert not (state / "up" / "broken.json").exists()
    from agentwatch import api
    mine = [run for run in api.list_runs() if run.agent == "sleeper-1"
            and (run.identity.get("cwd") == str(tmp_path))]
    assert mine and all(run.status != "running" for run in mine), mine
    assert left_behind({run.run_id for run in mine}) == set()

