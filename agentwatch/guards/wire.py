"""Pure parsers for the egress guard: the first bytes of an agent's TCP stream.

The egress guard is the proxy the kernel redirects an agent's TCP connects to.
It decides by name, and the name comes from bytes the agent wrote: the
server_name of a TLS ClientHello, or the target/Host of an HTTP request head.
Everything here is a pure function of those bytes. Each returns a frozen
result saying need_more, malformed (with a reason), not_tls, or ok; none
raises, whatever the input, so a hostile agent can at worst get its own
connection refused.

  parse_client_hello  TLS record(s) -> server_name and ALPN
  parse_http_head     an HTTP/1.1 request head (h11) -> method, target,
                      host, port, and how many bytes the head took
  looks_like_tls/http sniff the first bytes to pick a parser
  http_error          the guard's own refusal (403 and the like)

Limits, and why:
- MAX_HELLO (16384 + 5 bytes, one full TLS record and its header): a real
  ClientHello, post-quantum key shares included, fits; the guard buffers
  this much per connection before it knows where the connection goes, so a
  client that never completes its hello holds at most this much memory.
  A hello split over several records is joined, still within MAX_HELLO.
- every length field is checked against the bytes that hold it, and the
  parse of a ClientHello starts only once the whole message is in, so a
  truncated hello is need_more, never a partial answer.
- one server_name of type host_name, no extension twice (RFC 6066, RFC
  8446 4.2): with two names the guard could judge one while the server
  answers the other.
- a name must look like a DNS name: ASCII letters, digits, hyphens and dots,
  labels 1..63, at most 253 in all, last label not all digits. Anything else
  is refused rather than matched, so "*", NULs, or "2130706433" (an integer
  IPv4 address that getaddrinfo accepts) never reach the name rules.
- parse_http_head's max_bytes (16384): the head is buffered whole before a
  decision, like the hello; a longer head is refused as too large.
- a request naming its host twice (two Host headers, or an absolute-form
  target and a Host header that disagree) is refused: the guard would judge
  one name and the server might route by the other.
"""
import dataclasses
import ipaddress
import re
from typing import Optional, Tuple

import h11

MAX_HELLO = 16384 + 5
MAX_HEAD = 16384
MAX_NAME = 253

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0

_LABEL = re.compile(r"[a-z0-9-]{1,63}\Z")
_METHOD = re.compile(rb"[A-Z]{3,20} ")
_PORT = re.compile(r"[0-9]{1,5}\Z")



@dataclasses.dataclass(frozen=True)
class Hello:
    """What parse_client_hello found. status is "ok", "need_more", "not_tls"
    or "malformed". needed (need_more): a lower bound on the total number of
    bytes the parse needs to go on, when known."""
    status: str
    sni: Optional[str] = None
    alpn: Tuple[str, ...] = ()
    reason: str = ""
    needed: Optional[int] = None

    @property
    def ok(self):
        return self.status == "ok"


@dataclasses.dataclass(frozen=True)
class Head:
    """What parse_http_head found. status is "ok", "need_more" or
    "malformed". kind is "connect" or "http". head_len is the number of bytes
    from the request line to the blank line after the headers, so what
    follows (a body, pipelined requests) can be forwarded untouched."""
    status: str
    method: str = ""
    target: str = ""
    host: Optional[str] = None
    port: Optional[int] = None
    kind: str = ""
    head_len: int = 0
    reason: str = ""

    @property
    def ok(self):
        return self.status == "ok"


class _Malformed(Exception):
    pass


def normalize_name(name):
    """name lowercased without its trailing dot, or None when it is not a
    plausible DNS name (see the module docstring)."""
    if not isinstance(name, str) or not name.isascii():
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        return None
    return name


# ---- TLS ----

def looks_like_tls(first_bytes):
    """A TLS handshake record starts 0x16 0x03; needs two bytes."""
    return len(first_bytes) >= 2 and first_bytes[0] == _HANDSHAKE and first_bytes[1] == 3


def parse_client_hello(data):
    """The server_name and ALPN of the ClientHello at the start of data."""
    try:
        return _parse_client_hello(bytes(data))
    except Exception as e:                   # a bug here must refuse one connection, not the guard
        return Hello("malformed", reason=f"parser error: {type(e).__name__}")


def _parse_client_hello(data):
    if not data:
        return Hello("need_more", needed=_RECORD_HEADER)
    if data[0] != _HANDSHAKE or (len(data) >= 2 and data[1] != 3) or (len(data) >= 3 and data[2] > 4):
        return Hello("not_tls", reason="not a TLS handshake record")
    # A handshake message may be split over records (RFC 8446 5.1): join the
    # fragments until the whole ClientHello is in.
    message = bytearray()
    want = None                              # 4 + the handshake length, once known
    pos = 0
    while want is None or len(message) < want:
        missing = (want or _HANDSHAKE_HEADER) - len(message)
        if pos + _RECORD_HEADER > len(data):
            return Hello("need_more", needed=pos + _RECORD_HEADER + missing)
        rtype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
        if rtype != _HANDSHAKE:
            return Hello("malformed", reason="other record inside the hello")
        if major != 3 or minor > 4:
            return Hello("malformed", reason="bad record version")
        if rlen == 0 or rlen > 16384:
            return Hello("malformed", reason="bad record length")
        end = pos + _RECORD_HEADER + rlen
        before = len(message)
        message += data[pos + _RECORD_HEADER:end]
        if message and message[0] != _CLIENT_HELLO:
            return Hello("malformed", reason="not a ClientHello")
        if want is None and len(message) >= _HANDSHAKE_HEADER:
            want = _HANDSHAKE_HEADER + int.from_bytes(message[1:4], "big")
        # checked on every record: the hello's last byte must lie within the cap
        if want is not None and pos + _RECORD_HEADER + (want - before) > MAX_HELLO:
            return Hello("malformed", reason="too large")
        if end > len(data) and (want is None or len(message) < want):
            missing = (want or _HANDSHAKE_HEADER) - len(message)
            more_headers = _RECORD_HEADER if len(data) + missing > end else 0
            return Hello("need_more", needed=len(data) + missing + more_headers)
        pos = end
    try:
        sni, alpn = _client_hello_body(bytes(message[_HANDSHAKE_HEADER:want]))
    except _Malformed as e:
        return Hello("malformed", reason=str(e))
    return Hello("ok", sni=sni, alpn=alpn)


class _Reader:
    """Bounds-checked reads from one length-delimited piece of the hello."""

    def __init__(self, data, what):
        self.data, self.what, self.i = data, what, 0

    def take(self, n, what=None):
        if self.i + n > len(self.data):
            raise _Malformed(f"truncated {what or self.what}")
        self.i += n
        return self.data[self.i - n:self.i]

    def uint(self, n, what=None):
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes, what):
        return self.take(self.uint(len_bytes, what), what)

    def done(self):
        return self.i == len(self.data)

    def end(self):
        if not self.done():
            raise _Malformed(f"bad {self.what}")


def _client_hello_body(body):
    r = _Reader(body, "ClientHello")
    if r.take(2, "legacy_version")[0] != 3:
        raise _Malformed("bad legacy_version")
    r.take(32, "random")
    if len(r.vector(1, "session_id")) > 32:
        raise _Malformed("bad session_id")
    suites = r.vector(2, "cipher_suites")
    if not suites or len(suites) % 2:
        raise _Malformed("bad cipher_suites")
    if not r.vector(1, "compression_methods"):
        raise _Malformed("bad compression_methods")
    if r.done():                             # TLS 1.2 and older may send no extensions
        return None, ()
    exts = _Reader(r.vector(2, "extensions"), "extensions")
    r.end()
    seen, sni, alpn = set(), None, ()
    while not exts.done():
        etype = exts.uint(2)
        edata = exts.vector(2, "extension")
        if etype in seen:
            raise _Malformed("duplicate extension")
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            sni = _server_name(edata)
        elif etype == _EXT_ALPN:
            alpn = _alpn(edata)
    return sni, alpn


def _server_name(data):
    outer = _Reader(data, "server_name")
    names = _Reader(outer.vector(2, "server_name"), "server_name")
    outer.end()
    if names.done():
        raise _Malformed("bad server_name")
    host = None
    while not names.done():
        name_type = names.uint(1)
        name = names.vector(2, "server_name")
        if name_type != _HOST_NAME:
            continue
        if host is not None:
            raise _Malformed("bad server_name")
        host = normalize_name(name.decode("ascii", "replace"))
        if host is None:
            raise _Malformed("bad server_name")
    return host


def _alpn(data):
    outer = _Reader(data, "alpn")
    protocols = _Reader(outer.vector(2, "alpn"), "alpn")
    outer.end()
    if protocols.done():
        raise _Malformed("bad alpn")
    found = []
    while not protocols.done():
        proto = protocols.vector(1, "alpn")
        if not proto:
            raise _Malformed("bad alpn")
        # ALPN ids are opaque bytes; this keeps odd ones printable for records
        found.append(proto.decode("ascii", "backslashreplace"))
    return tuple(found)


# ---- HTTP ----

def looks_like_http(first_bytes):
    """An uppercase method token and a space: GET, POST, CONNECT, ..."""
    return _METHOD.match(bytes(first_bytes[:21])) is not None


def parse_http_head(data, max_bytes=MAX_HEAD):
    """The request line and host of the HTTP/1.x request head at the start
    of data."""
    try:
        return _parse_http_head(bytes(data), max_bytes)
    except Exception as e:                   # as in parse_client_hello
        return Head("malformed", reason=f"parser error: {type(e).__name__}")


def _bad_head(reason):
    return Head("malformed", reason=reason)


def _parse_http_head(data, max_bytes):
    if not data:                             # to h11, receiving b"" is the peer closing
        return Head("need_more")
    # Feeding h11 at most max_bytes bounds its work; a head that has not
    # ended within them is too large, whether or not more bytes follow.
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)
    conn.receive_data(data[:max_bytes])
    try:
        event = conn.next_event()
    except h11.ProtocolError as e:
        return _bad_head(str(e)[:80] or "bad request")
    if event is h11.NEED_DATA:
        return _bad_head("too large") if len(data) >= max_bytes else Head("need_more")
    if not isinstance(event, h11.Request):
        return _bad_head("not a request")
    if event.http_version not in (b"1.0", b"1.1"):
        return _bad_head("unsupported HTTP version")
    head_len = min(len(data), max_bytes) - len(conn.trailing_data[0])
    method = event.method.decode("ascii")
    target = event.target.decode("ascii", "replace")
    hosts = [value for name, value in event.headers if name == b"host"]
    if len(hosts) > 1:
        return _bad_head("several Host headers")
    try:
        header = _authority(hosts[0].decode("ascii", "replace"), need_port=False) if hosts else None
        if method == "CONNECT":
            host, port = _authority(target, need_port=True)
            kind = "connect"
        else:
            host, port = _http_target(target, header)
            kind = "http"
    except _Malformed as e:
        return _bad_head(str(e))
    return Head("ok", method=method, target=target, host=host, port=port, kind=kind, head_len=head_len)


_ABSOLUTE = re.compile(r"(?i)(https?)://([^/?#]*)")


def _http_target(target, header):
    if target.startswith("/") or target == "*":
        return header if header is not None else (None, None)
    m = _ABSOLUTE.match(target)
    if m is None:
        raise _Malformed("bad target")
    host, port = _authority(m[2], need_port=False)
    if header is not None:
        default = 443 if m[1].lower() == "https" else 80
        if (host, port or default) != (header[0], header[1] or default):
            raise _Malformed("Host header and target disagree")
    return host, port


def _authority(text, need_port):
    """(host, port) of "name[:port]", "a.b.c.d[:port]" or "[v6][:port]"."""
    if len(text) > MAX_NAME + 8:             # name, brackets, ":65535"
        raise _Malformed("bad host")
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or "%" in addr:           # zone ids name the host's own interfaces
            raise _Malformed("bad host")
        try:
            host = ipaddress.IPv6Address(addr).compressed
        except ValueError:
            raise _Malformed("bad host") from None
    else:
        host, colon, port_text = text.partition(":")
        rest = colon + port_text
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            host = normalize_name(host)
            if host is None:
                raise _Malformed("bad host") from None
    port = None
    if rest:
        if not rest.startswith(":") or not _PORT.match(rest[1:]) or not 0 < int(rest[1:]) < 65536:
            raise _Malformed("bad port")
        port = int(rest[1:])
    if need_port and port is None:
        raise _Malformed("bad port")
    return host, port


def http_error(status, reason, body, rule=None):
    """A complete HTTP/1.1 response that ends the connection: the guard's
    refusal. rule, when given, names the rule in X-Agentwatch-Denied."""
    if not 100 <= int(status) <= 599:
        raise ValueError(f"bad HTTP status {status}")
    payload = body.encode("utf-8")
    lines = [f"HTTP/1.1 {int(status)} {_header_text(reason)}",
             "Connection: close",
             "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(payload)}"]
    if rule is not None:
        lines.append(f"X-Agentwatch-Denied: {_header_text(rule)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + payload


def _header_text(text):
    # a CR or LF from a rule name or reason must not start a header of its own
    return "".join(c if " " <= c <= "~" else "?" for c in str(text))
