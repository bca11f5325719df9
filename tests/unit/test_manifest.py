"""Manifests (agentwatch/harness/manifest.py, docs/manifest.md): every
problem at its FILE:LINE:COL, the shipped example loads and matches the
JSON Schema, each agent's policy is checked where it is written."""
import json
import os

import pytest
import yaml

from agentwatch.core.errors import PolicyError
from agentwatch.harness import manifest as M

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(REPO, "examples", "manifest.yaml")
SCHEMA = os.path.join(REPO, "policies", "agentmanifest.schema.json")
HEAD = "apiVersion: agentwatch/v1\nkind: AgentManifest\nmetadata:\n  name: team\n"
POLICY = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: p}\n"


@pytest.fixture
def d(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "ws").mkdir()
    (tmp_path / "prompt.md").write_text("be good\n")
    return tmp_path


def problems(d, text):
    path = d / "m.yaml"
    path.write_text(text)
    m, found = M.check(str(path))
    return m, [str(p) for p in found]


AGENT = "agents:\n  - name: a\n    command: [/bin/sleep, '9']\n    policy: p.yaml\n"


def test_a_full_manifest_becomes_agent_specs(d):
    m, found = problems(d, HEAD + """\
gateway: {config: gw.yaml}
agents:
  - name: a
    command: [/bin/sleep, "9"]
    policy: p.yaml
    weight: 300
    budgets: {tokens: 1000, requests: 10, cost: 0.5}
    workspace: ws
    env: {K: v}
    prompt: prompt.md
    allow_downgrade: true
  - name: b
    command: [/bin/true]
    policy: ./p.yaml
""")
    assert found == []
    assert m.name == "team" and m.path == str(d / "m.yaml")
    assert m.gateway_config == str(d / "gw.yaml")          # a path only: the gateway reads it
    a, b = m.agents
    assert (a.name, a.command, a.policy, a.weight) == ("a", ("/bin/sleep", "9"), str(d / "p.yaml"), 300)
    assert a.budgets == {"tokens": 1000, "requests": 10, "cost": 0.5}
    assert (a.workspace, a.env, a.prompt) == (str(d / "ws"), {"K": "v"}, str(d / "prompt.md"))
    assert a.allow_downgrade is True
    assert (b.weight, b.budgets, b.workspace, b.env, b.prompt, b.allow_downgrade) == (100, {}, None, {}, None,
                                                                                       False)
    assert m.agent("b") is b and m.agent("c") is None


@pytest.mark.parametrize("body, expected", [
    # the top
    (HEAD.replace("agentwatch/v1", "v2") + AGENT, "1:13: apiVersion: expected 'agentwatch/v1', got 'v2'"),
    (HEAD + AGENT + "extra: 1\n", "9:1: unknown key 'extra' in manifest"),
    (HEAD + AGENT + "agnets: []\n", "9:1: unknown key 'agnets' in manifest (did you mean 'agents'?)"),
    (HEAD, "1:1: manifest: 'agents' is required"),
    ("apiVersion: agentwatch/v1\nkind: AgentManifest\n" + AGENT, "1:1: manifest: 'metadata' is required"),
    (HEAD.replace("name: team", "name: a/b") + AGENT, "4:9: metadata.name: 'a/b' is not a name"),
    (HEAD.replace("name: team", "nam: team") + AGENT, "4:3: unknown key 'nam' in metadata"),
    (HEAD + "gateway: {config: 3}\n" + AGENT, "5:19: gateway.config: expected a path, got int"),
    (HEAD + "gateway: {conf: x}\n" + AGENT, "5:11: unknown key 'conf' in gateway"),
    (HEAD + "agents: {a: 1}\n", "5:9: agents: expected a list of agents, got mapping"),
    (HEAD + "agents: []\n", "5:9: agents: a manifest declares at least one agent"),
    (HEAD + "agents: [3]\n", "5:10: agents[0]: expected a mapping, got int"),
    # an agent
    (HEAD + AGENT.replace("name: a", "nme: a"), "6:5: unknown key 'nme' in agents[0] (did you mean 'name'?)"),
    (HEAD + AGENT.replace("    command: [/bin/sleep, '9']\n", ""), "6:5: agents[0]: 'command' is required"),
    (HEAD + AGENT.replace("    policy: p.yaml\n", ""), "6:5: agents[0]: 'policy' is required"),
    (HEAD + AGENT.replace("[/bin/sleep, '9']", "[/bin/sleep, 9]"),
     "7:27: agents[0].command[1]: expected a string, got int (quote it)"),
    (HEAD + AGENT.replace("[/bin/sleep, '9']", "[]"), "7:14: agents[0].command: expected a list of strings"),
    (HEAD + AGENT.replace("[/bin/sleep, '9']", "/bin/sleep 9"),
     "7:14: agents[0].command: expected a list of strings (the program and its arguments), got string"),
    (HEAD + AGENT.replace("p.yaml", "nope.yaml"), "8:13: agents[0].policy: 'nope.yaml' is not a file"),
    (HEAD + AGENT + "    weight: 0\n", "9:13: agents[0].weight: must be at least 1, got 0"),
    (HEAD + AGENT + "    weight: 10001\n", "9:13: agents[0].weight: must be at most 10000, got 10001"),
    (HEAD + AGENT + "    weight: high\n", "9:13: agents[0].weight: expected an integer, got string"),
    (HEAD + AGENT + "    budgets: {tokens: 0}\n", "9:23: agents[0].budgets.tokens: must be at least 1, got 0"),
    (HEAD + AGENT + "    budgets: {requests: 1.5}\n",
     "9:25: agents[0].budgets.requests: expected an integer, got float"),
    (HEAD + AGENT + "    budgets: {cost: -1}\n", "9:21: agents[0].budgets.cost: must be more than zero"),
    (HEAD + AGENT + "    budgets: {cost: free}\n", "9:21: agents[0].budgets.cost: expected a number"),
    (HEAD + AGENT + "    budgets: {money: 1}\n", "9:15: unknown key 'money' in agents[0].budgets"),
    (HEAD + AGENT + "    budgets: 5\n", "9:14: agents[0].budgets: expected a mapping, got int"),
    (HEAD + AGENT + "    workspace: nowhere\n", "9:16: agents[0].workspace: 'nowhere' is not a directory"),
    (HEAD + AGENT + "    workspace: p.yaml\n", "9:16: agents[0].workspace: 'p.yaml' is not a directory"),
    (HEAD + AGENT + "    env: {PORT: 8080}\n", "9:17: agents[0].env.PORT: expected a string, got int (quote it)"),
    (HEAD + AGENT + "    env: [A]\n", "9:10: agents[0].env: expected a mapping of names to strings, got list"),
    (HEAD + AGENT + "    env: {'A=B': x}\n", "9:11: agents[0].env: 'A=B' is not an environment variable name"),
    (HEAD + AGENT + "    prompt: gone.md\n", "9:13: agents[0].prompt: 'gone.md' is not a file"),
    (HEAD + AGENT + "    allow_downgrade: yes please\n",
     "9:22: agents[0].allow_downgrade: expected true or false, got string"),
    (HEAD + AGENT + AGENT[len("agents:\n"):], "9:11: agents[1].name: duplicate agent name 'a' (first at line 6)"),
    (HEAD + AGENT.replace("name: a", "name: ''"), "6:11: agents[0].name: '' is not a name"),
])
def test_every_problem_is_at_its_place(d, body, expected):
    m, found = problems(d, body)
    assert m is None
    where = str(d / "m.yaml")
    assert any(p.startswith(f"{where}:") and f"{where}:{expected}" in p for p in found), found


@pytest.mark.parametrize("text, expected", [
    ("", "1:1: manifest is empty"),
    ("- a\n", "1:1: a manifest is a mapping"),
    ("kind: AgentPolicy\n", "1:7: kind is 'AgentPolicy'; 'kind: AgentManifest' is required"),
    ("a: [\n", "invalid YAML"),
    ("kind: AgentManifest\nkind: AgentManifest\n", "2:1: duplicate key 'kind' (first at line 1)"),
    ("kind: !!python/object x\n", "unsupported YAML tag"),
])
def test_a_file_that_is_no_manifest_is_one_problem(d, text, expected):
    m, found = problems(d, text)
    assert m is None and len(found) == 1 and expected in found[0], found
    assert found[0].startswith(str(d / "m.yaml"))


def test_an_unreadable_file_says_manifest(tmp_path):
    m, found = M.check(str(tmp_path / "nope.yaml"))
    assert m is None and [str(p) for p in found] == [f"{tmp_path}/nope.yaml: cannot read manifest: "
                                                     "No such file or directory"]


def test_a_bad_policy_is_reported_in_the_policy_file(d):
    (d / "bad.yaml").write_text(POLICY + "filesystem: 3\n")
    m, found = problems(d, HEAD + AGENT.replace("p.yaml", "bad.yaml"))
    assert m is None and any(p.startswith(f"{d}/bad.yaml:4:13: filesystem") for p in found), found


def test_an_agent_name_its_policy_refuses_is_reported_at_the_name(d):
    (d / "named.yaml").write_text(POLICY + "identity: {name: 'coder-*'}\n")
    body = HEAD + AGENT.replace("p.yaml", "named.yaml")
    m, found = problems(d, body)
    assert m is None and found == [f"{d}/m.yaml:6:11: agents[0].name: 'a' does not match identity.name "
                                   "'coder-*' of its policy 'named.yaml'"]
    m, found = problems(d, body.replace("name: a", "name: coder-1"))
    assert found == [] and m.agents[0].name == "coder-1"


def test_load_raises_every_error_one_per_line(d):
    path = d / "m.yaml"
    path.write_text(HEAD + AGENT + "    weight: 0\n    env: {A: 1}\n")
    with pytest.raises(PolicyError) as e:
        M.load(str(path))
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{path}:") for line in lines)


def test_the_example_loads():
    m = M.load(EXAMPLE)
    assert m.name == "demo-team" and len(m.agents) == 3
    assert [a.weight for a in m.agents] == [400, 200, 100]
    assert all(os.path.isfile(a.policy) and a.policy.startswith(os.path.join(REPO, "policies"))
               for a in m.agents)


def test_the_example_matches_the_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    with open(SCHEMA) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    with open(EXAMPLE) as f:
        jsonschema.validate(yaml.safe_load(f), schema, cls=jsonschema.Draft202012Validator)


def test_the_schema_and_the_validator_know_the_same_keys():
    with open(SCHEMA) as f:
        schema = json.load(f)
    assert tuple(schema["properties"]) == M.TOP_KEYS
    assert tuple(schema["$defs"]["agent"]["properties"]) == M.AGENT_KEYS
    assert tuple(schema["$defs"]["agent"]["properties"]["budgets"]["properties"]) == M.BUDGET_KEYS
    w = schema["$defs"]["agent"]["properties"]["weight"]
    assert (w["minimum"], w["maximum"], w["default"]) == M.WEIGHT_RANGE + (M.DEFAULT_WEIGHT,)
    from agentwatch.core.options import RunOptions
    import dataclasses
    weight = {f.name: f for f in dataclasses.fields(RunOptions)}["weight"]
    assert weight.metadata["range"] == M.WEIGHT_RANGE


def test_up_check_prints_problems_as_file_line_col(d, capsys):
    from cli.main import main
    bad = d / "m.yaml"
    bad.write_text(HEAD + "agents:\n  - {name: a, command: [/bin/true], policy: p.yaml, weight: 0}\n")
    assert main(["up", "--check", str(bad)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{bad}:6:61: agents[0].weight: must be at least 1, got 0"]
    assert main(["up", "--check", EXAMPLE]) == 0
    assert capsys.readouterr().out == ""


def test_up_refuses_a_bad_manifest_with_its_errors(d, capsys):
    from cli.main import main
    bad = d / "m.yaml"
    bad.write_text(HEAD + "agents: []\n")
    assert main(["up", str(bad)]) == 1
    assert capsys.readouterr().err == (f"agentwatch: error: {bad}:5:9: agents: a manifest declares "
                                       "at least one agent\n")
