"""What BPF programs are loaded in the kernel, by name (no bcc needed).

Used to prove cleanup: after a run, no program named aw_* may remain."""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_BPF_PROG_GET_NEXT_ID = 11
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_NAME_OFFSET = 64          # offsetof(struct bpf_prog_info, name), uapi
_INFO_LEN = 128


def _nr():
    import seccomp
    return seccomp.resolve_syscall(seccomp.Arch.NATIVE, "bpf")


def bpf_syscall(cmd, attr):
    """bpf(cmd, &attr, sizeof attr) -> (return value, errno). The one raw
    bpf() wrapper: used for the program inventory, cgroup queries, LSM loads
    and the benchmarks' run-time statistics."""
    ret = _libc.syscall(ctypes.c_long(_nr()), ctypes.c_int(cmd), ctypes.byref(attr),
                        ctypes.c_uint(ctypes.sizeof(attr)))
    return ret, ctypes.get_errno()


class _IdAttr(ctypes.Structure):
    _fields_ = [("start_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def loaded_programs():
    """[(id, name)] of every BPF program loaded. Needs root; raises OSError."""
    out, start = [], 0
    while True:
        a = _IdAttr(start_id=start)
        ret, err = bpf_syscall(_BPF_PROG_GET_NEXT_ID, a)
        if ret < 0:
            if err == 2:      # ENOENT: no more
                return out
            raise OSError(err, os.strerror(err))
        start = a.next_id
        fa = _IdAttr(start_id=start)     # prog_id shares the first field
        fd, err = bpf_syscall(_BPF_PROG_GET_FD_BY_ID, fa)
        if fd < 0:
            continue                     # unloaded meanwhile
        try:
            buf = ctypes.create_string_buffer(_INFO_LEN)
            ia = _InfoAttr(bpf_fd=fd, info_len=_INFO_LEN, info=ctypes.addressof(buf))
            ret, err = bpf_syscall(_BPF_OBJ_GET_INFO_BY_FD, ia)
            if ret == 0:
                name = buf.raw[_NAME_OFFSET:_NAME_OFFSET + 16].split(b"\0", 1)[0].decode(errors="replace")
                out.append((start, name))
        finally:
            os.close(fd)


def agentwatch_programs():
    from . import PROG_PREFIX
    return [(i, n) for i, n in loaded_programs() if n.startswith(PROG_PREFIX)]
