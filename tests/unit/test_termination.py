"""engine/termination.py's Terminator: each reason fires, and only that one."""
import os

import pytest

from agentwatch.core.events import ExecEvent, ExitEvent, FileEvent, ForkEvent, LlmEvent
from agentwatch.engine.termination import EXIT_STATUS, Terminator, exit_status
from agentwatch.policy.model import DoneCondition, TerminationRules


def term(ws, **rules):
    return Terminator(TerminationRules(**rules), str(ws), {"WORKSPACE": str(ws)}, 0.0)


def exec_(argv, pid=10, ret=0):
    return ExecEvent(pid=pid, argv=list(argv), filename=argv[0], ret=ret)


def write(t, ws, name, content, now):
    path = os.path.join(str(ws), name)
    with open(path, "w") as f:
        f.write(content)
    t.feed(FileEvent(pid=10, op="open", path=path, abspath=path, access=["write", "truncate"]), now)


def test_nothing_fires_without_a_condition(tmp_path):
    t = Terminator(None, str(tmp_path), now=0.0)
    for i in range(100):
        t.feed(exec_(["/bin/true"]))
    assert t.check(1e6) is None and t.progress(10)["execs"] == 100


@pytest.mark.parametrize("k", [2, 5])
def test_an_exec_loop_fires_at_k_and_not_at_k_minus_one(tmp_path, k):
    t = term(tmp_path, loop={"exec": k}, no_progress=1000)
    for _ in range(k - 1):
        t.feed(exec_(["/bin/true", "x"]))
    t.feed(exec_(["/bin/true", "y"]))          # another argv
    assert t.check(0.2) is None
    t.feed(exec_(["/bin/true", "x"]))
    got = t.check(0.4)
    assert (got.reason, got.condition, got.evidence["count"]) == ("loop", "termination.loop.exec", k)
    assert t.check(0.6) is got                 # once fired, the same


def test_a_workspace_change_resets_the_exec_counts(tmp_path):
    t = term(tmp_path, loop={"exec": 3})
    t.check(0.0)
    for i in range(4):
        t.feed(exec_(["/usr/bin/make", "test"]))
        t.feed(exec_(["/usr/bin/make", "test"]))
        write(t, tmp_path, "src.c", f"v{i}", i + 0.1)
        assert t.check(i + 0.9) is None, i
    t.feed(exec_(["/usr/bin/make", "test"]))
    t.feed(exec_(["/usr/bin/make", "test"]))
    t.feed(exec_(["/usr/bin/make", "test"]))
    assert t.check(10).condition == "termination.loop.exec"


def test_a_failing_command_loop_counts_argv_and_status(tmp_path):
    t = term(tmp_path, loop={"failing": 3})
    for pid, code in ((1, 1), (2, 2), (3, 1), (4, 0)):
        t.feed(exec_(["/usr/bin/pytest"], pid=pid))
        t.feed(ExitEvent(pid=pid, code=code))
    assert t.check(0.1) is None                 # status 1 twice, 2 once, 0 is no failure
    t.feed(exec_(["/usr/bin/pytest"], pid=5))
    t.feed(ExitEvent(pid=5, code=1))
    got = t.check(0.3)
    assert (got.reason, got.condition) == ("loop", "termination.loop.failing")
    assert got.evidence == {"argv": ["/usr/bin/pytest"], "exit_status": 1, "count": 3, "limit": 3}


def test_a_failed_exec_counts_as_failing(tmp_path):
    t = term(tmp_path, loop={"failing": 2})
    t.feed(ExecEvent(pid=1, argv=["nope"], ret=-2, error="ENOENT"))
    assert t.check(0.1) is None
    t.feed(ExecEvent(pid=2, argv=["nope"], ret=-2, error="ENOENT"))
    assert t.check(0.3).evidence["exit_status"] == "ENOENT"


def test_a_b_a_b_workspace_states_are_a_loop(tmp_path):
    t = term(tmp_path, loop={"workspace": 2})
    t.check(0.0)                                # the initial state
    now, got = 0.0, []
    for c in "ABABA":
        write(t, tmp_path, "f", c, now)
        now += 0.6
        got.append(t.check(now))
    assert got[:4] == [None] * 4
    assert (got[4].reason, got[4].condition, got[4].evidence["returns"]) == \
        ("loop", "termination.loop.workspace", 2)


def test_staying_in_one_state_is_no_loop(tmp_path):
    t = term(tmp_path, loop={"workspace": 2})
    t.check(0.0)
    for i in range(10):
        write(t, tmp_path, "f", "same", i * 0.6)
        assert t.check(i * 0.6 + 0.55) is None
    assert t.progress(10)["workspace_states"] == 2


def test_a_rewrite_within_one_mtime_tick_is_seen(tmp_path):
    """Same size, same mtime: the written path is re-hashed anyway."""
    t = term(tmp_path, loop={"workspace": 1000})
    t.check(0.0)
    write(t, tmp_path, "f", "A", 0.0)
    st = os.stat(tmp_path / "f")
    t.check(0.6)
    write(t, tmp_path, "f", "B", 0.7)
    os.utime(tmp_path / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    t.check(1.3)
    assert t.progress(2)["workspace_states"] == 3


def test_no_progress(tmp_path):
    t = term(tmp_path, no_progress=5)
    t.feed(exec_(["/bin/ls"]), 1.0)
    write(t, tmp_path, "f", "x", 3.0)
    assert t.check(7.9) is None
    outside = FileEvent(pid=1, op="open", abspath="/tmp/elsewhere", access=["write"])
    t.feed(outside, 7.5)                        # not in the workspace: no progress
    got = t.check(8.1)
    assert (got.reason, got.condition) == ("no_progress", "termination.no_progress")
    assert got.evidence["idle_seconds"] == pytest.approx(5.1)


def test_reads_are_no_progress(tmp_path):
    t = term(tmp_path, no_progress=2)
    t.feed(FileEvent(pid=1, op="open", abspath=str(tmp_path / "f"), access=["read"]), 1.5)
    assert t.check(2.1).reason == "no_progress"


@pytest.mark.parametrize("key, events, limit", [
    ("execs", [exec_(["/bin/x", str(i)]) for i in range(5)], 5),
    ("processes", [ForkEvent(pid=1, child=i) for i in range(3)], 3),
    ("llm_tokens", [LlmEvent(tokens_in=600, tokens_out=500)], 1000),
])
def test_budgets(tmp_path, key, events, limit):
    t = term(tmp_path, budget={key: limit})
    for ev in events[:-1]:
        t.feed(ev)
    assert t.check(0.1) is None
    t.feed(events[-1])
    got = t.check(0.2)
    assert (got.reason, got.condition, got.evidence["limit"]) == ("budget", f"termination.budget.{key}", limit)


def test_bytes_written_budget(tmp_path):
    t = term(tmp_path, budget={"bytes_written": 3000})
    write(t, tmp_path, "a", "x" * 1000, 0.0)
    assert t.check(0.1) is None
    write(t, tmp_path, "a", "y" * 1500, 0.5)    # changed: its size again
    assert t.check(0.7) is None and t.bytes_written == 2500
    write(t, tmp_path, "b", "z" * 600, 0.8)
    got = t.check(1.3)
    assert (got.reason, got.evidence["bytes_written"]) == ("budget", 3100)


def test_wall_time_budget_is_a_timeout(tmp_path):
    t = term(tmp_path, budget={"wall_time": 10})
    assert t.check(9.9) is None
    got = t.check(10.0)
    assert (got.reason, got.condition) == ("timeout", "termination.budget.wall_time")


def test_a_done_file(tmp_path):
    t = term(tmp_path, done=(DoneCondition(file="${WORKSPACE}/DONE"),), loop={"exec": 2})
    assert t.check(0.1) is None
    write(t, tmp_path, "DONE", "", 0.2)
    t.feed(exec_(["/bin/a"]))
    t.feed(exec_(["/bin/a"]))                   # a loop too: done wins
    got = t.check(0.3)
    assert (got.reason, got.condition, got.evidence) == \
        ("done", "termination.done[0]", {"file": str(tmp_path / "DONE")})


def test_a_done_file_must_match(tmp_path):
    t = term(tmp_path, done=(DoneCondition(file="${WORKSPACE}/status", matches="^PASS"),))
    write(t, tmp_path, "status", "FAIL\nnot PASS\n", 0.0)
    assert t.check(0.1) is None
    write(t, tmp_path, "status", "tests:\nPASS 3/3\n", 0.2)
    assert t.check(0.3).evidence == {"file": str(tmp_path / "status"), "matched": "PASS 3/3"}


def test_a_done_file_is_checked_every_second_without_writes(tmp_path):
    t = term(tmp_path, done=(DoneCondition(file="${WORKSPACE}/DONE"),))
    assert t.check(0.0) is None
    (tmp_path / "DONE").write_text("")          # no event: the sensors did not see it
    assert t.check(0.5) is None
    assert t.check(1.1).reason == "done"


def test_a_done_command(tmp_path):
    started = []
    t = term(tmp_path, done=(DoneCondition(command=("/usr/bin/make", "-q"), every=30),))
    t.io.start_command = lambda i, argv, timeout: started.append((i, argv, timeout))
    assert t.check(1.0) is None and started == []
    write(t, tmp_path, "f", "x", 2.0)
    assert t.check(2.5) is None and started == []          # writes are not quiet yet
    assert t.check(3.1) is None and started == [(0, ["/usr/bin/make", "-q"], 10.0)]
    t.ignore(4242)                                          # the command's own events
    t.feed(ForkEvent(pid=4242, child=4243))
    t.feed(exec_(["/usr/bin/make", "-q"], pid=4243))
    t.command_result(0, 1, 0.2)
    assert t.check(3.5) is None and t.execs == 0 and t.processes == 0
    assert t.check(33.0) is None and len(started) == 1
    assert t.check(33.2) is None and len(started) == 2     # every 30 s
    t.command_result(0, 0, 0.3)
    got = t.check(33.4)
    assert got.reason == "done" and got.evidence == {"command": ["/usr/bin/make", "-q"], "exit_status": 0,
                                                     "seconds": 0.3, "checks": 2}


def test_exit_statuses():
    assert EXIT_STATUS == {"done": 0, "loop": 81, "no_progress": 82, "budget": 83, "timeout": 124,
                           "exit": None, "stopped": None, "violation": None}
    assert exit_status({"reason": "loop"}, 143) == 81
    assert exit_status({"reason": "exit"}, 7) == 7 and exit_status(None, 3) == 3
    assert exit_status({"reason": "stopped"}, 130) == 130


def test_a_tagged_message_to_the_named_recipient_is_done(tmp_path):
    from agentwatch.core.events import MsgEvent
    t = term(tmp_path, done=(DoneCondition(message={"to": "planner", "tag": "result"}),))
    for ev in (MsgEvent(op="send", peer="planner", tags=["context"], message_id="m1"),       # no tag
               MsgEvent(op="send", peer="reviewer", tags=["result"], message_id="m2"),      # another agent
               MsgEvent(op="send", peer="planner", tags=["result"], status="refused", message_id="m3"),
               MsgEvent(op="receive", peer="planner", tags=["result"], message_id="m4")):   # not this run's
        t.feed(ev, 1.0)
        assert t.check(1.0) is None
    t.feed(MsgEvent(op="forward", peer="planner", peer_run="r-p", tags=["fact", "result"], message_id="m5",
                    task_id="t5"), 2.0)
    got = t.check(2.0)
    assert (got.reason, got.condition) == ("done", "termination.done[0]")
    assert got.evidence == {"message_id": "m5", "to": "planner", "to_run": "r-p", "tag": "result", "task_id": "t5"}
