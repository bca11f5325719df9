"""Shared plumbing for the benchmarks: interleaving and statistics, figures
and targets, a scratch workspace that cleans up after itself, agentwatch runs
(one-shot CLI, background CLI, shared warm monitor), the kernel's BPF run-time
statistics, and memory figures.

Every figure is a comparison made inside one invocation on one machine:
baseline and monitored runs alternate (A B, B A, A B, ...: the order flips
each repetition so slow drift charges both sides alike) and the result is the
median of the paired ratios or differences, with min/max and IQR as spread.
"""
import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from agentwatch.sensors.inventory import bpf_syscall

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
CSRC = os.path.join(BENCH, "csrc")
POLICY = os.path.join(REPO, "policies", "coding-agent.yaml")
STRICT_POLICY = os.path.join(REPO, "policies", "sandboxed-agent.yaml")   # kills: mapexec probes


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ------------------------------------------------------------------

def summarize(samples):
    """{n, median, min, max, q1, q3, samples} of the numbers given (None: none)."""
    xs = sorted(float(x) for x in samples if x is not None)
    if not xs:
        return None
    if len(xs) == 1:
        q1 = q3 = xs[0]
    else:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "q1": q1, "q3": q3, "samples": [round(x, 6) for x in samples if x is not None]}


def paired(base, mon, how="ratio"):
    """Per repetition: monitored / baseline ("ratio") or monitored - baseline ("delta")."""
    out = []
    for b, m in zip(base, mon):
        if b is None or m is None:
            continue
        out.append(m / b if how == "ratio" else m - b)
    return out


def alternate(run_a, run_b, reps):
    """Call run_a and run_b reps times each, interleaved A B, B A, A B, ...
    Returns (a_samples, b_samples), paired by repetition."""
    a, b = [], []
    for i in range(reps):
        order = [(run_a, a), (run_b, b)] if i % 2 == 0 else [(run_b, b), (run_a, a)]
        for fn, out in order:
            out.append(fn())
    return a, b


# -- figures and targets -----------------------------------------------------------

def _fmt(v, unit):
    if v is None:
        return "-"
    if unit == "ns":
        return f"{v:.1f} ns"
    if unit == "s":
        return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.2f} s"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "MB":
        return f"{v:.1f} MB"
    if unit in ("events/s", "flows/s", "req/s", "msg/s", "ops/s"):
        return f"{v:,.0f}/s"
    if unit == "MiB/s":
        return f"{v:,.0f} MiB/s"
    if unit == "µs":
        return f"{v:,.0f} µs"
    if unit == "%":
        return f"{v:.1f}%"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:g} {unit}".strip()


def fmt(v, unit):
    return _fmt(v, unit)


def compare_figure(name, unit, base, mon, how, target=None, limit=None, note=None):
    """A baseline-vs-monitored figure. how: "ratio" (shown as % overhead),
    "x" (ratio shown as a factor) or "delta" (difference in unit). limit is
    compared with the median of the paired ratios or differences."""
    kind = "delta" if how == "delta" else "ratio"
    d = summarize(paired(base, mon, kind))
    fig = {"figure": name, "unit": unit, "compare": how, "baseline": summarize(base),
           "monitored": summarize(mon), "result": d, "target": target, "met": None, "note": note}
    if d is None:
        fig["text"] = "-"
        return fig
    med, lo, hi = d["median"], d["min"], d["max"]
    if how == "ratio":
        fig["text"] = f"{(med - 1) * 100:+.1f}% [{(lo - 1) * 100:+.1f}..{(hi - 1) * 100:+.1f}]"
    elif how == "x":
        fig["text"] = f"{med:.2f}x [{lo:.2f}..{hi:.2f}]"
    else:
        fig["text"] = f"{med:+.1f} [{lo:+.1f}..{hi:+.1f}] {unit}".rstrip()
        if unit == "s":
            fig["text"] = f"{med * 1000:+.0f} ms [{lo * 1000:+.0f}..{hi * 1000:+.0f}]"
    if limit is not None:
        fig["met"] = bool(med <= limit)
    return fig


def value_figure(name, unit, samples, target=None, met=None, text=None, note=None):
    """A figure that is a value in itself (a rate, a count, a percentage)."""
    s = summarize(samples if isinstance(samples, (list, tuple)) else [samples])
    if text is None and s:
        text = _fmt(s["median"], unit)
        if s["n"] > 1 and s["min"] != s["max"]:
            text += f" [{_fmt(s['min'], unit)}..{_fmt(s['max'], unit)}]"
    return {"figure": name, "unit": unit, "compare": "value", "baseline": None, "monitored": s,
            "result": s, "text": text or "-", "target": target,
            "met": None if met is None else bool(met), "note": note}


# -- agents killed from outside ----------------------------------------------------------

class AgentKilled(RuntimeError):
    """An agent died of a SIGKILL it did not ask for, or could not join its
    cgroups. On a shared machine, another agentwatch's start-up sweep
    (run/sweep.gc) kills the run cgroups (and removes the cgroup v1 limit groups)
    it has no record of: ours. Such a sample is retried, and counted."""


def interfered(status, stderr=""):
    """Did something outside kill this run's agent or remove its cgroups?"""
    return status == SIGKILL_STATUS or "joining cgroup" in (stderr or "")


KILLED = {"retries": 0, "waited_s": 0.0}
QUIET_TIMEOUT = {"s": 120.0}   # how long to wait for another agentwatch to go (run.py sets it)
SIGKILL_STATUS = 128 + signal.SIGKILL
_WORKSPACES = []        # live Workspaces: whose processes' BPF programs are ours


def retry_killed(fn, tries=5):
    """fn(), again (after the machine is quiet) when an agent was killed from outside."""
    for i in range(tries):
        try:
            return fn()
        except AgentKilled as e:
            KILLED["retries"] += 1
            if i == tries - 1:
                raise
            log(f"retrying after the other agentwatch is gone: {e}")
            wait_quiet()


def wait_quiet(timeout=None, settle=2.0):
    """Wait until no other agentwatch has programs loaded (for settle seconds
    in a row), at most timeout seconds. Returns True when quiet."""
    timeout = QUIET_TIMEOUT["s"] if timeout is None else timeout
    t0 = time.monotonic()
    quiet_since = None
    while time.monotonic() - t0 < timeout:
        if foreign_programs():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            break
        time.sleep(0.2)
    KILLED["waited_s"] += time.monotonic() - t0
    return not foreign_programs()


def _prog_ids_of(pid):
    ids = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return ids
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"^prog_id:\s+(\d+)", f.read(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def foreign_programs():
    """aw_* programs loaded by processes this suite did not start."""
    ours = set()
    for ws in _WORKSPACES:
        for p in ws.procs:
            if p.poll() is None:
                ours |= _prog_ids_of(p.pid)
    return set(aw_programs()) - ours


# -- workspace and processes ---------------------------------------------------------

class Workspace:
    """A scratch directory (tmp files, the agentwatch state dir, compiled C
    programs) plus every process the suite starts; cleanup() removes both."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="aw-bench-")
        self.state = os.path.join(self.root, "state")
        self.bin = os.path.join(self.root, "bin")
        os.makedirs(self.state)
        os.makedirs(self.bin)
        self.procs = []
        _WORKSPACES.append(self)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def build(self, name):
        """Compile bench/csrc/<name>.c (static, -O2) once; returns the binary."""
        exe = os.path.join(self.bin, name)
        if not os.path.exists(exe):
            src = os.path.join(CSRC, f"{name}.c")
            r = subprocess.run(["gcc", "-O2", "-static", "-o", exe, src], capture_output=True, text=True)
            if r.returncode != 0:   # no static libc: a dynamic binary works too (more events)
                subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
        return exe

    def popen(self, argv, **kw):
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def cleanup(self):
        for p in self.procs:
            stop_process(p)
        self.procs = []
        remove_leftover_cgroups(self)
        shutil.rmtree(self.root, ignore_errors=True)
        if self in _WORKSPACES:
            _WORKSPACES.remove(self)


def stop_process(p, timeout=60):
    """SIGTERM one process we started (agentwatch then tears its run down),
    SIGKILL if it does not exit in time. Returns its exit code."""
    if p.poll() is not None:
        return p.returncode
    try:
        p.send_signal(signal.SIGTERM)
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(timeout=30)


def remove_leftover_cgroups(ws):
    """Remove cgroups of this workspace's runs that are still there (only
    after a crash: a finished run removes its own)."""
    try:
        from agentwatch.sandbox.cgroups import RunCgroup, root_path
        runs = os.listdir(os.path.join(ws.state, "runs"))
    except (ImportError, OSError):
        return
    for run_id in runs:
        path = os.path.join(root_path(), run_id)
        if os.path.isdir(path):
            RunCgroup(path).remove()


# -- agentwatch, one process per run (what a user runs) --------------------------------

def aw_env(ws, extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["AGENTWATCH_STATE_DIR"] = ws.state
    env.update(extra or {})
    return env


def aw_cmd(*args):
    """The checkout's CLI (bench/aw_cli.py: cli.main without the start-up sweep)."""
    return [sys.executable, os.path.join(BENCH, "aw_cli.py"), *args]


def run_argv(argv, policy=None, cmd=aw_cmd, daemon=False, opts=()):
    """`agentwatch run [opts]`, with a monitor of its own (--no-daemon: a
    daemon the suite started may answer on the state dir) or on the daemon."""
    # the strict policy's wildcard deny is a downgrade (killed at open, not refused)
    pol = ["--policy", policy] + (["--allow-downgrade"] if policy == STRICT_POLICY else []) if policy else []
    return cmd("run", "--daemon" if daemon else "--no-daemon", *pol, *opts, "--", *argv)


# -- agentwatch daemon: one monitor all runs share, and its thin CLI client ------------------

def client_cmd(*args):
    """The checkout's CLI as a user runs it (cli.main; `run` on the daemon
    imports only the protocol: the thin client whose cost is measured)."""
    return [sys.executable, "-m", "cli.main", *args]


class Daemon:
    """`agentwatch daemon start` on the workspace's state dir; close() stops
    it (and kills it by its pid if it did not stop)."""

    def __init__(self, ws):
        from agentwatch import daemon
        self.ws, self.path = ws, os.path.join(ws.state, "daemon.sock")
        t0 = time.monotonic()
        r = subprocess.run(client_cmd("daemon", "start"), env=aw_env(ws), cwd=ws.root,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"agentwatch daemon start failed: {r.stderr[-1500:]}")
        self.ready_s = time.monotonic() - t0
        self.pid = daemon.ping(self.path)["pid"]

    def status(self):
        from agentwatch import daemon
        return daemon.ping(self.path)

    def client(self, argv, policy=None, **kw):
        """`agentwatch run --daemon ... -- argv`, left running (Popen)."""
        return self.ws.popen(run_argv(argv, policy, cmd=client_cmd, daemon=True), cwd=self.ws.root,
                             env=aw_env(self.ws), **kw)

    def run(self, argv, policy=None):
        """`agentwatch run --daemon -- argv` to completion: wall seconds."""
        t0 = time.monotonic()
        p = subprocess.run(run_argv(argv, policy, cmd=client_cmd, daemon=True), cwd=self.ws.root,
                           env=aw_env(self.ws), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           timeout=300)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"agentwatch run --daemon exited {p.returncode}: "
                               f"{p.stderr.decode(errors='replace')[-1500:]}")
        return wall

    def close(self):
        from agentwatch import daemon
        from agentwatch.core.errors import AgentwatchError
        try:
            daemon.shutdown(self.path)       # returns once the process is gone
        except AgentwatchError as e:
            log(f"agentwatch daemon stop: {e}")
        if not process_gone(self.pid):
            os.kill(self.pid, signal.SIGKILL)        # ours: started above


def process_gone(pid):
    """Whether pid has exited (a zombie counts: reaped here when it is our
    child, e.g. re-parented to a subreaper we are)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def run_cli(ws, argv, policy=None, env=None, cwd=None, timeout=900, opts=()):
    """`agentwatch run [--policy P] [opts] -- argv` to completion (retried
    when the agent is killed from outside). Returns a dict: exit, wall_s,
    run_id, stdout, stderr."""
    def once():
        t0 = time.monotonic()
        p = subprocess.run(run_argv(argv, policy, opts=opts), cwd=cwd or ws.root, env=aw_env(ws, env),
                           capture_output=True, text=True, timeout=timeout)
        wall = time.monotonic() - t0
        m = re.search(r"agentwatch: run (\S+) \(", p.stderr)
        if interfered(p.returncode, p.stderr):
            drop_run(ws, m.group(1) if m else None)
            raise AgentKilled(f"agent {argv[0]} was SIGKILLed")
        return {"exit": p.returncode, "wall_s": wall, "run_id": m.group(1) if m else None,
                "stdout": p.stdout, "stderr": p.stderr}
    return retry_killed(once)


def run_record(ws, run_id):
    try:
        with open(os.path.join(ws.state, "runs", run_id, "run.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_of_owner(ws, pid):
    """The run record whose owner (agentwatch process) is pid, or None."""
    try:
        names = os.listdir(os.path.join(ws.state, "runs"))
    except FileNotFoundError:
        return None
    for name in names:
        rec = run_record(ws, name)
        if rec and (rec.get("owner") or {}).get("pid") == pid:
            return rec
    return None


def run_events(ws, run_id):
    with open(os.path.join(ws.state, "runs", run_id, "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def drop_run(ws, run_id):
    """Delete a finished run's directory (logs of floods are large)."""
    if run_id:
        shutil.rmtree(os.path.join(ws.state, "runs", run_id), ignore_errors=True)


def lifecycle(events, phase):
    for e in events:
        if e.get("kind") == "lifecycle" and e.get("phase") == phase:
            return e
    return None


class BackgroundRun:
    """`agentwatch run ... -- argv` left running (an idle agent, a footprint
    sample). wait_running() returns once run.json says running; stop() sends
    SIGTERM to that agentwatch process (by its pid) and waits for teardown."""

    def __init__(self, ws, argv, policy=None, env=None, cwd=None):
        self.ws = ws
        self.proc = ws.popen(run_argv(argv, policy), cwd=cwd or ws.root, env=aw_env(ws, env),
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        self.record = None
        self.terminated = False

    @property
    def pid(self):
        return self.proc.pid

    def wait_running(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = run_of_owner(self.ws, self.proc.pid)
            if rec and rec.get("status") == "running":
                self.record = rec
                return rec
            if self.proc.poll() is not None:
                self.check_alive()
            time.sleep(0.05)
        raise RuntimeError("agentwatch run did not reach 'running' in time")

    def alive(self):
        return self.proc.poll() is None

    def check_alive(self):
        """Raise (AgentKilled when its agent was SIGKILLed) if the run ended."""
        if self.alive():
            return
        err = self.proc.stderr.read().decode(errors="replace").strip()[-1500:]
        cls = AgentKilled if interfered(self.proc.returncode, err) else RuntimeError
        raise cls(f"agentwatch run ended early with status {self.proc.returncode}: {err}")

    def terminate(self):
        """SIGTERM once (a second one would make agentwatch kill at once)."""
        if self.alive() and not self.terminated:
            self.terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout=60):
        t0 = time.monotonic()
        self.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=30)
        try:
            self.proc.stderr.close()
        except OSError:
            pass
        return code, time.monotonic() - t0


# -- agentwatch, one loaded monitor serving many runs (bench/warm_runner.py) -------------

class WarmRunner:
    """A child process holding one loaded agentwatch Monitor (a stand-in for
    the future daemon); runs agents on it, and plain commands, on request."""

    def __init__(self, ws, timeout=180):
        self.ws = ws
        self.logfile = ws.path("warm_runner.log")
        before = set(aw_programs())
        self.proc = ws.popen([sys.executable, os.path.join(BENCH, "warm_runner.py")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=open(self.logfile, "ab"), cwd=ws.root, env=aw_env(ws),
                             start_new_session=True)
        self.ready = self._recv(timeout)
        if not self.ready.get("ready"):
            raise RuntimeError(f"warm runner failed to start: {self.ready}")
        self.prog_ids = sorted(set(aw_programs()) - before)
        self.buf = b""

    def _recv(self, timeout):
        fd = self.proc.stdout.fileno()
        buf = getattr(self, "buf", b"")
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"warm runner did not answer in {timeout} s; log: {self.tail()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"warm runner exited ({self.proc.poll()}); log: {self.tail()}")
            buf += chunk
        line, self.buf = buf.split(b"\n", 1)
        return json.loads(line)

    def tail(self, n=3000):
        try:
            with open(self.logfile, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def request(self, req, timeout=900):
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        resp = self._recv(timeout)
        if resp.get("error"):
            cls = AgentKilled if interfered(None, resp.get("message")) else RuntimeError
            raise cls(f"warm runner: {resp['error']}")
        return resp

    def run(self, argv, policy=None, cwd=None, home=None, timeout=900):
        """Run argv as an agent on the shared monitor (retried when the agent
        is killed from outside). Returns exit, run_id, to_exit_s (execute()
        start to agent exit seen), total_s, teardown_s, events, counters
        (kernel submitted/lost and userspace received during the run)."""
        def once():
            r = self.request({"op": "run", "argv": argv, "policy": policy, "cwd": cwd,
                              "home": home}, timeout)
            if r["exit"] == SIGKILL_STATUS:
                drop_run(self.ws, r["run_id"])
                raise AgentKilled(f"agent {argv[0]} was SIGKILLed")
            return r
        return retry_killed(once)

    def plain(self, argv, cwd=None, timeout=900):
        """Run argv as a plain subprocess of the same process: total_s."""
        return self.request({"op": "plain", "argv": argv, "cwd": cwd}, timeout)

    def close(self, timeout=120):
        """Unload the monitor; returns the seconds the detach took."""
        if self.proc.poll() is not None:
            return None
        try:
            self.proc.stdin.close()
            resp = self._recv(timeout)
            self.proc.wait(timeout=30)
            return resp.get("close_s")
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            stop_process(self.proc)
            return None


# -- the kernel's view: BPF programs and their run-time statistics ------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PROG_GET_NEXT_ID, _PROG_GET_FD_BY_ID, _OBJ_GET_INFO_BY_FD, _ENABLE_STATS = 11, 13, 15, 32
# struct bpf_prog_info (include/uapi/linux/bpf.h): name[16] at 64, run_time_ns
# at 192, run_cnt at 200 (checked against the installed header with offsetof;
# tests/unit/test_bench_smoke.py does the same)
PROG_INFO_LEN = 232
OFF_NAME, OFF_RUN_TIME_NS, OFF_RUN_CNT = 64, 192, 200


class _IdAttr(ctypes.Structure):
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _StatsAttr(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32)]


def parse_prog_info(raw):
    """name, run_time_ns, run_cnt from a struct bpf_prog_info buffer."""
    name = raw[OFF_NAME:OFF_NAME + 16].split(b"\0", 1)[0].decode(errors="replace")
    rt = int.from_bytes(raw[OFF_RUN_TIME_NS:OFF_RUN_TIME_NS + 8], "little")
    cnt = int.from_bytes(raw[OFF_RUN_CNT:OFF_RUN_CNT + 8], "little")
    return name, rt, cnt


def aw_programs(prefix="aw_"):
    """{prog id: (name, run_time_ns, run_cnt)} of every loaded program named prefix*."""
    out, start = {}, 0
    while True:
        a = _IdAttr(start_id=start)
        ret, err = bpf_syscall(_PROG_GET_NEXT_ID, a)
        if ret < 0:
            return out        # ENOENT: the end (or no permission: nothing to see)
        start = a.next_id
        fd, _ = bpf_syscall(_PROG_GET_FD_BY_ID, _IdAttr(start_id=start))
        if fd < 0:
            continue
        try:
            buf = ctypes.create_string_buffer(PROG_INFO_LEN)
            ia = _InfoAttr(bpf_fd=fd, info_len=PROG_INFO_LEN, info=ctypes.addressof(buf))
            if bpf_syscall(_OBJ_GET_INFO_BY_FD, ia)[0] == 0:
                name, rt, cnt = parse_prog_info(buf.raw)
                if name.startswith(prefix):
                    out[start] = (name, rt, cnt)
        finally:
            os.close(fd)


@contextlib.contextmanager
def bpf_stats():
    """Turn on the kernel's BPF run-time statistics for the block. Uses
    BPF_ENABLE_STATS (on only while its fd is open, so a crash cannot leave it
    on); falls back to the kernel.bpf_stats_enabled sysctl, restored after.
    Timing is off otherwise: it costs two clock reads per program run."""
    fd, _ = bpf_syscall(_ENABLE_STATS, _StatsAttr(type=0))   # BPF_STATS_RUN_TIME
    sysctl, old = "/proc/sys/kernel/bpf_stats_enabled", None
    if fd < 0:
        with open(sysctl) as f:
            old = f.read().strip()
        with open(sysctl, "w") as f:
            f.write("1")
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)
        else:
            with open(sysctl, "w") as f:
                f.write(old)


def prog_stats_delta(before, after, ids=None):
    """Per program name: run_cnt, run_time_ns and ns per run between two
    aw_programs() snapshots (only the program ids given, if any)."""
    out = {}
    for pid, (name, rt, cnt) in after.items():
        if ids is not None and pid not in ids:
            continue
        _, rt0, cnt0 = before.get(pid, (name, 0, 0))
        d = out.setdefault(name, {"progs": 0, "run_cnt": 0, "run_time_ns": 0})
        d["progs"] += 1
        d["run_cnt"] += cnt - cnt0
        d["run_time_ns"] += rt - rt0
    for d in out.values():
        d["ns_per_run"] = round(d["run_time_ns"] / d["run_cnt"], 1) if d["run_cnt"] else None
    return {k: out[k] for k in sorted(out)}


def measure_prog_stats(fn, ids=None):
    """Run fn() with BPF statistics on; returns (fn's result, per-program stats)."""
    with bpf_stats():
        before = aw_programs()
        result = fn()
        after = aw_programs()
    return result, prog_stats_delta(before, after, ids)


# -- memory --------------------------------------------------------------------------------

def _status_kb(pid, field, path="status"):
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_kb(pid):
    return _status_kb(pid, "VmRSS")


def pss_kb(pid):
    """Proportional set size: shared library pages split among their users."""
    return _status_kb(pid, "Pss", "smaps_rollup")


def bpf_memlock_kb(pid):
    """Kernel memory charged to the BPF maps and programs a process holds
    (fdinfo memlock: ring buffer, hash maps, program images)."""
    total, seen = 0, set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return None
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^memlock:\s+(\d+)", text, re.M)
        ident = re.search(r"^(map_id|prog_id):\s+(\d+)", text, re.M)
        if m and ident and ident.groups() not in seen:
            seen.add(ident.groups())
            total += int(m.group(1))
    return total // 1024


# -- C programs' output ----------------------------------------------------------------------

def read_json_file(path):
    with open(path) as f:
        return json.loads(f.read())


def last_json_line(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in output: {text[-500:]!r}")
