"""The mmap(PROT_EXEC) kill of the CI kernel's path (bpf/mapexec.bpf.c)
without a kernel: which runs get it and with which roots, which loader
argv the judge knows the kernel kills, and that the kill seen by the kernel
and by the loader's argv is one violation. tests/kernel/test_mapexec.py
runs the BPF side."""
import os

import pytest

from agentwatch.engine import Correlator, RunContext
from agentwatch.engine.judge import Judge
from agentwatch.core.events import ExecEvent, FileEvent
from agentwatch.policy import load
from agentwatch.policy.compile import compile_policy
from agentwatch.sandbox.plan import make_plan, map_exec_roots
from agentwatch.sensors import records as R

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRICT = os.path.join(REPO, "policies", "sandboxed-agent.yaml")
CODING = os.path.join(REPO, "policies", "coding-agent.yaml")
PID = 5_000_001          # above pid_max: never a real process


@pytest.fixture
def tree(tmp_path):
    for d in ("home", "ws", "tmp"):
        (tmp_path / d).mkdir()
    return {"HOME": str(tmp_path / "home"), "WORKSPACE": str(tmp_path / "ws"),
            "TMPDIR": str(tmp_path / "tmp")}


def test_a_kill_rule_on_filesystem_exec_gets_the_mapping_kill(tree):
    plan = make_plan(load(STRICT).data, tree, landlock_abi=7)
    roots = plan.map_exec
    assert "/usr/bin/" in roots and "/usr/lib/" in roots
    # the library dirs as written and resolved: /lib is /usr/lib on merged-usr hosts
    assert "/lib/" in roots or "/lib" in roots
    assert not any(r.startswith(("/dev/shm", "/tmp", tree["WORKSPACE"])) for r in roots)
    assert plan.map_exec_kill
    assert plan.record()["map_exec"] == {"action": "kill", "roots": roots}
    assert any("killed in the kernel at mmap" in line for line in plan.describe())


def test_a_deny_rule_gets_the_report_an_unenforced_filesystem_nothing(tree):
    data = load(STRICT).data
    assert make_plan(data, tree, landlock_abi=7, bpf_lsm=True).map_exec is None   # LSM refuses instead
    deny = dict(data, on_violation=dict(data["on_violation"], rules={}))          # default: deny
    plan = make_plan(deny, tree, landlock_abi=7)
    assert plan.map_exec and not plan.map_exec_kill
    assert plan.record()["map_exec"]["action"] == "report"
    assert any("reported from the kernel" in line for line in plan.describe())
    alert = dict(data, on_violation={"default": "alert"})
    assert make_plan(alert, tree, landlock_abi=7).map_exec is None
    assert make_plan(load(CODING).data, tree, landlock_abi=7).map_exec is None


def test_an_exec_root_of_slash_leaves_nothing_to_kill():
    assert map_exec_roots(["/"]) is None
    assert "/usr/bin/" in map_exec_roots(["/usr/bin"])


@pytest.fixture
def judged(tree):
    out = []
    compiled = compile_policy(load(STRICT), tree)
    run = RunContext(run_id="20261128-080000-abcdef", agent="a", cgroup_id=1, cwd=tree["WORKSPACE"])
    j = Judge(compiled, Correlator({}), run, out.append, map_exec_roots=["/usr/bin/", "/usr/lib/"],
              map_exec_kill=True)
    return j, out


def loader(j, program, pid=PID):
    j(ExecEvent(filename="/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", argv=["ld.so", program],
                pid=pid, tid=pid, ret=0, ts=1.0))


def mapkill(j, path, pid=PID):
    j(FileEvent(op="mmap", path=path, abspath=path, access=["exec"], flags=5, pid=pid, tid=pid,
                ret=0, ts=1.0))


@pytest.mark.parametrize("named, killed", [
    ("/dev/shm/x/tool", True),
    ("/usr/bin/../../dev/shm/tool", False),   # not lexically clean: no mark in the kernel
    ("/dev/shm//tool", False),
    ("./tool", False),                        # relative: the cwd is not a tracepoint argument
    ("/usr/bin/tool", False),                 # under a root
    ("/" + "a" * 250, False),                 # longer than an LPM key
])
def test_which_loader_argv_the_kernel_kills(judged, named, killed):
    j, _ = judged
    assert j._map_exec_sees(named) is killed


@pytest.mark.parametrize("kernel_first", [True, False])
def test_the_kill_seen_twice_is_one_violation(judged, kernel_first):
    j, out = judged
    prog = "/dev/shm/aw-x/tool"
    steps = [lambda: mapkill(j, prog), lambda: loader(j, prog)]
    for step in (steps if kernel_first else steps[::-1]):
        step()
    assert j.by_rule["filesystem.exec"] == 1
    assert len(out) == 1 and out[0].action == "kill"
    assert out[0].detail["kernel"].startswith("killed at the mmap(PROT_EXEC)")


def test_a_kill_without_a_loader_is_reported_as_such(judged):
    """dlopen() or a hand-made mapping: only the kernel saw it."""
    j, out = judged
    mapkill(j, "/opt/vendor/libx.so")
    assert [(v.rule, v.action) for v in out] == [("filesystem.exec", "kill")]
    d = out[0].detail
    assert d["op"] == "mmap" and d["named"] == "/opt/vendor/libx.so" and d["prot"] == 5


def test_without_the_kill_the_mapping_is_reported_with_the_rules_action(judged):
    j, out = judged
    j.map_exec_kill = False
    mapkill(j, "/opt/vendor/libx.so")
    loader(j, "/dev/shm/aw-x/tool")
    mapkill(j, "/dev/shm/aw-x/tool")          # the loader's twin: one report
    assert [(v.rule, v.action) for v in out] == [("filesystem.exec", "kill")] * 2   # the policy's action
    assert all(v.detail["kernel"].startswith("not refused") for v in out)
    assert j.by_rule["filesystem.exec"] == 2


def test_a_loader_the_kernel_cannot_judge_is_said_so(judged):
    j, out = judged
    loader(j, "/usr/bin/../../dev/shm/tool")
    assert "noexec" in out[0].detail["kernel"]


def test_the_record_decodes_like_a_syscall_record():
    raw = bytearray(R._SYSCALL.size)
    raw[0:4] = R.EV_MAPKILL.to_bytes(4, "little")
    at = R._SYSCALL.size - 2 * R.STR_LEN        # str1, then data2, end the record
    raw[at:at + 8] = b"/dev/shm"
    etype, rec = R.decode(bytes(raw))
    assert etype == R.EV_MAPKILL and rec["str1"] == "/dev/shm" and rec["ret"] == 0
