"""agentwatch/follow.py (and the run records of agentwatch/core/state.py it reads).

follow() is driven single-threaded: its `stop` callback runs once per poll
round, so each test scripts what the "agent" appends between rounds and
checks what had been yielded so far.
"""
import json
import os
import subprocess
from datetime import datetime, timezone

import pytest

from agentwatch.core import state
from agentwatch.follow import Filter, follow, parse_since

NOW = 1_800_000_000.0


# ---- parse_since ----------------------------------------------------------------

@pytest.mark.parametrize("text, ago", [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400),
                                       ("1.5h", 5400), (" 45s ", 45), ("0s", 0)])
def test_parse_since_relative(text, ago):
    assert parse_since(text, now=NOW) == NOW - ago


def test_parse_since_unix_time():
    assert parse_since("1795843221.5", now=NOW) == 1795843221.5
    assert parse_since("1795843221", now=NOW) == 1795843221.0


def test_parse_since_iso_date():
    assert parse_since("2026-11-28T10:00:00+00:00") == datetime(2026, 11, 28, 10, tzinfo=timezone.utc).timestamp()
    assert parse_since("2026-11-28T10:00") == datetime(2026, 11, 28, 10, 0).timestamp()   # local time
    assert parse_since("2026-11-28") == datetime(2026, 11, 28).timestamp()


@pytest.mark.parametrize("bad", ["nonsense", "", "10x", "m", "h1", "10 m", "2026-13-45", "--5m"])
def test_parse_since_rejects_with_help(bad):
    with pytest.raises(ValueError) as e:
        parse_since(bad, now=NOW)
    msg = str(e.value)
    assert "--since" in msg and repr(bad.strip()) in msg
    assert "30s" in msg and "ISO" in msg      # says what would have worked


# ---- Filter ----------------------------------------------------------------------

EXEC = {"kind": "exec", "agent": "coder-1", "ts": 100.0, "pid": 1}
VIOL = {"kind": "violation", "agent": "browser", "ts": 200.0, "pid": 2}


def test_filter_default_matches_everything():
    assert Filter().match(EXEC) and Filter().match(VIOL) and Filter().match({})


def test_filter_kinds_and_violations():
    assert Filter(kinds=("exec", "file")).match(EXEC)
    assert not Filter(kinds=("file",)).match(EXEC)
    assert Filter(violations=True).match(VIOL)
    assert not Filter(violations=True).match(EXEC)


def test_filter_agent_glob_is_case_sensitive():
    assert Filter(agent="coder-*").match(EXEC)
    assert Filter(agent="coder-1").match(EXEC)
    assert not Filter(agent="coder").match(EXEC)
    assert not Filter(agent="CODER-*").match(EXEC)
    assert not Filter(agent="coder-*").match({"kind": "exec"})


def test_filter_since():
    assert Filter(since=150.0).match(VIOL)
    assert not Filter(since=150.0).match(EXEC)
    assert Filter(since=100.0).match(EXEC)       # inclusive


def test_filter_combines_with_and():
    f = Filter(agent="browser", violations=True, since=150.0)
    assert f.match(VIOL)
    assert not f.match(dict(VIOL, agent="coder-1"))
    assert not f.match(dict(VIOL, ts=1.0))


# ---- state dir helpers ---------------------------------------------------------------

def alive_owner():
    return {"pid": os.getpid(), "start_time": state.process_start_time(os.getpid())}


def dead_owner():
    p = subprocess.Popen(["true"])
    start = state.process_start_time(p.pid)
    p.wait()
    return {"pid": p.pid, "start_time": start}


def make_run(run_id, status="running", owner=None, events=(), agent="coder"):
    d = os.path.join(state.runs_dir(), run_id)
    os.makedirs(d)
    state.write_json_atomic(os.path.join(d, "run.json"), {
        "run_id": run_id, "agent": agent, "status": status,
        "owner": alive_owner() if owner is None else owner})
    with open(os.path.join(d, "events.jsonl"), "w") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")
    return os.path.join(d, "events.jsonl")


def append(path, text):
    with open(path, "a") as f:
        f.write(text)


def ev(n, kind="file", ts=None, agent="coder"):
    return {"kind": kind, "n": n, "ts": NOW + n if ts is None else ts, "agent": agent, "pid": 1}


def line(n, **kw):
    return json.dumps(ev(n, **kw)) + "\n"


class Script:
    """stop() callback running one scripted step per poll round; the step
    gets the list of events yielded so far. Stops after the last step."""

    def __init__(self, *steps):
        self.steps = list(steps)
        self.got = []

    def __call__(self):
        if not self.steps:
            return True
        self.steps.pop(0)(self.got)
        return False

    def run(self, flt, **kw):
        for d in follow(flt, poll_interval=0, stop=self, **kw):
            self.got.append(d)
        assert not self.steps, "follow() ended before the script did"
        return self.got


# ---- follow(): live ------------------------------------------------------------------

def test_live_yields_only_new_lines(state_dir):
    path = make_run("20261128-000000-aaaaaa", events=[ev(1), ev(2)])
    got = Script(lambda got: append(path, line(3)),
                 lambda got: append(path, line(4) + line(5))).run(Filter())
    assert [d["n"] for d in got] == [3, 4, 5]


def test_live_holds_a_partial_line_until_complete(state_dir):
    path = make_run("20261128-000000-aaaaaa")
    full = line(7)

    def check_nothing_yet(got):
        assert got == [], "a partial line was yielded"
        append(path, full[10:])

    got = Script(lambda got: append(path, full[:10]),
                 check_nothing_yet,
                 lambda got: None).run(Filter())
    assert [d["n"] for d in got] == [7]


def test_live_skips_garbage_and_blank_lines(state_dir):
    path = make_run("20261128-000000-aaaaaa")
    got = Script(lambda got: append(path, "\n{not json\n" + line(1) + "   \n" + line(2))).run(Filter())
    assert [d["n"] for d in got] == [1, 2]


def test_live_picks_up_runs_started_later(state_dir):
    make_run("20261128-000000-aaaaaa")

    def start_new_run(got):
        make_run("20261128-000001-bbbbbb", events=[ev(1), ev(2)])   # read from its start

    got = Script(start_new_run, lambda got: None).run(Filter(), rescan_every=0)
    assert [d["n"] for d in got] == [1, 2]


def test_live_ignores_finished_runs(state_dir):
    done = make_run("20261128-000000-aaaaaa", status="exited", events=[ev(1)])
    got = Script(lambda got: append(done, line(2))).run(Filter())
    assert got == []


def test_live_applies_the_filter(state_dir):
    path = make_run("20261128-000000-aaaaaa")
    got = Script(lambda got: append(path, line(1) + line(2, kind="violation") + line(3))).run(
        Filter(violations=True))
    assert [d["n"] for d in got] == [2]


def test_since_replays_older_events_of_live_runs(state_dir):
    make_run("20261128-000000-aaaaaa", events=[ev(1, ts=10.0), ev(2, ts=50.0)])
    got = Script(lambda got: None).run(Filter(since=20.0))
    assert [d["n"] for d in got] == [2]


# ---- follow(): one run -----------------------------------------------------------------

def must_not_poll():
    """stop() for follows that must end by themselves: polling again means a hang."""
    raise AssertionError("follow() kept polling a run that has ended")


def test_run_replays_a_finished_run_and_ends(state_dir):
    make_run("20261128-000000-aaaaaa", status="exited", events=[ev(1), ev(2), ev(3)])
    make_run("20261128-000001-bbbbbb", events=[ev(9)])
    got = list(follow(Filter(run="20261128-000000"), poll_interval=0, stop=must_not_poll))   # unique prefix
    assert [d["n"] for d in got] == [1, 2, 3]


def test_run_reads_a_crashed_run_to_its_end(state_dir):
    make_run("20261128-000000-aaaaaa", status="running", owner=dead_owner(), events=[ev(1)])
    assert [d["n"] for d in follow(Filter(run="20261128-000000-aaaaaa"), poll_interval=0,
                                               stop=must_not_poll)] == [1]


def test_run_follows_a_live_run_until_it_ends(state_dir):
    rid = "20261128-000000-aaaaaa"
    path = make_run(rid, events=[ev(1)])

    def end_run(got):
        append(path, line(3))                     # written while ending
        rec = state.read_json(state.run_path(rid, "run.json"))
        state.write_json_atomic(state.run_path(rid, "run.json"), dict(rec, status="exited"))

    def still_polling(got):
        raise AssertionError("follow() did not notice that the run ended")

    script = Script(lambda got: append(path, line(2)), end_run, still_polling)
    got = [d["n"] for d in follow(Filter(run=rid), poll_interval=0, rescan_every=0, stop=script)]
    assert got == [1, 2, 3]


def test_run_with_no_follow_reads_what_is_there(state_dir):
    make_run("20261128-000000-aaaaaa", events=[ev(1), ev(2)])           # still running
    got = list(follow(Filter(run="20261128-000000-aaaaaa"), follow=False, stop=must_not_poll))
    assert [d["n"] for d in got] == [1, 2]


def test_unknown_run_raises_lookup_error(state_dir):
    make_run("20261128-000000-aaaaaa")
    with pytest.raises(LookupError) as e:
        next(follow(Filter(run="nope")))
    assert "nope" in str(e.value) and str(state_dir) in str(e.value)


def test_ambiguous_prefix_is_unknown(state_dir):
    make_run("20261128-000000-aaaaaa", status="exited")
    make_run("20261128-000000-bbbbbb", status="exited")
    with pytest.raises(LookupError):
        next(follow(Filter(run="20261128-000000")))


# ---- follow(): progress of a replay --------------------------------------------------------

def test_progress_reports_the_replay_in_chunks_then_live_adds_none(state_dir, monkeypatch):
    import agentwatch.follow as F
    monkeypatch.setattr(F, "CHUNK", 64)
    path = make_run("20261128-000000-aaaaaa", events=[ev(i) for i in range(20)])
    total = os.path.getsize(path)
    calls = []

    def progress(done, total_):
        calls.append((done, total_, len(got)))

    got = []
    script = Script(lambda g: append(path, line(99)), lambda g: None)
    for d in follow(Filter(since=0), poll_interval=0, stop=script, progress=progress):
        got.append(d)
        script.got.append(d)
    assert [d["n"] for d in got] == list(range(20)) + [99]
    assert all(t == total for _, t, _ in calls)
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and len(dones) > total // 64 - 1      # a call per chunk
    assert calls[-1][:2] == (total, total) and calls[-1][2] == 20        # over before the live line
    assert dones.count(total) <= 2                                      # nothing after it


def test_progress_of_one_run_replay_ends_with_done_equal_total(state_dir):
    path = make_run("20261128-000000-aaaaaa", status="exited", events=[ev(1), ev(2)])
    calls = []
    got = list(follow(Filter(run="20261128-000000-aaaaaa"), poll_interval=0, stop=must_not_poll,
                      progress=lambda done, total: calls.append((done, total))))
    assert [d["n"] for d in got] == [1, 2]
    size = os.path.getsize(path)
    assert calls[0] == (size, size) and calls[-1] == (size, size)


def test_progress_when_nothing_to_replay_is_one_empty_call(state_dir):
    path = make_run("20261128-000000-aaaaaa", events=[ev(1)])       # live: its past is not replayed
    calls = []
    got = Script(lambda g: append(path, line(2))).run(
        Filter(), progress=lambda done, total: calls.append((done, total)))
    assert [d["n"] for d in got] == [2] and calls == [(0, 0)]


# ---- state.list_runs --------------------------------------------------------------------

def test_list_runs_status(state_dir):
    make_run("20261128-000000-aaaaaa", owner=alive_owner())
    make_run("20261128-000001-bbbbbb", owner=dead_owner())
    make_run("20261128-000002-cccccc", owner={"pid": os.getpid(), "start_time": 1})   # pid reused
    make_run("20261128-000003-dddddd", owner={})
    make_run("20261128-000004-eeeeee", status="exited", owner=dead_owner())
    runs = state.list_runs()
    assert [(r["run_id"][-6:], r["status"]) for r in runs] == [
        ("aaaaaa", "running"), ("bbbbbb", "crashed"), ("cccccc", "crashed"),
        ("dddddd", "crashed"), ("eeeeee", "exited")]


def test_list_runs_tolerates_missing_and_broken_records(state_dir, tmp_path, monkeypatch):
    assert state.list_runs() == []                       # no runs/ yet
    make_run("20261128-000000-aaaaaa")
    os.makedirs(state.run_path("20261128-000001-broken"))
    with open(state.run_path("20261128-000001-broken", "run.json"), "w") as f:
        f.write("{truncated")
    assert [r["run_id"] for r in state.list_runs()] == ["20261128-000000-aaaaaa"]
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(tmp_path / "does-not-exist"))
    assert state.list_runs() == []
