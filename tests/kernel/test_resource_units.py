"""Durations and sizes through `agentwatch run` itself (issue #15): a value
lint accepts is the limit the run applies, and a value it rejects is one
`agentwatch: error:` line, never a traceback. The grammar is tested in
tests/unit/test_units.py; these pin the two reports that started it:
wall_time "1h30m" (the plan's old parser knew one unit) and memory "1P"
(the limits' old parser knew no P)."""
import json
import time

import pytest

from conftest import aw, read_events

pytestmark = pytest.mark.kernel
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: units}\n"
# the agent prints the memory limit of its own cgroup, v2 or (hybrid hosts) v1
PRINT_MEMORY_LIMIT = r"""
while IFS=: read -r _ ctl path; do
  case "$ctl" in
    memory) cat "/sys/fs/cgroup/memory$path/memory.limit_in_bytes" ;;
    "") cat "/sys/fs/cgroup/unified$path/memory.max" 2>/dev/null || : ;;   # absent without the v2 controller
  esac
done < /proc/self/cgroup
"""


def policy(tmp_path, resources):
    p = tmp_path / "policy.yaml"
    p.write_text(HEAD + f"resources: {resources}\n")
    return str(p)


def identity(state_dir):
    from agentwatch.core import state
    runs = state.list_runs()
    assert len(runs) == 1
    return state.read_json(state.run_path(runs[0]["run_id"], "run.json"))["identity"]


def test_hours_and_minutes_and_petabytes_are_the_limits_applied(state_dir, tmp_path):
    path = policy(tmp_path, '{wall_time: "1h30m", memory: "1P"}')
    lint = aw("policy", "lint", path)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    r = aw("run", "--policy", path, "--", "/bin/sh", "-c", PRINT_MEMORY_LIMIT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert str(1 << 50) in r.stdout.split(), r.stdout        # the kernel holds 1P, as written
    enforcement = identity(state_dir)["enforcement"]
    assert enforcement["wall_time"] == 5400
    assert enforcement["limits"] == {"memory": "1P"}
    assert enforcement["limits_applied"]["memory"] in ("v1", "v2")


def test_a_wall_time_of_several_units_stops_the_agent(state_dir, tmp_path):
    ev = tmp_path / "events.jsonl"
    start = time.monotonic()
    r = aw("run", "--policy", policy(tmp_path, '{wall_time: "0h0m2s"}'), "--events", str(ev),
           "--", "/bin/sleep", "60")
    assert time.monotonic() - start < 30, "the wall_time limit did not stop the agent"
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert identity(state_dir)["enforcement"]["wall_time"] == 2
    hits = [e for e in read_events(ev) if e["kind"] == "violation" and e["rule"] == "resources.wall_time"]
    assert hits and "ran longer than 2 s" in json.dumps(hits[0]), hits


@pytest.mark.parametrize("resources, message", [
    ('{wall_time: "1h 30m"}', "resources.wall_time: expected a duration like"),
    ('{wall_time: "0s"}', "resources.wall_time: must be more than zero"),
    ('{memory: "1E"}', "resources.memory: expected a size like"),
    ('{memory: "8192P"}', "resources.memory: must be at most 2^63 - 1 bytes"),
    # linted clean before, then Limits.setup died on the kernel's EINVAL / ERANGE
    ("{cpu: 0.001}", "resources.cpu: expected a number of CPUs like 1.5 (0.01-4096)"),
    ("{pids: 1000000000000000000000000000000}", "resources.pids: must be at most 4194304"),
])
def test_a_bad_value_is_one_error_line(state_dir, tmp_path, resources, message):
    path = policy(tmp_path, resources)
    r = aw("run", "--policy", path, "--", "/bin/true")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("agentwatch: error:")]
    assert len(errors) == 1, r.stderr
    assert errors[0].startswith(f"agentwatch: error: {path}:4:") and message in errors[0], r.stderr
    from agentwatch.core import state
    assert state.list_runs() == []                           # nothing started
