"""The policy's peers section (the agent-to-agent broker's part of a
policy): every key into the typed model, every problem at its
FILE:LINE:COL, the model's may_* answers, extends, explain and diff, the
protocol rules' actions, and the JSON Schema agreeing."""
import json
import os

import pytest

from agentwatch.policy import check, load
from agentwatch.policy import model
from agentwatch.policy import schema as S
from agentwatch.policy.compile import compile_policy
from agentwatch.policy.diff import diff
from agentwatch.policy.explain import explain
from agentwatch.policy.model import Item, Peers, Tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: t\n"     # 4 lines
VARS = {"WORKSPACE": "/work/ws", "HOME": "/home/u", "TMPDIR": "/tmp"}

FULL = """\
peers:
  description: "Reviews patches"
  skills:
    - review
    - {name: lint, description: "runs the linter"}
  send: ["reviewer", "worker-*"]
  receive: ["planner"]
  grant: ["wc"]
  accept: ["wc", "grep"]
  max_ttl: 10m
  rate: 500
  tools:
    wc:
      argv: ["/usr/bin/wc", "-l"]
      timeout: 30s
on_violation: {peers: kill}
"""


def write(tmp_path, body, name="p.yaml"):
    p = tmp_path / name
    p.write_text(HEAD + body)
    return str(p)


def problems(tmp_path, body):
    path = write(tmp_path, body)
    return path, [str(p) for p in check(path)[1]]


# ---------------------------------------------------------------- typed model

def test_every_key_reaches_the_model(tmp_path):
    p = load(write(tmp_path, FULL))
    peers = p.spec.peers
    assert peers.description == "Reviews patches"
    assert peers.skills == ({"name": "review", "description": None},
                            {"name": "lint", "description": "runs the linter"})
    assert [i.value for i in peers.send] == ["reviewer", "worker-*"]
    assert [i.value for i in peers.receive] == ["planner"]
    assert [i.value for i in peers.grant] == ["wc"] and [i.value for i in peers.accept] == ["wc", "grep"]
    assert peers.max_ttl == 600 and peers.rate == 500
    assert peers.tools == {"wc": Tool("wc", ("/usr/bin/wc", "-l"), 30.0, peers.tools["wc"].loc)}
    assert peers.tools["wc"].loc.line == 18 and peers.send[1].loc.line == 10
    assert p.warnings == []


def test_defaults(tmp_path):
    peers = load(write(tmp_path, "peers: {tools: {wc: {argv: [/usr/bin/wc]}}, grant: [wc]}\n")).spec.peers
    assert (peers.description, peers.skills, peers.send, peers.receive, peers.accept) == (None, (), (), (), ())
    assert peers.max_ttl == 3600 and peers.rate == 200 and peers.tools["wc"].timeout == 10
    assert load(write(tmp_path, "peers: {}\n")).spec.peers == Peers()
    assert load(write(tmp_path, "")).spec.peers is None


def test_a_compiled_policy_exposes_the_section(tmp_path):
    p = load(write(tmp_path, FULL))
    assert compile_policy(p, VARS).spec.peers is p.spec.peers


def test_may_send_receive_grant_accept():
    loc = None
    peers = Peers(send=(Item("reviewer", loc), Item("worker-*", loc)), receive=(Item("planner", loc),),
                  grant=(Item("wc", loc),), accept=(Item("wc", loc), Item("grep", loc)))
    assert peers.may_send("reviewer") and peers.may_send("worker-3") and peers.may_send("worker-")
    assert not peers.may_send("planner") and not peers.may_send("reviewer2") and not peers.may_send("")
    assert not peers.may_send(None)
    assert peers.may_receive("planner") and not peers.may_receive("reviewer")
    assert peers.may_grant("wc") and not peers.may_grant("grep") and not peers.may_grant("w*")
    assert peers.may_accept("grep") and not peers.may_accept("cat")
    none = Peers()
    assert not (none.may_send("x") or none.may_receive("x") or none.may_grant("wc") or none.may_accept("wc"))
    assert Peers(send=(Item("*", loc),)).may_send("anyone")
    assert Peers(send=(Item("w[0-9]", loc),)).may_send("w7") and not Peers(send=(Item("w[0-9]", loc),)).may_send("wx")


def test_protocol_rules_and_their_actions(tmp_path):
    assert model.CATEGORY_SECTION["protocol"] == "peers" and "peers" in model.SECTIONS
    added = ["identity.sender", "protocol.peer", "protocol.facts", "protocol.grant", "protocol.rate",
             *(f"protocol.token_{t}" for t in ("invalid", "expired", "widened", "replayed", "exhausted",
                                               "holder", "revoked", "scope"))]
    assert set(added) <= set(model.RULES) and len(set(model.RULES)) == len(model.RULES)
    spec = load(write(tmp_path, FULL)).spec
    assert spec.action_for("protocol", "protocol.token_holder") == "kill"
    assert spec.action_for("protocol") == "kill"
    assert spec.action_for("identity", "identity.sender") == "alert"          # identity's, not peers'
    spec = load(write(tmp_path, "on_violation:\n  identity: deny\n  rules: {protocol.rate: deny}\n")).spec
    assert spec.action_for("identity", "identity.sender") == "deny"
    assert spec.action_for("protocol", "protocol.rate") == "deny"
    assert spec.action_for("protocol", "protocol.peer") == "alert"


# ---------------------------------------------------------------- problems and where they are

@pytest.mark.parametrize("body, expected", [
    ("peer: {}\n", "5:1: unknown key 'peer' (did you mean 'peers'?)"),
    ("peers: {sned: []}\n", "5:9: unknown key 'sned' in peers (did you mean 'send'?)"),
    ("peers: {max_tll: 1h}\n", "5:9: unknown key 'max_tll' in peers (did you mean 'max_ttl'?)"),
    ("peers: []\n", "5:8: peers: expected a mapping, got list"),
    ("peers: {description: 5}\n", "5:22: peers.description: expected a string, got int"),
    ("peers: {skills: review}\n", "5:17: peers.skills: expected a list of skills"),
    ("peers: {skills: [5]}\n", "5:18: peers.skills[0]: expected a skill name or {name, description}, got int"),
    ("peers: {skills: [{description: x}]}\n", "5:18: peers.skills[0]: missing required key 'name'"),
    ("peers: {skills: [{name: a, descripton: x}]}\n",
     "5:28: unknown key 'descripton' in peers.skills[0] (did you mean 'description'?)"),
    ("peers: {skills: [{name: 3}]}\n", "5:25: peers.skills[0].name: expected a string, got int"),
    ("peers: {skills: ['']}\n", "5:18: peers.skills[0]: empty skill name"),
    ("peers: {skills: [a, {name: a}]}\n", "5:28: peers.skills[1]: skill 'a' is already listed (at line 5)"),
    ("peers: {send: reviewer}\n", "5:15: peers.send: expected a list of agent name globs, got string"),
    ("peers: {send: [7]}\n", "5:16: peers.send[0]: expected an agent name glob, got int"),
    ("peers: {send: ['a[b']}\n", "5:16: peers.send: unbalanced '[' in agent name glob 'a[b'"),
    ("peers: {receive: ['']}\n", "5:19: peers.receive: empty agent name glob"),
    ("peers: {send: [a, a]}\n", "5:19: warning: peers.send: duplicate entry 'a' (already at line 5)"),
    ("peers: {accept: ['w c']}\n", "5:18: peers.accept: 'w c' is not a tool name"),
    ("peers: {accept: ['%s']}\n" % ("x" * 64), "peers.accept: '%s' is not a tool name" % ("x" * 64)),
    ("peers: {grant: wc}\n", "5:16: peers.grant: expected a list of tool names, got string"),
    ("peers: {max_ttl: 1h 30m}\n", "5:18: peers.max_ttl: expected a duration like"),
    ("peers: {max_ttl: 0s}\n", "5:18: peers.max_ttl: must be more than zero"),
    ("peers: {max_ttl: 25h}\n", "5:18: peers.max_ttl: must be at most 24h, got '25h'"),
    ("peers: {rate: 0}\n", "5:15: peers.rate: must be at least 1, got 0"),
    ("peers: {rate: 100001}\n", "5:15: peers.rate: must be at most 100000, got 100001"),
    ("peers: {rate: '200'}\n", "5:15: peers.rate: expected an integer, got string"),
    ("peers: {tools: [wc]}\n", "5:16: peers.tools: expected a mapping of tool names to {argv, timeout}, got list"),
    ("peers: {tools: {'w c': {argv: [/bin/x]}}}\n", "5:17: peers.tools: 'w c' is not a tool name"),
    ("peers: {tools: {wc: /usr/bin/wc}}\n", "5:21: peers.tools.wc: expected a mapping, got string"),
    ("peers: {tools: {wc: {timeout: 1s}}}\n", "5:21: peers.tools.wc: missing required key 'argv'"),
    ("peers: {tools: {wc: {argv: [/bin/x], timout: 1s}}}\n",
     "5:38: unknown key 'timout' in peers.tools.wc (did you mean 'timeout'?)"),
    ("peers: {tools: {wc: {argv: []}}}\n", "5:28: peers.tools.wc.argv: expected a non-empty list of strings "
                                           "(the program and its first arguments), got an empty list"),
    ("peers: {tools: {wc: {argv: /usr/bin/wc}}}\n", "5:28: peers.tools.wc.argv: expected a non-empty list"),
    ("peers: {tools: {wc: {argv: [wc, -l]}}}\n", "5:29: peers.tools.wc.argv[0]: 'wc' is not an absolute path"),
    ("peers: {tools: {wc: {argv: [/usr/bin/wc, 5]}}}\n", "5:42: peers.tools.wc.argv[1]: expected a string, got int"),
    ("peers: {tools: {wc: {argv: [/usr/bin/wc, \"a\\0b\"]}}}\n",
     "5:42: peers.tools.wc.argv[1]: a NUL byte cannot be in an argument"),
    ("peers: {tools: {wc: {argv: [/usr/bin/wc], timeout: 6m}}}\n",
     "5:52: peers.tools.wc.timeout: must be at most 5m, got '6m'"),
    ("peers: {tools: {wc: {argv: [/usr/bin/wc], timeout: soon}}}\n",
     "5:52: peers.tools.wc.timeout: expected a duration like"),
    ("on_violation: {peer: kill}\n", "5:16: unknown key 'peer' in on_violation (did you mean 'peers'?)"),
    ("on_violation: {peers: block}\n", "5:23: on_violation.peers: unknown action 'block'"),
    ("on_violation: {rules: {protocol.token_holdr: kill}}\n",
     "unknown key 'protocol.token_holdr' in on_violation.rules (did you mean 'protocol.token_holder'?)"),
])
def test_each_problem_is_reported_where_it_is(tmp_path, body, expected):
    path, found = problems(tmp_path, body)
    assert any(line.startswith(path + ":") and expected in line for line in found), found


def test_a_grant_must_name_a_declared_tool(tmp_path):
    path, found = problems(tmp_path, "peers:\n  grant: [wc, cat]\n  tools:\n    wc: {argv: [/usr/bin/wc]}\n")
    assert found == [f"{path}:6:15: peers.grant: 'cat' is not in peers.tools (declared: wc); the broker "
                     "runs the granter's own tools, so a token for it could never be used"]
    path, found = problems(tmp_path, "peers: {grant: [wc]}\n")
    assert found == [f"{path}:5:17: peers.grant: 'wc' is not in peers.tools (declared: none); the broker "
                     "runs the granter's own tools, so a token for it could never be used"]
    assert check(path)[0] is None                         # an error: load refuses it


def test_accept_needs_no_declared_tool(tmp_path):
    assert problems(tmp_path, "peers: {accept: [wc]}\n")[1] == []


@pytest.mark.parametrize("body, expected", [
    ("peers: {tools: {wc: {argv: [/usr/bin/wc]}}}\n",
     "5:21: warning: peers.tools.wc: not in peers.grant, so no token can be minted for it"),
    ("process: {exec: [/usr/bin/git]}\npeers: {grant: [wc], tools: {wc: {argv: [/usr/bin/wc]}}}\n",
     "6:34: warning: peers.tools.wc: '/usr/bin/wc' is not in process.exec, so the sandbox refuses to run it"),
    ("filesystem: {exec: ['/opt/**'], write: []}\npeers: {grant: [wc], tools: {wc: {argv: [/usr/bin/wc]}}}\n",
     "6:34: warning: peers.tools.wc: '/usr/bin/wc' is not under filesystem.exec"),
])
def test_tools_that_never_run_are_warned_about(tmp_path, body, expected):
    path, found = problems(tmp_path, body)
    assert any(f.startswith(f"{path}:{expected}") for f in found), found


@pytest.mark.parametrize("body", [
    "process: {exec: ['/usr/bin/**']}\n", "process: {exec: ['${WORKSPACE}/**']}\n",
    "filesystem: {exec: ['/usr/**'], write: []}\n"])
def test_tools_the_sandbox_may_run_are_not_warned_about(tmp_path, body):
    body += "peers: {grant: [wc], tools: {wc: {argv: [/usr/bin/wc]}}}\n"
    assert problems(tmp_path, body)[1] == []


def test_argv_keeps_repeated_arguments(tmp_path):
    peers = load(write(tmp_path, "peers:\n  grant: [x]\n  tools: {x: {argv: [/bin/x, -v, -v]}}\n")).spec.peers
    assert peers.tools["x"].argv == ("/bin/x", "-v", "-v")


# ---------------------------------------------------------------- extends

def test_extends_merges_peers_key_by_key_and_replaces_argv(tmp_path):
    write(tmp_path, """\
peers:
  description: base
  send: [reviewer]
  grant: [wc]
  rate: 100
  tools:
    wc: {argv: [/usr/bin/wc, -l], timeout: 20s}
    grep: {argv: [/usr/bin/grep, -n]}
""", "base.yaml")
    child = write(tmp_path, """\
extends: base.yaml
peers:
  send: [worker-*]
  grant: [grep]
  max_ttl: 5m
  tools:
    wc: {argv: [/usr/bin/wc, -c]}
""", "child.yaml")
    p = load(child)
    peers = p.spec.peers
    assert peers.description == "base" and peers.rate == 100 and peers.max_ttl == 300
    assert [i.value for i in peers.send] == ["reviewer", "worker-*"]              # lists appended
    assert [i.value for i in peers.grant] == ["wc", "grep"]
    assert peers.tools["wc"].argv == ("/usr/bin/wc", "-c")                       # a command line is replaced
    assert peers.tools["wc"].timeout == 20 and peers.tools["grep"].argv == ("/usr/bin/grep", "-n")
    assert p.data["peers"]["tools"]["wc"] == {"argv": ["/usr/bin/wc", "-c"], "timeout": "20s"}


def test_other_lists_still_append(tmp_path):
    write(tmp_path, "process: {exec: [/usr/bin/git]}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nprocess: {exec: [/usr/bin/wc]}\n", "child.yaml")
    assert [e.path for e in load(child).spec.process.exec] == ["/usr/bin/git", "/usr/bin/wc"]


# ---------------------------------------------------------------- explain

def test_explain_peers(tmp_path):
    text = explain(load(write(tmp_path, FULL)), VARS)
    block = text.split("\n\nPeers (agent-to-agent broker)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [
        "  Agent card: Reviews patches",
        "  Skills: review; lint (runs the linter)",
        "  May send to: reviewer, worker-*",
        "  Accepts messages from: planner",
        "  May grant tokens for its tools: wc",
        "  May accept tokens for: wc, grep",
        "  Tools the broker runs in this run's sandbox for a token holder:",
        "    wc: /usr/bin/wc -l (+ the call's arguments), timeout 30s",
        "  Tokens it mints live at most 10m (peers.max_ttl)",
        "  Sends at most 500 messages per second (peers.rate)",
    ]
    assert "On violation: alert by default; peers: kill" in text


def test_explain_without_peers_and_with_an_empty_section(tmp_path):
    assert "\nPeers: no agent-to-agent messages (no peers section)\n" in explain(load(write(tmp_path, "")), VARS)
    lines = explain(load(write(tmp_path, "peers: {}\n")), VARS).splitlines()
    start = lines.index("Peers (agent-to-agent broker)")
    assert lines[start + 1:start + 8] == [
        "  May send to: nobody", "  Accepts messages from: nobody",
        "  May grant tokens for its tools: none", "  May accept tokens for: none",
        "  Tools the broker runs for a token holder: none",
        "  Tokens it mints live at most 1h (peers.max_ttl)",
        "  Sends at most 200 messages per second (peers.rate)"]


# ---------------------------------------------------------------- diff

def diff_bodies(tmp_path, old, new):
    return diff(load(write(tmp_path, old, "old.yaml")), load(write(tmp_path, new, "new.yaml")))


def test_diff_peers_per_key(tmp_path):
    old = """\
peers:
  description: old
  skills: [review]
  send: [reviewer]
  receive: [planner]
  grant: [wc]
  accept: [wc]
  max_ttl: 1h
  rate: 200
  tools:
    wc: {argv: [/usr/bin/wc, -l]}
    cat: {argv: [/bin/cat]}
"""
    new = """\
peers:
  description: new
  skills: [review, {name: lint, description: runs it}]
  send: [reviewer, worker-*]
  receive: []
  grant: [wc, grep]
  accept: [wc]
  max_ttl: 2h
  rate: 100
  tools:
    wc: {argv: [/usr/bin/wc, -c], timeout: 20s}
    grep: {argv: [/usr/bin/grep, -n]}
"""
    assert diff_bodies(tmp_path, old, new) == [
        "~ changes: peers.description old -> new",
        "~ changes: peers.skills review -> review, lint (runs it)",
        "+ grants: messages to worker-* (peers.send)",
        "- revokes: messages from planner (peers.receive)",
        "+ grants: granting tokens for its tool grep (peers.grant)",
        "~ changes: peers.tools.wc.argv /usr/bin/wc -l -> /usr/bin/wc -c",
        "+ grants: peers.tools.wc.timeout 20s (was 10s)",
        "- revokes: tool cat run for token holders: /bin/cat (+ the call's arguments), timeout 10s (peers.tools)",
        "+ grants: tool grep run for token holders: /usr/bin/grep -n (+ the call's arguments), timeout 10s "
        "(peers.tools)",
        "+ grants: peers.max_ttl 2h (was 1h)",
        "- revokes: peers.rate 100 (was 200)",
    ]


def test_diff_adding_and_removing_the_section(tmp_path):
    body = "peers: {send: [reviewer], accept: [wc]}\n"
    assert diff_bodies(tmp_path, "", body) == ["+ grants: messages to reviewer (peers.send)",
                                               "+ grants: accepting tokens for wc (peers.accept)"]
    assert diff_bodies(tmp_path, body, "") == ["- revokes: messages to reviewer (peers.send)",
                                               "- revokes: accepting tokens for wc (peers.accept)"]
    assert diff_bodies(tmp_path, "", "peers: {}\n") == ["no permission changes"]
    assert diff_bodies(tmp_path, "on_violation: {peers: alert}\n", "on_violation: {peers: kill}\n") == \
        ["~ changes: on_violation.peers alert -> kill"]
    assert diff_bodies(tmp_path, "", "on_violation: {rules: {protocol.token_holder: kill}}\n") == \
        ["~ changes: on_violation.rules.protocol.token_holder alert -> kill"]


# ---------------------------------------------------------------- the JSON Schema and the docs say the same

def _schema():
    with open(os.path.join(REPO, "policies", "agentpolicy.schema.json")) as f:
        return json.load(f)


def test_json_schema_lists_the_peers_keys():
    peers = _schema()["properties"]["peers"]
    assert tuple(peers["properties"]) == S.PEERS_KEYS
    tool = peers["properties"]["tools"]["additionalProperties"]
    assert tuple(tool["properties"]) == S.TOOL_KEYS and tool["required"] == ["argv"]
    assert peers["properties"]["rate"]["maximum"] == model.MAX_RATE
    assert peers["properties"]["max_ttl"]["oneOf"][0]["maximum"] == model.MAX_MAX_TTL
    assert tool["properties"]["timeout"]["oneOf"][0]["maximum"] == model.MAX_TOOL_TIMEOUT


@pytest.mark.parametrize("body, valid", [
    (FULL, True),
    ("peers: {}\n", True),
    ("peers: {sned: []}\n", False),
    ("peers: {rate: 0}\n", False),
    ("peers: {tools: {wc: {argv: []}}}\n", False),
    ("peers: {tools: {wc: {argv: [wc]}}}\n", False),
    ("peers: {tools: {wc: {timeout: 1s}}}\n", False),
    ("peers: {tools: {'w c': {argv: [/bin/x]}}}\n", False),
    ("peers: {accept: ['w c']}\n", False),
    ("peers: {skills: [{description: x}]}\n", False),
    ("on_violation: {peers: block}\n", False),
])
def test_json_schema_agrees(tmp_path, body, valid):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    path = write(tmp_path, body)
    assert (check(path)[0] is not None) == valid
    assert jsonschema.Draft202012Validator(_schema()).is_valid(yaml.safe_load(HEAD + body)) == valid


def test_docs_list_the_section_and_every_rule():
    with open(os.path.join(REPO, "docs", "policy.md")) as f:
        text = f.read()
    for key in S.PEERS_KEYS:
        assert f"`peers.{key}" in text, key
    rules = text.split("\n## Rules", 1)[1].split("\n## ", 1)[0]
    for rule in model.RULES:
        if rule.startswith(("protocol.", "identity.sender")):
            assert f"`{rule}`" in rules, rule
