"""Per-run budgets (agentwatch/harness/budget.py): stop at exactly the
limit, with a reason naming the budget, its limit and the use so far."""
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from agentwatch.harness.budget import Budget, Exhausted, Ledger, Price, price


def test_no_budget_never_refuses():
    led = Ledger()
    for _ in range(100):
        assert led.check() is None
        led.charge("m", 10**6, 10**6)
    assert led.requests == 100


def test_requests_stop_at_exactly_the_limit():
    led = Ledger(Budget(requests=3))
    for _ in range(3):
        assert led.check() is None
        led.charge("m", 1, 1)
    r = led.check()
    assert r == Exhausted("requests", 3, 3)
    assert str(r) == r.reason
    assert r.reason.startswith("requests budget exhausted: 3 used of a limit of 3;")
    assert "raise the run's requests budget" in r.reason


def test_tokens_stop_at_exactly_the_limit():
    led = Ledger(Budget(tokens=1000))
    led.charge("m", 600, 399)
    assert led.check() is None                     # 999 of 1000: one more call may go
    led.charge("m", 1, 0)
    r = led.check()
    assert (r.budget, r.limit, r.used) == ("tokens", 1000, 1000)
    assert "tokens budget exhausted: 1000 used of a limit of 1000" in r.reason


def test_a_call_that_overshoots_is_charged_in_full_and_the_next_refused():
    led = Ledger(Budget(tokens=1000))
    led.charge("m", 600, 0)
    assert led.check() is None
    led.charge("m", 100, 400)                      # its stream went past the limit
    assert led.tokens == 1100
    r = led.check()
    assert (r.budget, r.used) == ("tokens", 1100)
    assert "1100 used of a limit of 1000" in r.reason


def test_cost_stops_at_exactly_the_limit_without_float_rounding():
    # 0.01 + 0.06 is 0.06999999999999999 in floats: a float ledger would let
    # one more call through a 0.07 budget
    assert 0.01 + 0.06 < 0.07
    led = Ledger(Budget(cost=0.07), {"gpt": (1.0, 4.0)})
    assert led.charge("gpt", 10_000, 0) == pytest.approx(0.01)
    assert led.check() is None
    led.charge("gpt", 20_000, 10_000)              # 0.02 + 0.04
    r = led.check()
    assert (r.budget, r.limit) == ("cost", 0.07)
    assert r.used == pytest.approx(0.07)
    assert r.reason.startswith("cost budget exhausted: 0.07 USD used of a limit of 0.07 USD")


def test_cost_just_under_the_limit_goes():
    led = Ledger(Budget(cost=1.0), {"m": {"input": 3, "output": 15}})
    led.charge("m", 333_333, 0)                    # 0.999999
    assert led.check() is None
    led.charge("m", 0, 1)                          # + 0.000015
    assert led.check().budget == "cost"


def test_unknown_model_price_is_not_counted_and_said_so():
    led = Ledger(Budget(cost=0.5), {"known": Price(1.0, 1.0)})
    assert led.charge("mystery", 10**7, 10**7) is None
    assert led.cost == 0.0 and led.check() is None          # the cost budget cannot see it
    assert led.uncosted == {"mystery": 1}
    stats = led.stats()
    assert stats["cost_usd"] == 0.0 and stats["tokens"] == 2 * 10**7
    assert "cost excludes calls to models with no price in the config: mystery (1 calls)" \
        == stats["cost_note"]
    led.charge("known", 500_000, 0)
    assert led.check().budget == "cost"


def test_first_reached_budget_is_named():
    led = Ledger(Budget(tokens=10, requests=1, cost=0.0), {"m": (1, 1)})
    assert led.check().budget == "cost"            # a zero budget refuses the first call
    led = Ledger(Budget(tokens=10, requests=5))
    led.charge("m", 10, 0)
    assert led.check().budget == "tokens"


def test_bad_values_are_refused():
    for kw in ({"tokens": -1}, {"requests": 1.5}, {"cost": -0.1}, {"tokens": True}, {"cost": float("nan")}):
        with pytest.raises(ValueError):
            Budget(**kw)
    for p in ((1.0,), {"input": 1.0}, (-1, 1), "cheap"):
        with pytest.raises(ValueError, match="price of model 'm'"):
            price(p, "m")
    led = Ledger(Budget())
    with pytest.raises(ValueError):
        led.charge("m", -1, 0)
    with pytest.raises(ValueError):
        led.charge("m", 1.5, 0)


PRICES = {"a": (2.5, 10.0), "b": ("0.15", "0.6")}


@settings(max_examples=100, deadline=None)
@given(tokens=st.none() | st.integers(0, 5000), requests=st.none() | st.integers(0, 30),
       cost=st.none() | st.sampled_from([0, 0.001, 0.01, 0.07, 0.3, 1]),
       calls=st.lists(st.tuples(st.sampled_from(["a", "b", "unpriced"]),
                                st.integers(0, 800), st.integers(0, 800)), min_size=1, max_size=40))
def test_a_gateway_loop_stops_at_the_first_call_past_a_limit(tokens, requests, cost, calls):
    # an independent exact tally (fractions) is the oracle
    led = Ledger(Budget(tokens=tokens, requests=requests, cost=cost), PRICES)
    used_tokens = used_requests = 0
    used_cost = Fraction(0)
    for model, tin, tout in calls:
        under = ((tokens is None or used_tokens < tokens)
                 and (requests is None or used_requests < requests)
                 and (cost is None or used_cost < Fraction(str(cost))))
        r = led.check()
        assert (r is None) == under, (r, used_tokens, used_requests, used_cost)
        if r is not None:
            assert f"{r.budget} budget exhausted" in r.reason and r.used >= r.limit
            break
        led.charge(model, tin, tout)
        used_tokens += tin + tout
        used_requests += 1
        if model in PRICES:
            pin, pout = (Fraction(str(x)) for x in PRICES[model])
            used_cost += (pin * tin + pout * tout) / 10**6
    assert (led.tokens, led.requests) == (used_tokens, used_requests)
    assert led.cost == pytest.approx(float(used_cost))
