"""agentwatch.doctor against the real kernel (root, bcc).

Facts asserted here come from shared/design/KERNEL-FACTS.md. The ones that
only hold on the measured CI kernel (6.18 micro-VM) skip elsewhere.
"""
import os
import platform
import re
import subprocess

import pytest

from agentwatch import doctor

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

ON_MEASURED_KERNEL = platform.release().startswith("6.18.")
measured_only = pytest.mark.skipif(not ON_MEASURED_KERNEL,
                                   reason="fact measured on the 6.18 CI kernel only")


@pytest.fixture(scope="module")
def checks():
    if not os.path.isdir("/sys/kernel/tracing/events"):
        # Left mounted afterwards: other kernel tests need it too.
        subprocess.run(["mount", "-t", "tracefs", "tracefs", "/sys/kernel/tracing"],
                       check=True)
    fd2_before = os.fstat(2)
    cs = doctor.run_checks()
    fd2_after = os.fstat(2)
    assert (fd2_before.st_dev, fd2_before.st_ino) == (fd2_after.st_dev, fd2_after.st_ino), \
        "stderr was not restored after the bcc probes"
    print("\n" + doctor.format_table(cs))
    return {c.name: c for c in cs}


def test_every_check_reported_with_detail_and_fast(checks):
    assert [n for n, _, _ in doctor.PROBES] == list(checks)
    for c in checks.values():
        assert c.detail.strip(), c.name
        assert c.seconds < 30, f"{c.name} took {c.seconds:.1f}s"


@pytest.mark.parametrize("name", ["root", "btf", "tracefs", "bcc", "kernel-headers",
                                  "bpf-syscall", "raw-tracepoint", "tracepoint",
                                  "ringbuf", "cgroup-v2", "cgroup-bpf", "seccomp"])
def test_works_here(checks, name):
    assert checks[name].ok, checks[name].detail


def test_landlock_abi(checks):
    c = checks["landlock"]
    assert c.ok, c.detail
    m = re.search(r"ABI (\d+)", c.detail)
    assert m and int(m.group(1)) >= 1


def test_tracepoint_really_fired(checks):
    assert "fired" in checks["tracepoint"].detail


@measured_only
def test_kprobes_missing(checks):
    assert not checks["kprobes"].ok
    assert "CONFIG_KPROBES" in checks["kprobes"].detail


@measured_only
def test_bpf_lsm_missing_with_eperm(checks):
    c = checks["bpf-lsm"]
    assert not c.ok
    assert "EPERM" in c.detail
    assert "bpf is in active LSMs" in c.detail


@measured_only
def test_fentry_missing(checks):
    assert not checks["fentry"].ok and "EPERM" in checks["fentry"].detail


@measured_only
def test_hybrid_cgroups(checks):
    assert "hybrid" in checks["cgroup-v2"].detail
    c = checks["cgroup-controllers"]
    assert not c.ok and "v1-only" in c.detail
    assert c.disables == "resource limits use v1/rlimit fallback"


@measured_only
def test_headers_mismatch_warned(checks):
    c = checks["kernel-headers"]
    assert c.ok and "BPF code must not read kernel structs" in c.detail


@measured_only
def test_enforcement_path_here(checks):
    assert doctor.enforcement_path(list(checks.values())) == "landlock+seccomp+cgroup-bpf"


def test_enforcement_path_consistent(checks):
    path = doctor.enforcement_path(list(checks.values()))
    if checks["bpf-lsm"].ok:
        assert path == "bpf-lsm"
    elif all(checks[n].ok for n in ("landlock", "seccomp", "cgroup-bpf")):
        assert path == "landlock+seccomp+cgroup-bpf"
    else:
        assert path == "monitor-only"


def test_bad_program_reports_reason_not_traceback():
    with pytest.raises(doctor._Fail, match="error: use of undeclared identifier"):
        doctor._bpf("int f(void *ctx) { return nosuch; }", lambda b, bcc: None)
