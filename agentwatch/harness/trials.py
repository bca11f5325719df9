"""The statistics of `agentwatch trial` (issue #20): pure functions over
counts, the standard library only (docs/trials.md says how to read them).

  wilson(k, n)          the Wilson score interval of k successes in n (95%)
  rate(k, n)            k, n, p, the interval and a note (rule of three at 0 of n)
  pass_hat_k(c, n, k)   tau-bench's unbiased pass^k: all k of k tries pass
  pass_at_k(c, n, k)    the unbiased pass@k: at least one of k tries passes
  fisher_exact(a, b, c, d), two_proportion(k1, n1, k2, n2), compare(base, new)
  quantiles(xs, qs)     linear interpolation between order statistics
  compile_pass(expr)    a --pass expression, checked against a whitelist of
                        Python syntax (ast), as a function of a run's fields

The runner that makes the counts is cli/trial.py: it runs agents through
agentwatch.api, which sits above the harness in the layer table.
"""
import ast
import math
from fractions import Fraction

__all__ = ["Z95", "wilson", "rate", "pass_hat_k", "pass_at_k", "fisher_exact", "two_proportion",
           "compare", "cohens_h", "quantiles", "compile_pass", "PASS_FIELDS", "sample_fields"]

Z95 = 1.959963984540054          # the 0.975 quantile of the standard normal


def wilson(k, n, z=Z95):
    """The Wilson score interval (lo, hi) of k successes in n trials; (0, 1)
    when n is 0 (nothing is known)."""
    _check_counts(k, n)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # exact at the edges (no 1e-17 below 0 or above 1)
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _check_counts(k, n):
    if not (isinstance(k, int) and isinstance(n, int)) or n < 0 or not 0 <= k <= n:
        raise ValueError(f"counts must be integers with 0 <= k <= n (got k={k!r}, n={n!r})")


def _num(x):
    return f"{x:.3g}"


def rate(k, n, z=Z95):
    """{"k", "n", "p", "lo", "hi", "note", "rule3"}: the observed rate with
    its Wilson interval. At 0 of n the note gives the rule of three (the
    95% upper bound 3/n, in "rule3"); at n of n its mirror (lower bound
    1 - 3/n); at n <= 3 it says the rule bounds nothing."""
    lo, hi = wilson(k, n, z)
    out = {"k": k, "n": n, "p": k / n if n else None, "lo": lo, "hi": hi, "note": "", "rule3": None}
    if n and n <= 3 and k in (0, n):
        out["rule3"] = 1.0 if k == 0 else 0.0
        out["note"] = f"{k} of {n}: too few runs for the rule of three (3/{n} >= 1)"
    elif n and k == 0:
        out["rule3"] = min(1.0, 3 / n)
        out["note"] = f"0 of {n}: rule of three, p < 3/{n} = {_num(min(1.0, 3 / n))} at 95%"
    elif n and k == n:
        out["rule3"] = max(0.0, 1 - 3 / n)
        out["note"] = f"{n} of {n}: rule of three, p > 1 - 3/{n} = {_num(max(0.0, 1 - 3 / n))} at 95%"
    return out


def _check_k(c, n, k):
    _check_counts(c, n)
    if not isinstance(k, int) or k < 1 or k > n:
        raise ValueError(f"k must be an integer with 1 <= k <= n (got k={k!r}, n={n})")


def pass_hat_k(c, n, k):
    """tau-bench's pass^k: the chance that k tries drawn without replacement
    from n (c of them passed) all pass, C(c, k) / C(n, k): unbiased for
    p**k."""
    _check_k(c, n, k)
    return float(Fraction(math.comb(c, k), math.comb(n, k)))


def pass_at_k(c, n, k):
    """pass@k (Chen et al. 2021): the chance that at least one of k tries
    drawn from n (c passed) passes, 1 - C(n - c, k) / C(n, k)."""
    _check_k(c, n, k)
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def fisher_exact(a, b, c, d):
    """Fisher's exact test of the 2x2 table [[a, b], [c, d]]: the two-sided
    p-value, the sum of the probabilities (hypergeometric, margins fixed)
    of every table no more likely than the one observed, with scipy's
    relative tolerance of 1e-7 for ties. Exact integer arithmetic."""
    for x in (a, b, c, d):
        if not isinstance(x, int) or x < 0:
            raise ValueError(f"table cells must be integers >= 0 (got {(a, b, c, d)!r})")
    r1, r2, c1 = a + b, c + d, a + c
    n = r1 + r2
    if n == 0:
        return 1.0

    def weight(x):                    # C(n, c1) * P(X = x)
        return math.comb(r1, x) * math.comb(r2, c1 - x)
    observed = weight(a)
    # weight(x) <= observed * (1 + 1e-7), in integers
    tail = sum(w for w in (weight(x) for x in range(max(0, c1 - r2), min(r1, c1) + 1))
               if w * 10**7 <= observed * (10**7 + 1))
    return min(1.0, float(Fraction(tail, math.comb(n, c1))))


def _normal_sf2(z):
    """Two-sided tail of the standard normal: P(|Z| >= |z|)."""
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportion(k1, n1, k2, n2):
    """The pooled two-proportion z-test of k1/n1 against k2/n2: (z, two-sided
    p); z > 0 when the second rate is higher. (0, 1) when either n is 0 or
    the pooled rate is 0 or 1 (no variance: nothing differs)."""
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    if not n1 or not n2:
        return 0.0, 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k2 / n2 - k1 / n1) / se
    return z, _normal_sf2(z)


def cohens_h(p1, p2):
    """Cohen's h, the effect size of two proportions: 2 asin sqrt(p2) -
    2 asin sqrt(p1) (0.2 small, 0.5 medium, 0.8 large)."""
    return 2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1))


def _kn(x):
    if isinstance(x, dict):
        return x["k"], x["n"]
    k, n = x
    return k, n


def compare(base, new, alpha=0.05):
    """Compare two rates (each (k, n) or a rate() dict): {"p", "test",
    "diff", "cohens_h", "flag"}. Fisher's exact test when any expected cell
    of the 2x2 table is below 5, else the two-proportion z-test; diff is
    new - base; flag is p < alpha."""
    k1, n1 = _kn(base)
    k2, n2 = _kn(new)
    _check_counts(k1, n1)
    _check_counts(k2, n2)
    if not n1 or not n2:
        return {"p": 1.0, "test": "none", "diff": None, "cohens_h": None, "flag": False}
    p1, p2 = k1 / n1, k2 / n2
    total, succ = n1 + n2, k1 + k2
    expected = [n * s / total for n in (n1, n2) for s in (succ, total - succ)]
    if min(expected) < 5:
        test, p = "fisher", fisher_exact(k1, n1 - k1, k2, n2 - k2)
    else:
        test, (_, p) = "z", two_proportion(k1, n1, k2, n2)
    return {"p": p, "test": test, "diff": p2 - p1, "cohens_h": cohens_h(p1, p2), "flag": p < alpha}


def quantiles(xs, qs=(0.5, 0.9, 0.99)):
    """{q: value} for each q in qs (0..1): linear interpolation between the
    order statistics (numpy's default, R's type 7); None for every q when
    xs is empty."""
    data = sorted(float(x) for x in xs)
    out = {}
    for q in qs:
        if not 0 <= q <= 1:
            raise ValueError(f"a quantile must be in [0, 1] (got {q!r})")
        if not data:
            out[q] = None
            continue
        pos = q * (len(data) - 1)
        i = int(math.floor(pos))
        j = min(i + 1, len(data) - 1)
        out[q] = data[i] + (data[j] - data[i]) * (pos - i)
    return out


# ---------------------------------------------------------------- --pass expressions

# The fields of one run a --pass expression may name, with their types.
PASS_FIELDS = {
    "exit": "int (None when the run could not start)",
    "reason": "str: how the run ended (exit, timeout, or the termination reason)",
    "violations": "dict category -> count (a missing category is 0)",
    "rules": "dict rule -> count (a missing rule is 0)",
    "denials": "int: kernel denials",
    "hosts": "list of 'addr:port' the run connected to",
    "names": "list of names the egress guard let through",
    "files": "list of paths written",
    "duration": "float: seconds",
    "tokens": "int: LLM tokens in and out",
}


class _Counts(dict):
    """A dict whose missing keys count 0: violations["network"] of a run
    without network violations is 0, not an error."""

    def __missing__(self, key):
        return 0


def sample_fields():
    """A run's fields with nothing in them (what compile_pass tries an
    expression on)."""
    return {"exit": 0, "reason": "exit", "violations": {}, "rules": {}, "denials": 0, "hosts": [],
            "names": [], "files": [], "duration": 0.0, "tokens": 0}


_COMPARE_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.In, ast.NotIn)
_ALLOWED = ("comparisons (== != < <= > >= in, not in), and, or, not, numbers, strings, "
            "tuples/lists of them, the run's fields (" + ", ".join(PASS_FIELDS) + "), "
            "field[\"key\"] and len()")


def _bad(node, what):
    return ValueError(f"column {node.col_offset + 1}: {what} is not allowed in a pass expression "
                      f"(allowed: {_ALLOWED})")


def _check(node):
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            raise _bad(node, f"the operator {type(node.op).__name__}")
        _check(node.operand)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if not isinstance(op, _COMPARE_OPS):
                raise _bad(node, f"the comparison {type(op).__name__} ('is', 'is not')")
        _check(node.left)
        for c in node.comparators:
            _check(c)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, type(None))):   # bool is an int
            raise _bad(node, f"the constant {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id not in PASS_FIELDS:
            raise ValueError(f"column {node.col_offset + 1}: unknown name {node.id!r} (the fields "
                             f"are: {', '.join(PASS_FIELDS)})")
    elif isinstance(node, ast.Subscript):
        if not (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, (str, int))):
            raise _bad(node, "a subscript other than a string or number")
        _check(node.value)
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "len"):
            what = "attribute access" if isinstance(node.func, ast.Attribute) else "a call other than len()"
            raise _bad(node.func if isinstance(node.func, ast.Attribute) else node, what)
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise _bad(node, "len() with anything but one argument")
        _check(node.args[0])
    elif isinstance(node, (ast.Tuple, ast.List)):
        for e in node.elts:
            _check(e)
    elif isinstance(node, ast.Attribute):
        raise _bad(node, "attribute access")
    else:
        raise _bad(node, f"{type(node).__name__}")


def compile_pass(expr):
    """A --pass expression as a function fields -> bool (fields: a run's, as
    PASS_FIELDS names them). Only a whitelist of syntax is accepted (ast);
    anything else, a syntax error, an unknown name or an expression that
    fails on an empty run raises ValueError naming the column."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError("column 1: an empty pass expression")
    try:
        tree = ast.parse(expr.strip(), "<pass>", mode="eval")
    except SyntaxError as e:
        raise ValueError(f"column {e.offset or 1}: syntax error: {e.msg}") from None
    _check(tree.body)
    code = compile(tree, "<pass>", "eval")

    def passes(fields):
        env = dict(fields)
        for name in ("violations", "rules"):
            env[name] = _Counts(env.get(name) or {})
        return bool(eval(code, {"__builtins__": {}, "len": len}, env))      # noqa: S307 - checked above

    try:
        passes(sample_fields())
    except Exception as e:           # noqa: BLE001 - e.g. "a" < 1
        raise ValueError(f"column 1: the expression fails on a run with nothing in it: "
                         f"{type(e).__name__}: {e}") from None
    passes.expr = expr
    return passes
