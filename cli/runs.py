"""agentwatch tail | gc: looking at runs, live or finished (ps: cli/up.py,
with the manifests' agents)."""
import json
import sys

import click

from agentwatch import api

from .progress import status_line


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
    color = api.use_color(sys.stdout)
    status = status_line(sys.stderr, "replaying")
    try:
        for d in api.follow_events(run=run_id, agent=agent, kinds=kinds, violations=violations,
                                   since=since_ts, follow=follow_, progress=status):
            if status:
                status.clear()
            if as_json:
                sys.stdout.write(json.dumps(d, separators=(",", ":")) + "\n")
            else:
                sys.stdout.write(api.format_event(d, color) + "\n")
            sys.stdout.flush()
    except api.NotFoundError as e:
        raise click.ClickException(str(e))
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    finally:
        if status:
            status.clear()


@click.command()
def gc():
    """Remove cgroups and mark records left by an agentwatch that crashed."""
    swept = api.gc(log=lambda m: click.echo(m, err=True))
    click.echo(f"swept {len(swept)} stale run(s)")
