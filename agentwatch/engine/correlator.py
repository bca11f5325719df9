"""Correlator: raw sensor records -> typed events attributed to a run.

It keeps the process tree of every run (pid -> parent, cwd, exe), learnt from
fork, exec and chdir records, so a double-forked, setsid'd grandchild is still
known as the run's, with its full ancestry. Attribution itself comes from the
kernel: a record belongs to the run whose cgroup it was emitted from.
"""
import copy
import os
import time
from dataclasses import dataclass, field

from ..core import procfs
from ..core.events import ExecEvent, ExitEvent, FileEvent, ForkEvent, SyscallEvent, errno_name
from ..sensors import records as R
from ..sensors import syscalls as S

MAX_ANCESTRY = 64
LAST_FILE_MAX = 16384   # threads whose last file event is kept for repeats (the kernel folds for 8192)


@dataclass
class Proc:
    pid: int
    ppid: int
    cwd: str = None
    exe: str = None
    argv: list = None
    exited: bool = False
    launching: bool = False   # the run's root before its first exec: agentwatch's own set-up


@dataclass
class RunContext:
    run_id: str
    agent: str
    cgroup_id: int
    root_pid: int = 0
    cwd: str = "/"
    procs: dict = field(default_factory=dict)
    pending_exec: dict = field(default_factory=dict)  # tid -> exec entry record
    events: int = 0
    emit: object = None      # callable(Event): the run's sinks
    last_file: dict = field(default_factory=dict)  # tid -> (record ts, FileEvent): what a repeat repeats
    repeated: int = 0        # calls written as repeat counts
    unmatched_repeats: int = 0   # calls of repeat records whose first record was not seen
    pid_ns: bool = False     # the run has a PID namespace of its own: pids its processes write
                             # (a kill() target) are that namespace's, and name only the run's


def monotonic_to_wall():
    """Offset that turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) into Unix time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


class Correlator:
    def __init__(self, nr_to_spec):
        self.nr_to_spec = nr_to_spec
        self.runs = {}               # cgroup id -> RunContext
        self.unattributed = 0        # records from cgroups no run owns (should stay 0)
        self._offset = monotonic_to_wall()

    def add_run(self, run):
        self.runs[run.cgroup_id] = run

    def remove_run(self, run):
        self.runs.pop(run.cgroup_id, None)

    def set_root(self, run, pid, parent):
        run.root_pid = pid
        run.procs[pid] = Proc(pid=pid, ppid=parent, cwd=run.cwd, launching=True)

    # -- helpers -------------------------------------------------------------------
    def _proc(self, run, pid):
        p = run.procs.get(pid)
        if p is None:   # first sight (e.g. its fork record was lost): ask /proc
            ppid = procfs.ppid(pid) or 0
            parent = run.procs.get(ppid)
            p = run.procs[pid] = Proc(pid=pid, ppid=ppid, cwd=parent.cwd if parent else None)
        return p

    def ancestry(self, run, pid):
        chain = [pid]
        while len(chain) < MAX_ANCESTRY:
            p = run.procs.get(chain[-1])
            if p is None or chain[-1] == run.root_pid or not p.ppid:
                break
            chain.append(p.ppid)
        return chain

    def _stamp(self, ev, run, rec, proc):
        ev.ts = round(rec["ts"] / 1e9 + self._offset, 6)
        ev.run_id = run.run_id
        ev.agent = run.agent
        ev.pid = rec["pid"]
        ev.tid = rec["tid"]
        ev.uid = rec["uid"]
        ev.comm = rec["comm"]
        ev.ppid = proc.ppid
        run.events += 1
        run.emit(ev)

    def _syscall(self, run, rec, proc):
        spec = self.nr_to_spec.get(rec["nr"])
        if spec is None:
            return
        if spec.op == "exec":
            self._exec_done(run, rec, proc)
            return
        ev = S.decode(rec, spec)
        if spec.group == "file":
            self._resolve_paths(ev, spec, rec, proc)
            last = run.last_file    # most recently active thread last: the first goes when full
            last.pop(rec["tid"], None)
            last[rec["tid"]] = (rec["ts"], ev)
            if len(last) > LAST_FILE_MAX:
                del last[next(iter(last))]
        elif ev.kind == "net" and ev.family == "unix" and ev.addr and ev.addr[0] not in "@/" \
                and not ev.addr.startswith("<") and proc.cwd:
            ev.addr = os.path.join(proc.cwd, ev.addr)   # a relative socket name, as the kernel resolves it
        elif ev.kind == "signal" and ev.pidfd is not None:
            ev.target = S.pidfd_pid(rec["pid"], ev.pidfd)   # while the fd still lives
        self._stamp(ev, run, rec, proc)

    # -- records -------------------------------------------------------------------
    def handle(self, etype, rec):
        run = self.runs.get(rec["cgroup"])
        if run is None:
            self.unattributed += 1
            return
        proc = run.procs.get(rec["pid"]) or self._proc(run, rec["pid"])
        if etype == R.EV_SYSCALL:   # most records: tested first
            self._syscall(run, rec, proc)
        elif etype == R.EV_EXEC:
            run.pending_exec[rec["tid"]] = rec
        elif etype == R.EV_FORK:
            child = rec["child"]
            run.procs[child] = Proc(pid=child, ppid=rec["pid"], cwd=proc.cwd, exe=proc.exe,
                                    argv=proc.argv)
            self._stamp(ForkEvent(child=child), run, rec, proc)
        elif etype == R.EV_REPEAT:
            self._repeat(run, rec, proc)
        elif etype == R.EV_EXIT:
            run.last_file.pop(rec["tid"], None)
            self._flush_exec(run, rec["pid"])
            proc.exited = True
            code = rec["code"] if rec["code"] >= 0 else None   # BPF: status & 0xff, or -1
            self._stamp(ExitEvent(code=code, signal=rec["sig"] or None), run, rec, proc)
        elif etype == R.EV_MAPKILL:
            # the kernel saw (and, by the run's plan, killed the process at) an
            # mmap(PROT_EXEC) of a file opened outside the exec roots
            # (bpf/mapexec.bpf.c); str1: that path, absolute and clean
            ev = FileEvent(op="mmap", path=rec["str1"], abspath=rec["str1"], access=["exec"],
                           flags=rec["args"][2], ret=0)
            self._stamp(ev, run, rec, proc)
        elif etype == R.EV_NOENTRY or etype == R.EV_REFUSED:
            # NOENTRY: refused by seccomp before its entry tracepoint: a name and an
            # errno, and the arguments where the exit program could read them
            # (R.NOENTRY_ARGS). REFUSED: a call with no record of its own that
            # another layer refused (pids limit, Landlock IOCTL_DEV), with its arguments
            spec = self.nr_to_spec.get(rec["nr"])
            if spec is not None:
                refused = etype == R.EV_REFUSED
                args = list(rec["args"]) if refused or rec["extra"][0] == R.NOENTRY_ARGS else []
                ev = SyscallEvent(name=spec.name, nr=rec["nr"], args=args, ret=rec["ret"],
                                  error=errno_name(rec["ret"]), no_entry=not refused,
                                  refused=refused)
                if refused and spec.name == "ioctl":
                    try:        # the device, while the process and its fd live
                        ev.path = os.readlink(f"/proc/{rec['pid']}/fd/{args[0] & 0xFFFFFFFF}")
                    except OSError:
                        pass
                self._stamp(ev, run, rec, proc)

    def _repeat(self, run, rec, proc):
        """The kernel folded `count` calls identical to the thread's last file
        record (bpf/common.bpf.c): one line, a copy of that record's event
        with `repeat` and the last call's time. A repeat of a record not seen
        (it cannot be lost in the kernel without the count being dropped
        with it, but a record can fail to decode) is counted, not guessed."""
        last = run.last_file.get(rec["tid"])
        if last is None or last[0] != rec["orig_ts"]:
            run.unmatched_repeats += rec["count"]
            return
        ev = copy.copy(last[1])
        ev.access = list(ev.access)
        ev.prev = None
        ev.repeat = rec["count"]
        run.repeated += rec["count"]
        self._stamp(ev, run, {**rec, "ts": rec["last"]}, proc)

    def _resolve_paths(self, ev, spec, rec, proc):
        if spec.path1 is not None:
            ev.abspath = S.resolve(ev.path, proc.cwd, S.dirfd_of(spec, rec), rec["pid"])
        if spec.path2 is not None and ev.path2 and spec.op != "symlink":
            ev.path2 = S.resolve(ev.path2, proc.cwd, S.dirfd_of(spec, rec, True), rec["pid"]) or ev.path2
        if spec.op == "chdir" and rec["ret"] == 0:
            if spec.path1 is None:  # fchdir: ask /proc while the process lives
                try:
                    ev.abspath = os.readlink(f"/proc/{rec['pid']}/cwd")
                except OSError:
                    ev.abspath = None
            if ev.abspath:
                proc.cwd = ev.abspath

    def _exec_event(self, run, entry, ret, proc):
        filename = entry["filename"]
        ev = ExecEvent(filename=filename, argv=entry["argv"], argv_truncated=entry["truncated"],
                       ret=ret, error=errno_name(ret))
        resolved = S.resolve(filename, proc.cwd, S.AT_FDCWD, entry["pid"]) or filename
        if ret == 0:
            proc.exe = resolved
            proc.argv = entry["argv"]
            proc.launching = False
        ev.ancestry = self.ancestry(run, entry["pid"])
        return ev

    def _exec_done(self, run, rec, proc):
        entry = run.pending_exec.pop(rec["tid"], None)
        if entry is None:       # exec from a non-leader thread: it returns as the leader
            tid = next((t for t, e in run.pending_exec.items() if e["pid"] == rec["pid"]), None)
            entry = run.pending_exec.pop(tid, None)
        if entry is None:
            return              # entry record lost (counted by the kernel)
        ev = self._exec_event(run, entry, rec["ret"], proc)
        self._stamp(ev, run, {**rec, "ts": entry["ts"]}, proc)

    def _flush_exec(self, run, pid=None):
        """Exec entries whose return we never saw: emit them with ret unknown."""
        for tid, entry in list(run.pending_exec.items()):
            if pid is None or entry["pid"] == pid:
                del run.pending_exec[tid]
                proc = self._proc(run, entry["pid"])
                ev = self._exec_event(run, entry, None, proc)
                self._stamp(ev, run, entry, proc)

    def finish(self, run):
        self._flush_exec(run)
