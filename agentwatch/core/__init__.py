"""The bottom layer: what every other layer may use and that uses nothing of
agentwatch above it (see the layer table in tests/unit/test_imports.py).

Today it holds units (durations and sizes). errors, events, procfs helpers
and the socket peer lookup move here as the tree is reshaped (issue #15).
"""
