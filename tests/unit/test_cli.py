"""cli/main.py: exit codes and one-line errors, without root or the kernel.

Nothing here reaches the point where `run` would need root: every `run`
invocation fails on its input first.
"""
import io
import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from agentwatch.core import state
from cli.main import cli, main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_run(run_id, status, events=()):
    os.makedirs(state.run_path(run_id))
    owner = {"pid": os.getpid(), "start_time": state.process_start_time(os.getpid())}
    state.write_json_atomic(state.run_path(run_id, "run.json"), {
        "run_id": run_id, "agent": "coder", "status": status, "owner": owner, "root_pid": 99,
        "identity": {"start_time": 1795843221.0, "policy_name": "p", "policy_digest": "sha256:00",
                     "command": ["python3", "agent.py"]}})
    state.write_json_atomic(state.run_path(run_id, "stats.json"),
                            {"pids": 3, "events": len(events), "lost_events": 1, "lost_stash": 2})
    with open(state.run_path(run_id, "events.jsonl"), "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


# ---- run -------------------------------------------------------------------------

def test_run_without_command_is_a_usage_error(capsys, state_dir):
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "Usage:" in err and "COMMAND" in err


def test_run_with_missing_policy_is_one_line_error(capsys, state_dir):
    code = main(["run", "--policy", "/nonexistent.yaml", "--", "true"])
    assert code != 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("agentwatch: error: ")
    assert "/nonexistent.yaml" in lines[0]
    assert "Traceback" not in err and out == ""
    assert not os.listdir(state_dir), "a run was recorded before its input was checked"


def test_run_with_invalid_policy_names_the_line(capsys, tmp_path, state_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: AgentPolicy\nmetadata:\n  name: x\n   oops: 1\n")
    assert main(["run", "--policy", str(bad), "--", "true"]) != 0
    err = capsys.readouterr().err
    assert err.startswith(f"agentwatch: error: {bad}:4:")


def test_run_error_in_a_fresh_process_has_no_traceback(state_dir):
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "cli.main", "run", "--policy", "/nonexistent.yaml", "--", "true"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode not in (0, 2)       # an agentwatch error, not a usage error
    assert p.stderr.startswith("agentwatch: error: /nonexistent.yaml")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_run_unknown_option_before_the_command_is_a_usage_error(state_dir):
    # a fresh process, as a user types it: not "command not found: --resolv"
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "cli.main", "run", "--resolv", "x:1", "--", "true"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert "No such option '--resolv'. Did you mean '--resolve'?" in p.stderr
    assert "command not found" not in p.stderr and "Traceback" not in p.stderr
    assert not os.listdir(state_dir)


@pytest.mark.parametrize("argv, command", [
    (["--", "sh", "-c", "x", "--resolv", "--show"], ["sh", "-c", "x", "--resolv", "--show"]),
    (["sh", "-c", "x", "--resolv", "--show", "--"], ["sh", "-c", "x", "--resolv", "--show", "--"]),
    (["--show", "git", "--policy", "p"], ["git", "--policy", "p"]),
    (["--", "--not-an-option"], ["--not-an-option"]),
])
def test_run_passes_the_agents_own_options_through(argv, command, monkeypatch, state_dir):
    from agentwatch import api
    seen = []

    class Result:
        run_status = 7

    monkeypatch.setattr(api, "run", lambda options, daemon=None: seen.append(options) or Result())
    assert main(["run"] + argv) == 7
    assert seen[0].argv == command
    assert seen[0].show is (argv[0] == "--show")       # ours only before the command


def test_trial_has_the_same_options_rule(capsys, state_dir):
    assert main(["trial", "-n", "2", "--polcy", "p.yaml", "--", "true"]) == 2
    assert "No such option '--polcy'. Did you mean '--policy'?" in capsys.readouterr().err
    # the agent's options after CMD are not trial's: parsing got to trial's own checks
    assert main(["trial", "-n", "0", "true", "--polcy", "--bogus"]) == 1
    assert "-n 0: a trial needs at least one run" in capsys.readouterr().err


# ---- tail ------------------------------------------------------------------------

def test_tail_bad_since(capsys, state_dir):
    code = main(["tail", "--since", "nonsense"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--since" in err and "nonsense" in err and "Traceback" not in err


def test_tail_unknown_run(capsys, state_dir):
    assert main(["tail", "--run", "nope"]) == 1
    err = capsys.readouterr().err
    assert "nope" in err


def test_tail_replays_a_finished_run_as_json(state_dir):
    events = [{"kind": "exec", "ts": 1.0, "agent": "coder", "pid": 5, "run_id": "r"},
              {"kind": "violation", "ts": 2.0, "agent": "coder", "pid": 5, "run_id": "r",
               "category": "network", "rule": "egress", "action": "alert", "detail": {}, "count": 1}]
    make_run("20261128-000000-aaaaaa", "exited", events)
    r = CliRunner().invoke(cli, ["tail", "--run", "20261128-000000-aaaaaa", "--json"])
    assert r.exit_code == 0, r.output
    assert [json.loads(ln) for ln in r.output.splitlines()] == events
    r = CliRunner().invoke(cli, ["tail", "--run", "20261128", "--violations"])
    assert r.exit_code == 0
    assert len(r.output.splitlines()) == 1 and "ALERT" in r.output and "egress" in r.output


class TtyIO(io.StringIO):
    def isatty(self):
        return True


def test_replay_status_draws_then_clears_for_good():
    from cli.progress import StatusLine
    out = TtyIO()
    status = StatusLine(out, "replaying", every=0)
    status(1_500_000, 6_000_000)
    assert out.getvalue() == "\ragentwatch: replaying 1.5 of 6.0 MB (25%)\033[K"
    status.clear()                    # before an event line
    status(3_000_000, 6_000_000)
    status(6_000_000, 6_000_000)      # over
    assert out.getvalue().endswith("(50%)\033[K\r\033[K")
    n = len(out.getvalue())
    status(6_000_000, 6_000_000)
    status.clear()
    assert len(out.getvalue()) == n


def long_run(n=300):
    events = [{"kind": "exec", "ts": 1.0 + i, "agent": "coder", "pid": 5, "run_id": "r", "filename": "/x"}
              for i in range(n)]
    make_run("20261128-000000-aaaaaa", "exited", events)


def test_tail_replay_shows_progress_on_a_terminal_only(monkeypatch, capsys, state_dir):
    import agentwatch.follow as F
    monkeypatch.setattr(F, "CHUNK", 256)
    long_run()
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["tail", "--run", "20261128-000000-aaaaaa"]) == 0        # piped: no status
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 300 and err == ""
    tty = TtyIO()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(["tail", "--run", "20261128-000000-aaaaaa"]) == 0
    assert "agentwatch: replaying" in tty.getvalue() and tty.getvalue().endswith("\r\033[K")
    assert len(capsys.readouterr().out.splitlines()) == 300


def test_tail_colours_only_a_terminal_without_no_color(monkeypatch, state_dir):
    events = [{"kind": "violation", "ts": 2.0, "agent": "coder", "pid": 5, "run_id": "r",
               "category": "network", "rule": "network.egress", "action": "deny", "detail": {}, "count": 1}]
    make_run("20261128-000000-aaaaaa", "exited", events)
    for no_color, tty, coloured in (("", True, True), ("1", True, False), ("", False, False)):
        monkeypatch.setenv("NO_COLOR", no_color)
        out = TtyIO() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        assert main(["tail", "--run", "20261128-000000-aaaaaa"]) == 0
        assert ("\033[" in out.getvalue()) is coloured and "DENIED" in out.getvalue()


# ---- ps --------------------------------------------------------------------------

def test_ps_json_empty(capsys, state_dir):
    assert main(["ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_ps_json_without_state_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(tmp_path / "missing"))
    assert main(["ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_ps_lists_running_runs_only_unless_all(capsys, state_dir):
    make_run("20261128-000000-aaaaaa", "running")
    make_run("20261128-000001-bbbbbb", "exited")
    assert main(["ps", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == ["20261128-000000-aaaaaa"]
    row = rows[0]
    assert (row["agent"], row["status"], row["root_pid"], row["pids"], row["lost"]) == ("coder", "running", 99, 3, 3)
    assert row["command"] == "python3 agent.py" and row["policy"] == "p"
    assert main(["ps", "--all", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_ps_table(capsys, state_dir):
    make_run("20261128-000000-aaaaaa", "running")
    assert main(["ps"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["RUN_ID", "AGENT", "STATUS"]
    assert out[1].startswith("20261128-000000-aaaaaa") and "python3 agent.py" in out[1]


# ---- help ------------------------------------------------------------------------

COMMANDS = cli.list_commands(None)


def test_every_command_is_registered_and_loads():
    """Commands are imported when used (cli/main.py LazyGroup): each entry
    loads, under its own name."""
    assert {"run", "tail", "ps", "gc", "doctor", "daemon", "policy", "key", "log"} <= set(COMMANDS)
    for name in COMMANDS:
        cmd = cli.get_command(None, name)
        assert isinstance(cmd, click.Command) and cmd.name == name
    assert {"lint", "explain", "diff", "sign", "verify"} <= set(cli.get_command(None, "policy").commands)


def test_the_run_client_does_not_import_the_engine():
    """`agentwatch run` on the daemon: the client imports the CLI and the
    daemon protocol, not the runner, the policy engine or bcc."""
    code = ("import sys, cli.main, cli.run; "
            "heavy = [m for m in ('agentwatch.run', 'agentwatch.engine', 'agentwatch.policy', 'bcc') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "[]", r.stderr


@pytest.mark.parametrize("args", [["--help"], ["-h"]] + [[name, "--help"] for name in COMMANDS])
def test_help(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Usage:")
    if len(args) == 2:
        first_words = " ".join(cli.get_command(None, args[0]).help.split()[:5])
        assert first_words in " ".join(r.output.split())


def test_main_help_returns_zero(capsys):
    assert main(["--help"]) == 0
    assert "Commands:" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "frobnicate" in capsys.readouterr().err


# ---- up / down / ps with a manifest's record ------------------------------------

def make_up_record(name, agents, pid=None, start_time=None):
    """<state dir>/up/NAME.json as the supervisor writes it (cli/up.py)."""
    os.makedirs(os.path.join(state.state_dir(), "up"), exist_ok=True)
    rec = {"manifest": name, "path": "/m.yaml", "pid": pid, "start_time": start_time, "started": 1.0,
           "state": "running", "log": "/x.log",
           "agents": [{"name": a, "run_id": r, "weight": w, "state": "running", "exit_status": None,
                       "error": None, "log": "/a.log"} for a, r, w in agents]}
    state.write_json_atomic(os.path.join(state.state_dir(), "up", f"{name}.json"), rec)
    return rec


def test_ps_lists_a_manifests_agents_then_the_other_runs(capsys, state_dir):
    make_run("20261128-000000-aaaaaa", "running")
    make_run("20261128-000001-bbbbbb", "running")
    make_run("20261128-000002-cccccc", "exited")
    make_up_record("team", [("coder", "20261128-000001-bbbbbb", 300), ("tester", None, 50)])
    assert main(["ps", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["manifest"], r["weight"]) for r in rows] == [
        ("20261128-000001-bbbbbb", "team", 300), (None, "team", 50), ("20261128-000000-aaaaaa", None, None)]
    assert rows[0]["status"] == "running" and rows[0]["stats"] == {} and rows[0]["uptime"] is not None
    assert rows[1]["agent"] == "tester" and rows[1]["status"] == "running"
    assert main(["ps"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RUN_ID", "AGENT", "STATUS", "MANIFEST", "WEIGHT", "UPTIME", "PID", "PIDS",
                              "EVENTS", "LOST", "QUEUE", "IDLE", "EXECS", "REP", "WSREP", "COMMAND"]
    assert out[1].split()[:5] == ["20261128-000001-bbbbbb", "coder", "running", "team", "300"]
    assert len(out) == 4


def test_down_clears_the_record_of_a_supervisor_that_is_gone(capsys, state_dir):
    make_run("20261128-000001-bbbbbb", "exited")
    make_up_record("team", [("coder", "20261128-000001-bbbbbb", 300)], pid=2 ** 22 + 1, start_time=5)
    assert main(["down", "nope"]) == 1
    assert "no manifest 'nope' is up" in capsys.readouterr().err
    assert main(["down"]) == 0
    out = capsys.readouterr().out
    assert "coder" in out and "exited" in out and "team: down" in out
    assert not os.path.exists(os.path.join(state.state_dir(), "up", "team.json"))


def test_down_does_not_signal_a_process_that_took_the_supervisors_pid(capsys, state_dir, monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    # our own pid, with another start time: a reused pid, not the supervisor
    make_up_record("team", [("coder", None, 1)], pid=os.getpid(), start_time=1)
    assert main(["down", "team"]) == 0
    assert sent == []


def test_status_line_stays_silent_below_its_minimum_and_off_a_terminal():
    from cli.progress import StatusLine, status_line
    out = TtyIO()
    small = StatusLine(out, "reading the log", every=0, min_total=32 << 20)
    small(1 << 20, 2 << 20)                   # a small log: not worth a line
    assert out.getvalue() == ""
    StatusLine(out, "reading the log", every=0, min_total=32 << 20)(16 << 20, 64 << 20)
    assert out.getvalue().startswith("\ragentwatch: reading the log 16.8 of 67.1 MB (25%)")
    assert status_line(io.StringIO(), "replaying") is None      # piped: no line at all
