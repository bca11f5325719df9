"""Human-readable, one line per event; violations stand out, in words:

    12:00:01.250 coder[3f9a1c] pid=4242 cat DENIED read ~/.ssh/id_rsa  filesystem.deny ${HOME}/.ssh/**  kernel: EACCES (landlock)

describe() is the text after time, agent, pid and command (no colour);
format_line() the whole line, coloured when asked (use_color() says when)."""
import os
import re
import sys
import time

import click

ACTIONS = {"alert": "ALERT", "deny": "DENIED", "kill": "KILLED"}

# what a violation's detail carries for --json readers and the HTML report
# rather than for one line: the process tree and its argv, the event kind
HIDDEN = ("ancestry", "process_argv", "process_exe", "event", "pattern", "reason", "kernel", "layer")
# layers that are agentwatch's own services: their refusals say why in their own words
SERVICES = ("egress-guard", "llm-gateway", "broker")


def use_color(stream, environ=None):
    """Colour only on a terminal, and never when NO_COLOR is set (non-empty;
    no-color.org)."""
    environ = os.environ if environ is None else environ
    if environ.get("NO_COLOR"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):       # no isatty, or closed
        return False


_CTRL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(text):
    """Text an agent wrote, safe on a terminal: control characters as \\xNN
    (an argv or a path of the agent's must not move the cursor, retitle the
    window or clear the screen of whoever tails it)."""
    return _CTRL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _home(path):
    """path with the reader's $HOME shown as ~."""
    home = os.environ.get("HOME", "").rstrip("/")
    if home and isinstance(path, str) and (path == home or path.startswith(home + "/")):
        return "~" + path[len(home):]
    return path


def _value(v):
    if isinstance(v, dict):
        return ",".join(f"{k}:{_value(x)}" for k, x in v.items() if x is not None)
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    text = _home(str(v))
    return f'"{text}"' if not text or " " in text else text


def _kv(d, skip=()):
    """What nothing else said, as key=value (never a dict repr)."""
    return " ".join(f"{k}={_value(v)}" for k, v in d.items() if k not in skip and v not in (None, [], {}))


def _result(d):
    err = d.get("error")
    return f" -> {err}" if err else ""


def _where(addr, port):
    addr = addr or ""
    if port is None:
        return _home(addr)             # a unix socket's path or @name
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _path(x):
    """A file target; the name the agent used too when it is another path."""
    path, named = x.get("path"), x.get("named")
    via = f" (as {_home(named)})" if isinstance(named, str) and named.startswith("/") and named != path else ""
    return f"{_home(path)}{via}"


def _file_what(x):
    if "old_sha256" in x:
        return (f"changed {_home(x.get('path'))} (sha256 {str(x['old_sha256'])[:12]} -> "
                f"{str(x.get('new_sha256'))[:12]})"), ("path", "old_sha256", "new_sha256")
    if "argv" in x:                   # an exec (a filesystem.exec or process.exec rule)
        argv = [str(a) for a in x.get("argv") or ()]
        plain = len(argv) <= 1 and all(os.path.basename(a) == os.path.basename(str(x.get("path"))) for a in argv)
        return f"exec {_path(x)}" + ("" if plain else f" [{' '.join(argv)}]"), ("path", "named", "argv", "sha256")
    if x.get("op") == "mmap":
        return f"map executable {_path(x)}", ("path", "named", "op", "prot")
    verb = ",".join(x.get("access") or ()) or x.get("op") or "use"
    return f"{verb} {_path(x)}", ("path", "named", "access", "op")


def _service_what(x):
    layer = x.get("layer")
    if layer == "egress-guard":
        if x.get("proto") == "dns":
            return f"resolve {x.get('name')} {x.get('qtype')}", ("proto", "name", "qtype", "dns", "family")
        name = f"{x['name']} at " if x.get("name") else ""
        return (f"connect {name}{_where(x.get('addr'), x.get('port'))}",
                ("proto", "name", "source", "addr", "port", "family", "dns"))
    if layer == "llm-gateway":
        return (f"call {x.get('api')} {x.get('path')} {x.get('model')} -> HTTP {x.get('status')}",
                ("api", "path", "model", "status", "refused"))
    # the broker: method, and the peer or the tool it was about
    to = x.get("peer") or x.get("tool")
    return " ".join(str(p) for p in (x.get("method"), x.get("op"), to and f"-> {to}") if p), \
        ("method", "op", "peer", "tool")


def _violation_what(x):
    """(what the agent did, to what; the detail keys that said it), or
    (None, ()) when only the engine's reason can say it."""
    if x.get("repeat"):
        return f"again: {_value(x.get('target'))}", ("repeat", "target", "message")
    if x.get("layer") in SERVICES:
        return _service_what(x)
    if x.get("syscall") == "ioctl":
        return f"ioctl {x.get('request')} on {_home(x.get('path'))}", ("syscall", "path", "fd", "request")
    if x.get("syscall"):
        on = f" {_home(x['path'])}" if x.get("path") else ""
        return f"{x['syscall']}{on}", ("syscall", "path", "args")
    if "signal_name" in x:
        return (f"{x.get('op') or 'kill'} {x['signal_name']} to {x.get('target')}",
                ("op", "signal_name", "signal", "target", "target_pid"))
    if "family" in x and "type" in x:
        return f"socket {x['family']}/{x['type']}", ("family", "type", "protocol")
    if "family" in x and "op" in x:
        proto = "unix" if x["family"] == "unix" else x.get("protocol") or x["family"]
        return (f"{x['op']} {proto} {_where(x.get('addr'), x.get('port'))}",
                ("op", "family", "addr", "port", "protocol"))
    if "path" in x:
        return _file_what(x)
    if "alive" in x and "limit" in x:
        return f"{x['alive']} processes alive, limit {x['limit']}", ("alive", "limit")
    return None, ()


def _kernel(x):
    """What the kernel (or the layer that decided) did, short: 'EACCES (landlock)'."""
    k, layer = x.get("kernel"), x.get("layer")
    if not k:
        return f"by {layer}" if layer else None
    m = re.fullmatch(r"denied \((E[A-Z0-9]+)(?:, ([^)]*))?\)(.*)", k)
    if m:
        by = m.group(2) or (layer if not m.group(3) else None)
        return m.group(1) + (f" ({by})" if by else "") + m.group(3)
    return k if not layer or layer in k or layer in SERVICES else f"{k} ({layer})"


def describe_violation(d):
    """'DENIED read ~/.ssh/id_rsa  filesystem.deny ${HOME}/.ssh/**  kernel: EACCES (landlock)'."""
    x = d.get("detail") or {}
    action = ACTIONS.get(d.get("action"), str(d.get("action") or "VIOLATION").upper())
    n = d.get("count") or 1
    what, used = _violation_what(x)
    rule = " ".join(str(p) for p in (d.get("rule") or d.get("category"), x.get("pattern")) if p)
    said = what or x.get("reason") or x.get("message")
    head = f"{action} x{n}" if n > 1 else action
    parts = [f"{head} {said}" if said else head, rule]
    if what and x.get("reason") and x.get("layer") in SERVICES:
        parts.append(x["reason"])       # the service's own words say why
    kernel = _kernel(x)
    if kernel:
        parts.append(f"kernel: {kernel}")
    parts.append(_kv(x, HIDDEN + tuple(used) + (("message",) if said == x.get("message") else ())))
    return "  ".join(p for p in parts if p)


def _lost(x):
    return (x.get("lost_events") or 0) + (x.get("lost_stash") or 0)


def describe_lifecycle(d):
    """A run's start, end, seal, drops and warnings, in words."""
    phase, x = d.get("phase"), d.get("detail") or {}
    if phase == "start":
        cmd = " ".join(map(str, x.get("command") or ()))
        enf = (x.get("enforcement") or {}).get("path")
        policy = f"policy {x['policy_name']}" if x.get("policy_name") else "no policy"
        return f"start {cmd}  {policy}" + (f" (enforcement: {enf})" if enf else "")
    if phase == "end":
        out = f"end: exit status {x.get('exit_status')}"
        term = x.get("termination") or {}
        if term.get("reason") not in (None, "exit"):
            cond = f" ({_value(term['condition'])})" if term.get("condition") else ""
            out += f", stopped: {term['reason']}{cond}"
        if x.get("killed_for"):
            out += f", killed for {x['killed_for']}"
        if x.get("stopped_by_signal"):
            out += f", stopped by signal {x['stopped_by_signal']}"
        out += f"; {x.get('events')} events, {_lost(x)} lost"
        v = x.get("violations")
        if isinstance(v, dict):
            cats = ", ".join(f"{c} {k}" for c, k in sorted((v.get("by_category") or {}).items()))
            out += f"; {v.get('violations', 0)} violations" + (f" ({cats})" if cats else "")
        return out
    if phase == "seal":
        return f"seal: {x.get('events')} events chained, signed by {x.get('host_key')}"
    rest = _kv(x, ("message", "lost_events_per_cpu"))
    head = f"{phase}: {x['message']}" if x.get("message") else str(phase)
    return f"{head}  {rest}" if rest else head


def describe(d):
    """The part of the line after time, agent and pid."""
    k = d.get("kind")
    if k == "exec":
        argv = " ".join(d.get("argv") or []) + (" ..." if d.get("argv_truncated") else "")
        return f"exec {_home(d.get('filename'))} [{argv}]{_result(d)}"
    if k == "fork":
        return f"fork child={d.get('child')}"
    if k == "exit":
        if d.get("code") is not None:
            return f"exit code={d['code']}"
        return f"exit signal={d.get('signal')}" if d.get("signal") else "exit"
    if k == "file":
        path = _home(d.get("abspath") or d.get("path"))
        extra = f" -> {_home(d['path2'])}" if d.get("path2") else ""
        access = f" ({','.join(d['access'])})" if d.get("access") else ""
        again = f" x{d['repeat']} more" if d.get("repeat") else ""   # folded in the kernel
        return f"file {d.get('op')} {path}{extra}{access}{_result(d)}{again}"
    if k == "net":
        if d.get("op") == "socket":
            return f"net socket {d.get('family')}/{d.get('sock_type')}{_result(d)}"
        return f"net {d.get('op')} {d.get('family')} {_where(d.get('addr'), d.get('port'))}{_result(d)}"
    if k == "flow":
        return describe_flow(d)
    if k == "llm":
        return describe_llm(d)
    if k == "syscall":
        arg = f" {_home(d['path'])}" if d.get("path") else ""
        return f"syscall {d.get('name')}{arg}{_result(d)}"
    if k == "signal":
        who = {0: "own process group", -1: "every process"}.get(d.get("target"))
        if who is None:
            t = d.get("target")
            who = "unknown" if t is None else f"group {-t}" if t < -1 else f"pid {t}"
        if d.get("target_tid") is not None:
            who += f" tid {d['target_tid']}"
        if d.get("pidfd") is not None:
            who += f" (pidfd {d['pidfd']})"
        return f"signal {d.get('op')} {d.get('signal_name') or d.get('signal')} to {who}{_result(d)}"
    if k == "violation":
        return describe_violation(d)
    if k == "lifecycle":
        return describe_lifecycle(d)
    rest = {key: v for key, v in d.items() if key not in _PREFIX}
    return f"{k} {_kv(rest, ('kind',))}".rstrip()


def describe_flow(d):
    """A flow through the egress guard: 'flow tcp pypi.org (sni) -> 151.101.0.223:443
    allow, 517 B out 4096 B in, 0.250 s' or 'flow dns other.test A deny: ...'."""
    verdict = d.get("decision")
    if verdict != "allow" and d.get("reason"):
        verdict += f": {d['reason']}"
    if d.get("proto") == "dns":
        got = f" -> {','.join(d['addresses'])}" if d.get("addresses") else ""
        return f"flow dns {d.get('name')} {d.get('qtype')}{got} {verdict}"
    where = _where(d.get("addr"), d.get("port"))
    name = f"{d['name']} ({d.get('source')}) " if d.get("name") else ""
    moved = (f", {d.get('bytes_out', 0)} B out {d.get('bytes_in', 0)} B in"
             if d.get("decision") == "allow" else "")
    took = f", {d['duration']:.3f} s" if d.get("duration") is not None else ""
    return f"flow tcp {name}-> {where} {verdict}{moved}{took}"


def describe_llm(d):
    """A call through the LLM gateway: 'llm openai /v1/chat/completions
    gpt-x 200, 120 in 40 out, waited 2 ms, 0.400 s'."""
    counted = " (counted)" if d.get("tokens_counted") else ""
    wait = f", waited {d['queue_wait'] * 1000:.0f} ms" if d.get("queue_wait") is not None else ""
    took = f", {d['latency']:.3f} s" if d.get("latency") is not None else ""
    err = f": {d['error']}" if d.get("error") else ""
    return (f"llm {d.get('api')} {d.get('path')} {d.get('model')} {d.get('status')}{err}, "
            f"{d.get('tokens_in', 0)} in {d.get('tokens_out', 0)} out{counted}{wait}{took}")


# the fields format_line() puts before describe()'s text
_PREFIX = ("ts", "run_id", "agent", "pid", "tid", "ppid", "uid", "comm", "prev")


def _style(d, line):
    k = d.get("kind")
    if k == "violation":
        return click.style(line, fg="yellow" if d.get("action") == "alert" else "red", bold=True)
    if k == "lifecycle":
        return click.style(line, fg="yellow") if d.get("phase") in ("warning", "drops") else click.style(line, dim=True)
    if d.get("error") or d.get("decision") == "deny":
        return click.style(line, fg="yellow")
    return line


def format_line(d, color=False):
    """One line: time, agent[run], pid, command, then describe(d)."""
    ts = time.strftime("%H:%M:%S", time.localtime(d.get("ts", 0))) + f".{int(d.get('ts', 0) * 1000) % 1000:03d}"
    comm = f" {d['comm']}" if d.get("comm") else ""
    line = clean(f"{ts} {d.get('agent', '?')}[{str(d.get('run_id', '?'))[-6:]}] pid={d.get('pid')}{comm} "
                 f"{describe(d)}")
    return _style(d, line) if color else line


class ConsoleSink:
    def __init__(self, stream=None, color=None):
        self.stream = stream or sys.stderr
        self.color = use_color(self.stream) if color is None else color

    def write(self, event, line=None):
        self.stream.write(format_line(event.to_dict(), self.color) + "\n")

    def flush(self):
        self.stream.flush()

    def close(self):
        self.flush()
