"""OpenTelemetry export of a daemon's runs (docs/export.md): violations
and lifecycle events (or every event) as OTLP log records, each run as a
span from its start to its end, over OTLP/HTTP (protobuf) to a collector.

`OtlpExporter.feed` is a bus callback (engine/bus.py): on the sensors'
reader thread, under the monitor's lock, so it only appends the event to a
bounded queue (what does not fit is dropped and counted). A worker thread
of ours turns events into records and spans and hands them to the SDK's
batch processors, whose own threads post them; an export that fails (the
collector is down, slow, or refuses) is counted and logged, and costs
the runs nothing. close() flushes what is queued, waiting a few seconds
at most: a dead collector does not hold up the daemon's shutdown.
"""
import collections
import logging
import os
import queue
import threading
import time

from ..core.errors import UsageError
from .metrics import outcome

EVENT_MODES = ("violations", "all")
LIFECYCLE_KINDS = frozenset({"violation", "lifecycle"})
OK_OUTCOMES = ("exit_ok", "done")
SEVERITY = {"alert": "WARN", "deny": "ERROR", "kill": "FATAL"}
LOG_FAILURE_EVERY_S = 60.0


def endpoint_from_env(environ=os.environ):
    """AGENTWATCH_OTLP, else the standard OTEL_EXPORTER_OTLP_ENDPOINT, else None."""
    return environ.get("AGENTWATCH_OTLP") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def check_endpoint(url):
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--otlp {url!r}: expected an OTLP/HTTP base URL, e.g. http://127.0.0.1:4318 "
                         "(records go to <URL>/v1/logs, spans to <URL>/v1/traces)")
    return url.rstrip("/")


def identity_attributes(detail):
    """A run's start event detail -> the attributes every record of it carries."""
    d = detail or {}
    attrs = {"agentwatch.run_id": d.get("run_id"), "agentwatch.agent": d.get("agent"),
             "agentwatch.root_pid": d.get("root_pid"), "agentwatch.cgroup": d.get("cgroup"),
             "agentwatch.cgroup_id": d.get("cgroup_id"), "agentwatch.policy": d.get("policy"),
             "agentwatch.policy_name": d.get("policy_name"),
             "agentwatch.policy_digest": d.get("policy_digest"), "agentwatch.signer": d.get("signer"),
             "agentwatch.user": d.get("user"), "agentwatch.command": " ".join(d.get("command") or ()) or None,
             "agentwatch.enforcement": (d.get("enforcement") or {}).get("path")}
    client = d.get("client") or {}
    if client.get("pid"):
        attrs["agentwatch.client_pid"] = client["pid"]
    return {k: v for k, v in attrs.items() if v is not None}


def event_attributes(ev, identity):
    """One event's log record attributes: its run's identity, the process,
    and for a violation what it broke and what was done."""
    attrs = dict(identity, **{"agentwatch.run_id": ev.run_id, "agentwatch.agent": ev.agent or "",
                              "agentwatch.event.kind": ev.kind, "agentwatch.pid": ev.pid,
                              "agentwatch.comm": ev.comm or ""})
    if ev.kind == "violation":
        attrs.update({"agentwatch.violation.category": ev.category, "agentwatch.violation.rule": ev.rule,
                      "agentwatch.violation.action": ev.action, "agentwatch.violation.count": ev.count or 1})
        reason = (ev.detail or {}).get("reason") or (ev.detail or {}).get("message")
        if reason:
            attrs["agentwatch.violation.reason"] = str(reason)
    elif ev.kind == "lifecycle":
        attrs["agentwatch.lifecycle.phase"] = ev.phase
    return attrs


def severity(ev):
    if ev.kind == "violation":
        return SEVERITY.get(ev.action, "WARN")
    if ev.kind == "lifecycle" and ev.phase in ("warning", "drops"):
        return "WARN"
    return "INFO"


class _Counted:
    """An SDK exporter whose failed exports are counted (and logged, at
    most once a minute), never raised into the batch processor."""

    def __init__(self, inner, signal, owner):
        self.inner, self.signal, self.owner = inner, signal, owner

    def export(self, batch):
        try:
            result = self.inner.export(batch)
            ok = getattr(result, "name", "") == "SUCCESS"
        except Exception as e:       # noqa: BLE001 - counted like any failed export
            result, ok = None, False
            self.owner.last_error = f"{type(e).__name__}: {e}"
        self.owner.count(f"{self.signal}_exported" if ok else f"{self.signal}_failed", len(batch))
        if not ok:
            self.owner.failed(self.signal, len(batch))
        return result if result is not None else _failure(self.signal)

    def force_flush(self, timeout_millis=30000):
        return self.inner.force_flush(timeout_millis)

    def shutdown(self):
        self.inner.shutdown()


def _failure(signal):
    if signal == "logs":
        from opentelemetry.sdk._logs.export import LogRecordExportResult
        return LogRecordExportResult.FAILURE
    from opentelemetry.sdk.trace.export import SpanExportResult
    return SpanExportResult.FAILURE


class OtlpExporter:
    """Runs' events to OTLP/HTTP. endpoint: the collector's base URL;
    events: "violations" (violations and lifecycle events: start, end,
    warnings, drops) or "all"; max_queue: events waiting for our worker;
    timeout: seconds per export request (retries included)."""

    def __init__(self, endpoint, events="violations", max_queue=10000, timeout=2.0, log=None,
                 schedule_delay_s=1.0):
        if events not in EVENT_MODES:
            raise UsageError(f"--otlp-events {events!r}: expected one of {', '.join(EVENT_MODES)}")
        self.endpoint = check_endpoint(endpoint)
        self.events = events
        self.kinds = LIFECYCLE_KINDS if events == "violations" else None   # the bus's filter
        self.log = log or (lambda msg: None)
        self.counters = collections.Counter(dropped=0, errors=0, logs_failed=0, spans_failed=0)
        self.last_error = None
        self._last_logged = 0.0
        self._queue = queue.Queue(max_queue)
        self._runs = {}              # run id -> (span, identity attributes, context)
        self._closed = False
        self._setup(timeout, schedule_delay_s)
        self._worker = threading.Thread(target=self._work, name="aw-otlp", daemon=True)
        self._worker.start()

    def _setup(self, timeout, delay_s):
        from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        # the SDK logs every failed request itself, through the logging
        # module, into the daemon's log: ours says it once a minute, counted
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        resource = Resource.create({"service.name": "agentwatch", "host.name": os.uname().nodename,
                                    "agentwatch.daemon.pid": os.getpid()})
        delay_ms = int(delay_s * 1000)
        self.logger_provider = LoggerProvider(resource=resource)
        self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(
            _Counted(OTLPLogExporter(endpoint=f"{self.endpoint}/v1/logs", timeout=timeout), "logs", self),
            schedule_delay_millis=delay_ms))
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(
            _Counted(OTLPSpanExporter(endpoint=f"{self.endpoint}/v1/traces", timeout=timeout), "spans", self),
            schedule_delay_millis=delay_ms))
        self.logger = self.logger_provider.get_logger("agentwatch")
        self.tracer = self.tracer_provider.get_tracer("agentwatch")

    # -- counters ------------------------------------------------------------------------
    def count(self, key, n=1):
        self.counters[key] += n

    def failed(self, signal, n):
        now = time.monotonic()
        if now - self._last_logged >= LOG_FAILURE_EVERY_S:
            self._last_logged = now
            self.log(f"OTLP: {n} {signal} record(s) not exported to {self.endpoint} "
                     f"({self.counters[f'{signal}_failed']} so far){': ' + self.last_error if self.last_error else ''}")

    def stats(self):
        return dict(self.counters, queued=self._queue.qsize())

    # -- the bus's side ------------------------------------------------------------------
    def feed(self, ev):
        try:
            self._queue.put_nowait(ev)
        except queue.Full:
            self.counters["dropped"] += 1

    def run_done(self, run_id, failed=False):
        """The daemon is done with the run: a span still open (the run
        logged no end: an internal error) ends now, as an error."""
        self.feed(("done", run_id))

    # -- our worker ------------------------------------------------------------------------
    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if isinstance(item, tuple):
                    self._end_span(item[1], None)
                else:
                    self._event(item)
            except Exception as e:   # noqa: BLE001 - one bad event never stops the export
                self.counters["errors"] += 1
                self.last_error = f"{type(e).__name__}: {e}"

    def _event(self, ev):
        from opentelemetry import trace
        if ev.kind == "lifecycle" and ev.phase == "start":
            identity = identity_attributes(ev.detail)
            start = (ev.detail or {}).get("start_time") or ev.ts
            span = self.tracer.start_span("agentwatch run", attributes=identity, start_time=int(start * 1e9))
            self._runs[ev.run_id] = (span, identity, trace.set_span_in_context(span))
        span, identity, ctx = self._runs.get(ev.run_id) or (None, {}, None)
        if ev.kind == "lifecycle" and ev.phase == "seal":
            return                   # the log's signed head: for the log, not for a collector
        if self.kinds is None or ev.kind in self.kinds:
            self._emit(ev, identity, ctx)
        if ev.kind == "lifecycle" and ev.phase == "end":
            self._end_span(ev.run_id, ev)

    def _emit(self, ev, identity, ctx):
        from opentelemetry._logs import SeverityNumber
        sev = severity(ev)
        self.logger.emit(timestamp=int(ev.ts * 1e9), observed_timestamp=time.time_ns(), context=ctx,
                         severity_text=sev, severity_number=getattr(SeverityNumber, sev),
                         body=ev.to_json(), attributes=event_attributes(ev, identity),
                         event_name=f"agentwatch.{ev.kind}")
        self.counters["logs"] += 1

    def _end_span(self, run_id, ev):
        from opentelemetry.trace import Status, StatusCode
        entry = self._runs.pop(run_id, None)
        if entry is None:
            return
        span = entry[0]
        if ev is None:
            span.set_status(Status(StatusCode.ERROR, "failed: the run logged no end"))
            span.set_attribute("agentwatch.outcome", "failed")
            span.end()
        else:
            d = ev.detail or {}
            term = d.get("termination") or {}
            out = outcome(d)
            attrs = {"agentwatch.outcome": out, "agentwatch.exit_status": d.get("exit_status"),
                     "agentwatch.termination.reason": term.get("reason"),
                     "agentwatch.termination.condition": term.get("condition"),
                     "agentwatch.killed_for": d.get("killed_for"), "agentwatch.events": d.get("events"),
                     "agentwatch.violations": (d.get("violations") or {}).get("violations"),
                     "agentwatch.lost_events": d.get("lost_events")}
            span.set_attributes({k: v for k, v in attrs.items() if v is not None})
            if out in OK_OUTCOMES:
                span.set_status(Status(StatusCode.OK))
            else:
                why = term.get("condition") or d.get("killed_for") or f"exit status {d.get('exit_status')}"
                span.set_status(Status(StatusCode.ERROR, f"{out}: {why}"))
            span.end(end_time=int(ev.ts * 1e9))
        self.counters["spans"] += 1

    # -- the end ---------------------------------------------------------------------------
    def close(self, timeout=5.0):
        """Export what is queued (open spans end as failed), then stop;
        waits timeout seconds at most, whatever the collector does."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        for run_id in list(self._runs):
            self.run_done(run_id)
        try:
            self._queue.put(None, timeout=max(0.1, deadline - time.monotonic()))
        except queue.Full:
            pass
        self._worker.join(max(0.1, deadline - time.monotonic()))

        def flush():
            for provider in (self.tracer_provider, self.logger_provider):
                provider.force_flush()
                provider.shutdown()
        t = threading.Thread(target=flush, name="aw-otlp-close", daemon=True)
        t.start()
        t.join(max(0.1, deadline - time.monotonic()))
        if t.is_alive():
            self.log(f"OTLP: gave up flushing to {self.endpoint} after {timeout:g} s")
            self.counters["unflushed_at_close"] += 1
