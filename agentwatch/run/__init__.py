"""One run of an agent: prepare.py (the pure preparation: input, policy,
signatures, compile, plan, identity), log.py (the hash-chained run log, its
sinks and bus, run.json and stats), enforcement.py (the kernel guards, the
child's set-up steps, refusals into events), run.py (Run: the loop, drain
and clean-up, composed of those), monitor.py (Monitor: the loaded sensors,
shared by runs under one lock), sweep.py (gc: what a crashed agentwatch left)."""
from ..core.options import RunOptions
from .monitor import Monitor
from .prepare import Prepared, prepare, policy_variables
from .run import Run
from .sweep import gc

__all__ = ["Monitor", "Prepared", "Run", "RunOptions", "gc", "policy_variables", "prepare"]
