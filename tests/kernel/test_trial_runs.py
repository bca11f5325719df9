"""`agentwatch trial` end to end (issue #20): six real runs of a scripted
agent under a policy, two at a time, in a state dir of their own.

The agent fails on purpose on a fixed set of run indexes (it reads
AGENTWATCH_TRIAL_RUN, which the trial gives each run: parallel runs need
no shared counter), and one run writes where the policy denies. Asserted:
the stored trial has 6 runs, each with its own run id and log; the exit-0
rate is what the script did (4/6) and its Wilson interval contains it;
the violation shows in exactly one run; `trial ls` lists it; `trial show
--json` round-trips; a second trial with the first as --baseline flags
nothing (the same agent, the same outcomes)."""
import json
import os

import pytest

from conftest import aw

pytestmark = pytest.mark.kernel

FAIL_ON = {1, 4}
AGENT = """#!/bin/sh
echo "run $AGENTWATCH_TRIAL_RUN" > "$WS/out-$AGENTWATCH_TRIAL_RUN"
if [ "$AGENTWATCH_TRIAL_RUN" = 2 ]; then echo x > /etc/agentwatch-trial-denied 2>/dev/null; fi
case "$AGENTWATCH_TRIAL_RUN" in 1|4) exit 1;; esac
exit 0
"""
POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: trial-agent}}
filesystem: {{read: ['/**'], write: ['{ws}/**', '/dev/null']}}
on_violation: {{default: deny}}
"""


def _trial(state_dir, tmp_path, *extra):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    agent = tmp_path / "agent.sh"
    agent.write_text(AGENT)
    agent.chmod(0o755)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(ws=ws))
    r = aw("trial", "-n", "6", "--parallel", "2", "--no-daemon", "--policy", str(policy),
           "--pass", "exit == 0 and len(files) >= 1", "--json", *extra, "--", str(agent),
           env={"WS": str(ws)}, cwd=str(ws))
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def test_a_trial_of_six_runs(state_dir, tmp_path):
    assert not os.path.exists("/etc/agentwatch-trial-denied")
    t = _trial(state_dir, tmp_path)
    assert t["state"] == "done" and t["n"] == 6 and len(t["runs"]) == 6
    assert [r["index"] for r in t["runs"]] == list(range(6))
    ids = {r["run_id"] for r in t["runs"]}
    assert len(ids) == 6 and all(os.path.isfile(state_dir / "runs" / i / "events.jsonl") for i in ids)
    assert [r["exit"] for r in t["runs"]] == [1 if i in FAIL_ON else 0 for i in range(6)]
    assert all(r["reason"] == "exit" and r["error"] is None for r in t["runs"])
    rates = {r["key"]: r for r in t["report"]["rates"]}
    ok = rates["exit:0"]
    assert (ok["k"], ok["n"]) == (4, 6) and ok["lo"] <= 4 / 6 <= ok["hi"]
    # the denied write: a violation of run 2 alone, and nothing written there
    assert [bool(r["violations"]) for r in t["runs"]] == [i == 2 for i in range(6)]
    assert rates["violation:any"]["k"] == 1
    assert not os.path.exists("/etc/agentwatch-trial-denied")
    # every run wrote its file in the workspace
    assert all(any(f.endswith(f"/out-{r['index']}") for f in r["files"]) for r in t["runs"])
    assert t["report"]["pass"]["k"] == 4

    ls = aw("trial", "ls")
    assert ls.returncode == 0, ls.stderr
    line = next(x for x in ls.stdout.splitlines() if x.startswith(t["trial_id"]))
    assert "6/6" in line and "4/6" in line and "agent.sh" in line
    show = aw("trial", "show", "--json", t["trial_id"])
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout) == t
    text = aw("trial", "show", t["trial_id"])
    assert text.returncode == 0 and "exit status 0" in text.stdout and "4/6" in text.stdout

    again = _trial(state_dir, tmp_path, "--baseline", t["trial_id"])
    assert again["baseline"] == t["trial_id"]
    compared = [r for r in again["report"]["rates"] if "compare" in r]
    assert compared and not any(r["compare"]["flag"] for r in compared)
    assert not again["report"]["pass"]["compare"]["flag"]
