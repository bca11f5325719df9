"""Issue #14: an enforced run's own PID, IPC and mount namespaces, for real.

The agent must find no process outside its run in /proc (under the strict
policy, and as a non-root run_as user), no host SysV object, no host POSIX
shared memory; prlimit on a host process must fail; and agentwatch's log
keeps the host's pids, ancestry and exits (a double-forked grandchild
included)."""
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
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


def _run(tmp_path, policy, objs, nobody=False):
    if nobody:      # pytest's own tmp tree is root's alone (0700): a tree of its own in /tmp
        tmp_path = Path(tempfile.mkdtemp(prefix="aw-ns-", dir="/tmp"))
    ws = tmp_path / "ws"
    ws.mkdir()
    (tmp_path / "tmp").mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (ws / "probe.py").write_text(PROBE)
    if nobody:
        for d in (tmp_path, home):
            os.chmod(d, 0o755)
        for d in (ws, tmp_path / "tmp"):
            os.chown(d, NOBODY, NOBODY)
    ev = tmp_path / "events.jsonl"
    try:
        r = aw("run", "--policy", policy, "--workspace", str(ws), "--allow-downgrade", "--no-daemon",
               "--events", str(ev), "--", "/usr/bin/python3", "-I", str(ws / "probe.py"),
               str(objs["pid"]), str(objs["shm_key"]), str(objs["msg_key"]), cwd=str(ws),
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
    assert start["enforcement"]["namespaces"] == ["pid", "ipc"]
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
