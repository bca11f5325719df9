"""The daemon's wire protocol: AF_UNIX SOCK_SEQPACKET, one JSON object per
message (the package docstring lists the messages), the run options a client
may set (RunOptions fields marked "wire", agentwatch/core/options.py), and
errors carried as their class name and exit code."""
import json
import os
import signal
import socket

from ..core import errors, state
from ..core.options import RunOptions, wire_fields
from ..core.errors import AgentwatchError, UsageError

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


def send(conn, obj, fds=()):
    data = json.dumps(obj).encode()
    if fds:
        socket.send_fds(conn, [data], list(fds))
    else:
        conn.send(data)


def recv(conn, maxfds=0):
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
        number = f.type is float and isinstance(value, int) and not isinstance(value, bool)
        if not (isinstance(value, f.type) or number):
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


def reply_error(conn, e):
    try:
        send(conn, {"error": str(e), "type": type(e).__name__, "exit_code": e.exit_code})
    except OSError:
        pass


def error_from(reply):
    cls = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, AgentwatchError)):
        cls = AgentwatchError
    e = cls.__new__(cls)
    Exception.__init__(e, reply.get("error", "the agentwatch daemon refused the run"))
    e.exit_code = int(reply.get("exit_code", 1))
    return e
