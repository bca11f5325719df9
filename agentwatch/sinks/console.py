"""Human-readable, one line per event; violations stand out."""
import sys
import time

_RED, _YEL, _DIM, _OFF = "\033[1;31m", "\033[33m", "\033[2m", "\033[0m"


def _result(d):
    err = d.get("error")
    return f" -> {err}" if err else ""


def describe(d):
    """The part of the line after time, agent and pid."""
    k = d.get("kind")
    if k == "exec":
        argv = " ".join(d.get("argv") or []) + (" ..." if d.get("argv_truncated") else "")
        return f"exec {d.get('filename')} [{argv}]{_result(d)}"
    if k == "fork":
        return f"fork child={d.get('child')}"
    if k == "exit":
        if d.get("code") is not None:
            return f"exit code={d['code']}"
        return f"exit signal={d.get('signal')}" if d.get("signal") else "exit"
    if k == "file":
        path = d.get("abspath") or d.get("path")
        extra = f" -> {d['path2']}" if d.get("path2") else ""
        access = f" ({','.join(d['access'])})" if d.get("access") else ""
        again = f" x{d['repeat']} more" if d.get("repeat") else ""   # folded in the kernel
        return f"file {d.get('op')} {path}{extra}{access}{_result(d)}{again}"
    if k == "net":
        if d.get("op") == "socket":
            return f"net socket {d.get('family')}/{d.get('sock_type')}{_result(d)}"
        where = d.get("addr") or ""
        if d.get("port") is not None:
            where = f"[{where}]:{d['port']}" if ":" in where else f"{where}:{d['port']}"
        return f"net {d.get('op')} {d.get('family')} {where}{_result(d)}"
    if k == "flow":
        return describe_flow(d)
    if k == "llm":
        return describe_llm(d)
    if k == "syscall":
        arg = f" {d['path']}" if d.get("path") else ""
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
        n = f" (x{d['count']})" if d.get("count", 1) > 1 else ""
        return f"VIOLATION [{d.get('category')}/{d.get('rule')}] {d.get('action')}{n}: {d.get('detail')}"
    if k == "lifecycle":
        detail = d.get("detail") or {}
        short = {k2: v for k2, v in detail.items() if k2 in (
            "command", "exit_status", "events", "lost_events", "policy", "message", "killed")}
        return f"{d.get('phase')} {short}"
    return str(d)


def describe_flow(d):
    """A flow through the egress guard: 'flow tcp pypi.org (sni) -> 151.101.0.223:443
    allow, 517 B out 4096 B in, 0.250 s' or 'flow dns other.test A deny: ...'."""
    verdict = d.get("decision")
    if verdict != "allow" and d.get("reason"):
        verdict += f": {d['reason']}"
    if d.get("proto") == "dns":
        got = f" -> {','.join(d['addresses'])}" if d.get("addresses") else ""
        return f"flow dns {d.get('name')} {d.get('qtype')}{got} {verdict}"
    addr = d.get("addr") or ""
    where = f"[{addr}]:{d.get('port')}" if ":" in addr else f"{addr}:{d.get('port')}"
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


def format_line(d, color=False):
    ts = time.strftime("%H:%M:%S", time.localtime(d.get("ts", 0))) + f".{int(d.get('ts', 0) * 1000) % 1000:03d}"
    line = f"{ts} {d.get('agent', '?')}[{d.get('run_id', '?')[-6:]}] pid={d.get('pid')} {describe(d)}"
    if color:
        if d.get("kind") == "violation":
            return f"{_RED}{line}{_OFF}"
        if d.get("kind") == "lifecycle":
            return f"{_DIM}{line}{_OFF}"
        if d.get("error"):
            return f"{_YEL}{line}{_OFF}"
    return line


class ConsoleSink:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.color = self.stream.isatty()

    def write(self, event, line=None):
        self.stream.write(format_line(event.to_dict(), self.color) + "\n")

    def flush(self):
        self.stream.flush()

    def close(self):
        self.flush()
