"""The one event schema: typed dataclasses and their JSON Lines codec.

Every event is one JSON object with at least ``kind``, ``ts`` (Unix time in
seconds), ``run_id``, ``agent`` and ``pid``. The full identity of a run
(policy digest, start time, uid, signer, ...) is the ``identity`` of its
``lifecycle``/``start`` event and of ``run.json`` in the run's state
directory; ``run_id`` is the key to it.
"""
import errno as _errno
import json
from dataclasses import dataclass, field, fields
from json.encoder import encode_basestring_ascii as _escape

KINDS = ("exec", "fork", "exit", "file", "net", "flow", "llm", "msg", "syscall", "signal",
         "violation", "lifecycle")
# a violation's category and action: a contract other tools rely on (docs/policy.md
# "Rules" lists the categories, "On violation" the actions, which the policy's
# on_violation takes); tests/unit/test_events.py checks every one the code writes
CATEGORIES = ("filesystem", "network", "process", "syscall", "resource", "identity", "protocol")
ACTIONS = ("alert", "deny", "kill")


def errno_name(ret):
    """-13 -> 'EACCES'; None for success (ret >= 0)."""
    if ret is None or ret >= 0:
        return None
    return _errno.errorcode.get(-ret, f"E{-ret}")


@dataclass(kw_only=True)
class Event:
    kind: str = ""
    ts: float = 0.0
    run_id: str = ""
    agent: str = ""
    pid: int = 0
    tid: int = 0
    ppid: int = 0
    uid: int = 0
    comm: str = ""
    prev: str = None      # sha256 of the previous line of the run's log (tamper evidence)

    def to_dict(self):
        return dict(self.__dict__)

    def to_json(self):
        # ASCII escapes keep paths that are not valid UTF-8 (decoded with
        # surrogateescape) exact and the line valid JSON
        writer = _WRITERS.get(self.__class__) or _make_writer(self.__class__)
        return writer(self.__dict__)


@dataclass(kw_only=True)
class ExecEvent(Event):
    kind: str = "exec"
    filename: str = ""
    argv: list = field(default_factory=list)
    argv_truncated: bool = False
    ret: int = 0
    error: str = None
    ancestry: list = field(default_factory=list)  # [pid, parent, ..., run's root pid]


@dataclass(kw_only=True)
class ForkEvent(Event):
    kind: str = "fork"
    child: int = 0


@dataclass(kw_only=True)
class ExitEvent(Event):
    kind: str = "exit"
    code: int = None      # exit status when the process called exit_group()
    signal: int = None    # fatal signal when one was seen delivered


@dataclass(kw_only=True)
class FileEvent(Event):
    kind: str = "file"
    # open, unlink, rename, mkdir, rmdir, chmod, chown, truncate, link, symlink, chdir;
    # mmap: an executable mapping the kernel killed the process at (flags: its prot)
    op: str = ""
    path: str = ""        # as the process named it
    abspath: str = None   # resolved against its cwd or dirfd, when known
    path2: str = None     # rename/link/symlink second path
    access: list = field(default_factory=list)  # open: read / write / create / truncate
    flags: int = 0
    mode: int = None
    ret: int = 0
    error: str = None
    # this line stands for `repeat` more calls by the thread identical to its
    # previous file line (same op, absolute path, flags and result), folded in
    # the kernel; ts is the last one's (bpf/common.bpf.c, "Repeats")
    repeat: int = None


@dataclass(kw_only=True)
class NetEvent(Event):
    kind: str = "net"
    op: str = ""          # socket, connect, bind, sendto, sendmsg
    family: str = None    # inet, inet6, unix, netlink, packet, ...
    addr: str = None      # IP address or unix path ("@name" for abstract)
    port: int = None
    sock_type: str = None  # socket(): stream, dgram, raw, ...
    protocol: int = None
    ret: int = 0
    error: str = None


@dataclass(kw_only=True)
class FlowEvent(Event):
    """One flow through the egress guard (guards/guard.py), at its end: a
    TCP connection the kernel redirected to the guard's proxy, or one DNS
    query to its responder. pid, uid and comm are the kernel's, from the
    connect; the name is what the flow's own bytes said."""
    kind: str = "flow"
    proto: str = "tcp"       # tcp | dns
    name: str = None         # TLS SNI, HTTP Host, CONNECT host, or the DNS question
    source: str = None       # where the name came from: sni, host, connect (dns: question)
    family: str = None       # as the agent's connect() named it
    addr: str = None         # the original destination, as the agent named it
    port: int = None
    decision: str = ""       # allow | deny | error | closed (dns: also unsupported, malformed)
    reason: str = None
    rule: str = None         # network.domain when denied
    pattern: str = None      # the domain rule that allowed it
    upstream: str = None     # addr:port the guard connected to
    dns: dict = None         # the answer behind the address: {name, by, addresses | answered_at}
    qtype: str = None        # dns: A, AAAA, TXT, ...
    addresses: list = None   # dns: what was handed out
    exe: str = None
    bytes_out: int = 0       # agent -> upstream
    bytes_in: int = 0        # upstream -> agent
    duration: float = None   # seconds


@dataclass(kw_only=True)
class LlmEvent(Event):
    """One call to the LLM gateway (agentwatch/harness/gateway.py), at its
    end. The caller's run is the kernel's (its socket's cgroup), never what
    the request said; pid is 0 (a TCP peer names a cgroup, not a process)."""
    kind: str = "llm"
    api: str = None          # openai | anthropic
    path: str = None         # /v1/chat/completions, /v1/messages, ...
    model: str = None        # as the agent asked
    upstream: str = None     # the upstream's name in the gateway config
    upstream_model: str = None
    stream: bool = False
    status: int = None       # the HTTP status the agent got
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_counted: bool = False   # usage missing: tokens estimated from the text
    queue_wait: float = None  # seconds waiting for the scheduler's grant
    latency: float = None    # seconds, request to last byte
    bytes_in: int = 0        # agent -> gateway (request body)
    bytes_out: int = 0       # gateway -> agent (response body)
    error: str = None
    finding: dict = None     # {category, rule, reason}: what the gateway found wrong (judged)
    bodies: dict = None      # keep_bodies: {request_body, response_body, *_truncated}, size-capped


@dataclass(kw_only=True)
class MsgEvent(Event):
    """One request to the agent-to-agent broker (agentwatch/harness/broker.py),
    on the run that made it (op "send", "mint", "call_tool", ...) or that
    got a message (op "receive"). The run is the kernel's (the socket
    peer's cgroup), never what the request said."""
    kind: str = "msg"
    op: str = None           # send | receive | forward | cancel | mint | attenuate | call_tool | ...
    method: str = None       # the JSON-RPC method (SendMessage, agentwatch.CallTool, ...)
    peer: str = None         # the other agent (recipient, sender, holder, granter)
    peer_run: str = None
    message_id: str = None
    task_id: str = None
    context_id: str = None
    facts_digest: str = None  # sha256 over the RFC 8785 form of the message's fact parts
    parts: int = None
    tags: list = None        # the message's metadata.tag and its parts' (fact, context, ...)
    bytes: int = None
    token: str = None        # the scope token's id (jti), never the token itself
    tool: str = None
    args: list = None
    exit_code: int = None    # a tool call's
    status: str = "ok"       # ok | refused | error
    error: str = None
    finding: dict = None     # {category, rule, reason, ...}: what the broker refused (judged)


@dataclass(kw_only=True)
class SyscallEvent(Event):
    kind: str = "syscall"
    name: str = ""
    nr: int = 0
    args: list = field(default_factory=list)
    path: str = None      # a string argument when the syscall has one (mount source, memfd name, ...)
    ret: int = 0
    error: str = None
    # True: refused before its entry tracepoint ran (seccomp errno); args only as read at exit
    no_entry: bool = False
    # True: a call with no record of its own returned an errno another sandbox
    # layer gives (EAGAIN of a fork at the pids limit, EACCES of a device ioctl)
    refused: bool = False


@dataclass(kw_only=True)
class SignalEvent(Event):
    """kill, tkill, tgkill, pidfd_send_signal, rt_sigqueueinfo, rt_tgsigqueueinfo."""
    kind: str = "signal"
    op: str = ""              # the syscall
    target: int = None        # kill's pid as passed: > 0 a process, 0 own group, -1 all, < -1 a group
    target_tid: int = None    # tkill/tgkill/rt_tgsigqueueinfo: the thread
    pidfd: int = None         # pidfd_send_signal: the fd (target: its pid, when it could be read)
    signal: int = 0
    signal_name: str = None
    ret: int = 0
    error: str = None


@dataclass(kw_only=True)
class ViolationEvent(Event):
    kind: str = "violation"
    category: str = ""
    rule: str = ""
    action: str = "alert"
    detail: dict = field(default_factory=dict)
    count: int = 1


@dataclass(kw_only=True)
class LifecycleEvent(Event):
    kind: str = "lifecycle"
    phase: str = ""       # start, end, drops, warning
    detail: dict = field(default_factory=dict)


EVENT_TYPES = {cls.kind: cls for cls in (ExecEvent, ForkEvent, ExitEvent, FileEvent, NetEvent,
                                         FlowEvent, LlmEvent, MsgEvent, SyscallEvent, SignalEvent, ViolationEvent,
                                         LifecycleEvent)}
_FIELDS = {kind: {f.name for f in fields(cls)} for kind, cls in EVENT_TYPES.items()}


def _dumps(d):
    return json.dumps(d, separators=(",", ":"))


try:   # json's C encoder, made once (json.dumps makes one per call)
    from _json import make_encoder as _make_encoder
    _encoder = _make_encoder(None, json.JSONEncoder().default, _escape, None, ":", ",",
                             False, False, True)

    def _value(v):
        return "".join(_encoder(v, 0))
except ImportError:    # pragma: no cover - CPython always has _json
    _value = _dumps


_WRITERS = {}   # Event class -> its to_json writer


def _make_writer(cls):
    """Event.to_json for one class: what _dumps(ev.__dict__) writes, byte
    for byte, in about half the time (it is on the per-event path). The
    line is the class's fields in declaration order (the order __init__
    fills __dict__), each as constant key text and its value: str, None,
    int and finite float written inline, anything else (bool, lists, dicts,
    subclasses, NaN) by json's C encoder. A __dict__ with other keys than
    the fields (an attribute added after __init__) is written by json.dumps."""
    names = [f.name for f in fields(cls)]
    terms = []
    for i, name in enumerate(names):
        terms.append(repr(("{" if i == 0 else ",") + json.dumps(name) + ":"))
        v = f"v{i}"
        terms.append(f"(_escape({v}) if {v}.__class__ is str else 'null' if {v} is None else "
                     f"_int({v}) if {v}.__class__ is int else "
                     f"_float({v}) if {v}.__class__ is float and {v} - {v} == 0.0 else _value({v}))")
    src = (f"def writer(d):\n"
           f"    if len(d) != {len(names)}:\n"
           f"        return _dumps(d)\n"
           f"    try:\n"
           + "".join(f"        v{i} = d[{name!r}]\n" for i, name in enumerate(names))
           + f"    except KeyError:\n"
           f"        return _dumps(d)\n"
           f"    return ''.join(({', '.join(terms)}, '}}'))\n")
    scope = {"_escape": _escape, "_dumps": _dumps, "_value": _value, "_int": int.__repr__,
             "_float": float.__repr__}
    exec(compile(src, f"<to_json of {cls.__name__}>", "exec"), scope)
    _WRITERS[cls] = scope["writer"]
    return scope["writer"]


def from_dict(d):
    """A decoded JSON object -> its Event subclass. Unknown keys are kept out,
    unknown kinds raise ValueError (naming the kind)."""
    kind = d.get("kind")
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    known = _FIELDS[kind]
    return cls(**{k: v for k, v in d.items() if k in known})


def from_json(line):
    return from_dict(json.loads(line))
