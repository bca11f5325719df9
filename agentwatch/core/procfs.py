"""What /proc says about one process: the few fields agentwatch reads.

Every reader returns None (or an empty value) when the process is gone or
the field is missing: a process can exit between any two reads, and callers
treat "gone" as an answer, not an error.

/proc/<pid>/stat is split after the last ")" because the command name in
parentheses may itself hold spaces and parentheses. Field numbers below are
those of proc(5), counted from 1.
"""

import os

from .errors import KernelFeatureError

PF_EXITING = 0x00000004   # include/linux/sched.h: the task is in do_exit()


def _stat_fields(pid):
    """Fields 3.. of /proc/<pid>/stat (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _stat_field(pid, number):
    fields = _stat_fields(pid)
    try:
        return int(fields[number - 3])
    except (TypeError, IndexError, ValueError):
        return None


def ppid(pid):
    """The parent's pid (field 4), or None."""
    return _stat_field(pid, 4)


def pgid(pid):
    """The process group (field 5), or None."""
    return _stat_field(pid, 5)


def flags(pid):
    """The kernel's task flags (field 9, PF_*), or None."""
    return _stat_field(pid, 9)


def start_time(pid):
    """Start time in clock ticks since boot (field 22), or None. With the
    pid it names one process, whatever pids get reused."""
    return _stat_field(pid, 22)


def exiting(pid):
    """True once the process is in do_exit() or gone: the kernel sets
    PF_EXITING before it releases the process's files."""
    f = flags(pid)
    return f is None or bool(f & PF_EXITING)


def status(pid, key):
    """The text of one line of /proc/<pid>/status ("Name", "Tgid", "NSpid",
    ...), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return line.partition(":")[2].strip()
    except (OSError, TypeError):
        pass
    return None


def status_int(pid, key):
    v = status(pid, key)
    return int(v) if v and v.isdigit() else None


def comm(pid):
    return status(pid, "Name")


def exe(pid):
    """The program pid runs (/proc/<pid>/exe), or None when it is gone or
    pid is none."""
    if not pid:
        return None
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def tgid(tid):
    """The process a thread id belongs to, while it lives."""
    return status_int(tid, "Tgid")


def ns_pid(pid):
    """A live process's pid in its own (innermost) PID namespace."""
    v = status(pid, "NSpid")
    last = v.split()[-1] if v else None
    return int(last) if last and last.isdigit() else None


def cgroup(pid):
    """The process's cgroup v2 path ("/agentwatch/<run>/..."), or None."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def fd_with_inode(pid, ino):
    """The path of pid's open file whose inode is ino, or None."""
    if not ino:
        return None
    d = f"/proc/{pid}/fd"
    try:
        names = os.listdir(d)
    except OSError:
        return None
    for fd in names:
        try:
            if os.stat(os.path.join(d, fd)).st_ino == ino:
                return os.readlink(os.path.join(d, fd))
        except OSError:
            continue
    return None


# -- cgroups ------------------------------------------------------------------------
RUN_CGROUP_ROOT = "agentwatch"   # runs live in <cgroup2 mount>/agentwatch/<run_id>


def cgroup2_mount(mounts="/proc/mounts"):
    """Where the cgroup v2 hierarchy is mounted (unified or hybrid hosts)."""
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1].replace("\\040", " ")
    raise KernelFeatureError("no cgroup v2 hierarchy is mounted; agentwatch needs one to "
                             "tell an agent's processes apart (see agentwatch doctor)")


def run_of_cgroup(path):
    """The run id of a cgroup v2 path ("/agentwatch/<run_id>/..."), or None."""
    parts = (path or "").strip("/").split("/")
    return parts[1] if len(parts) > 1 and parts[0] == RUN_CGROUP_ROOT and parts[1] else None
