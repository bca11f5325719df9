"""core.procfs: fields of /proc/<pid>/stat and status, read from live
processes (no root needed), and cgroup paths named as runs."""
import os
import shutil
import subprocess

from agentwatch.core import procfs


def test_stat_fields_survive_a_command_name_with_parentheses(tmp_path):
    odd = tmp_path / "a) (b c"
    shutil.copy("/bin/sleep", odd)
    p = subprocess.Popen([str(odd), "30"])
    try:
        assert procfs.ppid(p.pid) == os.getpid()
        assert procfs.pgid(p.pid) == os.getpgid(p.pid)
        assert procfs.start_time(p.pid) > 0
        assert procfs.comm(p.pid) == "a) (b c"
        assert procfs.tgid(p.pid) == p.pid
        assert not procfs.exiting(p.pid)
    finally:
        p.kill()
        p.wait()
    # gone: every reader answers None, exiting() says yes
    assert procfs.ppid(p.pid) is None and procfs.comm(p.pid) is None
    assert procfs.exiting(p.pid)


def test_own_process():
    me = os.getpid()
    assert procfs.ns_pid(me) == me or procfs.ns_pid(me) > 0
    assert procfs.cgroup(me).startswith("/")
    assert procfs.status(me, "NoSuchKey") is None


def test_fd_with_inode(tmp_path):
    f = tmp_path / "held"
    f.write_text("x")
    with open(f) as fh:
        assert procfs.fd_with_inode(os.getpid(), os.fstat(fh.fileno()).st_ino) == str(f)
    assert procfs.fd_with_inode(os.getpid(), 0) is None


def test_run_of_cgroup():
    assert procfs.run_of_cgroup("/agentwatch/r-123") == "r-123"
    assert procfs.run_of_cgroup("/agentwatch/r-123/agent/sub") == "r-123"
    for path in ("/agentwatch", "/agentwatch/", "/system.slice/x", "", None, "/other/agentwatch/x"):
        assert procfs.run_of_cgroup(path) is None


def test_cgroup2_mount(tmp_path):
    m = tmp_path / "mounts"
    m.write_text("proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert procfs.cgroup2_mount(str(m)) == "/sys/fs/cgroup/unified"
