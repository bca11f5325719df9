"""The options of one run, declared once.

``RunOptions`` is what a run takes (agentwatch/run/), what the
daemon protocol carries (agentwatch/daemon.py marshals the fields marked
``wire``, checked against their types) and what `agentwatch run` offers
(cli/run.py makes one click option per field with a ``flag``). Each field's
metadata says how the other layers treat it:

  help   the option's help text (for `agentwatch run --help`)
  flag   its command line option: "--policy"; "--show/--quiet" for an on/off
         pair; a bool field without "/" is a flag (given: True)
  path   "file" or "dir": a path, made absolute on the client's side before
         it reaches the daemon (for a list: each item)
  choices  the values a str field takes
  range  (lowest, highest) an int field takes, both included
  wire   the daemon protocol carries it (a client may set it); the others
         are the caller's own (stdio, stderr) or the runner's (sensors,
         seccomp_denied) or the daemon's (client: SO_PEERCRED)

Nothing here imports agentwatch: it is the bottom layer (core).
"""
from dataclasses import dataclass, field, fields

__all__ = ["RunOptions", "cli_fields", "wire_fields"]


def _opt(default=None, *, factory=None, help=None, flag=None, path=None, choices=None,
         range=None, wire=True, show_default=False):
    meta = {"help": help, "flag": flag, "path": path, "choices": choices, "range": range,
            "wire": wire, "show_default": show_default}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunOptions:
    """Everything that says how one agent runs (see the module docstring
    for the metadata each field carries)."""

    argv: list = _opt(help="The agent's command and its arguments (COMMAND on the command line).")
    policy_path: str = _opt(flag="--policy", path="file",
                            help="YAML policy the agent runs under (identity, permissions).")
    name: str = _opt(flag="--name", help="Agent name recorded in the run identity "
                                         "(default: the policy's identity.name, else the command name).")
    events_path: str = _opt(flag="--events", path="file",
                            help="Also write every event of the run to this JSON Lines file.")
    show: bool = _opt(False, flag="--show/--quiet", help="Print each event to stderr as it happens.")
    workspace: str = _opt(flag="--workspace", path="dir",
                          help="The agent's workspace: ${WORKSPACE} in the policy "
                               "(default: current directory).")
    prompt_path: str = _opt(flag="--prompt", path="file",
                            help="The agent's system prompt or instructions file; its digest goes "
                                 "into the run identity and a change to it during the run is a "
                                 "violation.")
    require_signed: bool = _opt(False, flag="--require-signed",
                                help="Refuse to start unless the policy (and prompt) carry a valid "
                                     "trusted signature.")
    allow_downgrade: bool = _opt(False, flag="--allow-downgrade",
                                 help="Run even when this kernel cannot enforce some of the policy's "
                                      "rules; they are listed at start and recorded in the run "
                                      "identity.")
    bpf_lsm: str = _opt("auto", flag="--bpf-lsm", choices=("auto", "on", "off"), show_default=True,
                        help="The BPF LSM layer (exec and executable mappings by inode, denied files "
                             "under any name): auto uses it where 'agentwatch doctor' finds it "
                             "loadable; on refuses to start without it.")
    trust: list = _opt(factory=list, flag="--trust", path="file",
                       help="Extra trusted public key (repeatable); see 'agentwatch key'.")
    resolve: list = _opt(factory=list, flag="--resolve",
                         help="NAME:ADDR (repeatable, as in curl): the address the egress guard uses "
                              "and its DNS answers for NAME in this run, instead of the host's "
                              "resolver; for hosts without DNS and for tests.")
    fold: bool = _opt(True, flag="--fold/--no-fold", show_default=True,
                      help="Fold a thread's identical file calls in a row (same path, flags and "
                           "result) into one line with a repeat count, in the kernel; --no-fold "
                           "writes a line (and costs a record) per call.")
    weight: int = _opt(flag="--weight", range=(1, 10000),
                       help="The agent's CPU weight, 1..10000 (cgroup v2 cpu.weight; on the cgroup "
                            "v1 fallback cpu.shares = weight * 1024 / 100). Default: the kernel's "
                            "(100). A manifest's agent weight also sets its inference share.")
    budget_tokens: int = _opt(flag="--budget-tokens", range=(1, 10**12),
                              help="The run's budget of LLM tokens (in and out, every call through "
                                   "the LLM gateway together): once reached, a call gets a 429 and "
                                   "a resources.llm_tokens violation.")
    budget_requests: int = _opt(flag="--budget-requests", range=(1, 10**9),
                                help="The run's budget of calls through the LLM gateway "
                                     "(resources.llm_requests once reached).")
    budget_cost: float = _opt(flag="--budget-cost", range=(0, 10**9),
                              help="The run's budget in USD of LLM calls, priced by the gateway "
                                   "config's per-model prices (resources.llm_cost once reached).")
    # not on the command line: the client fills them in (its cwd, its environment)
    cwd: str = _opt(path="dir", help="The agent's working directory (default: ours).")
    env: dict = _opt(help="The agent's environment (default: ours).")
    # the caller's or the runner's own: never over the wire
    ringbuf_pages: int = _opt(4096, wire=False, help="Size of each ring buffer of a run's own monitor.")
    sensors: list = _opt(wire=False, help="Sensor groups to load (default: all; a policy sets its own).")
    seccomp_denied: list = _opt(factory=list, wire=False,
                                help="Syscalls seccomp refuses with EPERM (set by the runner from the plan).")
    stdio: tuple = _opt(wire=False, help="fds for the agent's stdin, stdout, stderr (default: ours).")
    stderr: object = _opt(wire=False, help="Where agentwatch's own messages go (default: sys.stderr).")
    client: dict = _opt(wire=False, help="Set by the daemon: who asked for the run (SO_PEERCRED).")


def wire_fields():
    """The fields the daemon protocol carries, in declaration order."""
    return [f for f in fields(RunOptions) if f.metadata["wire"]]


def cli_fields():
    """The fields `agentwatch run` has an option for, in declaration order."""
    return [f for f in fields(RunOptions) if f.metadata["flag"]]
