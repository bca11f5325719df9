"""Matchers the policy engine judges events with: path globs, path
normalisation, variables, CIDRs, ports and domains.

Paths are matched segment by segment, not with one regex per pattern: the
agent chooses the paths we match (up to 4096 bytes, any bytes), and a
backtracking regex for a pattern like ``/**/a/**/b`` can take exponential
time on a crafted path. Here ``**`` is a state of a small automaton over path
segments (O(segments x pattern parts)), and a segment with wildcards is one
regex compiled once by :func:`fnmatch.translate`, whose stars are atomic (no
backtracking blow-up either).

Glob language (see docs/policy.md):
  ``*``  any run of characters within one path segment (dotfiles included)
  ``?``  one character other than ``/``;  ``[abc]``, ``[!abc]``, ``[a-z]`` one character
  ``**`` as a whole segment: any number of segments, zero included, so
         ``/dir/**`` matches ``/dir`` itself and everything below it
  ``${WORKSPACE}``, ``${HOME}``, ``${TMPDIR}``: only at the start of a pattern
"""
import difflib
import fnmatch
import functools
import ipaddress
import os
import re

VARIABLES = ("WORKSPACE", "HOME", "TMPDIR")
_VAR = re.compile(r"\$\{([^}]*)\}")
_META = frozenset("*?[")

LIT, WILD, ANY, VAR = "lit", "wild", "any", "var"


# --------------------------------------------------------------- variables

def default_variables(workspace=None, environ=None):
    """The variables of the current environment: WORKSPACE (default: the
    current directory), HOME, TMPDIR (default /tmp). Each normalised."""
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    return {"WORKSPACE": normalize(os.path.abspath(workspace or os.getcwd())),
            "HOME": normalize(home),
            "TMPDIR": normalize(env.get("TMPDIR") or "/tmp")}


def escape(text):
    """Make a literal path safe inside a glob (a workspace named ``a[1]``
    must not become a character class)."""
    return "".join(f"[{c}]" if c in _META else c for c in text)


def expand(pattern, variables):
    """Replace ``${NAME}`` by its (escaped, normalised) value. KeyError names a
    variable the caller did not provide."""
    def sub(m):
        value = variables[m.group(1)]
        return escape(normalize(value)).rstrip("/")
    return _VAR.sub(sub, pattern)


# --------------------------------------------------------------- normalisation

def _is_pid(seg):
    return seg.isascii() and seg.isdigit()


def _detour(stack, cwd_segs):
    """/proc/self/root, /proc/<pid>/root, /proc/thread-self/root and
    /proc/<pid>/task/<tid>/root are the root directory again; /proc/self/cwd
    is the process's cwd (when known). Rewrite them as we walk, so a later
    ``..`` climbs from where the kernel would be."""
    if not stack or stack[0] != "proc":
        return
    n = len(stack)
    if n == 3 and stack[2] == "root" and (stack[1] in ("self", "thread-self") or _is_pid(stack[1])):
        stack.clear()
    elif n == 5 and stack[2] == "task" and stack[4] == "root" and _is_pid(stack[3]) \
            and (stack[1] == "self" or _is_pid(stack[1])):
        stack.clear()
    elif n == 3 and stack[2] == "cwd" and stack[1] in ("self", "thread-self") and cwd_segs is not None:
        stack[:] = cwd_segs


def _segments(path, cwd_segs):
    stack = []
    for seg in path.split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if stack:
                stack.pop()
            continue
        stack.append(seg)
        _detour(stack, cwd_segs)
    return stack


def normalize(path, cwd=None):
    """Lexically normalise a path: make it absolute (relative to ``cwd``, else
    to ``/``), drop ``.``, empty segments and a trailing slash, resolve ``..``
    and the /proc detours. Symlinks are the caller's job (os.path.realpath)."""
    cwd_segs = _segments(cwd, None) if cwd else None
    if not path.startswith("/"):
        path = (cwd or "") + "/" + path
    return "/" + "/".join(_segments(path, cwd_segs))


# --------------------------------------------------------------- glob syntax

def _bracket_end(seg, i):
    """Index of the ``]`` closing the class that opens at seg[i], or -1."""
    j = i + 1
    if j < len(seg) and seg[j] in "!^":
        j += 1
    if j < len(seg) and seg[j] == "]":
        j += 1
    return seg.find("]", j)


def check_glob(pattern, what="path glob"):
    """Problems with a path glob: (errors, warnings), each a message."""
    errors, warnings = [], []
    if pattern == "":
        return [f"empty {what}"], []
    if "\0" in pattern:
        return [f"{what} {pattern!r} contains a NUL byte"], []
    for m in _VAR.finditer(pattern):
        name = m.group(1)
        if name not in VARIABLES:
            close = difflib.get_close_matches(name, VARIABLES, n=1)
            hint = f" (did you mean ${{{close[0]}}}?)" if close else f" (known: {', '.join('${' + v + '}' for v in VARIABLES)})"
            errors.append(f"unknown variable ${{{name}}} in {pattern!r}{hint}")
        elif m.start() != 0:
            errors.append(f"variable ${{{name}}} must start the pattern: {pattern!r}")
        elif m.end() < len(pattern) and pattern[m.end()] != "/":
            errors.append(f"variable ${{{name}}} must be followed by '/' in {pattern!r}")
    if "$" in _VAR.sub("", pattern):
        errors.append(f"'$' in {pattern!r} does not start a variable; write ${{HOME}}, ${{WORKSPACE}} or ${{TMPDIR}}")
    if errors:
        return errors, warnings
    if not (pattern.startswith(("/", "${")) or pattern == "**" or pattern.startswith("**/")):
        errors.append(f"relative path {pattern!r}: a {what} starts with '/', a variable like ${{WORKSPACE}}, or '**/'")
    for seg in pattern.split("/"):
        if seg in (".", ".."):
            errors.append(f"'{seg}' in {pattern!r} never matches: paths are normalised before matching")
        i = 0
        while i < len(seg):
            if seg[i] == "[":
                end = _bracket_end(seg, i)
                if end < 0:
                    errors.append(f"unbalanced '[' in {pattern!r} (a class cannot span '/'; write [[] for a literal '[')")
                    break
                i = end
            i += 1
        if "**" in seg and seg != "**":
            warnings.append(f"'**' in {pattern!r} is not a whole path segment, so it acts like '*'")
    if len(pattern) > 1 and pattern.endswith("/") and not errors:
        base = pattern.rstrip("/")
        warnings.append(f"trailing '/' in {pattern!r} is ignored: it matches {base or '/'} itself only; "
                        f"write '{base}/**' for everything below it")
    return errors, warnings


# --------------------------------------------------------------- globs

def _part(seg):
    if seg == "**":
        return (ANY, None)
    if not any(c in _META for c in seg):
        return (LIT, seg)
    return (WILD, re.compile(fnmatch.translate(seg)).match, seg)


def parse_parts(pattern, keep_vars=False):
    """A glob as parts: (LIT, text) | (WILD, matcher, text) | (ANY, None) |
    (VAR, name). ``/a/b`` -> '', 'a', 'b' (the empty first segment is the
    root); consecutive ``**`` collapse. With keep_vars a leading ``${X}``
    becomes '', (VAR, X): an absolute directory nothing else is known about
    (used by the lint algebra; matching always expands variables first)."""
    parts = []
    if keep_vars:
        m = _VAR.match(pattern)
        if m:
            parts += [(LIT, ""), (VAR, m.group(1))]
            pattern = pattern[m.end():]
            if pattern.startswith("/"):
                pattern = pattern[1:]
            if not pattern:
                return parts
    segs = pattern.split("/")
    if len(segs) > 1 and segs[-1] == "":
        segs.pop()                                  # trailing slash: the directory itself
    for i, seg in enumerate(segs):
        if seg == "" and (i > 0 or parts):
            continue                                # repeated slash
        part = _part(seg)
        if part[0] == ANY and parts and parts[-1][0] == ANY:
            continue
        parts.append(part)
    return parts


def _seg_match(part, seg):
    kind = part[0]
    if kind == LIT:
        return part[1] == seg
    if kind == WILD:
        return part[1](seg) is not None
    return False


class Glob:
    """One compiled path glob. ``matches(path)`` expects a normalised
    absolute path (see :func:`normalize`)."""

    __slots__ = ("pattern", "parts", "_exact", "_prefix", "_kind")

    def __init__(self, pattern):
        self.pattern = pattern
        self.parts = parse_parts(pattern)
        kinds = [p[0] for p in self.parts]
        literal = self.literal_prefix()
        if all(k == LIT for k in kinds):
            self._kind, self._exact = "exact", "/".join(p[1] for p in self.parts) or "/"
        elif kinds[-1] == ANY and all(k == LIT for k in kinds[:-1]) and kinds[0] == LIT:
            self._kind, self._exact = "subtree", literal   # /a/b/** : equal or below
        else:
            self._kind, self._exact = "general", None
        self._prefix = literal + "/" if literal else ("/" if kinds[0] == LIT else "")

    def literal_prefix(self):
        """The leading literal segments: /a/b for /a/b/*.c, "" when the glob
        starts with a wildcard or ** (the root alone is no prefix)."""
        lits = []
        for p in self.parts:
            if p[0] != LIT:
                break
            lits.append(p[1])
        return "/".join(lits)

    def __repr__(self):
        return f"Glob({self.pattern!r})"

    def matches(self, path):
        kind = self._kind
        if kind == "exact":
            return path == self._exact
        if kind == "subtree":
            prefix = self._exact
            return not prefix or path == prefix or path.startswith(self._prefix)
        if self._prefix and not path.startswith(self._prefix):
            return False
        return self._nfa([""] if path == "/" else path.split("/"))

    def _nfa(self, segs):
        """Set-of-states simulation: a state is an index into parts; ANY
        keeps its state on every segment and can also be skipped."""
        parts, end = self.parts, len(self.parts)
        states = _closure({0}, parts)
        for seg in segs:
            nxt = set()
            for i in states:
                if i == end:
                    continue
                part = parts[i]
                if part[0] == ANY:
                    nxt.add(i)
                elif _seg_match(part, seg):
                    nxt.add(i + 1)
            if not nxt:
                return False
            states = _closure(nxt, parts)
        return end in states


def _closure(states, parts):
    out = set(states)
    for i in sorted(states):
        while i < len(parts) and parts[i][0] == ANY:
            i += 1
            out.add(i)
    return out


class GlobSet:
    """Several globs judged together; remembers the pattern as written."""

    __slots__ = ("items",)

    def __init__(self, written_and_expanded):
        self.items = [(written, Glob(expanded)) for written, expanded in written_and_expanded]

    def first(self, path):
        """The written pattern of the first glob matching path, or None."""
        for written, glob in self.items:
            if glob.matches(path):
                return written
        return None

    def __len__(self):
        return len(self.items)


# --------------------------------------------------------------- glob algebra (lint)

def _seg_subset(a, b):
    """Every segment a matches, b matches too (sound; may answer False)."""
    if b[0] == WILD and b[2] == "*" and a[0] in (LIT, WILD):
        return True
    if a[0] == LIT:
        return _seg_match(b, a[1])
    if a[0] == WILD and b[0] == WILD:
        return a[2] == b[2]
    return a == b


def _fixed_prefix(text):
    out = []
    for c in text:
        if c in _META:
            break
        out.append(c)
    return "".join(out)


def _fixed_suffix(text):
    """The literal end of a segment pattern: up to its last wildcard, or its
    last bracket expression's ']' (read backwards, ']' closes a bracket)."""
    out = []
    for c in reversed(text):
        if c in _META or c == "]":
            break
        out.append(c)
    return "".join(reversed(out))


def _seg_overlap(a, b):
    """Some segment matches both (conservative: may answer True)."""
    if a[0] == LIT:
        return _seg_match(b, a[1]) if b[0] != VAR else False
    if b[0] == LIT:
        return _seg_overlap(b, a)
    if a[0] == VAR or b[0] == VAR:
        # a variable is some directory of the user's: it may be what a bare
        # '*' matches, but is assumed not to be a named system directory
        # like '/lib*'
        wild = a if a[0] == WILD else b if b[0] == WILD else None
        return a == b or (wild is not None and _fixed_prefix(wild[2]) == "")
    pa, pb = _fixed_prefix(a[2]), _fixed_prefix(b[2])
    sa, sb = _fixed_suffix(a[2]), _fixed_suffix(b[2])
    return (pa.startswith(pb) or pb.startswith(pa)) and (sa.endswith(sb) or sb.endswith(sa))


def covers(inner, outer):
    """True when every path ``inner`` matches is matched by ``outer`` (both as
    written; variables are opaque directories). Sound, not complete: used to
    warn about shadowed rules, so a miss is only a missed warning."""
    a, b = parse_parts(inner, keep_vars=True), parse_parts(outer, keep_vars=True)

    @functools.lru_cache(maxsize=None)
    def go(i, j):
        if j == len(b):
            return i == len(a)
        if b[j][0] == ANY:
            return go(i, j + 1) or (i < len(a) and go(i + 1, j))
        if i == len(a) or a[i][0] == ANY:
            return False
        return _seg_subset(a[i], b[j]) and go(i + 1, j + 1)
    return go(0, 0)


def overlap(x, y):
    """True when some path may match both globs (as written; conservative:
    used for W^X warnings)."""
    a, b = parse_parts(x, keep_vars=True), parse_parts(y, keep_vars=True)

    @functools.lru_cache(maxsize=None)
    def go(i, j):
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i][0] == ANY and (go(i + 1, j) or (j < len(b) and go(i, j + 1))):
            return True
        if j < len(b) and b[j][0] == ANY and (go(i, j + 1) or (i < len(a) and go(i + 1, j))):
            return True
        if i == len(a) or j == len(b) or ANY in (a[i][0], b[j][0]):
            return False
        return _seg_overlap(a[i], b[j]) and go(i + 1, j + 1)
    return go(0, 0)


def has_wildcards(pattern):
    return any(c in _META for c in _VAR.sub("", pattern))


# --------------------------------------------------------------- names (identity, abstract sockets)

def check_name_glob(pattern, what):
    """A glob over a name (no path structure): '*' matches anything."""
    if not pattern:
        return [f"empty {what}"]
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            end = _bracket_end(pattern, i)
            if end < 0:
                return [f"unbalanced '[' in {what} {pattern!r}"]
            i = end
        i += 1
    return []


@functools.lru_cache(maxsize=1024)
def name_matcher(pattern):
    return re.compile(fnmatch.translate(pattern)).match


# --------------------------------------------------------------- addresses, ports, domains

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def parse_cidr(text):
    """A network from 'a.b.c.d/n', 'x::/n' or a bare address; (network, error).
    An IPv4-mapped IPv6 network becomes the IPv4 network it maps."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return None, f"invalid CIDR {text!r}: {e}"
        return None, f"invalid CIDR {text!r}: host bits are set (did you mean {loose}?)"
    if net.version == 6 and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net, None


@functools.lru_cache(maxsize=8192)
def canonical_ip(addr):
    """An address object (IPv4-mapped IPv6 as IPv4, scope id dropped), or None."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0] if isinstance(addr, str) else addr)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_port(value):
    """443 or "8000-8100" -> ((lo, hi), error)."""
    if isinstance(value, bool):
        return None, "expected a port number or range, got bool"
    if isinstance(value, int):
        lo = hi = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,5}(-\d{1,5})?", value.strip()):
        lo, _, hi = value.strip().partition("-")
        lo, hi = int(lo), int(hi or lo)
    else:
        return None, f"invalid port {value!r}: expected 1-65535 or a range like \"8000-8100\""
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        return None, f"port {value!r} is out of range 1-65535"
    if lo > hi:
        return None, f"port range {value!r} is empty (start > end)"
    return (lo, hi), None


def port_in(port, ranges):
    return port is not None and any(lo <= port <= hi for lo, hi in ranges)


_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def check_domain(text):
    """A DNS name or '*.name'; returns an error message or None."""
    name = text.lower().rstrip(".")
    if canonical_ip(name) is not None:
        return f"{text!r} is an address, not a domain: write 'cidr: {name}'"
    if name.startswith("*."):
        name = name[2:]
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(lbl) for lbl in name.split(".")):
        return f"invalid domain {text!r}: expected a name like pypi.org or *.example.com"
    return None


def domain_matches(pattern, name):
    """'pypi.org' matches itself; '*.example.com' matches any name below
    example.com (not example.com itself). Case and a final dot are ignored."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern
