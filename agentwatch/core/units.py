"""Durations and sizes: one grammar, one parser each.

The policy validator (resources.wall_time, resources.memory) and the
sandbox that applies the limits both call these, so what `agentwatch policy
lint` accepts is exactly what `agentwatch run` applies. docs/policy.md
("Durations and sizes") describes the grammar for users;
policies/agentpolicy.schema.json carries the same patterns (a test keeps
them equal).

A duration is a number of seconds (int or float), or a string: a bare
number (seconds), or components NUMBER UNIT with the units d, h, m, s, each
at most once and in that order: "90s", "30m", "1h30m", "2.5h", "2d".
Units are lowercase only ("M" would read as months).

A size is a number of bytes (an integer), or a string: NUMBER, then an
optional space and a unit K, M, G, T or P (powers of 1024, either case)
optionally followed by "i" and/or "B", or just "B": "512M", "2G", "1.5GiB",
"1P", "100B", "4096". A fraction of a byte is rounded up.

Both must be more than zero, and at most MAX_SECONDS / MAX_BYTES: a wait
longer than a century is a mistake, and the kernel reads a size into 64
bits (a larger one would wrap to a small limit without an error).
"""
import decimal
import math
import re

from .errors import AgentwatchError

_NUM = r"[0-9]+(?:\.[0-9]+)?"            # [0-9], not \d: \d matches other scripts' digits too
DURATION_PATTERN = (rf"^(?:({_NUM})|(?=[0-9])(?:({_NUM})d)?(?:({_NUM})h)?"
                    rf"(?:({_NUM})m)?(?:({_NUM})s)?)$")
SIZE_PATTERN = rf"^({_NUM})(?: ?(?:([KMGTPkmgtp])[iI]?[bB]?|[bB]))?$"
# "some digit is not 0", the only way a pattern can say "more than zero":
# JSON Schema prepends it to the patterns above (it cannot compare values)
NONZERO = r"(?=.*[1-9])"

_DURATION = re.compile(DURATION_PATTERN)
_SIZE = re.compile(SIZE_PATTERN)
_SECONDS = (86400, 3600, 60, 1)          # d, h, m, s
_SCALE = {u: 1024 ** (i + 1) for i, u in enumerate("kmgtp")}

MAX_SECONDS = 100 * 365 * 86400          # 36500d
MAX_BYTES = 2 ** 63 - 1                  # below 8192P
_MAX_SECONDS_TEXT, _MAX_BYTES_TEXT = "36500d (100 years)", "2^63 - 1 bytes (below 8192P)"
DURATION_EXAMPLES = 'a duration like "90s", "30m", "1h30m" or "2.5h", or a number of seconds'
SIZE_EXAMPLES = ('a size like "512M", "2G" or "1.5GiB" (K, M, G, T, P: powers of 1024), '
                 'or a number of bytes')


class UnitError(AgentwatchError):
    """A value that is not a duration or a size. The message says what was
    expected; the caller prefixes where it was written."""


def _got(value):
    """The value for a message, on one line and short."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 128:
        return "a number of more than 38 digits"      # (repr() refuses more than 4300)
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:40]) + "..."
    if isinstance(value, (str, int, float)):
        return repr(value)
    return {list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _bounded(total, value, high, high_text):
    if total <= 0:
        raise UnitError(f"must be more than zero, got {_got(value)}")
    if total > high:
        raise UnitError(f"must be at most {high_text}, got {_got(value)}")
    return total


def parse_duration(value):
    """A duration (see the module docstring) -> seconds (float)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise UnitError(f"expected {DURATION_EXAMPLES}, got {_got(value)}")
        total = decimal.Decimal(value)
    else:
        m = _DURATION.fullmatch(value) if isinstance(value, str) else None
        if m is None:
            raise UnitError(f"expected {DURATION_EXAMPLES}, got {_got(value)}")
        bare, *parts = m.groups()
        # Decimal, not int() or Fraction(): those refuse numerals of more than
        # 4300 digits; the precision keeps the arithmetic exact
        with decimal.localcontext() as ctx:
            ctx.prec = len(value) + 20
            total = (decimal.Decimal(bare) if bare else
                     sum(decimal.Decimal(n) * s for n, s in zip(parts, _SECONDS) if n))
    return float(_bounded(total, value, MAX_SECONDS, _MAX_SECONDS_TEXT))


def parse_size(value):
    """A size (see the module docstring) -> bytes (int)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _bounded(value, value, MAX_BYTES, _MAX_BYTES_TEXT)
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise UnitError(f"expected {SIZE_EXAMPLES}, got {_got(value)}")
    number, unit = m.groups()
    with decimal.localcontext() as ctx:
        ctx.prec = len(value) + 20
        total = decimal.Decimal(number) * _SCALE.get((unit or "").lower(), 1)
    total = total.to_integral_value(decimal.ROUND_CEILING)          # a fraction of a byte rounds up
    return int(_bounded(total, value, MAX_BYTES, _MAX_BYTES_TEXT))
