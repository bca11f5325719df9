"""The daemon's server: one loaded Monitor that every client's run shares,
a thread per client, stop signals taken by one thread that knows who sent
them. Who asks is the kernel's word (SO_PEERCRED); agents are refused."""
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from ..core import errors
from ..core.errors import AgentwatchError, UsageError
from ..run.services import RunService
from .client import ping
from .protocol import (REQUEST_TIMEOUT_S, STOP_SIGNALS, STOP_TIMEOUT_S, options_from_request, recv,
                       reply_error, send, socket_path)


class Daemon:
    """Serve runs on one Monitor until shutdown (a request, SIGTERM, SIGINT)."""

    def __init__(self, path=None, ringbuf_pages=4096, log=None, gateway=None, export=None):
        """gateway: an LLM gateway config file (harness/gateway_config.py):
        the daemon serves its runs the gateway (harness/service.py).
        export: an ExportConfig (docs/export.md); default: from the environment."""
        self.path = path or socket_path()
        self.export_config = export
        self.exporters = []          # sinks/metrics.py Metrics, sinks/otlp.py OtlpExporter
        self.metrics_server = self.otlp = self.bpf_stats = None
        self.gateway_path = gateway
        self.gateway = None
        self.broker = None               # harness/broker.py BrokerService: agent-to-agent messages
        self.ringbuf_pages = ringbuf_pages
        self.log = log or (lambda msg: print(f"agentwatch daemon: {msg}", file=sys.stderr, flush=True))
        self.monitor = None
        self.sock = None
        self.runs = {}               # run id -> Run
        self.threads = set()
        self.stopping = threading.Event()
        self.started = None

    def serve(self):
        from ..run import gc
        if os.geteuid() != 0:
            raise errors.PrivilegeError("agentwatch daemon needs root (it loads BPF programs and "
                                        "creates cgroups); run it with sudo")
        if ping(self.path) is not None:
            raise UsageError(f"an agentwatch daemon already answers on {self.path}")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        swept = gc(log=self.log)
        if swept:
            self.log(f"swept {len(swept)} run(s) a crashed agentwatch left")
        t0 = time.monotonic()
        gateway_config = None
        if self.gateway_path:        # a bad config is told before the sensors load
            from ..harness.gateway_config import GatewayConfig
            gateway_config = GatewayConfig.load(self.gateway_path)
        if self.export_config is None:      # bad values, too, are told before the sensors load
            self.export_config = ExportConfig.from_env()
        self._serve(t0, gateway_config)

    def _serve(self, t0, gateway_config):
        from ..run import Monitor
        from ..sandbox import launcher
        self.monitor = Monitor(ringbuf_pages=self.ringbuf_pages, map_exec=True).open()
        # Stop signals are taken by one thread that knows who sent them
        # (sigwaitinfo): an agent's SIGTERM would otherwise stop every run,
        # wherever no kernel layer refuses it (no policy, or a kernel with
        # neither Landlock's signal scope nor BPF LSM). Blocked here, after
        # the keeper process started (it keeps the default mask) and before
        # any thread of ours exists (the services' loops, the store writers,
        # the file watcher, the client threads), so that all of them inherit
        # the mask: a signal the kernel handed to one of them would kill the
        # daemon. The launcher clears it in the agent.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.gateway_path:
                from ..harness.service import GatewayService
                self.gateway = GatewayService(gateway_config)
                self.monitor.add_service(self.gateway)
                self.log(f"LLM gateway on {self.gateway.gateway.url} ({self.gateway_path})")
            from ..harness.broker import BrokerService
            self.broker = BrokerService(log=self.log)
            self.monitor.add_service(self.broker)
            self.log(f"broker on {self.broker.broker.socket_path} and {self.broker.broker.url}")
            self._start_export()
            launcher.set_child_subreaper()
            self._listen()
            self.started = time.time()
            self.log(f"ready on {self.path} (pid {os.getpid()}): sensors loaded in "
                     f"{time.monotonic() - t0:.1f} s, {len(self.monitor.sensors.attached)} "
                     f"tracepoints")
            threading.Thread(target=self._stop_signals, daemon=True).start()
            self._accept_loop()
        finally:
            try:
                self._shutdown()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _start_export(self):
        """Metrics, OTLP and BPF statistics, as export_config asks: each run's
        events reach them through its bus (_ExportService)."""
        cfg = self.export_config
        if cfg.bpf_stats:
            from ..sinks.metrics import BpfStats
            self.bpf_stats = BpfStats().open()
            self.log(f"BPF statistics on while the daemon runs ({self.bpf_stats.how})")
        if cfg.metrics:
            from ..sinks.metrics import Metrics, MetricsServer, bpf_programs, bpf_stats_enabled
            metrics = Metrics(sources={
                "sensors": self.monitor.sensors.counters, "runs": lambda: len(self.runs),
                "gateway": lambda: self.gateway.gateway.stats() if self.gateway else None,
                "bpf": bpf_programs,
                # BPF_ENABLE_STATS leaves the sysctl as it was: its value tells the others' setting
                "bpf_stats": lambda: self.bpf_stats is not None or bpf_stats_enabled(),
                "exporters": lambda: {"otlp": self.otlp.stats()} if self.otlp else {}})
            self.metrics_server = MetricsServer(metrics.registry(), *cfg.metrics)
            self.exporters.append(metrics)
            self.log(f"metrics on {self.metrics_server.url}")
        if cfg.otlp:
            from ..sinks.otlp import OtlpExporter
            self.otlp = OtlpExporter(cfg.otlp, events=cfg.otlp_events, log=self.log)
            self.exporters.append(self.otlp)
            self.log(f"OTLP to {self.otlp.endpoint} ({cfg.otlp_events})")
        if self.exporters:
            self.monitor.add_service(_ExportService(self.exporters))

    def _stop_export(self):
        """After the runs: their ends are exported, then the endpoints close."""
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.otlp is not None:
            self.otlp.close(OTLP_CLOSE_S)
            st = self.otlp.stats()
            self.log(f"OTLP: {st.get('logs_exported', 0)} record(s) and {st.get('spans_exported', 0)} "
                     f"span(s) exported, {st['logs_failed'] + st['spans_failed']} failed, "
                     f"{st['dropped']} dropped")
        if self.bpf_stats is not None:
            self.bpf_stats.close()
            self.bpf_stats = None

    def _stop_signals(self):
        """Stop on SIGTERM, SIGINT or SIGHUP, unless an agent sent it."""
        while not self.stopping.is_set():
            info = signal.sigwaitinfo(STOP_SIGNALS)
            name = signal.Signals(info.si_signo).name
            try:
                self._refuse_agents(info.si_pid, f"signal {name}")
            except errors.PrivilegeError:
                continue               # refused and reported on the agent's run
            self.log(f"{name} from pid {info.si_pid}: stopping")
            self.stopping.set()

    def _listen(self):
        try:
            os.unlink(self.path)          # stale: nobody answered on it
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.settimeout(0.2)
        self.sock = sock

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                with self.monitor.lock:       # orphans re-parented to us while no run reaps
                    self.monitor.reap()
                continue
            except InterruptedError:
                continue
            conn.settimeout(REQUEST_TIMEOUT_S)
            t = threading.Thread(target=self._client, args=(conn,), daemon=True)
            self.threads.add(t)
            t.start()

    def _shutdown(self):
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        runs = list(self.runs.values())
        if runs:
            self.log(f"stopping {len(runs)} run(s)")
        for run in runs:
            run.stop(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for t in list(self.threads):
            t.join(max(0.1, deadline - time.monotonic()))
        self._stop_export()
        if self.gateway is not None:     # after the runs: their last calls are logged
            self.gateway.close()
            self.gateway = None
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        self.log("stopped")

    # -- one client ----------------------------------------------------------------------
    def _client(self, conn):
        fds, pid = [], "?"
        try:
            with conn:
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                try:
                    req, fds = recv(conn, maxfds=3)
                    if req is None:
                        return
                    conn.settimeout(None)        # a run's connection lasts as long as the run
                    if uid != 0:
                        raise errors.PrivilegeError("agentwatch run needs root (it creates cgroups "
                                                    "and loads BPF programs); run it with sudo")
                    op = req.get("op")
                    self._refuse_agents(pid, op)
                    if op == "status":
                        send(conn, self.status())
                    elif op == "shutdown":
                        self.log(f"shutdown asked by pid {pid}")
                        self.stopping.set()
                        send(conn, {"ok": True, "pid": os.getpid()})
                    elif op == "run":
                        self._run(conn, req, fds, {"pid": pid, "uid": uid, "gid": gid,
                                                   "via": "agentwatch daemon"})
                    else:
                        raise UsageError(f"agentwatch daemon: unknown request {op!r}")
                except AgentwatchError as e:
                    reply_error(conn, e)
                except OSError:
                    raise
                except Exception:
                    self.log("internal error:\n" + traceback.format_exc())
                    reply_error(conn, AgentwatchError("internal error in the agentwatch daemon; "
                                                       "its log has the details"))
        except OSError as e:
            self.log(f"client pid {pid}: {e}")
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.threads.discard(threading.current_thread())

    def _refuse_agents(self, pid, op):
        """A process inside a run's cgroup (an agent, even one running as
        root under a permissive policy) gets nothing from the daemon: a run
        it starts would be outside its own sandbox and monitoring, a
        shutdown would stop every agent. Reported on its run."""
        from ..sandbox.cgroups import run_of_pid
        run_id = run_of_pid(pid)
        if run_id is None:
            return
        self.log(f"refused {op!r} from pid {pid}, an agent of run {run_id}")
        run = self.runs.get(run_id)
        if run is not None:
            run.refuse_request(pid, op)
        raise errors.PrivilegeError(f"the agentwatch daemon refuses requests from agents: pid {pid} "
                                    f"runs in the cgroup of run {run_id}")

    def _run(self, conn, req, fds, client):
        from ..run import Run
        if len(fds) != 3:
            raise UsageError("agentwatch daemon: a run request carries stdin, stdout and stderr")
        if self.stopping.is_set():
            raise UsageError("the agentwatch daemon is shutting down")
        opts = options_from_request(req.get("options"))
        opts.stdio, opts.client = tuple(fds), client
        err = ClientStream(os.dup(fds[2]))
        opts.stderr = err
        run = Run(opts, monitor=self.monitor)
        self.runs[run.run_id] = run
        watcher = threading.Thread(target=self._watch_client, args=(conn, run), daemon=True)
        watcher.start()
        self.log(f"run {run.run_id}: {' '.join(opts.argv)} for pid {client['pid']}")
        t0 = time.monotonic()
        try:
            code = run.execute()
            if run.summary:
                print(run.summary, file=err)
            err.close()                        # written out before the client exits
            send(conn, {"exit": code, "run_id": run.run_id, "summary": run.summary})
            self.log(f"run {run.run_id}: exited {code} after {time.monotonic() - t0:.3f} s")
        except AgentwatchError as e:
            self.log(f"run {run.run_id}: {e}")
            raise
        except Exception as e:
            self.log(f"run {run.run_id}: internal error:\n" + traceback.format_exc())
            raise AgentwatchError(f"internal error in the agentwatch daemon (run {run.run_id}): "
                                  f"{type(e).__name__}: {e}; its log has the details") from None
        finally:
            self.runs.pop(run.run_id, None)
            for sink in self.exporters:
                sink.run_done(run.run_id)
            try:
                conn.shutdown(socket.SHUT_RD)   # wakes the watcher (EOF) before conn closes
            except OSError:
                pass
            watcher.join(5)
            err.close()

    def _watch_client(self, conn, run):
        """Forward the client's signals to its run; its going away is SIGHUP."""
        while True:
            try:
                msg, _ = recv(conn)
            except (OSError, AgentwatchError):
                msg = None
            if run.run_id not in self.runs:
                return                   # the run is over (its end woke us)
            if msg is None:
                if run.exit_status is None:
                    self.log(f"run {run.run_id}: the client went away: stopping the agent")
                    run.stop(signal.SIGHUP)
                return
            if msg.get("op") == "signal" and msg.get("signum") in (signal.SIGINT, signal.SIGTERM,
                                                                    signal.SIGHUP):
                run.stop(msg["signum"])

    def status(self):
        s = self.monitor.sensors
        return {"pid": os.getpid(), "started": self.started, "socket": self.path,
                "runs": [r.info() for r in list(self.runs.values())],
                "sensors": {"tracepoints": len(s.attached), "groups": s.groups,
                            "map_exec": s.map_exec},
                "counters": {k: v for k, v in s.counters().items() if not isinstance(v, (list, dict))},
                "broker": None if self.broker is None else self.broker.stats(),
                "export": self._export_status(),
                "gateway": None if self.gateway is None else {
                    "url": self.gateway.gateway.url, "config": self.gateway_path,
                    "counters": dict(self.gateway.gateway.counters),
                    "runs": {r: self.gateway.run_stats(r) for r in list(self.runs)}}}

    def _export_status(self):
        cfg = self.export_config
        if cfg is None or not (cfg.metrics or cfg.otlp or cfg.bpf_stats):
            return None
        return {"metrics": self.metrics_server.url if self.metrics_server else None,
                "otlp": self.otlp.endpoint if self.otlp else None,
                "otlp_events": cfg.otlp_events if self.otlp else None,
                "otlp_counters": self.otlp.stats() if self.otlp else None,
                "bpf_stats": self.bpf_stats.how if self.bpf_stats else None}


OTLP_CLOSE_S = 5.0               # a dead collector holds the shutdown up this long at most
ENV = {"metrics": "AGENTWATCH_METRICS", "otlp": "AGENTWATCH_OTLP", "otlp_events": "AGENTWATCH_OTLP_EVENTS",
       "bpf_stats": "AGENTWATCH_BPF_STATS"}


@dataclass
class ExportConfig:
    """What the daemon exports (docs/export.md): metrics (host, port) of
    its /metrics endpoint, otlp the collector's base URL, otlp_events
    violations | all, bpf_stats: kernel.bpf_stats_enabled on while it runs.
    `agentwatch daemon start --metrics ...` sets the environment the
    daemon reads this from (as a systemd unit's Environment= would)."""
    metrics: tuple = None
    otlp: str = None
    otlp_events: str = "violations"
    bpf_stats: bool = False

    @classmethod
    def from_env(cls, environ=os.environ):
        from ..sinks.metrics import parse_address
        from ..sinks.otlp import EVENT_MODES, check_endpoint, endpoint_from_env
        metrics = environ.get(ENV["metrics"])
        otlp = endpoint_from_env(environ)
        events = environ.get(ENV["otlp_events"]) or "violations"
        if events not in EVENT_MODES:
            raise UsageError(f"{ENV['otlp_events']}={events}: expected one of {', '.join(EVENT_MODES)}")
        return cls(metrics=parse_address(metrics, ENV["metrics"]) if metrics else None,
                   otlp=check_endpoint(otlp) if otlp else None, otlp_events=events,
                   bpf_stats=environ.get(ENV["bpf_stats"], "") not in ("", "0", "no", "false"))


class _ExportService(RunService):
    """The exporters as a service of the Monitor (run/services.py): each
    follows every run's bus with a callback (O(1): a count, or an append
    to its own bounded queue), as the memory keeper does."""

    name = "export"

    def __init__(self, sinks):
        self.sinks = sinks

    def open_run(self, run):
        if run.subscribe is not None:
            for sink in self.sinks:
                run.subscribe(maxsize=1, kinds=sink.kinds, callback=sink.feed)
        return {}


class ClientStream:
    """A client's stderr as the daemon's run writes it (plan lines, --show
    events, the summary): through a bounded queue to a thread of its own, so
    a slow or stopped terminal never blocks the thread that holds the
    monitor's lock (--show writes an event while the rings are read for
    every run). Lines beyond the queue are dropped, and counted at close."""

    def __init__(self, fd, max_items=20000):
        self._file = os.fdopen(fd, "w", buffering=1, errors="replace")
        self._queue = queue.Queue(max_items)
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def isatty(self):
        return self._file.isatty()

    def write(self, text):
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1
        return len(text)

    def flush(self):
        pass                  # the pump writes line by line

    def _pump(self):
        while True:
            text = self._queue.get()
            if text is None:
                return
            try:
                self._file.write(text)
            except (OSError, ValueError):
                pass          # the client's stderr is gone: nothing to tell

    def close(self, timeout=5.0):
        """Write out what is queued (waiting up to timeout), then close."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.dropped:
                self._queue.put(f"agentwatch: {self.dropped} line(s) of output dropped: "
                                "stderr did not keep up (the run log has every event)\n", timeout=timeout)
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self._file.close()
            except OSError:
                pass


def main():
    """`python -m agentwatch.daemon`: serve in the foreground."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m agentwatch.daemon")
    ap.add_argument("--gateway", help="LLM gateway config file")
    args = ap.parse_args()
    try:
        Daemon(gateway=args.gateway).serve()
    except AgentwatchError as e:
        print(f"agentwatch daemon: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
