"""engine/refusals.py: which layer of the sandbox answered a refusal, from
the errno and the run's plan (pure: a plan built by hand, no kernel)."""
import stat
from types import SimpleNamespace

from agentwatch.engine.refusals import Refusals, rights_for, rule_for
from agentwatch.sandbox import landlock as L

LL = L.LandlockPlan(abi=6, handled_fs=L.FS_BY_ABI[6], handled_net=L.NET_CONNECT_TCP, scoped=1,
                    paths=[("/usr", L.EXEC), ("/w", L.WRITE), ("/r", L.READ)])
PLAN = SimpleNamespace(landlock=LL, limits={"pids": 8},
                       masks=[("/w", "noexec"), ("/w/.git", "pin"), ("/w/.git/hooks", "dir"),
                              ("/w/policy.yaml", "ro")], seccomp=object(), egress=None, lsm=None)


def test_landlock_refusals_are_landlock_and_mode_refusals_are_not():
    r = Refusals(PLAN)
    assert r.file_layer("EACCES", "/etc/shadow", {"read"}, "open") == "landlock"
    assert r.file_layer("EACCES", "/r/f", {"write"}, "open") == "landlock"
    assert r.file_layer("EXDEV", "/r/f", {"link"}, "link") == "landlock"
    # granted by Landlock: the file's mode said no (running as another user)
    assert r.file_layer("EACCES", "/r/f", {"read"}, "open") == "dac"
    assert r.file_layer("EACCES", "/w/f", {"create"}, "mknod", stat.S_IFIFO | 0o644) == "dac"
    # device nodes are never granted
    assert r.file_layer("EACCES", "/w/null", {"create"}, "mknod", stat.S_IFCHR | 0o666) == "landlock"


def test_mount_namespace_refusals():
    r = Refusals(PLAN)
    assert r.file_layer("EBUSY", "/w/.git", {"rename"}, "rename") == "mount"
    assert r.mask_rule("/w/.git")[0] == "filesystem.deny"
    assert r.file_layer("EACCES", "/w/.git/hooks/x", {"create", "write"}, "open") == "mount"
    assert r.file_layer("EROFS", "/w/policy.yaml", {"write"}, "open") == "mount"
    assert r.mask_rule("/w/policy.yaml")[0] == "identity.policy_write"
    assert r.file_layer("EACCES", "/w/tool", {"exec"}, "exec") == "mount"     # noexec, not landlock
    assert r.mask_rule("/w/tool", exec_=True)[0] == "filesystem.exec"
    # a rename onto the read-only bound policy file (EBUSY) is that bind's, not noexec's
    assert r.file_layer("EBUSY", "/w/policy.yaml", {"create"}, "rename") == "mount"
    assert r.mask_rule("/w/policy.yaml")[0] == "identity.policy_write"
    assert r.file_layer("EBUSY", "/w/other", {"rename"}, "rename") == "dac"
    # a host read-only filesystem is not the sandbox's
    assert r.file_layer("EROFS", "/r/f", {"write"}, "open") == "dac"


def test_no_plan_no_landlock():
    r = Refusals(None)
    assert r.landlock is None and not r.pids
    assert r.file_layer("EACCES", "/etc/shadow", {"read"}, "open") == "dac"


def test_rights_and_rules():
    assert rights_for({"read"}) == L.FS_READ_FILE
    assert rights_for({"delete"}, "rmdir") == L.FS_REMOVE_DIR
    assert rights_for({"create"}, "mknod", stat.S_IFBLK) == L.FS_MAKE_BLOCK
    assert rule_for({"read"}) == "filesystem.read"
    assert rule_for({"exec"}) == "filesystem.exec"
    assert rule_for({"create"}, "mknod") == "filesystem.write"
