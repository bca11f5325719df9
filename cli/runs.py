"""agentwatch tail | ps | gc: looking at runs, live or finished."""
import json
import sys
import time

import click

from agentwatch import api


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--run", "run_id", help="Only this run (id or prefix); replays it from its start.")
@click.option("--agent", help="Only agents with this name (glob).")
@click.option("--kind", "kinds", multiple=True, help="Only these event kinds (repeatable).")
@click.option("--violations", is_flag=True, help="Only violations.")
@click.option("--since", help="Also replay events newer than this: 30s, 10m, 2h, ISO date.")
@click.option("--follow/--no-follow", "follow_", default=True, help="Keep following (default) or stop at the end.")
def tail(as_json, run_id, agent, kinds, violations, since, follow_):
    """Follow the live event stream of all running agents."""
    try:
        since_ts = api.parse_since(since) if since else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since")
    color = sys.stdout.isatty()
    try:
        for d in api.follow_events(run=run_id, agent=agent, kinds=kinds, violations=violations,
                                   since=since_ts, follow=follow_):
            if as_json:
                sys.stdout.write(json.dumps(d, separators=(",", ":")) + "\n")
            else:
                sys.stdout.write(api.format_event(d, color) + "\n")
            sys.stdout.flush()
    except api.NotFoundError as e:
        raise click.ClickException(str(e))
    except (KeyboardInterrupt, BrokenPipeError):
        pass


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Include finished runs.")
@click.option("--json", "as_json", is_flag=True)
def ps(show_all, as_json):
    """List running agents: identity, pid count, events and drops."""
    rows = [{"run_id": r.run_id, "agent": r.agent, "status": r.status, "root_pid": r.root_pid,
             "pids": r.pids, "events": r.events, "lost": r.lost, "started": r.started,
             "policy": r.policy, "policy_digest": r.policy_digest, "command": " ".join(r.command),
              "crash": r.crash}
            for r in api.list_runs(running_only=not show_all)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no running agents" if not show_all else "no runs", err=True)
        return
    fmt = "{:<24} {:<16} {:<8} {:>7} {:>5} {:>9} {:>6}  {:<8}  {}"
    click.echo(fmt.format("RUN_ID", "AGENT", "STATUS", "PID", "PIDS", "EVENTS", "LOST", "STARTED", "COMMAND"))
    for r in rows:
        started = time.strftime("%H:%M:%S", time.localtime(r["started"])) if r["started"] else "-"
        click.echo(fmt.format(r["run_id"], str(r["agent"])[:16], r["status"], r["root_pid"] or "-",
                              r["pids"], r["events"], r["lost"], started, r["command"][:60]))


@click.command()
def gc():
    """Remove cgroups and mark records left by an agentwatch that crashed."""
    swept = api.gc(log=lambda m: click.echo(m, err=True))
    click.echo(f"swept {len(swept)} stale run(s)")
