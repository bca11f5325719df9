"""Landlock planning without syscalls: glob translation and per-ABI plans.

plan() is always given an explicit abi here, so nothing touches Landlock;
it only stats paths under tmp_path.
"""
import struct

import pytest

from agentwatch.sandbox import landlock as ll
from agentwatch.sandbox.landlock import LandlockRules, globs_to_paths, plan


# ---- globs_to_paths -------------------------------------------------------

@pytest.mark.parametrize("glob, path", [
    ("/usr/**", "/usr"),
    ("/usr/**/", "/usr"),
    ("/usr/**/**", "/usr"),
    ("/etc/hosts", "/etc/hosts"),
    ("/dev/null", "/dev/null"),
    ("/usr/lib/", "/usr/lib"),
    ("/usr//lib/./x", "/usr/lib/x"),
    ("/**", "/"),
])
def test_exact_translations(glob, path):
    assert globs_to_paths([glob]) == ([path], [])


@pytest.mark.parametrize("glob, path", [
    ("/home/u/*.txt", "/home/u"),
    ("/home/u/**/*.py", "/home/u"),
    ("/usr/lib/python3*/site-packages/**", "/usr/lib"),
    ("/srv/[ab]/x", "/srv"),
    ("/srv/{a,b}/**", "/srv"),
    ("/tmp/file?", "/tmp"),
])
def test_wildcards_widen_to_literal_prefix_and_say_so(glob, path):
    paths, notes = globs_to_paths([glob])
    assert paths == [path]
    assert notes == [f"'{glob}' widened to {path}"]


@pytest.mark.parametrize("glob", ["**/.env", "*", "relative/dir/**", "/*", "/*.txt", "/**/x"])
def test_inexpressible_globs_are_skipped_and_noted(glob):
    paths, notes = globs_to_paths([glob])
    assert paths == []
    assert len(notes) == 1 and f"'{glob}'" in notes[0]
    assert "cannot be expressed" in notes[0] and "skipped" in notes[0]


def test_dedup_and_drop_paths_beneath_others():
    paths, notes = globs_to_paths(["/usr/lib/**", "/etc/hosts", "/usr/**", "/usr/**",
                                   "/usr/share/*.txt", "/usrx/**", "/etc/**"])
    assert paths == ["/usr", "/usrx", "/etc"]        # /usrx is a sibling, not beneath /usr
    assert notes == ["'/usr/share/*.txt' widened to /usr/share"]


def test_root_covers_everything():
    assert globs_to_paths(["/etc/**", "/**", "/usr/bin"]) == (["/"], [])


def test_policy_example():
    """The read list of policies/coding-agent.yaml with variables expanded."""
    globs = ["/usr/**", "/etc/**", "/lib/**", "/home/u/w/**", "/tmp/**", "/home/u/**",
             "**/.env"]
    paths, notes = globs_to_paths(globs)
    assert paths == ["/usr", "/etc", "/lib", "/tmp", "/home/u"]   # order of first appearance
    assert len(notes) == 1 and "**/.env" in notes[0]


# ---- plan() with a given ABI ----------------------------------------------

@pytest.fixture
def tree(tmp_path):
    for d in ("ro", "rw", "bin"):
        (tmp_path / d).mkdir()
    (tmp_path / "ro" / "f").write_text("x")
    return tmp_path


def rules(t, **kw):
    return LandlockRules(read=[f"{t}/ro"], write=[f"{t}/rw"], exec=[f"{t}/bin"], **kw)


def access_of(p):
    return dict(p.paths)


def test_abi7_full_plan(tree):
    p = plan(rules(tree, tcp_connect=[443, 80], tcp_bind=[8080, 443],
                   scope_abstract_unix=True, scope_signals=True), abi=7)
    assert p.downgrades == [] and p.missing == []
    assert p.handled_fs == (1 << 16) - 1           # every fs right, MAKE_CHAR/BLOCK included
    assert p.handled_net == ll.NET_BIND_TCP | ll.NET_CONNECT_TCP
    assert p.scoped == ll.SCOPE_ABSTRACT_UNIX_SOCKET | ll.SCOPE_SIGNAL
    assert p.ports == [(80, ll.NET_CONNECT_TCP), (443, ll.NET_CONNECT_TCP | ll.NET_BIND_TCP),
                       (8080, ll.NET_BIND_TCP)]
    a = access_of(p)
    assert a[f"{tree}/ro"] == ll.FS_READ_FILE | ll.FS_READ_DIR
    assert a[f"{tree}/bin"] == ll.FS_READ_FILE | ll.FS_READ_DIR | ll.FS_EXECUTE
    w = a[f"{tree}/rw"]
    assert w & ll.FS_EXECUTE == 0, "write paths must not be executable (W^X)"
    assert w & (ll.FS_MAKE_CHAR | ll.FS_MAKE_BLOCK) == 0
    for bit in (ll.FS_READ_FILE, ll.FS_WRITE_FILE, ll.FS_TRUNCATE, ll.FS_REFER, ll.FS_MAKE_REG,
                ll.FS_MAKE_DIR, ll.FS_MAKE_SYM, ll.FS_REMOVE_FILE, ll.FS_REMOVE_DIR):
        assert w & bit
    assert len(p.ruleset_attr()) == 24
    assert struct.unpack("=QQQ", p.ruleset_attr()) == (p.handled_fs, p.handled_net, p.scoped)


@pytest.mark.parametrize("abi, size", [(1, 8), (2, 8), (3, 8), (4, 16), (5, 16), (6, 24),
                                       (7, 24), (9, 24)])
def test_ruleset_attr_size_follows_abi(tree, abi, size):
    assert len(plan(rules(tree), abi=abi).ruleset_attr()) == size


def test_abi1_drops_and_names_what_it_cannot_enforce(tree):
    p = plan(rules(tree, tcp_connect=[443], tcp_bind=[], ioctl_dev=[f"{tree}/ro"],
                   scope_abstract_unix=True, scope_signals=True), abi=1)
    assert p.handled_fs == ll.FS_ABI1
    assert p.handled_net == 0 and p.ports == [] and p.scoped == 0
    text = "\n".join(p.downgrades)
    for words in ("REFER needs ABI 2", "TRUNCATE needs ABI 3", "IOCTL_DEV needs ABI 5",
                  "TCP connect rules need ABI 4", "TCP bind rules need ABI 4",
                  "abstract unix socket scoping needs ABI 6", "signal scoping needs ABI 6"):
        assert words in text
    assert f"{tree}/ro" in text                        # the ignored ioctl_dev path is named
    for _, access in p.paths:                          # nothing beyond what ABI 1 handles
        assert access & ~ll.FS_ABI1 == 0
    assert len(p.ruleset_attr()) == 8


def test_abi4_tcp_but_no_scopes(tree):
    p = plan(rules(tree, tcp_connect=[], scope_signals=True), abi=4)
    assert p.handled_net == ll.NET_CONNECT_TCP      # [] = no connect at all; bind untouched
    assert p.ports == []
    assert p.scoped == 0
    assert any("signal scoping needs ABI 6" in d for d in p.downgrades)
    assert any("IOCTL_DEV" in d for d in p.downgrades)


def test_unrequested_features_are_not_downgrades(tree):
    p = plan(rules(tree), abi=5)
    assert p.downgrades == []
    assert p.handled_net == 0 and p.scoped == 0


def test_abi0_plan_is_empty_and_says_so(tree):
    p = plan(rules(tree), abi=0)
    assert p.handled_fs == 0 and p.paths == []
    assert "unavailable" in p.downgrades[0]
    with pytest.raises(OSError, match="not supported"):
        ll.apply(p)


def test_missing_paths_listed_not_fatal(tree):
    p = plan(LandlockRules(read=[f"{tree}/ro", f"{tree}/nope", f"{tree}/ro/f/under-a-file"],
                           write=[], exec=[]), abi=7)
    assert p.missing == [f"{tree}/nope", f"{tree}/ro/f/under-a-file"]
    assert [path for path, _ in p.paths] == [f"{tree}/ro"]


def test_same_path_in_several_lists_is_one_rule_with_the_union(tree):
    d = f"{tree}/rw"
    p = plan(LandlockRules(read=[d], write=[d], exec=[d]), abi=7)
    assert p.paths == [(d, ll.WRITE | ll.EXEC)]


def test_file_rule_keeps_only_file_rights(tree):
    f = f"{tree}/ro/f"
    p = plan(LandlockRules(read=[], write=[f], exec=[f], ioctl_dev=[f]), abi=7)
    assert p.paths == [(f, ll.FS_READ_FILE | ll.FS_WRITE_FILE | ll.FS_TRUNCATE
                        | ll.FS_EXECUTE | ll.FS_IOCTL_DEV)]


def test_bad_port_rejected(tree):
    with pytest.raises(ValueError, match="70000"):
        plan(rules(tree, tcp_connect=[70000]), abi=7)


def test_describe_names_rights(tree):
    lines = plan(rules(tree, tcp_connect=[443]), abi=7).describe()
    assert lines[0].startswith("landlock ABI 7")
    assert f"  {tree}/ro: READ_FILE|READ_DIR" in lines
    assert "  tcp/443: CONNECT_TCP" in lines
