"""Guest-side fixtures: run only inside the VM booted by tests/vm/run_vm_tests.sh
(Debian's kernel with lsm=...,bpf and its own matching headers).

One LsmGuard is compiled and loaded for the whole session (a bcc compile
takes ~30 s under QEMU TCG) and enforces for one cgroup v2 leaf. Every
attempt is made by tests/vm/guest/awprobe (static C), which moves itself
into that leaf (--cg) before the attempt, or stays outside it.
"""
import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from agentwatch import doctor
from agentwatch.sensors.inventory import loaded_programs
from agentwatch.guards.lsm import ENFORCEMENT, LsmGuard, check_headers

HERE = os.path.dirname(os.path.abspath(__file__))
LDSO = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
LIBC = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
TRUE = os.path.realpath("/usr/bin/true")


@pytest.fixture(scope="session", autouse=True)
def in_the_vm():
    if os.environ.get("AGENTWATCH_VM_GUEST") != "1":
        pytest.skip("tests/vm/guest runs only inside the VM: use tests/vm/run_vm_tests.sh")


@pytest.fixture(scope="session")
def doctor_path():
    """The enforcement path `agentwatch doctor` gives this kernel: must be bpf-lsm."""
    name, probe, disables = next(p for p in doctor.PROBES if p[0] == "bpf-lsm")
    check = doctor.run_check(name, probe, disables)
    path = doctor.enforcement_path([check])
    assert path == doctor.ENFORCE_BPF_LSM == ENFORCEMENT, f"doctor: {check.detail}"
    return path


@pytest.fixture(scope="session")
def awprobe(tmp_path_factory):
    pre = os.environ.get("AGENTWATCH_VM_AWPROBE")
    if pre and os.access(pre, os.X_OK):
        return pre
    exe = str(tmp_path_factory.mktemp("awprobe") / "awprobe")
    subprocess.run(["gcc", "-O2", "-static", "-o", exe, os.path.join(HERE, "awprobe.c")], check=True)
    return exe


def _listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


class World:
    """The files, ports and cgroup the session's guard is configured for."""

    def __init__(self, root):
        self.root = root
        self.bin = os.path.join(root, "bin")            # allowed as a directory
        os.mkdir(self.bin)
        self.tool = os.path.join(self.bin, "tool")      # a copy of true, allowed via bin/
        shutil.copy2(TRUE, self.tool)
        self.copy = os.path.join(root, "true-copy")     # a copy of true, NOT allowed
        shutil.copy2(TRUE, self.copy)
        self.secret = os.path.join(root, "secret")
        with open(self.secret, "w") as f:
            f.write("s3cr3t\n")
        self.hardlink = os.path.join(self.bin, "innocent-name")  # same inode as secret
        os.link(self.secret, self.hardlink)
        self.symlink = os.path.join(root, "secret-symlink")
        os.symlink(self.secret, self.symlink)
        self.public = os.path.join(root, "public")
        with open(self.public, "w") as f:
            f.write("hello\n")
        self.allowed_listener = _listener()
        self.denied_listener = _listener()
        self.allowed_port = self.allowed_listener.getsockname()[1]
        self.denied_port = self.denied_listener.getsockname()[1]
        self.exec_allow = [TRUE, LDSO, LIBC, self.bin]
        self.file_deny = [self.secret]
        self.connect_ports = [self.allowed_port]

    def close(self):
        self.allowed_listener.close()
        self.denied_listener.close()


class Lsm:
    """The loaded guard plus helpers to make attempts and collect denials."""

    def __init__(self, guard, cgroup, world, awprobe):
        self.guard = guard
        self.cgroup = cgroup
        self.cgroup_id = os.stat(cgroup).st_ino
        self.world = world
        self.awprobe = awprobe
        self.denials = []

    def attempt(self, *args, inside=True, timeout=60):
        """Run awprobe (in the cgroup unless inside=False). Returns
        (exit status, parsed JSON line or None, stderr, new denial records)."""
        before = len(self.denials)
        cmd = [self.awprobe] + (["--cg", self.cgroup] if inside else []) + [str(a) for a in args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out = p.stdout.strip().splitlines()
        res = json.loads(out[-1]) if out and out[-1].startswith("{") else None
        # The hook writes its record before the refused call returns, so it is
        # in the ring buffer by now and one poll delivers it; when the attempt
        # looks refused but nothing came yet, wait a little longer.
        self.guard.poll(10)
        refused = (res is not None and res.get("errno") == errno.EPERM) or p.returncode == 127
        deadline = time.monotonic() + 2.0
        while inside and refused and len(self.denials) == before and time.monotonic() < deadline:
            self.guard.poll(100)
        return p.returncode, res, p.stderr, self.denials[before:]

    def assert_path(self, records=()):
        """The attempt was judged on the BPF LSM path: the guard's aw_lsm_*
        programs are attached, and every record came from an LSM hook."""
        assert self.guard.enforcement == ENFORCEMENT
        names = {n for _, n in loaded_programs()}
        assert set(self.guard.program_names()) <= names
        for r in records:
            assert r["enforcement"] == ENFORCEMENT, r
            assert r["cgroup"] == self.cgroup_id, r
            assert r["action"] == "deny" and r["error"] == "EPERM", r


@pytest.fixture(scope="session")
def lsm(doctor_path, awprobe):
    ok, detail = check_headers()
    assert ok, detail
    root = tempfile.mkdtemp(prefix="awvm-")
    world = World(root)
    cgroup = f"/sys/fs/cgroup/awvm-{os.getpid()}"
    os.mkdir(cgroup)
    guard = LsmGuard(world.exec_allow, world.file_deny, world.connect_ports)
    state = Lsm(guard, cgroup, world, awprobe)
    guard.open(cgroup, state.denials.append)
    try:
        yield state
    finally:
        guard.close()
        world.close()
        left = [n for _, n in loaded_programs() if n.startswith("aw_")]
        for _ in range(100):
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)
        assert left == [], f"BPF programs left after LsmGuard.close(): {left}"
        assert not os.path.exists(cgroup), f"cgroup {cgroup} left behind"
