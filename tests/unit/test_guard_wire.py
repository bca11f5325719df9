"""agentwatch.guards.wire: the egress guard's parsers of untrusted first
bytes. Real ClientHellos come from Python's ssl module writing into memory
(no socket); odd ones are built by hand. Property tests check that no input
makes a parser raise, and that a prefix of a valid message is need_more."""
import ssl
import struct

import h11
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agentwatch.guards.wire import (MAX_HELLO, Head, Hello, http_error, looks_like_http, looks_like_tls,
                                    normalize_name, parse_client_hello, parse_http_head)

HELLO_STATUSES = {"ok", "need_more", "not_tls", "malformed"}
HEAD_STATUSES = {"ok", "need_more", "malformed"}


def check_hello(data):
    """parse_client_hello's result, checked to be one the parser meant to give
    (its catch-all for its own bugs says "parser error")."""
    h = parse_client_hello(data)
    assert h.status in HELLO_STATUSES and not h.reason.startswith("parser error"), h
    return h


def check_head(data, **kw):
    h = parse_http_head(data, **kw)
    assert h.status in HEAD_STATUSES and not h.reason.startswith("parser error"), h
    return h


def real_hello(server_hostname="allowed.test", alpn=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


HELLO = real_hello()
HELLO_ALPN = real_hello(alpn=["h2", "http/1.1"])
HELLO_NO_SNI = real_hello(server_hostname=None)


# ---- hand-built hellos ----

def ext(etype, body):
    return struct.pack("!HH", etype, len(body)) + body


def sni_ext(*names, name_type=0):
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*protos):
    entries = b"".join(bytes([len(p)]) + p for p in protos)
    return ext(16, struct.pack("!H", len(entries)) + entries)


def handshake(extensions=b"", ext_block=True, session_id=b"", suites=b"\x13\x01", comp=b"\x00"):
    body = (b"\x03\x03" + bytes(32) + bytes([len(session_id)]) + session_id
            + struct.pack("!H", len(suites)) + suites + bytes([len(comp)]) + comp)
    if ext_block:
        body += struct.pack("!H", len(extensions)) + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message, size=16384, rtype=0x16):
    out = b""
    for i in range(0, len(message), size):
        frag = message[i:i + size]
        out += bytes([rtype, 3, 1]) + struct.pack("!H", len(frag)) + frag
    return out


def hello_with(*exts):
    return records(handshake(b"".join(exts)))


# ---- TLS: real hellos ----

def test_real_hello_sni():
    h = parse_client_hello(HELLO)
    assert h == Hello("ok", sni="allowed.test", alpn=())
    assert h.ok


def test_real_hello_alpn():
    assert parse_client_hello(HELLO_ALPN) == Hello("ok", sni="allowed.test", alpn=("h2", "http/1.1"))


def test_real_hello_without_sni():
    assert parse_client_hello(HELLO_NO_SNI) == Hello("ok", sni=None, alpn=())


@pytest.mark.parametrize("hello", [HELLO, HELLO_ALPN, HELLO_NO_SNI])
def test_every_prefix_of_a_real_hello_is_need_more(hello):
    for n in range(len(hello)):
        h = parse_client_hello(hello[:n])
        assert h.status == "need_more", (n, h)
        assert n < h.needed <= len(hello), (n, h)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 50, 200])
def test_hello_split_over_records(size):
    message = HELLO_ALPN[5:]
    split = records(message, size)
    assert parse_client_hello(split) == parse_client_hello(HELLO_ALPN)
    for n in range(len(split)):
        h = parse_client_hello(split[:n])
        assert h.status == "need_more", (n, h)
        assert n < h.needed <= len(split), (n, h)


def test_bytes_after_the_hello_are_ignored():
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert parse_client_hello(HELLO + ccs + b"\x17\x03\x03" + bytes(20000)).sni == "allowed.test"


def test_other_record_between_fragments():
    message = HELLO[5:]
    data = records(message[:10]) + b"\x15\x03\x03\x00\x02\x02\x28" + records(message[10:])
    assert parse_client_hello(data) == Hello("malformed", reason="other record inside the hello")


# ---- TLS: not TLS, limits, lengths ----

@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x15\x03\x03", b"\x16\x02", b"\x16\x03\x05", b"\x00"])
def test_not_tls(data):
    assert parse_client_hello(data).status == "not_tls"


def test_empty_is_need_more():
    assert parse_client_hello(b"") == Hello("need_more", needed=5)


def test_huge_handshake_length_is_too_large():
    data = b"\x16\x03\x01\x00\x04\x01\xff\xff\xff"
    assert parse_client_hello(data) == Hello("malformed", reason="too large")


def test_hello_just_over_the_cap_is_too_large():
    # the handshake alone fills one full record: with two record headers it passes MAX_HELLO
    big = handshake(ext(0xfe00, bytes(16384)))
    assert len(big) > 16384
    data = records(big)
    assert len(data) > MAX_HELLO
    assert parse_client_hello(data) == Hello("malformed", reason="too large")
    assert parse_client_hello(data[:5000]) == Hello("malformed", reason="too large")
    # many small records: their headers count against the cap too
    assert parse_client_hello(records(handshake(ext(21, bytes(16000))), 100)) == Hello("malformed", reason="too large")


def test_largest_hello_in_one_record():
    message = handshake(sni_ext(b"big.test"))
    pad = 16384 - len(message) - 4
    message = handshake(sni_ext(b"big.test") + ext(21, bytes(pad)))
    assert len(message) == 16384
    assert parse_client_hello(records(message)) == Hello("ok", sni="big.test")


@pytest.mark.parametrize("header", [b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x40\x01"])
def test_bad_record_length(header):
    assert parse_client_hello(header + bytes(100)) == Hello("malformed", reason="bad record length")


def test_not_a_client_hello():
    assert parse_client_hello(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00").reason == "not a ClientHello"


def test_hello_without_extensions():
    assert parse_client_hello(records(handshake(ext_block=False))) == Hello("ok", sni=None, alpn=())


@pytest.mark.parametrize("message, reason", [
    (handshake(session_id=bytes(33)), "bad session_id"),
    (handshake(suites=b""), "bad cipher_suites"),
    (handshake(suites=b"\x13"), "bad cipher_suites"),
    (handshake(comp=b""), "bad compression_methods"),
    (handshake(sni_ext(b"a.test")) + b"x", None),                    # handshake length no longer matches
    (b"\x01\x00\x00\x05\x03\x03\x00\x00\x00", "truncated random"),
    (b"\x01\x00\x00\x02\x02\x00", "bad legacy_version"),
])
def test_bad_hello_bodies(message, reason):
    h = parse_client_hello(records(message))
    if reason is None:                       # the record is longer than the hello: the rest is ignored
        assert h.status == "ok"
    else:
        assert h == Hello("malformed", reason=reason)


def test_extension_lengths_are_checked():
    good = handshake(sni_ext(b"a.test"))
    # extensions block one byte longer than what follows
    bad = bytearray(good)
    ext_len_at = 4 + 2 + 32 + 1 + 2 + 2 + 1 + 1
    bad[ext_len_at:ext_len_at + 2] = struct.pack("!H", len(good) - ext_len_at - 2 + 1)
    assert parse_client_hello(records(bytes(bad))).status == "malformed"
    # extension data longer than the block
    assert parse_client_hello(records(handshake(b"\x00\x00\x00\x20abc"))).reason == "truncated extension"
    # server_name list length not matching its extension
    assert parse_client_hello(hello_with(ext(0, b"\x00\x10\x00\x00\x01a"))).status == "malformed"
    assert parse_client_hello(hello_with(ext(0, b""))).status == "malformed"
    assert parse_client_hello(hello_with(ext(0, b"\x00\x00"))).reason == "bad server_name"


# ---- TLS: server_name and ALPN ----

def test_sni_is_lowercased_without_trailing_dot():
    assert parse_client_hello(hello_with(sni_ext(b"API.Example.COM."))).sni == "api.example.com"


@pytest.mark.parametrize("name", [b"", b".", b"a..b", b"*.example.com", b"ex ample.com", b"a_b.test", b"x" * 64 + b".test",
                                  b".".join([b"a" * 63] * 4), b"caf\xc3\xa9.test", b"a.test\x00.evil", b"1.2.3.4",
                                  b"2130706433", b"evil.test/x"])
def test_implausible_server_names(name):
    assert parse_client_hello(hello_with(sni_ext(name))) == Hello("malformed", reason="bad server_name")


def test_longest_plausible_server_name():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    assert parse_client_hello(hello_with(sni_ext(name.encode()))).sni == name


def test_two_host_names_are_refused():
    assert parse_client_hello(hello_with(sni_ext(b"a.test", b"b.test"))).reason == "bad server_name"


def test_other_name_types_are_skipped():
    assert parse_client_hello(hello_with(sni_ext(b"whatever", name_type=7))) == Hello("ok", sni=None)


def test_duplicate_extensions_are_refused():
    h = parse_client_hello(hello_with(sni_ext(b"allowed.test"), sni_ext(b"forbidden.test")))
    assert h == Hello("malformed", reason="duplicate extension")


def test_alpn_parsing():
    assert parse_client_hello(hello_with(alpn_ext(b"h2"), sni_ext(b"x.test"))).alpn == ("h2",)
    assert parse_client_hello(hello_with(alpn_ext(b"\xff\x00"))).alpn == ("\\xff\x00",)
    assert parse_client_hello(hello_with(alpn_ext())).reason == "bad alpn"
    assert parse_client_hello(hello_with(alpn_ext(b""))).reason == "bad alpn"
    assert parse_client_hello(hello_with(ext(16, b"\x00\x05\x02h2"))).status == "malformed"


# ---- TLS: properties ----

@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data):
    check_hello(data)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_random_handshake_records_never_raise(body):
    for data in (records(b"\x01" + len(body).to_bytes(3, "big") + body), records(b"\x01" + body), records(body, 7)):
        check_hello(data)


@settings(max_examples=1000)
@given(st.sampled_from([HELLO, HELLO_ALPN, HELLO_NO_SNI]), st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_bit_flipped_hellos_never_raise(hello, flips):
    data = bytearray(hello)
    for f in flips:
        data[(f // 8) % len(data)] ^= 1 << (f % 8)
    h = check_hello(bytes(data))
    if h.status == "ok" and h.sni is not None:
        assert normalize_name(h.sni) == h.sni


@settings(max_examples=300)
@given(st.sampled_from([HELLO, HELLO_ALPN]), st.integers(min_value=0, max_value=600), st.binary(max_size=4))
def test_overwritten_lengths_never_raise(hello, at, value):
    data = bytearray(hello)
    at %= len(data)
    data[at:at + len(value)] = value
    check_hello(bytes(data))


def test_looks_like_tls():
    assert looks_like_tls(HELLO[:2]) and looks_like_tls(HELLO)
    assert not looks_like_tls(b"\x16") and not looks_like_tls(b"") and not looks_like_tls(b"GET / ")
    assert not looks_like_tls(b"\x16\x02")


# ---- HTTP ----

def test_connect():
    data = b"CONNECT Api.Example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n"
    assert parse_http_head(data) == Head("ok", method="CONNECT", target="Api.Example.com:443", host="api.example.com",
                                         port=443, kind="connect", head_len=len(data))


def test_connect_ipv6():
    h = parse_http_head(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n")
    assert (h.status, h.host, h.port, h.kind) == ("ok", "::1", 443, "connect")
    h = parse_http_head(b"CONNECT [0:0::0:1]:8443 HTTP/1.1\r\nHost: x.test\r\n\r\n")
    assert (h.host, h.port) == ("::1", 8443)


def test_connect_ipv4():
    h = parse_http_head(b"CONNECT 10.0.0.1:22 HTTP/1.1\r\nHost: 10.0.0.1:22\r\n\r\n")
    assert (h.host, h.port) == ("10.0.0.1", 22)


@pytest.mark.parametrize("target", [b"x.test", b"x.test:", b"x.test:0", b"x.test:65536", b"x.test:+1", b"[::1]", b"::1:443",
                                    b"[::1%25eth0]:443", b"[fe80::1%eth0]:443", b"[zz::1]:443", b"user@x.test:443",
                                    b"*.test:443", b"/x"])
def test_bad_connect_targets(target):
    h = parse_http_head(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x.test\r\n\r\n")
    assert h.status == "malformed", h


def test_get_with_host():
    data = b"GET /path?q=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nAccept: */*\r\n\r\n"
    assert parse_http_head(data) == Head("ok", method="GET", target="/path?q=1", host="example.com", port=8080,
                                         kind="http", head_len=len(data))
    h = parse_http_head(b"GET / HTTP/1.1\r\nHost: example.com.\r\n\r\n")
    assert (h.host, h.port) == ("example.com", None)


def test_absolute_form():
    h = parse_http_head(b"GET http://Example.com:8080/x HTTP/1.1\r\nHost: example.com:8080\r\n\r\n")
    assert (h.status, h.host, h.port, h.kind, h.target) == ("ok", "example.com", 8080, "http", "http://Example.com:8080/x")
    h = parse_http_head(b"GET http://example.com/x HTTP/1.1\r\nHost: example.com:80\r\n\r\n")
    assert (h.host, h.port) == ("example.com", None)
    h = parse_http_head(b"GET https://example.com HTTP/1.0\r\n\r\n")
    assert (h.status, h.host, h.port) == ("ok", "example.com", None)


def test_absolute_form_host_must_agree_with_host_header():
    h = parse_http_head(b"GET http://allowed.test/ HTTP/1.1\r\nHost: forbidden.test\r\n\r\n")
    assert h == Head("malformed", reason="Host header and target disagree")
    h = parse_http_head(b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test:81\r\n\r\n")
    assert h.status == "malformed"


@pytest.mark.parametrize("target", [b"ftp://x.test/", b"http://u@x.test/", b"x.test:80", b"http://[::1/"])
def test_bad_http_targets(target):
    assert parse_http_head(b"GET " + target + b" HTTP/1.1\r\nHost: x.test\r\n\r\n").status == "malformed"


def test_missing_host():
    assert parse_http_head(b"GET / HTTP/1.1\r\n\r\n").status == "malformed"      # mandatory in HTTP/1.1
    h = parse_http_head(b"GET / HTTP/1.0\r\n\r\n")
    assert (h.status, h.host, h.port) == ("ok", None, None)


def test_several_host_headers():
    assert parse_http_head(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n").status == "malformed"


@pytest.mark.parametrize("host", [b"a" * 254, b"x.test:99999", b"a..b", b"*.test", b"1.2.3.04", b"2130706433", b"a b",
                                  b"x.test:80:80", b"", b"[::1", b"h\xc3\xa9.test"])
def test_bad_host_header(host):
    h = parse_http_head(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert h.status == "malformed", h


def test_bad_host_reasons():
    assert parse_http_head(b"GET / HTTP/1.1\r\nHost: " + b"a" * 254 + b"\r\n\r\n").reason == "bad host"
    assert parse_http_head(b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n").reason == "bad host"


def test_huge_head_is_too_large():
    head = b"GET / HTTP/1.1\r\nHost: x.test\r\nX-Pad: " + b"a" * 20000
    assert parse_http_head(head) == Head("malformed", reason="too large")
    assert parse_http_head(head + b"\r\n\r\n") == Head("malformed", reason="too large")
    assert parse_http_head(head[:1000]).status == "need_more"
    assert parse_http_head(b"GET / HTTP/1.1\r\nHost: x.test\r\nX: " + b"a" * 200 + b"\r\n\r\n", max_bytes=100).reason == "too large"


def test_every_prefix_of_a_head_is_need_more():
    data = b"POST /upload HTTP/1.1\r\nHost: x.test\r\nContent-Length: 5\r\n\r\n"
    for n in range(len(data)):
        assert parse_http_head(data[:n]).status == "need_more", n
    assert parse_http_head(data).head_len == len(data)


def test_body_and_pipelined_requests_after_the_head():
    head = b"POST /upload HTTP/1.1\r\nHost: x.test\r\nContent-Length: 5\r\n\r\n"
    rest = b"hello" + b"GET /next HTTP/1.1\r\nHost: other.test\r\n\r\n"
    h = parse_http_head(head + rest)
    assert (h.status, h.method, h.host, h.head_len) == ("ok", "POST", "x.test", len(head))


@pytest.mark.parametrize("data", [b"\x00\x01\x02\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
                                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"G@T / HTTP/1.1\r\nHost: x.test\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nHost x.test\r\n\r\n", b"\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: gzip\r\n\r\n"])
def test_garbage_heads(data):
    assert parse_http_head(data).status == "malformed"


@settings(max_examples=500)
@given(st.binary(max_size=3000))
def test_random_bytes_never_raise_http(data):
    check_head(data)
    check_head(data, max_bytes=64)


@settings(max_examples=500)
@given(st.sampled_from([b"GET", b"CONNECT", b"POST"]), st.binary(max_size=80), st.binary(max_size=80))
def test_random_targets_and_hosts_never_raise(method, target, host):
    data = method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    h = check_head(data)
    if h.status == "ok" and h.host is not None and ":" not in h.host:
        assert normalize_name(h.host) == h.host or h.host.replace(".", "").isdigit()


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
NAME = st.lists(LABEL, min_size=1, max_size=5).map(".".join).filter(lambda n: not n.split(".")[-1].isdigit())


@given(NAME, st.one_of(st.none(), st.integers(min_value=1, max_value=65535)))
def test_host_round_trip(name, port):
    host = name.upper() + (f":{port}" if port else "")
    h = parse_http_head(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert (h.status, h.host, h.port) == ("ok", name, port)
    c = parse_http_head(f"CONNECT {name}:{port or 443} HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    assert (c.status, c.host, c.port, c.kind) == ("ok", name, port or 443, "connect")
    assert parse_client_hello(hello_with(sni_ext(name.encode() + b"."))).sni == name


def test_looks_like_http():
    for m in (b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"):
        assert looks_like_http(m + b" /x HTTP/1.1\r\n")
    for data in (b"get / HTTP/1.1", b"GET", b"GET/", b"", HELLO[:8], b"\x16\x03\x01 ", b"SSH-2.0-OpenSSH\r\n"):
        assert not looks_like_http(data)


# ---- the guard's replies ----

def parse_response(data):
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.receive_data(data)
    response = conn.next_event()
    body = conn.next_event()
    assert isinstance(conn.next_event(), h11.EndOfMessage)
    return response, body.data


def test_http_error():
    data = http_error(403, "Forbidden", "egress to forbidden.test denied\n", rule="network.allow_names")
    response, body = parse_response(data)
    headers = dict(response.headers)
    assert response.status_code == 403 and response.reason == b"Forbidden"
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"].startswith(b"text/plain")
    assert headers[b"x-agentwatch-denied"] == b"network.allow_names"
    assert body == b"egress to forbidden.test denied\n"
    assert int(headers[b"content-length"]) == len(body)


def test_http_error_without_rule_and_with_unicode_body():
    response, body = parse_response(http_error(502, "Bad Gateway", "caf\u00e9"))
    assert b"x-agentwatch-denied" not in dict(response.headers)
    assert body == "caf\u00e9".encode()


def test_http_error_header_injection():
    data = http_error(403, "No\r\nSet-Cookie: a=b", "x", rule="r\r\nX-Evil: 1")
    response, _ = parse_response(data)
    names = [n for n, _ in response.headers]
    assert b"set-cookie" not in names and b"x-evil" not in names
    with pytest.raises(ValueError):
        http_error(42, "x", "y")
