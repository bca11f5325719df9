"""agentwatch daemon start | stop | status | run: the shared monitor."""
import time

import click

from agentwatch import api


@click.group("daemon")
def daemon_group():
    """One loaded monitor that every 'agentwatch run' on this host shares
    (start-up without a BPF compile, one set of sensors for all agents)."""


@daemon_group.command("start")
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="Where the daemon writes its log (default: <state dir>/daemon.log).")
@click.option("--gateway", "gateway", type=click.Path(dir_okay=False, exists=True),
              help="Serve the runs an LLM gateway with this config (docs/gateway.md): each "
                   "run's OpenAI and Anthropic base URLs point at it, the API keys stay here.")
def start(log_path, gateway):
    """Start the daemon in the background; return once it answers."""
    t0 = time.monotonic()
    click.echo("agentwatch: starting the daemon (compiling and loading the BPF sensors)...", err=True)
    st = api.daemon_start(log_path, gateway=gateway)
    gw = st.raw.get("gateway")
    click.echo(f"agentwatch daemon running: pid {st.pid}, socket {st.socket}, "
               f"{st.sensors['tracepoints']} tracepoints, ready in {time.monotonic() - t0:.1f} s"
               + (f"; LLM gateway on {gw['url']}" if gw else ""))


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
    click.echo(f"  runs: {len(st.runs)}")
    for r in st.runs:
        click.echo(f"    {r.run_id}  {r.agent or '?'}  agent pid {r.root_pid or '-'}  "
                   f"for pid {r.client['pid']}")


@daemon_group.command("run")
@click.option("--gateway", "gateway", type=click.Path(dir_okay=False, exists=True),
              help="Serve the runs an LLM gateway with this config (as 'daemon start --gateway').")
def run_foreground(gateway):
    """Serve in the foreground (for systemd, or to watch its log)."""
    api.daemon_serve(gateway=gateway)
