"""agentwatch/harness/trials.py: the statistics of `agentwatch trial`,
pinned against reference implementations.

The reference values below come from statsmodels 0.15.0
(statsmodels.stats.proportion.proportion_confint(k, n, alpha=0.05,
method="wilson"), proportions_ztest) and scipy 1.17.1
(scipy.stats.fisher_exact), run in a throwaway venv (not a dependency of
agentwatch), on 2026-12-03.
"""
import math
import random

import pytest

from agentwatch.harness import trials as T

# statsmodels proportion_confint(method="wilson"), alpha=0.05
WILSON_REF = [
    (0, 10, 0.0, 0.27753279986288926),
    (5, 10, 0.23659309051256394, 0.7634069094874361),
    (10, 10, 0.7224672001371106, 1.0),
    (81, 263, 0.2552885198782742, 0.36620957698280004),
    (0, 40, 0.0, 0.08762160119728668),
    (3, 40, 0.025836025774588184, 0.1986423352431055),
]

# scipy.stats.fisher_exact(table).pvalue (two-sided)
FISHER_REF = [
    ((3, 1, 1, 3), 0.48571428571428565),     # Fisher's tea-tasting table: 34/70
    ((1, 9, 11, 3), 0.0027594561852200836),
    ((8, 2, 1, 5), 0.034965034965034975),
    ((4, 36, 24, 16), 4.233280198347904e-06),
    ((0, 10, 0, 10), 1.0),
    ((12, 5, 3, 20), 0.0002999894216743347),
]


@pytest.mark.parametrize("k,n,lo,hi", WILSON_REF)
def test_wilson_matches_statsmodels(k, n, lo, hi):
    got = T.wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-12)
    assert got[1] == pytest.approx(hi, abs=1e-12)


def test_wilson_edges_and_bad_counts():
    assert T.wilson(0, 0) == (0.0, 1.0)
    assert T.wilson(0, 5)[0] == 0.0 and T.wilson(5, 5)[1] == 1.0
    for bad in ((-1, 5), (6, 5), (1, -1), (1.5, 3)):
        with pytest.raises(ValueError):
            T.wilson(*bad)


def test_rate_and_the_rule_of_three():
    r = T.rate(0, 40)
    assert (r["k"], r["n"], r["p"], r["lo"]) == (0, 40, 0.0, 0.0)
    assert r["rule3"] == pytest.approx(0.075)
    assert r["note"] == "0 of 40: rule of three, p < 3/40 = 0.075 at 95%"
    assert T.rate(0, 2)["rule3"] == 1.0                      # 3/2 bounds nothing
    assert T.rate(2, 2)["note"] == "2 of 2: too few runs for the rule of three (3/2 >= 1)"
    full = T.rate(10, 10)
    assert full["rule3"] == pytest.approx(0.7) and "10 of 10" in full["note"]
    mid = T.rate(5, 10)
    assert mid["note"] == "" and mid["rule3"] is None and mid["p"] == 0.5
    assert T.rate(0, 0)["p"] is None


@pytest.mark.parametrize("table,p", FISHER_REF)
def test_fisher_exact_matches_scipy(table, p):
    assert T.fisher_exact(*table) == pytest.approx(p, rel=1e-9)


def test_fisher_tea_tasting_is_34_over_70():
    assert T.fisher_exact(3, 1, 1, 3) == pytest.approx(34 / 70, rel=1e-12)
    assert T.fisher_exact(4, 0, 0, 4) == pytest.approx(2 / 70, rel=1e-12)
    assert T.fisher_exact(0, 0, 0, 0) == 1.0
    with pytest.raises(ValueError):
        T.fisher_exact(-1, 0, 0, 0)


def test_two_proportion_matches_statsmodels():
    # proportions_ztest([4, 24], [40, 40]) -> z = -4.688072309384954 (k1/n1 - k2/n2), p = 2.7579e-06
    z, p = T.two_proportion(4, 40, 24, 40)
    assert z == pytest.approx(4.688072309384954, rel=1e-9)
    assert p == pytest.approx(2.7579057770546967e-06, rel=1e-6)
    z, p = T.two_proportion(30, 60, 20, 60)
    assert z == pytest.approx(-1.851640199545103, rel=1e-9)
    assert p == pytest.approx(0.06407750645105952, rel=1e-6)
    assert T.two_proportion(0, 10, 0, 10) == (0.0, 1.0)
    assert T.two_proportion(0, 0, 3, 10) == (0.0, 1.0)


def test_pass_hat_k_and_pass_at_k_small_cases():
    # 3 of 4 passed: pass^2 = C(3,2)/C(4,2) = 3/6; pass@2 = 1 - C(1,2)/C(4,2) = 1
    assert T.pass_hat_k(3, 4, 2) == pytest.approx(0.5)
    assert T.pass_at_k(3, 4, 2) == 1.0
    # 2 of 5: pass^1 = pass@1 = 0.4; pass^2 = 1/10; pass@2 = 1 - C(3,2)/C(5,2) = 0.7
    assert T.pass_hat_k(2, 5, 1) == pytest.approx(0.4) == T.pass_at_k(2, 5, 1)
    assert T.pass_hat_k(2, 5, 2) == pytest.approx(0.1)
    assert T.pass_at_k(2, 5, 2) == pytest.approx(0.7)
    assert T.pass_hat_k(2, 5, 3) == 0.0
    assert T.pass_hat_k(5, 5, 5) == 1.0 and T.pass_at_k(0, 5, 5) == 0.0
    # 8 of 8 passed, k = 8: 1; one failure makes pass^8 0 and leaves pass@8 1
    assert T.pass_hat_k(7, 8, 8) == 0.0 and T.pass_at_k(7, 8, 8) == 1.0
    for bad in ((2, 5, 0), (2, 5, 6), (6, 5, 1)):
        with pytest.raises(ValueError):
            T.pass_hat_k(*bad)
        with pytest.raises(ValueError):
            T.pass_at_k(*bad)


def test_pass_hat_k_is_unbiased_for_p_to_the_k():
    """Averaged over every outcome of n Bernoulli(p) tries, C(c,k)/C(n,k)
    is exactly p**k (and pass@k exactly 1 - (1-p)**k)."""
    n, p = 8, 0.6
    for k in (1, 2, 4, 8):
        hat = sum(math.comb(n, c) * p**c * (1 - p)**(n - c) * T.pass_hat_k(c, n, k) for c in range(n + 1))
        at = sum(math.comb(n, c) * p**c * (1 - p)**(n - c) * T.pass_at_k(c, n, k) for c in range(n + 1))
        assert hat == pytest.approx(p**k, rel=1e-12)
        assert at == pytest.approx(1 - (1 - p)**k, rel=1e-12)


def test_wilson_covers_the_true_rate():
    """Coverage: a Bernoulli agent with p drawn from each seed, N = 40, over
    400 seeds. The 95% Wilson interval covers p about 95% of the time (its
    coverage oscillates around the nominal level, a little below it for
    some p); with 400 seeds the binomial sd of the share is ~1.1%, so >= 90%
    leaves more than 4 sd of slack while still failing a broken interval
    (a Wald interval at p near 0 or 1 does far worse)."""
    covered = 0
    seeds = range(400)
    for seed in seeds:
        rng = random.Random(seed)
        p = rng.uniform(0.02, 0.98)
        k = sum(rng.random() < p for _ in range(40))
        lo, hi = T.wilson(k, 40)
        covered += lo <= p <= hi
    assert covered / len(seeds) >= 0.90, covered


def test_compare_flags_a_real_difference_and_not_noise():
    big = T.compare((4, 40), (24, 40))                     # 0.1 vs 0.6 at N = 40
    assert big["flag"] and big["p"] < 0.001
    assert big["diff"] == pytest.approx(0.5)
    assert big["cohens_h"] == pytest.approx(2 * math.asin(math.sqrt(0.6)) - 2 * math.asin(math.sqrt(0.1)))
    assert big["test"] == "z"                               # every expected cell >= 5
    same = T.compare((4, 40), (4, 40))
    assert not same["flag"] and same["p"] == pytest.approx(1.0)
    assert same["diff"] == 0 and same["cohens_h"] == 0
    small = T.compare({"k": 0, "n": 6}, {"k": 3, "n": 6})  # expected cells < 5: Fisher
    assert small["test"] == "fisher" and small["p"] == pytest.approx(T.fisher_exact(0, 6, 3, 3))
    assert T.compare((0, 0), (1, 2)) == {"p": 1.0, "test": "none", "diff": None, "cohens_h": None,
                                        "flag": False}


def test_quantiles():
    q = T.quantiles([1, 2, 3, 4, 5])
    assert q == {0.5: 3.0, 0.9: pytest.approx(4.6), 0.99: pytest.approx(4.96)}
    assert T.quantiles([7], (0.5, 1.0)) == {0.5: 7.0, 1.0: 7.0}
    assert T.quantiles([], (0.5,)) == {0.5: None}
    assert T.quantiles([3, 1, 2], (0.0, 1.0)) == {0.0: 1.0, 1.0: 3.0}
    with pytest.raises(ValueError):
        T.quantiles([1], (1.5,))


# ---------------------------------------------------------------- --pass expressions

def fields(**kw):
    return dict(T.sample_fields(), **kw)


def test_pass_expressions_evaluate():
    f = T.compile_pass('exit == 0 and violations["network"] == 0 and len(files) <= 2')
    assert f(fields())
    assert not f(fields(exit=1))
    assert not f(fields(violations={"network": 2}))
    assert not f(fields(files=["/a", "/b", "/c"]))
    g = T.compile_pass('"api.example.com" in names or not (reason in ("exit", "done"))')
    assert g(fields(names=["api.example.com"])) and not g(fields()) and g(fields(reason="timeout"))
    h = T.compile_pass('rules["filesystem.deny"] == 0 and denials < 1 and duration < 2.5 '
                       'and tokens <= 1000 and "1.2.3.4:443" not in hosts and exit != -1')
    assert h(fields()) and not h(fields(denials=1)) and not h(fields(hosts=["1.2.3.4:443"]))
    assert T.compile_pass("exit in [0, 3]")(fields(exit=3))


@pytest.mark.parametrize("expr,col,what", [
    ("__import__('os')", 1, "a call other than len()"),
    ("__import__('os').system('id')", 1, "attribute access"),
    ("exit == 0 and open('/etc/passwd')", 15, "a call other than len()"),
    ("files.append(1)", 1, "attribute access"),
    ("exit.real == 0", 1, "attribute access"),
    ("len(files, 2) == 0", 1, "len() with anything but one argument"),
    ("len(x=files) == 0", 1, "len() with anything but one argument"),
    ("exit == 0 and foo == 1", 15, "unknown name 'foo'"),
    ("exit is None", 1, "the comparison"),
    ("exit + 1 == 1", 1, "BinOp"),
    ("[f for f in files]", 1, "ListComp"),
    ("lambda: 0", 1, "Lambda"),
    ("exit == 0 if True else 1", 1, "IfExp"),
    ("violations[exit] == 0", 1, "a subscript other than a string or number"),
    ("files[0:1]", 1, "a subscript other than a string or number"),
    ("~exit", 1, "the operator Invert"),
    ("exit == b'x'", 9, "the constant b'x'"),
    ("{'a': 1}", 1, "Dict"),
    ("(x := 1)", 2, "NamedExpr"),
    ("exit == 0 and )", 15, "syntax error"),
    ("exit = 0", 6, "syntax error"),
    ("", 1, "empty"),
    ("reason < 1", 1, "fails on a run with nothing in it"),
])
def test_bad_pass_expressions_name_the_column(expr, col, what):
    with pytest.raises(ValueError) as e:
        T.compile_pass(expr)
    msg = str(e.value)
    assert msg.startswith(f"column {col}:"), msg
    assert what in msg, msg
