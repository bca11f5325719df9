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
             (bpf/egress.bpf.c), the network allow rules; with the egress
             guard on, the redirect of TCP and DNS to it (``GuardPorts``,
             ``GUARD_PROGRAMS``, ``Egress.flow_of``)
  guard.py   ``EgressGuard``: the egress guard, egress decided by name in a
             proxy the kernel redirects a run's TCP to (TLS SNI, HTTP CONNECT
             or Host; the original destination must be an address of the
             name), and the DNS responder port 53 goes to; an asyncio loop
             in a thread, listeners per run (``RunSession``), a record per flow
  dns.py     the egress guard's DNS responder: ``answer()`` (pure) and
             ``DnsServer`` (UDP and TCP); allowed names only, nothing forwarded
  wire.py    pure parsers of a flow's first bytes (TLS ClientHello, HTTP
             request head) and the guard's HTTP refusals
  lsm.py     ``LsmGuard``: BPF LSM hooks (bpf/lsm.bpf.c): exec and mmap
             allow-list, open deny-list by inode, connect ports, unix
             sockets, signals leaving the run
  records.py the Python mirror of bpf/guards.h, the records and map keys
             both programs share (checked by tests/unit/test_guard_records.py)
  denials.py ``DenialStream``: a guard's ring buffer of refusals and counters

Like sensors/, guards/ may import bcc (tests/unit/test_imports.py checks no
other package does), and only inside methods: the rule logic and record
decoding are pure and import anywhere. The egress guard's proxy and DNS
responder are userspace code, not kernel programs, but they enforce: the
kernel gives them every flow, and they refuse or allow it. Compiling goes through
``agentwatch.sensors.compile_bpf`` (one bcc compile at a time per process).
"""
