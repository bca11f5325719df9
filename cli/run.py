"""agentwatch run"""
import click

from agentwatch import daemon


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
              help="YAML policy the agent runs under (identity, permissions).")
@click.option("--name", help="Agent name recorded in the run identity "
                             "(default: the policy's identity.name, else the command name).")
@click.option("--events", "events_path", type=click.Path(dir_okay=False),
              help="Also write every event of the run to this JSON Lines file.")
@click.option("--show/--quiet", default=False,
              help="Print each event to stderr as it happens.")
@click.option("--workspace", type=click.Path(file_okay=False),
              help="The agent's workspace: ${WORKSPACE} in the policy (default: current directory).")
@click.option("--prompt", "prompt_path", type=click.Path(dir_okay=False),
              help="The agent's system prompt or instructions file; its digest goes into the "
                   "run identity and a change to it during the run is a violation.")
@click.option("--require-signed", is_flag=True,
              help="Refuse to start unless the policy (and prompt) carry a valid trusted signature.")
@click.option("--allow-downgrade", is_flag=True,
              help="Run even when this kernel cannot enforce some of the policy's rules; they "
                   "are listed at start and recorded in the run identity.")
@click.option("--bpf-lsm", "bpf_lsm", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True,
              help="The BPF LSM layer (exec and executable mappings by inode, denied files under "
                   "any name): auto uses it where 'agentwatch doctor' finds it loadable; on "
                   "refuses to start without it.")
@click.option("--trust", multiple=True, type=click.Path(dir_okay=False),
              help="Extra trusted public key (repeatable); see 'agentwatch key'.")
@click.option("--fold/--no-fold", default=True, show_default=True,
              help="Fold a thread's identical file calls in a row (same path, flags and result) "
                   "into one line with a repeat count, in the kernel; --no-fold writes a line "
                   "(and costs a record) per call.")
@click.option("--daemon/--no-daemon", "use_daemon", default=None,
              help="Run on the shared monitor of 'agentwatch daemon' (--daemon: it must be "
                   "running) or load one for this run alone (--no-daemon). Default: the daemon "
                   "when one answers.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def run(ctx, policy_path, name, events_path, show, workspace, prompt_path, require_signed,
        allow_downgrade, bpf_lsm, trust, fold, use_daemon, command):
    """Run COMMAND as a monitored agent: agentwatch run [OPTIONS] -- CMD [ARG...]

    The exit status is the agent's own (128+N when a signal N killed it)."""
    fields = dict(argv=list(command), policy_path=policy_path, name=name,
                  events_path=events_path, show=show, workspace=workspace,
                  prompt_path=prompt_path, require_signed=require_signed,
                  trust=list(trust), allow_downgrade=allow_downgrade, bpf_lsm=bpf_lsm, fold=fold)
    code = None
    if use_daemon is not False:      # the daemon's thin client imports no more than this
        code = daemon.run_remote(fields, require=bool(use_daemon))
    if code is None:
        from agentwatch.runner import RunOptions, run_agent
        code = run_agent(RunOptions(**fields))
    ctx.exit(code)
