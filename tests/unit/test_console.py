"""agentwatch/sinks/console.py: one human-readable line per event."""
import io
import os
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
], ids=lambda v: v.get("kind") + "-" + str(v.get("op") or v.get("name") or "") if isinstance(v, dict) else None)
def test_describe(event, expected):
    assert describe(event) == expected


def test_describe_unknown_kind_does_not_fail():
    text = describe(d(kind="mystery", thing={"a": 1}, items=[1, 2]))
    assert text == "mystery thing=a:1 items=1,2"


def test_format_line_prefix():
    line = format_line(d(kind="fork", child=1))
    hms = time.strftime("%H:%M:%S", time.localtime(BASE["ts"]))
    assert line == f"{hms}.500 coder[3f9a1c] pid=4242 fork child=1"
    assert format_line(d(kind="fork", child=1, comm="git")) == f"{hms}.500 coder[3f9a1c] pid=4242 git fork child=1"


def test_format_line_violation_stands_out():
    v = d(kind="violation", category="filesystem", rule="filesystem.deny", action="deny", detail={}, count=1)
    assert "DENIED" in format_line(v)
    colored = format_line(v, color=True)
    assert colored.startswith("\033[31m\033[1m") and colored.endswith("\033[0m") and "DENIED" in colored
    assert format_line(dict(v, action="alert"), color=True).startswith("\033[33m\033[1m")
    assert "\033" not in format_line(v, color=False)


def test_format_line_colors_errors_only_when_asked():
    e = d(kind="file", op="open", path="/x", error="EACCES")
    assert format_line(e, color=True).startswith("\033[33m") and format_line(e, color=True).endswith("\033[0m")
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
    assert lines[1].endswith("ALERT  write") and "\033" not in lines[1]     # StringIO is no tty


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


# ---- violations, in words: the detail shapes the engine emits (engine/rules.py, judge.py,
# reporter.py), as recorded from real runs

PROC = {"ancestry": [3467, 3465], "process_argv": ["cat", "x"], "process_exe": "/usr/bin/cat"}


def v(category, rule, action, count=1, **detail):
    return d(kind="violation", category=category, rule=rule, action=action, count=count,
             detail=dict(PROC, **detail))


@pytest.mark.parametrize("event, expected", [
    (v("filesystem", "filesystem.deny", "deny", path="/home/u/.ssh/id_rsa", named="/home/u/.ssh/id_rsa",
       access=["read"], op="open", layer="landlock", pattern="${HOME}/.ssh/**", event="file",
       reason="read of /home/u/.ssh/id_rsa matches filesystem.deny ${HOME}/.ssh/**", kernel="denied (EACCES)"),
     "DENIED read ~/.ssh/id_rsa  filesystem.deny ${HOME}/.ssh/**  kernel: EACCES (landlock)"),
    (v("filesystem", "filesystem.deny", "alert", path="/w/.env", named=".env",
       access=["create", "truncate", "write"], op="open", pattern="**/.env", kernel="allowed"),
     "ALERT create,truncate,write /w/.env  filesystem.deny **/.env  kernel: allowed"),
    (v("filesystem", "filesystem.deny", "kill", path="/w/.env", named="/w/link", access=["read"], op="open",
       pattern="**/.env", kernel="killed at the open's return (bpf_send_signal SIGKILL)"),
     "KILLED read /w/.env (as /w/link)  filesystem.deny **/.env  "
     "kernel: killed at the open's return (bpf_send_signal SIGKILL)"),
    (v("filesystem", "filesystem.exec", "deny", path="/w/mytrue", argv=["./mytrue"], sha256=None,
       layer="landlock", kernel="denied (EACCES)"),
     "DENIED exec /w/mytrue  filesystem.exec  kernel: EACCES (landlock)"),     # argv says nothing more
    (v("process", "process.exec", "alert", path="/usr/bin/curl", argv=["curl", "-s", "x.test"], kernel="allowed"),
     "ALERT exec /usr/bin/curl [curl -s x.test]  process.exec  kernel: allowed"),
    (v("filesystem", "filesystem.write", "deny", syscall="ioctl", path="/dev/null", fd=1, request="0x5401",
       layer="landlock", kernel="denied (EACCES)"),
     "DENIED ioctl 0x5401 on /dev/null  filesystem.write  kernel: EACCES (landlock)"),
    (v("network", "network.egress", "deny", op="connect", family="inet", addr="1.1.1.1", port=443,
       protocol="tcp", layer="landlock", kernel="denied (EACCES)"),
     "DENIED connect tcp 1.1.1.1:443  network.egress  kernel: EACCES (landlock)"),
    (v("network", "network.loopback", "alert", op="connect", family="inet6", addr="::1", port=8081,
       protocol="tcp", reason="connect to ::1:8081: policy allows no loopback"),
     "ALERT connect tcp [::1]:8081  network.loopback"),
    (v("network", "network.unix", "kill", op="connect", family="unix", addr="/run/x.sock", port=None,
       protocol="tcp", layer="cgroup-bpf", kernel="denied (EPERM)"),
     "KILLED connect unix /run/x.sock  network.unix  kernel: EPERM (cgroup-bpf)"),
    (v("network", "network.socket", "deny", family="inet", type="raw", layer="cgroup-bpf",
       kernel="denied (EPERM)", reason="raw inet socket"),
     "DENIED socket inet/raw  network.socket  kernel: EPERM (cgroup-bpf)"),
    (v("network", "network.domain", "deny", proto="tcp", name="evil.test", source="sni", addr="10.0.0.9",
       port=443, layer="egress-guard", reason="evil.test is not in network.allow",
       kernel="redirected to the egress guard (cgroup BPF), refused there"),
     "DENIED connect evil.test at 10.0.0.9:443  network.domain  evil.test is not in network.allow  "
     "kernel: redirected to the egress guard (cgroup BPF), refused there"),
    (v("network", "network.domain", "deny", proto="dns", name="x.test", qtype="TXT", layer="egress-guard",
       reason="x.test is not in network.allow", kernel="answered NXDOMAIN"),
     "DENIED resolve x.test TXT  network.domain  x.test is not in network.allow  "
     "kernel: answered NXDOMAIN"),
    (v("process", "process.namespaces", "deny", syscall="unshare", args=[268435456, 0, 0],
       kernel="denied (EPERM, seccomp)", layer="seccomp"),
     "DENIED unshare  process.namespaces  kernel: EPERM (seccomp)"),
    (v("process", "process.memfd_exec", "deny", syscall="memfd_create", args=[1, 1, 0], layer="seccomp",
       kernel="denied (EPERM, seccomp)", refused="every memfd (fileless execution)"),
     'DENIED memfd_create  process.memfd_exec  kernel: EPERM (seccomp)  refused="every memfd (fileless execution)"'),
    (v("process", "process.signal", "alert", op="kill", target="pid 1", target_pid=1, signal=15,
       signal_name="SIGTERM"),
     "ALERT kill SIGTERM to pid 1  process.signal"),
    (v("process", "process.max_processes", "kill", alive=70, limit=64),
     "KILLED 70 processes alive, limit 64  process.max_processes"),
    (v("syscall", "syscalls.deny", "deny", syscall="mount", path="/mnt", kernel="denied (EPERM, seccomp)"),
     "DENIED mount /mnt  syscalls.deny  kernel: EPERM (seccomp)"),
    (v("syscall", "syscalls.deny", "kill", signal=31, kernel="killed (seccomp)", layer="seccomp",
       reason="killed by seccomp (SIGSYS)"),
     "KILLED killed by seccomp (SIGSYS)  syscalls.deny  kernel: killed (seccomp)  signal=31"),
    (v("resource", "resources.pids", "deny", counter="pids.events", max=5, layer="pids",
       kernel="denied (pids limit)", reason="the pids limit refused 5 fork(s)"),
     "DENIED the pids limit refused 5 fork(s)  resources.pids  kernel: denied (pids limit)  "
     "counter=pids.events max=5"),
    (v("resource", "resources.wall_time", "kill", reason="wall time 10m reached"),
     "KILLED wall time 10m reached  resources.wall_time"),
    (v("resource", "resources.llm_tokens", "deny", layer="llm-gateway", api="openai", path="/v1/chat",
       model="m", status=429, refused=True, reason="token budget reached", used=1200,
       kernel="refused by the LLM gateway (HTTP 429)"),
     "DENIED call openai /v1/chat m -> HTTP 429  resources.llm_tokens  token budget reached  "
     "kernel: refused by the LLM gateway (HTTP 429)  used=1200"),
    (v("identity", "identity.daemon", "deny", op="run", reason="an agent asked the agentwatch daemon to run",
       kernel="refused (peer in the run's cgroup)"),
     "DENIED an agent asked the agentwatch daemon to run  identity.daemon  "
     "kernel: refused (peer in the run's cgroup)  op=run"),
    (v("identity", "identity.policy_write", "alert", path="/etc/p.yaml", old_sha256="a" * 64,
       new_sha256="b" * 64, by="unknown (seen by content, not by a sensor)"),
     'ALERT changed /etc/p.yaml (sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb)  identity.policy_write  '
     'by="unknown (seen by content, not by a sensor)"'),
    (v("protocol", "protocol.peer", "deny", layer="broker", method="message/send", op="send", peer="bob",
       reason="bob may not hear from coder", kernel="sender named by the kernel; refused by the broker"),
     "DENIED message/send send -> bob  protocol.peer  bob may not hear from coder  "
     "kernel: sender named by the kernel; refused by the broker"),
    (d(kind="violation", category="filesystem", rule="filesystem.write", action="deny", count=7,
       detail={"repeat": True, "target": "ioctl:/dev/null", "message": "7 more since the first report"}),
     "DENIED x7 again: ioctl:/dev/null  filesystem.write"),
    (v("filesystem", "filesystem.read", "deny", path="/x", access=["read"], op="open", future={"k": [1, 2]}),
     "DENIED read /x  filesystem.read  future=k:1,2"),
], ids=lambda e: e["rule"] + "-" + e["action"] if isinstance(e, dict) else None)
def test_describe_violation_in_words(event, expected, monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    assert describe(event) == expected
    assert "{" not in describe(event).replace("${HOME}", "")      # never a dict repr


def test_describe_violation_unknown_action_and_no_detail():
    assert describe(d(kind="violation", category="c", rule="r", action="log", count=1)) == "LOG  r"


@pytest.mark.parametrize("detail, expected", [
    ({"command": ["examples/demo-agent.sh", "-x"], "policy_name": "coding-agent", "policy": "/p.yaml",
      "enforcement": {"path": "monitor-only", "enforced": []}, "variables": {"HOME": "/root"}},
     "start examples/demo-agent.sh -x  policy coding-agent (enforcement: monitor-only)"),
    ({"command": ["true"], "policy": None}, "start true  no policy"),
])
def test_describe_lifecycle_start(detail, expected):
    assert describe(d(kind="lifecycle", phase="start", detail=detail)) == expected


def test_describe_lifecycle_end():
    end = {"exit_status": 0, "events": 412, "lost_events": 2, "lost_stash": 1, "killed_for": None,
           "violations": {"violations": 4, "by_category": {"process": 1, "filesystem": 3}},
           "termination": {"reason": "exit", "condition": None}, "rings": {"bulk": {}}}
    assert describe(d(kind="lifecycle", phase="end", detail=end)) == \
        "end: exit status 0; 412 events, 3 lost; 4 violations (filesystem 3, process 1)"
    end.update(exit_status=137, killed_for="filesystem.deny", violations=None, stopped_by_signal=15,
               termination={"reason": "timeout", "condition": {"after": "10m"}})
    assert describe(d(kind="lifecycle", phase="end", detail=end)) == (
        "end: exit status 137, stopped: timeout (after:10m), killed for filesystem.deny, "
        "stopped by signal 15; 412 events, 3 lost")


def test_describe_lifecycle_other_phases():
    assert describe(d(kind="lifecycle", phase="seal", detail={"events": 9, "host_key": "ed25519:ab"})) == \
        "seal: 9 events chained, signed by ed25519:ab"
    assert describe(d(kind="lifecycle", phase="drops", detail={
        "lost_events": 30, "lost_stash": 0, "lost_events_per_cpu": [30, 0], "lost_priority": 0,
        "message": "30 new events lost in the kernel"})) == \
        "drops: 30 new events lost in the kernel  lost_events=30 lost_stash=0 lost_priority=0"
    assert describe(d(kind="lifecycle", phase="warning", detail={"message": "wall time limit reached"})) == \
        "warning: wall time limit reached"
    assert describe(d(kind="lifecycle", phase="paused", detail={"why": "x y"})) == 'paused  why="x y"'


def test_home_is_shown_as_tilde_only_under_home(monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    assert describe(d(kind="file", op="open", abspath="/home/u/a", access=["read"])) == "file open ~/a (read)"
    assert describe(d(kind="file", op="open", abspath="/home/us/a", access=["read"])) == "file open /home/us/a (read)"
    monkeypatch.setenv("HOME", "/")
    assert describe(d(kind="file", op="open", abspath="/etc/x", access=["read"])) == "file open /etc/x (read)"


class Tty(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.mark.parametrize("tty, no_color, expected", [
    (True, None, True), (True, "", True), (True, "1", False), (False, None, False), (False, "", False)])
def test_use_color_on_a_tty_unless_no_color(tty, no_color, expected, monkeypatch):
    from agentwatch.sinks.console import use_color
    env = {} if no_color is None else {"NO_COLOR": no_color}
    assert use_color(Tty(tty), env) is expected
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert ConsoleSink(Tty(tty)).color is expected      # the process's environment by default
    assert use_color(object()) is False                  # no isatty at all


def test_console_sink_colors_on_a_tty(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Tty(True)
    ConsoleSink(out).write(ViolationEvent(category="filesystem", rule="filesystem.write", action="deny", **BASE))
    assert out.getvalue().startswith("\033[31m")


def test_show_takes_no_color_from_the_runs_environment(state_dir, monkeypatch):
    """On the daemon, --show writes to the client's terminal: the client's
    NO_COLOR (the run's environment) decides, not the daemon's."""
    from agentwatch.core import state
    from agentwatch.run.log import RunLog
    monkeypatch.delenv("NO_COLOR", raising=False)
    os.makedirs(state.run_path("20261204-100000-abcdef"))
    for environ, expected in (({"NO_COLOR": "1"}, False), ({}, True), (None, True)):
        log = RunLog("20261204-100000-abcdef")
        log.open(console=Tty(True), environ=environ)
        assert [s.color for s in log.sinks if isinstance(s, ConsoleSink)] == [expected]
        log.close()


def test_an_agents_control_characters_never_reach_the_terminal():
    """argv, comm and paths are the agent's: an escape sequence in them is
    shown as \\xNN, so tailing a run cannot clear, retitle or drive the
    operator's terminal; colour (ours) still applies around the line."""
    e = d(kind="exec", comm="sh\x1b[2J", filename="/bin/x\x07", argv=["x", "\x1b]0;pwned\x07", "\x9b6n"])
    for color in (False, True):
        line = format_line(e, color)
        plain = line.replace("\x1b[0m", "").replace("\x1b[1m", "").replace("\x1b[2m", "")
        assert "\\x1b[2J" in line and "\\x1b]0;pwned\\x07" in line and "\\x9b6n" in line
        assert not any(ch in plain for ch in "\x07\x9b") and "\x1b]" not in plain and "\x1b[2J" not in plain
