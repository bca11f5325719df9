"""The policy's termination section: every key into the typed model, every
problem at its FILE:LINE:COL (did-you-mean for keys), explain, diff, and the
JSON Schema and the docs listing every key."""
import json
import os

import pytest

from agentwatch.policy import check, load
from agentwatch.policy import schema as S
from agentwatch.policy.diff import diff
from agentwatch.policy.explain import explain
from agentwatch.policy.model import BUDGET_KEYS, LOOP_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: t\n"     # 4 lines
VARS = {"WORKSPACE": "/work/ws", "HOME": "/home/u", "TMPDIR": "/tmp"}
FULL = """\
termination:
  done:
    - file: "${WORKSPACE}/DONE"
    - file: "${WORKSPACE}/status.txt"
      matches: "^PASS"
    - command: ["/usr/bin/make", "-q", "test"]
      every: 30s
      timeout: 1m
  no_progress: 120s
  loop: {exec: 5, failing: 3, workspace: 3}
  budget: {execs: 500, bytes_written: 100MB, processes: 200, llm_tokens: 200000, wall_time: 1h}
  grace: 2s
"""


def write(tmp_path, body, name="p.yaml"):
    p = tmp_path / name
    p.write_text(HEAD + body)
    return str(p)


def problems(tmp_path, body):
    path = write(tmp_path, body)
    return [str(p).replace(path, "p.yaml") for p in check(path)[1]]


def test_every_key_reaches_the_model(tmp_path):
    t = load(write(tmp_path, FULL)).spec.termination
    assert [(c.file, c.matches, c.command) for c in t.done] == [
        ("${WORKSPACE}/DONE", None, None), ("${WORKSPACE}/status.txt", "^PASS", None),
        (None, None, ("/usr/bin/make", "-q", "test"))]
    assert (t.done[2].every, t.done[2].timeout, t.done[2].loc.line) == (30, 60, 10)
    assert t.no_progress == 120 and t.grace == 2
    assert t.loop == {"exec": 5, "failing": 3, "workspace": 3}
    assert t.budget == {"execs": 500, "bytes_written": 100 << 20, "processes": 200, "llm_tokens": 200000,
                        "wall_time": 3600}


def test_defaults_and_sensors(tmp_path):
    p = load(write(tmp_path, "termination: {done: [{command: [/bin/true]}]}\n"))
    t = p.spec.termination
    assert (t.done[0].every, t.done[0].timeout, t.grace, t.loop, t.budget, t.no_progress) == \
        (30, 10, 5, {}, {}, None)
    assert "file" in p.spec.sensor_groups()     # workspace writes are progress
    assert load(write(tmp_path, "")).spec.termination is None


@pytest.mark.parametrize("body, expected", [
    ("termination: {no_progres: 1m}\n",
     "p.yaml:5:15: unknown key 'no_progres' in termination (did you mean 'no_progress'?)"),
    ("termination: {loop: {exce: 3}}\n",
     "p.yaml:5:22: unknown key 'exce' in termination.loop (did you mean 'exec'?)"),
    ("termination: {budget: {tokens: 3}}\n",
     "p.yaml:5:24: unknown key 'tokens' in termination.budget (did you mean 'llm_tokens'?)"),
    ("termination: {loop: {exec: 1}}\n", "p.yaml:5:28: termination.loop.exec: must be at least 2, got 1"),
    ("termination: {budget: {execs: 0}}\n", "p.yaml:5:31: termination.budget.execs: must be at least 1, got 0"),
    ("termination: {no_progress: 0.5s}\n",
     "p.yaml:5:28: termination.no_progress: must be at least 1s, got '0.5s'"),
    ("termination: {grace: 10m}\n", "p.yaml:5:22: termination.grace: must be at most 5m, got '10m'"),
    ("termination: {done: [{file: DONE}]}\n",
     "p.yaml:5:29: termination.done[0].file: relative path 'DONE': a path starts with '/', a variable "
     "like ${WORKSPACE}, or '**/'"),
    ("termination: {done: [{file: '${WORKSPACE}/*.ok'}]}\n",
     "p.yaml:5:29: termination.done[0].file: '${WORKSPACE}/*.ok' is a glob: a done file is one literal path"),
    ("termination: {done: [{file: /x, matches: '(x'}]}\n",
     "p.yaml:5:42: termination.done[0].matches: not a regular expression: missing ), unterminated "
     "subpattern at position 0"),
    ("termination: {done: [{command: [make]}]}\n",
     "p.yaml:5:33: termination.done[0].command[0]: 'make' is not an absolute path (the check runs it "
     "without a PATH search)"),
    ("termination: {done: [{command: [/bin/true], every: 0.5s}]}\n",
     "p.yaml:5:52: termination.done[0].every: must be at least 1s, got '0.5s'"),
    ("termination: {done: [{file: /x, every: 5s}]}\n",
     "p.yaml:5:33: termination.done[0].every: only a command condition takes 'every'"),
    ("termination: {done: [{file: /x, command: [/bin/true]}]}\n",
     "p.yaml:5:22: termination.done[0]: give exactly one of 'file', 'command' or 'message'"),
    ("termination: {done: [{message: {to: planner}}]}\n",
     "p.yaml:5:32: termination.done[0].message: missing required key 'tag'"),
    ("termination: {done: [{message: {to: 'no spaces', tag: result}}]}\n",
     "p.yaml:5:37: termination.done[0].message.to: 'no spaces' is not a name (letters, digits, '.', '_', "
     "'-'; at most 63)"),
    ("termination: {done: [{message: {to: p, tag: r}, every: 5s}]}\n",
     "p.yaml:5:49: termination.done[0].every: only a command condition takes 'every'"),
    ("termination: {done: [{fiel: /x}]}\n",
     "p.yaml:5:23: unknown key 'fiel' in termination.done[0] (did you mean 'file'?)"),
    ("termination: []\n", "p.yaml:5:14: termination: expected a mapping, got list"),
])
def test_each_problem_is_reported_where_it_is(tmp_path, body, expected):
    assert expected in problems(tmp_path, body)


def test_a_message_condition_loads_and_explains(tmp_path):
    policy = load(write(tmp_path, "termination: {done: [{message: {to: planner, tag: result}}]}\n"))
    (cond,) = policy.spec.termination.done
    assert cond.message == {"to": "planner", "tag": "result"} and cond.file is None and cond.command is None
    assert "a broker message of this run tagged 'result' reaches agent 'planner'" in explain(policy, VARS)


def test_explain(tmp_path):
    text = explain(load(write(tmp_path, FULL)), VARS)
    block = text.split("\nTermination", 1)[1].split("\n\n", 1)[0]
    assert "Done (exit status 0) when the file ${WORKSPACE}/DONE exists" in block
    assert "matches /^PASS/" in block and "/usr/bin/make -q test exits 0" in block
    assert "No progress (exit status 82)" in block and "for 2m" in block
    assert block.count("Loop (exit status 81)") == 3 and block.count("Budget (exit status 83)") == 4
    assert "Timeout (exit status 124) once it has run 1h" in block and "SIGKILL 2s later" in block
    assert "Termination: the run ends when the agent exits" in explain(load(write(tmp_path, "")), VARS)


def test_diff(tmp_path):
    a = load(write(tmp_path, FULL, "a.yaml"))
    b = load(write(tmp_path, FULL.replace("exec: 5", "exec: 10").replace("execs: 500", "execs: 100")
              .replace("    - file: \"${WORKSPACE}/DONE\"\n", ""), "b.yaml"))
    assert diff(a, b) == [
        "~ changes: termination.done drops: the run is done when the file ${WORKSPACE}/DONE exists",
        "+ grants: termination.loop.exec 10 (was 5)",
        "- revokes: termination.budget.execs 100 (was 500)"]
    assert "- revokes: termination.no_progress 2m (was unlimited)" in diff(load(write(tmp_path, "", "c.yaml")), a)


def _schema():
    with open(os.path.join(REPO, "policies", "agentpolicy.schema.json")) as f:
        return json.load(f)


def test_json_schema_lists_the_keys():
    t = _schema()["properties"]["termination"]
    assert tuple(t["properties"]) == S.TERMINATION_KEYS
    assert tuple(t["properties"]["loop"]["properties"]) == LOOP_KEYS
    assert tuple(t["properties"]["budget"]["properties"]) == BUDGET_KEYS
    done = t["properties"]["done"]["items"]["oneOf"]
    assert set().union(*(d["properties"] for d in done)) == set(S.DONE_KEYS)
    assert tuple(done[2]["properties"]["message"]["properties"]) == S.DONE_MESSAGE_KEYS


@pytest.mark.parametrize("body, valid", [
    (FULL, True),
    ("termination: {}\n", True),
    ("termination: {loop: {exec: 1}}\n", False),
    ("termination: {done: [{file: DONE}]}\n", False),
    ("termination: {done: [{command: [make]}]}\n", False),
    ("termination: {done: [{file: /x, every: 3s}]}\n", False),
    ("termination: {done: [{message: {to: planner, tag: result}}]}\n", True),
    ("termination: {done: [{message: {to: planner}}]}\n", False),
    ("termination: {budget: {bytes_written: 1XB}}\n", False),
    ("termination: {nope: 1}\n", False),
])
def test_json_schema_agrees(tmp_path, body, valid):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    assert (check(write(tmp_path, body))[0] is not None) == valid
    assert jsonschema.Draft202012Validator(_schema()).is_valid(yaml.safe_load(HEAD + body)) == valid


def test_docs_list_every_key():
    with open(os.path.join(REPO, "docs", "policy.md")) as f:
        text = f.read()
    for key in S.TERMINATION_KEYS:
        assert f"`termination.{key}" in text, key
    for key in LOOP_KEYS:
        assert f"`termination.loop.{key}`" in text, key
    for key in BUDGET_KEYS:
        assert f"`termination.budget.{key}`" in text, key
    for key in S.DONE_KEYS:
        assert f"`{key}`" in text, key
