"""BPF LSM enforcement (agentwatch/guards/lsm.py) on a kernel with lsm=...,bpf.

Runs inside the VM only (tests/vm/run_vm_tests.sh). Every test makes its
attempt from a process in the guarded cgroup and asserts the kernel's answer
(EPERM or success), the denial record, and that the BPF LSM path judged it.
"""
import errno
import os
import stat
import subprocess

from lsmkit import LDSO, LIBC, TRUE, awprobe, doctor_path, in_the_vm, lsm  # noqa: F401 (fixtures)

PROT_EXEC = 0x4


def _ino(path):
    return os.stat(path).st_ino


def test_doctor_and_programs_say_bpf_lsm(lsm, doctor_path):
    assert doctor_path == "bpf-lsm"
    assert lsm.guard.program_names() == sorted(
        ["aw_lsm_exec", "aw_lsm_open", "aw_lsm_connect", "aw_lsm_mmap", "aw_lsm_mprotect"])
    lsm.assert_path()


def test_exec_of_non_allowed_binary_is_denied(lsm):
    # a byte-for-byte copy of the allowed /usr/bin/true: another inode
    rc, res, err, recs = lsm.attempt("exec", lsm.world.copy)
    assert res == {"op": "exec", "ret": -1, "errno": errno.EPERM}, (rc, res, err)
    assert len(recs) == 1, recs
    r = recs[0]
    assert r["hook"] == "bprm_check_security" and r["op"] == "exec", r
    assert r["rule"] == "exec-not-allowed"
    assert r["ino"] == _ino(lsm.world.copy)
    assert r["name"] == lsm.world.copy and r["comm"] == "awprobe"
    lsm.assert_path(recs)


def test_exec_of_allowed_binaries_works(lsm):
    rc, res, err, recs = lsm.attempt("exec", "/usr/bin/true")
    assert (rc, res, recs) == (0, None, []), err
    # allowed through its directory (exec_allow names bin/)
    rc, res, err, recs = lsm.attempt("exec", lsm.world.tool)
    assert (rc, res, recs) == (0, None, []), err
    lsm.assert_path()


def test_open_of_denied_file_is_denied_under_every_name(lsm):
    w = lsm.world
    for name in (w.secret, w.hardlink, w.symlink, "/proc/self/root" + w.secret):
        rc, res, err, recs = lsm.attempt("open", name)
        assert res == {"op": "open", "ret": -1, "errno": errno.EPERM}, (name, rc, res, err)
        assert len(recs) == 1, (name, recs)
        r = recs[0]
        assert r["hook"] == "file_open" and r["rule"] == "file-denied", r
        assert r["ino"] == _ino(w.secret) and r["path"] == w.secret, r
        lsm.assert_path(recs)
    rc, res, err, recs = lsm.attempt("open", w.public)
    assert res["ret"] >= 0 and recs == [], (res, err)


def test_connect_to_non_allowed_port_is_denied(lsm):
    w = lsm.world
    rc, res, err, recs = lsm.attempt("connect", w.denied_port)
    assert res == {"op": "connect", "ret": -1, "errno": errno.EPERM}, (rc, res, err)
    assert len(recs) == 1, recs
    r = recs[0]
    assert r["hook"] == "socket_connect" and r["rule"] == "port-not-allowed", r
    assert (r["family"], r["addr"], r["port"]) == ("inet", "127.0.0.1", w.denied_port)
    lsm.assert_path(recs)
    rc, res, err, recs = lsm.attempt("connect", w.allowed_port)
    assert res == {"op": "connect", "ret": 0, "errno": 0} and recs == [], (res, err)


def test_exec_through_dynamic_loader_is_denied(lsm):
    # ld.so is allowed, so the exec passes; ld.so then maps the program
    # itself with PROT_EXEC, which mmap_file refuses
    ldso = "/lib64/ld-linux-x86-64.so.2"
    rc, res, err, recs = lsm.attempt("exec", ldso, lsm.world.copy)
    assert rc == 127 and res is None, (rc, res, err)
    assert "failed to map segment" in err, err
    mm = [r for r in recs if r["hook"] == "mmap_file"]
    assert mm, recs
    assert all(r["ino"] == _ino(lsm.world.copy) and r["prot"] & PROT_EXEC for r in mm), mm
    assert mm[0]["rule"] == "exec-mapping-not-allowed"
    lsm.assert_path(recs)
    # the same route to an allowed program works
    rc, res, err, recs = lsm.attempt("exec", ldso, "/usr/bin/true")
    assert (rc, recs) == (0, []), err


def test_executable_mapping_of_non_allowed_file_is_denied(lsm):
    rc, res, err, recs = lsm.attempt("mmapx", lsm.world.copy)
    assert res == {"op": "mmapx", "ret": -1, "errno": errno.EPERM}, (res, err)
    assert [r["hook"] for r in recs] == ["mmap_file"], recs
    lsm.assert_path(recs)
    # mapping readable first and making it executable later is refused too
    rc, res, err, recs = lsm.attempt("mprotect", lsm.world.copy)
    assert res == {"op": "mprotect", "ret": -1, "errno": errno.EPERM}, (res, err)
    assert [r["hook"] for r in recs] == ["file_mprotect"], recs
    assert recs[0]["ino"] == _ino(lsm.world.copy)
    lsm.assert_path(recs)
    rc, res, err, recs = lsm.attempt("mmapx", "/usr/bin/true")
    assert res == {"op": "mmapx", "ret": 0, "errno": 0} and recs == [], (res, err)


def test_memfd_fexecve_is_denied(lsm):
    rc, res, err, recs = lsm.attempt("memfd", "/usr/bin/true")
    assert res == {"op": "memfd", "ret": -1, "errno": errno.EPERM}, (rc, res, err)
    assert [r["hook"] for r in recs] == ["bprm_check_security"], recs
    assert recs[0]["path"] is None      # an anonymous memfd inode, in no allow set
    lsm.assert_path(recs)


def test_process_outside_the_cgroup_is_unaffected(lsm):
    w = lsm.world
    before = len(lsm.denials)
    rc, res, err, _ = lsm.attempt("exec", w.copy, inside=False)
    assert (rc, res) == (0, None), err
    rc, res, err, _ = lsm.attempt("open", w.secret, inside=False)
    assert res["ret"] >= 0, (res, err)
    rc, res, err, _ = lsm.attempt("connect", w.denied_port, inside=False)
    assert res == {"op": "connect", "ret": 0, "errno": 0}, (res, err)
    rc, res, err, _ = lsm.attempt("exec", "/lib64/ld-linux-x86-64.so.2", w.copy, inside=False)
    assert rc == 0, err
    rc, res, err, _ = lsm.attempt("mprotect", w.copy, inside=False)
    assert res["ret"] == 0, (res, err)
    # this test process itself (outside too) reads the secret
    with open(w.secret) as f:
        assert f.read() == "s3cr3t\n"
    lsm.guard.poll(200)
    assert lsm.denials[before:] == []
    assert stat.S_ISREG(os.stat(w.copy).st_mode)
    lsm.assert_path()


def test_every_denial_was_counted_and_delivered(lsm):
    c = lsm.guard.counters()
    assert c["lost"] == 0 and c["errors"] == 0, c
    assert c["denials"] == c["received"] == len(lsm.denials), (c, len(lsm.denials))
    lsm.assert_path(lsm.denials)


def test_a_released_guard_is_reused_with_the_new_rules_only(lsm):
    """What the daemon does between two sandboxed runs: release() detaches
    and forgets the rules, the programs stay loaded, and the next use() +
    open() enforces its own rules only. Runs last: it re-points the
    session's guard."""
    w, g = lsm.world, lsm.guard
    loaded = dict(g.prog_fds)
    g.release()
    assert g.program_names() == [] and g.cgroups == []
    for m in (b"lsm_watched", b"lsm_exec_allow", b"lsm_file_deny"):
        assert list(g.bpf[m].keys()) == [], f"{m} kept the first rules"
    rc, res, err, recs = lsm.attempt("exec", w.copy)          # nothing enforced now
    assert (rc, res, recs) == (0, None, []), err
    # the new rules allow the copy (not bin/), deny the public file (not the
    # secret), and scope signals to the cgroup
    g.use([TRUE, LDSO, LIBC, w.copy], [w.public], None, True).open(lsm.cgroup, lsm.denials.append)
    assert g.prog_fds["aw_lsm_exec"] == loaded["aw_lsm_exec"], "the programs were loaded again"
    assert g.program_names() == ["aw_lsm_exec", "aw_lsm_kill", "aw_lsm_mmap", "aw_lsm_mprotect",
                                 "aw_lsm_open"]
    rc, res, err, recs = lsm.attempt("exec", w.copy)
    assert (rc, res, recs) == (0, None, []), err
    rc, res, err, recs = lsm.attempt("exec", w.tool)
    assert res == {"op": "exec", "ret": -1, "errno": errno.EPERM} and len(recs) == 1, (res, err, recs)
    rc, res, err, recs = lsm.attempt("open", w.secret)
    assert res["ret"] >= 0 and recs == [], (res, err)
    rc, res, err, recs = lsm.attempt("open", w.public)
    assert res == {"op": "open", "ret": -1, "errno": errno.EPERM} and len(recs) == 1, (res, err)
    # a signal within the cgroup is allowed; one to a process outside (this
    # test's own child) is refused, and the child lives on
    rc, res, err, recs = lsm.attempt("kill", "self", 0)
    assert res == {"op": "kill", "ret": 0, "errno": 0} and recs == [], (res, err)
    outside = subprocess.Popen(["sleep", "60"])
    try:
        rc, res, err, recs = lsm.attempt("kill", outside.pid, 15)
        assert res == {"op": "kill", "ret": -1, "errno": errno.EPERM}, (res, err)
        assert [(r["rule"], r["target_pid"], r["signal"]) for r in recs] == \
            [("signal-outside-run", outside.pid, 15)], recs
        assert outside.poll() is None
    finally:
        outside.kill()
        outside.wait()
    c = g.counters()
    assert (c["denials"], c["received"], c["lost"]) == (3, 3, 0), c
    lsm.assert_path(recs)
