"""Semantic termination on the real kernel (issue #20): scripted agents, one
per reason, each run stopped by its policy's termination section (or not),
with `agentwatch run`'s exit status and the end event's termination."""
import time

import pytest

from conftest import aw, read_events

pytestmark = pytest.mark.kernel

HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: term}\n"


def run(tmp_path, termination, script, timeout=60):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    policy = tmp_path / "p.yaml"
    policy.write_text(HEAD + "termination:\n" + termination)
    agent = tmp_path / "agent.sh"
    agent.write_text("#!/bin/sh\n" + script)
    agent.chmod(0o755)
    ev = tmp_path / "events.jsonl"
    t0 = time.monotonic()
    r = aw("run", "--no-daemon", "--policy", str(policy), "--workspace", str(ws), "--events", str(ev),
           "--", "/bin/sh", str(agent), cwd=str(ws), timeout=timeout)
    took = time.monotonic() - t0
    events = read_events(ev)
    ends = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"]
    assert len(ends) == 1, r.stderr
    return r, ends[0]["detail"], took


def test_a_done_file_stops_a_sleeping_agent_at_once_with_status_0(state_dir, tmp_path):
    r, end, took = run(tmp_path, '  done: [{file: "${WORKSPACE}/DONE"}]\n  grace: 1s\n',
                       "echo ok > DONE\nexec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"], t["condition"]) == (0, "done", "termination.done[0]"), r.stderr
    assert t["evidence"]["file"] == str(tmp_path / "ws" / "DONE")
    assert end["exit_status"] == 128 + 15 and took < 30


def test_a_done_file_whose_content_must_match(state_dir, tmp_path):
    r, end, _ = run(tmp_path, '  done: [{file: "${WORKSPACE}/status", matches: "^PASS"}]\n',
                    "echo FAIL > status\n/bin/sleep 1.5\necho PASS 3/3 > status\nexec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"], t["evidence"]["matched"]) == (0, "done", "PASS 3/3"), r.stderr


def test_a_done_command_runs_in_the_sandbox_and_its_execs_are_no_loop(state_dir, tmp_path):
    r, end, _ = run(tmp_path, '  done: [{command: [/usr/bin/test, -e, flag], every: 1s}]\n'
                              '  loop: {exec: 3}\n',
                    "/bin/sleep 2.5\n: > flag\nexec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"]) == (0, "done"), (r.stderr, t)
    assert t["evidence"]["command"] == ["/usr/bin/test", "-e", "flag"] and t["evidence"]["checks"] >= 2


def test_the_same_exec_k_times_is_a_loop(state_dir, tmp_path):
    r, end, _ = run(tmp_path, "  loop: {exec: 5}\n",
                    "for i in 1 2 3 4 5; do /bin/true; done\nexec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"], t["condition"]) == (81, "loop", "termination.loop.exec"), r.stderr
    assert t["evidence"]["argv"] == ["/bin/true"] and t["evidence"]["count"] == 5


def test_k_minus_one_execs_then_exit_is_an_exit(state_dir, tmp_path):
    r, end, _ = run(tmp_path, "  loop: {exec: 5}\n",
                    "for i in 1 2 3 4; do /bin/true; done\n/bin/sleep 0.5\nexit 7\n")
    assert (r.returncode, end["termination"]) == (7, {"reason": "exit", "condition": None,
                                                      "evidence": {"exit_status": 7}}), r.stderr


def test_a_b_a_b_workspace_states_are_a_loop(state_dir, tmp_path):
    r, end, _ = run(tmp_path, "  loop: {workspace: 2}\n",
                    "for s in A B A B A B A; do echo $s > f; /bin/sleep 0.7; done\nexec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"], t["condition"]) == (81, "loop", "termination.loop.workspace"), r.stderr
    assert t["evidence"]["returns"] == 2


def test_a_sleeping_agent_makes_no_progress(state_dir, tmp_path):
    r, end, took = run(tmp_path, "  no_progress: 2s\n  grace: 1s\n", "exec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"]) == (82, "no_progress"), r.stderr
    assert t["evidence"]["idle_seconds"] >= 2 and took < 30


def test_an_exec_budget(state_dir, tmp_path):
    r, end, _ = run(tmp_path, "  budget: {execs: 10}\n",
                    "i=0; while [ $i -lt 50 ]; do /bin/echo $i > /dev/null; i=$((i+1)); done\n"
                    "exec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["reason"], t["condition"]) == (83, "budget", "termination.budget.execs"), r.stderr
    assert t["evidence"]["execs"] >= 10


def test_a_failing_command_again_is_a_loop(state_dir, tmp_path):
    r, end, _ = run(tmp_path, "  loop: {failing: 3}\n",
                    "for i in 1 2 3; do /bin/false; done\nexec /bin/sleep 60\n")
    t = end["termination"]
    assert (r.returncode, t["condition"]) == (81, "termination.loop.failing"), r.stderr
    assert t["evidence"]["argv"] == ["/bin/false"] and t["evidence"]["exit_status"] == 1
