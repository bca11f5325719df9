"""agentwatch policy lint | explain | diff"""
import os

import click

from agentwatch.policy import check
from agentwatch.policy.diff import diff as diff_policies
from agentwatch.policy.explain import explain as explain_policy
from agentwatch.policy.lint import lint as lint_files
from agentwatch.policy.matchers import default_variables

_FILE = click.Path(dir_okay=True)      # lint reports unreadable files itself, in its format


@click.group()
def policy():
    """Check, explain and compare permission policies (docs/policy.md)."""


def _load_or_exit(ctx, path):
    """The policy, or its errors on stderr (FILE:LINE:COL: ...) and exit 1."""
    pol, problems = check(path)
    if pol is None:
        for p in problems:
            click.echo(str(p), err=True)
        ctx.exit(1)
    return pol


@policy.command()
@click.argument("files", nargs=-1, required=True, type=_FILE)
@click.option("--strict", is_flag=True, help="Warnings fail the lint too.")
@click.pass_context
def lint(ctx, files, strict):
    """Check policy FILEs: one FILE:LINE:COL line per problem on stdout.

    Exit 1 on any error (with --strict, on any warning too), else 0."""
    result = lint_files(files)
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
    variables = default_variables(workspace)
    click.echo(explain_policy(pol, variables), nl=False)
    click.echo("".join(f"{line}\n" for line in _kernel_lines(pol, variables)), nl=False)


def _kernel_lines(pol, variables):
    """What the kernel would hold for a run of the policy on this host:
    the enforcement plan's summary, namespaces and every grant it adds
    beyond the policy's own lists (issue #14: no silent widening)."""
    from agentwatch.sandbox.plan import make_plan
    ttys = []
    for fd in (0, 1, 2):
        name = os.ttyname(fd) if os.isatty(fd) else None
        if name and name not in ttys:
            ttys.append(name)
    plan = make_plan(pol.data, variables, [pol.path], ttys=ttys)
    lines = ["", "Kernel enforcement on this host (a run of this policy)"]
    lines += [f"  {line}" for line in plan.describe()]
    if plan.path != "monitor-only" and not plan.widened:
        lines.append("  added beyond the policy: nothing")
    return lines


@policy.command()
@click.argument("old", type=_FILE)
@click.argument("new", type=_FILE)
@click.pass_context
def diff(ctx, old, new):
    """What changing OLD into NEW grants (+), revokes (-) or changes (~).

    Exit 0 whether or not permissions change ("no permission changes" when
    none); 1 when either file is invalid."""
    a, b = _load_or_exit(ctx, old), _load_or_exit(ctx, new)
    for line in diff_policies(a, b):
        click.echo(line)


def _with_signing():
    """The policy group with sign and verify (cli/keys.py) added."""
    from .keys import policy_sign, policy_verify
    policy.add_command(policy_sign)      # agentwatch policy sign
    policy.add_command(policy_verify)    # agentwatch policy verify
    return policy


policy_group = _with_signing()
