"""agentwatch doctor"""
import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def doctor(as_json):
    """Check each kernel feature agentwatch uses, and what its absence disables."""
    from agentwatch.doctor import format_table, report, run_checks
    checks = run_checks()
    if as_json:
        click.echo(json.dumps(report(checks), indent=1))
    else:
        click.echo(format_table(checks))
