"""`agentwatch daemon`: one loaded monitor that every `agentwatch run` shares.

An embedded run compiles and loads the BPF sensors itself: a second or more
of start-up and ~160 MB of resident memory per agentwatch process. The
daemon does that once; each run then costs a cgroup, a thread and its log.
`agentwatch run` uses the daemon when one answers on the socket (or, with
--daemon, insists on it) and embeds a monitor otherwise.

Protocol: AF_UNIX SOCK_SEQPACKET at <state dir>/daemon.sock (mode 0600), one
JSON object per message.
  client -> daemon
    {"op": "run", "options": {...}}   with the client's stdin, stdout and
                                      stderr attached (SCM_RIGHTS)
    {"op": "signal", "signum": N}     the client got SIGINT, SIGTERM or SIGHUP
    {"op": "status"} / {"op": "shutdown"}
  daemon -> client
    {"exit": N, "run_id": ID,         the agent's exit status (128+N: signal N),
     "summary": line}                 its run, and the summary line it printed
    {"error": message, "type": class name, "exit_code": N}
    status: {"pid", "started", "runs": [...], "sensors": {...}}
Who asks is the kernel's word (SO_PEERCRED), recorded in the run identity
as "client"; only root is served, as `agentwatch run` needs root anyway.
The agent gets the client's stdio and environment, runs in the client's
working directory, and its exit status goes back to the client. A client
that goes away (killed, crashed, its terminal closed) stops its run as
SIGHUP would.
"""
import json
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback

from . import errors, state
from .core.options import RunOptions, wire_fields
from .errors import AgentwatchError, UsageError

MAX_MSG = 1 << 20          # a run request carries the client's whole environment
START_TIMEOUT_S = 120      # `daemon start`: how long loading the sensors may take
STOP_TIMEOUT_S = 30
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
REQUEST_TIMEOUT_S = 10     # a client that connects must ask within this

# The RunOptions fields a client may set are those marked "wire"
# (agentwatch/core/options.py); paths are made absolute on its side.
_WIRE = {f.name: f for f in wire_fields()}


def socket_path():
    return os.path.join(state.state_dir(), "daemon.sock")


def _send(conn, obj, fds=()):
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.send(data)


def _recv(conn, maxfds=0):
    """One message: (obj, fds), or (None, []) at end of connection."""
    if maxfds:
        data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MSG, maxfds, socket.MSG_CMSG_CLOEXEC)
    else:
        data, fds = conn.recv(MAX_MSG), []
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        for fd in fds:
            os.close(fd)
        raise UsageError("agentwatch daemon: a message that is not a JSON object")
    return obj, fds


# -- options over the wire ---------------------------------------------------------------

def request_options(opts):
    """The client side: RunOptions, or a dict of its fields -> the request's
    "options" (paths made absolute, the working directory and the
    environment filled in)."""
    opts = dict(opts if isinstance(opts, dict) else vars(opts))
    out = {"argv": list(opts["argv"]), "cwd": os.path.abspath(opts.get("cwd") or os.getcwd()),
           "env": dict(os.environ if opts.get("env") is None else opts["env"])}
    for name, f in _WIRE.items():
        value = opts.get(name)
        if name in out or value is None:
            continue
        if f.metadata["path"]:
            value = ([os.path.abspath(p) for p in value] if f.type is list
                     else os.path.abspath(value) if value else value)
        out[name] = value
    return out


def options_from_request(raw):
    """The daemon side: a request's "options" -> RunOptions, every field
    checked (unknown, mistyped or relative paths: UsageError)."""
    if not isinstance(raw, dict):
        raise UsageError("agentwatch daemon: run request without options")
    for name, value in raw.items():
        f = _WIRE.get(name)
        if f is None:
            raise UsageError(f"agentwatch daemon: unknown run option {name!r}")
        if not isinstance(value, f.type):
            raise UsageError(f"agentwatch daemon: run option {name!r} must be a {f.type.__name__}")
    argv, env = raw.get("argv"), raw.get("env", {})
    if not argv or not all(isinstance(a, str) for a in argv):
        raise UsageError("no command given: agentwatch run [OPTIONS] -- CMD [ARG...]")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise UsageError("agentwatch daemon: the environment must map strings to strings")
    paths = []
    for name, f in _WIRE.items():
        if f.metadata["path"]:
            paths += raw.get(name, []) if f.type is list else [raw.get(name)]
    for p in paths:
        if p is not None and (not isinstance(p, str) or not os.path.isabs(p)):
            raise UsageError(f"agentwatch daemon: path {p!r} is not absolute")
    events = raw.get("events_path")
    if events and os.path.exists(events) and not os.path.isfile(events):
        # a FIFO or device would block the daemon's writes for every run
        raise UsageError(f"--events {events}: not a regular file (on the daemon, the run log "
                         "and --events must be files; 'agentwatch tail --run ID' follows a run)")
    return RunOptions(**raw)


# -- the daemon ------------------------------------------------------------------------------

class Daemon:
    """Serve runs on one Monitor until shutdown (a request, SIGTERM, SIGINT)."""

    def __init__(self, path=None, ringbuf_pages=4096, log=None):
        self.path = path or socket_path()
        self.ringbuf_pages = ringbuf_pages
        self.log = log or (lambda msg: print(f"agentwatch daemon: {msg}", file=sys.stderr, flush=True))
        self.monitor = None
        self.sock = None
        self.runs = {}               # run id -> Run
        self.threads = set()
        self.stopping = threading.Event()
        self.started = None

    def serve(self):
        from .runner import Monitor, gc
        from .sandbox import launcher
        if os.geteuid() != 0:
            raise errors.PrivilegeError("agentwatch daemon needs root (it loads BPF programs and "
                                        "creates cgroups); run it with sudo")
        if ping(self.path) is not None:
            raise UsageError(f"an agentwatch daemon already answers on {self.path}")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        swept = gc(log=self.log)
        if swept:
            self.log(f"swept {len(swept)} run(s) a crashed agentwatch left")
        t0 = time.monotonic()
        self.monitor = Monitor(ringbuf_pages=self.ringbuf_pages, map_exec=True).open()
        try:
            launcher.set_child_subreaper()
            self._listen()
            self.started = time.time()
            self.log(f"ready on {self.path} (pid {os.getpid()}): sensors loaded in "
                     f"{time.monotonic() - t0:.1f} s, {len(self.monitor.sensors.attached)} "
                     f"tracepoints")
            # Stop signals are taken by one thread that knows who sent them
            # (sigwaitinfo): an agent's SIGTERM would otherwise stop every run,
            # wherever no kernel layer refuses it (no policy, or a kernel with
            # neither Landlock's signal scope nor BPF LSM). Blocked here, before
            # the client threads exist, so that all of them inherit the mask;
            # the launcher clears it in the agent.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            threading.Thread(target=self._stop_signals, daemon=True).start()
            try:
                self._accept_loop()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        finally:
            self._shutdown()

    def _stop_signals(self):
        """Stop on SIGTERM, SIGINT or SIGHUP, unless an agent sent it."""
        while not self.stopping.is_set():
            info = signal.sigwaitinfo(STOP_SIGNALS)
            name = signal.Signals(info.si_signo).name
            try:
                self._refuse_agents(info.si_pid, f"signal {name}")
            except errors.PrivilegeError:
                continue               # refused and reported on the agent's run
            self.log(f"{name} from pid {info.si_pid}: stopping")
            self.stopping.set()

    def _listen(self):
        try:
            os.unlink(self.path)          # stale: nobody answered on it
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.settimeout(0.2)
        self.sock = sock

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                with self.monitor.lock:       # orphans re-parented to us while no run reaps
                    self.monitor.reap()
                continue
            except InterruptedError:
                continue
            conn.settimeout(REQUEST_TIMEOUT_S)
            t = threading.Thread(target=self._client, args=(conn,), daemon=True)
            self.threads.add(t)
            t.start()

    def _shutdown(self):
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        runs = list(self.runs.values())
        if runs:
            self.log(f"stopping {len(runs)} run(s)")
        for run in runs:
            run.stop(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in list(self.threads):
            t.join(max(0.1, deadline - time.monotonic()))
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        self.log("stopped")

    # -- one client ----------------------------------------------------------------------
    def _client(self, conn):
        fds, pid = [], "?"
        try:
            with conn:
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                try:
                    req, fds = _recv(conn, maxfds=3)
                    if req is None:
                        return
                    conn.settimeout(None)        # a run's connection lasts as long as the run
                    if uid != 0:
                        raise errors.PrivilegeError("agentwatch run needs root (it creates cgroups "
                                                    "and loads BPF programs); run it with sudo")
                    op = req.get("op")
                    self._refuse_agents(pid, op)
                    if op == "status":
                        _send(conn, self.status())
                    elif op == "shutdown":
                        self.log(f"shutdown asked by pid {pid}")
                        self.stopping.set()
                        _send(conn, {"ok": True, "pid": os.getpid()})
                    elif op == "run":
                        self._run(conn, req, fds, {"pid": pid, "uid": uid, "gid": gid,
                                                   "via": "agentwatch daemon"})
                    else:
                        raise UsageError(f"agentwatch daemon: unknown request {op!r}")
                except AgentwatchError as e:
                    _reply_error(conn, e)
                except OSError:
                    raise
                except Exception:
                    self.log("internal error:\n" + traceback.format_exc())
                    _reply_error(conn, AgentwatchError("internal error in the agentwatch daemon; "
                                                       "its log has the details"))
        except OSError as e:
            self.log(f"client pid {pid}: {e}")
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.threads.discard(threading.current_thread())

    def _refuse_agents(self, pid, op):
        """A process inside a run's cgroup (an agent, even one running as
        root under a permissive policy) gets nothing from the daemon: a run
        it starts would be outside its own sandbox and monitoring, a
        shutdown would stop every agent. Reported on its run."""
        from .sandbox.cgroups import run_of_pid
        run_id = run_of_pid(pid)
        if run_id is None:
            return
        self.log(f"refused {op!r} from pid {pid}, an agent of run {run_id}")
        run = self.runs.get(run_id)
        if run is not None and run.judge is not None:
            with self.monitor.lock:
                run.judge.daemon_refused(pid, str(op))
        raise errors.PrivilegeError(f"the agentwatch daemon refuses requests from agents: pid {pid} "
                                    f"runs in the cgroup of run {run_id}")

    def _run(self, conn, req, fds, client):
        from .runner import Run
        if len(fds) != 3:
            raise UsageError("agentwatch daemon: a run request carries stdin, stdout and stderr")
        if self.stopping.is_set():
            raise UsageError("the agentwatch daemon is shutting down")
        opts = options_from_request(req.get("options"))
        opts.stdio, opts.client = tuple(fds), client
        err = ClientStream(os.dup(fds[2]))
        opts.stderr = err
        run = Run(opts, monitor=self.monitor)
        self.runs[run.run_id] = run
        watcher = threading.Thread(target=self._watch_client, args=(conn, run), daemon=True)
        watcher.start()
        self.log(f"run {run.run_id}: {' '.join(opts.argv)} for pid {client['pid']}")
        t0 = time.monotonic()
        try:
            code = run.execute()
            if getattr(run, "summary", None):
                print(run.summary, file=err)
            err.close()                        # written out before the client exits
            _send(conn, {"exit": code, "run_id": run.run_id, "summary": getattr(run, "summary", None)})
            self.log(f"run {run.run_id}: exited {code} after {time.monotonic() - t0:.3f} s")
        except AgentwatchError as e:
            self.log(f"run {run.run_id}: {e}")
            raise
        except Exception:
            self.log(f"run {run.run_id}: internal error:\n" + traceback.format_exc())
            raise AgentwatchError(f"internal error in the agentwatch daemon (run {run.run_id}); "
                                  f"its log has the details") from None
        finally:
            self.runs.pop(run.run_id, None)
            try:
                conn.shutdown(socket.SHUT_RD)   # wakes the watcher (EOF) before conn closes
            except OSError:
                pass
            watcher.join(5)
            err.close()

    def _watch_client(self, conn, run):
        """Forward the client's signals to its run; its going away is SIGHUP."""
        while True:
            try:
                msg, _ = _recv(conn)
            except (OSError, AgentwatchError):
                msg = None
            if run.run_id not in self.runs:
                return                   # the run is over (its end woke us)
            if msg is None:
                if run.exit_status is None:
                    self.log(f"run {run.run_id}: the client went away: stopping the agent")
                    run.stop(signal.SIGHUP)
                return
            if msg.get("op") == "signal" and msg.get("signum") in (signal.SIGINT, signal.SIGTERM,
                                                                    signal.SIGHUP):
                run.stop(msg["signum"])

    def status(self):
        s = self.monitor.sensors
        return {"pid": os.getpid(), "started": self.started, "socket": self.path,
                "runs": [{"run_id": r.run_id, "agent": getattr(r, "agent", None),
                          "root_pid": r.record.get("root_pid"),   # once it runs in its cgroup
                          "client": r.opts.client} for r in list(self.runs.values())],
                "sensors": {"tracepoints": len(s.attached), "groups": s.groups,
                            "map_exec": s.map_exec},
                "counters": {k: v for k, v in s.counters().items() if not isinstance(v, (list, dict))}}


class ClientStream:
    """A client's stderr as the daemon's run writes it (plan lines, --show
    events, the summary): through a bounded queue to a thread of its own, so
    a slow or stopped terminal never blocks the thread that holds the
    monitor's lock (--show writes an event while the rings are read for
    every run). Lines beyond the queue are dropped, and counted at close."""

    def __init__(self, fd, max_items=20000):
        self._file = os.fdopen(fd, "w", buffering=1, errors="replace")
        self._queue = queue.Queue(max_items)
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def isatty(self):
        return self._file.isatty()

    def write(self, text):
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1
        return len(text)

    def flush(self):
        pass                  # the pump writes line by line

    def _pump(self):
        while True:
            text = self._queue.get()
            if text is None:
                return
            try:
                self._file.write(text)
            except (OSError, ValueError):
                pass          # the client's stderr is gone: nothing to tell

    def close(self, timeout=5.0):
        """Write out what is queued (waiting up to timeout), then close."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.dropped:
                self._queue.put(f"agentwatch: {self.dropped} line(s) of output dropped: "
                                "stderr did not keep up (the run log has every event)\n", timeout=timeout)
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self._file.close()
            except OSError:
                pass


def _reply_error(conn, e):
    try:
        _send(conn, {"error": str(e), "type": type(e).__name__, "exit_code": e.exit_code})
    except OSError:
        pass


# -- the client --------------------------------------------------------------------------------

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
        _send(sock, obj)
        reply, _ = _recv(sock)
    if reply is None:
        raise AgentwatchError("the agentwatch daemon closed the connection without an answer")
    if "error" in reply:
        raise _error_from(reply)
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


def _error_from(reply):
    cls = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, AgentwatchError)):
        cls = AgentwatchError
    e = cls.__new__(cls)
    Exception.__init__(e, reply.get("error", "the agentwatch daemon refused the run"))
    e.exit_code = int(reply.get("exit_code", 1))
    return e


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
    sock = _connect(path)
    if sock is None:
        if require:
            raise UsageError(f"--daemon: no agentwatch daemon answers on {path or socket_path()}; "
                             "start one with 'agentwatch daemon start'")
        return None
    stdio, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            stdio.append(fd)
        except OSError:         # closed: the agent gets /dev/null there
            opened.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
            stdio.append(opened[-1])

    def forward(signum, _frame):
        try:
            _send(sock, {"op": "signal", "signum": signum})
        except OSError:
            pass
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with sock:
            _send(sock, {"op": "run", "options": request_options(opts)}, fds=stdio)
            reply, _ = _recv(sock)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for fd in opened:
            os.close(fd)
    if reply is None:
        raise AgentwatchError("the agentwatch daemon went away during the run; its log "
                              f"({os.path.join(state.state_dir(), 'daemon.log')} when started "
                              "with 'agentwatch daemon start') says why")
    if "error" in reply:
        raise _error_from(reply)
    return dict(reply, exit=int(reply["exit"]))


def start(log_path=None, timeout=START_TIMEOUT_S, progress=None):
    """Start a daemon in the background (its output in log_path); return
    its status once it answers."""
    import subprocess
    path = socket_path()
    if ping(path) is not None:
        raise UsageError(f"an agentwatch daemon already answers on {path}")
    log_path = log_path or os.path.join(state.state_dir(), "daemon.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    # from / (holds no mount busy), importing this very agentwatch
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agentwatch.daemon"], stdin=subprocess.DEVNULL,
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


def main():
    """`python -m agentwatch.daemon`: serve in the foreground."""
    try:
        Daemon().serve()
    except AgentwatchError as e:
        print(f"agentwatch daemon: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
