"""The LLM gateway's config file: upstreams, the model map, prices and limits.

    upstreams:
      - name: openai
        api: openai                      # openai | anthropic
        base_url: https://api.openai.com # the request's path (/v1/...) is appended
        api_key_env: OPENAI_API_KEY      # or api_key_file: /etc/agentwatch/openai.key
      - name: claude
        api: anthropic
        base_url: https://api.anthropic.com
        api_key_file: /etc/agentwatch/anthropic.key
    models:                              # the model an agent asks for -> where it goes
      gpt-4o:
        upstream: openai
        model: gpt-4o-2024-08-06         # the upstream's name for it (default: the same)
        price: {input: 2.5, output: 10}  # USD per million tokens (optional)
      claude-sonnet:
        upstream: claude
        model: claude-sonnet-4-5
    limits:
      max_body: 4M                       # a request body; larger is 413, unread
      max_response: 64M                  # a non-streamed upstream body
      connect_timeout: 10s               # upstream connect
      read_timeout: 120s                 # upstream silence (before or between chunks)
      head_timeout: 10s                  # a client's request head (and each body read)
      idle_timeout: 60s                  # a kept-alive client with no next request
      max_clients: 256                   # open client connections; more get 503
      max_concurrent: 8                  # upstream calls at once, all runs (the scheduler's cap)
      per_run: 4                         # upstream calls at once of one run
      age: 30s                           # a request first in its run's queue this long goes first
    keep_bodies: 0                       # bytes of each body kept in the call record; 0: none
    allow_outside_callers: false         # callers in no run: refused unless true

The API keys are read here, at load, from the file or from agentwatch's
own environment. A key lives only in ``Upstream.key`` (left out of repr),
and no error message here or in the gateway quotes it: a bad key file is
named by its path, never by its content.

Errors are GatewayConfigError, with FILE:LINE:COL of the offending key or
value (the YAML is read by policy.source, which keeps every position).
"""
import os
from dataclasses import dataclass, field

from ..core.errors import AgentwatchError
from ..core.units import UnitError, parse_duration, parse_size
from ..policy.source import Invalid, Loc, parse, yaml_type

APIS = ("openai", "anthropic")
MAX_CONFIG_BYTES = 1 << 20
MAX_KEY_BYTES = 16384


class GatewayConfigError(AgentwatchError):
    """A gateway config file is unreadable or invalid; the message starts
    with FILE:LINE:COL (or FILE when the file as a whole is wrong)."""


@dataclass(frozen=True)
class Upstream:
    name: str
    api: str                         # "openai" or "anthropic"
    base_url: str                    # scheme://host[:port][/prefix], no trailing slash
    key: str = field(default="", repr=False)   # the real key; never logged or returned
    key_source: str = ""             # "env:NAME" or "file:PATH", for messages


@dataclass(frozen=True)
class Route:
    """One entry of the model map."""
    model: str                       # what the agent asks for
    upstream: Upstream
    upstream_model: str              # what the upstream is asked for
    price_in: float = None           # USD per million input tokens
    price_out: float = None          # USD per million output tokens

    def cost(self, tokens_in, tokens_out):
        """USD for a call, or None without prices."""
        if self.price_in is None and self.price_out is None:
            return None
        return ((self.price_in or 0.0) * tokens_in + (self.price_out or 0.0) * tokens_out) / 1e6


@dataclass(frozen=True)
class Limits:
    max_body: int = 4 * 1024 * 1024
    max_response: int = 64 * 1024 * 1024
    max_head: int = 16384            # the request line and headers
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    head_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_clients: int = 256
    max_concurrent: int = 8          # the scheduler (harness/scheduler.py): upstream calls at once
    per_run: int = 4                 # ... of one run
    age_s: float = 30.0              # ageing: first in its run's queue this long, granted first


@dataclass(frozen=True)
class GatewayConfig:
    upstreams: tuple = ()            # (Upstream, ...)
    routes: dict = field(default_factory=dict)     # model -> Route
    limits: Limits = Limits()
    keep_bodies: int = 0
    allow_outside_callers: bool = False
    path: str = None

    def route(self, model):
        return self.routes.get(model) if isinstance(model, str) else None

    def keys(self):
        """Every real key, for scrubbing them out of what leaves the gateway."""
        return tuple(u.key for u in self.upstreams if u.key)

    @classmethod
    def load(cls, path, environ=None):
        return load(path, environ)


_LIMITS = {                          # key -> (Limits field, parser)
    "max_body": ("max_body", parse_size),
    "max_response": ("max_response", parse_size),
    "max_head": ("max_head", parse_size),
    "connect_timeout": ("connect_timeout", parse_duration),
    "read_timeout": ("read_timeout", parse_duration),
    "head_timeout": ("head_timeout", parse_duration),
    "idle_timeout": ("idle_timeout", parse_duration),
    "max_clients": ("max_clients", None),
    "max_concurrent": ("max_concurrent", None),
    "per_run": ("per_run", None),
    "age": ("age_s", parse_duration),
}


def _fail(loc, message):
    raise GatewayConfigError(f"{loc}: {message}")


def _where(m, key):
    """The position of m[key]'s value, else of the mapping."""
    return getattr(m, "val_locs", {}).get(key) or getattr(m, "loc", None)


def _mapping(value, loc, what):
    if not isinstance(value, dict):
        _fail(loc, f"{what} must be a mapping, got {yaml_type(value)}")
    return value


def _known(m, allowed, what):
    for k in m:
        if k not in allowed:
            _fail(m.key_locs.get(k, m.loc), f"unknown key {k!r} in {what} "
                                            f"(known: {', '.join(sorted(allowed))})")


def _string(m, key, what, required=True):
    if key not in m:
        if required:
            _fail(m.loc, f"{what}: '{key}' is required")
        return None
    v = m[key]
    if not isinstance(v, str) or not v:
        _fail(_where(m, key), f"{what}.{key} must be a non-empty string, got {yaml_type(v)}")
    return v


def _read_key(upstream, m, environ):
    where = f"upstreams[{upstream}]"
    has_env, has_file = "api_key_env" in m, "api_key_file" in m
    if has_env == has_file:
        _fail(m.loc, f"{where}: give exactly one of api_key_env and api_key_file")
    if has_env:
        name = _string(m, "api_key_env", where)
        key = environ.get(name, "")
        if not key.strip():
            _fail(_where(m, "api_key_env"), f"{where}: environment variable {name} is unset or "
                                            f"empty (it must hold the API key when the gateway starts)")
        return key.strip(), f"env:{name}"
    path = _string(m, "api_key_file", where)
    if not os.path.isabs(path) and m.loc.file:
        path = os.path.join(os.path.dirname(os.path.abspath(m.loc.file)), path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        _fail(_where(m, "api_key_file"), f"{where}: cannot read key file {path}: {e.strerror}")
    # the content is never quoted, whatever is wrong with it
    if len(raw) > MAX_KEY_BYTES:
        _fail(_where(m, "api_key_file"), f"{where}: key file {path} is over {MAX_KEY_BYTES} bytes")
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        _fail(_where(m, "api_key_file"), f"{where}: key file {path} is not ASCII text")
    if not key or any(not " " < c <= "~" for c in key):
        _fail(_where(m, "api_key_file"), f"{where}: key file {path} must hold one key on one line "
                                         f"(printable, no spaces)")
    return key, f"file:{path}"


def _upstream(m, environ):
    name = _string(m, "name", "upstream")
    _known(m, {"name", "api", "base_url", "api_key_env", "api_key_file"}, f"upstreams[{name}]")
    api = _string(m, "api", f"upstreams[{name}]")
    if api not in APIS:
        _fail(_where(m, "api"), f"upstreams[{name}].api must be one of {', '.join(APIS)}, got {api!r}")
    base = _string(m, "base_url", f"upstreams[{name}]").rstrip("/")
    if not base.startswith(("http://", "https://")) or "://" == base[-3:] or "?" in base or "#" in base:
        _fail(_where(m, "base_url"), f"upstreams[{name}].base_url must be an http:// or https:// URL "
                                     f"without query, got {base!r}")
    key, source = _read_key(name, m, environ)
    return Upstream(name, api, base, key, source)


def _price(m, key, what):
    if key not in m:
        return None
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        _fail(_where(m, key), f"{what}.{key} must be a number >= 0 (USD per million tokens), "
                              f"got {yaml_type(v)}")
    return float(v)


def _route(model, m, upstreams):
    what = f"models[{model}]"
    _known(m, {"upstream", "model", "price"}, what)
    up = _string(m, "upstream", what)
    if up not in upstreams:
        _fail(_where(m, "upstream"), f"{what}.upstream {up!r} is not a name under upstreams "
                                     f"(known: {', '.join(sorted(upstreams)) or 'none'})")
    upstream_model = _string(m, "model", what, required=False) or model
    pin = pout = None
    if "price" in m:
        p = _mapping(m["price"], _where(m, "price"), f"{what}.price")
        _known(p, {"input", "output"}, f"{what}.price")
        pin, pout = _price(p, "input", f"{what}.price"), _price(p, "output", f"{what}.price")
    return Route(model, upstreams[up], upstream_model, pin, pout)


def _limits(m):
    _known(m, set(_LIMITS), "limits")
    values = {}
    for key, (attr, parser) in _LIMITS.items():
        if key not in m:
            continue
        v = m[key]
        if parser is None:
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65536:
                _fail(_where(m, key), f"limits.{key} must be a whole number from 1 to 65536, "
                                      f"got {yaml_type(v)}")
            values[attr] = v
            continue
        try:
            values[attr] = parser(v)
        except UnitError as e:
            _fail(_where(m, key), f"limits.{key}: {e}")
    return Limits(**values)


def parse_config(text, path="<config>", environ=None):
    """Config text -> GatewayConfig; GatewayConfigError on any problem."""
    environ = os.environ if environ is None else environ
    try:
        root = parse(text, path)
    except Invalid as e:
        raise GatewayConfigError(f"{e.loc}: {e.message}") from None
    start = Loc(path, 1, 1)
    if root is None:
        _fail(start, "the gateway config is empty; it needs upstreams and models")
    _mapping(root, start, "the gateway config")
    _known(root, {"upstreams", "models", "limits", "keep_bodies", "allow_outside_callers"},
           "the gateway config")
    ups = root.get("upstreams")
    if not isinstance(ups, list) or not ups:
        _fail(_where(root, "upstreams") or start, "upstreams must be a non-empty list")
    upstreams = {}
    for item, loc in zip(ups, ups.item_locs):
        u = _upstream(_mapping(item, loc, "an upstream"), environ)
        if u.name in upstreams:
            _fail(loc, f"upstream {u.name!r} is named twice")
        upstreams[u.name] = u
    models = _mapping(root.get("models"), _where(root, "models") or start, "models")
    if not models:
        _fail(_where(root, "models") or start, "models must name at least one model")
    routes = {}
    for model, m in models.items():
        routes[model] = _route(model, _mapping(m, models.val_locs[model], f"models[{model}]"),
                               upstreams)
    limits = _limits(_mapping(root["limits"], _where(root, "limits"), "limits")) \
        if "limits" in root else Limits()
    keep = root.get("keep_bodies", 0)
    if keep != 0:
        try:
            keep = parse_size(keep)
        except UnitError as e:
            _fail(_where(root, "keep_bodies"), f"keep_bodies: {e}")
    outside = root.get("allow_outside_callers", False)
    if not isinstance(outside, bool):
        _fail(_where(root, "allow_outside_callers"),
              f"allow_outside_callers must be true or false, got {yaml_type(outside)}")
    return GatewayConfig(tuple(upstreams.values()), routes, limits, keep, outside, path)


def load(path, environ=None):
    """The config file at path -> GatewayConfig."""
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            _fail(Loc(path), f"file is {size} bytes; a gateway config may be at most "
                             f"{MAX_CONFIG_BYTES}")
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        _fail(Loc(path), f"cannot read the gateway config: {e.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(Loc(path), f"not a text file (invalid UTF-8 at byte {e.start})")
    return parse_config(text, path, environ)
