"""agentwatch.harness.a2a: JSON-RPC parsing, A2A messages, RFC 8785, facts, sender claims."""
import json
import math
import random
import struct

import pytest

from agentwatch.harness import a2a
from agentwatch.harness.a2a import RpcError, canonical_json, facts_digest, parse_message, parse_request


def req(**kw):
    d = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {}}
    d.update(kw)
    return json.dumps(d).encode()


def rpc_code(data):
    with pytest.raises(RpcError) as e:
        parse_request(data)
    return e.value.code, e.value.message


# ---------------------------------------------------------------- parse_request

def test_parse_request_ok():
    r = parse_request(req(id="abc"))
    assert r["method"] == "SendMessage" and r["id"] == "abc"
    assert parse_request(req(id=None))["id"] is None


@pytest.mark.parametrize("data", [b"{", b"not json", b'{"a": NaN}', b'{"a":1,"a":2}', b"\xff\xfe{}", b""])
def test_parse_error(data):
    assert rpc_code(data)[0] == a2a.PARSE_ERROR


def test_too_large():
    data = b'{"jsonrpc":"2.0","method":"x","params":{"p":"' + b"a" * a2a.MAX_REQUEST_BYTES + b'"}}'
    code, msg = rpc_code(data)
    assert code == a2a.TOO_LARGE and "limit" in msg


def test_deep_nesting_is_refused_without_recursion():
    code, msg = rpc_code(b"[" * 100000)
    assert code == a2a.INVALID_REQUEST and "deeper" in msg
    code, _ = rpc_code(b'{"jsonrpc":"2.0","method":"x","params":' + b'{"a":' * 40 + b"1" + b"}" * 41)
    assert code == a2a.INVALID_REQUEST


def test_brackets_inside_strings_do_not_count_as_depth():
    text = "[" * 50 + '\\"{'
    r = parse_request(req(params={"t": text}))
    assert r["params"]["t"] == text
    assert a2a.json_depth(b'{"a":[[1]]}') == 3


@pytest.mark.parametrize("body, words", [
    (b"[]", "batch"),
    (b'[{"jsonrpc":"2.0","method":"x"}]', "batch"),
    (b'"x"', "object"),
    (b'{"method":"x"}', "jsonrpc"),
    (b'{"jsonrpc":"1.0","method":"x"}', "jsonrpc"),
    (b'{"jsonrpc":"2.0","method":5}', "method"),
    (b'{"jsonrpc":"2.0"}', "method"),
    (b'{"jsonrpc":"2.0","method":"x","params":[1]}', "params"),
    (b'{"jsonrpc":"2.0","method":"x","id":1.5}', "id"),
    (b'{"jsonrpc":"2.0","method":"x","id":true}', "id"),
    (b'{"jsonrpc":"2.0","method":"x","id":{}}', "id"),
])
def test_invalid_request(body, words):
    code, msg = rpc_code(body)
    assert code == a2a.INVALID_REQUEST and words in msg


def test_responses():
    assert a2a.response(1, {"a": 1}) == {"jsonrpc": "2.0", "id": 1, "result": {"a": 1}}
    err = RpcError(a2a.TASK_NOT_FOUND, "no task t1", {"taskId": "t1"})
    assert a2a.error_response("x", err) == {"jsonrpc": "2.0", "id": "x", "error": {
        "code": -32001, "message": "no task t1", "data": {"taskId": "t1"}}}
    assert RpcError(a2a.INTERNAL_ERROR, "boom").to_dict() == {"code": -32603, "message": "boom"}


# ---------------------------------------------------------------- parse_message

def msg(**kw):
    d = {"messageId": "m1", "role": "ROLE_USER", "parts": [{"text": "hello"}]}
    d.update(kw)
    return d


def bad_message(obj):
    with pytest.raises(RpcError) as e:
        parse_message(obj)
    assert e.value.code == a2a.INVALID_PARAMS
    return e.value.message


def test_parse_message_normalises():
    m = parse_message(msg(role="agent"))
    assert m["role"] == "ROLE_AGENT" and m["taskId"] is None
    assert len(m["contextId"]) == 32
    assert parse_message(msg(role="user"))["role"] == "ROLE_USER"
    full = msg(contextId="c1", taskId="t1", metadata={"k": 1}, referenceTaskIds=["t0"],
               parts=[{"text": "a", "metadata": {"tag": "fact"}, "mediaType": "text/plain"},
                      {"data": {"x": [1, 2]}}, {"url": "https://e.com/f", "filename": "f"},
                      {"raw": "aGVsbG8=", "mediaType": "application/octet-stream"}])
    m = parse_message(full)
    assert m == full and m is not full
    m["parts"][1]["data"]["x"].append(3)
    assert full["parts"][1]["data"]["x"] == [1, 2]          # a copy


@pytest.mark.parametrize("obj, expected", [
    ([], "params.message: must be an object"),
    (msg(colour="red"), "params.message.colour: unknown field"),
    ({"role": "ROLE_USER", "parts": [{"text": "a"}]}, "params.message.messageId: is required"),
    (msg(messageId=""), "params.message.messageId: must be a non-empty string"),
    (msg(messageId="x" * 129), "params.message.messageId: is 129 characters"),
    (msg(messageId=5), "params.message.messageId: must be a non-empty string"),
    (msg(contextId=3), "params.message.contextId"),
    (msg(taskId=["t"]), "params.message.taskId"),
    (msg(role="ROLE_ADMIN"), "params.message.role: must be ROLE_USER or ROLE_AGENT"),
    (msg(role=None), "params.message.role"),
    (msg(parts=[]), "params.message.parts: must be a non-empty list"),
    (msg(parts={"text": "a"}), "params.message.parts: must be a non-empty list"),
    (msg(parts=[{"text": "a"}] * 65), "params.message.parts: has 65 parts"),
    (msg(parts=[{"text": "a"}, {"text": "b"}, {"text": "c", "colour": 1}]), "params.message.parts[2].colour: unknown field"),
    (msg(parts=[{"text": "a", "data": 1}]), "params.message.parts[0]: a part has exactly one of text, data, url, raw (found: text, data)"),
    (msg(parts=[{"metadata": {}}]), "params.message.parts[0]: a part has exactly one of text, data, url, raw (found: none)"),
    (msg(parts=["hi"]), "params.message.parts[0]: a part must be an object"),
    (msg(parts=[{"text": 5}]), "params.message.parts[0].text: must be a string"),
    (msg(parts=[{"raw": "not base64!"}]), "params.message.parts[0].raw: is not valid base64"),
    (msg(parts=[{"text": "a", "metadata": {"tag": "secret"}}]), 'params.message.parts[0].metadata.tag: must be "fact" or "context"'),
    (msg(parts=[{"text": "a", "metadata": []}]), "params.message.parts[0].metadata: must be an object"),
    (msg(parts=[{"text": "a", "mediaType": 1}]), "params.message.parts[0].mediaType: must be a string"),
    (msg(metadata="x"), "params.message.metadata: must be an object"),
    (msg(referenceTaskIds=["a", 1]), "params.message.referenceTaskIds[1]"),
    (msg(parts=[{"text": "\ud800", "metadata": {"tag": "fact"}}]), "params.message.parts[0]: a fact must be canonicalisable"),
])
def test_parse_message_errors_name_the_path(obj, expected):
    assert bad_message(obj).startswith(expected)


def test_parse_message_where():
    with pytest.raises(RpcError, match=r"^params\.request\.message\.x: unknown"):
        parse_message(msg(x=1), where="params.request.message")


# ---------------------------------------------------------------- RFC 8785

@pytest.mark.parametrize("value, text", [
    (0, "0"), (-0.0, "0"), (0.0, "0"), (1e21, "1e+21"), (1e-7, "1e-7"),
    (123456789012345680000, "123456789012345680000"), (123456789012345680000.0, "123456789012345680000"),
    (0.000001, "0.000001"), (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"),
    (-1.7976931348623157e308, "-1.7976931348623157e+308"), (9007199254740992, "9007199254740992"),
    (-9007199254740992, "-9007199254740992"), (295147905179352830000, "295147905179352830000"),
    (1e20, "100000000000000000000"), (333333333.3333333, "333333333.3333333"), (100.0, "100"),
    (-1.5, "-1.5"), (4.5, "4.5"), (0.002, "0.002"), (1e23, "1e+23"), (1.5e-7, "1.5e-7"),
    (2 ** 53 + 1, "9007199254740992"),                   # a double, rounded as JavaScript does
])
def test_rfc8785_numbers(value, text):
    assert canonical_json(value) == text.encode()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 10 ** 400, {1: 2}, {"a": {1, 2}}])
def test_rfc8785_rejects(bad):
    with pytest.raises(ValueError):
        canonical_json(bad)


def test_rfc8785_numbers_round_trip():
    rng = random.Random(8785)
    for _ in range(2000):
        x = struct.unpack("<d", rng.randbytes(8))[0]
        if math.isfinite(x):
            text = canonical_json(x).decode()
            assert float(text) == x and "E" not in text and not text.endswith(".0")


def test_rfc8785_strings():
    assert canonical_json("\u20ac$\u000f\nA'B\"\\\\\"/") == b'"\xe2\x82\xac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"'
    assert canonical_json("\b\f\r\t\x1f\x7f\u2028") == b'"\\b\\f\\r\\t\\u001f\x7f\xe2\x80\xa8"'
    assert canonical_json("é😀") == "\"é😀\"".encode()


def test_rfc8785_structures():
    assert canonical_json({"b": [1, True, None, {"z": 1, "a": "x"}], "a": False}) == \
        b'{"a":false,"b":[1,true,null,{"a":"x","z":1}]}'
    assert canonical_json([]) == b"[]" and canonical_json({}) == b"{}"


def test_rfc8785_key_order_is_by_utf16_code_units():
    # RFC 8785 3.2.3: by code points U+FB33 < U+1F600, by UTF-16 units D83D < FB33.
    obj = {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
           "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}
    keys = list(json.loads(canonical_json(obj)))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert sorted(obj) != keys                                   # code point order differs


def test_rfc8785_example_values():
    # RFC 8785 3.2.2 sample input and output
    obj = {"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
           "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"/",
           "literals": [None, True, False]}
    assert canonical_json(obj) == ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
                                   '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}').encode()


# ---------------------------------------------------------------- facts

FACTS = {"messageId": "m", "role": "ROLE_USER", "parts": [
    {"text": "ctx", "metadata": {"tag": "context"}},
    {"data": {"b": 1, "a": [1.0, "x"]}, "metadata": {"tag": "fact"}},
    {"text": "plain"},
    {"text": "the sky is blue", "metadata": {"tag": "fact", "source": "obs"}},
]}


def test_facts_in_order():
    fs = a2a.facts(FACTS)
    assert [p.get("text") for p in fs] == [None, "the sky is blue"]
    assert a2a.facts({"parts": [{"text": "a"}]}) == []
    assert facts_digest({"parts": [{"text": "a"}]}) is None


def test_facts_digest_is_stable_under_key_order_and_whitespace():
    d = facts_digest(FACTS)
    assert d.startswith("sha256:") and len(d) == 7 + 64
    text = json.dumps(FACTS, indent=3, sort_keys=True)
    assert facts_digest(json.loads(text)) == d
    reordered = json.loads(json.dumps(FACTS))
    reordered["parts"][1] = {"metadata": {"tag": "fact"}, "data": {"a": [1, "x"], "b": 1}}
    assert facts_digest(reordered) == d


def test_facts_digest_changes_with_any_fact_edit_not_with_context():
    d = facts_digest(FACTS)
    for edit in (lambda m: m["parts"][1]["data"].__setitem__("b", 2),
                 lambda m: m["parts"][3].__setitem__("text", "the sky is green"),
                 lambda m: m["parts"][3]["metadata"].__setitem__("source", "guess"),
                 lambda m: m["parts"].append({"text": "new", "metadata": {"tag": "fact"}}),
                 lambda m: m["parts"].pop(1)):
        m = json.loads(json.dumps(FACTS))
        edit(m)
        assert facts_digest(m) != d
    for edit in (lambda m: m["parts"][0].__setitem__("text", "other context"),
                 lambda m: m["parts"][2].__setitem__("text", "other"),
                 lambda m: m["parts"].append({"text": "more", "metadata": {"tag": "context"}}),
                 lambda m: m.__setitem__("messageId", "m2")):
        m = json.loads(json.dumps(FACTS))
        edit(m)
        assert facts_digest(m) == d


# ---------------------------------------------------------------- sender claims

ME = {"agent": "alice", "run_id": "run-1"}


@pytest.mark.parametrize("message, params", [
    ({}, {}),
    ({"metadata": {"sender": "alice"}}, {"sender": "run-1"}),
    ({"metadata": {"from": {"agent": "alice", "run_id": "run-1"}}}, {}),
    ({"metadata": {"from": {"agent": "alice"}}}, {"sender": {"run_id": "run-1"}}),
    ({"metadata": {"other": "bob"}}, {}),
])
def test_sender_claims_ok(message, params):
    assert a2a.check_sender_claims(message, params, ME) is None


@pytest.mark.parametrize("message, params, words", [
    ({}, {"sender": "bob"}, "params.sender claims sender \"bob\""),
    ({"metadata": {"sender": "bob"}}, {}, "metadata.sender"),
    ({"metadata": {"from": "run-2"}}, {}, "metadata.from"),
    ({"metadata": {"from": {"agent": "alice", "run_id": "run-2"}}}, {}, "metadata.from"),
    ({"metadata": {"from": {"name": "alice"}}}, {}, "metadata.from"),
    ({"metadata": {"sender": 7}}, {}, "metadata.sender"),
    ({"metadata": {"agentwatch": {"sender": ME}}}, {}, "metadata.agentwatch is set by the broker"),
    ({"metadata": {"agentwatch": None}}, {}, "metadata.agentwatch is set by the broker"),
])
def test_sender_claims_refused(message, params, words):
    claim = a2a.check_sender_claims(message, params, ME)
    assert claim and words in claim


def test_stamp_is_a_copy():
    m = parse_message(msg(metadata={"k": 1}))
    s = a2a.stamp(m, {"agent": "alice", "run_id": "run-1"}, "sha256:00")
    assert s["metadata"] == {"k": 1, "agentwatch": {"sender": {"agent": "alice", "run_id": "run-1"},
                                                     "facts_digest": "sha256:00"}}
    assert m["metadata"] == {"k": 1}
    assert a2a.stamp(parse_message(msg()), {}, None)["metadata"] == {"agentwatch": {"sender": {}, "facts_digest": None}}


def test_constants():
    assert len(a2a.TASK_STATES) == 8 and set(a2a.TERMINAL_STATES) <= set(a2a.TASK_STATES)
    assert a2a.ROLES == ("ROLE_USER", "ROLE_AGENT")
    codes = [a2a.PARSE_ERROR, a2a.INVALID_REQUEST, a2a.METHOD_NOT_FOUND, a2a.INVALID_PARAMS, a2a.INTERNAL_ERROR,
             a2a.TASK_NOT_FOUND, a2a.TASK_NOT_CANCELABLE, a2a.PERMISSION_DENIED, a2a.RATE_LIMITED, a2a.TOKEN_REFUSED,
             a2a.IDENTITY_MISMATCH, a2a.FACTS_CHANGED, a2a.TOO_LARGE, a2a.UNKNOWN_AGENT]
    assert len(set(codes)) == len(codes)
