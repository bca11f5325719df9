"""agentwatch/policy load(): the shipped policy, the digest, and every way a
policy file can be wrong (each a PolicyError naming the file)."""
import os
import re

import pytest
import yaml

from agentwatch.core.errors import AgentwatchError, PolicyError
from agentwatch.policy import MAX_POLICY_BYTES, canonical_digest, load

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(REPO, "policies", "coding-agent.yaml")

MINIMAL = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: tiny\n"


def write(tmp_path, content, name="p.yaml"):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


def load_error(path):
    with pytest.raises(PolicyError) as e:
        load(path)
    msg = str(e.value)
    assert path in msg, f"error does not name the file: {msg!r}"
    assert "\n" not in msg, f"error is not one line: {msg!r}"
    return msg


def test_shipped_policy_loads():
    p = load(SHIPPED)
    assert p.path == SHIPPED
    assert p.data["kind"] == "AgentPolicy"
    assert p.name == "coding-agent" and p.agent_name == "coding-agent"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", p.digest)
    assert p.digest == canonical_digest(p.data)
    assert set(p.sensors) == {"process", "file", "net", "sensitive", "signal"}   # default when no monitor:


def test_digest_is_stable_across_key_order_and_formatting(tmp_path):
    with open(SHIPPED) as f:
        data = yaml.safe_load(f)

    def reverse_keys(v):
        if isinstance(v, dict):
            return {k: reverse_keys(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [reverse_keys(x) for x in v]
        return v

    text = yaml.safe_dump(reverse_keys(data), sort_keys=False, default_flow_style=True, width=40)
    other = write(tmp_path, "# reordered\n" + text)
    assert load(other).digest == load(SHIPPED).digest


def test_digest_changes_with_content(tmp_path):
    a = load(write(tmp_path, MINIMAL, "a.yaml"))
    b = load(write(tmp_path, MINIMAL.replace("tiny", "tinier"), "b.yaml"))
    assert a.digest != b.digest


def test_minimal_policy_and_monitor_section(tmp_path):
    p = load(write(tmp_path, MINIMAL + "monitor: [file]\n"))
    assert p.name == "tiny" and p.agent_name == ""
    assert p.sensors == ["file"]
    assert os.path.isabs(p.path)


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load("p.yaml").path == str(tmp_path / "p.yaml")


def test_policy_error_is_an_agentwatch_error():
    assert issubclass(PolicyError, AgentwatchError)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    assert "cannot read" in load_error(path)


def test_directory_instead_of_file(tmp_path):
    load_error(str(tmp_path))


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, content)
    msg = load_error(path)
    assert msg.startswith(f"{path}:1:1:") and "empty" in msg


@pytest.mark.parametrize("content, typename", [("- a\n- b\n", "list"), ("just a string\n", "str"),
                                               ("42\n", "int")])
def test_not_a_mapping(tmp_path, content, typename):
    path = write(tmp_path, content)
    msg = load_error(path)
    assert msg.startswith(f"{path}:1:1:") and "mapping" in msg and typename in msg


@pytest.mark.parametrize("content", ["apiVersion: agentwatch/v1\nmetadata: {name: x}\n",
                                     "kind: SomethingElse\n", "kind: agentpolicy\n"])
def test_missing_or_wrong_kind(tmp_path, content):
    path = write(tmp_path, content)
    assert "kind: AgentPolicy" in load_error(path)


@pytest.mark.parametrize("content, line, col", [
    ("kind: AgentPolicy\nmetadata:\n  name: x\n   bad: indent\n", 4, 7),
    ("kind: [AgentPolicy\n", 2, 1),
    ("kind: AgentPolicy\n\tfoo: 1\n", 2, 1),
    ("kind: AgentPolicy\nx: 'unterminated\n", 3, 1),
])
def test_invalid_yaml_has_file_line_col(tmp_path, content, line, col):
    path = write(tmp_path, content)
    msg = load_error(path)
    assert msg.startswith(f"{path}:{line}:{col}: invalid YAML")


def test_invalid_utf8_is_not_text(tmp_path):
    path = write(tmp_path, MINIMAL.encode() + b"# \xff\xfe\n")
    assert "not a text file" in load_error(path)


@pytest.mark.parametrize("junk", [
    bytes(range(256)) * 4,                    # invalid UTF-8
    b"\x7fELF\x02\x01\x01\x00" + bytes(56),   # valid UTF-8, but control characters
    b"\x00\x00\x00\x00",
], ids=["invalid-utf8", "elf-header", "nuls"])
def test_binary_junk(tmp_path, junk):
    load_error(write(tmp_path, junk))


def test_file_over_the_size_limit(tmp_path):
    path = write(tmp_path, MINIMAL + "#" * MAX_POLICY_BYTES)
    msg = load_error(path)
    assert str(MAX_POLICY_BYTES) in msg
    assert MAX_POLICY_BYTES == 1 << 20


def test_file_at_the_size_limit_loads(tmp_path):
    body = MINIMAL + "#"
    path = write(tmp_path, body + "#" * (MAX_POLICY_BYTES - len(body)))
    assert os.path.getsize(path) == MAX_POLICY_BYTES
    assert load(path).name == "tiny"


def test_yaml_tags_are_not_executed(tmp_path):
    path = write(tmp_path, MINIMAL + "x: !!python/object/apply:os.system ['true']\n")
    load_error(path)
