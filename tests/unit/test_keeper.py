"""The keeper's logic (agentwatch/keeper.py): reading a monitor's flags from
/proc/PID/stat, the pipe protocol, and what it does when the monitor dies,
on plain files standing in for /proc and the cgroups (tests/kernel/test_crash.py
kills real monitors)."""
import json
import os
import threading
import time

from agentwatch import keeper

# /proc/PID/stat of a sleeping python, with a command name that has spaces and ')'
STAT = "4242 (py ) (x) S 1 4242 4242 0 -1 {flags} 0 0 0 0 5 3 0 0 20 0 3 0 71214 0 0"


def test_stat_flags_skip_a_command_name_with_spaces_and_parentheses():
    assert keeper.stat_flags(STAT.format(flags=4194560)) == ("S", 4194560)
    assert keeper.stat_flags(STAT.format(flags=4194564).replace(" S ", " Z "))[0] == "Z"


def _stat_file(tmp_path, flags, state="S"):
    path = tmp_path / "stat"
    path.write_text(STAT.format(flags=flags).replace(" S ", f" {state} "))
    return str(path)


def test_monitor_exiting_reads_pf_exiting_zombies_and_gone(tmp_path):
    assert not keeper.monitor_exiting(1, _stat_file(tmp_path, 0x400100))
    assert keeper.monitor_exiting(1, _stat_file(tmp_path, 0x400100 | keeper.PF_EXITING))
    assert keeper.monitor_exiting(1, _stat_file(tmp_path, 0x400100, "Z"))
    assert keeper.monitor_exiting(1, str(tmp_path / "gone"))
    assert not keeper.monitor_exiting(os.getpid())          # the real /proc: we live


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


def _serve(fd, stat, result):
    result.append(keeper.serve(fd, 4242, poll_s=0.01, stat_path=stat))


def test_a_clean_exit_kills_nothing_and_marks_nothing(tmp_path):
    w = _run(tmp_path, "a")
    r, wfd = os.pipe()
    os.write(wfd, (json.dumps(w) + "\n" + '{"op": "exit"}\n').encode())
    os.close(wfd)
    assert keeper.serve(r, 4242, poll_s=0.01, stat_path=_stat_file(tmp_path, 0)) is None
    assert json.loads(open(w["record"]).read())["status"] == "running"
    assert not os.path.exists(os.path.join(w["cgroup"], "cgroup.kill"))


def test_eof_without_goodbye_kills_marks_and_leaves_ended_runs_alone(tmp_path):
    live, ended, forgotten = _run(tmp_path, "live", procs="11\n12\n"), _run(tmp_path, "ended", "exited"), \
        _run(tmp_path, "forgotten")
    r, wfd = os.pipe()
    os.write(wfd, "".join(json.dumps(m) + "\n" for m in (live, ended, forgotten, {
        "op": "forget", "run_id": "forgotten"})).encode())
    os.close(wfd)
    assert keeper.serve(r, 4242, poll_s=0.01, stat_path=_stat_file(tmp_path, 0)) == "its pipe closed"
    rec = json.loads(open(live["record"]).read())
    assert rec["status"] == "crashed" and rec["end_time"] == rec["crash"]["time"]
    crash = rec["crash"]
    assert crash["monitor_pid"] == 4242 and crash["keeper_pid"] == os.getpid()
    assert crash["killed"] == 2 and crash["killed_pids"] == [11, 12]
    assert open(os.path.join(live["cgroup"], "cgroup.kill")).read() == "1"
    assert json.loads(open(ended["record"]).read())["status"] == "exited"     # it ended after all
    assert json.loads(open(forgotten["record"]).read())["status"] == "running"
    assert not os.path.exists(os.path.join(forgotten["cgroup"], "cgroup.kill"))


def test_pf_exiting_is_seen_before_eof_and_what_was_said_last_counts(tmp_path):
    """The pipe stays open (as while the dying monitor's perf fds close):
    the flag alone triggers the kill, after reading what is in the pipe."""
    stat = _stat_file(tmp_path, 0)
    r, wfd = os.pipe()
    result = []
    t = threading.Thread(target=_serve, args=(r, stat, result))
    t.start()
    time.sleep(0.05)
    assert t.is_alive()
    w = _run(tmp_path, "a", procs="7\n")
    os.write(wfd, (json.dumps(w) + "\n").encode())
    _stat_file(tmp_path, keeper.PF_EXITING)
    t.join(5)
    assert result == ["it is exiting (PF_EXITING)"]
    assert json.loads(open(w["record"]).read())["crash"]["killed_pids"] == [7]
    # a goodbye written just before the exit is still a clean exit
    os.write(wfd, b'{"op": "exit"}\n')
    assert keeper.serve(r, 4242, poll_s=0.01, stat_path=stat) is None
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
        fds = wait_fds(k.pid)
        assert sorted(fds) == ["0", "1", "2"]
        assert os.getsid(k.pid) == k.pid                     # its own session: no terminal's Ctrl-C
        import fcntl
        assert fcntl.fcntl(k._w, fcntl.F_GETFD) & fcntl.FD_CLOEXEC   # no agent inherits it
    finally:
        k.close()
    assert k.proc.returncode == 0


def wait_fds(pid):
    deadline = time.monotonic() + 5
    while True:                      # the fds are right once the interpreter runs the script
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"keeper.py" in f.read():
                return os.listdir(f"/proc/{pid}/fd")
        assert time.monotonic() < deadline
        time.sleep(0.01)
