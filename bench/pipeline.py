"""The monitor's per-event Python cost, without the kernel (no root needed).

    .venv/bin/python bench/pipeline.py [N] [burst|mix] [profile]

Raw syscall records, packed as the BPF side writes them, go through the code
a run uses: Sensors._on_record (decode, hold for ordering), _deliver,
Correlator.handle, Run._on_event (RunLog.emit: prev, to_json, the hash chain,
the JSONL sink; the judge under policies/coding-agent.yaml). "burst" is the throughput
benchmark's record (openat of /dev/null) N times; "mix" cycles through
absolute, relative, failing, written and denied paths. Prints CPU
microseconds per event; "profile" prints a cProfile table instead. The
figure leaves out what only a real run has (reading the ring buffers, the
poll loop, sharing two cores with the producer): bench/run.py measures that.
"""
import ctypes
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agentwatch.engine import Correlator, RunContext  # noqa: E402
from agentwatch.engine.judge import Judge  # noqa: E402
from agentwatch.policy import load as load_policy  # noqa: E402
from agentwatch.policy.compile import compile_policy  # noqa: E402
from agentwatch.run import Run, RunOptions  # noqa: E402
from agentwatch.run.enforcement import Enforcement  # noqa: E402
from agentwatch.sensors import Sensors, _Ring  # noqa: E402
from agentwatch.sensors import records as R  # noqa: E402
from agentwatch.sensors import syscalls as S  # noqa: E402
from agentwatch.sinks.jsonl import JsonlSink  # noqa: E402

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
MODE = sys.argv[2] if len(sys.argv) > 2 else "burst"
PROFILE = len(sys.argv) > 3
TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CG = 0xC0FFEE
PID = os.getpid()   # a live pid, like a real agent

sensors = Sensors()
nr_to_spec = {S.syscall_number(s.name): s for s in sensors.specs}
NR = {s.name: nr for nr, s in nr_to_spec.items()}
corr = Correlator(nr_to_spec)
sensors._callback = corr.handle
ring = _Ring("events")
ring.budget = 1 << 30

tmp = tempfile.mkdtemp()
pol = load_policy(os.path.join(TREE, "policies/coding-agent.yaml"))
variables = {"WORKSPACE": tmp, "HOME": "/root", "TMPDIR": "/tmp"}
compiled = compile_policy(pol, variables)

run = Run(RunOptions(argv=["true"]))   # not executed: its event path alone
run.log.sinks = [JsonlSink(os.path.join(tmp, "events.jsonl"))]   # no subscriber on run.bus
run.enforcement = Enforcement(None, run.run_id)   # no BPF LSM guard: the Landlock path, as on the CI host
ctx = RunContext(run_id=run.run_id, agent="bench", cgroup_id=CG, cwd=tmp, emit=run._on_event)
run.ctx = ctx
run.judge = Judge(compiled, corr, ctx, run.log.emit, watched_files=[("identity.policy_write", pol.path)])
corr.add_run(ctx)
corr.set_root(ctx, PID, 1)
ctx.procs[PID].launching = False


def raw(name, path, flags=0, ret=3, ts=0, dirfd=S.AT_FDCWD):
    args = [dirfd & 0xFFFFFFFFFFFFFFFF, 0, flags, 0o644, 0, 0]
    return R._SYSCALL.pack(R.EV_SYSCALL, PID, PID, 0, ts, CG, b"burst", NR[name], 0, ret,
                           *args, 0, 0, path.encode(), b"")


if MODE == "burst":
    templates = [raw("openat", "/dev/null")]
else:
    templates = [raw("openat", "/dev/null"), raw("openat", "/etc/passwd"),
                 raw("openat", "src/main.py", 0o101), raw("openat", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
                 raw("openat", "/nonexistent/x", ret=-2), raw("unlinkat", "build/x.o"),
                 raw("openat", f"{tmp}/out.txt", 0o1101), raw("openat", "/proc/self/status"), raw("openat", "/root/.ssh/id_rsa", ret=-13)]
bufs = []
for i in range(N):
    t = bytearray(templates[i % len(templates)])
    R._HDR.pack_into(t, 0, R.EV_SYSCALL, PID, PID, 0, 1_000_000 + i, CG, b"burst")
    b = (ctypes.c_char * len(t)).from_buffer_copy(t)
    bufs.append((ctypes.addressof(b), len(t), b))
size = len(templates[0])


def go():
    on = sensors._on_record
    t0 = time.perf_counter()
    c0 = time.process_time()
    BATCH = 4096
    for start in range(0, N, BATCH):
        for addr, sz, _ in bufs[start:start + BATCH]:
            on(ring, addr, sz)
        sensors._deliver(everything=True)
    run.log.flush()
    return time.perf_counter() - t0, time.process_time() - c0


if PROFILE:
    import cProfile
    import pstats
    cProfile.run("res = go()", "/tmp/pipe.prof")
    pstats.Stats("/tmp/pipe.prof").sort_stats("tottime").print_stats(25)
else:
    wall, cpu = go()
    assert not sensors.errors, sensors.errors[:3]
    assert ctx.events == N, ctx.events
    print(f"{MODE} N={N}: {cpu / N * 1e6:.2f} us/event cpu, {wall / N * 1e6:.2f} us wall, "
          f"{N / cpu:,.0f} events/s (cpu); lines={run.log.chain.lines} violations={sum(run.judge.by_category.values())}")
run.log.close()
shutil.rmtree(tmp, ignore_errors=True)
