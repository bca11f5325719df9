"""The bottom layer: what every other layer may use and that uses nothing of
agentwatch above it (see the layer table in tests/unit/test_imports.py):
errors (the exception hierarchy), events (the one event schema), state (the
state directory and run records), units (durations and sizes), options (the
run options, declared once), procfs (what /proc says of a process) and peer
(a socket peer -> run, from the kernel).
"""
