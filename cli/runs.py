"""agentwatch tail | gc: looking at runs, live or finished (ps: cli/up.py,
with the manifests' agents)."""
import json
import sys
import time

import click

from agentwatch import api


class ReplayStatus:
    """follow_events' progress as one status line on a terminal's stderr
    ('agentwatch: replaying 12.0 of 80.0 MB (15%)'), redrawn at most every
    `every` seconds, cleared before each event line and gone for good once
    the replay is over."""

    def __init__(self, stream, every=0.2):
        self.stream, self.every = stream, every
        self.shown = False
        self._next = 0.0

    def __call__(self, done, total):
        if done >= total:
            self.clear()
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every
        self.stream.write(f"\ragentwatch: replaying {done / 1e6:.1f} of {total / 1e6:.1f} MB "
                          f"({100 * done // total}%)\033[K")
        self.stream.flush()
        self.shown = True

    def clear(self):
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False
            self._next = 0.0


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
    status = ReplayStatus(sys.stderr) if sys.stderr.isatty() else None    # nothing when piped
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
