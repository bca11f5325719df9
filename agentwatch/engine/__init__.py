"""The userspace engine: attribute kernel records to runs (correlator) and
judge the resulting events against each run's policy (judge: the pure
rules decide, the reporter turns decisions into violations)."""
from .correlator import Correlator, Proc, RunContext, monotonic_to_wall

__all__ = ["Correlator", "Proc", "RunContext", "monotonic_to_wall"]
