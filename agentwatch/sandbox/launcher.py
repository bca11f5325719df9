"""Starts the agent: fork, wait until the monitor is ready, exec.

The child blocks on a pipe until the parent has put it in the run's cgroup
and the BPF filter knows that cgroup, so not one event of the agent's own
exec is missed. Each set-up step is named; if one fails, the child reports
the step and errno through a close-on-exec pipe and the agent never starts.

One protection is the launcher's own: agentwatch makes itself non-dumpable
before the fork (its /proc entries then need CAP_SYS_PTRACE). Everything
else the child does is in its setup steps, which the runner lists
(run/enforcement.py, Enforcement.child_steps): sandbox layers, the switch to the policy's
process.run_as user, dropping every capability and verifying the result
(sandbox/credentials.py).
"""
import ctypes
import errno
import os
import resource  # noqa: F401  (imported before fork: the child must not import)
import shutil
import signal

from ..core.errors import LaunchError
from . import namespaces
from .credentials import prctl

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

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


def protect_monitor():
    """Parent side, before the agent exists: make agentwatch non-dumpable.
    Its /proc entries (environ, maps, fd/, mem) are then root-owned and need
    CAP_SYS_PTRACE, which a sandboxed agent no longer has; Landlock alone
    lets a sandboxed process read an unsandboxed one's environ (6.18)."""
    prctl(PR_SET_DUMPABLE, 0)


def set_child_subreaper(on=True):
    """Orphaned descendants are re-parented to us, so we reap them and see
    their exact exit status. Returns whether we were one before."""
    was = ctypes.c_int(0)
    _libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)
    return bool(was.value)


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
    """A forked agent that has not exec'ed yet (pid: the run's init, when
    the agent has a PID namespace of its own; status_fd: where that init
    writes the agent's wait status)."""

    def __init__(self, pid, go_fd, err_fd, status_fd=None):
        self.pid = pid
        self._go = go_fd
        self._err = err_fd
        self.status_fd = status_fd
        self._status = b""

    def agent_status(self):
        """The agent's wait status once the run's init wrote it, else None
        (always None without a PID namespace: then the child is the agent,
        and its own exit status is the agent's)."""
        if self.status_fd is None:
            return None
        try:
            chunk = os.read(self.status_fd, 64)
        except BlockingIOError:
            return None
        if not chunk:                # the init is gone without a word: its own status tells
            os.close(self.status_fd)
            self.status_fd = None
            return None
        self._status += chunk
        if not self._status.endswith(b"\n"):
            return None
        os.close(self.status_fd)
        self.status_fd = None
        return int(self._status)

    def close(self):
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None

    def release(self):
        """Let the child exec; raise LaunchError naming the step that failed."""
        try:
            os.write(self._go, b"g")
        except BrokenPipeError:
            pass    # a signal killed the child first: its exit status tells
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


def pdeath_signal(parent):
    """Child side: SIGKILL when agentwatch dies; again after a uid/gid
    switch, because a credential change clears the setting. parent: the
    pid getppid() returns while agentwatch lives (0 for pid 1 of a new PID
    namespace: its parent is outside it)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        raise OSError(errno.ESRCH, "agentwatch is gone")


def spawn(argv, env=None, cwd=None, setup=(), stdio=None, pid_ns=False):
    """Fork a child that will exec argv once released. setup is a list of
    (step name, callable) run in the child just before exec, in order
    (sandbox layers, credentials). stdio: three fds to become the child's
    0, 1, 2 (the daemon passes its client's); default: ours.

    pid_ns: the child is pid 1 of a new PID namespace: after the setup steps
    it forks the agent and stays as the run's init (sandbox/namespaces.py).
    The pid returned is the init's; a failed exec is still reported through
    the same pipe, by the agent.

    Both pipes are close-on-exec: in the daemon, another run's child forked
    meanwhile holds copies only until its own exec."""
    protect_monitor()
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    st_r, st_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK) if pid_ns else (None, None)
    parent = os.getpid()
    try:
        pid = namespaces.fork_in_new_pid_ns() if pid_ns else os.fork()
    except OSError as e:
        for fd in (go_r, go_w, err_r, err_w, st_r, st_w):
            if fd is not None:
                os.close(fd)
        raise LaunchError(f"agent did not start: {e}", exit_code=126) from None
    if pid == 0:  # child: only async-signal-safe-ish work from here on
        step = "start"
        try:
            os.close(go_w)
            os.close(err_r)
            if st_r is not None:
                os.close(st_r)
            step = "set parent-death signal"
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != (0 if pid_ns else parent):
                os._exit(1)
            # before the wait: a Ctrl-C or SIGTERM for the agent that comes
            # now must stop it, not run agentwatch's handler in this copy
            step = "reset signals"
            for sig in _RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            step = "wait for the monitor"
            if os.read(go_r, 1) != b"g":
                os._exit(1)           # parent gone or aborted us
            os.close(go_r)
            if stdio is not None:
                step = "set up stdin, stdout and stderr"
                for target, fd in enumerate(stdio):
                    os.dup2(fd, target)          # the copy is not close-on-exec
            if cwd:
                step = f"chdir to {cwd}"
                os.chdir(cwd)
            for step, fn in setup:
                fn()
            if pid_ns:
                step = "fork the agent from the run's init"
                agent = os.fork()
                if agent:
                    os.close(err_w)          # the agent's copy reports its exec
                    os.set_blocking(st_w, True)
                    namespaces.init_loop(agent, st_w)
                os.close(st_w)
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
    if st_w is not None:
        os.close(st_w)
    return Child(pid, go_w, err_r, st_r)
