"""The policy format: typed model, the validator load and lint share
(FILE:LINE:COL for every problem), extends, and hostile files (each one
clear error, fast)."""
import json
import os
import signal
import time

import pytest

from agentwatch.core.errors import PolicyError
from agentwatch.policy import canonical_digest, check, load
from agentwatch.core.events import ACTIONS
from agentwatch.policy import checker, model
from agentwatch.policy import schema as S
from agentwatch.policy.source import ALIAS_BUDGET, MAX_DEPTH

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: t\n"


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def problems(tmp_path, body, name="p.yaml"):
    path = write(tmp_path, HEAD + body, name)
    return path, [str(p) for p in check(path)[1]]


@pytest.fixture
def deadline():
    """Fail (instead of hanging) when the block takes over 2 seconds."""
    def expire(*_):
        raise TimeoutError("took over 2 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    start = time.perf_counter()
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < 2.0


# ---------------------------------------------------------------- typed model

def test_a_full_policy_becomes_a_typed_spec(tmp_path):
    path = write(tmp_path, HEAD + """\
identity: {name: "coding-*", owner: team, required_signer: "ed25519:%s"}
filesystem: {read: ["/usr/**"], write: ["${WORKSPACE}/**"], deny: ["**/.env"]}
network:
  allow:
    - {cidr: 10.0.0.0/8}
    - {domain: PyPI.org, ports: [443, "8000-8100"], protocol: tcp}
  loopback: [8080]
  unix: ["@dbus-*", "/run/x.sock"]
process:
  exec: ["/usr/bin/git", {path: /usr/bin/python3, sha256: "%s"}]
  max_processes: 64
  ptrace: false
syscalls: {deny: [keyctl]}
resources: {memory: 2G, cpu: 1.5, pids: 256, wall_time: 1h30m}
on_violation: {default: alert, network: deny, rules: {"filesystem.deny": kill}}
""" % ("AB" * 32, "cd" * 32))
    p = load(path)
    s = p.spec
    assert s.identity.required_signer == "ed25519:" + "ab" * 32
    assert [i.value for i in s.filesystem.read] == ["/usr/**"] and s.filesystem.exec is None
    assert s.network.allow[1].domain == "pypi.org" and s.network.allow[1].ports == ((443, 443), (8000, 8100))
    assert s.network.allow[0].protocol == "any" and s.network.allow[0].ports is None
    assert s.network.loopback == ((8080, 8080),)
    assert [i.value for i in s.network.unix] == ["@dbus-*", "/run/x.sock"]
    assert s.process.exec[1].sha256 == "cd" * 32 and s.process.toggles == {"ptrace": False}
    assert s.resources.memory == 2 << 30 and s.resources.wall_time == 5400 and s.resources.cpu == 1.5
    assert s.action_for("network", "network.egress") == "deny"
    assert s.action_for("filesystem", "filesystem.deny") == "kill"
    assert s.action_for("syscall", "syscalls.deny") == "alert"
    assert p.sensors == ["process", "file", "net", "sensitive", "signal"]
    assert p.agent_name == "coding-*"
    assert s.filesystem.read[0].loc.line == 6


@pytest.mark.parametrize("body, groups", [
    ("", ["process"]),
    ("filesystem: {deny: []}\n", ["process", "file"]),
    ("identity: {name: x}\n", ["process", "file"]),
    ("network: {}\n", ["process", "net"]),
    ("process: {ptrace: true}\n", ["process", "signal"]),
    ("process: {ptrace: false}\n", ["process", "sensitive", "signal"]),
    ("syscalls: {deny: [keyctl]}\n", ["process", "sensitive"]),
    ("network: {}\nmonitor: [process, net]\n", ["process", "net"]),
])
def test_sensor_groups_are_derived_from_the_rules(tmp_path, body, groups):
    assert load(write(tmp_path, HEAD + body)).sensors == groups


# ---------------------------------------------------------------- problems and where they are

@pytest.mark.parametrize("body, expected", [
    ("filesytem: {}\n", "5:1: unknown key 'filesytem' (did you mean 'filesystem'?)"),
    ("filesystem:\n  read: 5\n", "6:9: filesystem.read: expected a list of path globs, got int"),
    ("filesystem:\n  read: [/a, 7]\n", "6:14: filesystem.read[1]: expected a path glob, got int"),
    ("filesystem:\n  wirte: []\n", "6:3: unknown key 'wirte' in filesystem (did you mean 'write'?)"),
    ("network: {allow: [{cidr: 10.0.0.1/8}]}\n", "host bits are set (did you mean 10.0.0.0/8?)"),
    ("network: {allow: [{domain: a.org, ports: [70000]}]}\n", "port 70000 is out of range 1-65535"),
    ("network: {allow: [{domain: a.org, cidr: 1.0.0.0/8}]}\n", "give exactly one of 'cidr' or 'domain'"),
    ("network: {loopback: maybe}\n", "network.loopback: expected true, false or a list of ports, got string"),
    ("process: {ptrace: 'no'}\n", "5:19: process.ptrace: expected true or false, got string"),
    ("process: {max_processes: true}\n", "process.max_processes: expected an integer, got bool"),
    ("process: {exec: [{path: '/usr/bin/*', sha256: '%s'}]}\n" % ("a" * 64),
     "a pinned hash needs a literal path"),
    ("syscalls: {deny: [kectl]}\n", "5:19: syscalls.deny: unknown syscall 'kectl' (did you mean 'keyctl'?)"),
    ("on_violation: {default: block}\n", "on_violation.default: unknown action 'block'"),
    ("on_violation: {rules: {filesystem.dney: kill}}\n", "unknown key 'filesystem.dney' in on_violation.rules "
                                                         "(did you mean 'filesystem.deny'?)"),
    ("identity: {required_signer: 'rsa:00'}\n", "identity.required_signer: expected 'ed25519:'"),
    ("identity: {name: 'a[b'}\n", "unbalanced '['"),
    ("monitor: [proc]\n", "unknown sensor group 'proc' (did you mean 'process'?)"),
    ("resources: {cpu: 0}\n", "resources.cpu: expected a number of CPUs"),
    # durations and sizes: agentwatch.core.units (tests/unit/test_units.py has the grammar)
    ("resources: {wall_time: 1h 30m}\n", "5:24: resources.wall_time: expected a duration like"),
    ("resources: {wall_time: 0s}\n", "5:24: resources.wall_time: must be more than zero"),
    ("resources: {wall_time: 36501d}\n", "resources.wall_time: must be at most 36500d"),
    ("resources: {memory: 2X}\n", "5:21: resources.memory: expected a size like"),
    ("resources: {memory: 8192P}\n", "resources.memory: must be at most 2^63 - 1 bytes"),
    # limits the kernel would refuse (EINVAL, ERANGE) when the run applies them
    ("resources: {cpu: 0.001}\n", "5:18: resources.cpu: expected a number of CPUs like 1.5 (0.01-4096), got 0.001"),
    ("resources: {pids: 1000000000000000000000000000000}\n", "5:19: resources.pids: must be at most 4194304"),
    ("process: {max_processes: 4194305}\n", "5:26: process.max_processes: must be at most 4194304"),
    ("filesystem: {read: [/a, /a]}\n", "warning: filesystem.read: duplicate entry '/a' (already at line 5)"),
])
def test_each_problem_is_reported_where_it_is(tmp_path, body, expected):
    path, found = problems(tmp_path, body)
    assert any(line.startswith(path + ":") and expected in line for line in found), found


@pytest.mark.parametrize("text, expected", [
    ("apiVersion: agentwatch/v2\nkind: AgentPolicy\nmetadata: {name: x}\n",
     "1:13: apiVersion 'agentwatch/v2' is not supported"),
    ("kind: AgentPolicy\nmetadata: {name: x}\n", "1:1: missing required key 'apiVersion'"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\n", "1:1: missing required key 'metadata'"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {description: x}\n",
     "3:11: metadata: missing required key 'name'"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: 'has space'}\n", "is not a name"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\nkind: AgentPolicy\n", "3:1: duplicate key 'kind' (first at line 2)"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\n<<: {a: 1}\n", "3:1: YAML merge keys (<<) are not supported"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\n[a]: b\n", "3:1: a mapping key must be a plain string"),
    ("kind: AgentPolicy\n---\nkind: AgentPolicy\n", "2:1: a policy file holds one YAML document"),
    ("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: !!set {name: x}\n", "unsupported YAML tag !!set"),
])
def test_document_level_problems(tmp_path, text, expected):
    path = write(tmp_path, text)
    found = [str(p) for p in check(path)[1]]
    assert any(line.startswith(path + ":") and expected in line for line in found), found


def test_load_raises_every_error_one_per_line_and_no_warnings(tmp_path):
    path = write(tmp_path, HEAD + "filesystem:\n  read: [usr, /tmp/]\n  write: 3\nprocess: {bpf: 1}\n")
    with pytest.raises(PolicyError) as e:
        load(path)
    lines = str(e.value).splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{path}:6:10", f"{path}:7:10", f"{path}:8:16"]
    assert "warning" not in str(e.value)                  # the /tmp/ warning is not an error


def test_warnings_do_not_stop_load_and_are_kept(tmp_path):
    p = load(write(tmp_path, HEAD + "filesystem: {read: [/tmp/], write: []}\n"))
    assert [w.severity for w in p.warnings] == ["warning"] and "trailing '/'" in p.warnings[0].message


def test_problems_are_capped(tmp_path):
    path = write(tmp_path, HEAD + "".join(f"k{i}: 1\n" for i in range(500)))
    found = check(path)[1]
    assert len(found) == checker.MAX_PROBLEMS + 1 and "stopped after" in found[-1].message


def test_yaml_one_point_one_booleans_and_quoted_strings(tmp_path):
    p = load(write(tmp_path, HEAD + "network: {loopback: yes, unix: off}\n"))
    assert p.spec.network.loopback is True and p.spec.network.unix is False
    path, found = problems(tmp_path, "process: {ptrace: 'false'}\n", "q.yaml")
    assert any("expected true or false, got string" in f for f in found)


def test_keys_are_their_text(tmp_path):
    path, found = problems(tmp_path, "filesystem: {yes: [/a]}\n")
    assert any("unknown key 'yes' in filesystem" in f for f in found), found


# ---------------------------------------------------------------- contradictions and dead rules

@pytest.mark.parametrize("body, expected", [
    ("filesystem: {write: ['${HOME}/.ssh/**'], deny: ['${HOME}/.ssh/**']}\n",
     "5:22: filesystem.write: '${HOME}/.ssh/**' is also in filesystem.deny (line 5); deny wins"),
    ("filesystem: {write: ['${HOME}/.ssh/**'], deny: ['**/.ssh/**']}\n",
     "warning: filesystem.write: '${HOME}/.ssh/**' is shadowed by filesystem.deny '**/.ssh/**'"),
    ("filesystem: {exec: ['/usr/**'], write: ['/tmp/**', '/usr/local/**']}\n",
     "warning: filesystem.write: '/usr/local/**' is also executable (filesystem.exec '/usr/**'"),
    ("filesystem: {write: ['${TMPDIR}/**']}\nprocess: {exec: ['/**']}\n",
     "warning: filesystem.write: '${TMPDIR}/**' is also executable (process.exec '/**'"),
    ("filesystem: {exec: ['/usr/bin/**']}\nprocess: {exec: [/usr/bin/git, /opt/tool]}\n",
     "warning: process.exec: '/opt/tool' is not under filesystem.exec, so it can never run"),
    ("process: {ptrace: true}\nsyscalls: {deny: [process_vm_readv]}\n",
     "syscalls.deny: 'process_vm_readv' contradicts process.ptrace: true (line 5)"),
    ("network: {allow: [{cidr: 127.0.0.1/32}]}\n", "warning: network.allow: 127.0.0.1/32 is loopback"),
    ("filesystem: {read: ['/usr/**']}\n", "warning: filesystem.read is set but filesystem.write is not"),
    ("network: {}\nmonitor: [process, file]\n", "warning: monitor: without net some rules"),
])
def test_contradictions_and_dead_rules(tmp_path, body, expected):
    path, found = problems(tmp_path, body)
    assert any(expected in line for line in found), found


def test_rules_that_are_fine_are_not_flagged(tmp_path):
    path, found = problems(tmp_path, """\
filesystem:
  read: ["${HOME}/**", "/usr/**"]
  write: ["${WORKSPACE}/**", "${TMPDIR}/**"]
  exec: ["/usr/bin/**", "/lib*/**"]
  deny: ["${HOME}/.ssh/**", "**/.env"]
process: {exec: ["/usr/bin/git"], ptrace: false}
syscalls: {deny: [ptrace]}
network: {allow: [{cidr: 0.0.0.0/0, ports: [443]}]}
""")
    assert found == []


# ---------------------------------------------------------------- extends

def test_extends_merges_lists_maps_and_scalars(tmp_path):
    write(tmp_path, HEAD.replace("name: t", "name: base") + """\
filesystem: {read: ["/usr/**", "/etc/**"], deny: ["**/.env"]}
process: {ptrace: false, bpf: false, max_processes: 10}
on_violation: {default: alert, rules: {"filesystem.deny": kill}}
""", "base.yaml")
    child = write(tmp_path, HEAD.replace("name: t", "name: child") + """\
extends: base.yaml
filesystem: {read: ["/etc/**", "/opt/**"]}
process: {ptrace: true}
on_violation: {default: deny, rules: {"process.exec": kill}}
""", "child.yaml")
    p = load(child)
    d = p.data
    assert "extends" not in d and d["metadata"] == {"name": "child"}
    assert d["filesystem"]["read"] == ["/usr/**", "/etc/**", "/opt/**"]          # appended, deduplicated
    assert d["filesystem"]["deny"] == ["**/.env"]
    assert d["process"] == {"ptrace": True, "bpf": False, "max_processes": 10}
    assert d["on_violation"] == {"default": "deny", "rules": {"filesystem.deny": "kill", "process.exec": "kill"}}
    assert p.digest == canonical_digest(d)
    assert [os.path.basename(f) for f in p.files] == ["base.yaml", "child.yaml"]
    assert p.spec.filesystem.read[0].loc.file.endswith("base.yaml")


def test_metadata_is_not_inherited(tmp_path):
    write(tmp_path, HEAD.replace("name: t", "name: base"), "base.yaml")
    child = write(tmp_path, "apiVersion: agentwatch/v1\nkind: AgentPolicy\nextends: base.yaml\n", "c.yaml")
    assert any("missing required key 'metadata'" in str(p) for p in check(child)[1])


def test_digest_is_of_the_effective_policy(tmp_path):
    base = write(tmp_path, HEAD + "filesystem: {deny: ['/a']}\n", "base.yaml")
    child = write(tmp_path, HEAD + "extends: base.yaml\n", "child.yaml")
    before = load(child).digest
    write(tmp_path, HEAD + "filesystem: {deny: ['/b']}\n", "base.yaml")
    assert load(child).digest != before
    inlined = write(tmp_path, HEAD + "filesystem: {deny: ['/b']}\n", "inline.yaml")
    assert load(inlined).digest == load(child).digest            # same effective policy, same digest
    assert base


def test_extends_chain_of_three(tmp_path):
    write(tmp_path, HEAD + "syscalls: {deny: [keyctl]}\n", "a.yaml")
    write(tmp_path, HEAD + "extends: a.yaml\nsyscalls: {deny: [bpf]}\n", "b.yaml")
    c = write(tmp_path, HEAD + "extends: b.yaml\nsyscalls: {deny: [keyctl, mount]}\n", "c.yaml")
    assert load(c).data["syscalls"]["deny"] == ["keyctl", "bpf", "mount"]


def test_extends_path_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write(tmp_path, HEAD + "network: {}\n", "sub/base.yaml")
    child = write(tmp_path, HEAD + "extends: sub/base.yaml\n", "child.yaml")
    monkeypatch.chdir("/")
    assert load(child).spec.network is not None


@pytest.mark.parametrize("files, start, cycle", [
    ({"a.yaml": "b.yaml", "b.yaml": "a.yaml"}, "a.yaml", "a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "a.yaml"}, "a.yaml", "a.yaml -> a.yaml"),
    ({"a.yaml": "b.yaml", "b.yaml": "c.yaml", "c.yaml": "b.yaml"}, "a.yaml", "b.yaml -> c.yaml -> b.yaml"),
])
def test_extends_cycles_are_errors_naming_the_cycle(tmp_path, deadline, files, start, cycle):
    for name, base in files.items():
        write(tmp_path, HEAD + f"extends: {base}\n", name)
    found = check(str(tmp_path / start))[1]
    assert len(found) == 1
    assert f"extends cycle: {cycle}" in str(found[0]) and ":5:10:" in str(found[0])


def test_missing_base(tmp_path):
    child = write(tmp_path, HEAD + "extends: nope.yaml\n")
    found = [str(p) for p in check(child)[1]]
    assert found == [f"{child}:5:10: cannot read base policy 'nope.yaml' ({tmp_path}/nope.yaml): no such file"]


def test_errors_in_the_base_name_the_base(tmp_path):
    base = write(tmp_path, HEAD + "filesystem: {read: [relative], write: []}\n", "base.yaml")
    child = write(tmp_path, HEAD + "extends: base.yaml\n", "child.yaml")
    found = [str(p) for p in check(child)[1]]
    assert len(found) == 1 and found[0].startswith(f"{base}:5:21: filesystem.read: relative path")
    write(tmp_path, "kind: [\n", "base.yaml")
    assert str(check(child)[1][0]).startswith(f"{base}:2:1: invalid YAML")


def test_extends_must_be_a_file_name(tmp_path):
    found = [str(p) for p in check(write(tmp_path, HEAD + "extends: [a.yaml]\n"))[1]]
    assert len(found) == 1 and "extends: expected a file name, got list" in found[0]


def test_a_child_cannot_weaken_a_deny(tmp_path):
    write(tmp_path, HEAD + "filesystem: {deny: ['**/.env']}\n", "base.yaml")
    child = write(tmp_path, HEAD + "extends: base.yaml\nfilesystem: {deny: []}\n", "c.yaml")
    assert [i.value for i in load(child).spec.filesystem.deny] == ["**/.env"]


# ---------------------------------------------------------------- hostile files: one clear error, fast

BOMB = HEAD + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, c in zip([None, "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi"))


@pytest.mark.parametrize("content, fragment", [
    (BOMB, f"YAML aliases expand to more than {ALIAS_BUDGET} nodes"),
    (HEAD + "x: &a [1, *a]\n", "refers to a collection that contains it"),
    ("#" * (10 << 20), "a policy may be at most 1048576 bytes"),
    ("", "policy is empty"),
    (bytes(range(256)) * 64, "not a text file (invalid UTF-8 at byte 128)"),
    (b"\x7fELF\x02\x01\x01" + bytes(200), "unacceptable character #x007f"),
    (b"\xff\xfe" + "kind: x".encode("utf-16-le"), "not a text file"),
    ("[" * 500_000, f"nested more than {MAX_DEPTH} levels deep"),
    ("{a: " * 200_000, f"nested more than {MAX_DEPTH} levels deep"),
    ("- " * 400_000, f"nested more than {MAX_DEPTH} levels deep"),
    (HEAD + "x: " + "a" * 900_000 + "\n", "unknown key 'x'"),
    (HEAD + "x: !!python/object/apply:os.system ['true']\n", "unsupported YAML tag !!python/object/apply"),
], ids=["billion-laughs", "recursive-alias", "10MB", "empty", "binary", "elf", "utf16", "deep-flow-seq",
        "deep-flow-map", "deep-block-seq", "1MB-scalar", "python-tag"])
def test_hostile_files_fail_fast_with_one_clear_error(tmp_path, deadline, content, fragment):
    path = write(tmp_path, content)
    found = check(path)[1]
    assert len(found) == 1, found
    line = str(found[0])
    assert line.startswith(path) and fragment in line and "\n" not in line
    with pytest.raises(PolicyError) as e:
        load(path)
    assert str(e.value) == line


def test_aliases_within_budget_are_fine(tmp_path):
    path = write(tmp_path, HEAD + "filesystem:\n  read: &sys [/usr/**, /etc/**]\n  exec: *sys\n  write: []\n")
    p = load(path)
    assert [i.value for i in p.spec.filesystem.exec] == ["/usr/**", "/etc/**"]


# ---------------------------------------------------------------- the JSON Schema says the same

def _schema():
    with open(os.path.join(REPO, "policies", "agentpolicy.schema.json")) as f:
        return json.load(f)


def test_json_schema_lists_the_same_keys_as_the_validator():
    props = _schema()["properties"]
    assert set(props) == set(S.TOP_KEYS)
    assert set(props["process"]["properties"]) == set(S.PROCESS_KEYS)
    assert props["process"]["properties"]["host_namespaces"]["items"]["enum"] == list(model.HOST_NAMESPACES)
    assert tuple(props["process"]["properties"]["run_as"]["properties"]) == S.RUN_AS_KEYS
    assert set(props["on_violation"]["properties"]) == {"default", *model.SECTIONS, "rules"}
    assert set(props["on_violation"]["properties"]["rules"]["properties"]) == set(model.RULES)
    assert props["monitor"]["items"]["enum"] == list(model.SENSOR_GROUPS)
    assert _schema()["$defs"]["action"]["enum"] == list(ACTIONS)
    res = props["resources"]["properties"]
    assert (res["cpu"]["minimum"], res["cpu"]["maximum"]) == (S.MIN_CPU, S.MAX_CPU)
    assert res["pids"]["maximum"] == props["process"]["properties"]["max_processes"]["maximum"] == S.MAX_PIDS


def test_sensor_groups_match_the_sensors():
    from agentwatch.sensors.syscalls import GROUPS
    assert model.SENSOR_GROUPS == tuple(GROUPS)


@pytest.mark.parametrize("body", ["filesytem: {}\n", "process: {ptrace: 'no'}\n",
                                  "on_violation: {default: block}\n",
                                  "network: {allow: [{cidr: 10.0.0.0/8, domain: a.org}]}\n"])
def test_json_schema_rejects_what_the_validator_rejects(tmp_path, body):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    path = write(tmp_path, HEAD + body)
    assert check(path)[0] is None
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(HEAD + body), _schema(), cls=jsonschema.Draft202012Validator)
