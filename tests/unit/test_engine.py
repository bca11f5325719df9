"""agentwatch/engine.py Correlator, fed synthetic decoded records.

Pids are above the kernel's pid_max (2**22), so the correlator's /proc look-up
for a pid it has not seen can never hit a real process of the test host.
"""
import os
import time

import pytest

from agentwatch.engine import Correlator, RunContext
from agentwatch.core.events import ExecEvent, ExitEvent, FileEvent, ForkEvent
from agentwatch.sensors import records as R
from agentwatch.sensors import syscalls as S

CGROUP = 0xC0FFEE
ROOT, CHILD, GRANDCHILD = 5_000_001, 5_000_002, 5_000_003
LAUNCHER = 5_000_000
AT_FDCWD = S.AT_FDCWD & 0xFFFFFFFFFFFFFFFF
NR_TO_SPEC = {S.syscall_number(s.name): s for s in S.SPECS}
NR = {s.name: nr for nr, s in NR_TO_SPEC.items()}


def hdr(etype, pid, tid=None, cgroup=CGROUP, ts=None):
    return {"type": etype, "pid": pid, "tid": pid if tid is None else tid, "uid": 1000,
            "ts": time.monotonic_ns() if ts is None else ts, "cgroup": cgroup, "comm": "agent"}


def fork(parent, child, **kw):
    return R.EV_FORK, dict(hdr(R.EV_FORK, parent, **kw), child=child, pad=0)


def exec_entry(pid, filename, argv, truncated=False, **kw):
    return R.EV_EXEC, dict(hdr(R.EV_EXEC, pid, **kw), argc=len(argv), truncated=truncated,
                           filename=filename, argv=list(argv))


def syscall(name, pid, args=(), ret=0, str1="", data2=b"", len2=0, extra=(0, 0), **kw):
    args = tuple(a & 0xFFFFFFFFFFFFFFFF for a in args) + (0,) * (6 - len(args))
    return R.EV_SYSCALL, dict(hdr(R.EV_SYSCALL, pid, **kw), nr=NR[name], len2=len2, ret=ret,
                              args=args, extra=extra, str1=str1,
                              data2=bytes(data2).ljust(R.STR_LEN, b"\0"))


def exit_(pid, code=0, sig=0, **kw):
    return R.EV_EXIT, dict(hdr(R.EV_EXIT, pid, **kw), code=code, sig=sig)


@pytest.fixture
def env():
    """(correlator, run, emitted events) with ROOT as the run's root process."""
    events = []
    c = Correlator(NR_TO_SPEC)
    run = RunContext(run_id="20261128-051500-abcdef", agent="coder", cgroup_id=CGROUP,
                     cwd="/work/ws", emit=events.append)
    c.add_run(run)
    c.set_root(run, ROOT, LAUNCHER)
    return c, run, events


def feed(c, *recs):
    for etype, r in recs:
        c.handle(etype, r)


def test_unknown_cgroup_is_ignored_and_counted(env):
    c, run, events = env
    feed(c, fork(ROOT, CHILD, cgroup=CGROUP + 1),
         syscall("openat", ROOT, (AT_FDCWD, 0, 0), str1="/etc/passwd", cgroup=0),
         exit_(ROOT, cgroup=1))
    assert events == []
    assert c.unattributed == 3
    assert CHILD not in run.procs
    assert run.events == 0


def test_removed_run_no_longer_attributes(env):
    c, run, events = env
    c.remove_run(run)
    feed(c, fork(ROOT, CHILD))
    assert events == [] and c.unattributed == 1


def test_process_tree_ancestry(env):
    c, run, events = env
    feed(c,
         fork(ROOT, CHILD),
         exec_entry(CHILD, "/bin/sh", ["sh", "-c", "python3 x.py"]),
         syscall("execve", CHILD),
         fork(CHILD, GRANDCHILD),
         exec_entry(GRANDCHILD, "/usr/bin/python3", ["python3", "x.py"]),
         syscall("execve", GRANDCHILD))
    forks = [e for e in events if isinstance(e, ForkEvent)]
    execs = [e for e in events if isinstance(e, ExecEvent)]
    assert [(f.pid, f.child) for f in forks] == [(ROOT, CHILD), (CHILD, GRANDCHILD)]
    assert [e.filename for e in execs] == ["/bin/sh", "/usr/bin/python3"]
    assert execs[0].ancestry == [CHILD, ROOT]
    assert execs[1].ancestry == [GRANDCHILD, CHILD, ROOT]
    assert c.ancestry(run, ROOT) == [ROOT]
    assert run.procs[GRANDCHILD].ppid == CHILD
    assert run.procs[GRANDCHILD].exe == "/usr/bin/python3"
    assert run.procs[CHILD].exe == "/bin/sh"


def test_exec_entry_and_exit_merge_into_one_event(env):
    c, run, events = env
    entry_ts = time.monotonic_ns() - 5_000_000_000
    feed(c, exec_entry(ROOT, "/usr/bin/env", ["env", "FOO=1", "make"], truncated=True, ts=entry_ts),
         syscall("execve", ROOT, ret=0))
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, ExecEvent)
    assert (ev.filename, ev.argv, ev.argv_truncated) == ("/usr/bin/env", ["env", "FOO=1", "make"], True)
    assert (ev.ret, ev.error) == (0, None)
    # stamped with the entry time (the exec happened then), converted to Unix time
    assert abs(ev.ts - (time.time() - 5)) < 1
    assert run.pending_exec == {}


def test_failed_exec_keeps_the_old_exe(env):
    c, run, events = env
    run.procs[ROOT].exe = "/bin/bash"
    feed(c, exec_entry(ROOT, "/nonexistent", ["x"]), syscall("execve", ROOT, ret=-2))
    assert (events[0].ret, events[0].error) == (-2, "ENOENT")
    assert run.procs[ROOT].exe == "/bin/bash"


def test_relative_exec_resolves_against_cwd(env):
    c, run, events = env
    feed(c, exec_entry(ROOT, "./build.sh", ["./build.sh"]), syscall("execve", ROOT))
    assert events[0].filename == "./build.sh"        # as named...
    assert run.procs[ROOT].exe == "/work/ws/build.sh"  # ...and resolved


def test_exec_from_a_thread_matches_the_leader(env):
    # A non-leader thread execs: its entry record has tid=thread, but when exec
    # returns that thread has become the leader, so the exit record has tid == pid.
    c, run, events = env
    thread = ROOT + 100
    feed(c, exec_entry(ROOT, "/bin/true", ["true"], tid=thread),
         syscall("execve", ROOT, tid=ROOT, ret=0))
    execs = [e for e in events if isinstance(e, ExecEvent)]
    assert len(execs) == 1, "exec entry of a non-leader thread was not merged with its exit"
    assert execs[0].ret == 0 and execs[0].filename == "/bin/true"
    assert run.pending_exec == {}


def test_exec_without_exit_is_flushed_by_finish(env):
    c, run, events = env
    feed(c, exec_entry(ROOT, "/bin/sleep", ["sleep", "1"]))
    assert events == []
    c.finish(run)
    assert len(events) == 1
    ev = events[0]
    assert isinstance(ev, ExecEvent)
    assert ev.ret is None and ev.error is None
    assert ev.argv == ["sleep", "1"] and ev.ancestry == [ROOT]
    assert run.pending_exec == {}


def test_exit_flushes_its_own_pending_exec_first(env):
    c, run, events = env
    feed(c, fork(ROOT, CHILD), exec_entry(CHILD, "/bin/a", ["a"]), exec_entry(ROOT, "/bin/b", ["b"]),
         exit_(CHILD, code=1))
    kinds = [(type(e).__name__, e.pid) for e in events]
    assert kinds == [("ForkEvent", ROOT), ("ExecEvent", CHILD), ("ExitEvent", CHILD)]
    assert list(run.pending_exec) == [ROOT]     # the root's exec is still waiting


def test_chdir_updates_cwd_for_relative_paths(env):
    c, run, events = env
    feed(c, syscall("chdir", ROOT, str1="/tmp/work", ret=0),
         syscall("openat", ROOT, (AT_FDCWD, 0, os.O_RDONLY), str1="a.txt", ret=3),
         syscall("chdir", ROOT, str1="sub", ret=0),
         syscall("openat", ROOT, (AT_FDCWD, 0, os.O_RDONLY), str1="../b.txt", ret=3),
         syscall("chdir", ROOT, str1="/missing", ret=-2),             # failed: no change
         syscall("openat", ROOT, (AT_FDCWD, 0, os.O_RDONLY), str1="c.txt", ret=3))
    opens = [e for e in events if isinstance(e, FileEvent) and e.op == "open"]
    assert [e.abspath for e in opens] == ["/tmp/work/a.txt", "/tmp/work/b.txt", "/tmp/work/sub/c.txt"]
    assert run.procs[ROOT].cwd == "/tmp/work/sub"


def test_child_inherits_cwd_at_fork_only(env):
    c, run, events = env
    feed(c, syscall("chdir", ROOT, str1="/srv", ret=0),
         fork(ROOT, CHILD),
         syscall("chdir", ROOT, str1="/elsewhere", ret=0),
         syscall("openat", CHILD, (AT_FDCWD, 0, 0), str1="data", ret=3))
    assert events[-1].abspath == "/srv/data"


def test_root_starts_in_the_run_cwd(env):
    c, run, events = env
    feed(c, syscall("unlinkat", ROOT, (AT_FDCWD, 0, 0), str1="old.log"),
         syscall("rename", ROOT, (0, 0), str1="a", data2=b"b\0"))
    assert events[0].abspath == "/work/ws/old.log"
    assert (events[1].abspath, events[1].path2) == ("/work/ws/a", "/work/ws/b")


def test_every_event_carries_run_identity(env):
    c, run, events = env
    feed(c, fork(ROOT, CHILD),
         exec_entry(CHILD, "/bin/ls", ["ls"]), syscall("execve", CHILD),
         syscall("openat", CHILD, (AT_FDCWD, 0, 0), str1="f", ret=3),
         syscall("connect", CHILD, (3, 0, 16), data2=b"\x02\x00\x01\xbb\x01\x02\x03\x04", len2=8),
         syscall("ptrace", CHILD, (0,), ret=-1),
         exit_(CHILD, code=0))
    assert [e.kind for e in events] == ["fork", "exec", "file", "net", "syscall", "exit"]
    for e in events:
        assert e.run_id == run.run_id and e.agent == "coder"
        assert e.uid == 1000 and e.comm == "agent"
        assert e.ts > 1e9
    assert events[0].ppid == LAUNCHER          # the root's parent
    assert all(e.ppid == ROOT and e.pid == CHILD for e in events[1:])
    assert run.events == len(events)
    assert (events[3].addr, events[3].port) == ("1.2.3.4", 443)


def test_unwatched_syscall_number_is_dropped(env):
    c, run, events = env
    r = syscall("openat", ROOT)[1]
    r["nr"] = 511 if 511 not in NR_TO_SPEC else 510
    c.handle(R.EV_SYSCALL, r)
    assert events == [] and c.unattributed == 0


@pytest.mark.parametrize("code, expected", [(0, 0), (3, 3), (254, 254), (255, 255), (-1, None)])
def test_exit_code(env, code, expected):
    # The exit record carries what wait() reports, status & 0xff (masked in
    # process.bpf.c), or -1 when the process never called exit_group().
    c, run, events = env
    feed(c, exit_(ROOT, code=code))
    assert isinstance(events[0], ExitEvent)
    assert events[0].code == expected


def test_exit_signal(env):
    c, run, events = env
    feed(c, exit_(ROOT, code=-1, sig=9), exit_(ROOT, code=0, sig=0))
    assert (events[0].code, events[0].signal) == (None, 9)
    assert (events[1].code, events[1].signal) == (0, None)


def test_first_sight_of_unknown_pid(env):
    # fork record lost: the pid is learnt on first sight with no known parent
    c, run, events = env
    stranger = 5_000_099
    feed(c, syscall("openat", stranger, (AT_FDCWD, 0, 0), str1="/abs/path", ret=3))
    assert run.procs[stranger].ppid == 0
    assert events[0].abspath == "/abs/path" and events[0].ppid == 0
    assert c.ancestry(run, stranger) == [stranger]


def test_unix_socket_names_resolve_against_the_cwd(env):
    """connect() by a relative socket name reaches cwd/name; abstract and
    absolute names are kept as written."""
    c, run, events = env
    sa = lambda name: b"\x01\x00" + name            # noqa: E731  AF_UNIX + sun_path
    feed(c, syscall("chdir", ROOT, str1="/srv/run", ret=0),
         syscall("connect", ROOT, (3, 0, 4), data2=sa(b"s\0"), len2=4),
         syscall("connect", ROOT, (3, 0, 17), data2=sa(b"/run/docker.sock\0"), len2=19),
         syscall("connect", ROOT, (3, 0, 6), data2=sa(b"\0agent"), len2=8))
    nets = [e for e in events if e.kind == "net"]
    assert [e.addr for e in nets] == ["/srv/run/s", "/run/docker.sock", "@agent"]


# ---- repeats (bpf/common.bpf.c folds identical calls into a count) -------------

def repeat(pid, orig_ts, count, last, tid=None, nr="openat", **kw):
    return R.EV_REPEAT, dict(hdr(R.EV_REPEAT, pid, tid=tid, **kw), nr=NR[nr], count=count,
                             orig_ts=orig_ts, first=orig_ts + 1, last=last)


def test_a_repeat_is_a_copy_of_the_threads_last_file_event_with_its_count(env):
    c, run, events = env
    feed(c, syscall("openat", ROOT, (AT_FDCWD, 0, 0o1), ret=3, str1="/tmp/x", ts=1_000),
         repeat(ROOT, 1_000, 41, last=9_000_000_000, ts=9_000_000_500))
    first, rep = events
    assert first.repeat is None and rep.repeat == 41
    assert rep is not first and rep.access == first.access and rep.access is not first.access
    assert (rep.op, rep.path, rep.abspath, rep.flags, rep.ret) == (first.op, first.path, first.abspath,
                                                                   first.flags, first.ret)
    assert rep.ts - first.ts == pytest.approx(9.0, abs=1e-5)   # the last call's time
    assert (run.events, run.repeated, run.unmatched_repeats) == (2, 41, 0)
    # a second count of the same run of calls repeats the same first record
    feed(c, repeat(ROOT, 1_000, 5, last=10_000_000_000))
    assert events[-1].repeat == 5 and events[-1].path == "/tmp/x" and run.repeated == 46


def test_a_repeat_of_a_record_not_seen_is_counted_not_guessed(env):
    c, run, events = env
    feed(c, syscall("openat", ROOT, (AT_FDCWD, 0, 0), ret=3, str1="/etc/a", ts=1_000),
         repeat(ROOT, 999, 7, last=2_000),                                      # another record's
         repeat(CHILD, 1_000, 3, last=2_000, tid=CHILD),                        # another thread
         syscall("openat", ROOT, (AT_FDCWD, 0, 0), ret=3, str1="/etc/b", ts=1_500),
         repeat(ROOT, 1_000, 2, last=2_000))                                    # not the last one
    assert [e.path for e in events] == ["/etc/a", "/etc/b"]
    assert (run.repeated, run.unmatched_repeats) == (0, 12)


def test_the_kept_event_goes_with_the_thread_and_the_oldest_first(env, monkeypatch):
    from agentwatch.engine import correlator
    c, run, events = env
    feed(c, syscall("openat", ROOT, (AT_FDCWD, 0, 0), ret=3, str1="/etc/a", ts=1_000), exit_(ROOT))
    assert run.last_file == {}
    monkeypatch.setattr(correlator, "LAST_FILE_MAX", 2)
    for tid, ts in ((1, 10), (2, 20), (1, 30), (3, 40)):     # 1 was active after 2: 2 goes
        feed(c, syscall("openat", CHILD, (AT_FDCWD, 0, 0), ret=3, str1="/etc/a", tid=tid, ts=ts))
    assert list(run.last_file) == [1, 3]
