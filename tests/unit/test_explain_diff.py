"""`agentwatch policy explain` and `agentwatch policy diff`: their text,
exit codes, and errors (FILE:LINE:COL on stderr, never a traceback)."""
import os

import pytest
from click.testing import CliRunner

from agentwatch.policy import load
from agentwatch.policy.diff import diff
from agentwatch.policy.explain import explain
from cli.policy import policy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICIES = os.path.join(REPO, "policies")
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n"
VARS = {"WORKSPACE": "/work/ws", "HOME": "/home/u", "TMPDIR": "/tmp"}


def write(tmp_path, body, name="p.yaml"):
    p = tmp_path / name
    p.write_text(HEAD + body)
    return str(p)


def invoke(*args):
    return CliRunner().invoke(policy, list(args), catch_exceptions=False)


# ---------------------------------------------------------------- explain

def test_explain_coding_agent_in_plain_language():
    text = explain(load(os.path.join(POLICIES, "coding-agent.yaml")), VARS)
    lines = text.splitlines()
    assert lines[0].startswith("Policy coding-agent: ")
    assert "Variables: ${HOME}=/home/u, ${TMPDIR}=/tmp, ${WORKSPACE}=/work/ws" in lines
    read = lines.index("  May read:")
    assert "    ${WORKSPACE}/**  (= /work/ws/**)" in lines[read:]
    assert "    /usr/**" in lines[read:]
    never = lines.index("  May never touch (deny wins over every allow):")
    assert lines[never + 1] == "    ${HOME}/.ssh/**  (= /home/u/.ssh/**)"
    assert "  Egress: only 443/tcp to pypi.org, 443/tcp to files.pythonhosted.org, 443/tcp to " \
           "registry.npmjs.org, 443/tcp to api.anthropic.com" in lines
    assert "  Loopback: no" in lines and "  Unix sockets: no" in lines
    assert "  At most 256 processes" in lines
    assert any(line.startswith("  May never: trace or read other processes (ptrace); ") for line in lines)
    assert "On violation: alert by default" in lines
    assert "Sensors: process, file, net, sensitive, signal (derived from the rules)" in lines


def test_explain_shows_the_extends_chain_and_merged_lists():
    text = explain(load(os.path.join(POLICIES, "tool-runner.yaml")), VARS)
    assert "  Built from: base.yaml -> tool-runner.yaml (lists appended, settings overridden)" in text
    assert "    /etc/shadow\n" in text                        # deny inherited from base.yaml
    assert "On violation: deny by default; rule filesystem.deny: kill; rule process.exec: kill" in text


def test_explain_of_unrestricted_sections_and_lists(tmp_path):
    text = explain(load(write(tmp_path, "network:\n  loopback: [8080, '3000-3999']\n  unix: true\n"
                                        "  allow: [{cidr: 10.0.0.0/8}]\n")), VARS)
    assert "Filesystem: not restricted (no filesystem section)" in text
    assert "Process: not restricted (no process section)" in text
    assert "  Egress: only 10.0.0.0/8 (any port)" in text
    assert "  Loopback: only port 8080, ports 3000-3999" in text
    assert "  Unix sockets: yes, any" in text


def test_explain_cli_uses_workspace_and_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.delenv("TMPDIR", raising=False)
    result = invoke("explain", "--workspace", str(tmp_path), os.path.join(POLICIES, "coding-agent.yaml"))
    assert result.exit_code == 0
    assert f"${{WORKSPACE}}={tmp_path}" in result.stdout and "${TMPDIR}=/tmp" in result.stdout
    assert "${HOME}/.ssh/**  (= /home/someone/.ssh/**)" in result.stdout


def test_explain_cli_default_workspace_is_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("explain", os.path.join(POLICIES, "offline.yaml"))
    assert result.exit_code == 0 and f"${{WORKSPACE}}={tmp_path}" in result.stdout


def test_explain_cli_invalid_policy_prints_every_error(tmp_path):
    path = write(tmp_path, "filesystem: {read: [relative, 5], write: []}\n")
    result = invoke("explain", path)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}:4:21: filesystem.read: relative path 'relative': a path glob starts with '/', "
        f"a variable like ${{WORKSPACE}}, or '**/'",
        f"{path}:4:31: filesystem.read[1]: expected a path glob, got int"]


def test_explain_cli_missing_file(tmp_path):
    result = invoke("explain", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1
    assert result.stderr == f"{tmp_path}/nope.yaml: cannot read policy: No such file or directory\n"


# ---------------------------------------------------------------- diff

def diff_bodies(tmp_path, old, new):
    return diff(load(write(tmp_path, old, "old.yaml")), load(write(tmp_path, new, "new.yaml")))


def test_identical_policies_have_no_permission_changes(tmp_path):
    assert diff_bodies(tmp_path, "filesystem: {write: ['/a']}\n", "filesystem: {write: ['/a']}\n") == \
        ["no permission changes"]


def test_diff_filesystem(tmp_path):
    old = "filesystem: {read: ['/usr/**'], write: ['${TMPDIR}/**'], deny: ['**/.env', '/etc/shadow']}\n"
    new = "filesystem: {read: ['/usr/**', '/opt/**'], write: ['${WORKSPACE}/**'], deny: ['**/.env', '/root/**']}\n"
    assert diff_bodies(tmp_path, old, new) == [
        "+ grants: read /opt/**",
        "+ grants: write ${WORKSPACE}/**",
        "- revokes: write ${TMPDIR}/**",
        "- revokes: any access to /root/** (filesystem.deny)",
        "+ grants: access to /etc/shadow (removed from filesystem.deny)",
    ]


def test_diff_unrestricted_lists(tmp_path):
    assert diff_bodies(tmp_path, "filesystem: {read: ['/a']}\n", "filesystem: {read: ['/a'], write: []}\n") == \
        ["- revokes: write anything (now only: nothing)"]
    assert diff_bodies(tmp_path, "process: {exec: ['/usr/bin/git']}\n", "process: {}\n") == \
        ["+ grants: run anything (process.exec removed)"]


def test_diff_network(tmp_path):
    old = "network:\n  allow: [{domain: pypi.org, ports: [443]}, {cidr: 10.0.0.0/8}]\n  loopback: false\n"
    new = "network:\n  allow: [{domain: pypi.org, ports: [443, 80]}, {cidr: 10.0.0.0/8}]\n  loopback: [8080]\n" \
          "  unix: true\n"
    assert diff_bodies(tmp_path, old, new) == [
        "+ grants: network to pypi.org:443,80",
        "- revokes: network to pypi.org:443",
        "+ grants: loopback to port 8080",
        "+ grants: unix sockets to anything",
    ]
    assert diff_bodies(tmp_path, "", "network: {}\n") == [
        "- revokes: unrestricted network (now egress only to: none)",
        "~ changes: sensors process -> process,net"]


def test_diff_process_syscalls_resources(tmp_path):
    old = "process: {ptrace: false, bpf: false, max_processes: 10}\nsyscalls: {deny: [keyctl]}\n" \
          "resources: {memory: 1G, pids: 100}\n"
    new = "process: {bpf: false, namespaces: false, max_processes: 20}\nsyscalls: {deny: [mount]}\n" \
          "resources: {memory: 512M, pids: 100, wall_time: 30m}\n"
    assert diff_bodies(tmp_path, old, new) == [
        "+ grants: process.max_processes 20 (was 10)",
        "+ grants: process.ptrace",
        "- revokes: process.namespaces",
        "- revokes: syscall mount (syscalls.deny)",
        "+ grants: syscall keyctl (removed from syscalls.deny)",
        "- revokes: resources.memory 512M (was 1G)",
        "- revokes: resources.wall_time 30m (was unlimited)",
    ]


def test_diff_on_violation_and_identity(tmp_path):
    old = "identity: {name: a}\non_violation: {default: alert, rules: {filesystem.deny: kill}}\n"
    new = "identity: {name: b}\non_violation: {default: alert, filesystem: deny}\n"
    assert diff_bodies(tmp_path, old, new) == [
        "~ changes: identity.name a -> b",
        "~ changes: on_violation.filesystem alert -> deny",
        "~ changes: on_violation.rules.filesystem.deny kill -> deny",
    ]


def test_diff_is_on_effective_policies(tmp_path):
    (tmp_path / "base.yaml").write_text(HEAD + "filesystem: {deny: ['**/.env']}\n")
    child = write(tmp_path, "extends: base.yaml\n", "child.yaml")
    flat = write(tmp_path, "filesystem: {deny: ['**/.env']}\n", "flat.yaml")
    assert diff(load(child), load(flat)) == ["no permission changes"]


def test_diff_shipped_policies_cli():
    result = invoke("diff", os.path.join(POLICIES, "coding-agent.yaml"), os.path.join(POLICIES, "offline.yaml"))
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert "- revokes: network to pypi.org:443/tcp" in lines
    assert "+ grants: write anything (filesystem.write removed)" in lines
    assert "~ changes: on_violation.network alert -> deny" in lines
    assert all(line[:2] in ("+ ", "- ", "~ ") for line in lines)


def test_diff_cli_no_changes_exit_zero():
    path = os.path.join(POLICIES, "base.yaml")
    result = invoke("diff", path, path)
    assert result.exit_code == 0 and result.stdout == "no permission changes\n"


def test_diff_cli_invalid_side(tmp_path):
    bad = write(tmp_path, "network: {allow: [{cidr: nope}]}\n")
    result = invoke("diff", os.path.join(POLICIES, "base.yaml"), bad)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"{bad}:4:26: network.allow[0].cidr: invalid CIDR 'nope'")


@pytest.mark.parametrize("args", [["diff", "one.yaml"], ["explain"], ["lint"]])
def test_usage_errors(args):
    assert invoke(*args).exit_code == 2
