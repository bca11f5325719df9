"""agentwatch policy lint | explain | diff"""
import click

from agentwatch import api

_FILE = click.Path(dir_okay=True)      # lint reports unreadable files itself, in its format


@click.group()
def policy():
    """Check, explain and compare permission policies (docs/policy.md)."""


def _load_or_exit(ctx, path):
    """The policy, or its errors on stderr (FILE:LINE:COL: ...) and exit 1."""
    checked = api.check_policy(path)
    if not checked.ok:
        for p in checked.problems:
            click.echo(str(p), err=True)
        ctx.exit(1)
    return checked.policy


@policy.command()
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--strict", is_flag=True, help="Warnings fail the lint too.")
@click.pass_context
def lint(ctx, files, strict):
    """Check policy FILEs: one FILE:LINE:COL line per problem on stdout.

    Exit 1 on any error (with --strict, on any warning too), else 0."""
    result = api.lint_policies(files)
    for line in result.lines():
        click.echo(line)
    click.echo(result.summary(), err=True)
    ctx.exit(result.exit_code(strict))


@policy.command()
@click.argument("file", type=_FILE)
@click.option("--workspace", type=click.Path(file_okay=False),
              help="Directory ${WORKSPACE} stands for (default: the current directory).")
@click.pass_context
def explain(ctx, file, workspace):
    """Say in plain language what FILE allows, after extends and variables."""
    pol = _load_or_exit(ctx, file)
    click.echo(api.explain_policy(pol, workspace), nl=False)
    # what the kernel would hold for a run of it here (issue #14: no silent widening)
    lines = [""] + api.describe_enforcement(pol, workspace)
    click.echo("".join(f"{line}\n" for line in lines), nl=False)


@policy.command()
@click.argument("old", type=_FILE)
@click.argument("new", type=_FILE)
@click.pass_context
def diff(ctx, old, new):
    """What changing OLD into NEW grants (+), revokes (-) or changes (~).

    Exit 0 whether or not permissions change ("no permission changes" when
    none); 1 when either file is invalid."""
    a, b = _load_or_exit(ctx, old), _load_or_exit(ctx, new)
    for line in api.diff_policies(a, b):
        click.echo(line)


def _with_signing():
    """The policy group with sign and verify (cli/keys.py) added."""
    from .keys import policy_sign, policy_verify
    policy.add_command(policy_sign)      # agentwatch policy sign
    policy.add_command(policy_verify)    # agentwatch policy verify
    return policy


policy_group = _with_signing()
