"""agentwatch report RUN_ID: a run's log as a terminal summary, JSON, or
one self-contained HTML page (agentwatch/sinks/report.py builds it)."""
import json
import os
import shutil
import sys

import click

from agentwatch import api

from .progress import status_line

PROGRESS_FROM = 32 << 20     # logs this big show how far the read is (stderr a terminal only)


@click.command()
@click.argument("run_id")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, writable=True),
              help="Write the report as one self-contained HTML page (no scripts, nothing fetched).")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object on stdout.")
@click.option("--color/--no-color", default=None, help="Colors in the terminal summary (default: when stdout is a terminal and NO_COLOR is unset).")
def report(run_id, html_path, as_json, color):
    """A run's report: identity, enforcement, process tree, violations, totals.

    RUN_ID is a run's id or a unique prefix of it (agentwatch ps --all), or a
    log file. Without --html or --json, a summary for the terminal."""
    status = status_line(sys.stderr, "reading the log", min_total=PROGRESS_FROM)
    try:
        rep = api.report(run_id, progress=status)
    except api.NotFoundError as e:
        raise click.ClickException(str(e))
    except OSError as e:
        raise click.ClickException(f"{run_id}: cannot read its log: {e.strerror or e}")
    finally:
        if status:
            status.clear()            # an error reads on a line of its own
    if html_path:
        page = api.render_report_html(rep)
        tmp = f"{html_path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(page)
            os.replace(tmp, html_path)
        except OSError as e:
            raise click.ClickException(f"--html {html_path}: {e.strerror or e}")
        click.echo(f"agentwatch: report of run {rep.run_id} written to {html_path}", err=True)
    if as_json:
        sys.stdout.write(json.dumps(rep.to_dict(), default=str) + "\n")
    elif not html_path:
        tty = sys.stdout.isatty()
        width = shutil.get_terminal_size().columns if tty else None
        sys.stdout.write(api.render_report_text(rep, api.use_color(sys.stdout) if color is None else color,
                                                width))
