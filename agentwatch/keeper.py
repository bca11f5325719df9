"""The keeper: when a monitor dies, its runs die within a fraction of a second.

A monitor (an embedded `agentwatch run`, or the daemon) can die by a signal
it cannot catch: kill -9, the OOM killer. Its runs' processes must not
outlive it, unwatched. The parent-death signal alone is not enough: it
reaches only each run's root, and only once the monitor's exit is over,
which takes ~10 s (closing its tracepoints' perf fds waits for RCU grace
periods); the agent's double-forked children survive until the next sweep.

So each monitor starts a keeper before it loads anything: this module in a
fresh interpreter (`python -I -S -c ...`: the standard library, this module,
core.procfs, core.state and sandbox.cgroups; no fd of the monitor but a pipe; in a session of its own so
a terminal's Ctrl-C does not reach it; outside every run's cgroup and PID
namespace). The monitor holds
the write end of the pipe (close-on-exec: no agent inherits it) and tells
the keeper, one JSON line each, which runs to guard:

    {"op": "watch", "run_id", "cgroup", "record", "owner"}   a run's cgroup exists
    {"op": "forget", "run_id"}                                the run is over
    {"op": "exit"}                                            the monitor ends cleanly

The monitor is dead when the pipe reads EOF without "exit", or, earlier, as
soon as /proc/PID shows SIGKILL pending or the PF_EXITING flag (checked
every POLL_S: the pipe's end may be released only after the slow perf fds). The keeper then writes
`cgroup.kill` of every run still watched (a run's PID namespace dies with
its init; the cgroup kill takes every process, whatever its namespace),
marks each run's record `crashed` with what it knows (when, the monitor's
pid, the processes it killed), removes the emptied cgroup and the run's
owner file, and exits. What it cannot do, `agentwatch gc` (and the next
`run`) still sweeps.
"""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

from .core import procfs, state
from .sandbox.cgroups import RunCgroup

SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
POLL_S = 0.1              # how often the monitor's flags are read
EMPTY_WAIT_S = 3.0        # after cgroup.kill: how long the cgroups get to empty


# -- the monitor's side ------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # this agentwatch's
MAIN = ("import sys; sys.path.insert(0, sys.argv[1]); "
        "from agentwatch.keeper import main; sys.exit(main(int(sys.argv[2])))")


class Keeper:
    """The monitor's handle on its keeper process. Every method is best
    effort: a keeper that is gone (killed) leaves the sweep as the fallback,
    it never fails a run."""

    def __init__(self):
        r, self._w = os.pipe2(os.O_CLOEXEC)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", MAIN, ROOT, str(os.getpid())],
                stdin=r, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        finally:
            os.close(r)
        self.pid = self.proc.pid
        self._lock = threading.Lock()   # one message, one write (the daemon's threads share us)

    def _send(self, **msg):
        line = (json.dumps(msg) + "\n").encode()
        with self._lock:
            if self._w is None:
                return
            try:
                os.write(self._w, line)         # under PIPE_BUF: one write, whole
            except OSError:
                pass

    def watch(self, run_id, cgroup, record, owner):
        self._send(op="watch", run_id=run_id, cgroup=cgroup, record=record, owner=owner)

    def forget(self, run_id):
        self._send(op="forget", run_id=run_id)

    def close(self):
        """The monitor ends cleanly: the keeper exits without killing anything."""
        self._send(op="exit")
        with self._lock:
            if self._w is not None:
                os.close(self._w)
                self._w = None
        try:
            self.proc.wait(5)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


# -- the keeper's side -------------------------------------------------------------------

def sigkill_pending(mask):
    """Whether a SigPnd/ShdPnd mask of /proc/PID/status holds SIGKILL."""
    return bool(int(mask, 16) & SIGKILL_BIT)


def monitor_exiting(pid):
    """True once process pid is dying: SIGKILL pending (a thread blocked in
    the kernel, e.g. on perf's global event_mutex, takes it only when it
    returns, but the kernel marks it pending on every thread at once), its
    main thread in do_exit() (PF_EXITING, also set on a zombie), or gone."""
    if procfs.exiting(pid):
        return True
    masks = [procfs.status(pid, key) for key in ("SigPnd", "ShdPnd")]
    return None in masks or any(sigkill_pending(m) for m in masks)


class Watch:
    """What the monitor told us: the runs to guard, and whether it said goodbye."""

    def __init__(self):
        self.runs = {}            # run id -> watch message
        self.clean_exit = False
        self._buf = b""

    def feed(self, data):
        """Take bytes read from the pipe; a line that does not parse is skipped."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
                op = msg["op"]
            except (ValueError, TypeError, KeyError):
                continue
            if op == "watch" and isinstance(msg.get("cgroup"), str):
                self.runs[msg["run_id"]] = msg
            elif op == "forget":
                self.runs.pop(msg.get("run_id"), None)
            elif op == "exit":
                self.clean_exit = True


def _tree(path):
    """path and every cgroup below it, deepest first."""
    out = []
    for d, _dirs, _files in os.walk(path):
        out.append(d)
    return out[::-1]


def _procs(path):
    pids = []
    for d in _tree(path):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids += [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            pass
    return pids


def _kill(path):
    """SIGKILL every process of the run's cgroup (sandbox/cgroups.py: the
    cgroup.kill file, or freeze and kill before 5.14). Never raises."""
    try:
        RunCgroup(path).kill()
    except OSError:
        pass              # gone already, or the kernel refused: gc sweeps it


def _mark_crashed(path, crash):
    rec = state.read_json(path)
    if not isinstance(rec, dict) or rec.get("status") not in ("starting", "running"):
        return                        # unreadable, or it ended after all
    rec.update(status="crashed", end_time=crash["time"], crash=crash)
    try:
        state.write_json_atomic(path, rec)
    except OSError:
        pass


def _populated(path):
    """Whether a process is still in the cgroup tree. cgroup.procs no longer
    lists one whose threads are all exiting, yet rmdir fails until it is out."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 1" in f.read()
    except OSError:
        return bool(_procs(path))


def _remove(path):
    try:
        for d in _tree(path):
            os.rmdir(d)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def reap(runs, monitor_pid, why, say=lambda msg: None):
    """The monitor died: kill every watched run, wait for its cgroups to
    empty, mark its record, remove what is empty. Returns {run id: killed pids}."""
    t0 = time.time()
    killed = {}
    for run_id, w in runs.items():
        killed[run_id] = _procs(w["cgroup"])
        _kill(w["cgroup"])
    deadline = time.monotonic() + EMPTY_WAIT_S
    while any(_populated(w["cgroup"]) for w in runs.values()) and time.monotonic() < deadline:
        time.sleep(0.005)
    emptied = round(time.time() - t0, 3)
    for run_id, w in runs.items():
        left = _procs(w["cgroup"]) if _populated(w["cgroup"]) else []
        # not removed (a process that would not die): agentwatch gc does it
        removed = not left and _remove(w["cgroup"])
        if removed and w.get("owner"):
            try:
                os.unlink(w["owner"])
            except OSError:
                pass
        if w.get("record"):           # last: a crashed record is the whole story
            _mark_crashed(w["record"], {
                "time": round(t0, 6), "monitor_pid": monitor_pid, "detected": why,
                "keeper_pid": os.getpid(), "killed": len(killed[run_id]),
                "killed_pids": killed[run_id], "emptied_in_s": None if left else emptied,
                "left": left, "cgroup_removed": removed})
        say(f"monitor pid {monitor_pid} died ({why}): run {run_id}: killed "
            f"{len(killed[run_id])} process(es)" + (f", {len(left)} still there" if left else ""))
    return killed


def serve(fd, monitor_pid, say=lambda msg: None, poll_s=POLL_S, dying=monitor_exiting):
    """Read the monitor's messages until it exits cleanly (return None) or
    dies (reap its runs; return the reason)."""
    watch = Watch()
    why = None
    while why is None:
        ready = select.select([fd], [], [], poll_s)[0]
        if ready:
            data = os.read(fd, 65536)
            if not data:
                why = "its pipe closed"
            watch.feed(data)
        if why is None and dying(monitor_pid):
            why = "it is dying (SIGKILL pending or PF_EXITING)"
            os.set_blocking(fd, False)
            try:                      # what it said last, a goodbye maybe
                while data := os.read(fd, 65536):
                    watch.feed(data)
            except BlockingIOError:
                pass
        if watch.clean_exit:
            return None
    if watch.runs:
        reap(watch.runs, monitor_pid, why, say)
    return why


def main(monitor_pid):
    """The keeper process (MAIN), the pipe on stdin."""
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)

    def say(msg):
        try:
            print(f"agentwatch keeper: {msg}", file=sys.stderr, flush=True)
        except OSError:
            pass
    serve(0, monitor_pid, say)
    return 0
