"""agentwatch/sinks/console.py: one human-readable line per event."""
import io
import time

import pytest

from agentwatch.core.events import FileEvent, ViolationEvent
from agentwatch.sinks.console import ConsoleSink, describe, format_line

BASE = {"ts": 1795843221.5, "run_id": "20261128-051500-3f9a1c", "agent": "coder", "pid": 4242}


def d(**kw):
    return dict(BASE, **kw)


@pytest.mark.parametrize("event, expected", [
    (d(kind="exec", filename="/usr/bin/git", argv=["git", "push"], error=None),
     "exec /usr/bin/git [git push]"),
    (d(kind="exec", filename="/x", argv=["x", "a"], argv_truncated=True, error="ENOENT"),
     "exec /x [x a ...] -> ENOENT"),
    (d(kind="fork", child=77), "fork child=77"),
    (d(kind="exit", code=0, signal=None), "exit code=0"),
    (d(kind="exit", code=None, signal=9), "exit signal=9"),
    (d(kind="exit", code=None, signal=None), "exit"),
    (d(kind="file", op="open", path="a", abspath="/w/a", access=["read", "write"]),
     "file open /w/a (read,write)"),
    (d(kind="file", op="open", path="/dev/null", abspath="/dev/null", access=["read"], repeat=99999),
     "file open /dev/null (read) x99999 more"),
    (d(kind="file", op="rename", path="a", abspath=None, path2="/w/b", access=[], error="EACCES"),
     "file rename a -> /w/b -> EACCES"),
    (d(kind="net", op="socket", family="inet", sock_type="raw", error="EPERM"),
     "net socket inet/raw -> EPERM"),
    (d(kind="net", op="connect", family="inet", addr="1.2.3.4", port=443), "net connect inet 1.2.3.4:443"),
    (d(kind="net", op="connect", family="inet6", addr="2001:db8::1", port=80),
     "net connect inet6 [2001:db8::1]:80"),
    (d(kind="net", op="connect", family="unix", addr="@bus", port=None), "net connect unix @bus"),
    (d(kind="syscall", name="ptrace", path=None, error=None), "syscall ptrace"),
    (d(kind="syscall", name="mount", path="/mnt", error="EPERM"), "syscall mount /mnt -> EPERM"),
    (d(kind="lifecycle", phase="end", detail={"exit_status": 0, "events": 5, "noise": "x"}),
     "end {'exit_status': 0, 'events': 5}"),
], ids=lambda v: v.get("kind") + "-" + str(v.get("op") or v.get("name") or "") if isinstance(v, dict) else None)
def test_describe(event, expected):
    assert describe(event) == expected


def test_describe_violation():
    text = describe(d(kind="violation", category="network", rule="egress", action="deny",
                      detail={"addr": "1.2.3.4"}, count=3))
    assert text.startswith("VIOLATION [network/egress] deny (x3): ")
    assert "1.2.3.4" in text
    assert "(x" not in describe(d(kind="violation", category="c", rule="r", action="alert", count=1))


def test_describe_unknown_kind_does_not_fail():
    assert "mystery" in describe(d(kind="mystery"))


def test_format_line_prefix():
    line = format_line(d(kind="fork", child=1))
    hms = time.strftime("%H:%M:%S", time.localtime(BASE["ts"]))
    assert line == f"{hms}.500 coder[3f9a1c] pid=4242 fork child=1"


def test_format_line_violation_stands_out():
    v = d(kind="violation", category="filesystem", rule="deny", action="alert", detail={}, count=1)
    assert "VIOLATION" in format_line(v)
    colored = format_line(v, color=True)
    assert colored.startswith("\033[1;31m") and colored.endswith("\033[0m") and "VIOLATION" in colored
    assert "\033" not in format_line(v, color=False)


def test_format_line_colors_errors_only_when_asked():
    e = d(kind="file", op="open", path="/x", error="EACCES")
    assert format_line(e, color=True).startswith("\033[33m")
    assert format_line(d(kind="fork", child=1), color=True) == format_line(d(kind="fork", child=1))


def test_format_line_survives_missing_fields():
    line = format_line({"kind": "fork"})
    assert "?[?]" in line and "fork" in line


def test_console_sink_writes_lines():
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    sink.write(FileEvent(op="unlink", path="/tmp/x", **BASE))
    sink.write(ViolationEvent(category="filesystem", rule="write", **BASE))
    sink.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("file unlink /tmp/x")
    assert "VIOLATION" in lines[1] and "\033" not in lines[1]     # StringIO is no tty


def test_describe_flow_says_name_address_verdict_and_bytes():
    from agentwatch.sinks.console import describe
    ok = describe({"kind": "flow", "proto": "tcp", "name": "pypi.org", "source": "sni",
                   "addr": "151.101.0.223", "port": 443, "decision": "allow",
                   "bytes_out": 517, "bytes_in": 4096, "duration": 0.25})
    assert ok == "flow tcp pypi.org (sni) -> 151.101.0.223:443 allow, 517 B out 4096 B in, 0.250 s"
    no = describe({"kind": "flow", "proto": "tcp", "name": None, "addr": "::1", "port": 443,
                   "decision": "deny", "reason": "no name"})
    assert no == "flow tcp -> [::1]:443 deny: no name"
    dns = describe({"kind": "flow", "proto": "dns", "name": "x.other.test", "qtype": "TXT",
                    "decision": "deny", "reason": "x.other.test is not in network.allow"})
    assert dns == "flow dns x.other.test TXT deny: x.other.test is not in network.allow"


def test_describe_llm_says_api_model_status_tokens_and_wait():
    from agentwatch.sinks.console import describe
    d = {"kind": "llm", "api": "openai", "path": "/v1/chat/completions", "model": "gpt-x", "status": 200,
         "tokens_in": 120, "tokens_out": 40, "queue_wait": 0.002, "latency": 0.4}
    assert describe(d) == "llm openai /v1/chat/completions gpt-x 200, 120 in 40 out, waited 2 ms, 0.400 s"
    d.update(status=429, error="token budget reached", tokens_counted=True, queue_wait=None)
    assert describe(d) == ("llm openai /v1/chat/completions gpt-x 429: token budget reached, "
                           "120 in 40 out (counted), 0.400 s")
