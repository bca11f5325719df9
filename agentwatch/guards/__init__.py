"""Kernel guards: enforcement objects that agentwatch loads and attaches to a
run's cgroup from outside the agent.

A sensor (``agentwatch.sensors``) observes: tracepoint programs that report
what the agent does and never change the outcome of a call. A guard
enforces: its BPF programs sit on a kernel hook and refuse a call (EPERM)
before it takes effect, then report the refusal on the guard's own ring
buffer and counters (``denials.DenialStream``), so a flood of monitoring
records cannot starve a denial's record. The sandbox layers
(``agentwatch.sandbox``: Landlock, seccomp, mounts, limits) enforce too, but
the child applies them to itself before exec; a guard needs no cooperation
from the process it judges.

  egress.py  ``Egress``: cgroup BPF connect/sendmsg/bind/socket hooks
             (bpf/egress.bpf.c), the network allow rules
  lsm.py     ``LsmGuard``: BPF LSM hooks (bpf/lsm.bpf.c): exec and mmap
             allow-list, open deny-list by inode, connect ports, unix
             sockets, signals leaving the run
  records.py the Python mirror of bpf/guards.h, the records and map keys
             both programs share (checked by tests/unit/test_guard_records.py)

Like sensors/, guards/ may import bcc (tests/unit/test_imports.py checks no
other package does), and only inside methods: the rule logic and record
decoding are pure and import anywhere. Compiling goes through
``agentwatch.sensors.compile_bpf`` (one bcc compile at a time per process).
"""
