"""agentwatch run"""
import click

from agentwatch.runner import RunOptions, run_agent


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="YAML policy the agent runs under (identity, permissions).")
@click.option("--name", help="Agent name recorded in the run identity "
                             "(default: the policy's identity.name, else the command name).")
@click.option("--events", "events_path", type=click.Path(dir_okay=False),
              help="Also write every event of the run to this JSON Lines file.")
@click.option("--show/--quiet", default=False,
              help="Print each event to stderr as it happens.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def run(ctx, policy_path, name, events_path, show, command):
    """Run COMMAND as a monitored agent: agentwatch run [OPTIONS] -- CMD [ARG...]

    The exit status is the agent's own (128+N when a signal N killed it)."""
    code = run_agent(RunOptions(argv=list(command), policy_path=policy_path, name=name,
                                events_path=events_path, show=show))
    ctx.exit(code)
