"""sinks/otlp.py against a loopback OTLP/HTTP receiver: a run's violation
arrives as a log record with the run's identity, the run as a span with
its start, end and status; the default sends no plain events; a full
queue drops and counts; a dead collector is counted and does not hold
close() beyond its timeout."""
import json
import socket
import time

import pytest

from agentwatch.core.errors import UsageError
from agentwatch.core.events import FileEvent, LifecycleEvent, ViolationEvent
from agentwatch.sinks import otlp
from otlp_receiver import Receiver, attrs

T0 = 1_800_000_000.0


def _run_events(run_id="r1", agent="coder", exit_status=137, reason="violation"):
    ident = {"run_id": run_id, "agent": agent, "root_pid": 4242, "cgroup": f"/sys/fs/cgroup/agentwatch/{run_id}",
             "cgroup_id": 99, "policy": "/p/coding-agent.yaml", "policy_digest": "sha256:ab",
             "start_time": T0, "command": ["sh", "-c", "cat /etc/shadow"], "client": {"pid": 7}}
    return [LifecycleEvent(phase="start", run_id=run_id, agent=agent, ts=T0 + 0.1, detail=ident),
            FileEvent(run_id=run_id, agent=agent, ts=T0 + 0.2, pid=4243, op="open", path="/etc/shadow"),
            ViolationEvent(run_id=run_id, agent=agent, ts=T0 + 0.3, pid=4243, comm="cat",
                           category="filesystem", rule="filesystem.deny", action="kill",
                           detail={"reason": "/etc/shadow is denied", "path": "/etc/shadow"}),
            LifecycleEvent(phase="end", run_id=run_id, agent=agent, ts=T0 + 2.0, detail={
                "exit_status": exit_status, "events": 12, "violations": {"violations": 1},
                "killed_for": "filesystem.deny",
                "termination": {"reason": reason, "condition": "filesystem.deny"}}),
            LifecycleEvent(phase="seal", run_id=run_id, agent=agent, ts=T0 + 2.1, detail={})]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_violation_as_log_with_identity_and_run_as_span(receiver):
    ex = otlp.OtlpExporter(receiver.url, schedule_delay_s=0.1)
    for ev in _run_events():
        ex.feed(ev)
    ex.close(timeout=5)
    kinds = [attrs(r.attributes)["agentwatch.event.kind"] for _, r in receiver.logs]
    assert sorted(kinds) == ["lifecycle", "lifecycle", "violation"]    # no file event, no seal
    res, v = next((res, r) for res, r in receiver.logs if attrs(r.attributes)["agentwatch.event.kind"] == "violation")
    a = attrs(v.attributes)
    assert res["service.name"] == "agentwatch"
    assert a["agentwatch.run_id"] == "r1" and a["agentwatch.agent"] == "coder"
    assert a["agentwatch.pid"] == 4243 and a["agentwatch.root_pid"] == 4242
    assert a["agentwatch.cgroup"] == "/sys/fs/cgroup/agentwatch/r1"
    assert a["agentwatch.policy_digest"] == "sha256:ab"
    assert (a["agentwatch.violation.category"], a["agentwatch.violation.rule"],
            a["agentwatch.violation.action"]) == ("filesystem", "filesystem.deny", "kill")
    assert a["agentwatch.violation.reason"] == "/etc/shadow is denied"
    assert v.severity_text == "FATAL" and v.time_unix_nano == int((T0 + 0.3) * 1e9)
    assert json.loads(v.body.string_value)["rule"] == "filesystem.deny"
    assert v.event_name == "agentwatch.violation"
    [(_, span)] = receiver.spans
    assert span.name == "agentwatch run"
    assert span.start_time_unix_nano == int(T0 * 1e9) and span.end_time_unix_nano == int((T0 + 2.0) * 1e9)
    sa = attrs(span.attributes)
    assert sa["agentwatch.run_id"] == "r1" and sa["agentwatch.outcome"] == "violation"
    assert sa["agentwatch.exit_status"] == 137
    assert span.status.code == 2 and "filesystem.deny" in span.status.message     # ERROR
    assert v.trace_id == span.trace_id and v.span_id == span.span_id               # the log is in the run's span
    st = ex.stats()
    assert st["logs_exported"] == 3 and st["spans_exported"] == 1 and st["logs_failed"] == 0


def test_all_events_mode_and_an_ok_run(receiver):
    ex = otlp.OtlpExporter(receiver.url, events="all", schedule_delay_s=0.1)
    assert ex.kinds is None
    for ev in _run_events(exit_status=0, reason="exit"):
        ex.feed(ev)
    ex.close(timeout=5)
    assert "file" in {attrs(r.attributes)["agentwatch.event.kind"] for _, r in receiver.logs}
    [(_, span)] = receiver.spans
    assert span.status.code == 1                  # OK


def test_run_without_end_is_a_failed_span(receiver):
    ex = otlp.OtlpExporter(receiver.url, schedule_delay_s=0.1)
    ex.feed(_run_events()[0])
    ex.run_done("r1")
    ex.close(timeout=5)
    [(_, span)] = receiver.spans
    assert span.status.code == 2 and attrs(span.attributes)["agentwatch.outcome"] == "failed"


def test_full_queue_drops_and_counts(receiver):
    ex = otlp.OtlpExporter(receiver.url, max_queue=1, schedule_delay_s=0.1)
    for ev in _run_events() * 200:
        ex.feed(ev)
    ex.close(timeout=5)
    assert ex.stats()["dropped"] > 0


def test_dead_collector_counted_and_close_bounded():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                  # nothing listens there
    logged = []
    ex = otlp.OtlpExporter(f"http://127.0.0.1:{port}", timeout=1.0, schedule_delay_s=0.1, log=logged.append)
    for ev in _run_events():
        ex.feed(ev)
    t0 = time.monotonic()
    ex.close(timeout=3)
    assert time.monotonic() - t0 < 4.5
    st = ex.stats()
    assert st["logs_failed"] + st["spans_failed"] > 0 or st.get("unflushed_at_close")
    assert logged and "OTLP" in logged[0]


def test_collector_refusing_counted(receiver):
    receiver.status = 400                     # not retryable: fails at once
    ex = otlp.OtlpExporter(receiver.url, schedule_delay_s=0.1)
    for ev in _run_events():
        ex.feed(ev)
    ex.close(timeout=5)
    assert ex.stats()["logs_failed"] == 3 and ex.stats()["spans_failed"] == 1


def test_bad_endpoint_and_mode():
    with pytest.raises(UsageError, match="OTLP/HTTP base URL"):
        otlp.OtlpExporter("127.0.0.1:4318")
    with pytest.raises(UsageError, match="--otlp-events"):
        otlp.OtlpExporter("http://127.0.0.1:4318", events="some")
    assert otlp.endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://c:4318"
    assert otlp.endpoint_from_env({"AGENTWATCH_OTLP": "http://a:1", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}) == "http://a:1"
    assert otlp.endpoint_from_env({}) is None
