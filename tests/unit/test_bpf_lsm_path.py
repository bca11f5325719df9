"""The BPF LSM enforcement path without a kernel: what the plan asks of the
LSM layer, how its allow set is built, and that one refusal seen by two
views (the LSM program, and the syscall sensor or the loader's argv) is one
violation. The layer itself is exercised in tests/vm (Debian's kernel with
lsm=...,bpf under QEMU)."""
import os

import pytest

from agentwatch import sensors
from agentwatch.engine import Correlator, RunContext
from agentwatch.engine.judge import Judge
from agentwatch.core.events import ExecEvent, FileEvent
from agentwatch.policy import load
from agentwatch.policy.compile import compile_policy
from agentwatch.sandbox.plan import PATH_BPF_LSM, PATH_FALLBACK, make_plan
from agentwatch.guards.lsm import expand_files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRICT = os.path.join(REPO, "policies", "sandboxed-agent.yaml")
PID = 5_000_001          # above pid_max: never a real process


@pytest.fixture
def tree(tmp_path):
    for d in ("home/.ssh", "ws", "tmp"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "home/.ssh/id_rsa").write_text("key\n")
    return {"HOME": str(tmp_path / "home"), "WORKSPACE": str(tmp_path / "ws"),
            "TMPDIR": str(tmp_path / "tmp")}


def test_plan_adds_the_lsm_layer_only_when_the_host_has_it(tree):
    data = load(STRICT).data
    assert make_plan(data, tree, [STRICT], landlock_abi=7).lsm is None
    p = make_plan(data, tree, [STRICT], landlock_abi=7, bpf_lsm=True)
    assert p.path == PATH_BPF_LSM and PATH_FALLBACK in p.path
    # exec roots of the policy (realpath'd: /bin is /usr/bin) plus the library dirs
    assert "/usr/bin" in p.lsm.exec_allow and "/usr/lib" in p.lsm.exec_allow
    assert not any(x.startswith(tree["WORKSPACE"]) for x in p.lsm.exec_allow)   # W^X
    # concrete deny paths that exist; **/.env has wildcards
    assert p.lsm.file_deny == [os.path.join(tree["HOME"], ".ssh")]
    rec = p.record()["bpf_lsm"]
    assert rec == {"exec_allow": p.lsm.exec_allow, "file_deny": p.lsm.file_deny, "signals": False,
                   "unix": True}         # network.unix: false (the cgroup hooks need 6.7+)


def test_signals_are_scoped_by_the_lsm_layer_where_landlock_cannot(tree):
    """Landlock scopes signals from ABI 6 (6.12); below, the BPF LSM task_kill
    program holds the rule, so it is no downgrade; without BPF LSM it is."""
    data = load(STRICT).data
    p = make_plan(data, tree, [STRICT], landlock_abi=3, bpf_lsm=True)
    assert p.lsm.signals is True
    assert not any("signal scoping" in d for d in p.downgrades), p.downgrades
    p = make_plan(data, tree, [STRICT], landlock_abi=3)
    assert any("signal scoping" in d for d in p.downgrades), p.downgrades
    p = make_plan(data, tree, [STRICT], landlock_abi=7, bpf_lsm=True)
    assert p.lsm.signals is False       # Landlock's scope holds it


def test_exec_root_of_slash_turns_the_inode_exec_rule_off(tree):
    data = {"filesystem": {"read": ["/**"], "write": ["${WORKSPACE}/**"], "exec": ["/**"]},
            "on_violation": {"default": "deny"}}
    p = make_plan(data, tree, [], landlock_abi=7, bpf_lsm=True)
    assert p.lsm.exec_allow is None
    assert any("covers /" in n for n in p.notes)


def test_allow_lists_name_directories_deny_lists_also_hold_every_file(tmp_path):
    d = tmp_path / "lib" / "sub"
    d.mkdir(parents=True)
    for name in ("prog", "libx.so", "data.txt"):
        (d / name).write_text(name)
    named = tmp_path / "named.txt"
    named.write_text("x")
    lib = str(tmp_path / "lib")
    # allow: one entry per named path, directories included (the BPF side
    # walks a file's ancestors), nothing enumerated below them
    keys = expand_files([lib, str(named)], 100, "exec_allow", walk=False)
    assert sorted(keys.values()) == [lib, str(named)]
    # deny: the directory and every file below it, so a hard link elsewhere
    # to one of them is still refused
    keys = expand_files([lib], 100, "file_deny")
    assert sorted(os.path.relpath(p, lib) for p in keys.values()) == [
        ".", "sub/data.txt", "sub/libx.so", "sub/prog"]
    with pytest.raises(ValueError, match="neither a regular file nor a directory"):
        expand_files(["/dev/null"], 100, "file_deny")


def test_the_file_limit_is_not_swallowed(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    with pytest.raises(ValueError, match="more than 3 files"):
        expand_files([str(tmp_path)], 3, "exec_allow")


def test_tracepoint_fields_come_from_the_tracefs_format(tmp_path, monkeypatch):
    fmt = tmp_path / "events" / "sched" / "sched_process_exit"
    fmt.mkdir(parents=True)
    (fmt / "format").write_text(
        "name: sched_process_exit\nID: 1\nformat:\n"
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n"
        "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n"
        "\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n")
    monkeypatch.setattr(sensors, "TRACEFS", str(tmp_path))
    assert sensors.tracepoint_fields("sched/sched_process_exit") == {"common_type", "comm", "pid"}
    assert sensors.feature_cflags() == []          # Linux 6.1: no group_dead
    with open(fmt / "format", "a") as f:
        f.write("\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n")
    assert sensors.feature_cflags() == ["-DAW_HAVE_GROUP_DEAD"]


# ---- one refusal, one violation ---------------------------------------------------------

@pytest.fixture
def judged(tree):
    out = []
    compiled = compile_policy(load(STRICT), tree)
    run = RunContext(run_id="20261128-080000-abcdef", agent="a", cgroup_id=1, cwd=tree["WORKSPACE"])
    j = Judge(compiled, Correlator({}), run, out.append, lsm_enforced=True)
    return j, out


def lsm_exec_denial(j, path, pid=PID):
    ev = FileEvent(op="exec", path=path, abspath=path, pid=pid, tid=pid, ret=-1, error="EPERM",
                   ts=1.0)
    j.kernel_denial(ev, "filesystem", "filesystem.exec", "BPF LSM mmap_file: exec-mapping-not-allowed",
                    path, {"op": "mmap", "hook": "mmap_file", "path": path}, layer="bpf-lsm")


def loader_exec(j, program, pid=PID):
    ev = ExecEvent(filename="/lib64/ld-linux-x86-64.so.2", argv=["ld.so", program], pid=pid,
                   tid=pid, ret=0, ts=1.0)
    j(ev)


def counted(j):
    return j.by_rule["filesystem.exec"]


@pytest.mark.parametrize("lsm_first", [True, False])
def test_loader_argv_and_mmap_refusal_are_one_violation(judged, lsm_first):
    j, out = judged
    prog = "/dev/shm/aw-x/tool"
    steps = [lambda: lsm_exec_denial(j, prog), lambda: loader_exec(j, prog)]
    for step in (steps if lsm_first else steps[::-1]):
        step()
    assert counted(j) == 1
    assert len(out) == 1 and out[0].rule == "filesystem.exec"
    assert "BPF LSM" in out[0].detail["kernel"]
    # a second attempt is a second (counted) one
    for step in steps:
        step()
    assert counted(j) == 2


def test_a_refusal_seen_only_by_the_lsm_is_reported(judged):
    j, out = judged
    lsm_exec_denial(j, "/opt/other/tool")
    assert [v.rule for v in out] == ["filesystem.exec"]
    assert out[0].detail["hook"] == "mmap_file" and out[0].action == "kill"


def test_other_processes_do_not_pair(judged):
    j, out = judged
    lsm_exec_denial(j, "/dev/shm/t", pid=PID)
    loader_exec(j, "/dev/shm/t", pid=PID + 1)
    assert counted(j) == 2


def test_without_the_lsm_layer_nothing_is_paired(tree):
    out = []
    compiled = compile_policy(load(STRICT), tree)
    run = RunContext(run_id="r", agent="a", cgroup_id=1, cwd=tree["WORKSPACE"])
    j = Judge(compiled, Correlator({}), run, out.append)
    loader_exec(j, "/dev/shm/t")
    loader_exec(j, "/dev/shm/t")
    assert counted(j) == 2
    assert "noexec" in out[0].detail["kernel"]


def test_a_file_the_lsm_names_by_basename_is_found_by_argv_or_cwd(tmp_path):
    """The LSM program reports (inode, basename); the runner finds the path
    in the process's argv (the dynamic loader's program) or its cwd, and only
    when the inode agrees."""
    from types import SimpleNamespace

    from agentwatch.run.enforcement import named_by as _named_by
    shm, ws = tmp_path / "shm", tmp_path / "ws"
    shm.mkdir()
    ws.mkdir()
    (shm / "tool").write_text("a")
    (ws / "tool").write_text("b")                      # same name, other inode
    ino = os.stat(shm / "tool").st_ino
    loader = SimpleNamespace(argv=["/lib64/ld-linux-x86-64.so.2", str(shm / "tool")], cwd=str(ws))
    assert _named_by(loader, "tool", ino) == str(shm / "tool")
    in_cwd = SimpleNamespace(argv=["sh"], cwd=str(shm))
    assert _named_by(in_cwd, "tool", ino) == str(shm / "tool")
    relative = SimpleNamespace(argv=["ld.so", "./tool"], cwd=str(shm))   # named as the caller wrote it
    assert _named_by(relative, "tool", ino) == str(shm / "tool")
    elsewhere = SimpleNamespace(argv=["sh"], cwd=str(ws))
    assert _named_by(elsewhere, "tool", ino) is None   # ws/tool is another file
    assert _named_by(None, "tool", ino) is None


def test_kernel_kills_only_exact_forms_and_only_for_kill(tree, tmp_path):
    def compiled(rules):
        p = tmp_path / "k.yaml"
        p.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: k}\n"
                     "filesystem:\n  deny: ['${HOME}/.ssh/**', '**/.env', '${HOME}/.netrc',\n"
                     "         '**/*.pem', '${WORKSPACE}/**/secret']\n"
                     f"on_violation: {{default: alert, rules: {rules}}}\n")
        return compile_policy(load(str(p)), tree)
    c = compiled("{filesystem.deny: kill}")
    # /a/b/** and **/name are exact as written; .netrc (no boundary), *.pem
    # and ws/**/secret are left to userspace
    assert c.kernel_kills() == ([tree["HOME"] + "/.ssh/"], [".env"])
    assert c.killed_in_kernel(".env") and c.killed_in_kernel("/x/y/.env")
    assert c.killed_in_kernel(tree["HOME"] + "/.ssh/id_rsa")
    assert not c.killed_in_kernel(tree["HOME"] + "/.sshfoo") and not c.killed_in_kernel(".envrc")
    assert compiled("{filesystem.deny: deny}").kernel_kills() == ([], [])


def test_a_refused_preload_is_named_by_the_file_the_process_opened(tmp_path):
    """LD_PRELOAD names the library in the environment only: the BPF LSM
    refusal (basename and inode) is named by the process's recent opens."""
    from types import SimpleNamespace
    from agentwatch.run.enforcement import named_by as _named_by
    lib = tmp_path / "libhook.so"
    lib.write_bytes(b"\x7fELF")
    other = tmp_path / "sub"
    other.mkdir()
    (other / "libhook.so").write_bytes(b"other inode")
    proc = SimpleNamespace(argv=["/usr/bin/true"], cwd="/")
    ino = lib.stat().st_ino
    assert _named_by(proc, "libhook.so", ino) is None
    opened = [str(lib), str(other / "libhook.so"), "/etc/ld.so.cache"]
    assert _named_by(proc, "libhook.so", ino, opened) == str(lib)   # by inode, not by name
