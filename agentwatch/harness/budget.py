"""Per-run budgets of LLM use: tokens (in + out), requests, and cost in USD.

The gateway asks Ledger.check() before it sends a call and Ledger.charge()
after the call is over, with the tokens the response's usage reports.

Stop at exactly the limit: a call is refused when a budget is already
reached (use >= limit), so with requests=3 the fourth call is refused, and
with tokens=1000 a call is refused once 1000 tokens are used, not before.
A call cannot be refused half way: one that overshoots mid-stream (its
output takes the use past the limit) is charged in full, its use is
reported as it was, and the next call is refused.

Cost comes from per-model prices, USD per million input and output tokens,
as the config gives them. Sums are kept in decimal (prices are read as the
decimal numbers written in the config), so a cost limit is reached exactly,
not missed by a float's rounding. A call to a model with no price adds no
cost: the ledger counts such calls per model (`uncosted`) and its stats say
the cost excludes them, so a cost budget is not silently taken as covering
them.
"""
import dataclasses
from decimal import Decimal

MILLION = Decimal(1_000_000)


def _decimal(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float, str, Decimal)):
        raise ValueError(f"{what}: {x!r} is not a number")
    d = Decimal(str(x))            # the number as written, not the float's binary value
    if not d.is_finite() or d < 0:
        raise ValueError(f"{what}: {x!r} must be a finite number >= 0")
    return d


@dataclasses.dataclass(frozen=True)
class Budget:
    """Limits for one run; None is no limit."""
    tokens: int = None
    requests: int = None
    cost: float = None           # USD

    def __post_init__(self):
        for name in ("tokens", "requests"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"budget {name}: {v!r} must be an integer >= 0")
        if self.cost is not None:
            _decimal(self.cost, "budget cost")


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per million tokens."""
    input: float
    output: float


def price(value, model="?"):
    """A Price from a Price, an (input, output) pair or {"input":, "output":}."""
    if isinstance(value, Price):
        p = value
    elif isinstance(value, dict):
        try:
            p = Price(value["input"], value["output"])
        except KeyError as e:
            raise ValueError(f"price of model {model!r}: missing {e.args[0]!r} "
                             f"(USD per million tokens, input and output)") from None
    else:
        try:
            p = Price(*value)
        except TypeError:
            raise ValueError(f"price of model {model!r}: {value!r} is not (input, output) "
                             f"USD per million tokens") from None
    _decimal(p.input, f"price of model {model!r} input")
    _decimal(p.output, f"price of model {model!r} output")
    return p


@dataclasses.dataclass(frozen=True)
class Exhausted:
    """A refusal: which budget, its limit, and the use so far."""
    budget: str                  # "tokens", "requests" or "cost"
    limit: object
    used: object

    @property
    def reason(self):
        unit = " USD" if self.budget == "cost" else ""
        return (f"{self.budget} budget exhausted: {self.used}{unit} used of a limit of "
                f"{self.limit}{unit}; the call was not sent (raise the run's "
                f"{self.budget} budget to allow more)")

    def __str__(self):
        return self.reason


class Ledger:
    """One run's use against its Budget. Used from one event loop."""

    def __init__(self, budget=None, prices=None):
        self.budget = budget or Budget()
        self._prices = {m: price(p, m) for m, p in (prices or {}).items()}
        self._rates = {m: (_decimal(p.input, m) / MILLION, _decimal(p.output, m) / MILLION)
                       for m, p in self._prices.items()}
        self._cost_limit = None if self.budget.cost is None else _decimal(self.budget.cost, "cost")
        self.tokens_in = self.tokens_out = self.requests = 0
        self._cost = Decimal(0)
        self.uncosted = {}       # model -> calls charged with no price known

    @property
    def tokens(self):
        return self.tokens_in + self.tokens_out

    @property
    def cost(self):
        return float(self._cost)

    def check(self):
        """None if a call may go, else the Exhausted budget (the first of
        requests, tokens, cost that is reached)."""
        b = self.budget
        if b.requests is not None and self.requests >= b.requests:
            return Exhausted("requests", b.requests, self.requests)
        if b.tokens is not None and self.tokens >= b.tokens:
            return Exhausted("tokens", b.tokens, self.tokens)
        if self._cost_limit is not None and self._cost >= self._cost_limit:
            return Exhausted("cost", b.cost, float(self._cost))
        return None

    def charge(self, model, tokens_in, tokens_out):
        """Count one call that was sent, in full (module docstring); returns
        its cost in USD, or None when the model has no price."""
        for name, v in (("tokens_in", tokens_in), ("tokens_out", tokens_out)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: {v!r} must be an integer >= 0")
        self.requests += 1
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out
        rate = self._rates.get(model)
        if rate is None:
            self.uncosted[model] = self.uncosted.get(model, 0) + 1
            return None
        c = rate[0] * tokens_in + rate[1] * tokens_out
        self._cost += c
        return float(c)

    def stats(self):
        """The use so far, for `ps` and the run's records."""
        out = {"requests": self.requests, "tokens_in": self.tokens_in,
               "tokens_out": self.tokens_out, "tokens": self.tokens, "cost_usd": self.cost,
               "budget": dataclasses.asdict(self.budget)}
        if self.uncosted:
            out["uncosted"] = dict(self.uncosted)
            out["cost_note"] = ("cost excludes calls to models with no price in the config: "
                                + ", ".join(f"{m} ({n} calls)" for m, n in sorted(self.uncosted.items())))
        return out
