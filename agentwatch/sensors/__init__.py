"""Kernel sensors: they observe, and never change what a call does (the
enforcing BPF programs are agentwatch.guards). bcc is imported here
(``import_bcc``, ``compile_bpf``: doctor's probes and the guards get it from
there) and in guards/, nowhere else (tests/unit/test_imports.py checks).

``Sensors`` compiles the bpf/*.bpf.c sensors once, fills the syscall spec
map, attaches exactly the tracepoints of the chosen groups, and hands decoded
raw records to a callback. Cgroups are added to the in-kernel filter with
``watch()`` before an agent may exec, each with a run slot and the sensitive
paths of its policy.

Records come from two ring buffers (bpf/common.bpf.c): "priority" (process
lifecycle, chdir, network, sensitive syscalls, kernel denials, policy-denied
paths) and "events" (the bulk: ordinary file records), so that a flood of
bulk records cannot make a violation's record be lost. Each poll reads both,
a bounded batch from each, and delivers records in timestamp order up to a
watermark: the point up to which neither ring can still hold an older record.
So the correlator sees a fork, exec or chdir before the records that follow
it, whichever ring they travelled, and a bulk backlog delays a priority record
by at most the time it takes to read one bulk ring (capacity / read rate).

Sensors (~330 lines, the module ~500) stays one class: it owns the loaded
programs, their rings and the order in which they are read, which is the
invariant above.
"""
import bisect
import itertools
import time
import ctypes
import threading
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from ..core.errors import AgentwatchError, KernelFeatureError, LaunchError, PrivilegeError
from . import records as R
from . import syscalls as S

TRACEFS = "/sys/kernel/tracing"


def bpf_dir():
    """Directory holding the BPF C sources, in a checkout or an installed package."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bpf")
    if os.path.exists(os.path.join(here, "events.h")):
        return here
    return str(resources.files("agentwatch_bpf"))


# The sensor files making up the one BPF object a run loads, in order. bcc
# generates tracepoint argument structs only for probes in the main text, so
# the files are joined here rather than #included.
BPF_FILES = ("common.bpf.c", "priority.bpf.c", "mapexec.bpf.c", "syscalls.bpf.c", "process.bpf.c")


# process.bpf.c: always attached, the process tree depends on them
PROCESS_PROBES = (("sched:sched_process_fork", "aw_fork"),
                  ("sched:sched_process_exit", "aw_exit"),
                  ("signal:signal_deliver", "aw_signal"),
                  ("signal:signal_generate", "aw_signal_gen"))
# mapexec.bpf.c: attached only when a run's filesystem section is enforced on
# the Landlock path (Sensors(map_exec=True)); close is one of the host's most
# frequent syscalls
MAPEXEC_PROBES = (("syscalls:sys_enter_mmap", "aw_mapx_mmap"),
                  ("syscalls:sys_enter_close", "aw_mapx_close"),
                  ("syscalls:sys_enter_dup2", "aw_mapx_dup"),
                  ("syscalls:sys_enter_dup3", "aw_mapx_dup"),
                  ("syscalls:sys_enter_close_range", "aw_mapx_crange"))
MAPEXEC_FDS = 16384       # fds marked at once (LRU: the oldest mark goes first)
PROG_PREFIX = "aw_"   # every agentwatch BPF program's name starts with it

PRIO_PAGES = 256          # priority ring: 1 MiB (~1,600 syscall or ~360 exec records)
READ_BATCH = 4096         # records read from one ring per poll before the other's turn
ORDER_SLACK_NS = 5_000_000  # a record is committed within this of its timestamp
MAX_HELD = 1 << 18        # records held for ordering beyond this are delivered anyway
DRAIN_ROUNDS = 64         # batches drain() reads at most (a full 16 MiB bulk ring is ~7)
MAX_SLOTS = 1024          # AW_MAX_RUNS in common.bpf.c
_AFTER_ALL = float("inf")  # sorts after every sequence number


class _Ring:
    """One BPF ring buffer read through its own libbpf ring_buffer manager,
    so each ring can be drained (and budgeted) on its own."""

    def __init__(self, name):
        self.name = name
        self.manager = None
        self.fn = None           # the ctypes callback: must outlive the manager
        self.received = 0
        self.taken = 0           # records read in this poll
        self.budget = READ_BATCH
        self.backlog = False     # the last read stopped at READ_BATCH: more may be waiting
        self.last_ts = 0         # timestamp of the last record read


def bpf_source():
    parts = []
    for name in BPF_FILES:
        with open(os.path.join(bpf_dir(), name)) as f:
            parts.append(f"// ---- {name}\n" + f.read())
    return "\n".join(parts)


def syscall_nargs(name):
    """Number of arguments in a syscalls:sys_enter_<name> record (tracefs format)."""
    path = os.path.join(TRACEFS, "events/syscalls", f"sys_enter_{name}", "format")
    with open(path) as f:
        fields = [line for line in f if line.strip().startswith("field:")]
    return len([f for f in fields if "common_" not in f and "__syscall_nr" not in f])


def tracepoint_fields(event):
    """Field names of a tracepoint record ("sched/sched_process_exit"), from
    its tracefs format: they differ between kernel versions."""
    with open(os.path.join(TRACEFS, "events", event, "format")) as f:
        return {line.split(";")[0].split()[-1].split("[")[0] for line in f
                if line.strip().startswith("field:")}


def feature_cflags():
    """-D flags for record fields that only some kernels have."""
    flags = []
    if "group_dead" in tracepoint_fields("sched/sched_process_exit"):   # Linux 6.16+
        flags.append("-DAW_HAVE_GROUP_DEAD")
    return flags


def exit_args_possible():
    """The exit program can read a refused call's arguments from the task's
    saved registers (-DAW_EXIT_ARGS, bpf/syscalls.bpf.c): x86_64 (the
    register layout it reads), BTF (bpf_get_current_task_btf) and Linux
    5.15+ (bpf_task_pt_regs). Sensors.open falls back without it if the
    kernel refuses the program anyway. AGENTWATCH_EXIT_ARGS=0 turns it off
    (the tests run both ways)."""
    if os.environ.get("AGENTWATCH_EXIT_ARGS") == "0":
        return False
    if os.uname().machine != "x86_64" or not os.path.exists("/sys/kernel/btf/vmlinux"):
        return False
    try:
        major, minor = (int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 15)


def import_bcc():
    """The bcc module, or a KernelFeatureError saying how to get it."""
    try:
        import bcc
    except (ImportError, OSError) as e:       # OSError: libbcc.so missing or broken
        raise KernelFeatureError(
            "bcc is not importable (Debian/Ubuntu package python3-bpfcc); run the set-up "
            "command from README.md, or use a venv made with --system-site-packages. "
            f"({e})") from None
    return bcc


_COMPILE_LOCK = threading.Lock()


def compile_bpf(text, cflags, what):
    """One BPF object from C text (bcc: clang + LLVM in this process), or a
    KernelFeatureError naming `what`. One compile at a time per process:
    bcc's clang front end is not thread-safe (two sandboxed runs starting
    at once on the daemon corrupted its heap: "malloc_consolidate():
    unaligned fastbin chunk detected"). LLVM frees most of what it
    allocated to compile, but glibc keeps the freed heap: malloc_trim hands
    it back (~24 MB of RSS per object on this machine kind)."""
    bcc = import_bcc()
    with _COMPILE_LOCK:
        try:
            obj = bcc.BPF(text=text.encode(), cflags=cflags)
        except Exception as e:
            raise KernelFeatureError(f"could not compile or load {what}: {e}; run 'agentwatch "
                                     "doctor' to see which kernel feature is missing") from None
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass             # not glibc: nothing to hand back this way
    return obj


class Sensors:
    """One loaded BPF object serving every run this process monitors."""

    def __init__(self, groups=S.GROUPS, ringbuf_pages=4096, denied=(), map_exec=False):
        """denied: what seccomp refuses with EPERM; map_exec: attach the
        mmap(PROT_EXEC) probes (bpf/mapexec.bpf.c) for runs given exec roots."""
        self.exit_args = exit_args_possible()   # refused calls' arguments read at exit
        self.specs = S.specs_for(groups, denied, exit_args=self.exit_args)
        self._asked = (list(groups), list(denied))
        self.map_exec = map_exec
        self.groups = sorted({s.group for s in self.specs})
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.attached = []       # tracepoints attached
        self.missing = []        # tracepoints this kernel lacks
        self.received = 0        # raw records read from the ring buffers
        self.nr_to_spec = {}
        self._callback = None
        self.errors = []         # records that failed to decode or process
        self._rings = []         # priority first
        self._held = []          # [(ts, seq, type, record)] read, not yet delivered
        self._seq = itertools.count()
        self._watermark = 0
        self.slots = {}          # cgroup id -> run slot (1..MAX_SLOTS)
        self._routes = {}        # slot -> {map name: [key bytes]} written for it

    # -- life cycle -----------------------------------------------------------
    def open(self, callback):
        """Compile, load and attach. callback(type, record_dict) gets every
        decoded record; records it raises on are counted, not lost silently."""
        if os.geteuid() != 0:
            raise PrivilegeError("loading BPF sensors needs root (CAP_BPF, CAP_PERFMON and "
                                 "CAP_SYS_ADMIN); run agentwatch with sudo")
        if not os.path.isdir(os.path.join(TRACEFS, "events")):
            raise KernelFeatureError(f"tracefs is not mounted at {TRACEFS}; mount it with "
                                     f"'mount -t tracefs tracefs {TRACEFS}' (see agentwatch doctor)")
        cflags = [f"-I{bpf_dir()}", f"-DAW_RINGBUF_PAGES={self.ringbuf_pages}",
                  f"-DAW_PRIO_PAGES={PRIO_PAGES}", f"-DAW_MAX_RUNS={MAX_SLOTS}",
                  "-Wno-unused-function"] + feature_cflags()
        if self.map_exec:
            cflags.append(f"-DAW_MAPEXEC_FDS={MAPEXEC_FDS}")
        try:
            self._load(cflags + (["-DAW_EXIT_ARGS"] if self.exit_args else []), callback)
        except KernelFeatureError:
            if not self.exit_args:
                raise
            # the kernel refused the register read: without it, the syscalls
            # refused by argument get their entry probe back (specs_for)
            self.exit_args = False
            self.specs = S.specs_for(*self._asked, exit_args=False)
            self.attached, self.missing, self.nr_to_spec = [], [], {}
            self._load(cflags, callback)
        return self

    def _load(self, cflags, callback):
        self.bpf = compile_bpf(bpf_source(), cflags, "the BPF sensors")
        try:
            self._fill_specs()
            self._attach()
            self._callback = callback
            self._rings = [self._open_ring("priority"), self._open_ring("events")]
        except AgentwatchError:
            self.close()
            raise
        except Exception as e:     # bcc raises plain Exception when the verifier refuses
            self.close()
            raise KernelFeatureError(f"could not load or attach the BPF sensors: {e}; run "
                                     "'agentwatch doctor' to see which kernel feature is "
                                     "missing") from None

    def close(self):
        """Detach everything. The last detach of a tracepoint waits for an RCU
        grace period, partly under the kernel's global event_mutex; detaching
        from many threads at once shares what it can (~0.2 s for 130
        tracepoints where grace periods are short; 5.0 s instead of 9.7 for
        139 where they are slow, README "Known limits")."""
        if self.bpf is None:
            return
        tps = list(self.bpf.tracepoint_fds)
        if tps:
            with ThreadPoolExecutor(max_workers=min(64, len(tps))) as pool:
                list(pool.map(self._detach_quietly, tps))
        lib = import_bcc().lib
        for ring in self._rings:
            if ring.manager:
                lib.bpf_free_ringbuf(ring.manager)
                ring.manager = None
        self.bpf.cleanup()
        self.bpf = None

    def _detach_quietly(self, tp):
        try:
            self.bpf.detach_tracepoint(tp)
        except Exception:
            pass   # cleanup() below retries whatever is left

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- configuration ----------------------------------------------------------
    def _fill_specs(self):
        for spec in self.specs:
            self._set_spec(spec)

    def _set_spec(self, spec):
        """Write spec into the kernel's per-syscall table; False when this
        kernel has no such syscall (noted in missing)."""
        try:
            nr = S.syscall_number(spec.name)
        except Exception:
            nr = -1
        if not 0 <= nr < 512:
            self.missing.append(spec.name)
            return False
        self.nr_to_spec[nr] = spec
        table = self.bpf["specs"]
        table[ctypes.c_int(nr)] = table.Leaf.from_buffer_copy(spec.packed())
        return True

    def _attach(self):
        for nr, spec in sorted(self.nr_to_spec.items()):
            self._attach_spec(spec)
        for tp, fn in PROCESS_PROBES + (MAPEXEC_PROBES if self.map_exec else ()):
            self.bpf.attach_tracepoint(tp=tp, fn_name=fn.encode())
            self.attached.append(tp)

    def _attach_spec(self, spec):
        """Attach what spec needs and is not attached yet."""
        if not os.path.isdir(os.path.join(TRACEFS, "events/syscalls", f"sys_enter_{spec.name}")):
            self.missing.append(spec.name)
            return
        enter, exit_tp = f"syscalls:sys_enter_{spec.name}", f"syscalls:sys_exit_{spec.name}"
        if spec.enter and enter not in self.attached:
            nargs = syscall_nargs(spec.name)
            self.bpf.attach_tracepoint(tp=enter, fn_name=f"aw_sys_enter{nargs}".encode())
            self.attached.append(enter)
        if spec.attach_exit and exit_tp not in self.attached:     # see Spec.attach_exit
            self.bpf.attach_tracepoint(tp=exit_tp, fn_name=b"aw_sys_exit")
            self.attached.append(exit_tp)

    def add_denied(self, denied):
        """Also report the refusals of these syscalls (a run on a shared
        monitor whose seccomp filter refuses calls the monitor was loaded
        without): mark their specs and attach their exit tracepoints, at
        run time. Returns the names added."""
        groups, asked = self._asked
        new = [n for n in dict.fromkeys(denied) if n not in asked]
        if not new:
            return []
        self._asked = (groups, asked + new)
        old = {s.name: s for s in self.specs}
        self.specs = S.specs_for(groups, asked + new, exit_args=self.exit_args)
        for spec in self.specs:
            if old.get(spec.name) != spec and spec.name not in self.missing and self._set_spec(spec):
                self._attach_spec(spec)
        return new

    def watch(self, cgroup_id, routes=((), ()), kills=((), ()), exec_roots=None, exec_kill=False,
              fold=True):
        """Add a run's cgroup to the filter, with its own run slot and the
        sensitive paths of its policy (CompiledPolicy.kernel_routes():
        prefixes, basenames), those on which the kernel kills at the open's
        return (CompiledPolicy.kernel_kills()), and exec_roots: the path
        prefixes outside which an mmap(PROT_EXEC) is reported, and with
        exec_kill killed at (EnforcementPlan.map_exec; None: neither).
        fold False: a record per call, never a repeat count (bpf/common.bpf.c).
        Returns the slot."""
        taken = set(self.slots.values())
        slot = next((i for i in range(1, MAX_SLOTS + 1) if i not in taken), None)
        if slot is None:
            raise LaunchError(f"agent not started: this monitor already watches {MAX_SLOTS} runs "
                              "(AW_MAX_RUNS)")
        prefixes, names = {}, {}      # key bytes -> map value; a kill wins over a route
        for (ps, ns), value in ((routes, R.ROUTE_PRIO), (kills, R.ROUTE_PRIO | R.ROUTE_KILL)):
            prefixes.update((R.prefix_key(slot, p), value) for p in ps)
            names.update((R.name_key(slot, n), value) for n in ns)
        entries = {"sensitive_prefixes": prefixes, "sensitive_names": names}
        if exec_roots is not None:
            if not self.map_exec:
                raise ValueError("exec_roots needs Sensors(map_exec=True)")
            entries["exec_roots"] = {R.prefix_key(slot, p): 1 for p in exec_roots}
            mode = R.MAPX_KILL if exec_kill else R.MAPX_REPORT
            self.bpf["mapexec_on"][ctypes.c_int(slot)] = ctypes.c_uint8(mode)
        self._routes[slot] = {name: list(values) for name, values in entries.items()}
        for name, values in entries.items():
            table = self.bpf[name]
            for raw, value in values.items():
                table[table.Key.from_buffer_copy(raw)] = table.Leaf(value)
        self.bpf["no_fold"][ctypes.c_int(slot)] = ctypes.c_uint8(0 if fold else 1)
        self.slots[cgroup_id] = slot
        self.bpf["watched"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint32(slot)
        return slot

    def unwatch(self, cgroup_id):
        try:
            del self.bpf["watched"][ctypes.c_uint64(cgroup_id)]
        except KeyError:
            pass
        slot = self.slots.pop(cgroup_id, None)
        if slot is None:
            return
        for name, raws in self._routes.pop(slot, {}).items():
            table = self.bpf[name]
            for raw in raws:
                try:
                    del table[table.Key.from_buffer_copy(raw)]
                except KeyError:
                    pass
        if self.map_exec:
            self.bpf["mapexec_on"][ctypes.c_int(slot)] = ctypes.c_uint8(0)

    # -- records ------------------------------------------------------------------
    def _open_ring(self, name):
        bcc = import_bcc()
        ring = _Ring(name)

        def on_record(_ctx, data, size):
            return self._on_record(ring, data, size)
        # bcc's own callback type (what its open_ring_buffer uses), but one
        # libbpf manager per ring rather than bcc's single shared one, whose
        # consume reads every ring to its end before returning
        ring.fn = bcc.libbcc._RINGBUF_CB_TYPE(on_record)
        ring.manager = bcc.lib.bpf_new_ringbuf(self.bpf[name].map_fd, ring.fn, None)
        if not ring.manager:
            raise KernelFeatureError(f"could not open the {name} ring buffer")
        return ring

    def _on_record(self, ring, data, size):
        """Read one record: decode it and hold it for ordered delivery. A
        negative return stops libbpf's reading of this ring (READ_BATCH)."""
        self.received += 1
        ring.received += 1
        ring.taken += 1
        try:
            etype, rec = R.decode(ctypes.string_at(data, size))
            ring.last_ts = rec["ts"]
            self._held.append((rec["ts"], next(self._seq), etype, rec))
        except Exception as e:  # never let one bad record stop the stream
            self.errors.append(f"{type(e).__name__}: {e}")
        return -1 if ring.taken >= ring.budget else 0

    def _read(self, budget):
        """Read each ring (priority first) up to budget records; move the
        watermark to where no ring can still hold an older record."""
        lib = import_bcc().lib
        marks = []
        for ring in self._rings:
            ring.taken, ring.budget = 0, budget
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            lib.bpf_consume_ringbuf(ring.manager)
            ring.backlog = ring.taken >= budget
            # a ring read to its end holds nothing older than t0 (give or take
            # records still being written: ORDER_SLACK_NS)
            marks.append(ring.last_ts if ring.backlog else t0)
        self._watermark = max(self._watermark, min(marks) - ORDER_SLACK_NS)

    def _deliver(self, everything=False):
        held = self._held
        if not held:
            return
        held.sort()   # by (ts, seq): seq is unique, so nothing further is compared
        cut = len(held) if everything else bisect.bisect_right(held, (self._watermark, _AFTER_ALL))
        cut = max(cut, len(held) - MAX_HELD)
        batch = held[:cut]
        del held[:cut]
        callback = self._callback
        for _, _, etype, rec in batch:
            try:
                callback(etype, rec)
            except Exception as e:  # never let one bad record stop the stream
                self.errors.append(f"{type(e).__name__}: {e}")

    def poll(self, timeout_ms=100):
        """Wait up to timeout_ms for a priority record (each one wakes us),
        then read both rings and deliver what is in order. Bulk records are
        read at the latest when the wait times out; with a backlog, no wait."""
        if not self.backlog:
            self._rings[0].taken = 0
            import_bcc().lib.bpf_poll_ringbuf(self._rings[0].manager, timeout_ms)
        self._read(READ_BATCH)
        self._deliver()

    @property
    def backlog(self):
        """The last read stopped at READ_BATCH on some ring: more is waiting."""
        return any(ring.backlog for ring in self._rings)

    def delivered_until(self, t_ns):
        """Whether every record stamped before t_ns (CLOCK_MONOTONIC, as
        bpf_ktime_get_ns) has been read and delivered: the rings were read
        to their end at least ORDER_SLACK_NS after it."""
        return self._watermark >= t_ns and not self.backlog

    def drain(self):
        """Read what the ring buffers hold and deliver everything read,
        without waiting. Bounded (DRAIN_ROUNDS batches): another run sharing
        the monitor may be filling them still."""
        for _ in range(DRAIN_ROUNDS):
            self._read(READ_BATCH)
            if not self.backlog:
                break
        self._deliver(everything=True)

    def counters(self):
        """Kernel-side counters (summed over CPUs and, for lost_events and
        submitted, over both rings), and per ring in "rings"."""
        table = self.bpf["counters"]

        def percpu(idx):
            return [int(v) for v in table[ctypes.c_int(idx)]]
        lost_bulk, lost_prio = percpu(R.CNT_LOST_EVENTS), percpu(R.CNT_LOST_PRIO)
        submitted_bulk, submitted_prio = sum(percpu(R.CNT_SEEN)), sum(percpu(R.CNT_SEEN_PRIO))
        received = {ring.name: ring.received for ring in self._rings}
        return {"lost_events": sum(lost_bulk) + sum(lost_prio),
                "lost_events_per_cpu": [a + b for a, b in zip(lost_bulk, lost_prio)],
                "lost_stash": sum(percpu(R.CNT_LOST_STASH)),
                "killed_in_kernel": sum(percpu(R.CNT_KILLED)),
                "folded": sum(percpu(R.CNT_FOLDED)),
                "submitted": submitted_bulk + submitted_prio, "received": self.received,
                "rings": {"priority": {"submitted": submitted_prio, "lost": sum(lost_prio),
                                       "received": received.get("priority", 0)},
                          "bulk": {"submitted": submitted_bulk, "lost": sum(lost_bulk),
                                   "received": received.get("events", 0)}}}
