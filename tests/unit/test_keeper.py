"""The keeper's logic (agentwatch/keeper.py): whether a monitor is dying,
the pipe protocol, and what it does when the monitor dies,
on plain files standing in for the cgroups (tests/kernel/test_crash.py
kills real monitors)."""
import fcntl
import json
import os
import threading
import time

import pytest

from agentwatch import keeper
from agentwatch.core import procfs
from conftest import wait_for

@pytest.fixture(autouse=True)
def short_wait(monkeypatch):
    """The stand-in cgroups never empty (no kernel kills their 'processes')."""
    monkeypatch.setattr(keeper, "EMPTY_WAIT_S", 0.05)


def test_sigkill_pending_reads_the_mask():
    assert keeper.sigkill_pending("0000000000000100")          # bit 8: signal 9
    assert not keeper.sigkill_pending("0000000000004000")      # SIGTERM only
    assert keeper.sigkill_pending("0000000000004100")


def test_monitor_exiting_on_the_real_proc():
    assert not keeper.monitor_exiting(os.getpid())             # we live
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    wait_for(lambda: procfs.status(pid, "State").startswith("Z"), what="a zombie")
    assert keeper.monitor_exiting(pid)                          # PF_EXITING stays on a zombie
    os.waitpid(pid, 0)
    assert keeper.monitor_exiting(pid)                          # gone


def test_the_protocol_takes_lines_in_any_chunks_and_skips_garbage():
    w = keeper.Watch()
    msgs = [{"op": "watch", "run_id": "a", "cgroup": "/cg/a", "record": "/r/a", "owner": "/o/a"},
            {"op": "watch", "run_id": "b", "cgroup": "/cg/b"},
            {"op": "forget", "run_id": "a"}]
    data = b"".join(json.dumps(m).encode() + b"\n" for m in msgs) + b"not json\n[1]\n{}\n"
    for i in range(0, len(data), 7):
        w.feed(data[i:i + 7])
    assert list(w.runs) == ["b"] and not w.clean_exit
    w.feed(b'{"op": "ex')
    assert not w.clean_exit                   # half a line is not a goodbye
    w.feed(b'it"}\n')
    assert w.clean_exit


def _run(tmp_path, name, status="running", procs=""):
    cg = tmp_path / "cg" / name
    cg.mkdir(parents=True)
    (cg / "cgroup.procs").write_text(procs)
    rec = tmp_path / f"{name}.json"
    rec.write_text(json.dumps({"run_id": name, "status": status}))
    owner = tmp_path / f"{name}.owner"
    owner.write_text("{}")
    return {"op": "watch", "run_id": name, "cgroup": str(cg), "record": str(rec), "owner": str(owner)}


class Monitor:
    """Stands in for monitor_exiting: alive until killed."""
    dead = False

    def __call__(self, pid):
        assert pid == 4242
        return self.dead


def _serve(fd, monitor, result):
    result.append(keeper.serve(fd, 4242, poll_s=0.01, dying=monitor))


def test_a_clean_exit_kills_nothing_and_marks_nothing(tmp_path):
    w = _run(tmp_path, "a")
    r, wfd = os.pipe()
    os.write(wfd, (json.dumps(w) + "\n" + '{"op": "exit"}\n').encode())
    os.close(wfd)
    assert keeper.serve(r, 4242, poll_s=0.01, dying=Monitor()) is None
    assert json.loads(open(w["record"]).read())["status"] == "running"
    assert not os.path.exists(os.path.join(w["cgroup"], "cgroup.kill"))


def test_eof_without_goodbye_kills_marks_and_leaves_ended_runs_alone(tmp_path):
    live, ended, forgotten = _run(tmp_path, "live", procs="11\n12\n"), _run(tmp_path, "ended", "exited"), \
        _run(tmp_path, "forgotten")
    r, wfd = os.pipe()
    os.write(wfd, "".join(json.dumps(m) + "\n" for m in (live, ended, forgotten, {
        "op": "forget", "run_id": "forgotten"})).encode())
    os.close(wfd)
    assert keeper.serve(r, 4242, poll_s=0.01, dying=Monitor()) == "its pipe closed"
    rec = json.loads(open(live["record"]).read())
    assert rec["status"] == "crashed" and rec["end_time"] == rec["crash"]["time"]
    crash = rec["crash"]
    assert crash["monitor_pid"] == 4242 and crash["keeper_pid"] == os.getpid()
    assert crash["killed"] == 2 and crash["killed_pids"] == [11, 12]
    assert open(os.path.join(live["cgroup"], "cgroup.kill")).read() == "1"
    assert json.loads(open(ended["record"]).read())["status"] == "exited"     # it ended after all
    assert json.loads(open(forgotten["record"]).read())["status"] == "running"
    assert not os.path.exists(os.path.join(forgotten["cgroup"], "cgroup.kill"))


def test_a_pending_sigkill_is_seen_before_eof_and_what_was_said_last_counts(tmp_path):
    """The pipe stays open (as while the dying monitor's perf fds close):
    the flag alone triggers the kill, after reading what is in the pipe."""
    monitor = Monitor()
    r, wfd = os.pipe()
    result = []
    t = threading.Thread(target=_serve, args=(r, monitor, result))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    w = _run(tmp_path, "a", procs="7\n")
    os.write(wfd, (json.dumps(w) + "\n").encode())
    monitor.dead = True
    t.join(5)
    assert result == ["it is dying (SIGKILL pending or PF_EXITING)"]
    assert json.loads(open(w["record"]).read())["crash"]["killed_pids"] == [7]
    # a goodbye written just before the exit is still a clean exit
    os.write(wfd, b'{"op": "exit"}\n')
    assert keeper.serve(r, 4242, poll_s=0.01, dying=monitor) is None
    os.close(wfd)
    os.close(r)


def test_an_emptied_cgroup_tree_and_its_owner_file_are_removed(tmp_path, monkeypatch):
    cg = tmp_path / "cg"
    (cg / "child" / "grandchild").mkdir(parents=True)
    owner = tmp_path / "owner"
    owner.write_text("{}")
    monkeypatch.setattr(keeper, "_kill", lambda path: None)   # a real one writes cgroup.kill
    keeper.reap({"a": {"cgroup": str(cg), "owner": str(owner)}}, 1, "test")
    assert not cg.exists() and not owner.exists()


def test_the_keeper_process_holds_only_its_pipe_and_exits_on_goodbye():
    k = keeper.Keeper()
    try:
        # only stdio once it runs (python's start-up opens files for a moment;
        # an inherited fd would stay)
        wait_for(lambda: sorted(os.listdir(f"/proc/{k.pid}/fd")) == ["0", "1", "2"],
                 timeout=10, what="the keeper to hold only 0, 1 and 2")
        assert os.getsid(k.pid) == k.pid                     # its own session: no terminal's Ctrl-C
        assert fcntl.fcntl(k._w, fcntl.F_GETFD) & fcntl.FD_CLOEXEC   # no agent inherits it
    finally:
        k.close()
    assert k.proc.returncode == 0
