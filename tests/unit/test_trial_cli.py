"""cli/trial.py without running agents: argument errors (each one line,
before any run), the per-run record from a log's events, the report table
from fake records, and the baseline comparison."""
import json
import os

import pytest

from cli import trial as TR
from cli.main import main


def rec(i, exit=0, violations=None, rules=None, denials=0, hosts=(), files=(), passed=None,
        duration=1.0, reason="exit"):
    return {"index": i, "run_id": f"r{i}", "exit": exit, "reason": reason,
            "violations": violations or {}, "rules": rules or {}, "denials": denials,
            "denials_by": {}, "hosts": list(hosts), "names": [], "files": list(files),
            "duration": duration, "tokens": 0, "killed_for": None, "pass": passed, "error": None}


def stored(trial_id, records, pass_spec=None, baseline=None):
    t = {"trial_id": trial_id, "name": None, "started": 1796311000.0, "state": "done",
         "command": ["./agent.sh"], "policy": None, "n": len(records), "runs": records,
         "pass": pass_spec, "baseline": baseline["trial_id"] if baseline else None}
    t["report"] = TR.make_report(records, pass_spec, baseline)
    TR.save_trial(t)
    return t


# ---- bad input: one line, exit 1, nothing stored -----------------------------------

@pytest.mark.parametrize("args,msg", [
    (["trial", "-n", "0", "--", "true"], "-n 0: a trial needs at least one run"),
    (["trial", "-n", "-3", "--", "true"], "-n -3: a trial needs at least one run"),
    (["trial", "-n", "2", "--pass", "__import__('os')", "--", "true"], "column 1: a call other than len()"),
    (["trial", "-n", "2", "--pass", "exit == 0 and x.y", "--", "true"], "column 15: attribute access"),
    (["trial", "-n", "2", "--baseline", "nope", "--", "true"], "no trial has the id 'nope'"),
    (["trial", "-n", "2", "--", "no-such-command-xyz"], "no-such-command-xyz: not found on PATH"),
    (["trial", "-n", "2", "--", "/no/such/file"], "/no/such/file: no executable file"),
    (["trial", "-n", "2", "--policy", "a.yaml", "--manifest", "m.yaml", "--", "true"],
     "--policy and --manifest: give one"),
    (["trial", "-n", "2", "--pass", "exit == 0", "--pass-cmd", "true", "--", "true"],
     "--pass and --pass-cmd: give one"),
    (["trial", "-n", "2"], "no command"),
    (["trial", "-n", "2", "--policy", "/nonexistent.yaml", "--", "true"], "/nonexistent.yaml"),
    (["trial", "show", "nope"], "no trial has the id 'nope'"),
])
def test_bad_input_is_one_line_before_any_run(capsys, state_dir, args, msg):
    assert main(args) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and msg in lines[0], err
    assert "Traceback" not in err and out == ""
    assert not os.path.exists(os.path.join(state_dir, "trials")) or not os.listdir(
        os.path.join(state_dir, "trials")), "a trial was stored before its input was checked"


def test_trial_and_trial_run_are_the_same_command(capsys, state_dir):
    assert main(["trial", "run", "-n", "0", "--", "true"]) == 1
    assert "-n 0" in capsys.readouterr().err
    # a command named like a subcommand, after options: the run's
    assert main(["trial", "-n", "0", "--", "ls"]) == 1
    assert "-n 0" in capsys.readouterr().err


def test_ls_and_show_without_trials(capsys, state_dir):
    assert main(["trial", "ls"]) == 0
    assert "no trials" in capsys.readouterr().out


# ---- one run's record from its log --------------------------------------------------

def test_run_record_from_events():
    ev = [
        {"kind": "lifecycle", "phase": "start", "ts": 100.0, "run_id": "R"},
        {"kind": "net", "op": "connect", "family": "inet", "addr": "10.0.0.1", "port": 443,
         "error": "EINPROGRESS"},
        {"kind": "net", "op": "connect", "family": "inet6", "addr": "::1", "port": 80, "error": None},
        {"kind": "net", "op": "connect", "family": "inet", "addr": "10.0.0.2", "port": 22, "error": "EPERM"},
        {"kind": "net", "op": "connect", "family": "unix", "addr": "/run/x.sock", "error": None},
        {"kind": "flow", "name": "api.example.com", "decision": "allow"},
        {"kind": "flow", "name": "evil.example", "decision": "deny"},
        {"kind": "file", "abspath": "/w/out.txt", "access": ["write", "create"], "error": None},
        {"kind": "file", "abspath": "/w/out.txt", "access": ["write"], "error": None},
        {"kind": "file", "abspath": "/etc/passwd", "access": ["read"], "error": None},
        {"kind": "file", "abspath": "/etc/shadow", "access": ["write"], "error": "EACCES"},
        {"kind": "llm", "tokens_in": 10, "tokens_out": 5},
        {"kind": "llm", "tokens_in": 1, "tokens_out": None},
        {"kind": "lifecycle", "phase": "end", "ts": 102.5, "run_id": "R", "detail": {
            "exit_status": 3, "killed_for": None,
            "violations": {"violations": 4, "by_category": {"network": 3, "filesystem": 1},
                           "by_rule": {"network.socket": 3, "filesystem.deny": 1}},
            "kernel_denials": {"cgroup-bpf": {"denials": 2}, "bpf-lsm": {"denials": 1},
                               "egress-guard": {"flows": 1}}}},
    ]
    r = TR.run_record(ev, 4)
    assert r["run_id"] == "R" and r["index"] == 4 and r["exit"] == 3 and r["reason"] == "exit"
    assert r["violations"] == {"network": 3, "filesystem": 1}
    assert r["rules"] == {"network.socket": 3, "filesystem.deny": 1}
    assert r["denials"] == 3 and r["denials_by"] == {"cgroup-bpf": 2, "bpf-lsm": 1, "egress-guard": 0}
    assert r["hosts"] == ["10.0.0.1:443", "[::1]:80"]
    assert r["names"] == ["api.example.com"]
    assert r["files"] == ["/w/out.txt"]
    assert r["tokens"] == 16 and r["duration"] == 2.5


def test_termination_reason_from_the_end_event_else_exit_or_timeout():
    end = lambda d: [{"kind": "lifecycle", "phase": "end", "ts": 1.0, "detail": d}]   # noqa: E731
    assert TR.run_record(end({"termination": {"reason": "loop"}}))["reason"] == "loop"
    assert TR.run_record(end({"killed_for": "resources.wall_time"}))["reason"] == "timeout"
    assert TR.run_record(end({"violations": {"by_rule": {"resources.wall_time": 1}}}))["reason"] == "timeout"
    assert TR.run_record(end({"exit_status": 0}))["reason"] == "exit"


# ---- the report -----------------------------------------------------------------

def test_report_table_from_fake_records(state_dir):
    records = [rec(0), rec(1, exit=1, violations={"network": 1}, rules={"network.socket": 1}),
               rec(2, denials=2, hosts=["1.2.3.4:443"]), rec(3, files=["/w/a"], duration=3.0)]
    for r, p in zip(records, (True, False, True, True)):
        r["pass"] = p
    t = stored("20261203-100000-aaaaaa", records, "--pass exit == 0")
    rep = t["report"]
    rates = {r["key"]: r for r in rep["rates"]}
    assert (rates["exit:0"]["k"], rates["exit:0"]["n"]) == (3, 4)
    assert rates["category:network"]["k"] == 1 and rates["rule:network.socket"]["k"] == 1
    assert rates["denial:any"]["k"] == 1 and rates["host:1.2.3.4:443"]["k"] == 1
    assert rates["files:any"]["k"] == 1 and rates["reason:exit"]["k"] == 4
    assert rep["pass"]["k"] == 3 and [x["k"] for x in rep["pass_k"]] == [1, 2, 4]
    assert rep["pass_k"][1]["pass_hat_k"] == pytest.approx(0.5)        # C(3,2)/C(4,2)
    assert rep["duration"]["max"] == 3.0 and rep["duration"]["p50"] == 1.0
    text = TR.format_report(t)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("RATE"))
    assert header.split() == ["RATE", "K/N", "P", "95%", "CI", "NOTE"]
    row = next(line for line in lines if line.startswith("exit status 0"))
    assert "3/4" in row and "0.75" in row and "[0.30, 0.95]" in row
    # the columns line up: every K/N ends where the header's does
    end = header.index("K/N") + 3
    for line in lines[lines.index(header) + 1:]:
        if not line:
            break
        assert line[end - 1] in "0123456789", line
    assert "4 of 4: rule of three" in next(line for line in lines if line.startswith("ended: exit"))
    assert "K  PASS^K  PASS@K" in text and "duration: p50 1.00 s" in text


def test_baseline_comparison_flags_a_difference_and_not_itself(capsys, state_dir):
    good = [rec(i, exit=0 if i % 10 else 1) for i in range(40)]                   # 36/40 exit 0
    bad = [rec(i, exit=0 if i % 10 < 4 else 1, violations={"network": 1} if i % 2 else {})
           for i in range(40)]                                                     # 16/40
    base = stored("20261203-100000-bbbbbb", good)
    new = stored("20261203-100001-cccccc", bad, baseline=base)
    rates = {r["key"]: r for r in new["report"]["rates"]}
    c = rates["exit:0"]["compare"]
    assert c["flag"] and c["diff"] == pytest.approx(16 / 40 - 36 / 40) and c["cohens_h"] < 0
    assert rates["category:network"]["compare"]["flag"]                           # 0/40 -> 20/40
    assert rates["category:network"]["base"]["k"] == 0
    same = stored("20261203-100002-dddddd", good, baseline=base)
    assert not any(r["compare"]["flag"] for r in same["report"]["rates"])
    assert main(["trial", "show", "20261203-100001"]) == 0
    out = capsys.readouterr().out
    assert "baseline: 20261203-100000-bbbbbb" in out
    row = next(line for line in out.splitlines() if line.startswith("exit status 0"))
    assert "16/40" in row and "36/40" in row and "-0.50" in row and " * " in row + " "
    # a rate seen only in the baseline is listed too
    rev = stored("20261203-100003-eeeeee", good, baseline=new)
    assert "category:network" in {r["key"] for r in rev["report"]["rates"]}


def test_ls_and_show_json_round_trip(capsys, state_dir):
    t = stored("20261203-100000-ffffff", [rec(0, passed=True), rec(1, passed=False)], "--pass exit == 0")
    assert main(["trial", "ls"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("20261203-100000-ffffff"))
    assert "2/2" in line and "1/2" in line and "./agent.sh" in line
    assert main(["trial", "show", "--json", "20261203-100000-ffffff"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(t))
    assert main(["trial", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["pass"] == "1/2"


def test_pass_cmd_status_comes_from_the_pipe(tmp_path):
    out = os.open(tmp_path / "o.log", os.O_WRONLY | os.O_CREAT)
    env = dict(os.environ)
    assert TR.run_pass_cmd('test "$AGENTWATCH_RUN_ID" = R1 && echo ok', "R1", "/l", out, env)
    assert not TR.run_pass_cmd("exit 3", "R1", "/l", out, env)
    os.close(out)
    assert "ok" in (tmp_path / "o.log").read_text()


def test_a_trial_whose_process_died_is_listed_as_crashed(capsys, state_dir):
    TR.save_trial({"trial_id": "20261203-100000-abcdef", "state": "running", "n": 3, "runs": [],
                   "command": ["x"], "started": 1.0, "pid": 2**22 + 1, "start_time": 5})
    assert main(["trial", "ls"]) == 0
    assert "crashed" in capsys.readouterr().out
