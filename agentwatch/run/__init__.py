"""One run: prepare (pure), log, enforcement, loop; Monitor."""
from .run import Monitor, Run, RunOptions, gc, policy_variables  # noqa: F401
