"""The seccomp layer on the real kernel.

Each case forks a child that loads the filter and tries a syscall through
ctypes; the result (return value or -errno) comes back through a pipe. The
test process itself never loads a filter. Every denied case is also run
unfiltered, to prove the errno comes from the filter and not the kernel.
"""
import ctypes
import errno
import os
import platform
import resource
import signal
import subprocess
import threading
from dataclasses import dataclass

import pytest
import seccomp

from agentwatch.sandbox import seccomp_filter as sf
from agentwatch.sandbox.seccomp_filter import SeccompPolicy

pytestmark = pytest.mark.kernel
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 ABIs")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MFD_CLOEXEC, MFD_EXEC = 0x1, 0x10
ADDR_NO_RANDOMIZE = 0x0040000
X32_SYSCALL_BIT = 0x40000000


def sc(name, *args):
    """Raw syscall by name (or number): its return value, or -errno."""
    nr = name if isinstance(name, int) else seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    return -ctypes.get_errno() if ret == -1 else ret


@dataclass
class Outcome:
    value: object = None     # what fn returned (None if the child died first)
    signal: int = 0          # the signal that killed the child, 0 if it exited
    exit_code: int = None


def in_child(policy, fn):
    """Fork; the child loads policy's filter (unless None), runs fn and reports."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGSYS kill must not dump core
            if policy is not None:
                sf.apply(policy)
            out = repr(fn())
        except BaseException as e:  # noqa: BLE001 - report, never return into pytest
            out, code = f"raised {e!r}", 1
        try:
            os.write(w, out.encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return Outcome(None, os.WTERMSIG(status))
    assert os.WEXITSTATUS(status) == 0, data
    return Outcome(eval(data), 0, 0)  # noqa: S307 - our own repr()


def raw_clone(flags):
    """clone(flags | SIGCHLD) without a new stack (a fork); 0 on success, -errno."""
    pid = sc("clone", flags | signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        os._exit(0)
    if pid < 0:
        return pid
    os.waitpid(pid, 0)
    return 0


def fork_exec_true():
    pid = os.fork()
    if pid == 0:
        try:
            os.execv("/bin/true", ["/bin/true"])
        finally:
            os._exit(127)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def memfd(flags):
    fd = sc("memfd_create", ctypes.c_char_p(b"aw"), flags)
    return fd if fd < 0 else "fd"


# name -> (call, result under the default policy)
DENIED = {
    "ptrace(PTRACE_TRACEME)": (lambda: sc("ptrace", 0, 0, 0, 0), -errno.EPERM),
    "bpf(BPF_MAP_CREATE, NULL)": (lambda: sc("bpf", 0, 0, 0), -errno.EPERM),
    "unshare(CLONE_NEWUSER)": (lambda: sc("unshare", CLONE_NEWUSER), -errno.EPERM),
    "clone(CLONE_NEWNS)": (lambda: raw_clone(CLONE_NEWNS), -errno.EPERM),
    "clone3": (lambda: sc("clone3", 0, 0), -errno.ENOSYS),
    "io_uring_setup": (lambda: sc("io_uring_setup", 1, 0), -errno.EPERM),
    "keyctl(GET_KEYRING_ID)": (lambda: sc("keyctl", 0, -3, 0), -errno.EPERM),
    "mount(NULL)": (lambda: sc("mount", 0, 0, 0, 0, 0), -errno.EPERM),
    "personality(ADDR_NO_RANDOMIZE)": (lambda: sc("personality", ADDR_NO_RANDOMIZE), -errno.EPERM),
    "personality(high bits | ADDR_NO_RANDOMIZE)":   # the kernel reads only the low 32 bits
        (lambda: sc("personality", (1 << 32) | ADDR_NO_RANDOMIZE), -errno.EPERM),
    "memfd_create(MFD_EXEC)": (lambda: memfd(MFD_EXEC | MFD_CLOEXEC), -errno.EPERM),
    "process_vm_writev(self)": (lambda: sc("process_vm_writev", os.getpid(), 0, 0, 0, 0, 0), -errno.EPERM),
    "init_module(NULL)": (lambda: sc("init_module", 0, 0, 0), -errno.EPERM),
}

ALLOWED = {
    "getpid": (lambda: sc("getpid") == os.getpid(), True),
    "fork": (lambda: os.waitstatus_to_exitcode(_fork_and_wait()), 0),
    "clone without CLONE_NEW*": (lambda: raw_clone(0), 0),
    "fork + exec /bin/true": (fork_exec_true, 0),
    "thread (clone3 -> ENOSYS -> clone)": (lambda: _thread_runs(), True),
    "personality(query)": (lambda: sc("personality", 0xFFFFFFFF) >= 0, True),
    "personality(PER_LINUX)": (lambda: sc("personality", 0) >= 0, True),
    "memfd_create(MFD_CLOEXEC)": (lambda: memfd(MFD_CLOEXEC), "fd"),
    "no_new_privs is set": (lambda: "NoNewPrivs:\t1" in open("/proc/self/status").read(), True),
}


def _fork_and_wait():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def _thread_runs():
    ran = []
    t = threading.Thread(target=lambda: ran.append(1))
    t.start()
    t.join()
    return ran == [1]


@pytest.mark.parametrize("name", DENIED)
def test_default_policy_denies(name):
    call, expected = DENIED[name]
    assert in_child(None, call).value != expected, "unfiltered, the kernel already gives that result"
    assert in_child(SeccompPolicy(), call) == Outcome(expected, 0, 0)


@pytest.mark.parametrize("name", ALLOWED)
def test_default_policy_allows(name):
    call, expected = ALLOWED[name]
    assert in_child(SeccompPolicy(), call) == Outcome(expected, 0, 0)


@x86_64_only
def test_x32_syscall_kills():
    """libseccomp's own x32 check (nr >= 0x40000000 -> ACT_BADARCH) kills.
    This kernel has no x32 ABI: unfiltered the call is just ENOSYS."""
    call = lambda: sc(X32_SYSCALL_BIT | 39)   # noqa: E731 - x32 getpid
    assert in_child(None, call).value == -errno.ENOSYS
    assert in_child(SeccompPolicy(), call).signal == signal.SIGSYS


I386_GETPID = r"""
#include <unistd.h>
int main(void) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");  /* i386 getpid */
    return ret == (long)getpid() ? 0 : 3;
}
"""


@pytest.fixture(scope="module")
def i386_getpid(tmp_path_factory):
    d = tmp_path_factory.mktemp("i386")
    (d / "i386_getpid.c").write_text(I386_GETPID)
    exe = d / "i386_getpid"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(d / "i386_getpid.c")], check=True)
    if subprocess.run([str(exe)]).returncode != 0:
        pytest.skip("int $0x80 does not work unfiltered here (no IA32 emulation)")
    return str(exe)


@x86_64_only
def test_i386_syscall_kills(i386_getpid):
    """Only the native arch is in the filter: ACT_BADARCH kills i386 calls."""
    outcome = in_child(SeccompPolicy(), lambda: os.execv(i386_getpid, [i386_getpid]))
    assert outcome.signal == signal.SIGSYS


def test_kill_action():
    p = SeccompPolicy(action="kill")
    assert in_child(p, lambda: sc("ptrace", 0, 0, 0, 0)).signal == signal.SIGSYS
    assert in_child(p, lambda: sc("clone3", 0, 0)).value == -errno.ENOSYS  # stays ENOSYS
    assert in_child(p, _thread_runs).value is True


def test_ptrace_toggle():
    assert in_child(SeccompPolicy(ptrace=True), lambda: sc("ptrace", 0, 0, 0, 0)).value == 0


def test_namespaces_toggle():
    p = SeccompPolicy(namespaces=True)
    assert in_child(p, lambda: sc("unshare", CLONE_NEWUSER)).value == 0
    assert in_child(p, lambda: sc("clone3", 0, 0)).value != -errno.ENOSYS


def test_extra_deny():
    def cwd():
        try:
            return os.getcwd()
        except OSError as e:
            return -e.errno
    assert in_child(SeccompPolicy(deny=["getcwd"]), cwd).value == -errno.EPERM
    assert in_child(SeccompPolicy(), cwd).value == os.getcwd()


def test_unknown_name_is_refused_before_loading():
    with pytest.raises(ValueError, match="nosuchcall"):
        sf.build(SeccompPolicy(deny=["getcwd", "nosuchcall"]))
