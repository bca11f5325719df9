"""Issue #14: an enforced run's own PID, IPC, mount and network namespaces, for real.

The agent must find no process outside its run in /proc (under the strict
policy, and as a non-root run_as user), no host SysV object, no host POSIX
shared memory, no host socket in /proc/net; prlimit on a host process must
fail; its allowed loopback port still reaches the host's through the relay,
another port does not and is reported; and agentwatch's log keeps the
host's pids, ancestry and exits (a double-forked grandchild included)."""
import ctypes
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, aw, read_events

pytestmark = pytest.mark.kernel
STRICT = os.path.join(REPO, "policies", "sandboxed-agent.yaml")
NONROOT = os.path.join(REPO, "policies", "sandboxed-agent-nonroot.yaml")
NOBODY = 65534
IPC_CREAT, IPC_RMID = 0o1000, 0

libc = ctypes.CDLL(None, use_errno=True)

# what the agent runs: every readable /proc entry's command line, then the
# host process's files by its host pid, the SysV objects by key, prlimit
PROBE = r"""
import ctypes, os, resource, sys
host, shm_key, msg_key = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
pids = sorted(int(d) for d in os.listdir("/proc") if d.isdigit())
print("PIDS", pids, flush=True)
for pid in pids:
    try:
        print("CMDLINE", pid, open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" "), flush=True)
    except OSError as e:
        print("CMDLINE", pid, e.strerror, flush=True)
for entry in ("cmdline", "environ", "status", "maps"):
    try:
        print("HOST", entry, open(f"/proc/{host}/{entry}", "rb").read()[:200], flush=True)
    except OSError as e:
        print("HOST", entry, os.strerror(e.errno), flush=True)
for name, fn in (("shmget", lambda: libc.shmget(shm_key, 0, 0)), ("msgget", lambda: libc.msgget(msg_key, 0))):
    r = fn()
    print("IPC", name, "ok" if r >= 0 else os.strerror(ctypes.get_errno()), flush=True)
for name, fn in (("prlimit", lambda: resource.prlimit(host, resource.RLIMIT_NOFILE, (64, 64))),
                 ("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, host, 19)),
                 ("sched_setaffinity", lambda: os.sched_setaffinity(host, {0})),
                 ("pidfd_open", lambda: os.pidfd_open(host))):
    try:
        fn()
        print("BYPID", name, "ok", flush=True)
    except OSError as e:
        print("BYPID", name, os.strerror(e.errno), flush=True)
print("SHM", sorted(os.listdir("/dev/shm")) if os.access("/dev/shm", os.R_OK) else "unreadable", flush=True)
print("SELF", os.getpid(), os.getppid(), flush=True)
"""


@pytest.fixture
def host_objects(tmp_path):
    """A host process with a marker in its argv, a SysV segment and queue, a
    file in the host's /dev/shm: what the agent must not see."""
    marker = f"AW-HOST-MARKER-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", marker])
    key_shm, key_msg = 0x41570000 + os.getpid() % 0xFFFF, 0x41580000 + os.getpid() % 0xFFFF
    shm = libc.shmget(key_shm, 4096, IPC_CREAT | 0o666)
    msg = libc.msgget(key_msg, IPC_CREAT | 0o666)
    assert shm >= 0 and msg >= 0, os.strerror(ctypes.get_errno())
    shm_file = f"/dev/shm/aw-host-{uuid.uuid4().hex[:8]}"
    with open(shm_file, "w") as f:
        f.write(marker)
    try:
        yield {"pid": proc.pid, "marker": marker, "shm_key": key_shm, "msg_key": key_msg,
               "shm_file": os.path.basename(shm_file)}
    finally:
        proc.kill()
        proc.wait()
        libc.shmctl(shm, IPC_RMID, None)
        libc.msgctl(msg, IPC_RMID, None)
        os.unlink(shm_file)


def _run(tmp_path, policy, objs, nobody=False, script=PROBE, args=None):
    if nobody:      # pytest's own tmp tree is root's alone (0700): a tree of its own in /tmp
        tmp_path = Path(tempfile.mkdtemp(prefix="aw-ns-", dir="/tmp"))
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "tmp").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (ws / "probe.py").write_text(script)
    if nobody:
        for d in (tmp_path, home):
            os.chmod(d, 0o755)
        for d in (ws, tmp_path / "tmp"):
            os.chown(d, NOBODY, NOBODY)
    ev = tmp_path / "events.jsonl"
    try:
        r = aw("run", "--policy", policy, "--workspace", str(ws), "--allow-downgrade", "--no-daemon",
               "--events", str(ev), "--", "/usr/bin/python3", "-I", str(ws / "probe.py"),
               *map(str, args or (objs["pid"], objs["shm_key"], objs["msg_key"])), cwd=str(ws),
               env={"HOME": str(home), "TMPDIR": str(tmp_path / "tmp")})
        return r, read_events(ev)
    finally:
        if nobody:
            shutil.rmtree(tmp_path, ignore_errors=True)


def _lines(out, tag):
    return [line.split(" ", 1)[1] if " " in line else "" for line in out.splitlines()
            if line.split(" ", 1)[0] == tag]


@pytest.mark.parametrize("policy", [STRICT, NONROOT], ids=["sandboxed-agent", "run_as-nobody"])
def test_the_agent_sees_no_host_process_ipc_or_shm(state_dir, tmp_path, host_objects, policy):
    r, events = _run(tmp_path, policy, host_objects, nobody=policy == NONROOT)
    out = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    assert host_objects["marker"] not in out + r.stderr          # never reached the agent
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]["detail"]
    assert start["enforcement"]["namespaces"] == ["pid", "ipc", "net"]
    # /proc lists the run's own processes only: the agent (pid 2) and nothing of
    # the host; the run's init (pid 1, a non-dumpable copy of agentwatch) is hidden
    pids = eval(_lines(out, "PIDS")[0])                          # noqa: S307 - our own output
    assert pids == [2], out
    assert _lines(out, "SELF") == ["2 1"], out
    for entry in ("cmdline", "environ", "status", "maps"):
        assert f"{entry} No such file or directory" in _lines(out, "HOST"), out
    assert _lines(out, "IPC") == ["shmget No such file or directory", "msgget No such file or directory"]
    # every call that names a process by pid names only the run's (issue #14)
    assert _lines(out, "BYPID") == [f"{n} No such process" for n in
                                    ("prlimit", "setpriority", "sched_setaffinity", "pidfd_open")], out
    assert host_objects["shm_file"] not in out
    # the host process's limit and niceness are untouched
    with open(f"/proc/{host_objects['pid']}/limits") as f:
        assert "Max open files            64" not in f.read()
    assert os.getpriority(os.PRIO_PROCESS, host_objects["pid"]) == 0


def test_attribution_keeps_host_pids_ancestry_and_exits(state_dir, tmp_path):
    """A double-forked grandchild (orphaned, re-parented to the run's init)
    is still the run's: its exec and exit carry host pids, its ancestry ends
    at the run's root (the init), and the agent's exit status is its own."""
    ws = tmp_path / "ws"
    ws.mkdir()
    policy = tmp_path / "p.yaml"
    policy.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: ns}\n"
                      "filesystem: {read: ['/**'], write: ['" + str(ws) + "/**', '/dev/null']}\n"
                      "process: {ptrace: false}\non_violation: {default: deny}\n")
    ev = tmp_path / "events.jsonl"
    script = ("(sh -c 'sleep 0.3; /bin/cat /etc/hostname > " + str(ws) + "/gc' &) ; sleep 1; "
              "(sleep 60 &) ; "
              "sleep 5 & kill -TERM $!; wait $!; echo killed=$? > " + str(ws) + "/child; exit 7")
    r = aw("run", "--policy", str(policy), "--allow-downgrade", "--no-daemon", "--events", str(ev),
           "--", "/bin/sh", "-c", script, cwd=str(ws))
    assert r.returncode == 7, r.stderr[-3000:]
    assert (ws / "child").read_text().strip() == "killed=143"   # its own child, by its own pid
    events = read_events(ev)
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]
    root = start["detail"]["root_pid"]
    assert root > 2 and start["detail"]["enforcement"]["namespaces"] == ["pid", "ipc"]
    cat = [e for e in events if e["kind"] == "exec" and e.get("filename", e.get("path", "")).endswith("/cat")]
    assert cat, [e for e in events if e["kind"] == "exec"]
    assert cat[0]["pid"] > 2 and cat[0]["run_id"] == start["run_id"]
    assert cat[0]["ancestry"][-1] == root, cat[0]
    pids = {e["pid"] for e in events if e["kind"] in ("exec", "exit", "fork")}
    assert all(p > 2 for p in pids), pids                         # host pids, not the namespace's
    exits = [e for e in events if e["kind"] == "exit" and e["pid"] == cat[0]["pid"]]
    assert exits and exits[0]["code"] == 0, exits
    assert not [e for e in events if e["kind"] == "violation" and e["rule"] == "process.signal"]
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]
    assert end["detail"]["exit_status"] == 7
    # the orphaned sleep outlived the agent: agentwatch killed it and says so
    # (the run's init is not counted among them)
    left = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "warning"
            and "left running" in e["detail"].get("message", "")]
    assert len(left) == 1 and root not in left[0]["detail"]["killed"], left


# ---- the network namespace: host-wide /proc/net tables, and the loopback relay

# what the agent runs: the network tables it can read (every row), then the
# allowed loopback port (v4 and v6, through the relay) and one not allowed
NETPROBE = r"""
import os, socket, sys
allowed, denied = int(sys.argv[1]), int(sys.argv[2])
for path in ("/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix", "/proc/self/net/tcp",
             "/proc/self/net/tcp6", "/proc/self/net/unix", "/proc/thread-self/net/tcp"):
    try:
        rows = open(path).read().splitlines()[1:]
        print("TABLE", path, len(rows), flush=True)
        for row in rows:
            print("ROW", path, row.strip(), flush=True)
    except OSError as e:
        print("TABLE", path, os.strerror(e.errno), flush=True)
for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    try:
        s = socket.socket(family)
        s.connect((host, allowed))      # blocking: the log's connect returns 0
        s.settimeout(10)
        s.sendall(b"PING-" + host.encode())
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        print("RELAY", host, reply.decode(), flush=True)
    except OSError as e:
        print("RELAY", host, "error", os.strerror(e.errno), flush=True)
try:
    socket.create_connection(("127.0.0.1", denied), timeout=5)
    print("DENIED ok", flush=True)
except OSError as e:
    print("DENIED", os.strerror(e.errno), flush=True)
"""


class _Service:
    """A loopback service of the test's own: replies PONG:<what it got>
    to every connection on 127.0.0.1:PORT (and [::1]:PORT where it can)."""

    def __init__(self):
        self.socks = [socket.create_server(("127.0.0.1", 0))]
        self.port = self.socks[0].getsockname()[1]
        try:
            self.socks.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        except OSError:
            pass                         # no IPv6 here, or the port is taken on ::1
        self.connections = 0
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.socks]
        for t in self.threads:
            t.start()

    def _serve(self, srv):
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                data = b""
                try:
                    while True:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    conn.sendall(b"PONG:" + data)
                except OSError:
                    pass

    def close(self):
        for s in self.socks:
            s.close()


def _ports_of(row):
    """The local and remote ports of a /proc/net/tcp{,6} row."""
    f = row.split()
    return {int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)}


@pytest.fixture
def host_sockets():
    """What the agent must not see in /proc/net: a listening TCP socket on a
    loopback port of the test's own, a pathname and an abstract unix socket
    with a marker in their names; and the services it must (allowed) and
    must not (denied) reach."""
    marker = f"aw-netns-marker-{uuid.uuid4().hex[:12]}"
    tcp = socket.create_server(("127.0.0.1", 0))
    path = f"/tmp/{marker}.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + marker + "-abstract")
    abstract.listen()
    allowed, denied = _Service(), _Service()
    try:
        # control: the host's own tables list them (so their absence below means something)
        with open("/proc/net/tcp") as f:
            assert any(tcp.getsockname()[1] in _ports_of(r) for r in f.read().splitlines()[1:])
        with open("/proc/net/unix") as f:
            host_unix = f.read()
        assert path in host_unix and marker + "-abstract" in host_unix
        yield {"marker": marker, "tcp_port": tcp.getsockname()[1], "allowed": allowed,
               "denied": denied}
    finally:
        for s in (tcp, unix, abstract):
            s.close()
        os.unlink(path)
        allowed.close()
        denied.close()


def _with_port(tmp_path, base, port):
    """base, with one more loopback port (lists are appended by extends)."""
    p = tmp_path / f"{os.path.basename(base)[:-5]}-port.yaml"
    p.write_text(f"apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {{name: net}}\n"
                 f"extends: {base}\nnetwork: {{loopback: [{port}]}}\n")
    return str(p)


@pytest.mark.parametrize("policy", [STRICT, NONROOT], ids=["sandboxed-agent", "run_as-nobody"])
def test_no_host_socket_in_proc_net_and_the_allowed_loopback_port_is_relayed(
        state_dir, tmp_path, host_sockets, policy):
    hs = host_sockets
    allowed, denied = hs["allowed"], hs["denied"]
    policy_file = _with_port(tmp_path, policy, allowed.port)
    r, events = _run(tmp_path, policy_file, None, nobody=policy == NONROOT, script=NETPROBE,
                     args=(allowed.port, denied.port))
    out = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]["detail"]
    assert start["enforcement"]["namespaces"] == ["pid", "ipc", "net"]
    assert start["enforcement"]["loopback_relay"] == [18080, allowed.port]

    # every table was read (not refused), and none lists a host socket: the
    # only TCP sockets there are the relay's listeners on the allowed ports
    tables = dict(line.split(" ", 1) for line in _lines(out, "TABLE"))
    assert set(tables) == {"/proc/net/tcp", "/proc/net/tcp6", "/proc/net/unix", "/proc/self/net/tcp",
                           "/proc/self/net/tcp6", "/proc/self/net/unix", "/proc/thread-self/net/tcp"}
    assert all(n.isdigit() for n in tables.values()), tables
    assert hs["marker"] not in out + r.stderr
    rows = [line.split(" ", 1) for line in _lines(out, "ROW")]
    tcp_ports = set().union(*(_ports_of(row) for table, row in rows if "/tcp" in table))
    assert tcp_ports <= {18080, allowed.port, 0}, out
    assert hs["tcp_port"] not in tcp_ports and denied.port not in tcp_ports

    # the allowed port reaches the test's service on the host's loopback
    relay = dict(line.split(" ", 1) for line in _lines(out, "RELAY"))
    assert relay["127.0.0.1"] == "PONG:PING-127.0.0.1", out
    if len(allowed.socks) > 1:
        assert relay["::1"] == "PONG:PING-::1", out
    connects = [e for e in events if e["kind"] == "net" and e["op"] == "connect"
                and e["port"] == allowed.port and e["addr"] == "127.0.0.1"]
    assert connects and connects[0]["ret"] == 0, connects
    assert not [e for e in events if e["kind"] == "violation" and e["detail"].get("port") == allowed.port]
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]["detail"]
    counts = end["loopback_relay"]
    assert counts["connections"] == len(allowed.socks) == allowed.connections
    assert counts["bytes_to_host"] >= len(b"PING-127.0.0.1") and counts["open"] == 0

    # a port not allowed is refused in the kernel and reported, and never reached
    assert _lines(out, "DENIED") in (["Permission denied"], ["Operation not permitted"]), out
    assert denied.connections == 0
    v = [e for e in events if e["kind"] == "violation" and e["rule"] == "network.loopback"
         and e["detail"].get("port") == denied.port]
    assert v and v[0]["detail"]["addr"] == "127.0.0.1" and v[0]["detail"]["kernel"].startswith("denied"), v


def _inside(netns_fd, fn):
    """fn() in a thread that joined the run's network namespace; its result."""
    out = {}

    def body():
        assert libc.setns(netns_fd, 0x40000000) == 0, os.strerror(ctypes.get_errno())
        try:
            out["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=body)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_the_relay_is_bounded_survives_vanishing_clients_and_closes_everything(tmp_path):
    """sandbox/netns.RunNetwork itself: a namespace with only lo up; bytes
    both ways (3 MB, with a half-close); at most max_connections at once
    (the rest reset and counted); clients that vanish free their slots;
    close() ends the thread and every socket, and the port is then closed."""
    from agentwatch.sandbox.netns import RunNetwork
    service = _Service()
    port = service.port
    fds_before = len(os.listdir("/proc/self/fd"))
    net = RunNetwork([port], max_connections=4).open()
    try:
        links = _inside(net.fd, lambda: open("/proc/thread-self/net/dev").read())
        assert [line.split(":")[0].strip() for line in links.splitlines()[2:]] == ["lo"]   # up: it carries
        payload = os.urandom(3 << 20)

        def transfer():                 # the service answers once the agent's side is closed
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while True:
                d = s.recv(65536)
                if not d:
                    break
                got += d
            sender.join()
            s.close()
            return bytes(got)
        assert _inside(net.fd, transfer) == b"PONG:" + payload

        def crowd():
            held, results = [], []
            for _ in range(6):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(s)
            for s in held:
                try:
                    s.sendall(b"x")
                    s.shutdown(socket.SHUT_WR)
                    results.append(s.recv(16))
                except OSError as e:
                    results.append(e.errno)
            for s in held:
                s.close()           # vanish, with nothing said
            return results
        results = _inside(net.fd, crowd)
        assert results.count(b"PONG:x") == 4 and len(results) == 6, results
        c = net.counters()
        assert c["over_limit"] == 2 and c["connections"] == 5, c
        deadline = time.monotonic() + 5
        while net.counters()["open"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert net.counters()["open"] == 0
        assert _inside(net.fd, lambda: socket.create_connection(("127.0.0.1", port), timeout=10)
                       .sendall(b"x") or "again") == "again"   # the slots came back
        fd = os.dup(net.fd)
    finally:
        net.close()
        service.close()
    try:
        with pytest.raises(ConnectionRefusedError):
            _inside(fd, lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "aw-loopback-relay"]
    assert len(os.listdir("/proc/self/fd")) <= fds_before
