"""Entry point: `agentwatch COMMAND`. One module per command group; every
AgentwatchError becomes one line on stderr and its exit code, never a traceback."""
import sys

import click

from agentwatch.errors import AgentwatchError

from . import daemon as daemon_cmd
from . import doctor as doctor_cmd
from . import keys as keys_cmd
from . import run as run_cmd
from . import runs as runs_cmd
from .policy import policy as policy_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentwatch", prog_name="agentwatch")
def cli():
    """Watch and contain AI agents with eBPF."""


cli.add_command(run_cmd.run)
cli.add_command(runs_cmd.tail)
cli.add_command(runs_cmd.ps)
cli.add_command(runs_cmd.gc)
cli.add_command(doctor_cmd.doctor)
cli.add_command(daemon_cmd.daemon_group)     # agentwatch daemon start|stop|status|run
cli.add_command(keys_cmd.key_group)     # agentwatch key generate
cli.add_command(keys_cmd.log_group)     # agentwatch log verify
policy_group.add_command(keys_cmd.policy_sign)     # agentwatch policy sign
policy_group.add_command(keys_cmd.policy_verify)   # agentwatch policy verify
cli.add_command(policy_group)           # agentwatch policy lint|explain|diff|sign|verify


def main(argv=None):
    try:
        return cli.main(args=argv, prog_name="agentwatch", standalone_mode=False) or 0
    except click.exceptions.Abort:
        click.echo("agentwatch: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except AgentwatchError as e:
        click.echo(f"agentwatch: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def entry():
    sys.exit(main())


if __name__ == "__main__":
    entry()
