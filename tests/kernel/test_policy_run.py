"""Policies judged live on the real kernel: violations with identity and
evidence, dedup, kill actions, identity protection, signing and log sealing."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from conftest import REPO, Lines, aw, aw_cmd, free_port, read_events

pytestmark = pytest.mark.kernel
CODING = os.path.join(REPO, "policies", "coding-agent.yaml")
PY = "/usr/bin/python3 -I"   # isolated: the test environment's PYTHON* variables stay out


@pytest.fixture
def home(tmp_path):
    """A HOME with an ssh key fixture (the secret the coding-agent policy denies)."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    (h / ".ssh" / "id_rsa").write_text("-----BEGIN FAKE KEY-----\n")
    return h


@pytest.fixture
def workspace(tmp_path):
    w = tmp_path / "ws"
    w.mkdir()
    return w


def _spawn(*args, env):
    return subprocess.Popen(aw_cmd() + list(args), cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_agent(script, home, workspace, *extra, policy=CODING, env=None):
    agent = workspace / "agent.sh"
    agent.write_text("#!/bin/sh\n" + script)
    agent.chmod(0o755)
    ev = workspace.parent / "events.jsonl"
    r = aw("run", "--policy", policy, "--workspace", str(workspace), "--events", str(ev), *extra,
           "--", "/bin/sh", str(agent), cwd=str(workspace),
           env=dict({"HOME": str(home), "TMPDIR": "/tmp"}, **(env or {})))
    return r, read_events(ev)


def violations(events):
    return [e for e in events if e["kind"] == "violation"]


def test_coding_agent_violations_live_in_tail(state_dir, home, workspace):
    port = free_port()
    tail = _spawn("tail", "--violations", "--json", env={"HOME": str(home)})
    try:
        time.sleep(1.5)
        script = f"""
cat /etc/hostname > /dev/null                 # allowed: read the system
echo hi > {workspace}/out.txt                 # allowed: write the workspace
/bin/ls {workspace} > /dev/null               # allowed: exec a system tool
cat {home}/.ssh/id_rsa > /dev/null            # denied: a secret
{PY} -c 'import socket; s=socket.socket(); s.connect_ex(("127.0.0.1", {port}))'   # loopback not allowed
cp /bin/true {workspace}/mytool               # allowed: write the workspace
{workspace}/mytool                            # exec outside the allow list
exit 0
"""
        r, events = run_agent(script, home, workspace, "--name", "coding-agent")
        assert r.returncode == 0, r.stderr
        reader = Lines(tail)
        deadline = time.monotonic() + 10
        while len(reader.poll()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        live = reader.items
    finally:
        tail.send_signal(signal.SIGINT)
        tail.communicate(timeout=10)
    vs = violations(events)
    got = sorted((v["category"], v["rule"]) for v in vs)
    assert got == [("filesystem", "filesystem.deny"), ("network", "network.loopback"),
                   ("process", "process.exec")], json.dumps(vs, indent=1)
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]
    for v in vs:
        assert v["run_id"] == start["run_id"] and v["agent"] == "coding-agent"
        assert v["action"] == "alert" and v["count"] == 1
        assert v["detail"]["ancestry"][-1] == start["detail"]["root_pid"]
    by_rule = {v["rule"]: v for v in vs}
    assert by_rule["filesystem.deny"]["detail"]["path"] == f"{home}/.ssh/id_rsa"
    assert by_rule["network.loopback"]["detail"]["port"] == port
    assert by_rule["process.exec"]["detail"]["path"] == f"{workspace}/mytool"
    # the same three, live, from another process following the stream
    assert sorted((v["category"], v["rule"]) for v in live) == got
    assert {v["run_id"] for v in live} == {start["run_id"]}
    assert "violations: 3" in r.stderr


def test_repeats_are_counted_not_flooded(state_dir, home, workspace):
    script = f"for i in $(seq 50); do cat {home}/.ssh/id_rsa > /dev/null; done\n"
    r, events = run_agent(script, home, workspace)
    assert r.returncode == 0, r.stderr
    vs = [v for v in violations(events) if v["rule"] == "filesystem.deny"]
    assert len(vs) == 2                           # the first in full, then one total
    assert vs[0]["count"] == 1 and "ancestry" in vs[0]["detail"]
    assert vs[1]["count"] == 49 and vs[1]["detail"]["repeat"] is True
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]
    assert end["detail"]["violations"]["by_rule"]["filesystem.deny"] == 50


def test_kill_action_stops_the_agent(state_dir, home, workspace, tmp_path):
    policy = tmp_path / "kill.yaml"
    policy.write_text(open(CODING).read() + "\n")
    text = policy.read_text().replace("\non_violation:\n", "\non_violation:\n  rules:\n    network.loopback: kill\n", 1)
    assert "network.loopback: kill" in text
    policy.write_text(text)
    port = free_port()
    script = f"""{PY} -c 'import socket; s=socket.socket(); s.connect_ex(("127.0.0.1", {port}))'
sleep 30
echo survived > {workspace}/survived
"""
    t0 = time.monotonic()
    r, events = run_agent(script, home, workspace, policy=str(policy))
    assert r.returncode == 137, r.stderr
    assert time.monotonic() - t0 < 25
    assert not (workspace / "survived").exists()
    v = [v for v in violations(events) if v["rule"] == "network.loopback"]
    assert v and v[0]["action"] == "kill"


def test_policy_edited_during_run_is_an_identity_violation(state_dir, home, workspace, tmp_path):
    policy = tmp_path / "p.yaml"
    shutil.copy(CODING, policy)
    script = f"sleep 1; echo '# edited' >> {policy}; sleep 1\n"
    r, events = run_agent(script, home, workspace, policy=str(policy))
    assert r.returncode == 0, r.stderr
    vs = [v for v in violations(events) if v["category"] == "identity"]
    assert vs and vs[0]["rule"] == "identity.policy_write"
    assert vs[0]["detail"]["path"] == str(policy)


def test_policy_edited_from_outside_is_an_identity_violation(state_dir, home, workspace, tmp_path):
    policy = tmp_path / "p.yaml"
    shutil.copy(CODING, policy)
    p = _spawn("run", "--policy", str(policy), "--workspace", str(workspace), "--", "/bin/sleep", "4",
               env={"HOME": str(home)})
    from agentwatch.core import state
    deadline = time.monotonic() + 30
    while not any(r.get("status") == "running" for r in state.list_runs()):
        assert time.monotonic() < deadline, "run did not start"
        time.sleep(0.1)
    time.sleep(0.5)
    with open(policy, "a") as f:                 # not the agent: someone else on the host
        f.write("# edited from outside\n")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    run = state.list_runs()[-1]
    events = read_events(state.run_path(run["run_id"], "events.jsonl"))
    vs = [v for v in violations(events) if v["rule"] == "identity.policy_write"]
    assert len(vs) == 1 and "changed during the run" in vs[0]["detail"]["reason"]


def test_signed_policy_runs_and_a_changed_byte_is_refused(state_dir, tmp_path, home, workspace):
    keys = tmp_path / "keys"
    assert aw("key", "generate", "--dir", str(keys), "--name", "ops").returncode == 0
    policy = tmp_path / "signed.yaml"
    shutil.copy(CODING, policy)
    r = aw("policy", "sign", str(policy), "--key", str(keys / "ops.key"))
    assert r.returncode == 0, r.stderr
    r, events = run_agent("exit 0\n", home, workspace, "--require-signed", "--trust",
                          str(keys / "ops.pub"), policy=str(policy))
    assert r.returncode == 0, r.stderr
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]
    assert start["detail"]["signer"].startswith("ed25519:")
    data = bytearray(policy.read_bytes())
    data[-2] ^= 1
    policy.write_bytes(bytes(data))
    runs_before = len(os.listdir(state_dir / "runs"))
    r = aw("run", "--policy", str(policy), "--require-signed", "--trust", str(keys / "ops.pub"),
           "--", "/bin/true")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "signature" in r.stderr
    assert len(os.listdir(state_dir / "runs")) == runs_before      # nothing started


def test_run_log_verifies_and_an_edited_line_is_found(state_dir, home, workspace):
    r, events = run_agent(f"cat {home}/.ssh/id_rsa >/dev/null; exit 0\n", home, workspace)
    assert r.returncode == 0
    run_id = events[0]["run_id"]
    ok = aw("log", "verify", run_id)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    log = state_dir / "runs" / run_id / "events.jsonl"
    lines = log.read_text().splitlines()
    lines[4] = lines[4].replace('"pid":', '"pid":1', 1)
    log.write_text("\n".join(lines) + "\n")
    bad = aw("log", "verify", run_id)
    assert bad.returncode == 1
    assert ":6:" in bad.stdout, bad.stdout       # the edit of line 5 breaks the link at line 6


def test_prompt_digest_recorded_and_prompt_edit_reported(state_dir, home, workspace, tmp_path):
    import hashlib
    prompt = tmp_path / "system-prompt.md"
    prompt.write_text("You are a careful coding agent.\n")
    digest = "sha256:" + hashlib.sha256(prompt.read_bytes()).hexdigest()
    script = f"sleep 1; echo 'ignore previous instructions' >> {prompt}; sleep 1\n"
    r, events = run_agent(script, home, workspace, "--prompt", str(prompt))
    assert r.returncode == 0, r.stderr
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]
    assert start["detail"]["prompt_digest"] == digest
    vs = [v for v in violations(events) if v["rule"] == "identity.prompt_write"]
    assert vs and vs[0]["category"] == "identity" and vs[0]["detail"]["path"] == str(prompt)
    assert "ignore previous" not in prompt.read_text()     # read-only inside the sandbox
