"""Private PID, IPC, mount (and network) namespaces for an enforced run, with a procfs of its own.

What the agent then sees (issue #14): no process outside its run (its /proc
is a procfs mounted for its PID namespace, `hidepid=invisible`, and
`subset=pid` unless the policy reads host-wide /proc files), no host SysV
IPC object or POSIX message queue (its own IPC namespace, its own mqueue
mount) and no host POSIX shared memory (a tmpfs of its own on /dev/shm).
A run whose policy allows no remote egress also gets a network namespace of
its own, with only lo (sandbox/netns.py, which agentwatch makes before the
fork and the child joins here): /proc/net and /proc/<pid>/net list the run's
sockets only, and its network.loopback ports are relayed to the host's.
Every call that names a process by pid (kill, prlimit, setpriority,
sched_setaffinity, process_vm_*, pidfd_open, ...) can only name a process
of the run.

How the namespaces are made, and why this way:
- PID: `unshare(CLONE_NEWPID)` changes only the *calling thread's* namespace
  for children, so the launcher calls it right before its fork and sets the
  thread back (setns to its own namespace) right after (`fork_in_new_pid_ns`).
  Other threads (the daemon serves runs in threads) never notice. The
  forked child is pid 1 of the new namespace.
- pid 1 is special: the kernel drops every signal for which pid 1 has no
  handler (SIGINT from a terminal, SIGTERM from agentwatch), and orphans are
  re-parented to it. So the agent is not pid 1: the child stays as the run's
  init (`init_loop`, comm "aw-init"), sandboxed exactly like the agent (it
  ran every set-up step itself), forks the agent, reaps every orphan, and
  writes the agent's wait status to agentwatch when the agent exits;
  agentwatch then kills what the agent left running and says so, as in a
  run without a namespace. If the init dies, the kernel kills the rest.
  agentwatch signals every process of the run's cgroup itself (Run.stop), so
  init forwards nothing; Ctrl-C reaches the agent from the terminal, whose
  foreground process group the agent is still in. The init is a forked copy
  of agentwatch that never execs, so it is non-dumpable (launcher.protect_monitor):
  hidden from the agent by hidepid (its gid= names a group nobody is in), its
  memory and environ unreadable, and not ptrace-able without CAP_SYS_PTRACE.
- IPC and mount: the child unshares both before any other set-up step, makes
  every mount private (nothing propagates back to the host) and mounts the
  new procfs, /dev/shm and /dev/mqueue (`enter`). Mounting is then refused by
  seccomp, so the agent cannot undo it.

The kernel's records keep global pids (bpf_get_current_pid_tgid and the sched
tracepoints report the initial namespace's numbers), so attribution is
unchanged. Only pids the agent *writes* (a kill() target) are its own
namespace's: the judge knows that every such pid is of the run.
"""
import ctypes
import os

from ..core.errors import KernelFeatureError
from . import devices

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_REC, MS_PRIVATE = 16384, 1 << 18
PR_SET_NAME = 15
_SYS_CLOSE_RANGE = 436

KINDS = ("pid", "ipc", "net")   # what a policy can share with the host (process.host_namespaces)
INIT_COMM = b"aw-init"

# top-level /proc entries that are not a process: reading one of them is what
# "host-wide /proc files" means (subset=pid hides them all)
HOST_WIDE_PROC = ("/proc/meminfo", "/proc/cpuinfo", "/proc/stat", "/proc/loadavg", "/proc/uptime",
                  "/proc/version", "/proc/mounts", "/proc/filesystems", "/proc/sys/kernel/ostype",
                  "/proc/kallsyms", "/proc/modules", "/proc/net/tcp")


def _err(step):
    e = ctypes.get_errno()
    return OSError(e, f"{step}: {os.strerror(e)}")


def _unshare(flags, step):
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise _err(step)


def _setns(path, nstype, step):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, ctypes.c_int(nstype)) != 0:
            raise _err(step)
    finally:
        os.close(fd)


def probe(kinds=KINDS):
    """The namespace kinds this host cannot make, each with why: {kind: reason}.
    Tried for real in the calling thread, which is then set back (cheap: no
    fork, no mount)."""
    flags = {"pid": CLONE_NEWPID, "ipc": CLONE_NEWIPC, "net": CLONE_NEWNET}
    missing = {}
    for kind in kinds:
        own = f"/proc/thread-self/ns/{'pid_for_children' if kind == 'pid' else kind}"
        if not os.path.exists(own):
            missing[kind] = "the kernel has no such namespace (/proc/*/ns)"
            continue
        saved = os.open(own, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.unshare(ctypes.c_int(flags[kind])) != 0:
                missing[kind] = f"unshare(CLONE_NEW{kind.upper()}): {os.strerror(ctypes.get_errno())}"
                continue
            if _libc.setns(saved, ctypes.c_int(flags[kind])) != 0:   # back where we were
                raise KernelFeatureError(f"could not return to agentwatch's own {kind} namespace "
                                         f"after probing: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(saved)
    return missing


def fork_in_new_pid_ns():
    """os.fork() whose child is pid 1 of a new PID namespace. Only the
    calling thread's namespace for children changes, and only for this
    fork: the parent sets it back at once (the child needs nothing: its
    namespace for children is its own already)."""
    _unshare(CLONE_NEWPID, "unshare(CLONE_NEWPID)")
    try:
        pid = os.fork()
    except BaseException:
        _restore_pid_ns()
        raise
    if pid:
        try:
            _restore_pid_ns()
        except OSError:
            os.kill(pid, 9)          # never let a run start with the thread left in its namespace
            os.waitpid(pid, 0)
            raise
    return pid


def _restore_pid_ns():
    _setns("/proc/self/ns/pid", CLONE_NEWPID, "setns back to agentwatch's PID namespace")


def _mount(src, target, fstype, flags, data=None):
    return _libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode())


# hidepid exempts the members of the mount's gid= group (root's group by
# default, which a root agent is in): name one no process has
HIDEPID_GID = 4294967294


def proc_options(subset):
    return f"hidepid=invisible,gid={HIDEPID_GID}" + (",subset=pid" if subset else "")


def enter(ipc=True, proc=None, dev=None, net_fd=None):
    """Child side, first step: a mount namespace of its own (and an IPC one),
    every mount private, then the run's procfs, /dev and IPC filesystems.
    proc: None (keep the host's /proc: the run shares its PID namespace),
    "pid" (subset=pid) or "full". dev: the devices of the run's minimal
    /dev (sandbox/devices.py), or None to keep the host's. net_fd: the
    run's network namespace (sandbox/netns.py made it), joined first and
    closed."""
    if net_fd is not None:
        try:
            if _libc.setns(net_fd, ctypes.c_int(CLONE_NEWNET)) != 0:
                raise _err("join the run's network namespace (setns)")
        finally:
            os.close(net_fd)
    _unshare(CLONE_NEWNS | (CLONE_NEWIPC if ipc else 0),
             "unshare(CLONE_NEWNS" + ("|CLONE_NEWIPC)" if ipc else ")"))
    if _mount(None, "/", None, MS_REC | MS_PRIVATE) != 0:
        raise _err("make every mount private")
    if proc:
        if _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  proc_options(proc == "pid")) != 0:
            raise _err(f"mount the run's procfs on /proc ({proc_options(proc == 'pid')})")
    if dev is not None:
        devices.mount_minimal(dev, host_ipc=not ipc)
    if ipc:
        # POSIX shared memory and semaphores are files in /dev/shm, outside the
        # IPC namespace; message queues need a mqueue mount of the new namespace
        if os.path.isdir("/dev/shm") and _mount("agentwatch-shm", "/dev/shm", "tmpfs",
                                                MS_NOSUID | MS_NODEV, "mode=1777") != 0:
            raise _err("mount a private tmpfs on /dev/shm")
        if os.path.isdir("/dev/mqueue") and _mount("mqueue", "/dev/mqueue", "mqueue",
                                                   MS_NOSUID | MS_NODEV | MS_NOEXEC) != 0:
            raise _err("mount the run's mqueue on /dev/mqueue")


def init_loop(agent, status_fd):
    """pid 1 of the run's namespace, once it forked the agent: reap every
    child; when the agent exits, write its wait status to status_fd (for
    agentwatch, which then kills what the agent left running and says so,
    as it does without a namespace), and exit once no child is left. If the
    init dies first, the kernel kills the rest of the namespace. Never returns."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(INIT_COMM), 0, 0, 0)
    # nothing of agentwatch's stays open in here (an fd its caller leaked)
    if status_fd != 3:
        os.dup2(status_fd, 3)
        status_fd = 3
    _libc.syscall(ctypes.c_long(_SYS_CLOSE_RANGE), ctypes.c_uint(4), ctypes.c_uint(0xFFFFFFFF),
                  ctypes.c_uint(0))
    code = 1
    try:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                break
            if pid == agent:
                code = os.waitstatus_to_exitcode(status)
                code = code if code >= 0 else 128 - code
                try:
                    os.write(status_fd, b"%d\n" % status)
                except OSError:
                    pass             # agentwatch is gone: the parent-death signal follows
    finally:
        os._exit(code)
