"""BPF LSM enforcement for agent cgroups (bpf/lsm.bpf.c), the "bpf-lsm" path.

``LsmGuard(exec_allow, file_deny, connect_ports, signals, unix).open(cgroup, on_denial)``
compiles bpf/lsm.bpf.c with bcc, fills its maps, loads and attaches the LSM
programs its rules need and adds the cgroup to their filter. For processes in that cgroup
(and their descendants) the kernel then refuses, with EPERM:

  exec      execve/execveat of a file whose inode is not allowed
            (bprm_check_security; covers copied or renamed binaries, memfd +
            fexecve, and a #! script itself)
  mmap      a PROT_EXEC mapping of a file whose inode is not allowed
            (mmap_file; covers exec through the dynamic loader:
            ``ld.so ./prog`` maps prog itself) and making a file mapping
            executable with mprotect (file_mprotect)
  open      opening an inode of the deny set, under any name
            (file_open; hard links, symlinks, /proc/self/root detours)
  connect   AF_INET/AF_INET6 connect() to a port not allowed (socket_connect),
            when ``connect_ports`` is not None
  unix      connect() or sendmsg() to a unix socket address, pathname or
            abstract (socket_connect, socket_sendmsg), when ``unix``: the
            cgroup unix hooks' rule for kernels before 6.7
  kill      a signal to a process outside the watched cgroups (task_kill),
            when ``signals``: Landlock's signal scope for kernels before
            6.12 (ABI 6), so an agent cannot stop agentwatch or its daemon

and each refusal is one record in the programs' own ring buffer, decoded and
handed to ``on_denial`` by ``poll()``. Processes outside the watched cgroups
are never judged (one hash lookup per hook call).

``exec_allow`` names files and directories; a directory stands for every
file below it: the programs look up the file's inode and those of its
nearest ancestor directories (its dentry's parents, up to 24, within its
filesystem), so naming /usr/lib costs one map entry. The sets hold inodes,
filled from userspace by opening each named path with O_PATH: the kernel
side never reads a path string. The allow list must cover the shared
libraries and the dynamic loader of every allowed dynamic program, because
their mappings are executable too. ``exec_allow=None`` turns the exec and mmap
rules off. ``file_deny`` names files and directories (a directory: itself, everything
below it, also files created later, and the inode of every regular file
below it at open() time, so that a hard link elsewhere is refused too) and
may be empty. ``connect_ports=None`` turns the connect rule off
([] denies every inet connect).

Identity of a file: (inode number, superblock device) as the kernel sees it,
inode->i_ino and inode->i_sb->s_dev. Userspace takes st_ino from fstat() and
the device from the major:minor of the file's mount in /proc/self/mountinfo
(found through the fd's mnt_id), because on overlayfs st_dev names a lower
layer while the kernel's struct file points at the overlay inode. The sets are
snapshots: a file replaced after open() (new inode) is no longer allowed, and
a deny-listed file that is deleted and re-created is no longer denied.

KERNEL HEADERS MUST MATCH EXACTLY. The programs read kernel structs
(linux_binprm->file, file->f_inode, inode->i_ino, inode->i_sb->s_dev,
vm_area_struct->vm_file, dentry names) at offsets from the headers bcc
compiles against. The rest of agentwatch reads only tracepoint records,
helpers and uapi structs and works with any headers; this module does not:
with another kernel's headers it would read the wrong fields and allow or
deny the wrong files. ``open()`` therefore refuses (KernelFeatureError)
unless /lib/modules/$(uname -r)/build (or $BCC_KERNEL_SOURCE) holds headers
whose UTS_RELEASE and UTS_VERSION equal the running kernel's
(``check_headers()``). On hosts where setup linked another version's headers
(the CI host), the BPF LSM path is unavailable and Landlock + seccomp +
cgroup BPF enforce instead.

Program names: bcc's LSM_PROBE(hook) makes a function lsm__<hook>, loads it
under the kernel name <hook> cut to 15 characters ("bprm_check_secu") and
finds its attach target from that name, so an LSM_PROBE cannot be named aw_*.
This module therefore compiles plain BPF_PROG(aw_lsm_*) functions with bcc
(maps are created by bcc and their fds are already in the instructions),
takes the instructions with ``dump_func`` and loads them itself with
bpf(BPF_PROG_LOAD) as BPF_PROG_TYPE_LSM / BPF_LSM_MAC with the hook's BTF id
(libbpf_find_vmlinux_btf_id) and the name aw_lsm_*, then attaches each with
BPF_RAW_TRACEPOINT_OPEN. The kernel lists aw_lsm_exec, aw_lsm_open,
aw_lsm_connect, aw_lsm_mmap, aw_lsm_mprotect, so agentwatch's leftover check
(sensors.inventory) sees them. Closing the link fds detaches them.

bcc is imported only inside methods, so the pure parts work anywhere.

One module (~570 lines) on purpose: the rules' map layout, the loader that
fills it and the decoder of its denials describe one BPF program
(bpf/lsm.bpf.c) and change together; records.py already holds the layouts.
"""
import ctypes
import errno
import os
import socket
import stat

from ..core.errors import AgentwatchError, KernelFeatureError, PrivilegeError
from ..sensors.inventory import bpf_syscall
from . import records as R
from .denials import CNT_DENIED, CNT_LOST, DenialStream, clear_map  # noqa: F401 (counter indexes)

ENFORCEMENT = "bpf-lsm"      # doctor.ENFORCE_BPF_LSM: the path these denials come from

# ---- constants of bpf/guards.h (records.py mirrors them; tests/unit/test_guard_records.py checks)
H_EXEC, H_OPEN, H_CONNECT, H_MMAP = R.LSM_H_EXEC, R.LSM_H_OPEN, R.LSM_H_CONNECT, R.LSM_H_MMAP
H_MPROTECT, H_KILL, H_SENDMSG = R.LSM_H_MPROTECT, R.LSM_H_KILL, R.LSM_H_SENDMSG
CFG_EXEC, CFG_OPEN, CFG_CONNECT = R.LSM_CFG_EXEC, R.LSM_CFG_OPEN, R.LSM_CFG_CONNECT
CFG_SIGNAL, CFG_UNIX = R.LSM_CFG_SIGNAL, R.LSM_CFG_UNIX
MAX_ALLOW, MAX_DENY = R.LSM_MAX_ALLOW, R.LSM_MAX_DENY

# (program, LSM hook, AW_LSM_CFG_* flag that makes it needed)
PROGRAMS = (("aw_lsm_exec", "bprm_check_security", CFG_EXEC),
            ("aw_lsm_open", "file_open", CFG_OPEN),
            ("aw_lsm_connect", "socket_connect", CFG_CONNECT | CFG_UNIX),
            ("aw_lsm_sendmsg", "socket_sendmsg", CFG_UNIX),
            ("aw_lsm_mmap", "mmap_file", CFG_EXEC),
            ("aw_lsm_mprotect", "file_mprotect", CFG_EXEC),
            ("aw_lsm_kill", "task_kill", CFG_SIGNAL))
HOOKS = {H_EXEC: ("bprm_check_security", "exec", "exec-not-allowed"),
         H_OPEN: ("file_open", "open", "file-denied"),
         H_CONNECT: ("socket_connect", "connect", "port-not-allowed"),
         H_MMAP: ("mmap_file", "mmap", "exec-mapping-not-allowed"),
         H_MPROTECT: ("file_mprotect", "mprotect", "exec-mapping-not-allowed"),
         H_KILL: ("task_kill", "kill", "signal-outside-run"),
         H_SENDMSG: ("socket_sendmsg", "sendmsg", "unix-not-allowed")}


class LsmRuleError(AgentwatchError, ValueError):
    """An allow/deny entry that cannot be turned into kernel map contents."""


# ---- kernel headers: must be exactly the running kernel's -------------------------------

def _header_define(path, name):
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(None, 2)
                if len(parts) == 3 and parts[0] == "#define" and parts[1] == name:
                    return parts[2].strip().strip('"')
    except OSError:
        return None
    return None


def headers_dir(release=None):
    """The kernel headers bcc compiles against: $BCC_KERNEL_SOURCE, else
    /lib/modules/<release>/build."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return env
    return f"/lib/modules/{release or os.uname().release}/build"


def check_headers(release=None, version=None, build=None):
    """(ok, detail): do the headers bcc will use belong to exactly the running
    kernel? Compares UTS_RELEASE (include/generated/utsrelease.h) with
    uname -r and, when the headers carry it, UTS_VERSION
    (include/generated/utsversion.h) with uname -v (the build: two builds of
    one release string may still differ)."""
    u = os.uname()
    release = release or u.release
    version = version or u.version
    build = build or headers_dir(release)
    hrel = _header_define(os.path.join(build, "include/generated/utsrelease.h"), "UTS_RELEASE")
    if hrel is None:
        return False, (f"no kernel headers at {build} (include/generated/utsrelease.h missing); "
                       f"install the headers of exactly {release}")
    real = os.path.realpath(build)
    if hrel != release:
        return False, (f"the headers at {build} (-> {real}) are of kernel {hrel}, the running "
                       f"kernel is {release}: BPF LSM programs read kernel structs and need "
                       f"headers of exactly the running kernel")
    hver = _header_define(os.path.join(build, "include/generated/utsversion.h"), "UTS_VERSION")
    if hver is None:
        hver = _header_define(os.path.join(build, "include/generated/compile.h"), "UTS_VERSION")
    if hver is not None and hver != version:
        return False, (f"the headers at {build} are of release {hrel} but build '{hver}'; the "
                       f"running kernel is build '{version}'")
    return True, f"headers at {build} are of the running kernel {release} ({hver or 'build not recorded'})"


def active_lsms():
    """Names of the active LSMs from securityfs, else lsm= on the command line, else None."""
    try:
        with open("/sys/kernel/security/lsm") as f:
            return f.read().strip().split(",")
    except OSError:
        pass
    try:
        with open("/proc/cmdline") as f:
            for arg in f.read().split():
                if arg.startswith("lsm="):
                    return arg[4:].split(",")
    except OSError:
        pass
    return None


# ---- files as the kernel identifies them ------------------------------------------------

def kernel_dev(major, minor):
    """Kernel-internal dev_t (MKDEV): what inode->i_sb->s_dev holds."""
    return ((major & 0xFFF) << 20) | (minor & 0xFFFFF)


def mount_devices(mountinfo="/proc/self/mountinfo"):
    """{mount id: (major, minor)} of every mount (the superblock's s_dev)."""
    out = {}
    with open(mountinfo) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                ma, mi = parts[2].split(":")
                out[int(parts[0])] = (int(ma), int(mi))
    return out


def _fd_mnt_id(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise LsmRuleError(f"/proc/self/fdinfo/{fd} has no mnt_id (Linux 3.15+ needed)")


def file_key(path, mounts=None):
    """(ino, kernel dev, st_mode) of the file a path names (symlinks followed)."""
    mounts = mount_devices() if mounts is None else mounts
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise LsmRuleError(f"{path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        mnt = _fd_mnt_id(fd)
    finally:
        os.close(fd)
    if mnt in mounts:
        dev = kernel_dev(*mounts[mnt])
    else:   # a mount that appeared meanwhile: fall back to st_dev
        dev = kernel_dev(os.major(st.st_dev), os.minor(st.st_dev))
    return st.st_ino, dev, st.st_mode


def expand_files(paths, limit, what, mounts=None, walk=True):
    """{(ino, dev): path} of each named file or directory (the BPF programs
    match a file against its own inode and its ancestor directories'), and,
    with walk, of every regular file below a named directory too (so that a
    hard link elsewhere to a denied file is still that file). Raises
    LsmRuleError on a path that does not exist, that is neither a file nor a
    directory, or when more than limit entries result."""
    mounts = mount_devices() if mounts is None else mounts
    keys = {}

    def add(p):
        ino, dev, mode = file_key(p, mounts)
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            keys.setdefault((ino, dev), p)
        if len(keys) > limit:
            raise LsmRuleError(f"{what}: more than {limit} files (at {p}); name fewer "
                               f"or smaller directories")
        return mode

    for path in paths:
        path = os.fspath(path)
        mode = add(path)
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise LsmRuleError(f"{what}: {path} is neither a regular file nor a directory")
        if not (walk and stat.S_ISDIR(mode)):
            continue
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                f = os.path.join(root, name)
                try:
                    if not stat.S_ISREG(os.stat(f).st_mode):
                        continue
                    add(f)
                except (OSError, LsmRuleError) as e:
                    if isinstance(e, LsmRuleError) and len(keys) > limit:
                        raise
                    continue   # dangling symlink or vanished file: nothing to add
    return keys


def parse_ports(ports):
    if ports is None:
        return None
    out = set()
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 65535:
            raise LsmRuleError(f"connect_ports: {p!r} is not a port 0..65535")
        out.add(p)
    return sorted(out)


# ---- records (pure) -----------------------------------------------------------------------

def decode_denial(data, paths=None):
    """A struct aw_lsm_event as the dict given to on_denial. paths maps
    (ino, dev) to a path the guard knows for that inode."""
    ev = R.decode(R.LsmEvent, data)
    hook, op, rule = HOOKS.get(ev.hook, (f"hook{ev.hook}", f"hook{ev.hook}", "denied"))
    rec = {"enforcement": ENFORCEMENT, "hook": hook, "op": op, "rule": rule,
           "action": "deny", "ret": ev.ret,
           "error": errno.errorcode.get(-ev.ret, str(ev.ret)) if ev.ret < 0 else None,
           "pid": ev.pid, "tid": ev.tid, "uid": ev.uid, "cgroup": ev.cgroup,
           "comm": ev.comm.decode(errors="replace"), "ts": ev.ts}
    if ev.hook == H_KILL:
        rec.update(signal=ev.prot, target_pid=ev.flags, target_cgroup=ev.ino)
    elif ev.hook in (H_CONNECT, H_SENDMSG) and ev.family == 1:
        rec.update(family="unix", rule="unix-not-allowed")
    elif ev.hook == H_CONNECT:
        fam = ev.family
        raw = bytes(ev.addr)
        rec.update(family={2: "inet", 10: "inet6"}.get(fam, str(fam)), port=ev.port,
                   addr=socket.inet_ntop(socket.AF_INET, raw[:4]) if fam == 2
                   else socket.inet_ntop(socket.AF_INET6, raw))
    else:
        rec.update(ino=ev.ino, dev=f"{ev.dev >> 20}:{ev.dev & 0xFFFFF}",
                   name=ev.name.decode(errors="replace"),
                   path=(paths or {}).get((ev.ino, ev.dev)))
        if ev.hook in (H_MMAP, H_MPROTECT):
            rec.update(prot=ev.prot, flags=ev.flags)
        elif ev.hook == H_OPEN:
            rec.update(flags=ev.prot)
    return rec


# ---- loading LSM programs under our own names (no bcc naming) ---------------------------

_BPF_PROG_LOAD = 5
_BPF_RAW_TRACEPOINT_OPEN = 17
_BPF_PROG_TYPE_LSM = 29
_BPF_LSM_MAC = 27
_libc = ctypes.CDLL(None, use_errno=True)


class _ProgLoadAttr(ctypes.Structure):
    """union bpf_attr, BPF_PROG_LOAD member, up to fd_array (uapi linux/bpf.h)."""
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("prog_ifindex", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
                ("func_info", ctypes.c_uint64), ("func_info_cnt", ctypes.c_uint32),
                ("line_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
                ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("core_relo_cnt", ctypes.c_uint32),
                ("fd_array", ctypes.c_uint64)]


class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def lsm_btf_id(hook):
    """BTF id of bpf_lsm_<hook> in vmlinux BTF (libbpf does the lookup)."""
    last = None
    for lib in ("libbpf.so.1", "libbpf.so.0", "libbcc.so.0"):
        try:
            fn = ctypes.CDLL(lib).libbpf_find_vmlinux_btf_id
        except (OSError, AttributeError) as e:
            last = e
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_char_p, ctypes.c_uint]
        ret = fn(hook.encode(), _BPF_LSM_MAC)
        if ret < 0:
            raise KernelFeatureError(f"LSM hook {hook}: bpf_lsm_{hook} not found in the kernel's "
                                     f"BTF ({os.strerror(-ret)}); BPF LSM needs "
                                     f"CONFIG_DEBUG_INFO_BTF and CONFIG_BPF_LSM")
        return ret
    raise KernelFeatureError(f"cannot find libbpf to look up BTF ids ({last})")


def load_lsm_program(name, hook, insns):
    """Load BPF instructions as an LSM program named name for hook; returns its fd."""
    buf = ctypes.create_string_buffer(bytes(insns), len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=_BPF_PROG_TYPE_LSM, insn_cnt=len(insns) // 8,
                         insns=ctypes.addressof(buf), license=ctypes.addressof(lic),
                         prog_name=name.encode()[:15], expected_attach_type=_BPF_LSM_MAC,
                         attach_btf_id=lsm_btf_id(hook))
    fd, err = bpf_syscall(_BPF_PROG_LOAD, attr)
    if fd >= 0:
        return fd
    log = ctypes.create_string_buffer(1 << 20)   # again, with the verifier's log
    attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    fd2, err2 = bpf_syscall(_BPF_PROG_LOAD, attr)
    if fd2 >= 0:      # loaded the second time: keep it
        return fd2
    text = log.value.decode(errors="replace").strip().splitlines()
    tail = " | ".join(text[-6:])
    hint = ""
    if err == errno.EPERM:
        hint = " (is bpf in the active LSMs? boot with lsm=...,bpf; see agentwatch doctor)"
    raise KernelFeatureError(f"loading {name} (LSM {hook}) failed: {os.strerror(err)}{hint}"
                             + (f"; verifier: {tail}" if tail else ""))


def attach_lsm_program(prog_fd):
    """Attach a loaded LSM program; returns the link fd (closing it detaches)."""
    attr = _RawTpAttr(name=0, prog_fd=prog_fd)
    fd, err = bpf_syscall(_BPF_RAW_TRACEPOINT_OPEN, attr)
    if fd < 0:
        raise KernelFeatureError(f"attaching an LSM program failed: {os.strerror(err)}")
    return fd


def bpf_source_path():
    from ..sensors import bpf_dir
    return os.path.join(bpf_dir(), "lsm.bpf.c")


class LsmGuard(DenialStream):
    """BPF LSM enforcement for one or more cgroups; see the module doc."""

    COUNTERS = b"lsm_counters"

    enforcement = ENFORCEMENT

    def __init__(self, exec_allow, file_deny=(), connect_ports=None, signals=False, unix=False):
        self.bpf = None
        self.prog_fds = {}       # name -> prog fd
        self.link_fds = {}       # name -> link fd (attachment)
        self.cgroups = []
        self.received = 0
        self.errors = []
        self._on_denial = None
        self.use(exec_allow, file_deny, connect_ports, signals, unix)

    def use(self, exec_allow, file_deny=(), connect_ports=None, signals=False, unix=False):
        """The rules the next open() enforces. Not while enforcing: a
        released guard is reused by a shared monitor (the daemon), which
        compiles the programs once, not once per run."""
        if self.link_fds or self.cgroups:
            raise RuntimeError("LsmGuard is enforcing: release() it first")
        self.exec_allow = None if exec_allow is None else [os.fspath(p) for p in exec_allow]
        self.file_deny = [os.fspath(p) for p in (file_deny or ())]
        self.connect_ports = parse_ports(connect_ports)
        self.cfg = ((CFG_EXEC if self.exec_allow is not None else 0)
                    | (CFG_OPEN if self.file_deny else 0)
                    | (CFG_CONNECT if self.connect_ports is not None else 0)
                    | (CFG_SIGNAL if signals else 0)
                    | (CFG_UNIX if unix else 0))
        self.allow_keys = {}
        self.deny_keys = {}
        self._paths = {}
        return self

    # -- pure preparation -----------------------------------------------------------
    def resolve(self):
        """Turn the path lists into inode keys (also done by open())."""
        mounts = mount_devices()
        self.allow_keys = ({} if self.exec_allow is None else
                           expand_files(self.exec_allow, MAX_ALLOW, "exec_allow", mounts,
                                        walk=False))
        self.deny_keys = expand_files(self.file_deny, MAX_DENY, "file_deny", mounts)
        self._paths = dict(self.allow_keys)
        self._paths.update(self.deny_keys)
        return self

    def known_paths(self):
        """{(ino, kernel dev): path} of every file in the allow and deny sets."""
        return self._paths

    @staticmethod
    def preflight():
        """Raise unless this host can run the BPF LSM path: root, bpf among
        the active LSMs, headers of exactly the running kernel."""
        if os.geteuid() != 0:
            raise PrivilegeError("BPF LSM enforcement needs root (CAP_BPF, CAP_MAC_ADMIN, "
                                 "CAP_SYS_ADMIN); run agentwatch with sudo")
        lsms = active_lsms()
        if lsms is not None and "bpf" not in lsms:
            raise KernelFeatureError(f"BPF LSM is not active (active LSMs: {','.join(lsms)}); "
                                     "boot with lsm=...,bpf or use the Landlock/seccomp/cgroup "
                                     "BPF path (agentwatch doctor)")
        ok, detail = check_headers()
        if not ok:
            raise KernelFeatureError(f"refusing to load BPF LSM programs: {detail}")

    @classmethod
    def unavailable(cls):
        """Why this host cannot run the BPF LSM path (preflight's message),
        or None when it can."""
        try:
            cls.preflight()
        except AgentwatchError as e:
            return str(e)
        return None

    # -- life cycle -------------------------------------------------------------------
    def open(self, cgroup, on_denial):
        """Load (once), attach, and start enforcing for cgroup (a cgroup v2
        path or id). on_denial(dict) is called from poll()."""
        self.preflight()
        self.resolve()
        if self.bpf is None:
            from ..sensors import bpf_dir, compile_bpf
            with open(bpf_source_path()) as f:
                text = f.read()
            self.bpf = compile_bpf(text, [f"-I{bpf_dir()}", "-Wno-unused-function"], "bpf/lsm.bpf.c")
            self.bpf[b"lsm_events"].open_ring_buffer(self._on_record)
        try:
            self._fill_maps()
            self._start_stream(on_denial)
            for name, hook, need in PROGRAMS:
                if not self.cfg & need:
                    continue
                if name not in self.prog_fds:
                    insns = self.bpf.dump_func(name.encode())
                    self.prog_fds[name] = load_lsm_program(name, hook, insns)
                self.link_fds[name] = attach_lsm_program(self.prog_fds[name])
            self.watch(cgroup)
        except Exception:
            self.close()
            raise
        return self

    def _fill_maps(self):
        allow = self.bpf[b"lsm_exec_allow"]
        for ino, dev in self.allow_keys:
            allow[R.LsmKey(ino, dev, 0)] = ctypes.c_uint8(1)
        deny = self.bpf[b"lsm_file_deny"]
        for ino, dev in self.deny_keys:
            deny[R.LsmKey(ino, dev, 0)] = ctypes.c_uint8(1)
        ports = self.bpf[b"lsm_port_allow"]
        for p in self.connect_ports or ():
            ports[ctypes.c_int(p)] = ctypes.c_uint8(1)
        self.bpf[b"lsm_cfg"][ctypes.c_int(0)] = ctypes.c_uint32(self.cfg)

    def watch(self, cgroup):
        """Start enforcing for another cgroup (path or id). Add a cgroup
        before any process of the agent may run in it."""
        cg_id = cgroup if isinstance(cgroup, int) else os.stat(cgroup).st_ino
        self.bpf[b"lsm_watched"][ctypes.c_uint64(cg_id)] = ctypes.c_uint32(1)
        self.cgroups.append(cg_id)
        return cg_id

    def release(self):
        """Stop enforcing: detach, forget the cgroups, rules and records; the
        programs stay loaded for the next use() and open(). Raises if
        anything of the old run could remain (then close(): never reuse it)."""
        if self.bpf is None:
            raise RuntimeError("LsmGuard is not loaded")
        for name in list(self.link_fds):
            os.close(self.link_fds.pop(name))       # the link's last fd: detached
        clear_map(self.bpf[b"lsm_watched"], "lsm_watched")
        self.cgroups = []
        self._end_stream()
        clear_map(self.bpf[b"lsm_exec_allow"], "lsm_exec_allow")
        clear_map(self.bpf[b"lsm_file_deny"], "lsm_file_deny")
        ports = self.bpf[b"lsm_port_allow"]
        for p in self.connect_ports or ():
            ports[ctypes.c_int(p)] = ctypes.c_uint8(0)
        self.bpf[b"lsm_cfg"][ctypes.c_int(0)] = ctypes.c_uint32(0)

    def close(self):
        """Detach and unload everything. Idempotent. From here on the cgroups
        are unrestricted by this layer: stop the agent first."""
        for name in list(self.link_fds):
            os.close(self.link_fds.pop(name))
        for name in list(self.prog_fds):
            os.close(self.prog_fds.pop(name))
        self.cgroups = []
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    # -- records ------------------------------------------------------------------------
    def _decode(self, raw):
        return decode_denial(raw, self.known_paths())

    def program_names(self):
        return sorted(self.link_fds)


__all__ = ["LsmGuard", "LsmRuleError", "check_headers", "decode_denial", "file_key",
           "expand_files", "kernel_dev", "ENFORCEMENT", "PROGRAMS"]
