"""The daemon's client side: is one there (ping), run an agent on it with
our stdio (submit; Submission: one of several at once, from any thread),
stop it (shutdown), start one in the background (start)."""
import os
import signal
import socket
import sys
import time

from ..core import state
from ..core.errors import AgentwatchError, UsageError
from .protocol import START_TIMEOUT_S, STOP_TIMEOUT_S, error_from, recv, request_options, send, socket_path


def _connect(path=None):
    """A connection to the daemon, or None when none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path or socket_path())
    except (FileNotFoundError, ConnectionRefusedError, PermissionError):
        sock.close()
        return None
    return sock


def _ask(sock, obj):
    with sock:
        send(sock, obj)
        reply, _ = recv(sock)
    if reply is None:
        raise AgentwatchError("the agentwatch daemon closed the connection without an answer")
    if "error" in reply:
        raise error_from(reply)
    return reply


def ping(path=None):
    """The daemon's status, or None when none answers."""
    sock = _connect(path)
    if sock is None:
        return None
    try:
        return _ask(sock, {"op": "status"})
    except (OSError, AgentwatchError):
        return None


def shutdown(path=None, timeout=STOP_TIMEOUT_S + 60):
    """Ask the daemon to stop; wait until its process is gone (its runs
    ended, its programs detached). False when none was running."""
    import select
    sock = _connect(path)
    if sock is None:
        return False
    pid = _ask(sock, {"op": "shutdown"})["pid"]
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not select.select([pidfd], [], [], timeout)[0]:    # readable once it exited
            raise AgentwatchError(f"the agentwatch daemon (pid {pid}) did not stop within "
                                  f"{timeout} s; see its log")
    finally:
        os.close(pidfd)
    return True


def run_remote(opts, path=None, require=False):
    """Run the agent on the daemon: its exit status, or None when no daemon
    answers (require: that is an error). Our SIGINT, SIGTERM and SIGHUP are
    forwarded to the run."""
    reply = submit(opts, path, require)
    return None if reply is None else reply["exit"]


def submit(opts, path=None, require=False):
    """Run the agent on the daemon, with our stdin, stdout and stderr: the
    daemon's answer {"exit": N, "run_id": ..., "summary": ...}, or None
    when no daemon answers (require: that is an error). Our SIGINT,
    SIGTERM and SIGHUP are forwarded to the run."""
    sub = Submission.connect(path, require)
    if sub is None:
        return None

    def forward(signum, _frame):
        sub.signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        sub.send(opts)
        return sub.wait()
    finally:
        sub.close()
        for s, h in old.items():
            signal.signal(s, h)


class Submission:
    """One run request on its own connection, for callers that run
    several at once (a thread each) or cannot take signals (any thread but
    the main one): send(opts, stdio) returns once the request is sent;
    signal(signum) forwards a stop signal; wait() blocks for the answer.
    Closing the connection (close(), or this process dying) stops the run
    as SIGHUP would: a client that goes away stops its run."""

    def __init__(self, sock, path):
        self.sock, self.path = sock, path
        self._opened = []

    @classmethod
    def connect(cls, path=None, require=False):
        sock = _connect(path)
        if sock is None:
            if require:
                raise UsageError(f"--daemon: no agentwatch daemon answers on {path or socket_path()}; "
                                 "start one with 'agentwatch daemon start'")
            return None
        return cls(sock, path)

    def send(self, opts, stdio=None):
        """Send the run request; the agent gets stdio (three fds, default
        ours: a closed one becomes /dev/null)."""
        fds = []
        for fd in stdio or (0, 1, 2):
            try:
                os.fstat(fd)
                fds.append(fd)
            except OSError:         # closed: the agent gets /dev/null there
                self._opened.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
                fds.append(self._opened[-1])
        try:
            send(self.sock, {"op": "run", "options": request_options(opts)}, fds=fds)
        finally:
            self._close_opened()

    def signal(self, signum):
        """Forward SIGINT, SIGTERM or SIGHUP to the run (nothing once it ended)."""
        try:
            send(self.sock, {"op": "signal", "signum": int(signum)})
        except OSError:
            pass

    def wait(self):
        """The daemon's answer once the run ended, as submit() returns it."""
        try:
            reply, _ = recv(self.sock)
        finally:
            self.close()
        if reply is None:
            raise AgentwatchError("the agentwatch daemon went away during the run; its log "
                                  f"({os.path.join(state.state_dir(), 'daemon.log')} when started "
                                  "with 'agentwatch daemon start') says why")
        if "error" in reply:
            raise error_from(reply)
        return dict(reply, exit=int(reply["exit"]))

    def close(self):
        self._close_opened()
        try:
            self.sock.close()
        except OSError:
            pass

    def _close_opened(self):
        while self._opened:
            os.close(self._opened.pop())


def start(log_path=None, timeout=START_TIMEOUT_S, progress=None, gateway=None):
    """Start a daemon in the background (its output in log_path; gateway:
    an LLM gateway config file it serves its runs); return its status once
    it answers."""
    import subprocess
    path = socket_path()
    if ping(path) is not None:
        raise UsageError(f"an agentwatch daemon already answers on {path}")
    log_path = log_path or os.path.join(state.state_dir(), "daemon.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    # from / (holds no mount busy), importing this very agentwatch
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with open(log_path, "ab") as log:
        extra = ["--gateway", os.path.abspath(gateway)] if gateway else []
        proc = subprocess.Popen([sys.executable, "-m", "agentwatch.daemon", *extra], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, cwd="/", env=env)
    deadline = time.monotonic() + timeout
    while True:
        st = ping(path)
        if st is not None and st.get("pid") == proc.pid:
            return st
        if proc.poll() is not None:
            raise AgentwatchError(f"the agentwatch daemon exited ({proc.returncode}) before it "
                                  f"was ready:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise AgentwatchError(f"the agentwatch daemon was not ready within {timeout} s; "
                                  f"its log:\n{_tail(log_path)}")
        if progress:
            progress()
        time.sleep(0.2)


def _tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
