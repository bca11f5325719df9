"""Pure pieces of the LLM gateway: what the OpenAI and Anthropic APIs say,
as far as the gateway needs to know. No I/O here; none of these raises on
what a client or an upstream sends.

  api_of_path       the request path -> ("openai" | "anthropic", route) or None
  error_body        an error in the API's own JSON shape
  system_prompt     the system prompt a request carries
  request_text      the text a request sends (for the token estimate)
  usage_of_json     (tokens_in, tokens_out) of a non-streamed response
  SseReader         an upstream SSE stream split into whole events, with the
                    usage and text seen so far
  estimate_tokens   tokens of a text when the response has no usage

The estimate: ceil(characters / 4), OpenAI's rule of thumb for English
text ("a token is about 4 characters"); it over-counts code a little and
under-counts CJK text. It is used only when the upstream reported no usage
(a stream the client cut, an upstream without usage), and the call record
says so (tokens_counted: true).
"""
import json
import math

PATHS = {
    "/v1/chat/completions": ("openai", "chat"),
    "/v1/completions": ("openai", "completions"),
    "/v1/models": ("openai", "models"),
    "/v1/messages": ("anthropic", "messages"),
}

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_denied", 404: "not_found_error", 405: "invalid_request_error",
                 408: "timeout", 413: "invalid_request_error", 429: "rate_limit_exceeded",
                 502: "upstream_error", 503: "server_busy", 504: "timeout"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                    408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                    502: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def api_of_path(path):
    """(api, route) for a path the gateway serves (query ignored), else None."""
    return PATHS.get(path.split("?", 1)[0].rstrip("/") or "/")


def error_body(api, status, message, code=None):
    """The JSON bytes of an error in the API's own shape."""
    if api == "anthropic":
        body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                           "message": message}}
    else:
        body = {"error": {"message": message, "type": _OPENAI_TYPES.get(status, "api_error"),
                          "param": None, "code": code}}
    return json.dumps(body).encode()


def sse_error(api, status, message):
    """An error event to end a stream whose status line has gone already."""
    payload = error_body(api, status, message)
    if api == "anthropic":
        return b"event: error\ndata: " + payload + b"\n\n"
    return b"data: " + payload + b"\n\n"


def _text_of_content(content):
    """A message's content (string, or a list of parts/blocks) -> its text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
        return "".join(out)
    return None


def system_prompt(api, body):
    """The system prompt of a request, or None when it has none: OpenAI the
    first system or developer message's content, Anthropic the ``system``
    field (a string or a list of text blocks, joined)."""
    if not isinstance(body, dict):
        return None
    if api == "anthropic":
        return _text_of_content(body.get("system")) if "system" in body else None
    for m in _list(body.get("messages")):
        if isinstance(m, dict) and m.get("role") in ("system", "developer"):
            return _text_of_content(m.get("content"))
    return None


def request_text(api, body):
    """Everything a request sends as text: the prompt, messages and system."""
    if not isinstance(body, dict):
        return ""
    parts = []
    if api == "anthropic":
        parts.append(_text_of_content(body.get("system")) or "")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, list):
        parts.extend(p for p in prompt if isinstance(p, str))
    for m in _list(body.get("messages")):
        if isinstance(m, dict):
            parts.append(_text_of_content(m.get("content")) or "")
    return "\n".join(p for p in parts if p)


def estimate_tokens(text):
    return math.ceil(len(text) / 4) if text else 0


def _list(v):
    return v if isinstance(v, list) else ()


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def usage_pair(api, usage):
    """A usage object -> (tokens_in, tokens_out), or None when it is not one.
    Anthropic's cache reads and writes are input tokens too."""
    if not isinstance(usage, dict):
        return None
    if api == "anthropic":
        if "input_tokens" not in usage and "output_tokens" not in usage:
            return None
        return (_int(usage.get("input_tokens")) + _int(usage.get("cache_creation_input_tokens"))
                + _int(usage.get("cache_read_input_tokens")), _int(usage.get("output_tokens")))
    if "prompt_tokens" not in usage and "completion_tokens" not in usage:
        return None
    return _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))


def _response_text(api, body):
    if not isinstance(body, dict):
        return ""
    if api == "anthropic":
        return _text_of_content(body.get("content")) or ""
    out = []
    for c in _list(body.get("choices")):
        if isinstance(c, dict):
            if isinstance(c.get("text"), str):
                out.append(c["text"])
            msg = c.get("message")
            if isinstance(msg, dict):
                out.append(_text_of_content(msg.get("content")) or "")
    return "".join(out)


def usage_of_json(api, raw):
    """(usage or None, text) of a non-streamed response body."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, ""
    if not isinstance(body, dict):
        return None, ""
    return usage_pair(api, body.get("usage")), _response_text(api, body)


class SseReader:
    """Splits upstream bytes into whole SSE events (an event ends at a blank
    line) and keeps the usage and text they carry. feed(data) returns the
    events completed by data, each (raw bytes, parsed JSON or None).

    OpenAI: usage comes in the last chunk (stream_options.include_usage),
    one with no choices; ``is_usage_only`` tells it apart, so it can be kept
    from a client that did not ask for it. Anthropic: message_start carries
    the input tokens (and output so far), each message_delta the output so
    far (cumulative)."""

    MAX_EVENT = 1 << 20              # one event; past this the stream is passed on unparsed

    def __init__(self, api):
        self.api = api
        self.buf = b""
        self.tokens_in = None
        self.tokens_out = None
        self.text = []
        self.overflowed = False
        self.out_final = False       # tokens_out is the stream's final count, not one so far

    def feed(self, data):
        self.buf += data
        events = []
        while True:
            cut, sep = _event_end(self.buf)
            if cut < 0:
                break
            raw = self.buf[:cut + sep]
            self.buf = self.buf[cut + sep:]
            events.append((raw, self._take(raw)))
        if len(self.buf) > self.MAX_EVENT:   # not SSE as we know it: let it through as is
            self.overflowed = True
            events.append((self.buf, None))
            self.buf = b""
        return events

    def rest(self):
        """Bytes left over at the end of the stream (an unterminated event)."""
        raw, self.buf = self.buf, b""
        return raw

    def _take(self, raw):
        data = []
        for line in raw.splitlines():
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        if not data:
            return None
        try:
            obj = json.loads(b"\n".join(data))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(obj, dict):
            return None
        if self.api == "anthropic":
            self._anthropic(obj)
        else:
            self._openai(obj)
        return obj

    def _openai(self, obj):
        pair = usage_pair("openai", obj.get("usage"))
        if pair is not None:
            self.tokens_in, self.tokens_out = pair
            self.out_final = True
        for c in _list(obj.get("choices")):
            if not isinstance(c, dict):
                continue
            if isinstance(c.get("text"), str):
                self.text.append(c["text"])
            delta = c.get("delta")
            if isinstance(delta, dict):
                self.text.append(_text_of_content(delta.get("content")) or "")

    def _anthropic(self, obj):
        kind = obj.get("type")
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            pair = usage_pair("anthropic", obj["message"].get("usage"))
            if pair is not None:
                self.tokens_in, self.tokens_out = pair
        elif kind == "message_delta":
            u = obj.get("usage")
            if isinstance(u, dict) and "output_tokens" in u:
                self.tokens_out = _int(u["output_tokens"])
                self.out_final = True
                if "input_tokens" in u:      # newer streams repeat the input count here
                    pair = usage_pair("anthropic", u)
                    self.tokens_in = pair[0] if pair else self.tokens_in
        elif kind == "content_block_delta" and isinstance(obj.get("delta"), dict):
            t = obj["delta"].get("text")
            if isinstance(t, str):
                self.text.append(t)

    @staticmethod
    def is_usage_only(obj):
        """An OpenAI chunk that only carries the stream's usage."""
        return isinstance(obj, dict) and obj.get("usage") is not None and not obj.get("choices")

    def output_text(self):
        return "".join(self.text)


def _event_end(buf):
    """(index of the blank line ending the first event, its length) or (-1, 0)."""
    best = (-1, 0)
    for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        i = buf.find(sep)
        if i >= 0 and (best[0] < 0 or i < best[0]):
            best = (i, len(sep))
    return best
