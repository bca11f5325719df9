"""The BPF LSM enforcement path, on a second kernel (host side).

Boots Debian's stock kernel with lsm=...,bpf under QEMU TCG once for this
module (tests/vm/run_vm_tests.sh, via virtme-ng over this machine's root
filesystem), runs tests/vm/guest inside it, and reports every guest test as
its own test here, from the JUnit XML the guest wrote into a shared
directory. Skipped, with the reason, when QEMU, virtme-ng, busybox or a
second kernel with exactly matching headers are not installed
(tests/vm/setup.sh installs them) or when AGENTWATCH_SKIP_VM=1.
"""
import ast
import glob
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.kernel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RUNNER = os.path.join(HERE, "run_vm_tests.sh")
VENV = os.environ.get("AGENTWATCH_VENV", os.path.join(REPO, ".venv"))


def guest_tests():
    """(module, test name) of every test function in tests/vm/guest, read
    from the source so that each becomes a parameter here."""
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "guest", "test_*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        mod = os.path.splitext(os.path.basename(path))[0]
        out += [(mod, n.name) for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    return out


def lsm_conf():
    """tests/vm/lsm.conf (shared with run_vm_tests.sh and vagrant/), as
    bash reads it: KEY -> value."""
    out = subprocess.run(["bash", "-c", 'set -a; . "$1"; env -0', "_", LSM_CONF],
                         capture_output=True, check=True).stdout
    env = dict(kv.split(b"=", 1) for kv in out.split(b"\0") if b"=" in kv)
    return {k.decode(): v.decode() for k, v in env.items() if k.startswith(b"AGENTWATCH_LSM_")}


def second_run(conf):
    """Run a second time in the VM (lsm.conf AGENTWATCH_LSM_PATH_TESTS):
    module -> file, each directory's test modules listed."""
    out = {}
    for path in conf["AGENTWATCH_LSM_PATH_TESTS"].split():
        files = (sorted(glob.glob(os.path.join(REPO, path, "test_*.py")))
                 if os.path.isdir(os.path.join(REPO, path)) else [os.path.join(REPO, path)])
        out.update((os.path.splitext(os.path.basename(f))[0], os.path.relpath(f, REPO)) for f in files)
    return out


LSM_CONF = os.path.join(HERE, "lsm.conf")
CONF = lsm_conf()
SECOND_RUN = second_run(CONF)


def functions_in(path):
    """Names of the test functions in path."""
    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read(), path)
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def vm_kernel():
    """A kernel other than the running one, with its modules and headers of
    exactly its version, or None."""
    want = os.environ.get("AGENTWATCH_VM_KERNEL")
    cands = [want] if want else sorted(
        (p[len("/boot/vmlinuz-"):] for p in glob.glob("/boot/vmlinuz-*")), reverse=True)
    for v in cands:
        if v == os.uname().release:
            continue
        try:
            with open(f"/lib/modules/{v}/build/include/generated/utsrelease.h") as f:
                if f'"{v}"' not in f.read():
                    continue
        except OSError:
            continue
        if os.path.exists(f"/boot/vmlinuz-{v}") and os.path.isdir(f"/lib/modules/{v}/kernel"):
            return v
    return None


def missing():
    """Why the VM cannot run here, or None."""
    if os.environ.get("AGENTWATCH_SKIP_VM") == "1":
        return "AGENTWATCH_SKIP_VM=1"
    if os.geteuid() != 0:
        return "needs root"
    path = os.pathsep.join([os.path.join(VENV, "bin"), os.environ.get("PATH", "")])
    for tool, pkg in (("qemu-system-x86_64", "Debian qemu-system-x86"),
                      ("vng", "PyPI virtme-ng in the venv"), ("busybox", "Debian busybox-static")):
        if not shutil.which(tool, path=path):
            return f"{tool} not installed ({pkg}); run tests/vm/setup.sh"
    if not vm_kernel():
        return ("no second kernel with matching headers (Debian linux-image-amd64 and "
                "linux-headers-amd64); run tests/vm/setup.sh")
    return None


class VmRun:
    def __init__(self, out, proc, seconds):
        self.out = out
        self.proc = proc
        self.seconds = seconds
        self.cases = {}
        junit = os.path.join(out, "junit.xml")
        if os.path.exists(junit):
            for tc in ET.parse(junit).getroot().iter("testcase"):
                mod = tc.get("classname", "").rsplit(".", 1)[-1]
                self.cases[(mod, tc.get("name"))] = tc

    def read(self, name, lines=40):
        try:
            with open(os.path.join(self.out, name)) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return f"({name} missing)"

    def diagnostics(self):
        return (f"runner exit {self.proc.returncode} after {self.seconds:.0f} s\n"
                f"--- runner output\n{self.proc.stderr[-3000:]}\n"
                f"--- guest-info\n{self.read('guest-info')}\n"
                f"--- pytest.log (tail)\n{self.read('pytest.log')}\n"
                f"--- adversarial.log (the scenarios' runs, tail)\n{self.read('adversarial.log', 40)}\n"
                f"--- ps.log (the guest's busiest processes each minute, tail)\n{self.read('ps.log', 60)}\n"
                f"--- vm.log (tail)\n{self.read('vm.log', 25)}")


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(f"BPF LSM VM not available: {why}")
    out = str(tmp_path_factory.mktemp("vm"))
    start = time.monotonic()
    proc = subprocess.run(["bash", RUNNER, "--out", out], capture_output=True, text=True,
                          timeout=int(os.environ.get("AGENTWATCH_VM_TIMEOUT", "3300")) + 60)
    run = VmRun(out, proc, time.monotonic() - start)
    print(f"\nBPF LSM VM: {run.seconds:.0f} s wall; {run.read('guest-info')}")
    return run


def test_vm_booted_bpf_lsm_kernel(vm):
    info = vm.read("guest-info")
    lsms = next((line.split(":", 1)[1].strip().split(",") for line in info.splitlines()
                 if line.startswith("lsm:")), [])
    required = CONF["AGENTWATCH_LSM_REQUIRED"].split(",")
    assert set(required) <= set(lsms), f"LSMs {required} not all active\n{vm.diagnostics()}"
    assert vm.cases, f"the guest wrote no test results\n{vm.diagnostics()}"
    unknown = {c for c in vm.cases if c[0] not in SECOND_RUN} - set(guest_tests())
    assert not unknown, f"guest ran tests this module does not know: {unknown}"


@pytest.mark.parametrize("mod,name", guest_tests(), ids=[n for _, n in guest_tests()])
def test_guest(vm, mod, name):
    tc = vm.cases.get((mod, name))
    if tc is None:
        pytest.fail(f"guest test {mod}::{name} did not run in the VM\n{vm.diagnostics()}")
    for tag in ("failure", "error"):
        el = tc.find(tag)
        if el is not None:
            pytest.fail(f"[in the BPF LSM VM] {tag}: {el.get('message', '')}\n{el.text or ''}",
                        pytrace=False)
    skipped = tc.find("skipped")
    if skipped is not None:
        pytest.skip(f"[in the BPF LSM VM] {skipped.get('message', '')}")


@pytest.mark.parametrize("mod", sorted(SECOND_RUN))
def test_second_run_on_the_bpf_lsm_path(vm, mod):
    """The enforcement and adversarial suites, run again in the VM: every
    case that ran there passed (the adversarial ones assert the run's path
    is bpf-lsm+landlock+seccomp+cgroup-bpf), and every test of the module
    was among them."""
    cases = {name: tc for (m, name), tc in vm.cases.items() if m == mod}
    assert cases, f"{SECOND_RUN[mod]} did not run in the VM\n{vm.diagnostics()}"
    bad = [f"{name}: {el.get('message', '')[:300]}" for name, tc in sorted(cases.items())
           for el in (tc.find("failure"), tc.find("error")) if el is not None]
    assert not bad, "[in the BPF LSM VM]\n" + "\n".join(bad)
    missing = set(functions_in(SECOND_RUN[mod])) - {n.split("[")[0] for n in cases}
    assert not missing, f"not run in the VM: {sorted(missing)}"
    assert any(tc.find("skipped") is None for tc in cases.values()), "all skipped in the VM"
