"""process.run_as (issue #4): parsing, lint, explain/diff, resolution on this
host, and the order of the launcher's child steps. The real switch, the
capability drop and the kernel's DAC refusals are in tests/kernel/test_run_as.py."""
import grp
import json
import os
import pwd

import pytest

from agentwatch.core.errors import LaunchError
from agentwatch.policy import check, load
from agentwatch.policy.diff import diff
from agentwatch.policy.explain import explain
from agentwatch.policy.model import RunAs
from agentwatch.sandbox import credentials
from conftest import free_id

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: t\n"


FREE_UID = free_id(pwd.getpwuid)
FREE_GID = free_id(grp.getgrgid)
ROOT_GROUP = grp.getgrgid(0).gr_name


def write(tmp_path, body, name="p.yaml"):
    p = tmp_path / name
    p.write_text(HEAD + body)
    return str(p)


def problems(tmp_path, body):
    path = write(tmp_path, body)
    return [str(p).replace(path, "P") for p in check(path)[1]]


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("body, want", [
    ("process: {run_as: {user: root}}\n", RunAs("root")),
    ("process: {run_as: {user: 65534, group: 65534}}\n", RunAs(65534, 65534)),
    ("process: {run_as: {user: '1000', group: root, groups: [0, root]}}\n", RunAs(1000, "root", (0, "root"))),
])
def test_run_as_is_parsed(tmp_path, body, want):
    policy, found = check(write(tmp_path, body))
    assert [p for p in found if p.severity == "error"] == []
    got = policy.spec.process.run_as
    assert (got.user, got.group, got.groups) == (want.user, want.group, want.groups)


def test_no_run_as_means_none(tmp_path):
    policy = load(write(tmp_path, "process: {ptrace: false}\n"))
    assert policy.spec.process.run_as is None


@pytest.mark.parametrize("body, expected", [
    ("process: {run_as: root}\n",
     "P:5:19: process.run_as: expected a mapping, got string"),
    ("process: {run_as: {group: root}}\n",
     "P:5:19: process.run_as: missing required key 'user'"),
    ("process: {run_as: {user: root, gruop: root}}\n",
     "P:5:32: unknown key 'gruop' in process.run_as (did you mean 'group'?)"),
    ("process: {run_as: {user: -1}}\n",
     "P:5:26: process.run_as.user: user id must be between 0 and 4294967294, got -1"),
    ("process: {run_as: {user: 4294967295, group: 0}}\n",
     "P:5:26: process.run_as.user: user id must be between 0 and 4294967294, got 4294967295"),
    ("process: {run_as: {user: 'bad name'}}\n",
     "P:5:26: process.run_as.user: 'bad name' is not a user name (letters, digits, '_', '.', '-'; "
     "at most 32; not starting with a digit or '-')"),
    ("process: {run_as: {user: true}}\n",
     "P:5:26: process.run_as.user: expected a user name or numeric id, got bool"),
    ("process: {run_as: {user: root, groups: root}}\n",
     "P:5:40: process.run_as.groups: expected a list of groups (names or ids), got string"),
    ("process: {run_as: {user: root, groups: [0, [1]]}}\n",
     "P:5:44: process.run_as.groups[1]: expected a group name or numeric id, got list"),
])
def test_run_as_errors_point_at_the_value(tmp_path, body, expected):
    assert expected in problems(tmp_path, body)


def test_accounts_missing_on_this_host_are_warnings(tmp_path):
    """A policy may be written for another host: lint warns, run refuses."""
    found = problems(tmp_path, "process:\n  run_as: {user: no-such-user-aw, groups: [no-such-group-aw]}\n")
    assert found == [
        "P:6:18: warning: process.run_as.user: no user 'no-such-user-aw' on this host; agentwatch "
        "run refuses to start here (use a numeric id, or create the user)",
        "P:6:44: warning: process.run_as.groups[0]: no group 'no-such-group-aw' on this host; "
        "agentwatch run refuses to start here (use a numeric id, or create the group)"]


def test_a_uid_without_passwd_entry_needs_a_group(tmp_path):
    found = problems(tmp_path, f"process:\n  run_as: {{user: {FREE_UID}}}\n")
    assert found == [f"P:6:18: warning: process.run_as.user: uid {FREE_UID} has no passwd entry on "
                     "this host, so it has no primary group here: give process.run_as.group "
                     "(agentwatch run refuses to start without one)"]
    assert problems(tmp_path, f"process:\n  run_as: {{user: {FREE_UID}, group: {FREE_GID}}}\n") == []


def test_json_schema_agrees(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    import yaml
    with open(os.path.join(REPO, "policies", "agentpolicy.schema.json")) as f:
        schema = json.load(f)
    ok = HEAD + "process: {run_as: {user: nobody, group: 65534, groups: ['100', adm]}}\n"
    jsonschema.validate(yaml.safe_load(ok), schema, cls=jsonschema.Draft202012Validator)
    for bad in ("process: {run_as: {group: 1}}\n", "process: {run_as: {user: -1}}\n",
                "process: {run_as: {user: 'a b'}}\n", "process: {run_as: {user: a, x: 1}}\n"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(HEAD + bad), schema, cls=jsonschema.Draft202012Validator)
        assert [p for p in check(write(tmp_path, bad))[1] if p.severity == "error"]


# ---------------------------------------------------------------- explain, diff

def test_explain_and_diff(tmp_path):
    old = load(write(tmp_path, "process: {ptrace: false}\n", "old.yaml"))
    new = load(write(tmp_path, "process: {ptrace: false, run_as: {user: 65534, group: 65534}}\n",
                     "new.yaml"))
    other = load(write(tmp_path, "process: {ptrace: false, run_as: {user: root}}\n", "other.yaml"))
    text = explain(new, {"WORKSPACE": "/w", "HOME": "/h", "TMPDIR": "/t"})
    assert ("  Runs as: uid 65534, group 65534 (process.run_as), with no capabilities; "
            "agentwatch itself stays root") in text
    assert diff(old, new) == ["- revokes: running as agentwatch's user, root "
                              "(now process.run_as uid 65534, group 65534)"]
    assert diff(new, old) == ["+ grants: running as agentwatch's user, root "
                              "(process.run_as uid 65534, group 65534 removed)"]
    assert diff(new, other) == ["~ changes: process.run_as uid 65534, group 65534 -> root"]


# ---------------------------------------------------------------- resolution on this host

def test_resolve_names_and_ids():
    root = credentials.resolve(RunAs("root"))
    assert (root.uid, root.gid, root.groups, root.user) == (0, 0, [], "root")
    c = credentials.resolve(RunAs(FREE_UID, FREE_GID, (ROOT_GROUP, FREE_GID, 0)))
    assert (c.uid, c.gid, c.groups, c.user, c.source) == (FREE_UID, FREE_GID, [0, FREE_GID], None,
                                                          "process.run_as")
    assert c.describe() == f"uid {FREE_UID}, gid {FREE_GID}, supplementary groups: 0, {FREE_GID}"


@pytest.mark.parametrize("run_as, message", [
    (RunAs("no-such-user-aw"), "no user 'no-such-user-aw' on this host (p.yaml:5:7)"),
    (RunAs(FREE_UID), f"uid {FREE_UID} has no passwd entry on this host, so no primary group: "
                      "give process.run_as.group (p.yaml:5:7)"),
    (RunAs("root", "no-such-group-aw"), "process.run_as.group: no group 'no-such-group-aw' on this host"),
    (RunAs("root", None, (0, "no-such-group-aw")),
     "process.run_as.groups: no group 'no-such-group-aw' on this host"),
])
def test_resolve_refuses_naming_the_step(run_as, message):
    with pytest.raises(LaunchError) as e:
        credentials.resolve(run_as, "p.yaml:5:7")
    assert str(e.value).startswith("agent did not start: resolve process.run_as failed: ")
    assert message in str(e.value)


def test_status_of_this_process():
    st = credentials.read_status()
    assert st["Uid"][0] == os.getuid() and st["Gid"][0] == os.getgid()
    assert set(st) >= {"Uid", "Gid", "Groups", "NoNewPrivs", *credentials.CAP_SETS}
    rec = credentials.capability_record(st)
    assert set(rec) == {"inheritable", "permitted", "effective", "bounding", "ambient"}
    assert all(len(v) == 16 for v in rec.values())
    assert credentials.no_capabilities() == dict.fromkeys(rec, "0" * 16)


# ---------------------------------------------------------------- child steps, in order

def _run(tmp_path, body, run_as=None):
    """The run's enforcement for a policy, its plan made for Landlock ABI 4 (any host)."""
    from agentwatch.policy.compile import compile_policy
    from agentwatch.run import Prepared, RunOptions
    from agentwatch.run.enforcement import Enforcement
    from agentwatch.sandbox.plan import make_plan
    policy = load(write(tmp_path, body))
    variables = {"WORKSPACE": str(tmp_path), "HOME": str(tmp_path), "TMPDIR": "/tmp"}
    prepared = Prepared(opts=RunOptions(argv=["/bin/true"]), command="/bin/true", agent="true",
                        variables=variables, sensor_groups=[], seccomp_denied=[], policy=policy,
                        compiled=compile_policy(policy, variables),
                        plan=make_plan(policy.data, variables, landlock_abi=4), run_as=run_as)
    return Enforcement(prepared, "run-id")


STRICT = ("filesystem: {read: ['/**'], write: ['${WORKSPACE}/**'], deny: ['${HOME}/.ssh/**']}\n"
          "process: {change_uid: false}\non_violation: {default: deny}\n")


def test_steps_with_run_as(tmp_path):
    (tmp_path / ".ssh").mkdir()
    creds = credentials.Credentials(uid=65534, gid=65534, source="process.run_as")
    steps = [name for name, _ in _run(tmp_path, STRICT, creds).child_steps()]
    assert steps == ["close inherited fds", "disable core dumps",
                     "enter private pid, ipc and mount namespaces", "mask denied paths", "apply Landlock",
                     "set no_new_privs", "drop capabilities from the bounding set",
                     "switch to uid 65534, gid 65534, supplementary groups: none",
                     "set parent-death signal again", "drop capabilities",
                     "check workspace is usable by uid 65534", "check TMPDIR is usable by uid 65534",
                     "load seccomp filter",
                     "verify credentials and capabilities"]


def test_steps_without_run_as_are_unchanged(tmp_path):
    """As before run_as: agentwatch's ids; every capability dropped after the
    sandbox layers (which set no_new_privs), now verified too."""
    steps = [name for name, _ in _run(tmp_path, STRICT).child_steps()]
    assert steps == ["close inherited fds", "disable core dumps",
                     "enter private pid, ipc and mount namespaces", "mask denied paths", "apply Landlock",
                     "load seccomp filter", "drop capabilities", "verify credentials and capabilities"]
    alert = _run(tmp_path, "process: {ptrace: false}\n")       # no kernel layer: root's capabilities
    assert [name for name, _ in alert.child_steps()] == ["close inherited fds", "disable core dumps"]
    creds = alert.prepared.agent_credentials()
    assert creds["no_new_privs"] is False and creds["source"] == "agentwatch"
    assert creds["uid"] == os.getuid()


def test_workspace_and_tmpdir_checks_follow_the_policy(tmp_path):
    creds = credentials.Credentials(uid=65534, gid=65534)
    run = _run(tmp_path, STRICT, creds)
    assert run.dirs_for(creds) == [("workspace", str(tmp_path), os.R_OK | os.W_OK | os.X_OK),
                                    ("TMPDIR", "/tmp", os.R_OK | os.X_OK)]
    ro = _run(tmp_path, "filesystem: {read: ['${WORKSPACE}/**'], write: []}\n", creds)
    assert ro.dirs_for(creds) == [("workspace", str(tmp_path), os.R_OK | os.X_OK)]
    anything = _run(tmp_path, "process: {ptrace: false}\n", creds)
    assert anything.dirs_for(creds) == [("workspace", str(tmp_path), os.R_OK | os.W_OK | os.X_OK),
                                         ("TMPDIR", "/tmp", os.R_OK | os.W_OK | os.X_OK)]
