"""The checkout's `agentwatch` command line, for the benchmarks, with one
change: the start-up sweep (run/sweep.gc) is off.

Why: gc() removes every run cgroup under <cgroup2>/agentwatch whose record is
not in *its own* state directory, so an `agentwatch run` started with another
AGENTWATCH_STATE_DIR (a test session, this suite) kills the agents of every
other concurrent agentwatch. The suite keeps its runs in a scratch state
directory, so it must neither sweep others nor rely on not being swept
(bench/lib.py notes any of its agents that died early). The sweep is a few
directory reads; leaving it out does not change the figures.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentwatch.run import sweep  # noqa: E402

sweep.gc = lambda log=None: []

from cli.main import entry  # noqa: E402

if __name__ == "__main__":
    entry()
