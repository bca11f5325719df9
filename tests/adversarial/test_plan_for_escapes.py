"""What the sandbox plan and the judge make of the strict policy, without a
kernel: the pieces test_escapes.py relies on, checked where they are decided."""
import os

import pytest

from advkit import POLICY
from agentwatch.engine import paths
from agentwatch.policy import load
from agentwatch.sandbox.plan import make_plan


@pytest.fixture
def tree(tmp_path):
    for d in ("home/.ssh", "ws/.git/hooks", "tmp"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "home/.ssh/id_rsa").write_text("key\n")
    return {k: str(tmp_path / k) for k in ("home", "ws", "tmp")}


def plan_for(data, tree, abi=7):
    variables = {"HOME": tree["home"], "WORKSPACE": tree["ws"], "TMPDIR": tree["tmp"]}
    return make_plan(data, variables, [POLICY], landlock_abi=abi)


def test_strict_policy_mounts(tree):
    p = plan_for(load(POLICY).data, tree)
    assert p.path == "landlock+seccomp+cgroup-bpf"
    ws = os.path.realpath(tree["ws"])
    assert p.masks == [(ws, "noexec"), (os.path.realpath(tree["tmp"]), "noexec"),
                       (ws + "/.git", "pin"), (tree["ws"] + "/.git/hooks", "dir"),
                       (os.path.realpath(POLICY), "ro")]
    # ~/.ssh is outside every allow list: Landlock refuses it (EACCES, reported);
    # a mask would answer ENOENT and hide the attempt
    assert not any(path.startswith(tree["home"]) for path, _ in p.masks)
    assert p.downgrades == ["filesystem.deny '**/.env': has wildcards, cannot be masked; an open "
                            "by a name it matches is killed in the kernel before it returns; other "
                            "names (a link to it) are detected and killed by agentwatch"]


def test_a_wildcard_deny_the_kernel_cannot_kill_is_detected_only(tree):
    data = load(POLICY).data
    pem = dict(data, filesystem=dict(data["filesystem"], deny=["**/*.pem"]))
    assert plan_for(pem, tree).downgrades == [
        "filesystem.deny '**/*.pem': has wildcards, cannot be masked; detected only"]
    alert = dict(data, on_violation=dict(data["on_violation"], rules={}))
    assert plan_for(alert, tree).downgrades[0].endswith("cannot be masked; detected only")


def test_readable_home_gets_its_secrets_masked(tree):
    data = load(POLICY).data
    data = dict(data, filesystem=dict(data["filesystem"],
                                      read=data["filesystem"]["read"] + ["${HOME}/**"]))
    masks = plan_for(data, tree).masks
    assert (tree["home"] + "/.ssh", "dir") in masks


def test_strict_policy_seccomp_denies_and_refuses_memfds(tree):
    """process and syscalls are deny: every seccomp rule answers EPERM (the
    syscall sensor reports it from the exit tracepoint), none kills."""
    sc = plan_for(load(POLICY).data, tree).seccomp
    assert sc.action == "errno" and set(sc.actions.values()) == {"errno"}
    assert not sc.memfd
    assert not (sc.ptrace or sc.bpf or sc.io_uring or sc.namespaces or sc.memfd_exec)


@pytest.mark.parametrize("argv, program", [
    (["ld.so", "./tool", "x"], "./tool"),
    (["/lib64/ld-linux-x86-64.so.2", "--library-path", "/x", "--preload", "y.so", "t"], "t"),
    (["ld-linux-x86-64.so.2", "--inhibit-cache", "--", "--odd-name"], "--odd-name"),
    (["ld-linux-x86-64.so.2", "--list"], None),
])
def test_program_run_through_the_loader(argv, program):
    assert paths.loaded_program(argv) == program


@pytest.mark.parametrize("name, loader", [("ld-linux-x86-64.so.2", True), ("ld-2.36.so", True),
                                          ("ld-linux-aarch64.so.1", True), ("ld.so", True),
                                          ("ldconfig", False), ("ld", False), ("ld.bfd", False)])
def test_loader_names(name, loader):
    assert bool(paths.LOADER.match(name)) is loader


def test_proc_self_is_the_agents_process():
    assert paths.own_proc("/proc/self/root/etc/passwd", 42) == "/proc/42/root/etc/passwd"
    assert paths.own_proc("/proc/thread-self/fd/3", 42) == "/proc/42/fd/3"
    assert paths.own_proc("/proc/selfish", 42) == "/proc/selfish"
