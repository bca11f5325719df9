"""The plan's namespaces, procfs and every grant beyond the policy (issue #14).

Pure: make_plan with the Landlock ABI and the namespace probe given."""
import glob
import os

import pytest

from agentwatch.policy import load
from agentwatch.policy.matchers import Glob, expand
from agentwatch.sandbox import landlock
from agentwatch.sandbox.plan import ENFORCING, RUNTIME_READ, make_plan, section_action

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "policies", "*.yaml")))


def _vars(tmp_path):
    return {"WORKSPACE": str(tmp_path / "ws"), "HOME": str(tmp_path / "home"), "TMPDIR": "/tmp"}


def _plan(tmp_path, body=None, path=None, **kw):
    if path is None:
        path = tmp_path / "p.yaml"
        path.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n" + body)
    pol = load(str(path))
    kw.setdefault("ns_missing", {})
    return make_plan(pol.data, _vars(tmp_path), [str(path)], landlock_abi=7, **kw), pol


def _under(path, top):
    return path == top or path.startswith(top.rstrip("/") + "/")


def _covered(path, patterns):
    return any(Glob(g).matches(path) or _under(path, g[:-3] if g.endswith("/**") else g)
               for g in patterns)


@pytest.mark.parametrize("policy", SHIPPED, ids=os.path.basename)
def test_the_kernel_is_given_only_what_the_policy_says_or_the_plan_lists(tmp_path, policy):
    """For every shipped policy: each Landlock rule path comes from the
    policy's own read/write/exec lists, or is listed in plan.widened with
    why; nothing widened is under a path the policy denies."""
    plan, pol = _plan(tmp_path, path=policy, ttys=["/dev/pts/7"])
    if plan.landlock is None:
        assert plan.widened == []
        return
    fs = pol.data.get("filesystem")
    v = _vars(tmp_path)
    if fs is None or section_action(pol.data, "filesystem") not in ENFORCING:
        # files not held by the kernel: Landlock gets "/" (its TCP and scope rules need a ruleset)
        fs = {"read": ["/**"], "write": ["/**"], "exec": ["/**"]}
    lists = {k: [expand(g, v) for g in fs.get(k) or ()] for k in ("read", "write", "exec")}
    proc_exec = (pol.data.get("process") or {}).get("exec")
    if proc_exec:
        lists["exec"] = [expand(e["path"] if isinstance(e, dict) else e, v) for e in proc_exec]
    own = set()
    for key in ("read", "write", "exec"):
        own.update(landlock.globs_to_paths(lists[key])[0])
    widened = {w["path"] for w in plan.widened}
    for w in plan.widened:
        assert w["why"] and w["access"]
    deny = [expand(d, v) for d in fs.get("deny") or ()]
    for path, _access in plan.landlock.paths:
        assert (path in own or path in widened
                or _covered(path, lists["read"] + lists["write"] + lists["exec"])), \
            f"{os.path.basename(policy)}: {path} granted by the kernel but neither in the policy nor listed"
    for path in widened:
        assert not _covered(path, deny), f"{path} is widened although the policy denies it"
    if not _covered("/dev/pts/0", lists["write"]):
        assert "/dev/pts" not in {p for p, _ in plan.landlock.paths}, "all of /dev/pts granted"


def test_the_terminal_is_granted_as_the_device_not_all_of_dev_pts(tmp_path):
    plan, _ = _plan(tmp_path, "filesystem: {read: ['/usr/**'], write: ['${WORKSPACE}/**']}\n"
                              "on_violation: {default: deny}\n", ttys=["/dev/pts/7"])
    paths = [p for p, _ in plan.landlock.paths] + plan.landlock.missing
    assert "/dev/pts" not in paths
    assert {"path": "/dev/pts/7", "access": "write",
            "why": "the agent's terminal (the pty of its stdin, stdout or stderr)"} in plan.widened


def test_a_runtime_path_the_policy_denies_is_not_granted(tmp_path):
    plan, _ = _plan(tmp_path, "filesystem: {read: ['/usr/**'], write: ['${WORKSPACE}/**'], "
                              "deny: ['/dev/tty', '/proc/**']}\non_violation: {default: deny}\n")
    rule_paths = [p for p, _ in plan.landlock.paths] + plan.landlock.missing
    assert "/dev/tty" not in rule_paths and "/proc" not in rule_paths
    assert {"/dev/tty", "/proc"}.isdisjoint(w["path"] for w in plan.widened)
    assert any("filesystem.deny covers /dev/tty" in n for n in plan.notes)


def test_enforced_runs_get_private_pid_and_ipc_namespaces(tmp_path):
    plan, _ = _plan(tmp_path, "filesystem: {read: ['/usr/**', '/proc/self/**'], write: []}\n"
                              "on_violation: {default: deny}\n")
    assert plan.namespaces == ["pid", "ipc"]
    assert plan.proc == "pid"                      # no host-wide /proc file readable: subset=pid
    assert plan.record()["proc"].endswith(",subset=pid")
    assert [w["why"] for w in plan.widened if w["path"] == "/proc"] == [RUNTIME_READ["/proc"]]


def test_a_policy_that_reads_all_of_proc_gets_a_full_procfs_of_its_own(tmp_path):
    plan, _ = _plan(tmp_path, "filesystem: {read: ['/usr/**', '/proc/**'], write: []}\n"
                              "on_violation: {default: deny}\n")
    assert plan.proc == "full" and "subset" not in plan.record()["proc"]
    assert "hidepid=invisible" in plan.record()["proc"]
    assert any("/proc/<pid>/net" in n for n in plan.notes)        # said, not hidden


def test_monitor_only_runs_get_no_namespaces(tmp_path):
    plan, _ = _plan(tmp_path, "filesystem: {read: ['/usr/**']}\n")     # alert: nothing enforced
    assert plan.namespaces == [] and plan.proc is None


def test_host_namespaces_opts_out_and_says_so(tmp_path):
    plan, _ = _plan(tmp_path, "filesystem: {read: ['/usr/**'], write: []}\n"
                              "process: {host_namespaces: [pid]}\non_violation: {default: deny}\n")
    assert plan.namespaces == ["ipc"] and plan.proc is None
    assert any("shares the host's pid namespace" in n for n in plan.notes)
    why = [w["why"] for w in plan.widened if w["path"] == "/proc"]
    assert why and "every host process" in why[0]


def test_a_host_without_the_namespaces_is_a_downgrade(tmp_path):
    plan, _ = _plan(tmp_path, "process: {ptrace: false}\non_violation: {default: deny}\n",
                    ns_missing={"pid": "unshare(CLONE_NEWPID): Operation not permitted"})
    assert plan.namespaces == ["ipc"]
    assert any(d.startswith("process: no private pid namespace") for d in plan.downgrades)
