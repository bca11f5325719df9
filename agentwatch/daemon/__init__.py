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

The package is transport only: `protocol` (framing, options over the wire,
errors), `server` (the Daemon: one Monitor, a thread per client) and
`client` (ping, submit, Submission, shutdown, start). A run's state is the Run's own:
the server asks it through its public names (`Run.info`, `Run.refuse_request`,
`Run.summary`, `Run.exit_status`, `Run.stop`).
"""
from .client import Submission, ping, run_remote, shutdown, start, submit
from .protocol import (MAX_MSG, START_TIMEOUT_S, STOP_TIMEOUT_S, options_from_request,
                       request_options, socket_path)
from .server import ClientStream, Daemon, main

__all__ = ["ClientStream", "Daemon", "Submission", "MAX_MSG", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "main",
           "options_from_request", "ping", "request_options", "run_remote", "shutdown",
           "socket_path", "start", "submit"]
