"""agentwatch benchmark suite (issue #5): `.venv/bin/python bench/run.py [--quick] [--only NAME]`.

lib.py holds the shared plumbing (interleaving, statistics, agentwatch runs,
BPF run-time statistics, memory), benchmarks.py one function per benchmark,
warm_runner.py a process holding one loaded Monitor, run.py the command line.
"""
