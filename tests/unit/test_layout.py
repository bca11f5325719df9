"""The suite runs as one pytest session over tests/ (rootdir-relative
imports, no __init__.py): two test modules with one basename would shadow
each other there ("import file mismatch"), which only a full run shows."""
import collections
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_test_module_basenames_are_unique():
    seen = collections.defaultdict(list)
    for root, dirs, files in os.walk(TESTS):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in files:
            if f.startswith("test_") and f.endswith(".py") or f in ("conftest.py",):
                seen[f].append(os.path.relpath(os.path.join(root, f), TESTS))
    assert {f: p for f, p in seen.items() if len(p) > 1} == {}
