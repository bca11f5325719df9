"""agentwatch run: its options are RunOptions' (agentwatch/core/options.py),
one click option per field with a flag."""
import click

from agentwatch import api


def _click_option(f):
    """The click option of one RunOptions field, from its metadata."""
    m = f.metadata
    kw = {"help": m["help"]}
    if f.type is bool:
        kw["default"] = f.default
        if "/" not in m["flag"]:
            kw["is_flag"] = True
    elif m["choices"]:
        kw.update(type=click.Choice(list(m["choices"])), default=f.default)
    elif f.type is int:
        kw["type"] = click.IntRange(*m["range"]) if m.get("range") else int
    elif f.type is float:
        kw["type"] = click.FloatRange(*m["range"]) if m.get("range") else float
    elif m["path"]:
        kw["type"] = click.Path(dir_okay=False) if m["path"] == "file" else click.Path(file_okay=False)
    if f.type is list:
        kw["multiple"] = True
    if m["show_default"]:
        kw["show_default"] = True
    return click.option(m["flag"], f.name, **kw)


# `run` and `trial run`: [OPTIONS] [--] CMD [ARG...]. Options before CMD are
# ours, and one we do not have is a usage error naming it (click's "No such
# option: --resolv Did you mean --resolve?", exit status 2); from CMD on (the
# first positional, or whatever follows --) every word is the agent's own,
# passed through untouched: the parser stops at the first positional.
AGENT_COMMAND = {"allow_interspersed_args": False}


def agent_command_argument(required=True):
    """The CMD [ARG...] of AGENT_COMMAND, as given."""
    return click.argument("command", nargs=-1, type=click.UNPROCESSED, required=required)


def _with_run_options(fn):
    for f in reversed(api.run_option_fields()):
        fn = _click_option(f)(fn)
    return fn


@click.command(context_settings=AGENT_COMMAND)
@_with_run_options
@click.option("--daemon/--no-daemon", "use_daemon", default=None,
              help="Run on the shared monitor of 'agentwatch daemon' (--daemon: it must be "
                   "running) or load one for this run alone (--no-daemon). Default: the daemon "
                   "when one answers.")
@agent_command_argument()
@click.pass_context
def run(ctx, use_daemon, command, **fields):
    """Run COMMAND as a monitored agent: agentwatch run [OPTIONS] -- CMD [ARG...]

    The exit status is the agent's own (128+N when a signal N killed it),
    unless the policy's termination section ended the run: done 0, loop 81,
    no_progress 82, budget 83, timeout 124 (resources.wall_time too)."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    result = api.run(api.RunOptions(argv=list(command), **fields), daemon=use_daemon)
    ctx.exit(result.run_status)
