"""A2A-shaped messages for the broker: JSON-RPC 2.0 requests, A2A v1.0
Messages and Parts, RFC 8785 canonical JSON, and the facts of a message.

A request is parsed with limits first (size, nesting depth, parts), so a
hostile client cannot make the broker recurse or allocate without bound.
A Message is validated strictly: unknown keys are refused with their path,
so a typo is an error, not a silently dropped field.

Facts are the parts a sender tags ``metadata.tag: "fact"``. Their digest is
over the RFC 8785 form, so it does not depend on key order or whitespace
and changes with any edit of a fact.
"""
import base64
import binascii
import copy
import hashlib
import json
import math
import os
import re
from decimal import Decimal

# JSON-RPC 2.0 codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# A2A's
TASK_NOT_FOUND = -32001
TASK_NOT_CANCELABLE = -32002
# agentwatch's
PERMISSION_DENIED = -32010
RATE_LIMITED = -32011
TOKEN_REFUSED = -32012
IDENTITY_MISMATCH = -32013
FACTS_CHANGED = -32014
TOO_LARGE = -32015
UNKNOWN_AGENT = -32016

MAX_REQUEST_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_PARTS = 64
MAX_ID_CHARS = 128

TASK_STATES = ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_INPUT_REQUIRED",
               "TASK_STATE_AUTH_REQUIRED", "TASK_STATE_COMPLETED", "TASK_STATE_CANCELED",
               "TASK_STATE_FAILED", "TASK_STATE_REJECTED")
TERMINAL_STATES = ("TASK_STATE_COMPLETED", "TASK_STATE_CANCELED", "TASK_STATE_FAILED",
                   "TASK_STATE_REJECTED")
ROLES = ("ROLE_USER", "ROLE_AGENT")
_ROLE_ALIASES = {"user": "ROLE_USER", "agent": "ROLE_AGENT"}
TAGS = ("fact", "context")


class RpcError(Exception):
    """A JSON-RPC error: code, message, data (dict or None)."""

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self):
        d = {"code": self.code, "message": self.message}
        if self.data is not None:
            d["data"] = self.data
        return d


# ---------------------------------------------------------------- JSON-RPC

# A JSON string (escapes included) or one bracket: what the depth scan needs.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def json_depth(data, limit=MAX_DEPTH):
    """The nesting depth of JSON bytes, counted without recursion (stops
    counting once past limit). Brackets inside strings do not count; the
    regex skips strings in C, so a 1 MiB request scans in milliseconds."""
    depth = deepest = 0
    for m in _TOKENS.finditer(data):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate key {k!r}")
        obj[k] = v
    return obj


def loads(text):
    """Strict JSON: no NaN/Infinity, no duplicate keys (two readers could
    take different values of a duplicated key)."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)


def parse_request(data):
    """One JSON-RPC 2.0 request object from bytes, checked; RpcError if not."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    data = bytes(data)
    if len(data) > MAX_REQUEST_BYTES:
        raise RpcError(TOO_LARGE, f"request is {len(data)} bytes, more than the limit of {MAX_REQUEST_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RpcError(PARSE_ERROR, f"request is not UTF-8 (byte {e.start})") from None
    # no deeper than its opening brackets: most requests have fewer than
    # the limit in all, and are not scanned (two counts in C)
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and json_depth(data) > MAX_DEPTH:
        raise RpcError(INVALID_REQUEST, f"request nests deeper than {MAX_DEPTH} levels")
    try:
        req = loads(text)
    except (ValueError, RecursionError) as e:
        raise RpcError(PARSE_ERROR, f"request is not valid JSON: {e}") from None
    if isinstance(req, list):
        raise RpcError(INVALID_REQUEST, "batch requests are not supported: send one request object at a time")
    if not isinstance(req, dict):
        raise RpcError(INVALID_REQUEST, f"request must be a JSON object, not {_kind(req)}")
    if req.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, 'request must have "jsonrpc": "2.0"')
    if "id" in req and not _is_id(req["id"]):
        raise RpcError(INVALID_REQUEST, f"id must be a string, an integer or null, not {_kind(req['id'])}")
    if not isinstance(req.get("method"), str):
        raise RpcError(INVALID_REQUEST, "method must be a string")
    if "params" in req and not isinstance(req["params"], dict):
        raise RpcError(INVALID_REQUEST, f"params must be an object, not {_kind(req['params'])}")
    return req


def _is_id(v):
    return v is None or isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _kind(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def response(id, result):
    return {"jsonrpc": "2.0", "id": id, "result": result}


def error_response(id, err):
    return {"jsonrpc": "2.0", "id": id, "error": err.to_dict()}


# ---------------------------------------------------------------- messages

_MESSAGE_KEYS = ("messageId", "contextId", "taskId", "role", "parts", "metadata",
                 "referenceTaskIds", "extensions")
_CONTENT_KEYS = ("text", "data", "url", "raw")
_PART_KEYS = _CONTENT_KEYS + ("metadata", "mediaType", "filename")


def _bad(path, what):
    return RpcError(INVALID_PARAMS, f"{path}: {what}")


def _refuse_unknown(obj, known, path):
    for k in obj:
        if k not in known:
            raise _bad(f"{path}.{k}", f"unknown field (known: {', '.join(known)})")


def new_id():
    """A fresh context or task id: 128 random bits as 32 hex digits (the
    shape of uuid4().hex, without building a UUID object per message)."""
    return os.urandom(16).hex()


def _id(value, path, required=True):
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(path, f"must be a non-empty string, not {_kind(value)}")
    if len(value) > MAX_ID_CHARS:
        raise _bad(path, f"is {len(value)} characters, more than {MAX_ID_CHARS}")
    return value


def _str_list(value, path):
    if not isinstance(value, list):
        raise _bad(path, f"must be a list of strings, not {_kind(value)}")
    for i, v in enumerate(value):
        _id(v, f"{path}[{i}]")
    return list(value)


def _metadata(value, path):
    if not isinstance(value, dict):
        raise _bad(path, f"must be an object, not {_kind(value)}")
    return copy.deepcopy(value)


def parse_part(obj, path):
    """One A2A Part: exactly one of text / data / url / raw, plus optional
    metadata, mediaType, filename. Returns a normalised copy."""
    if not isinstance(obj, dict):
        raise _bad(path, f"a part must be an object, not {_kind(obj)}")
    _refuse_unknown(obj, _PART_KEYS, path)
    content = [k for k in _CONTENT_KEYS if k in obj]
    if len(content) != 1:
        found = ", ".join(content) if content else "none"
        raise _bad(path, f"a part has exactly one of text, data, url, raw (found: {found})")
    kind = content[0]
    value = obj[kind]
    if kind in ("text", "url", "raw") and not isinstance(value, str):
        raise _bad(f"{path}.{kind}", f"must be a string, not {_kind(value)}")
    if kind == "raw":
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{path}.raw", "is not valid base64") from None
    part = {kind: copy.deepcopy(value)}
    for k in ("mediaType", "filename"):
        if k in obj:
            if not isinstance(obj[k], str):
                raise _bad(f"{path}.{k}", f"must be a string, not {_kind(obj[k])}")
            part[k] = obj[k]
    if "metadata" in obj:
        meta = _metadata(obj["metadata"], f"{path}.metadata")
        if "tag" in meta and meta["tag"] not in TAGS:
            raise _bad(f"{path}.metadata.tag", f'must be "fact" or "context", not {json.dumps(meta["tag"])}')
        part["metadata"] = meta
    return part


def parse_message(obj, where="params.message"):
    """Validate and normalise an A2A Message; RpcError(INVALID_PARAMS) naming
    the path of the first problem. Returns a new dict (contextId generated
    when missing, role as ROLE_*, taskId None when missing)."""
    if not isinstance(obj, dict):
        raise _bad(where, f"must be an object, not {_kind(obj)}")
    _refuse_unknown(obj, _MESSAGE_KEYS, where)
    if "messageId" not in obj:
        raise _bad(f"{where}.messageId", "is required")
    msg = {"messageId": _id(obj["messageId"], f"{where}.messageId")}
    context = obj.get("contextId")
    msg["contextId"] = new_id() if context is None else _id(context, f"{where}.contextId")
    msg["taskId"] = _id(obj.get("taskId"), f"{where}.taskId", required=False)
    role = obj.get("role")
    role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise _bad(f"{where}.role", f"must be ROLE_USER or ROLE_AGENT, not {json.dumps(obj.get('role'))}")
    msg["role"] = role
    parts = obj.get("parts")
    if not isinstance(parts, list) or not parts:
        raise _bad(f"{where}.parts", "must be a non-empty list of parts")
    if len(parts) > MAX_PARTS:
        raise _bad(f"{where}.parts", f"has {len(parts)} parts, more than {MAX_PARTS}")
    msg["parts"] = [parse_part(p, f"{where}.parts[{i}]") for i, p in enumerate(parts)]
    if "metadata" in obj:
        msg["metadata"] = _metadata(obj["metadata"], f"{where}.metadata")
    for k in ("referenceTaskIds", "extensions"):
        if k in obj:
            msg[k] = _str_list(obj[k], f"{where}.{k}")
    for i, part in enumerate(msg["parts"]):
        if _is_fact(part):
            try:
                canonical_json(part)
            except ValueError as e:
                raise _bad(f"{where}.parts[{i}]", f"a fact must be canonicalisable JSON: {e}") from None
    return msg


# ---------------------------------------------------------------- RFC 8785

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _string(s):
    def esc(m):
        c = m.group()
        return _ESCAPES.get(c) or f"\\u{ord(c):04x}"
    return '"' + _NEEDS_ESCAPE.sub(esc, s) + '"'


def _number(x):
    """ECMAScript Number.prototype.toString of a double (RFC 8785 3.2.2.3)."""
    if isinstance(x, int):
        if abs(x) < 2 ** 53:
            return str(x)
        try:
            x = float(x)                    # JSON numbers are doubles: round as JavaScript does
        except OverflowError:
            raise ValueError(f"an integer of {x.bit_length()} bits is too large for a JSON number") from None
    if math.isnan(x) or math.isinf(x):
        raise ValueError(f"{x} is not allowed in JSON")
    if x == 0:
        return "0"                          # -0 too
    sign = "-" if x < 0 else ""
    d = Decimal(repr(abs(x)))                   # repr: the shortest digits that round-trip
    digits = "".join(map(str, d.as_tuple().digits)).rstrip("0")
    k = len(digits)
    n = d.adjusted() + 1                        # x = 0.<digits> * 10**n
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * -n + digits
    else:
        e = n - 1
        mant = digits if k == 1 else digits[0] + "." + digits[1:]
        out = f"{mant}e{'+' if e >= 0 else '-'}{abs(e)}"
    return sign + out


def _canon(obj, out):
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, (int, float)):
        out.append(_number(obj))
    elif isinstance(obj, str):
        out.append(_string(obj))
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for i, v in enumerate(obj):
            if i:
                out.append(",")
            _canon(v, out)
        out.append("]")
    elif isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise ValueError(f"object key {k!r} is not a string")
        out.append("{")
        for i, k in enumerate(sorted(obj, key=lambda k: k.encode("utf-16-be", "surrogatepass"))):
            if i:
                out.append(",")
            out.append(_string(k))
            out.append(":")
            _canon(obj[k], out)
        out.append("}")
    else:
        raise ValueError(f"{type(obj).__name__} is not a JSON value")


def canonical_json(obj):
    """RFC 8785 (JCS) bytes of a JSON value: keys sorted by UTF-16 code
    units, no whitespace, ECMAScript string and number forms. ValueError for
    NaN, Infinity, non-JSON types and lone surrogates."""
    out = []
    _canon(obj, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"string has a lone surrogate (\\u{ord(e.object[e.start]):04x})") from None


# ---------------------------------------------------------------- facts

def _is_fact(part):
    meta = part.get("metadata") if isinstance(part, dict) else None
    return isinstance(meta, dict) and meta.get("tag") == "fact"


def facts(message):
    """The message's parts tagged metadata.tag == "fact", in order."""
    return [p for p in message.get("parts") or [] if _is_fact(p)]


def facts_digest(message):
    """"sha256:<hex>" of the canonical JSON of the message's facts; None
    when it has none."""
    fs = facts(message)
    if not fs:
        return None
    return "sha256:" + hashlib.sha256(canonical_json(fs)).hexdigest()


# ---------------------------------------------------------------- senders

def _claim_ok(value, attested):
    agent, run = attested.get("agent"), attested.get("run_id")
    if isinstance(value, str):
        return value in (agent, run)
    if isinstance(value, dict):
        named = [k for k in ("agent", "run_id") if k in value]
        return bool(named) and all(value[k] == (agent if k == "agent" else run) for k in named)
    return False


def check_sender_claims(message, params, attested):
    """A description of a sender claim (in params or the message metadata)
    that is not the attested sender ({"agent", "run_id"}), else None."""
    meta = message.get("metadata") if isinstance(message, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    if "agentwatch" in meta:
        return "metadata.agentwatch is set by the broker, not by senders"
    claims = []
    if isinstance(params, dict) and "sender" in params:
        claims.append(("params.sender", params["sender"]))
    for k in ("sender", "from"):
        if k in meta:
            claims.append((f"metadata.{k}", meta[k]))
    for where, value in claims:
        if not _claim_ok(value, attested):
            return (f"{where} claims sender {json.dumps(value, default=str)}, but the sender is "
                    f"agent {attested.get('agent')!r} (run {attested.get('run_id')!r})")
    return None


def stamp(message, sender, digest):
    """A copy of message with the broker's stamp in metadata.agentwatch."""
    out = copy.deepcopy(message)
    meta = out.get("metadata")
    out["metadata"] = dict(meta) if isinstance(meta, dict) else {}
    out["metadata"]["agentwatch"] = {"sender": copy.deepcopy(sender), "facts_digest": digest}
    return out
