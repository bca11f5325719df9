"""One exception hierarchy. Every error a user can cause or meet carries a
message that says what was wrong, where, and what to do; the CLI prints it on
one line and exits non-zero instead of showing a traceback."""


class AgentwatchError(Exception):
    """Base of every error agentwatch raises on purpose."""

    exit_code = 1


class UsageError(AgentwatchError):
    exit_code = 2


class PrivilegeError(AgentwatchError):
    """Not enough privilege (root, CAP_BPF/CAP_SYS_ADMIN) for the operation."""


class KernelFeatureError(AgentwatchError):
    """The kernel lacks something agentwatch needs; `agentwatch doctor` tells more."""


class PolicyError(AgentwatchError):
    """A policy (or manifest) file is unreadable or invalid. Messages start with FILE:LINE:COL."""


class IntegrityError(AgentwatchError):
    """A key or signature file is missing, unreadable or of the wrong kind
    (agentwatch/integrity.py)."""


class NotFoundError(AgentwatchError, LookupError):
    """No run, or no single run, has the id or prefix asked for."""


class LaunchError(AgentwatchError):
    """The agent could not be started; the message names the failed step."""

    def __init__(self, message, exit_code=126):
        super().__init__(message)
        self.exit_code = exit_code
