"""Prometheus metrics of a daemon (docs/export.md): what its runs logged,
counted as their events pass on each run's bus (engine/bus.py), and what
the kernel and the services count, read when the endpoint is scraped.

`Metrics.feed` is a bus callback: it runs on the sensors' reader thread,
under the monitor's lock, so it only adds to a few dicts. Everything else
(the rings' counters, the BPF programs' statistics, the gateway's queue)
is read by `collect`, on the scraping thread, from callables the daemon
hands in. The registry is one of our own, never prometheus_client's
global one (nothing a library registers there leaks into ours).
"""
import collections
import ctypes
import os
import threading

from ..core.errors import UsageError

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
BPF_STATS_CAVEAT = ("non-zero only while kernel.bpf_stats_enabled=1 "
                    "(agentwatch daemon start --bpf-stats)")
FINISHED = "finished"        # Metrics.runs: run id -> this once its end was counted


def parse_address(text, what="--metrics"):
    """'HOST:PORT', '[V6]:PORT' or 'PORT' (on 127.0.0.1) -> (host, port)."""
    text = (text or "").strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT or PORT (e.g. 127.0.0.1:9464)")
    return host, int(port)


def outcome(detail):
    """A run's end event detail -> its outcome label: the termination's
    reason (done, loop, budget, timeout, violation, stopped, ...), and for
    an agent that simply exited, exit_ok or exit_error by its status."""
    term = (detail or {}).get("termination") or {}
    reason = term.get("reason") or "exit"
    if reason == "exit":
        return "exit_ok" if detail.get("exit_status") == 0 else "exit_error"
    return reason


class Metrics:
    """The counters fed from the runs' events, and the collector that
    turns them and the live sources into metric families.

    sources: name -> callable, each read at scrape time (an exception in
    one is counted in agentwatch_export_errors_total{sink="metrics"} and
    the others still report): "sensors" -> Sensors.counters(), "gateway"
    -> the gateway's stats dict (harness/gateway.py Gateway.stats), "runs"
    -> how many runs the daemon serves now, "bpf" -> bpf_programs(),
    "bpf_stats" -> whether kernel.bpf_stats_enabled is on, "exporters" ->
    {sink: {counter: n}} of the other sinks (OTLP's drops and failures)."""

    kinds = None                     # every event kind (a bus subscription's filter)

    def __init__(self, sources=None):
        self.sources = dict(sources or {})
        self._lock = threading.Lock()
        self.events = collections.Counter()          # kind
        self.violations = collections.Counter()      # (category, rule, agent, action)
        self.flows = collections.Counter()           # egress guard flow decision
        self.guard = collections.Counter()           # the egress guard's per-run counters, summed at each end
        self.finished = collections.Counter()        # outcome
        self.runs = {}                               # run id -> agent while it runs, FINISHED after
        self.started = 0
        self.errors = 0

    # -- the bus's side (the reader's thread) ---------------------------------------------
    def feed(self, ev):
        try:
            with self._lock:
                self._count(ev)
        except Exception:            # noqa: BLE001 - the bus would drop us for good
            self.errors += 1

    def _count(self, ev):
        kind = ev.kind
        self.events[kind] += 1
        if kind == "violation":
            self.violations[(ev.category, ev.rule, ev.agent or "", ev.action)] += ev.count or 1
        elif kind == "flow":
            self.flows[ev.decision or "unknown"] += 1
        elif kind == "lifecycle" and ev.phase == "start":
            self.started += 1
            self.runs[ev.run_id] = ev.agent
        elif kind == "lifecycle" and ev.phase == "end":
            self.finished[outcome(ev.detail)] += 1
            self.runs[ev.run_id] = FINISHED
            guard = ((ev.detail or {}).get("kernel_denials") or {}).get("egress-guard") or {}
            for k, v in guard.items():
                if isinstance(v, int):
                    self.guard[k] += v

    def run_done(self, run_id, failed=False):
        """The daemon is done with a run: one that started but logged no
        end (an internal error) counts as outcome "failed"."""
        with self._lock:
            state = self.runs.pop(run_id, None)
            if state is not None and state != FINISHED:
                self.finished["failed"] += 1

    # -- prometheus_client's side (the scraping thread) -----------------------------------
    def describe(self):
        return []                    # no names up front: a registry of our own, nothing to clash with

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        with self._lock:
            events, violations = dict(self.events), dict(self.violations)
            flows, guard, finished = dict(self.flows), dict(self.guard), dict(self.finished)
            started = self.started
            running = sum(1 for v in self.runs.values() if v != FINISHED)

        def counter(name, doc, labels, items):
            m = CounterMetricFamily(name, doc, labels=labels)
            for key, value in sorted(items.items()):
                m.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return m

        yield counter("agentwatch_events", "Events the daemon's runs logged, by kind.", ["kind"], events)
        yield counter("agentwatch_violations", "Violations the daemon's runs reported (a repeat total "
                      "counts each repeat).", ["category", "rule", "agent", "action"], violations)
        yield counter("agentwatch_runs_started", "Runs whose agent started.", [], {(): started})
        yield counter("agentwatch_runs_finished", "Runs that ended, by outcome (the termination reason; "
                      "exit_ok / exit_error for an agent that exited by itself; failed: no end logged).",
                      ["outcome"], finished)
        yield counter("agentwatch_egress_flows", "Egress guard flows and DNS answers, by decision.",
                      ["decision"], flows)
        yield counter("agentwatch_egress_guard", "The egress guard's per-run counters, summed over the "
                      "runs that ended.", ["counter"], guard)
        active = self._source("runs")
        g = GaugeMetricFamily("agentwatch_runs_active", "Runs the daemon serves now.")
        g.add_metric([], running if active is None else active)
        yield g
        yield from self._rings()
        yield from self._bpf()
        yield from self._gateway()
        exporters = self._source("exporters") or {}
        errors = {(s, k): v for s, c in exporters.items() for k, v in c.items()}
        errors[("metrics", "errors")] = self.errors
        yield counter("agentwatch_export", "The exporters' own counters: OTLP records dropped (queue "
                      "full), export failures, metrics collection errors.", ["sink", "counter"], errors)

    def _source(self, name):
        fn = self.sources.get(name)
        if fn is None:
            return None
        try:
            return fn()
        except Exception:            # noqa: BLE001 - one source's failure never hides the others
            self.errors += 1
            return None

    def _rings(self):
        from prometheus_client.core import CounterMetricFamily
        c = self._source("sensors")
        if not c:
            return
        for field, doc in (("submitted", "Records the BPF programs submitted to the ring."),
                           ("lost", "Records the kernel dropped: the ring was full (lost events)."),
                           ("received", "Records the daemon read from the ring.")):
            m = CounterMetricFamily(f"agentwatch_ring_records_{field}", doc, labels=["ring"])
            for ring, counts in sorted((c.get("rings") or {}).items()):
                m.add_metric([ring], counts.get(field, 0))
            yield m
        for key, doc in (("lost_stash", "Records lost because the in-kernel stash (syscall entry "
                                        "arguments kept for the exit) was full."),
                         ("killed_in_kernel", "Processes the BPF programs killed (a kill action "
                                              "decided in the kernel)."),
                         ("folded", "Repeated records folded in the kernel into one.")):
            m = CounterMetricFamily(f"agentwatch_{key}", doc)
            m.add_metric([], c.get(key, 0))
            yield m

    def _bpf(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        progs = self._source("bpf")
        if progs is None:
            return
        labels = ["prog_id", "name", "type"]
        run_time = CounterMetricFamily("agentwatch_bpf_prog_run_time_seconds", "Time the kernel spent in "
                                       f"each of the daemon's BPF programs; {BPF_STATS_CAVEAT}.", labels=labels)
        run_cnt = CounterMetricFamily("agentwatch_bpf_prog_run_count", "Times each of the daemon's BPF "
                                      f"programs ran; {BPF_STATS_CAVEAT}.", labels=labels)
        for p in progs:
            key = [str(p["prog_id"]), p["name"], p["type"]]
            run_time.add_metric(key, p["run_time_ns"] / 1e9)
            run_cnt.add_metric(key, p["run_cnt"])
        yield run_time
        yield run_cnt
        enabled = self._source("bpf_stats")
        if enabled is not None:
            g = GaugeMetricFamily("agentwatch_bpf_stats_enabled", "1 while the kernel counts BPF "
                                  "programs' run time and runs (kernel.bpf_stats_enabled).")
            g.add_metric([], 1 if enabled else 0)
            yield g

    def _gateway(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        st = self._source("gateway")
        if not st:
            return
        m = CounterMetricFamily("agentwatch_gateway", "The LLM gateway's counters (requests, refusals, "
                                "upstream errors, ...).", labels=["counter"])
        for k, v in sorted((st.get("counters") or {}).items()):
            m.add_metric([k], v)
        yield m
        sched = st.get("scheduler")
        for name, value, doc in (
                ("agentwatch_gateway_queue_depth", getattr(sched, "queued", None),
                 "LLM requests waiting for an inference slot."),
                ("agentwatch_gateway_in_flight", getattr(sched, "in_flight", None),
                 "LLM requests holding an inference slot."),
                ("agentwatch_gateway_slots", getattr(sched, "cap", None),
                 "Inference slots (the gateway's max_concurrent)."),
                ("agentwatch_gateway_clients", st.get("active_clients"), "Open client connections.")):
            if value is not None:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g

    def registry(self):
        from prometheus_client import CollectorRegistry
        reg = CollectorRegistry(auto_describe=False)
        reg.register(self)
        return reg


# -- the daemon's own BPF programs ---------------------------------------------------------
class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (uapi/linux/bpf.h) up to its name."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
_BPF_OBJ_GET_INFO_BY_FD, _BPF_ENABLE_STATS, _BPF_STATS_RUN_TIME = 15, 32, 0
_libc = None


def _bpf(cmd, attr):
    global _libc
    if _SYS_BPF is None:
        return -1
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))


def _prog_name(fd):
    """The program's name as the kernel keeps it (16 bytes at most), or ""."""
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    if _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        return ""
    return info.name.decode(errors="replace")


def bpf_programs(proc="/proc/self"):
    """The BPF programs this process holds a descriptor of, from
    <proc>/fdinfo/<fd>: [{prog_id, name, type, run_time_ns, run_cnt}],
    one per program (several descriptors of one program count once).
    run_time_ns and run_cnt are the kernel's, counted only while
    kernel.bpf_stats_enabled=1."""
    progs = {}
    try:
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            if os.readlink(f"{proc}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"{proc}/fdinfo/{fd}") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue             # closed meanwhile
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        try:
            prog_id = int(fields["prog_id"])
        except (KeyError, ValueError):
            continue
        if prog_id in progs:
            continue
        progs[prog_id] = {"prog_id": prog_id, "type": fields.get("prog_type", ""),
                          "name": _prog_name(int(fd)) if proc == "/proc/self" else "",
                          "run_time_ns": int(fields.get("run_time_ns", 0)),
                          "run_cnt": int(fields.get("run_cnt", 0))}
    return [progs[k] for k in sorted(progs)]


def bpf_stats_enabled(path=BPF_STATS_SYSCTL):
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return None


class BpfStats:
    """kernel.bpf_stats_enabled on for as long as this object is open.

    BPF_ENABLE_STATS (Linux 5.8) hands out a descriptor that keeps the
    statistics on while it is open: the kernel turns them off again when
    the last holder closes it, even if the daemon dies by SIGKILL, and
    someone else's setting is never overwritten. Older kernels: the
    sysctl is written, and its old value written back at close."""

    def __init__(self, path=BPF_STATS_SYSCTL):
        self.path = path
        self.fd = -1
        self.restore = None          # the sysctl's old value, when we wrote it
        self.how = None

    def open(self):
        fd = _bpf(_BPF_ENABLE_STATS, _StatsAttr(type=_BPF_STATS_RUN_TIME))
        if fd >= 0:
            self.fd, self.how = fd, "BPF_ENABLE_STATS"
            return self
        try:
            with open(self.path) as f:
                old = f.read().strip()
            if old != "1":
                with open(self.path, "w") as f:
                    f.write("1")
                self.restore = old
            self.how = "sysctl"
        except OSError as e:
            raise UsageError(f"--bpf-stats: cannot enable kernel.bpf_stats_enabled: {e.strerror}") from None
        return self

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.restore is not None:
            try:
                with open(self.path, "w") as f:
                    f.write(self.restore)
            except OSError:
                pass
            self.restore = None


class MetricsServer:
    """/metrics over HTTP on (host, port), in a thread of its own."""

    def __init__(self, registry, host, port):
        from prometheus_client import start_http_server
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise UsageError(f"--metrics {host}:{port}: {e.strerror}") from None
        self.host, self.port = host, self.server.server_address[1]

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
