"""Entry point: `agentwatch COMMAND`. One module per command group; every
AgentwatchError becomes one line on stderr and its exit code, never a traceback."""
import importlib
import sys

import click

from agentwatch.api import AgentwatchError

# name -> (module, attribute, short help). A command's module is imported
# only when that command runs: `agentwatch run` on the daemon is a thin
# client, and should not pay for the policy engine's imports (~70 ms, ~15 MB).
COMMANDS = {
    "run": ("run", "run", "Run COMMAND as a monitored agent."),
    "tail": ("runs", "tail", "Follow the live event stream of all running agents."),
    "ps": ("up", "ps", "List running agents: manifests' first, then the other runs."),
    "up": ("up", "up", "Start every agent of a manifest on the daemon."),
    "down": ("up", "down", "Stop a manifest's agents."),
    "gc": ("runs", "gc", "Remove what a crashed agentwatch left behind."),
    "doctor": ("doctor", "doctor", "Report kernel features and what their absence disables."),
    "daemon": ("daemon", "daemon_group", "The shared monitor: start, stop, status."),
    "key": ("keys", "key_group", "Signing keys: generate."),
    "log": ("keys", "log_group", "Run logs: verify their seal."),
    "report": ("report", "report", "A run's report: process tree, violations, totals (--html)."),
    "policy": ("policy", "policy_group", "Policies: lint, explain, diff, sign, verify."),
    "msg": ("msg", "msg_group", "Agent-to-agent messages: send, inbox, tasks."),
    "token": ("msg", "token_group", "Scope tokens: mint, inspect."),
    "memory": ("memory", "memory_group", "Agents' memory: ls, show, verify, gc."),
    "trial": ("trial", "trial_group", "Run a command N times: rates with intervals, pass^k, baseline."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module when the command is used."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)

    def format_commands(self, ctx, formatter):
        # the listing from COMMANDS, without importing every module
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][2]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="agentwatch", prog_name="agentwatch")
def cli():
    """Watch and contain AI agents with eBPF."""


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
