"""engine/rules.py: event + compiled policy -> a Finding, pure (no /proc,
no files): each section's rule called directly with hand-made events."""
from types import SimpleNamespace

import pytest

from agentwatch.core.events import ExitEvent, FileEvent, NetEvent, SignalEvent, SyscallEvent
from agentwatch.engine import rules
from agentwatch.engine.correlator import Proc
from agentwatch.engine.refusals import Refusals
from agentwatch.policy import load
from agentwatch.policy.compile import compile_policy
from agentwatch.sandbox import landlock as L

HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata:\n  name: t\n"
BODY = HEAD + """filesystem: {read: ["/w/**"], write: ["/w/**"]}
network: {allow: [{cidr: 10.0.0.1/32, ports: [443], protocol: tcp}]}
process: {ptrace: false, namespaces: false, max_processes: 2}
syscalls: {deny: [keyctl]}
on_violation: {default: deny, network: kill}
"""
LL = L.LandlockPlan(abi=6, handled_fs=L.FS_BY_ABI[6], handled_net=L.NET_CONNECT_TCP, scoped=1,
                    paths=[("/w", L.WRITE)])


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    p = tmp_path_factory.mktemp("rules") / "p.yaml"
    p.write_text(BODY)
    return compile_policy(load(str(p)), {"WORKSPACE": "/w", "HOME": "/h", "TMPDIR": "/t"})


def test_file_targets_by_op():
    assert rules.file_targets(FileEvent(op="open", abspath="/x", access=["read", "path"])) == \
        [("/x", {"read"})]
    assert rules.file_targets(FileEvent(op="rename", abspath="/a", path2="/b")) == \
        [("/a", {"rename"}), ("/b", {"create"})]
    assert rules.file_targets(FileEvent(op="chdir", abspath="/a")) is None


def test_connect_outside_egress_is_the_rules_action_with_its_layer(policy):
    ev = NetEvent(op="connect", family="inet", addr="10.0.0.2", port=80, error="EACCES")
    f = rules.network(policy, Refusals(SimpleNamespace(landlock=LL)), ev)
    assert (f.decision.rule, f.decision.action, f.target) == ("network.egress", "kill",
                                                              "10.0.0.2:80/tcp")
    assert f.evidence["layer"] == "landlock"
    assert rules.network(policy, Refusals(None), NetEvent(op="connect", family="inet",
                                                          addr="10.0.0.1", port=443)) is None
    # the cgroup BPF programs report their own EPERM
    assert rules.network(policy, Refusals(None), NetEvent(op="connect", family="inet",
                         addr="10.0.0.2", port=80, error="EPERM"), egress_enforced=True) is None


def test_ptrace_class_proc_reads_of_other_processes(policy):
    ev = FileEvent(op="open", path="/proc/1/environ")
    f = rules.other_process(policy, ev, "/proc/1/environ", procs={})
    assert f.decision.rule == "process.ptrace" and f.evidence["target_pid"] == 1
    assert rules.other_process(policy, ev, "/proc/1/environ", procs={1: None}) is None
    assert rules.other_process(policy, ev, "/proc/1/environ", procs={}, pid_ns=True) is None
    assert rules.other_process(policy, ev, "/proc/1/status", procs={}) is None


def test_unexplained_refusals_name_the_layers_rule(policy):
    ev = FileEvent(op="mknod", path="/w/null", error="EACCES")
    f = rules.unexplained(policy, Refusals(None), ev, "/w/null", {"create"}, "landlock")
    assert f.decision.rule == "filesystem.write" and "device nodes" in f.decision.reason
    assert rules.unexplained(policy, Refusals(None), ev, "/w/null", {"create"}, "dac") is None


def test_max_processes_counts_the_living(policy):
    procs = {i: Proc(pid=i, ppid=1) for i in range(1, 4)}
    assert rules.max_processes(policy, procs).evidence == {"alive": 3, "limit": 2}
    procs[3].exited = True
    assert rules.max_processes(policy, procs) is None


def test_seccomp_refusal_is_deny_and_respects_the_runs_filter(policy):
    ev = SyscallEvent(name="keyctl", error="EPERM", no_entry=True)
    f = rules.seccomp_refusal(policy, ev)
    assert (f.decision.rule, f.decision.action, f.evidence["layer"]) == \
        ("syscalls.deny", "deny", "seccomp")
    assert rules.seccomp_refusal(policy, ev, denied={"ptrace"}) is None
    assert rules.seccomp_kill(policy, ExitEvent(pid=7, signal=31)).target == "sigsys:7"


def test_refused_fork_only_where_the_plan_has_a_pids_limit(policy):
    ev = SyscallEvent(name="clone", error="EAGAIN", refused=True, args=[0])
    assert rules.refused_call(policy, Refusals(None), ev) is None
    f = rules.refused_call(policy, Refusals(SimpleNamespace(limits={"pids": 8})), ev)
    assert f.decision.rule == "resources.pids" and f.evidence["layer"] == "pids"


def test_signal_evidence(policy):
    ev = SignalEvent(op="kill", target=0, signal=15, signal_name="SIGTERM", ret=0)
    f = rules.signal(policy, ev, "process group 5", None)
    assert f.decision.rule == "process.signal" and f.target == "process group 5 SIGTERM"
    assert "delivered" in f.evidence["kernel"]


def test_map_exec_sees_clean_absolute_paths_outside_the_roots():
    assert rules.map_exec_sees(["/usr/lib/"], "/tmp/x.so")
    assert not rules.map_exec_sees(["/usr/lib/"], "/usr/lib/x.so")
    assert not rules.map_exec_sees(["/usr/lib/"], "/tmp/../usr/x.so")
    assert not rules.map_exec_sees(None, "/tmp/x.so")


def test_limit_counter(policy):
    f = rules.limit_counter(policy, "resources.memory", "/cg/memory.events", "oom_kill", 3, 2)
    assert f.evidence == {"counter": "memory.events", "oom_kill": 3, "layer": "memory",
                          "kernel": "OOM-killed (memory limit)"}
