"""Services a Monitor offers its runs, from the layers above (the LLM
gateway of agentwatch/harness/): run/ defines the contract, harness/
implements it, the daemon (or whoever owns the Monitor) registers them.

A service listens on loopback. For each run it may give the agent
environment variables (a base URL, a dummy key) and gets a ServiceRun: the
run's identity, and emit() for records that become events of the run,
logged and judged on the run's own loop (so a violation's kill action is
the run's, as for any other). Its loopback ports are allowed to every run
of the Monitor, like the egress guard's: the run's cgroup BPF and Landlock
let the agent reach them, and its network namespace's relay carries them.
"""
import collections
from dataclasses import dataclass, field


class RunService:
    """What a service implements (every method is optional)."""

    name = "service"

    def loopback_ports(self):
        """The loopback TCP ports the runs must reach."""
        return []

    def open_run(self, run):
        """A run is about to start its agent (run: ServiceRun); the
        environment variables to set in the agent's, as a dict (a value of
        None removes that variable: a secret of the service's that the
        caller's environment happens to hold)."""
        return {}

    def close_run(self, run_id):
        """The run's agent has ended; the service's counters for its end
        event (a dict, or None)."""
        return None


@dataclass
class ServiceRun:
    """One run as a service sees it. identity comes from the kernel side
    (the run's cgroup is the run's); options are the run's RunOptions."""
    run_id: str
    agent: str
    cgroup: str                       # cgroup v2 path of the run ("/agentwatch/<run id>")
    options: object                   # core.options.RunOptions
    prompt: str = None                # the --prompt file's text, when the run has one
    prompt_digest: str = None
    action_for: object = None         # callable(category, rule) -> alert | deny | kill
    policy: object = None             # the run's policy.model.PolicySpec; None: the run has no policy
    policy_digest: str = None
    spawn: object = None              # callable(argv, timeout_s) -> (exit, stdout, stderr, truncated):
                                      # runs argv inside the run's sandbox (Run.spawn_tool)
    subscribe: object = None          # the run's event bus: subscribe(maxsize, kinds, callback) (engine/bus.py)
    check_read: object = None         # callable(path) -> why the policy refuses reading it, or None
    records: collections.deque = field(default_factory=collections.deque)

    def emit(self, record):
        """A record for the run's log: a dict with "kind" (e.g. "llm") and
        the event's fields. Thread-safe; the run turns it into an event on
        its own loop."""
        self.records.append(record)


def service_ports(services):
    return sorted({p for s in services for p in (s.loopback_ports() or ())})
