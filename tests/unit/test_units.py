"""Durations and sizes (agentwatch.core.units): one grammar, used by the
policy validator and by the sandbox that applies the limits, and said the
same way by docs/policy.md and policies/agentpolicy.schema.json."""
import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentwatch.core import units as U
from agentwatch.policy import load
from agentwatch.sandbox.limits import Limits
from agentwatch.sandbox.plan import make_plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAD = "apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n"


@pytest.mark.parametrize("value, seconds", [
    ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("2.5h", 9000), ("2d", 172800), ("2d12h", 216000),
    ("1d2h3m4s", 93784), ("90", 90), ("0.5s", 0.5), (90, 90), (0.5, 0.5), ("36500d", U.MAX_SECONDS),
    pytest.param("0" * 5000 + "1s", 1, id="5000-zeros-1s"),     # more digits than int() reads
])
def test_durations(value, seconds):
    assert U.parse_duration(value) == seconds


@pytest.mark.parametrize("value, bytes_", [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1P", 1 << 50), ("1.5GiB", 3 << 29), ("2Gi", 2 << 30),
    ("2GB", 2 << 30), ("2g", 2 << 30), ("512 MiB", 512 << 20), ("100B", 100), ("4096", 4096), (4096, 4096),
    ("1.5K", 1536), ("0.5", 1), ("1.1K", 1127), ("8191P", 8191 << 50), (U.MAX_BYTES, U.MAX_BYTES),
])
def test_sizes(value, bytes_):
    assert U.parse_size(value) == bytes_


@pytest.mark.parametrize("value, message", [
    ("", "expected a duration like"), ("1h 30m", "expected a duration"), ("30m1h", "expected a duration"),
    ("1H", "expected a duration"), (" 30m", "expected a duration"), ("30m\n", "expected a duration"),
    (".5h", "expected a duration"), ("1e3", "expected a duration"), ("\u0663s", "expected a duration"),
    (True, "got true"), (None, "got null"), ([1], "got a list"), (float("inf"), "got inf"),
    (float("nan"), "got nan"), ("0s", "must be more than zero, got '0s'"), (0, "must be more than zero"),
    (-5, "must be more than zero"), ("36500d1s", "must be at most 36500d"),
    pytest.param("9" * 5000 + "d", "must be at most 36500d (100 years), got '" + "9" * 40 + "'...",
                 id="5000-nines-d"),
    pytest.param(10 ** 5000, "got a number of more than 38 digits", id="10**5000"),
])
def test_bad_durations(value, message):
    with pytest.raises(U.UnitError) as e:
        U.parse_duration(value)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value, message", [
    ("", "expected a size like"), ("2X", "expected a size"), ("2i", "expected a size"),
    ("512 ", "expected a size"), (" 2G", "expected a size"), ("2 G B", "expected a size"),
    ("1E", "expected a size"), ("1\u212a", "expected a size"),    # KELVIN SIGN: re.I would take it for K
    (1.5, "got 1.5"), (True, "got true"), ({}, "got a mapping"),
    ("0", "must be more than zero"), ("0K", "must be more than zero"), (0, "must be more than zero"),
    ("8192P", "must be at most 2^63 - 1 bytes"), (2 ** 63, "must be at most"),
])
def test_bad_sizes(value, message):
    with pytest.raises(U.UnitError) as e:
        U.parse_size(value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_what_lint_accepts_is_what_the_run_applies(tmp_path):
    """The issue-#15 report: wall_time "1h30m" linted clean and then `run`
    died in the plan (the plan's parser knew only one unit); "1P" the same
    in the limits."""
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + 'resources: {wall_time: "1h30m", memory: "1P"}\n')
    policy = load(str(path))
    assert policy.spec.resources.wall_time == 5400 and policy.spec.resources.memory == 1 << 50
    plan = make_plan(policy.data, {}, landlock_abi=7, bpf_lsm=False)
    assert plan.wall_time == 5400
    files = Limits._files("memory", plan.limits["memory"])
    assert files["v2"][0] == ("memory.max", str(1 << 50))
    assert files["v1"] == [("memory.limit_in_bytes", str(1 << 50))]


# ---------------------------------------------------------------- the JSON Schema says the same

def _resources():
    with open(os.path.join(REPO, "policies", "agentpolicy.schema.json")) as f:
        return json.load(f)["properties"]["resources"]["properties"]


def test_json_schema_carries_the_parsers_patterns_and_bounds():
    res = _resources()
    for key, pattern, high in (("memory", U.SIZE_PATTERN, U.MAX_BYTES),
                               ("wall_time", U.DURATION_PATTERN, U.MAX_SECONDS)):
        number, string = res[key]["oneOf"]
        assert string["pattern"] == "^" + U.NONZERO + pattern[1:]
        assert number["maximum"] == high


# strings near the grammar; no "\n": Python's $ (which jsonschema uses)
# matches before a final newline, JSON Schema's (ECMA) does not
_NEAR = st.text(alphabet="0123456789.dhmsKMGTPkgtpiIbB xE", max_size=8)


@settings(max_examples=400, deadline=None)
@given(value=_NEAR)
def test_json_schema_accepts_exactly_what_the_parsers_accept(value):
    """Up to the upper bound, which a pattern cannot state."""
    for key, parse in (("memory", U.parse_size), ("wall_time", U.parse_duration)):
        pattern = _resources()[key]["oneOf"][1]["pattern"]
        try:
            parse(value)
            ok = True
        except U.UnitError as e:
            ok = "must be at most" in str(e)
        assert bool(re.search(pattern, value)) == ok, (key, value)


def test_docs_examples_parse():
    """Every quoted example in docs/policy.md's "Durations and sizes" parses
    as what it is an example of (and the doc names the bounds the code has)."""
    with open(os.path.join(REPO, "docs", "policy.md")) as f:
        text = f.read()
    section = text.split("### Durations and sizes", 1)[1].split("\n## ", 1)[0]
    durations, sizes = section.split("A **size**")
    found = 0
    for part, parse in ((durations, U.parse_duration), (sizes, U.parse_size)):
        for example in re.findall(r'`"([^"`]*)"`', part):
            parse(example)
            found += 1
    assert found >= 12
    assert "`36500d`" in section and "`8192P`" in section
