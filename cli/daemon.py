"""agentwatch daemon start | stop | status | run: the shared monitor."""
import os
import time

import click

from agentwatch import api


@click.group("daemon")
def daemon_group():
    """One loaded monitor that every 'agentwatch run' on this host shares
    (start-up without a BPF compile, one set of sensors for all agents)."""


def export_options(f):
    """--metrics, --otlp, --otlp-events, --bpf-stats (docs/export.md)."""
    for opt in reversed((
            click.option("--metrics", metavar="HOST:PORT",
                         help="Serve Prometheus metrics on http://HOST:PORT/metrics (PORT alone: "
                              "127.0.0.1; e.g. 127.0.0.1:9464). Off unless given (or AGENTWATCH_METRICS)."),
            click.option("--otlp", metavar="URL",
                         help="Send violations and lifecycle events as OTLP logs, each run as a span, "
                              "to this OTLP/HTTP collector (e.g. http://127.0.0.1:4318; default: "
                              "AGENTWATCH_OTLP or OTEL_EXPORTER_OTLP_ENDPOINT)."),
            click.option("--otlp-events", type=click.Choice(["violations", "all"]),
                         help="What --otlp sends as logs: violations and lifecycle events (the "
                              "default), or every event (high rate)."),
            click.option("--bpf-stats", is_flag=True, default=None,
                         help="Turn kernel.bpf_stats_enabled on while the daemon runs, so the "
                              "metrics' per-program run time and run count are counted."))):
        f = opt(f)
    return f


def _export_env(metrics, otlp, otlp_events, bpf_stats):
    """The daemon reads what to export from its environment (docs/export.md)."""
    os.environ.update(api.export_env(metrics, otlp, otlp_events, bpf_stats))


def _export_line(st):
    ex = st.raw.get("export") or {}
    parts = ([f"metrics on {ex['metrics']}"] if ex.get("metrics") else []) + \
            ([f"OTLP to {ex['otlp']} ({ex['otlp_events']})"] if ex.get("otlp") else []) + \
            (["BPF statistics on"] if ex.get("bpf_stats") else [])
    return "; ".join(parts)


@daemon_group.command("start")
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="Where the daemon writes its log (default: <state dir>/daemon.log).")
@click.option("--gateway", "gateway", type=click.Path(dir_okay=False, exists=True),
              help="Serve the runs an LLM gateway with this config (docs/gateway.md): each "
                   "run's OpenAI and Anthropic base URLs point at it, the API keys stay here.")
@export_options
def start(log_path, gateway, metrics, otlp, otlp_events, bpf_stats):
    """Start the daemon in the background; return once it answers."""
    t0 = time.monotonic()
    _export_env(metrics, otlp, otlp_events, bpf_stats)
    click.echo("agentwatch: starting the daemon (compiling and loading the BPF sensors)...", err=True)
    st = api.daemon_start(log_path, gateway=gateway)
    gw = st.raw.get("gateway")
    export = _export_line(st)
    click.echo(f"agentwatch daemon running: pid {st.pid}, socket {st.socket}, "
               f"{st.sensors['tracepoints']} tracepoints, ready in {time.monotonic() - t0:.1f} s"
               + (f"; LLM gateway on {gw['url']}" if gw else "") + (f"; {export}" if export else ""))


@daemon_group.command("stop")
def stop():
    """Stop the daemon: its runs' agents get SIGTERM, then SIGKILL."""
    if not api.daemon_stop():
        raise click.ClickException(f"no agentwatch daemon answers on {api.daemon_socket()}")
    click.echo("agentwatch daemon stopped")


@daemon_group.command("status")
def status():
    """Whether a daemon runs, and the runs it serves (exit 1: none runs)."""
    st = api.daemon_status()
    if st is None:
        click.echo(f"no agentwatch daemon answers on {api.daemon_socket()}")
        raise SystemExit(1)
    up = time.time() - st.started
    click.echo(f"agentwatch daemon: pid {st.pid}, up {up:.0f} s, socket {st.socket}")
    click.echo(f"  sensors: {st.sensors['tracepoints']} tracepoints "
               f"({', '.join(st.sensors['groups'])})")
    c = st.counters
    click.echo(f"  records: {c['received']} received, {c['lost_events']} lost")
    gw = st.raw.get("gateway")
    if gw:
        busy = {k: v for k, v in (gw.get("counters") or {}).items() if v}
        click.echo(f"  LLM gateway: {gw['url']} ({gw['config']}); "
                   + (", ".join(f"{k} {v}" for k, v in sorted(busy.items())) or "no calls yet"))
    br = st.raw.get("broker")
    if br:
        busy = {k: br[k] for k in ("messages", "tool_calls", "refused", "rate_limited", "errors") if br.get(k)}
        click.echo(f"  broker: {br['socket']} and {br['url']}; {br['messages_stored']} message(s) stored"
                   + "".join(f", {k} {v}" for k, v in busy.items()))
    export = _export_line(st)
    if export:
        click.echo(f"  export: {export}")
    click.echo(f"  runs: {len(st.runs)}")
    for r in st.runs:
        click.echo(f"    {r.run_id}  {r.agent or '?'}  agent pid {r.root_pid or '-'}  "
                   f"for pid {r.client['pid']}")


@daemon_group.command("run")
@click.option("--gateway", "gateway", type=click.Path(dir_okay=False, exists=True),
              help="Serve the runs an LLM gateway with this config (as 'daemon start --gateway').")
@export_options
def run_foreground(gateway, metrics, otlp, otlp_events, bpf_stats):
    """Serve in the foreground (for systemd, or to watch its log)."""
    _export_env(metrics, otlp, otlp_events, bpf_stats)
    api.daemon_serve(gateway=gateway)
