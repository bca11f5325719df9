"""Kernel sensors: the only place that imports bcc.

``Sensors`` compiles bpf/agentwatch.bpf.c once, fills the syscall spec map,
attaches exactly the tracepoints of the chosen groups, and hands decoded raw
records to a callback. Cgroups are added to the in-kernel filter with
``watch()`` before an agent may exec.
"""
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from ..errors import KernelFeatureError, PrivilegeError
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
BPF_FILES = ("common.bpf.c", "syscalls.bpf.c", "process.bpf.c")


# process.bpf.c: always attached, the process tree depends on them
PROCESS_PROBES = (("sched:sched_process_fork", "aw_fork"),
                  ("sched:sched_process_exit", "aw_exit"),
                  ("signal:signal_deliver", "aw_signal"),
                  ("signal:signal_generate", "aw_signal_gen"))
PROG_PREFIX = "aw_"   # every agentwatch BPF program's name starts with it


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


def _import_bcc():
    try:
        import bcc
    except ImportError as e:
        raise KernelFeatureError(
            "bcc is not importable (Debian/Ubuntu package python3-bpfcc); run the set-up "
            "command from README.md, or use a venv made with --system-site-packages. "
            f"({e})") from None
    return bcc


class Sensors:
    """One loaded BPF object serving every run this process monitors."""

    def __init__(self, groups=S.GROUPS, ringbuf_pages=4096, denied=()):
        self.specs = S.specs_for(groups, denied)   # denied: what seccomp refuses with EPERM
        self.groups = sorted({s.group for s in self.specs})
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.attached = []       # tracepoints attached
        self.missing = []        # tracepoints this kernel lacks
        self.received = 0        # raw records read from the ring buffer
        self.nr_to_spec = {}
        self._callback = None
        self.errors = []         # records that failed to decode or process

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
        bcc = _import_bcc()
        cflags = [f"-I{bpf_dir()}", f"-DAW_RINGBUF_PAGES={self.ringbuf_pages}",
                  "-Wno-unused-function"] + feature_cflags()
        try:
            self.bpf = bcc.BPF(text=bpf_source().encode(), cflags=cflags)
        except Exception as e:
            raise KernelFeatureError(f"could not compile or load the BPF sensors: {e}; "
                                     "run 'agentwatch doctor' to see which kernel feature is missing") from None
        try:
            self._fill_specs()
            self._attach()
            self._callback = callback
            self.bpf["events"].open_ring_buffer(self._on_record)
        except Exception:
            self.close()
            raise
        return self

    def close(self):
        """Detach everything. Each tracepoint detach waits for an RCU grace
        period (~70 ms on the CI VM); detaching from many threads at once lets
        the kernel share grace periods, so 130 tracepoints take ~0.2 s, not 9."""
        if self.bpf is None:
            return
        tps = list(self.bpf.tracepoint_fds)
        if tps:
            with ThreadPoolExecutor(max_workers=min(64, len(tps))) as pool:
                list(pool.map(self._detach_quietly, tps))
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
        table = self.bpf["specs"]
        for spec in self.specs:
            try:
                nr = S.syscall_number(spec.name)
            except Exception:
                self.missing.append(spec.name)
                continue
            if nr < 0 or nr >= 512:
                self.missing.append(spec.name)
                continue
            self.nr_to_spec[nr] = spec
            table[ctypes.c_int(nr)] = table.Leaf.from_buffer_copy(spec.packed())

    def _attach(self):
        for nr, spec in sorted(self.nr_to_spec.items()):
            enter = f"syscalls:sys_enter_{spec.name}"
            if not os.path.isdir(os.path.join(TRACEFS, "events/syscalls", f"sys_enter_{spec.name}")):
                self.missing.append(spec.name)
                continue
            if spec.enter:
                nargs = syscall_nargs(spec.name)
                self.bpf.attach_tracepoint(tp=enter, fn_name=f"aw_sys_enter{nargs}".encode())
                self.attached.append(enter)
            if spec.attach_exit:     # see Spec.attach_exit
                exit_tp = f"syscalls:sys_exit_{spec.name}"
                self.bpf.attach_tracepoint(tp=exit_tp, fn_name=b"aw_sys_exit")
                self.attached.append(exit_tp)
        for tp, fn in PROCESS_PROBES:
            self.bpf.attach_tracepoint(tp=tp, fn_name=fn.encode())
            self.attached.append(tp)

    def watch(self, cgroup_id, slot=1):
        self.bpf["watched"][ctypes.c_uint64(cgroup_id)] = ctypes.c_uint32(slot)

    def unwatch(self, cgroup_id):
        try:
            del self.bpf["watched"][ctypes.c_uint64(cgroup_id)]
        except KeyError:
            pass

    # -- records ------------------------------------------------------------------
    def _on_record(self, _ctx, data, size):
        self.received += 1
        try:
            etype, rec = R.decode(ctypes.string_at(data, size))
            self._callback(etype, rec)
        except Exception as e:  # never let one bad record stop the stream
            self.errors.append(f"{type(e).__name__}: {e}")
        return 0

    def poll(self, timeout_ms=100):
        """Wait up to timeout_ms for records and deliver all that are ready
        (the kernel wakes us only every 64 records, so drain after waiting)."""
        self.bpf.ring_buffer_poll(timeout_ms)
        self.bpf.ring_buffer_consume()

    def drain(self):
        """Deliver every record already in the ring buffer, without waiting."""
        self.bpf.ring_buffer_consume()

    def counters(self):
        """Kernel-side counters: lost events per CPU, lost stashes, submitted."""
        table = self.bpf["counters"]
        def percpu(idx):
            return [int(v) for v in table[ctypes.c_int(idx)]]
        lost = percpu(R.CNT_LOST_EVENTS)
        return {"lost_events": sum(lost), "lost_events_per_cpu": lost,
                "lost_stash": sum(percpu(R.CNT_LOST_STASH)),
                "submitted": sum(percpu(R.CNT_SEEN)), "received": self.received}
