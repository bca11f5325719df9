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


# ---- the network namespace (issue #14: host-wide /proc/net tables)
STRICT = os.path.join(REPO, "policies", "sandboxed-agent.yaml")
NONROOT = os.path.join(REPO, "policies", "sandboxed-agent-nonroot.yaml")
NET = "filesystem: {read: ['/usr/**'], write: []}\non_violation: {default: deny}\n"


@pytest.mark.parametrize("policy", [STRICT, NONROOT], ids=os.path.basename)
def test_no_remote_egress_gets_a_network_namespace_with_the_loopback_ports_relayed(tmp_path, policy):
    plan, _ = _plan(tmp_path, path=policy)
    assert plan.namespaces == ["pid", "ipc", "net"]
    assert plan.relay == [18080]
    rec = plan.record()
    assert rec["namespaces"] == ["pid", "ipc", "net"] and rec["loopback_relay"] == [18080]
    assert any("private pid, ipc, net, mount" in line and "loopback port 18080 relayed" in line
               for line in plan.describe())
    assert not any("/proc/net" in n for n in plan.notes)


def test_loopback_ranges_are_relayed_port_by_port(tmp_path):
    plan, _ = _plan(tmp_path, NET + "network: {allow: [], loopback: [8080, '9000-9002']}\n")
    assert "net" in plan.namespaces and plan.relay == [8080, 9000, 9001, 9002]


def test_no_loopback_at_all_still_gets_its_own_network_namespace(tmp_path):
    plan, _ = _plan(tmp_path, NET + "network: {allow: [], loopback: false}\n")
    assert "net" in plan.namespaces and plan.relay == []
    assert any("no loopback port relayed" in line for line in plan.describe())


@pytest.mark.parametrize("network, why", [
    ("{allow: [{cidr: 10.0.0.0/8, ports: [443]}]}", "network.allow permits remote egress"),
    ("{allow: [], loopback: true}", "network.loopback: true"),
    ("{allow: [], loopback: ['1000-1064']}", "65 ports, more than the 64"),
])
def test_a_policy_the_relay_cannot_serve_keeps_the_host_network_and_says_so(tmp_path, network, why):
    plan, _ = _plan(tmp_path, NET + f"network: {network}\n")
    assert plan.namespaces == ["pid", "ipc"] and plan.relay == []
    assert plan.record()["loopback_relay"] is None
    notes = [n for n in plan.notes if n.startswith("network: ")]
    assert len(notes) == 1 and why in notes[0] and "/proc/net" in notes[0], plan.notes
    assert not plan.downgrades


@pytest.mark.parametrize("body, why", [
    (NET, "no network section"),
    ("filesystem: {read: ['/usr/**'], write: []}\nnetwork: {allow: []}\n"
     "on_violation: {filesystem: deny}\n", "only alerts"),
])
def test_an_unenforced_network_keeps_the_host_network_and_says_so(tmp_path, body, why):
    plan, _ = _plan(tmp_path, body)
    assert "net" not in plan.namespaces
    assert any(why in n and "every socket of the host" in n for n in plan.notes), plan.notes


def test_host_namespaces_net_opts_out(tmp_path):
    plan, _ = _plan(tmp_path, NET + "network: {allow: [], loopback: [80]}\n"
                                    "process: {host_namespaces: [net]}\n")
    assert plan.namespaces == ["pid", "ipc"] and plan.relay == []
    assert any("shares the host's net namespace" in n for n in plan.notes)


def test_a_host_without_network_namespaces_is_a_downgrade(tmp_path):
    plan, _ = _plan(tmp_path, NET + "network: {allow: []}\n",
                    ns_missing={"net": "unshare(CLONE_NEWNET): Operation not permitted"})
    assert plan.namespaces == ["pid", "ipc"]
    assert any(d.startswith("process: no private net namespace") and "/proc/net" in d
               for d in plan.downgrades)


def test_the_network_namespace_is_probed_only_where_the_run_would_get_one(tmp_path, monkeypatch):
    from agentwatch.sandbox import namespaces
    asked = []
    monkeypatch.setattr(namespaces, "probe", lambda kinds: asked.append(list(kinds)) or {})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    _plan(tmp_path, NET + "network: {allow: [{cidr: 10.0.0.0/8}]}\n", ns_missing=None)
    _plan(tmp_path, NET + "network: {allow: []}\n", ns_missing=None)
    assert asked == [["pid", "ipc"], ["pid", "ipc", "net"]]


def test_with_the_host_pid_namespace_the_plan_says_host_tables_stay_readable(tmp_path):
    plan, _ = _plan(tmp_path, NET + "network: {allow: []}\nprocess: {host_namespaces: [pid]}\n")
    assert plan.namespaces == ["ipc", "net"]
    assert any("/proc/<host pid>/net" in n for n in plan.notes)


def test_explain_and_diff_say_which_network_namespace(tmp_path):
    from agentwatch.policy.diff import diff
    from agentwatch.policy.explain import explain
    strict = load(STRICT)
    text = explain(strict, _vars(tmp_path))
    assert "Network namespace: its own when enforced (only lo; loopback port 18080 relayed" in text
    wide = tmp_path / "wide.yaml"
    wide.write_text(f"apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {{name: w}}\n"
                    f"extends: {STRICT}\nnetwork: {{allow: [{{cidr: 10.0.0.0/8}}]}}\n")
    assert "Network namespace: the host's (network.allow permits remote egress)" in \
        explain(load(str(wide)), _vars(tmp_path))
    lines = diff(strict, load(str(wide)))
    assert any(line.startswith("+ grants: the host's net namespace (network.allow") for line in lines)


def test_dev_null_takes_ioctls_so_isatty_of_a_redirect_is_no_violation(tmp_path):
    """`cmd > /dev/null` whose isatty(1) (TCGETS) was refused by Landlock
    (EACCES) read as a filesystem.write denial: /dev/null has no ioctls
    (ENOTTY), so it gets LANDLOCK_ACCESS_FS_IOCTL_DEV with its write."""
    plan, _ = _plan(tmp_path, path=os.path.join(REPO, "policies", "sandboxed-agent.yaml"))
    access = dict(plan.landlock.paths)
    assert access["/dev/null"] & landlock.FS_IOCTL_DEV
    assert not access["/usr"] & landlock.FS_IOCTL_DEV
