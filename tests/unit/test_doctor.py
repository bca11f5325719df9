"""agentwatch.doctor logic that needs neither root nor bcc."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentwatch import doctor
from agentwatch.doctor import Check, enforcement_path, format_table, report, to_json

REPO = Path(__file__).resolve().parents[2]
NAMES = ["root", "btf", "tracefs", "bcc", "kernel-headers", "bpf-syscall",
         "raw-tracepoint", "tracepoint", "ringbuf", "cgroup-v2",
         "cgroup-controllers", "cgroup-bpf", "bpf-lsm", "fentry", "kprobes",
         "landlock", "seccomp", "egress-guard"]


def checks(**ok):
    """One Check per name; ok=True only for the names given as True."""
    return [Check(n, ok.get(n.replace("-", "_"), False), f"detail of {n}", f"loses {n}")
            for n in NAMES]


# --- enforcement_path -------------------------------------------------------

def test_bpf_lsm_wins():
    assert enforcement_path(checks(bpf_lsm=True)) == "bpf-lsm"
    assert enforcement_path(checks(bpf_lsm=True, landlock=True, seccomp=True,
                                   cgroup_bpf=True)) == "bpf-lsm"


def test_fallback_needs_all_three():
    assert enforcement_path(checks(landlock=True, seccomp=True,
                                   cgroup_bpf=True)) == "landlock+seccomp+cgroup-bpf"
    for missing in ("landlock", "seccomp", "cgroup_bpf"):
        ok = {"landlock": True, "seccomp": True, "cgroup_bpf": True}
        ok[missing] = False
        assert enforcement_path(checks(**ok)) == "monitor-only"


def test_monitor_only_when_nothing_or_absent():
    assert enforcement_path(checks()) == "monitor-only"
    assert enforcement_path([]) == "monitor-only"


# --- format_table / to_json / report ---------------------------------------

def test_format_table_one_line_per_check():
    cs = checks(btf=True)
    lines = format_table(cs).splitlines()
    assert len(lines) == len(cs)
    btf = next(ln for ln in lines if " btf " in ln)
    assert btf.startswith("ok") and "detail of btf" in btf and "disables" not in btf
    lsm = next(ln for ln in lines if " bpf-lsm " in ln)
    assert lsm.startswith("MISSING")
    assert lsm.endswith("-> disables: loses bpf-lsm")


def test_format_table_aligns_details():
    lines = format_table(checks(root=True)).splitlines()
    starts = {ln.index("detail of") for ln in lines}
    assert len(starts) == 1


def test_format_table_empty():
    assert format_table([]) == ""


def test_to_json_and_report_shape():
    cs = checks(landlock=True, seccomp=True, cgroup_bpf=True)
    rows = to_json(cs)
    assert [r["name"] for r in rows] == NAMES
    assert all(set(r) == {"name", "ok", "detail", "disables"} for r in rows)
    rep = report(cs)
    assert rep["enforcement_path"] == "landlock+seccomp+cgroup-bpf"
    assert rep["checks"] == rows
    json.dumps(rep)  # serialisable


# --- run_check never raises -------------------------------------------------

def test_run_check_turns_exceptions_into_missing():
    def boom():
        raise OSError(5, "I/O error")
    c = doctor.run_check("x", boom, "stuff")
    assert not c.ok and "OSError" in c.detail and "I/O error" in c.detail
    assert c.disables == "stuff" and c.seconds >= 0


def test_run_check_uses_fail_message_verbatim():
    def fail():
        raise doctor._Fail("needs root")
    assert doctor.run_check("x", fail, "").detail == "needs root"


def test_run_checks_survives_every_probe_failing(monkeypatch):
    def boom():
        raise RuntimeError("nope")
    monkeypatch.setattr(doctor, "PROBES", [(n, boom, "d") for n in NAMES])
    cs = doctor.run_checks()
    assert [c.name for c in cs] == NAMES and not any(c.ok for c in cs)


def test_probe_names_match_contract():
    assert [name for name, _, _ in doctor.PROBES] == NAMES
    assert all(disables for _, _, disables in doctor.PROBES)


def test_unprivileged_run_reports_needs_root(monkeypatch):
    monkeypatch.setattr(doctor.os, "geteuid", lambda: 1000)
    cs = {c.name: c for c in doctor.run_checks()}
    assert list(cs) == NAMES
    assert not cs["root"].ok
    for name in ("bpf-syscall", "raw-tracepoint", "tracepoint", "ringbuf",
                 "cgroup-bpf", "fentry"):
        assert not cs[name].ok
        assert cs[name].detail == "needs root"
    assert not cs["bpf-lsm"].ok
    assert not cs["egress-guard"].ok and "needs root" in cs["egress-guard"].detail
    assert all(c.detail for c in cs.values())


def test_imports_without_bcc():
    # -S hides dist-packages (where Debian puts bcc); the module must still import.
    code = ("import sys; sys.path.insert(0, %r); import agentwatch.doctor as d; "
            "assert 'bcc' not in sys.modules; print(d.enforcement_path([]))" % str(REPO))
    out = subprocess.run([sys.executable, "-S", "-c", code],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "monitor-only"


# --- parsing helpers ---------------------------------------------------------

def test_headers_version_from_utsrelease(tmp_path):
    gen = tmp_path / "include" / "generated"
    gen.mkdir(parents=True)
    (gen / "utsrelease.h").write_text('#define UTS_RELEASE "6.1.0-56-amd64"\n')
    assert doctor._headers_version(str(tmp_path)) == "6.1.0-56-amd64"
    assert doctor._headers_version(str(tmp_path / "nope")) is None


def test_mount_unescape():
    assert doctor._unescape_mount("/mnt/a\\040b") == "/mnt/a b"


@pytest.mark.parametrize("have,v1,ok,words", [
    (["cpu", "memory", "pids", "io"], [], True, ["available"]),
    (["hugetlb"], ["cpu", "memory", "pids"], False, ["v1-only: cpu, memory, pids"]),
    (["cpu"], ["memory"], False, ["v1-only: memory", "absent: pids"]),
])
def test_cgroup_controllers(monkeypatch, have, v1, ok, words):
    monkeypatch.setattr(doctor, "_cgroup2_mount", lambda: "/sys/fs/cgroup/unified")
    monkeypatch.setattr(doctor, "_cgroup2_controllers", lambda m: have)
    monkeypatch.setattr(doctor, "_v1_controllers", lambda: v1)
    got_ok, detail = doctor._probe_cgroup_controllers()
    assert got_ok is ok
    for w in words:
        assert w in detail


def test_cgroup_v2_layout(monkeypatch):
    mounts = [("/sys/fs/cgroup/cpu", "cgroup", "rw,cpu"),
              ("/sys/fs/cgroup/unified", "cgroup2", "rw")]
    monkeypatch.setattr(doctor, "_mounts", lambda: mounts)
    monkeypatch.setattr(doctor, "_cgroup2_controllers", lambda m: ["hugetlb"])
    ok, detail = doctor._probe_cgroup_v2()
    assert ok and "/sys/fs/cgroup/unified" in detail and "hybrid" in detail
    assert "hugetlb" in detail
    monkeypatch.setattr(doctor, "_mounts", lambda: mounts[1:])
    assert "unified" in doctor._probe_cgroup_v2()[1]
    monkeypatch.setattr(doctor, "_mounts", lambda: mounts[:1])
    assert doctor._probe_cgroup_v2()[0] is False


def test_last_line_prefers_compiler_error_then_verifier_reason():
    clang = "In file included\n/virtual/main.c:1:2: error: bad thing\n1 error generated.\n"
    assert doctor._last_line(clang) == "/virtual/main.c:1:2: error: bad thing"
    verifier = ("0: (79) r0 = *(u64 *)(r1 +152)\ninvalid bpf_context access\n"
                "processed 1 insns (limit 1000000)\n\nbpf: Failed to load program: X\n")
    assert doctor._last_line(verifier) == "invalid bpf_context access"
    assert doctor._last_line("") == ""


# --- egress-guard -----------------------------------------------------------

def test_egress_guard_check_listed_with_what_it_disables():
    disables = dict((n, d) for n, _, d in doctor.PROBES)["egress-guard"]
    assert "network.allow domain rules decided by name (the egress guard)" in disables
    assert "network.guard: false" in disables and "does not start" in disables


def test_egress_guard_result_all_there():
    ok, detail = doctor.egress_guard_result({})
    assert ok and "sock_ops" in detail and "dnslib" in detail and "h11" in detail


@pytest.mark.parametrize("piece", doctor.GUARD_PIECES)
def test_egress_guard_result_names_the_missing_piece(piece):
    ok, detail = doctor.egress_guard_result({piece: "because"})
    assert not ok
    assert detail == f"missing: {piece}: because"


def test_egress_guard_result_groups_pieces_by_reason_in_order():
    missing = {doctor.GUARD_RECVMSG: "needs root", doctor.GUARD_REWRITE: "needs root",
               "python dnslib": "import dnslib: ModuleNotFoundError: no"}
    ok, detail = doctor.egress_guard_result(missing)
    assert not ok
    assert detail == (f"missing: {doctor.GUARD_REWRITE}, {doctor.GUARD_RECVMSG}: needs root; "
                      "python dnslib: import dnslib: ModuleNotFoundError: no")
    assert "recvmsg4/6" in detail and "19/20" in detail


def test_egress_guard_no_ipv6_loopback_is_a_note_not_a_failure():
    note = doctor.GUARD_NO_LO6.format(why="bind: EADDRNOTAVAIL")
    ok, detail = doctor.egress_guard_result({}, [note])
    assert ok and "::1 not bindable" in detail and "refused (EPERM) rather than proxied" in detail
    ok, detail = doctor.egress_guard_result({doctor.GUARD_LO4: "bind: EACCES"}, [note])
    assert not ok and "127.0.0.1" in detail and "::1 not bindable" in detail


def test_egress_guard_probe_names_missing_modules_and_cgroup(monkeypatch):
    monkeypatch.setitem(sys.modules, "dnslib", None)      # import dnslib fails
    monkeypatch.setattr(doctor, "_cgroup2_mount", lambda: None)
    ok, detail = doctor._probe_egress_guard()
    assert not ok
    assert "cgroup v2: no cgroup2 mount" in detail
    assert "python dnslib: import dnslib" in detail
    assert "python h11" not in detail


def _bcc_loads():
    try:
        from agentwatch.sensors import import_bcc
        import_bcc()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(os.geteuid() != 0 or not _bcc_loads(), reason="needs root and bcc")
def test_egress_guard_works_here_and_leaves_nothing():
    mount = doctor._cgroup2_mount()
    before = set(os.listdir(mount))
    c = doctor.run_check("egress-guard", doctor._probe_egress_guard, "")
    assert c.ok, c.detail
    assert set(os.listdir(mount)) == before      # the temporary cgroup is gone
