"""Issue #4, kill at the moment of detection for what the CI kernel cannot
deny: an executable mapping of a file outside filesystem.exec (the dynamic
loader, dlopen) kills the process in the kernel at the mmap's entry
(bpf/mapexec.bpf.c), before any of the file's code runs; ordinary library
loading, and fd numbers reused after close/dup2/exec, are left alone."""
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import REPO, read_events

pytestmark = pytest.mark.kernel

TRACEFS = "/sys/kernel/tracing/events/syscalls"


def _a_library():
    """A real shared library below /usr/lib, to copy where exec is not allowed."""
    name = ctypes.util.find_library("z") or ctypes.util.find_library("m")
    for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        p = os.path.join(d, name or "")
        if name and os.path.exists(p):
            return os.path.realpath(p)
    pytest.skip("no libz or libm to copy")


@pytest.fixture
def shm_lib():
    """A readable library on an exec-capable mount outside the exec roots
    and the write paths (a directory of its own in /tmp; not /dev/shm, which
    is a private tmpfs in an enforced run), removed afterwards."""
    d = tempfile.mkdtemp(prefix="aw-mapexec-")
    lib = os.path.join(d, "libtool.so")
    shutil.copy(_a_library(), lib)
    yield lib
    shutil.rmtree(d, ignore_errors=True)


def _policy(tmp_path, exec_action="kill"):
    p = tmp_path / "mapexec.yaml"
    p.write_text(f"""apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {{name: mapexec}}
filesystem:
  read: ["/**"]
  write: ["{tmp_path}/**", "/dev/null"]
  exec: ["/usr/bin/**", "/bin/**", "/usr/lib/**"]
on_violation: {{default: alert, rules: {{filesystem.exec: {exec_action}}}}}
""")
    return p


LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def _run(tmp_path, agent, shm_lib, exec_action="kill"):
    """The agent script under _policy: argv out-file, the copied library, libc.
    Returns (completed process, events, out-file)."""
    policy = _policy(tmp_path, exec_action)
    out = tmp_path / "out.txt"
    events_path = tmp_path / "events.jsonl"
    script = tmp_path / "agent.py"
    script.write_text(agent)
    r = subprocess.run([sys.executable, "-m", "cli.main", "run", "--policy", str(policy),
                        "--allow-downgrade", "--events", str(events_path), "--",
                        "/usr/bin/python3", str(script), str(out), shm_lib, LIBC],
                       cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO),
                       capture_output=True, text=True, timeout=180)
    return r, read_events(events_path), out


_PRELUDE = """
import mmap, os, sys
out = open(sys.argv[1], "a", buffering=1)
def mapx(fd):
    m = mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
    m.close()
libc = os.open(sys.argv[3], os.O_RDONLY)
"""

# the agent: library-heavy imports, then an fd number freed by close() and
# one replaced by dup2() mapped executable (both now a library), the copy
# under a name the kernel does not judge (as engine/rules.py map_exec_sees says),
# then the copied library itself, which must be the last thing it does
AGENT = _PRELUDE + """
import ssl, json, decimal, ctypes, hashlib, sqlite3
out.write("imports\\n")
bad = os.open(sys.argv[2], os.O_RDONLY)
os.close(bad)
again = os.dup(libc)
assert again == bad, (again, bad)
mapx(again)
out.write("close\\n")
bad = os.open(sys.argv[2], os.O_RDONLY)
os.dup2(libc, bad)
mapx(bad)
out.write("dup2\\n")
unclean = sys.argv[2].replace("/libtool.so", "//libtool.so")
mapx(os.open(unclean, os.O_RDONLY))            # not judged lexically: left to the loader's argv
out.write("unclean\\n")
fd = os.open(sys.argv[2], os.O_RDONLY)
mapx(fd)
out.write("mapped the copy\\n")
"""


def test_executable_mapping_outside_the_exec_roots_is_killed_at_mmap(state_dir, tmp_path, shm_lib):
    r, events, out = _run(tmp_path, AGENT, shm_lib)
    assert r.returncode == 137, r.stderr[-3000:]
    # every benign step ran; the mapping of the copy never returned
    assert out.read_text() == "imports\nclose\ndup2\nunclean\n", r.stderr[-3000:]
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]["detail"]
    mx = start["enforcement"]["map_exec"]
    assert mx["action"] == "kill" and mx["roots"], mx
    assert os.path.dirname(shm_lib) not in "".join(mx["roots"])
    v = [e for e in events if e["kind"] == "violation" and e["rule"] == "filesystem.exec"]
    assert len(v) == 1 and v[0]["action"] == "kill", v
    d = v[0]["detail"]
    assert d["path"] == shm_lib and d["op"] == "mmap", d
    assert d["kernel"].startswith("killed at the mmap(PROT_EXEC)"), d
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]["detail"]
    assert end["killed_in_kernel"] == 1, end


# exec starts a new generation of the fd table: a mark left on a
# close-on-exec fd does not land on the new image's fd of that number
AGENT_EXEC = _PRELUDE + """
if len(sys.argv) == 4:
    keep = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
    bad = os.open(sys.argv[2], os.O_RDONLY)          # marked, close-on-exec
    out.write(f"first {bad}\\n")
    os.execv(sys.executable, [sys.executable] + sys.argv + [str(bad)])
bad = int(sys.argv[4])
while True:
    fd = os.dup(libc)
    if fd >= bad:
        break
assert fd == bad, (fd, bad)
mapx(fd)
out.write("second image mapped its own fd\\n")
"""


def test_marks_do_not_outlive_exec(state_dir, tmp_path, shm_lib):
    r, events, out = _run(tmp_path, AGENT_EXEC, shm_lib)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("first ") and text.endswith("second image mapped its own fd\n"), text
    assert not [e for e in events if e["kind"] == "violation" and e["rule"] == "filesystem.exec"]


def test_a_deny_rule_reports_the_mapping_it_cannot_refuse(state_dir, tmp_path, shm_lib):
    """filesystem.exec: deny. No hook on this kernel can refuse the mapping:
    it goes through, and the kernel's record reports it (action deny)."""
    r, events, out = _run(tmp_path, _PRELUDE + "mapx(os.open(sys.argv[2], os.O_RDONLY))\n"
                          "out.write('mapped\\n')\n", shm_lib, exec_action="deny")
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == "mapped\n"
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]["detail"]
    assert start["enforcement"]["map_exec"]["action"] == "report"
    v = [e for e in events if e["kind"] == "violation" and e["rule"] == "filesystem.exec"]
    assert len(v) == 1 and v[0]["action"] == "deny", v
    assert v[0]["detail"]["path"] == shm_lib and v[0]["detail"]["kernel"].startswith("not refused"), v
    end = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "end"][0]["detail"]
    assert end["killed_in_kernel"] == 0, end


def test_no_mmap_probe_when_the_filesystem_is_not_enforced(state_dir, tmp_path, shm_lib):
    """alert everywhere: nothing attached to mmap or close (they tax every
    process on the host), and the mapping goes through unreported."""
    r, events, out = _run(tmp_path, _PRELUDE + "mapx(os.open(sys.argv[2], os.O_RDONLY))\n"
                          "out.write('mapped\\n')\n", shm_lib, exec_action="alert")
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.read_text() == "mapped\n"
    start = [e for e in events if e["kind"] == "lifecycle" and e["phase"] == "start"][0]["detail"]
    assert start["enforcement"]["map_exec"] is None


def test_syscall_record_layout():
    """struct aw_sys_enter_args / aw_sys_exit_args (bpf/common.bpf.c) as the
    tracefs formats of this kernel lay the records out."""
    def fields(event):
        with open(os.path.join(TRACEFS, event, "format")) as f:
            out = {}
            for line in f:
                if "field:" in line and "offset:" in line:
                    name = line.split("field:")[1].split(";")[0].split()[-1]
                    out[name] = int(line.split("offset:")[1].split(";")[0])
            return out
    enter = fields("sys_enter_mmap")
    assert enter["__syscall_nr"] == 8
    assert [enter[a] for a in ("addr", "len", "prot", "flags", "fd", "off")] == [16, 24, 32, 40, 48, 56]
    assert fields("sys_enter_close")["fd"] == 16
    assert fields("sys_enter_dup2")["newfd"] == 24
    assert fields("sys_exit_openat")["ret"] == 16
