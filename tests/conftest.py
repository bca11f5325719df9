"""Shared test plumbing.

tests/unit     pure logic, no root, no kernel
tests/kernel   root + the real kernel: real BPF programs, real cgroups
tests/adversarial  escape attempts under a strict policy (root)

Every kernel test runs agentwatch for real. After the whole session a
fixture asserts that nothing is left behind: no run cgroup, no BPF program
named aw_*, no keeper process.
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


def _has_kernel_tests(session):
    return any("/kernel/" in str(i.fspath) or "/adversarial/" in str(i.fspath) for i in session.items)


def keepers():
    """pids of this checkout's keeper processes (agentwatch/keeper.py)."""
    from agentwatch.keeper import MAIN
    out = set()
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if MAIN.encode() in argv and os.fsencode(REPO) in argv:
            out.add(int(d))
    return out


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(request):
    before = keepers()           # another session's, on this checkout
    yield
    kernel_tests = _has_kernel_tests(request.session)
    if not IS_ROOT or not kernel_tests:
        return
    deadline = time.monotonic() + 5      # a keeper that reaps a killed monitor's runs needs a moment
    while keepers() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keepers() - before == set(), "keeper processes left behind after the test session"
    from agentwatch.sandbox.cgroups import leftover_cgroups
    from agentwatch.sandbox.limits import leftover_v1
    from agentwatch.sensors.inventory import agentwatch_programs
    assert leftover_cgroups() == [], "run cgroups left behind after the test session"
    assert leftover_v1() == [], "cgroup v1 limit groups left behind after the test session"
    # a closed program is freed after RCU grace periods, which on this host can
    # take seconds after its last fd closed: wait for it, as for keepers
    deadline = time.monotonic() + 30
    while agentwatch_programs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert agentwatch_programs() == [], "agentwatch BPF programs still loaded after the test session"


_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine)


def _held_tracepoints():
    """tracefs ids of every tracepoint a run may attach: both ends of each
    watched syscall, the exit of each one a seccomp filter may refuse, and
    the process and mapexec probes."""
    from agentwatch.sandbox import seccomp_filter
    from agentwatch.sensors import MAPEXEC_PROBES, PROCESS_PROBES, TRACEFS
    from agentwatch.sensors import syscalls as S
    names = {f"syscalls:sys_{end}_{s.name}" for s in S.SPECS for end in ("enter", "exit")}
    names |= {f"syscalls:sys_exit_{n}" for group, _ in seccomp_filter.GROUPS.values() for n in group}
    # refused for some arguments only: both ends (sensors/syscalls.specs_for)
    names |= {f"syscalls:sys_{end}_{n}" for n in seccomp_filter.CONDITIONAL for end in ("enter", "exit")}
    names |= {tp for tp, _ in MAPEXEC_PROBES + PROCESS_PROBES}
    ids = []
    for name in sorted(names):
        try:
            with open(os.path.join(TRACEFS, "events", *name.split(":"), "id")) as f:
                ids.append(int(f.read()))
        except OSError:
            pass            # not on this kernel
    return ids


@pytest.fixture(scope="session", autouse=True)
def tracepoints_held(request):
    """Hold a disabled perf event (no BPF program) on every tracepoint a run
    may attach, for the whole session. The kernel unregisters a tracepoint
    from perf when its last perf event closes, and then waits for an RCU
    grace period under its global event_mutex (perf_trace_event_unreg), so
    each run's teardown of ~140 tracepoints takes ~5 s on a host with slow
    grace periods, and the suite is mostly that wait. Held here, every
    run's own attach, detach and program unload still happen, for real;
    only the idle tracepoint's unregister waits for the end of the session.
    Best effort: without it the tests are the same, only slower."""
    kernel_tests = _has_kernel_tests(request.session)
    fds = []
    # not in the VM guest: a CI run there timed out (cause not yet known) with it held
    if IS_ROOT and kernel_tests and _PERF_EVENT_OPEN and not IN_VM:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        attr = ctypes.create_string_buffer(64)     # struct perf_event_attr, PERF_ATTR_SIZE_VER0
        for tp_id in _held_tracepoints():
            # type PERF_TYPE_TRACEPOINT (2), size, config = the id; flags: disabled (bit 0)
            ctypes.memmove(attr, (2).to_bytes(4, "little") + (64).to_bytes(4, "little")
                           + tp_id.to_bytes(8, "little") + bytes(24) + (1).to_bytes(8, "little"), 48)
            fd = libc.syscall(_PERF_EVENT_OPEN, attr, -1, 0, -1, 8)   # any pid, CPU 0, FD_CLOEXEC
            if fd >= 0:
                fds.append(fd)
    yield len(fds)
    if fds:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(os.close, fds))


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(d))
    return d


def aw_cmd():
    """The CLI from this checkout, run in a fresh interpreter."""
    return [sys.executable, "-m", "cli.main"]


# An embedded `agentwatch run` in the BPF LSM VM compiles its BPF programs
# on an emulated CPU (QEMU TCG): test_refusals' run took 110-200 s there
# (bcc compiles: bpf/lsm.bpf.c 50-90 s, the sensors 20-50 s, the egress
# guard 15-30 s), 3 s on the host; 120 s timed it out in CI.
# tests/adversarial/advkit.py's RUN_TIMEOUT_S is the same.
AW_TIMEOUT_S = 600 if IN_VM else 120


class AwTimeout(subprocess.TimeoutExpired):
    """An aw() command that timed out, with the last lines it printed."""

    def __str__(self):
        def tail(data, n=40):
            if not data:
                return "(nothing)"
            text = data.decode(errors="replace") if isinstance(data, bytes) else data
            return "\n".join(text.splitlines()[-n:])
        return (f"{super().__str__()}\n--- its stdout (last lines)\n{tail(self.stdout, 20)}"
                f"\n--- its stderr (last lines)\n{tail(self.stderr)}")


def aw(*args, timeout=None, check=False, **kw):
    """The CLI with args; timeout (default AW_TIMEOUT_S) fails with what it printed."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.update(kw.pop("env", {}))
    timeout = AW_TIMEOUT_S if timeout is None else timeout
    try:
        return subprocess.run(aw_cmd() + list(args), cwd=kw.pop("cwd", REPO), env=env,
                              capture_output=True, text=True, timeout=timeout, check=check, **kw)
    except subprocess.TimeoutExpired as e:
        raise AwTimeout(e.cmd, e.timeout, e.output, e.stderr) from None


def free_id(lookup):
    """A uid (lookup=pwd.getpwuid) or gid (grp.getgrgid) with no entry on
    this host, so tests run as it without adding a user."""
    for i in range(61000, 64000):
        try:
            lookup(i)
        except KeyError:
            return i
    pytest.skip("no free id between 61000 and 64000")


def free_port():
    """A loopback TCP port nothing listens on (now)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


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


def own_daemon(tmp_path_factory, name="daemon", args=()):
    """A daemon on a state dir of its own (for a module-scoped fixture:
    `yield from own_daemon(tmp_path_factory)`): yields (state dir, env for
    aw()), stops it at the end. args: more for `daemon start`."""
    d = tmp_path_factory.mktemp(name) / "state"
    d.mkdir()
    env = {"AGENTWATCH_STATE_DIR": str(d)}
    r = aw("daemon", "start", *args, env=env, timeout=180)
    assert r.returncode == 0, r.stderr + r.stdout
    yield d, env
    stop = aw("daemon", "stop", env=env, timeout=60)
    assert stop.returncode == 0, stop.stderr
