"""agentwatch doctor"""
import json

import click

from agentwatch import api


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def doctor(as_json):
    """Check each kernel feature agentwatch uses, and what its absence disables."""
    rep = api.doctor()
    st = rep.daemon
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=1))
    else:
        click.echo(rep.table())
        path = rep.enforcement_path
        click.echo(f"\nenforcement path on this host: {path}")
        if path == "landlock+seccomp+cgroup-bpf":
            click.echo("  files and TCP ports: Landlock; syscalls: seccomp; egress: cgroup BPF; "
                       "denied paths inside allowed trees: masked in a private mount namespace")
        elif path == "bpf-lsm":
            click.echo("  runs get bpf-lsm+landlock+seccomp+cgroup-bpf: BPF LSM refuses exec and "
                       "executable mappings of files outside the exec allow list (by inode: "
                       "copies, renames and the dynamic loader included) and opens of denied "
                       "files under any name, on top of Landlock, seccomp and cgroup BPF")
        if st is None:
            click.echo(f"\nagentwatch daemon: not running ('agentwatch daemon start': runs start "
                       "in ~0.1 s and share one monitor)")
        else:
            click.echo(f"\nagentwatch daemon: running, pid {st.pid}, {len(st.runs)} run(s), "
                       f"{st.sensors['tracepoints']} tracepoints attached")
