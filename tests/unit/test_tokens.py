"""agentwatch.harness.tokens: signing, verification, attenuation and call checks."""
import json
import os
import stat

import pytest

from agentwatch.harness import tokens as t
from agentwatch.harness.tokens import TokenError

NOW = 1_700_000_000.0
ISSUER = {"run": "run-a", "agent": "alice"}
HOLDER = {"run": "run-b", "agent": "bob", "cgroup": "/agentwatch/run-b"}
SCOPE = {"tool": "cat", "paths": ["/work/**"], "args": ["-n", "--number"]}


@pytest.fixture
def signer(tmp_path):
    return t.Signer.load_or_create(tmp_path / "keys" / "broker.pem")


def claims(**kw):
    args = dict(issuer=ISSUER, holder=HOLDER, scope=SCOPE, ttl_s=600, uses=5, now=NOW)
    args.update(kw)
    return t.new_claims(**args)


def reason(fn, *a, **kw):
    with pytest.raises(TokenError) as e:
        fn(*a, **kw)
    assert e.value.rule == f"protocol.token_{e.value.reason}"
    return e.value.reason, str(e.value)


# ---------------------------------------------------------------- keys

def test_key_file_is_private_and_reloads(tmp_path):
    path = tmp_path / "keys" / "broker.pem"
    s1 = t.Signer.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    s2 = t.Signer.load_or_create(path)
    assert s1.public_hex == s2.public_hex and len(s1.public_hex) == 64
    assert s1.fingerprint.startswith("ed25519:") and len(s1.fingerprint) == 8 + 64
    assert [p.name for p in path.parent.iterdir()] == ["broker.pem"]       # no temporary left


def test_key_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "k.pem"
    t.Signer.load_or_create(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        t.Signer.load_or_create(path)


def test_key_that_is_not_pem_is_refused(tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(b"hello")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match="not an unencrypted PEM"):
        t.Signer.load_or_create(path)


# ---------------------------------------------------------------- sign / verify

def test_roundtrip(signer):
    c = claims()
    token = signer.sign(c)
    assert token.startswith("aw1.") and token.count(".") == 2
    assert signer.verify(token) == c
    assert t.verify_with(signer.public_hex, token) == c
    assert t.decode_unverified(token) == c


def test_new_claims_shape():
    c = claims()
    assert c == {"v": 1, "jti": c["jti"], "iss": ISSUER, "sub": HOLDER,
                 "scope": {"tool": "cat", "paths": ["/work/**"], "args": ["-n", "--number"]},
                 "iat": NOW, "exp": NOW + 600, "uses": 5, "parent": None, "root": c["jti"], "depth": 0}
    assert len(c["jti"]) == 32 and claims()["jti"] != c["jti"]


def test_tampered_payload_is_invalid(signer):
    token = signer.sign(claims())
    _, payload, sig = token.split(".")
    wider = t.decode_unverified(token)
    wider["scope"]["paths"] = ["/**"]
    forged = "aw1." + t.b64url(json.dumps(wider).encode()) + "." + sig
    assert reason(signer.verify, forged)[0] == "invalid"
    assert reason(t.verify_with, signer.public_hex, forged)[0] == "invalid"
    assert t.decode_unverified(forged)["scope"]["paths"] == ["/**"]     # readable, not trusted


def test_other_key_is_invalid(signer, tmp_path):
    other = t.Signer.load_or_create(tmp_path / "other.pem")
    token = other.sign(claims())
    r, msg = reason(signer.verify, token)
    assert r == "invalid" and "signature" in msg
    assert t.verify_with(other.public_hex, token)["sub"] == HOLDER


@pytest.mark.parametrize("token", [
    None, 5, "", "aw2.abc.def", "aw1.abc", "aw1.a.b.c", "aw1.!!!.abc", "aw1.abc.de=f",
    "aw1." + "a" * 9000 + ".b",
])
def test_malformed_is_invalid(signer, token):
    assert reason(signer.verify, token)[0] == "invalid"
    assert reason(t.decode_unverified, token)[0] == "invalid"


def test_signed_but_bad_claims_are_invalid(signer):
    for payload in (b"[1]", b"not json", json.dumps({"v": 1}).encode(),
                    json.dumps(dict(claims(), v=2)).encode()):
        p = t.b64url(payload)
        token = f"aw1.{p}.{t.b64url(signer._key.sign(('aw1.' + p).encode()))}"
        assert reason(signer.verify, token)[0] == "invalid"


def test_verify_with_bad_key():
    with pytest.raises(ValueError, match="Ed25519 public key"):
        t.verify_with("zz", "aw1.a.b")


def test_token_error_reasons():
    with pytest.raises(ValueError):
        TokenError("nope", "x")
    assert TokenError("holder", "x").rule == "protocol.token_holder"


# ---------------------------------------------------------------- new_claims errors

@pytest.mark.parametrize("kw, words", [
    ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": -1}, "ttl_s"), ({"ttl_s": 3601}, "at most 3600"),
    ({"ttl_s": "60"}, "ttl_s"), ({"uses": 0}, "uses"), ({"uses": 1001}, "uses"), ({"uses": True}, "uses"),
    ({"scope": {"tool": "cat", "colour": 1}}, "unknown key(s) colour"),
    ({"scope": {"paths": []}}, "scope.tool"), ({"scope": {"tool": "a b"}}, "scope.tool"),
    ({"scope": {"tool": "x" * 64}}, "scope.tool"),
    ({"scope": {"tool": "cat", "paths": "/w"}}, "scope.paths must be a list"),
    ({"scope": {"tool": "cat", "paths": ["work/**"]}}, "absolute"),
    ({"scope": {"tool": "cat", "paths": ["${HOME}/x"]}}, "absolute"),
    ({"scope": {"tool": "cat", "paths": ["/w/[a"]}}, "unbalanced"),
    ({"scope": {"tool": "cat", "args": [""]}}, "scope.args[0]"),
    ({"holder": {"run": "r", "agent": "b"}}, "holder.cgroup"),
])
def test_new_claims_refuses(kw, words):
    with pytest.raises(ValueError) as e:
        claims(**kw)
    assert words in str(e.value)


def test_max_ttl_is_a_parameter():
    assert claims(ttl_s=7200, max_ttl_s=7200)["exp"] == NOW + 7200


def test_normalise_scope_defaults():
    assert t.normalise_scope({"tool": "git.status"}) == {"tool": "git.status", "paths": [], "args": []}


# ---------------------------------------------------------------- attenuate

def test_attenuate_narrower():
    parent = claims()
    child = t.attenuate(parent, scope={"tool": "cat", "paths": ["/work/src/*.py"], "args": ["-n"]},
                        ttl_s=60, uses=2, now=NOW + 10)
    assert child["parent"] == parent["jti"] and child["root"] == parent["jti"] and child["depth"] == 1
    assert child["jti"] != parent["jti"] and child["iss"] == ISSUER and child["sub"] == HOLDER
    assert child["exp"] == NOW + 70 and child["uses"] == 2 and child["iat"] == NOW + 10
    grandchild = t.attenuate(child, now=NOW + 20)
    assert grandchild["root"] == parent["jti"] and grandchild["parent"] == child["jti"]
    assert grandchild["scope"] == child["scope"] and grandchild["exp"] == child["exp"] and grandchild["uses"] == 2


@pytest.mark.parametrize("kw, words", [
    ({"scope": {"tool": "rm", "paths": ["/work/**"]}}, "not within"),
    ({"scope": {"tool": "cat", "paths": ["/**"]}}, "not within"),
    ({"scope": {"tool": "cat", "paths": ["/etc/passwd"]}}, "not within"),
    ({"scope": {"tool": "cat", "args": ["-*"]}}, "not within"),
    ({"scope": {"tool": "cat", "args": ["-v"]}}, "not within"),
    ({"ttl_s": 601}, "later expiry"),
    ({"uses": 6}, "more uses"),
])
def test_attenuate_wider_is_refused(kw, words):
    r, msg = reason(t.attenuate, claims(), now=NOW, **kw)
    assert r == "widened" and words in msg


def test_attenuate_depth_limit():
    c = claims()
    for _ in range(t.MAX_CHAIN_DEPTH):
        c = t.attenuate(c, now=NOW)
    assert c["depth"] == 8
    r, msg = reason(t.attenuate, c, now=NOW)
    assert r == "widened" and "too deep" in msg


def test_attenuate_expired_parent():
    assert reason(t.attenuate, claims(), now=NOW + 600)[0] == "expired"


def test_scope_covers():
    outer = t.normalise_scope({"tool": "cat", "paths": ["/work/**", "/tmp/x"], "args": ["*"]})
    assert t.scope_covers(outer, t.normalise_scope({"tool": "cat", "paths": ["/work/a/**", "/tmp/x"], "args": ["-n", "-*"]}))
    assert t.scope_covers(outer, t.normalise_scope({"tool": "cat"}))
    assert not t.scope_covers(outer, t.normalise_scope({"tool": "cat", "paths": ["/tmp/y"]}))
    narrow = t.normalise_scope({"tool": "cat", "args": ["--level=*"]})
    assert t.scope_covers(narrow, t.normalise_scope({"tool": "cat", "args": ["--level=3"]}))
    assert not t.scope_covers(narrow, t.normalise_scope({"tool": "cat", "args": ["--level=[0-9]"]}))


# ---------------------------------------------------------------- check_call

def call(c, *args, run="run-b", cgroup="/agentwatch/run-b", now=NOW + 1, tool="cat"):
    return t.check_call(c, holder_run=run, holder_cgroup=cgroup, now=now, tool=tool, args=list(args))


def test_check_call_allowed():
    c = claims()
    call(c)
    call(c, "-n", "/work/a/b.txt", "/work", "--number", "/work//x/./y")


def test_check_call_expired():
    r, msg = reason(call, claims(), now=NOW + 600)
    assert r == "expired" and "expired" in msg


def test_check_call_other_holder():
    r, msg = reason(call, claims(), cgroup="/agentwatch/run-c")
    assert r == "holder" and "/agentwatch/run-c" in msg
    assert reason(call, claims(), run="run-c")[0] == "holder"


@pytest.mark.parametrize("args, words", [
    (["/etc/passwd"], "argument 0 '/etc/passwd' is a path outside"),
    (["-n", "/work/../etc/passwd"], "argument 1 '/work/../etc/passwd' contains '..'"),
    (["../work/x"], "contains '..'"),
    (["work/x"], "not absolute"),
    (["--output=/tmp/x"], "not absolute"),
    (["-v"], "argument 0 '-v' is an option"),
    (["--exec=rm"], "is an option"),
    (["notes.txt"], "argument 0 'notes.txt' is not allowed"),
    ([5], "argument 0 must be a string"),
])
def test_check_call_scope(args, words):
    r, msg = reason(call, claims(), *args)
    assert r == "scope" and words in msg


def test_check_call_wrong_tool():
    r, msg = reason(call, claims(), tool="rm")
    assert r == "scope" and "'rm'" in msg


def test_check_call_arg_globs():
    c = claims(scope={"tool": "grep", "args": ["-*", "pattern*"]})
    call(c, "-r", "pattern1", tool="grep")
    assert reason(call, c, "/work/x", tool="grep")[1].endswith("(allowed: no paths)")
