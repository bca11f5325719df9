"""run/prepare.py: the preparation of a run (input, policy, signatures,
compile, plan, identity) is pure and runs as any user (prepare(opts,
root=False)): these tests pass without root, and check that preparing
creates nothing and changes none of the options it was given."""
import dataclasses
import os

import pytest

from agentwatch.core.errors import LaunchError, PolicyError, PrivilegeError, UsageError
from agentwatch.run import Prepared, RunOptions, prepare
from agentwatch.sandbox.seccomp_filter import errno_denied

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = os.path.join(REPO, "policies")


@pytest.fixture
def as_user(monkeypatch, tmp_path):
    """Not root, and an empty state directory that must stay empty."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(state))
    yield tmp_path
    assert list(state.iterdir()) == [], "preparing a run created state"


def _opts(tmp_path, **kw):
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    env = {"HOME": str(tmp_path), "PATH": os.defpath, "TMPDIR": "/tmp"}
    return RunOptions(**dict(dict(argv=["true"], cwd=str(ws), workspace=str(ws), env=env,
                                  bpf_lsm="off", allow_downgrade=True), **kw))


def test_a_shipped_policy_prepares_without_root(as_user):
    opts = _opts(as_user, policy_path=os.path.join(POLICIES, "sandboxed-agent.yaml"))
    before = dataclasses.asdict(opts)
    p = prepare(opts, root=False)
    assert isinstance(p, Prepared)
    assert dataclasses.asdict(opts) == before, "prepare changed its options"
    assert os.path.basename(p.command) == "true" and p.agent == (p.policy.agent_name or "true")
    assert p.variables == {"WORKSPACE": opts.workspace, "HOME": str(as_user), "TMPDIR": "/tmp"}
    assert p.compiled is not None and p.sensor_groups == p.compiled.sensor_groups()
    assert p.plan is not None and p.plan.seccomp is not None and p.plan.lsm is None   # --bpf-lsm off
    assert p.seccomp_denied and p.seccomp_denied == errno_denied(p.plan.seccomp)
    assert p.pid_ns and p.no_new_privs
    assert p.watched_files() == [("identity.policy_write", p.policy.path)]
    ident = p.identity("20260101-000000-abcdef")
    assert ident["run_id"] == "20260101-000000-abcdef" and ident["executable"] == p.command
    assert ident["policy_digest"] == p.policy.digest and ident["enforcement"] == p.plan.record()
    assert ident["agent_credentials"]["no_new_privs"] is True


def test_every_shipped_policy_prepares(as_user):
    for name in sorted(os.listdir(POLICIES)):
        if name.endswith(".yaml") and name != "base.yaml":
            p = prepare(_opts(as_user, policy_path=os.path.join(POLICIES, name)), root=False)
            assert p.plan is not None, name


def test_without_a_policy_the_run_is_monitor_only(as_user):
    opts = _opts(as_user, sensors=["exec"])
    p = prepare(opts, root=False)
    assert p.policy is p.compiled is p.plan is None
    assert p.sensor_groups == ["exec"] and p.seccomp_denied == []
    assert not p.pid_ns and not p.no_new_privs and p.watched_files() == []
    assert p.identity("r")["enforcement"] == {"path": "monitor-only"}


@pytest.mark.parametrize("kw, error, text", [
    ({"argv": []}, UsageError, "no command given"),
    ({"argv": ["no-such-command-anywhere"]}, LaunchError, "command not found"),
    ({"policy_path": "/nonexistent/policy.yaml"}, PolicyError, "/nonexistent/policy.yaml"),
    ({"require_signed": True}, PolicyError, "--require-signed needs --policy"),
    ({"prompt_path": "/nonexistent/prompt.md"}, UsageError, "--prompt /nonexistent/prompt.md"),
    ({"weight": 0}, UsageError, "--weight 0: expected an integer from 1 to 10000"),
    ({"weight": 10001}, UsageError, "--weight 10001: expected an integer from 1 to 10000"),
    ({"weight": "300"}, UsageError, "--weight '300': expected an integer"),
    ({"weight": True}, UsageError, "--weight True: expected an integer"),
])
def test_bad_input_is_one_error(as_user, kw, error, text):
    with pytest.raises(error) as e:
        prepare(_opts(as_user, **kw), root=False)
    assert text in str(e.value)


def test_a_bad_policy_file_is_told_before_root_is_asked(as_user):
    bad = as_user / "bad.yaml"
    bad.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: x}\nfilesystem: 3\n")
    with pytest.raises(PolicyError):
        prepare(_opts(as_user, policy_path=str(bad)))          # root=True: still the policy's error
    with pytest.raises(PrivilegeError, match="needs root"):
        prepare(_opts(as_user, policy_path=os.path.join(POLICIES, "offline.yaml")))


def test_an_agent_name_outside_identity_name_is_refused(as_user):
    pol = as_user / "named.yaml"
    pol.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: n}\n"
                   "identity: {name: 'claude-*'}\n")
    with pytest.raises(PolicyError, match="does not match identity.name"):
        prepare(_opts(as_user, policy_path=str(pol), name="other"), root=False)
    assert prepare(_opts(as_user, policy_path=str(pol), name="claude-1"), root=False).agent == "claude-1"

