"""Plumbing for the adversarial suite: sandboxes, listeners, parallel runs.

Every escape attempt runs as a real agent under policies/sandboxed-agent.yaml
(`agentwatch run --policy ... --allow-downgrade --events FILE`), as root, on
the real kernel. A *scenario* is one agent run: its own workspace, HOME
(with a fixture ~/.ssh/id_rsa), TMPDIR and a directory outside the sandbox,
the listeners that must receive nothing, and a shell script. Attempts whose
rule kills the agent get a run of their own; attempts that are only denied
share a run, each reported and checked separately.

A run costs ~3-8 s, mostly loading and detaching ~120 tracepoints (RCU
grace periods), which overlaps well: the scenarios the selected tests need
are run up front, a few at a time, by the module fixture `runs`
(test_escapes.py). Not a conftest.py: tests/conftest.py owns that module name.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import pytest

from agentwatch.sandbox.plan import PATH_BPF_LSM, PATH_FALLBACK
from agentwatch.guards.lsm import LsmGuard
from conftest import REPO, aw_cmd, read_events

sys.path.insert(0, REPO)
from bench.lib import process_gone  # noqa: E402

POLICY = os.path.join(REPO, "policies", "sandboxed-agent.yaml")
ATTEMPTS = os.path.join(REPO, "tests", "adversarial", "agents", "attempts.py")
CSRC = os.path.join(REPO, "tests", "adversarial", "csrc")
IN_VM = os.environ.get("AGENTWATCH_VM_GUEST") == "1"   # tests/vm: Debian's kernel, lsm=...,bpf


def bpf_lsm_expected(environ=os.environ, cmdline_path="/proc/cmdline"):
    """Why this machine must offer the BPF LSM path, or None: the VM of
    tests/vm, a kernel booted with bpf in lsm= (vagrant/), or
    AGENTWATCH_EXPECT_BPF_LSM=1 (vagrant/test.sh: also when GRUB's lsm= did
    not take). AGENTWATCH_EXPECT_BPF_LSM=0 expects nothing."""
    want = environ.get("AGENTWATCH_EXPECT_BPF_LSM")
    if want in ("0", "1"):
        return "AGENTWATCH_EXPECT_BPF_LSM=1" if want == "1" else None
    if environ.get("AGENTWATCH_VM_GUEST") == "1":
        return "the tests/vm guest"
    try:
        with open(cmdline_path) as f:
            args = f.read().split()
    except OSError:
        return None
    lsm = [a for a in args if a.startswith("lsm=")]
    if lsm and "bpf" in lsm[-1][len("lsm="):].split(","):   # the kernel takes the last lsm=
        return f"booted with {lsm[-1]}"
    return None


def enforcement_path_here():
    """The path `agentwatch run` takes here: BPF LSM on top where it loads
    (the VM of tests/vm and a kernel booted to run it, which must have it),
    else Landlock + seccomp + cgroup BPF (the CI kernel: no BPF LSM,
    headers of another version). A machine that should offer BPF LSM and
    does not fails here, rather than testing the fallback in its place."""
    why = LsmGuard.unavailable()
    expected = bpf_lsm_expected()
    assert not (expected and why), f"BPF LSM path expected ({expected}) but not available: {why}"
    return PATH_FALLBACK if why else PATH_BPF_LSM


PATH_HERE = enforcement_path_here()
LSM_HERE = PATH_HERE == PATH_BPF_LSM
SECRET = "-----BEGIN OPENSSH PRIVATE KEY----- adversarial-fixture-"
# The runs go through one `agentwatch daemon`, which compiles and attaches the
# sensors and the enforcement programs once for all (under QEMU TCG, tests/vm,
# an embedded run costs ~1 min of CPU: three bcc compiles, emulated). A
# scenario about agentwatch's own process (Sandbox.embedded) runs without one,
# and so do HOST_EMBEDDED on the host, so that both monitor modes meet escape
# attempts. AGENTWATCH_ADV_DAEMON=0 runs every scenario embedded.
ON_DAEMON = os.environ.get("AGENTWATCH_ADV_DAEMON", "1") != "0"
HOST_EMBEDDED = ("files", "network", "fork_bomb", "memory")
KILL_GRACE_S = 60 if IN_VM else 15   # a killed agent never gets past this sleep
RUN_TIMEOUT_S = 600 if IN_VM else 120
PARALLEL = 2 if IN_VM else 4


def uses(name):
    """Decorator: the test checks the agent run of scenario ``name``."""
    def mark(fn):
        fn.scenario = name
        return fn
    return mark


# ----------------------------------------------------------------- listeners

class Listener:
    """A loopback (or netns-side) endpoint the agent must not reach. Nothing
    is answered during the run: TCP handshakes complete in the kernel
    backlog and data waits in the socket, so after the run ``drain()`` tells
    exactly what arrived."""

    def __init__(self, proto, family=socket.AF_INET, addr="127.0.0.1", port=0, unix=None):
        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        self.proto = proto
        if unix is not None:
            self.sock = socket.socket(socket.AF_UNIX, kind)
            self.sock.bind(unix)
            self.port = None
        else:
            self.sock = socket.socket(family, kind)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((addr, port))
            self.port = self.sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            self.sock.listen(16)
        self.sock.setblocking(False)
        self.connections = 0
        self.data = []

    def drain(self):
        if self.proto == "udp":
            while True:
                try:
                    self.data.append(self.sock.recv(65536))
                except BlockingIOError:
                    break
        else:
            while True:
                try:
                    conn, _ = self.sock.accept()
                except BlockingIOError:
                    break
                self.connections += 1
                conn.settimeout(0.5)
                chunks = []
                try:
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        chunks.append(chunk)
                except (socket.timeout, OSError):
                    pass
                conn.close()
                if chunks:
                    self.data.append(b"".join(chunks))
        return self.data

    def close(self):
        self.sock.close()


class NetlinkListener:
    """A host process's NETLINK_USERSOCK socket, the kind of netlink
    endpoint any process may send to: the agent must not reach it.
    ``portid`` is its address; ``drain()`` what arrived."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 2)   # NETLINK_USERSOCK
        self.sock.bind((0, 0))
        self.portid = self.sock.getsockname()[0]
        self.sock.setblocking(False)
        self.data = []

    def drain(self):
        while True:
            try:
                self.data.append(self.sock.recv(65536))
            except BlockingIOError:
                return self.data

    def close(self):
        self.sock.close()


# ----------------------------------------------------------------- progress

PROGRESS = os.environ.get("AGENTWATCH_ADV_PROGRESS")   # tests/vm: a file in the VM's shared dir


def progress(line):
    """A timestamped line on AGENTWATCH_ADV_PROGRESS: the scenarios' runs take
    many minutes in the VM before the first test reports."""
    if PROGRESS:
        with open(PROGRESS, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")


# ----------------------------------------------------------------- the daemon

def start_daemon(state_dir):
    """`agentwatch daemon start` on state_dir (ON_DAEMON runs go through it);
    returns its pid."""
    from agentwatch import daemon
    env = dict(os.environ, PYTHONPATH=REPO, AGENTWATCH_STATE_DIR=state_dir)
    r = subprocess.run(aw_cmd() + ["daemon", "start"], env=env, capture_output=True,
                       text=True, timeout=RUN_TIMEOUT_S, cwd=REPO)
    assert r.returncode == 0, f"agentwatch daemon start: {r.stderr}{r.stdout}"
    return daemon.ping(os.path.join(state_dir, "daemon.sock"))["pid"]


def stop_daemon(state_dir, pid):
    """Stop the daemon started above; it must stop by itself (else it is
    killed, by its id, and the test fails)."""
    import signal
    from agentwatch import daemon
    from agentwatch.core.errors import AgentwatchError
    try:
        daemon.shutdown(os.path.join(state_dir, "daemon.sock"))   # returns once it is gone
        error = None
    except AgentwatchError as e:
        error = e
    if not process_gone(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the daemon did not stop (killed): {error}")
    assert error is None, f"agentwatch daemon stop: {error}"


# ----------------------------------------------------------------- a run

@dataclass
class Sandbox:
    name: str
    root: str
    script: str = ""
    env: dict = field(default_factory=dict)
    pass_fds: tuple = ()
    policy: str = POLICY
    prefix: list = field(default_factory=list)   # argv before /bin/sh agent.sh (e.g. env -u)
    embedded: bool = False       # about the agentwatch process itself: never on a daemon
    listeners: dict = field(default_factory=dict)
    cleanup: list = field(default_factory=list)
    # results
    rc: int = None
    stdout: str = ""
    stderr: str = ""
    events: list = field(default_factory=list)
    elapsed: float = None
    state_dir: str = None

    def __post_init__(self):
        for d in ("ws", "home/.ssh", "tmp", "outside"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        with open(self.secret, "w") as f:
            f.write(SECRET + self.name + "\n")
        os.chmod(self.secret, 0o600)
        shutil.copy(ATTEMPTS, self.path("ws", "attempts.py"))

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    on_daemon = property(lambda self: ON_DAEMON and not self.embedded
                         and (IN_VM or self.name not in HOST_EMBEDDED))
    ws = property(lambda self: self.path("ws"))
    home = property(lambda self: self.path("home"))
    tmp = property(lambda self: self.path("tmp"))
    outside = property(lambda self: self.path("outside"))
    secret = property(lambda self: self.path("home", ".ssh", "id_rsa"))

    def listen(self, key, *args, **kw):
        lst = Listener(*args, **kw)
        self.listeners[key] = lst
        return lst

    def run(self, state_dir):
        self.state_dir = state_dir
        progress(f"{self.name}: start ({'daemon' if self.on_daemon else 'embedded'})")
        agent = self.path("ws", "agent.sh")
        with open(agent, "w") as f:
            f.write('set -u\nA="/usr/bin/python3 -I $WS/attempts.py"\n' + self.script)
        env = dict(os.environ, PYTHONPATH=REPO, HOME=self.home, TMPDIR=self.tmp, WS=self.ws,
                   OUTSIDE=self.outside, AGENTWATCH_STATE_DIR=state_dir, **self.env)
        argv = aw_cmd() + ["run", "--policy", self.policy, "--workspace", self.ws,
                           "--allow-downgrade", "--events", self.path("events.jsonl"),
                           "--daemon" if self.on_daemon else "--no-daemon",
                           "--", *self.prefix, "/bin/sh", agent]
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, cwd=self.ws, env=env, capture_output=True, text=True,
                               timeout=RUN_TIMEOUT_S, pass_fds=self.pass_fds)
            self.rc, self.stdout, self.stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            self.rc, self.stderr = None, f"timed out after {RUN_TIMEOUT_S} s: {e}"
        self.elapsed = time.monotonic() - t0
        progress(f"{self.name}: rc={self.rc} after {self.elapsed:.1f} s")
        if os.path.exists(self.path("events.jsonl")):
            self.events = read_events(self.path("events.jsonl"))
        for lst in self.listeners.values():
            lst.drain()
        return self

    def leftover_processes(self):
        """Processes still running anything of this sandbox (there must be none)."""
        import psutil
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.root in arg for arg in p.info["cmdline"] or ()):
                    out.append((p.info["pid"], p.info["cmdline"]))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def finish(self):
        for lst in self.listeners.values():
            lst.close()
        for fn in reversed(self.cleanup):
            fn()

    # -- what happened ------------------------------------------------------------
    def attempts(self, op=None):
        out = [json.loads(line[len("ATTEMPT "):]) for line in self.stdout.splitlines()
               if line.startswith("ATTEMPT ")]
        return [a for a in out if op is None or a["op"] == op]

    def result(self, op):
        """The kernel's answer to an attempted operation (None: never got there)."""
        found = self.attempts(op)
        return found[0]["result"] if found else None

    def lifecycle(self, phase):
        found = [e for e in self.events if e["kind"] == "lifecycle" and e["phase"] == phase]
        assert found, f"{self.name}: no lifecycle/{phase} event\n{self.report()}"
        return found[0]

    def violations(self, rule=None, category=None, **detail):
        out = []
        for v in self.events:
            if v["kind"] != "violation" or v["detail"].get("repeat"):
                continue
            if rule and v["rule"] != rule or category and v["category"] != category:
                continue
            if all(v["detail"].get(k) == want for k, want in detail.items()):
                out.append(v)
        return out

    def violation(self, rule, category, **detail):
        found = self.violations(rule, category, **detail)
        assert found, (f"{self.name}: no {category}/{rule} violation with {detail}\n"
                       + self.report())
        return found[0]

    def exists(self, *parts):
        return os.path.exists(self.path(*parts))

    def read(self, *parts):
        try:
            with open(self.path(*parts), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def report(self):
        vs = [(v["category"], v["rule"], v["action"], v["detail"].get("kernel"),
               v["detail"].get("path") or v["detail"].get("addr"), v["detail"].get("port"))
              for v in self.events if v["kind"] == "violation"]
        return (f"--- run {self.name}: rc={self.rc} in {self.elapsed and round(self.elapsed, 1)} s\n"
                f"--- stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}\n"
                f"--- violations:\n" + "\n".join(map(str, vs)) + self._daemon_log())

    def _daemon_log(self):
        """What the daemon logged about this run, when it failed it: "its
        log has the details", and the log goes with the test's state dir."""
        if not self.on_daemon or self.state_dir is None or "daemon" not in self.stderr:
            return ""
        run_id = self.stderr.partition("(run ")[2].partition(")")[0]
        try:
            with open(os.path.join(self.state_dir, "daemon.log"), errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return ""
        at = [i for i, line in enumerate(lines) if run_id and run_id in line]
        keep = lines[at[0]:at[-1] + 40] if at else lines[-60:]
        return "\n--- daemon log:\n" + "\n".join(keep)[-6000:]


# ----------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def payloads(tmp_path_factory):
    """tests/adversarial/csrc/payload.c, static and dynamic (see its header)."""
    out = tmp_path_factory.mktemp("payload")
    src = os.path.join(CSRC, "payload.c")
    built = {}
    for name, flags in (("payload", ["-static"]), ("payload-dyn", []),
                        ("libpayload.so", ["-shared", "-fPIC", "-DAW_PRELOAD"])):
        exe = str(out / name)
        subprocess.run(["gcc", "-O2", "-Wall", *flags, "-o", exe, src], check=True)
        built[name] = exe
    return built


# /30s from the documentation ranges; the first one no address or route of
# this host touches is used (the CI host itself sits in 192.0.2.0/24)
NETNS_CANDIDATES = ("198.51.100.0", "203.0.113.0", "198.18.251.0")


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _free_net():
    addrs = _ip("-o", "addr").stdout + _ip("route", "show", "table", "all").stdout
    for base in NETNS_CANDIDATES:
        prefix = base.rsplit(".", 1)[0] + "."
        if prefix not in addrs:
            return prefix
    pytest.skip("no free documentation /30 for a test network namespace on this host")


@pytest.fixture(scope="session")
def netns():
    """A network namespace reached over a veth pair: <net>.2 answers UDP and
    TCP port 53 and records what arrives. The addresses come from a
    documentation range no address or route of this host uses, and the
    route to them is checked to be the veth before anything is sent.
    Removed at the end, with its listener. None where network namespaces
    cannot be made."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"aw-adv-{tag}", f"awadv{tag}h", f"awadv{tag}n"
    out = f"/tmp/aw-adv-netns-{tag}.log"
    prefix = _free_net()
    host_ip, ns_ip = prefix + "1", prefix + "2"
    if not shutil.which("ip") or _ip("netns", "add", ns, check=False).returncode != 0:
        yield None       # no iproute2 or no netns here: the tests that need one skip
        return
    listener = None
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", host_ip + "/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", ns_ip + "/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        route = _ip("route", "get", ns_ip).stdout
        assert f"dev {host_if}" in route and not route.startswith("local"), route
        code = ("import socket,select,sys\n"
                "u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);u.bind((sys.argv[2],53))\n"
                "t=socket.socket();t.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
                "t.bind((sys.argv[2],53));t.listen(8)\n"
                "f=open(sys.argv[1],'a',buffering=1)\n"
                "while True:\n"
                "  r,_,_=select.select([u,t],[],[])\n"
                "  if u in r: f.write('udp %r\\n'%u.recv(4096))\n"
                "  if t in r:\n"
                "    c,_=t.accept();c.settimeout(1)\n"
                "    try: f.write('tcp %r\\n'%c.recv(4096))\n"
                "    except OSError: f.write('tcp connection\\n')\n"
                "    c.close()\n")
        listener = subprocess.Popen(["ip", "netns", "exec", ns, "/usr/bin/python3", "-I", "-c",
                                     code, out, ns_ip])
        # control: the path works from outside any sandbox
        deadline = time.monotonic() + 5
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        while time.monotonic() < deadline:
            s.sendto(b"CONTROL", (ns_ip, 53))
            time.sleep(0.1)
            if os.path.exists(out) and "CONTROL" in open(out).read():
                break
        s.close()
        assert os.path.exists(out) and "CONTROL" in open(out).read(), \
            "netns listener unreachable: the veth set-up failed"
        yield {"addr": ns_ip, "port": 53, "log": out}
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        _ip("link", "del", host_if, check=False)
        _ip("netns", "del", ns, check=False)
        if os.path.exists(out):
            os.unlink(out)


def max_alive(events):
    """Most processes of the run alive at once, from its fork and exit events."""
    alive, peak = 1, 1
    for e in events:
        if e["kind"] == "fork":
            alive += 1
            peak = max(peak, alive)
        elif e["kind"] == "exit":
            alive -= 1
    return peak
