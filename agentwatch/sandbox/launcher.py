"""Starts the agent: fork, wait until the monitor is ready, exec.

The child blocks on a pipe until the parent has put it in the run's cgroup
and the BPF filter knows that cgroup, so not one event of the agent's own
exec is missed. Each set-up step is named; if one fails, the child reports
the step and errno through a close-on-exec pipe and the agent never starts.

Two protections are the launcher's own: agentwatch makes itself
non-dumpable before the fork (its /proc entries then need CAP_SYS_PTRACE),
and a child that a sandbox layer put under no_new_privs (Landlock, seccomp)
drops every capability right before exec, so an agent started as root does
not keep root's powers inside the sandbox.
"""
import ctypes
import errno
import os
import resource  # noqa: F401  (imported before fork: the child must not import)
import shutil
import signal

from ..errors import LaunchError

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Signals Python changes from their defaults (SIGPIPE ignored, SIGINT raising)
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                  signal.SIGQUIT, signal.SIGXFSZ, signal.SIGCHLD)


_SYS_CLOSE_RANGE = 436
_CLOSE_RANGE_CLOEXEC = 1 << 2


def close_inherited_fds():
    """Mark every fd above stdio close-on-exec: the agent starts with 0, 1, 2
    only (an fd agentwatch or its caller leaked cannot be used to escape)."""
    if _libc.syscall(_SYS_CLOSE_RANGE, 3, ctypes.c_uint(0xFFFFFFFF), _CLOSE_RANGE_CLOEXEC) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"close_range: {os.strerror(e)}")


def no_core_dumps():
    """A sandbox kill (SIGSYS) must not leave core files in the agent's cwd."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def cap_last_cap():
    """The highest capability number this kernel knows (read by the parent:
    the sandboxed child may not be able to)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def drop_capabilities(last):
    """Child side, last step before exec: empty the bounding set (as root,
    execve would otherwise grant it all again), the ambient and inheritable
    sets, then effective and permitted. A sandboxed agent running as root
    must not keep CAP_NET_RAW (packet sockets no cgroup hook sees),
    CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH (open_by_handle_at) and the rest."""
    for cap in range(last + 1):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            e = ctypes.get_errno()
            if e != errno.EINVAL:          # a capability this kernel does not know
                raise OSError(e, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(e)}")
    _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    hdr, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if _libc.capset(ctypes.byref(hdr), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def sandboxed():
    """True once a sandbox layer (Landlock, seccomp) set no_new_privs."""
    return _libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1


def protect_monitor():
    """Parent side, before the agent exists: make agentwatch non-dumpable.
    Its /proc entries (environ, maps, fd/, mem) are then root-owned and need
    CAP_SYS_PTRACE, which a sandboxed agent no longer has; Landlock alone
    lets a sandboxed process read an unsandboxed one's environ (6.18)."""
    prctl(PR_SET_DUMPABLE, 0)


def set_child_subreaper():
    """Orphaned descendants are re-parented to us, so we reap them and see
    their exact exit status."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def resolve_command(argv, env=None):
    """Absolute path of argv[0] by PATH search; LaunchError(127) if none."""
    cmd = argv[0]
    path = (env or os.environ).get("PATH", os.defpath)
    found = cmd if "/" in cmd else shutil.which(cmd, path=path)
    if not found or not os.path.exists(found):
        raise LaunchError(f"command not found: {cmd}", exit_code=127)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise LaunchError(f"command is not executable: {found}", exit_code=126)
    return found


class Child:
    """A forked agent that has not exec'ed yet."""

    def __init__(self, pid, go_fd, err_fd):
        self.pid = pid
        self._go = go_fd
        self._err = err_fd

    def release(self):
        """Let the child exec; raise LaunchError naming the step that failed."""
        os.write(self._go, b"g")
        os.close(self._go)
        data = b""
        while True:
            chunk = os.read(self._err, 4096)
            if not chunk:
                break
            data += chunk
        os.close(self._err)
        if data:
            step, err, msg = data.decode(errors="replace").split("\0", 2)
            code = 127 if int(err) == errno.ENOENT else 126
            raise LaunchError(f"agent did not start: {step} failed: {msg}", exit_code=code)

    def abort(self):
        """Make a child that was never released exit without exec."""
        for fd in (self._go, self._err):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def spawn(argv, env=None, cwd=None, setup=()):
    """Fork a child that will exec argv once released. setup is a list of
    (step name, callable) run in the child just before exec (sandbox layers)."""
    protect_monitor()
    last_cap = cap_last_cap()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work from here on
        step = "start"
        try:
            os.close(go_w)
            os.close(err_r)
            step = "set parent-death signal"
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            step = "wait for the monitor"
            if os.read(go_r, 1) != b"g":
                os._exit(1)           # parent gone or aborted us
            os.close(go_r)
            step = "reset signals"
            for sig in _RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if cwd:
                step = f"chdir to {cwd}"
                os.chdir(cwd)
            for step, fn in setup:
                fn()
            if sandboxed():
                step = "drop capabilities"
                drop_capabilities(last_cap)
            step = f"exec {argv[0]}"
            os.execvpe(argv[0], argv, env if env is not None else os.environ)
        except BaseException as e:  # noqa: BLE001 - report anything, never return into the parent's code
            err = getattr(e, "errno", None) or 0
            try:
                os.write(err_w, f"{step}\0{err}\0{e}".encode())
            finally:
                os._exit(127 if err == errno.ENOENT else 126)
    os.close(go_r)
    os.close(err_w)
    return Child(pid, go_w, err_r)
