"""Names that must stay apart. The suite runs as one pytest session over
tests/ (rootdir-relative imports, no __init__.py): two test modules with
one basename would shadow each other there ("import file mismatch"), which
only a full run shows. And the kernel keeps 15 characters of a BPF
program's name: two programs cut to one name cannot be told apart in its
program list, bpf_stats or bpftool."""
import collections
import glob
import os
import re

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPF = os.path.join(os.path.dirname(TESTS), "bpf")


def test_test_module_basenames_are_unique():
    seen = collections.defaultdict(list)
    for root, dirs, files in os.walk(TESTS):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in files:
            if f.startswith("test_") and f.endswith(".py") or f in ("conftest.py",):
                seen[f].append(os.path.relpath(os.path.join(root, f), TESTS))
    assert {f: p for f, p in seen.items() if len(p) > 1} == {}


def test_bpf_program_names_fit_the_kernels_name_field():
    names = []
    for path in glob.glob(os.path.join(BPF, "*.bpf.c")):
        with open(path) as f:
            names += re.findall(r"^(?:int|BPF_PROG\()\s*(aw_\w+)", f.read(), re.M)
    assert len(names) > 20
    assert [n for n in names if len(n) > 15] == []      # BPF_OBJ_NAME_LEN - 1
    assert len(set(names)) == len(names)
