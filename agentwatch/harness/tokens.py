"""Ed25519 scope tokens: a run lets another run call one tool, with some
paths and arguments, for a while, a number of times.

A token is ``aw1.<claims>.<signature>``: the claims are RFC 8785 JSON,
base64url without padding, and the Ed25519 signature covers the bytes
``aw1.<claims>``. Tokens can be attenuated (a child token narrower than its
parent: same or smaller scope, earlier expiry, fewer uses), never widened.

This module signs, verifies and checks a call against a token's claims.
Revocation and replay (nonces, use counts) are the broker store's.
"""
import base64
import binascii
import fnmatch
import hashlib
import json
import os
import re
import secrets
import tempfile

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentwatch.policy.matchers import Glob, check_glob, covers
from .a2a import canonical_json

REASONS = ("invalid", "expired", "widened", "replayed", "exhausted", "holder", "revoked", "scope")
PREFIX = "aw1."
MAX_TOKEN_CHARS = 8192
MAX_CHAIN_DEPTH = 8
MAX_USES = 1000
CLAIM_KEYS = ("v", "jti", "iss", "sub", "scope", "iat", "exp", "uses", "parent", "root", "depth")
_TOOL = re.compile(r"[A-Za-z0-9_.-]{1,63}")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_WILDCARDS = frozenset("*?[")


class TokenError(Exception):
    """A token refused, with a reason from REASONS (its rule names it)."""

    def __init__(self, reason, message):
        if reason not in REASONS:
            raise ValueError(f"unknown token error reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def rule(self):
        return f"protocol.token_{self.reason}"


# ---------------------------------------------------------------- encoding

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text, what):
    """Decode base64url without padding; TokenError("invalid") unless it is
    exactly the form b64url() writes (one encoding per token)."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError("invalid", f"token {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("invalid", f"token {what} is not base64url") from None
    if b64url(data) != text:
        raise TokenError("invalid", f"token {what} is not in canonical base64url")
    return data


def _split(token):
    """(signed bytes, claims bytes, signature bytes) of a well-formed token."""
    if not isinstance(token, str):
        raise TokenError("invalid", f"a token is a string, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenError("invalid", f"token is {len(token)} characters, more than {MAX_TOKEN_CHARS}")
    if not token.startswith(PREFIX):
        raise TokenError("invalid", f"not an agentwatch token (it does not start with {PREFIX!r})")
    pieces = token[len(PREFIX):].split(".")
    if len(pieces) != 2:
        raise TokenError("invalid", "a token has three dot-separated pieces: aw1.<claims>.<signature>")
    payload, sig = pieces
    return (PREFIX + payload).encode("ascii"), unb64url(payload, "claims"), unb64url(sig, "signature")


def _claims(raw):
    try:
        claims = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TokenError("invalid", "token claims are not JSON") from None
    if not isinstance(claims, dict):
        raise TokenError("invalid", "token claims are not a JSON object")
    missing = [k for k in CLAIM_KEYS if k not in claims]
    if missing:
        raise TokenError("invalid", f"token claims lack {', '.join(missing)}")
    if claims["v"] != 1:
        raise TokenError("invalid", f"token version {claims['v']!r} is not supported (this agentwatch reads 1)")
    return claims


def _verify(public_key, token):
    signed, raw, sig = _split(token)
    try:
        public_key.verify(sig, signed)
    except InvalidSignature:
        raise TokenError("invalid", "token signature does not verify (tampered, or signed by another key)") from None
    return _claims(raw)


def verify_with(public_hex, token):
    """The claims of a token signed by the key public_hex (raw Ed25519, hex),
    checked offline. Does not check time or holder."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
    except (TypeError, ValueError):
        raise ValueError(f"{public_hex!r} is not an Ed25519 public key (64 hex digits)") from None
    return _verify(key, token)


def decode_unverified(token):
    """The claims of a token WITHOUT checking its signature: for display."""
    return _claims(_split(token)[1])


# ---------------------------------------------------------------- signer

class Signer:
    """The broker's Ed25519 key: signs and verifies tokens."""

    def __init__(self, private_key):
        self._key = private_key
        self.public_key = private_key.public_key()
        raw = self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_hex = raw.hex()
        self.fingerprint = "ed25519:" + hashlib.sha256(raw).hexdigest()

    @classmethod
    def load_or_create(cls, path):
        """Load the PEM (PKCS8) key at path, or create it (mode 0600, its
        directory 0700). A key readable by others is refused."""
        path = os.path.abspath(path)
        if not os.path.exists(path):
            cls._create(path)
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise PermissionError(f"{path}: the token signing key is readable by other users "
                                  f"(mode {st.st_mode & 0o777:o}); chmod 600 it")
        with open(path, "rb") as f:
            data = f.read()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not an unencrypted PEM private key ({e})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: the token signing key must be Ed25519, not {type(key).__name__}")
        return cls(key)

    @staticmethod
    def _create(path):
        """Write a new key to a private temporary file, then link it into
        place: a concurrent creator's key wins cleanly, never half-written."""
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".key-")     # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)

    def sign(self, claims):
        payload = b64url(canonical_json(claims))
        sig = self._key.sign((PREFIX + payload).encode("ascii"))
        return f"{PREFIX}{payload}.{b64url(sig)}"

    def verify(self, token):
        """The claims of a token this key signed; TokenError("invalid") for
        anything malformed. Does not check time or holder."""
        return _verify(self.public_key, token)


# ---------------------------------------------------------------- claims

def _number(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} must be a number, not {x!r}")
    return x


def _uses(uses):
    if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_USES:
        raise ValueError(f"uses must be an integer from 1 to {MAX_USES}, not {uses!r}")
    return uses


def _party(d, keys, what):
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be an object with {', '.join(keys)}")
    for k in keys:
        if not isinstance(d.get(k), str) or not d[k]:
            raise ValueError(f"{what}.{k} must be a non-empty string, not {d.get(k)!r}")
    return {k: d[k] for k in keys}


def new_claims(*, issuer, holder, scope, ttl_s, uses, now, max_ttl_s=3600):
    """Claims of a new root token from issuer {"run", "agent"} to holder
    {"run", "agent", "cgroup"}; ValueError for bad arguments."""
    ttl_s = _number(ttl_s, "ttl_s")
    if not 0 < ttl_s <= max_ttl_s:
        raise ValueError(f"ttl_s must be more than 0 and at most {max_ttl_s} seconds, not {ttl_s}")
    jti = secrets.token_hex(16)
    now = _number(now, "now")
    return {"v": 1, "jti": jti,
            "iss": _party(issuer, ("run", "agent"), "issuer"),
            "sub": _party(holder, ("run", "agent", "cgroup"), "holder"),
            "scope": normalise_scope(scope),
            "iat": now, "exp": now + ttl_s, "uses": _uses(uses),
            "parent": None, "root": jti, "depth": 0}


def attenuate(parent, *, scope=None, ttl_s=None, uses=None, now):
    """Claims of a child token, never wider than parent: scope covered by
    the parent's, expiry no later, uses no more. TokenError("widened") if it
    would be wider, TokenError("expired") if the parent has expired."""
    if now >= parent["exp"]:
        raise TokenError("expired", f"token {parent['jti']} expired; it cannot be attenuated")
    depth = parent["depth"] + 1
    if depth > MAX_CHAIN_DEPTH:
        raise TokenError("widened", f"too deep: a token chain has at most {MAX_CHAIN_DEPTH} attenuations")
    child_scope = parent["scope"] if scope is None else normalise_scope(scope)
    if not scope_covers(parent["scope"], child_scope):
        raise TokenError("widened", f"scope {json.dumps(child_scope)} is not within the parent's "
                                    f"{json.dumps(parent['scope'])}")
    exp = parent["exp"]
    if ttl_s is not None:
        ttl_s = _number(ttl_s, "ttl_s")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be more than 0, not {ttl_s}")
        exp = now + ttl_s
        if exp > parent["exp"]:
            raise TokenError("widened", f"later expiry than the parent's: {ttl_s} s from now is after "
                                        f"the parent expires ({parent['exp'] - now:.0f} s from now)")
    child_uses = parent["uses"] if uses is None else _uses(uses)
    if child_uses > parent["uses"]:
        raise TokenError("widened", f"more uses ({child_uses}) than the parent's {parent['uses']}")
    return {"v": 1, "jti": secrets.token_hex(16),
            "iss": dict(parent["iss"]), "sub": dict(parent["sub"]),
            "scope": child_scope, "iat": now, "exp": exp, "uses": child_uses,
            "parent": parent["jti"], "root": parent["root"], "depth": depth}


# ---------------------------------------------------------------- scope

def normalise_scope(scope):
    """{"tool", "paths", "args"} with defaults; ValueError on bad input.
    Path globs are absolute (no variables: a token names real paths)."""
    if not isinstance(scope, dict):
        raise ValueError(f"scope must be an object with tool, paths, args, not {scope!r}")
    unknown = sorted(set(scope) - {"tool", "paths", "args"})
    if unknown:
        raise ValueError(f"scope: unknown key(s) {', '.join(unknown)} (known: tool, paths, args)")
    tool = scope.get("tool")
    if not isinstance(tool, str) or not _TOOL.fullmatch(tool):
        raise ValueError(f"scope.tool must be a tool name ([A-Za-z0-9_.-], 1 to 63 characters), not {tool!r}")
    out = {"tool": tool, "paths": [], "args": []}
    for key in ("paths", "args"):
        items = scope.get(key, [])
        if not isinstance(items, list):
            raise ValueError(f"scope.{key} must be a list of strings, not {items!r}")
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item:
                raise ValueError(f"scope.{key}[{i}] must be a non-empty string, not {item!r}")
            if key == "paths":
                if not item.startswith("/"):
                    raise ValueError(f"scope.paths[{i}] {item!r} must be an absolute path glob (start with '/')")
                errors, _ = check_glob(item)
                if errors:
                    raise ValueError(f"scope.paths[{i}]: {errors[0]}")
            out[key].append(item)
    return out


def _arg_covered(inner, outer):
    return inner == outer or outer == "*" or (
        not (set(inner) & _WILDCARDS) and fnmatch.fnmatchcase(inner, outer))


def scope_covers(outer, inner):
    """True when everything inner allows, outer allows too."""
    if inner["tool"] != outer["tool"]:
        return False
    if not all(any(covers(p, q) for q in outer.get("paths", [])) for p in inner.get("paths", [])):
        return False
    return all(any(_arg_covered(a, b) for b in outer.get("args", [])) for a in inner.get("args", []))


def check_call(claims, *, holder_run, holder_cgroup, now, tool, args):
    """Refuse (TokenError) a call of tool with args under claims: expired,
    presented by another run or cgroup than the holder, or out of scope."""
    if now >= claims["exp"]:
        raise TokenError("expired", f"token {claims['jti']} expired {now - claims['exp']:.0f} s ago")
    sub = claims["sub"]
    if sub.get("run") != holder_run or sub.get("cgroup") != holder_cgroup:
        raise TokenError("holder", f"token {claims['jti']} is held by run {sub.get('run')!r} "
                                   f"(cgroup {sub.get('cgroup')!r}), not by run {holder_run!r} "
                                   f"(cgroup {holder_cgroup!r})")
    scope = claims["scope"]
    if tool != scope["tool"]:
        raise TokenError("scope", f"token allows tool {scope['tool']!r}, not {tool!r}")
    if not isinstance(args, (list, tuple)):
        raise TokenError("scope", f"arguments must be a list of strings, not {type(args).__name__}")
    for i, arg in enumerate(args):
        _check_arg(i, arg, scope)


def _check_arg(i, arg, scope):
    what = f"argument {i} {arg!r}"
    if not isinstance(arg, str):
        raise TokenError("scope", f"argument {i} must be a string, not {type(arg).__name__}")
    if "/" in arg:
        if ".." in arg.split("/"):
            raise TokenError("scope", f"{what} contains '..': paths in a token call must be written without it")
        path = os.path.normpath(arg)
        if not path.startswith("/"):
            raise TokenError("scope", f"{what} looks like a path (it contains '/') but is not absolute")
        path = "/" + path.lstrip("/")                  # normpath keeps a leading '//'
        if not any(Glob(p).matches(path) for p in scope.get("paths", [])):
            allowed = ", ".join(scope.get("paths", [])) or "no paths"
            raise TokenError("scope", f"{what} is a path outside the token's scope (allowed: {allowed})")
        return
    if any(fnmatch.fnmatchcase(arg, a) for a in scope.get("args", [])):
        return
    if arg.startswith("-"):
        raise TokenError("scope", f"{what} is an option the token's scope does not allow")
    allowed = ", ".join(scope.get("args", [])) or "none"
    raise TokenError("scope", f"{what} is not allowed by the token's scope (allowed arguments: {allowed})")
