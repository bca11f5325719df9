"""Shared test plumbing.

tests/unit     pure logic, no root, no kernel
tests/kernel   root + the real kernel: real BPF programs, real cgroups
tests/adversarial  escape attempts under a strict policy (root)

Every kernel test runs agentwatch for real. After the whole session a
fixture asserts that nothing is left behind: no run cgroup, no BPF program
named aw_*.
"""
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0

# tests/vm/guest runs only inside the BPF LSM VM (tests/vm/run_vm_tests.sh sets
# AGENTWATCH_VM_GUEST=1 there). Kept here, not in a tests/vm/conftest.py: a
# second module named "conftest" would shadow this one for `from conftest import`.
IN_VM = os.environ.get("AGENTWATCH_VM_GUEST") == "1"
collect_ignore = [] if IN_VM else ["vm/guest"]


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs root and the real kernel")
    for item in items:
        if not IS_ROOT and ("/kernel/" in str(item.fspath) or "/adversarial/" in str(item.fspath)):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(request):
    yield
    kernel_tests = any("/kernel/" in str(i.fspath) or "/adversarial/" in str(i.fspath)
                       for i in request.session.items)
    if not IS_ROOT or not kernel_tests:
        return
    from agentwatch.sandbox.cgroups import leftover_cgroups
    from agentwatch.sandbox.limits import leftover_v1
    from agentwatch.sensors.inventory import agentwatch_programs
    assert leftover_cgroups() == [], "run cgroups left behind after the test session"
    assert leftover_v1() == [], "cgroup v1 limit groups left behind after the test session"
    assert agentwatch_programs() == [], "agentwatch BPF programs still loaded after the test session"


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(d))
    return d


def aw_cmd():
    """The CLI from this checkout, run in a fresh interpreter."""
    return [sys.executable, "-m", "cli.main"]


def aw(*args, timeout=120, check=False, **kw):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.update(kw.pop("env", {}))
    return subprocess.run(aw_cmd() + list(args), cwd=kw.pop("cwd", REPO), env=env,
                          capture_output=True, text=True, timeout=timeout, check=check, **kw)


def free_id(lookup):
    """A uid (lookup=pwd.getpwuid) or gid (grp.getgrgid) with no entry on
    this host, so tests run as it without adding a user."""
    for i in range(61000, 64000):
        try:
            lookup(i)
        except KeyError:
            return i
    pytest.skip("no free id between 61000 and 64000")


def wait_for(pred, timeout=30, what="condition"):
    """pred()'s first true value, polled every 50 ms; fails after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read_events(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def cbin(tmp_path_factory):
    """Compile a small static C program from tests/kernel/csrc; returns its path."""
    out = tmp_path_factory.mktemp("cbin")

    def build(name):
        src = os.path.join(REPO, "tests", "kernel", "csrc", f"{name}.c")
        exe = out / name
        if not exe.exists():
            subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), src], check=True)
        return str(exe)
    return build


class Lines:
    """Reads JSON lines from a child's stdout without blocking and without
    losing lines to a buffered reader (select sees the fd, not the buffer)."""

    def __init__(self, proc):
        self.fd = proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""
        self.items = []

    def poll(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        self.items += [json.loads(l) for l in lines if l.strip()]
        return self.items
