"""Policy files to located values: reading, YAML with a position for every
key and value, and ``extends`` chains merged into one effective document.

YAML is read as an event stream and built here, iteratively, instead of with
``yaml.safe_load``: that keeps FILE:LINE:COL for every key and value, and
lets us refuse hostile input while reading it. A deeply nested document
stops at MAX_DEPTH before the parser does quadratic work, and aliases (the
"billion laughs" bomb) are expanded against a budget instead of
exponentially. Nothing here executes YAML tags.
"""
import copy
import os
from dataclasses import dataclass

import yaml

from ..core.errors import PolicyError

MAX_POLICY_BYTES = 1 << 20
MAX_DEPTH = 32            # a policy nests 5 levels; deeper is not a policy
ALIAS_BUDGET = 10_000     # nodes that aliases may add by expansion
MAX_EXTENDS = 8

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml: 20x faster, same marks
_RESOLVER = yaml.resolver.Resolver()
_CTOR = yaml.constructor.SafeConstructor()
_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("null", "bool", "int", "float", "str")}


@dataclass(frozen=True)
class Loc:
    """Where something was written. line/col are 1-based; None when the
    problem is with the file as a whole."""
    file: str
    line: int = None
    col: int = None

    def __str__(self):
        return self.file if self.line is None else f"{self.file}:{self.line}:{self.col}"

    def ref(self, here=None):
        """Short form for a message about a file: 'line 4' in the same file."""
        if here is not None and self.file == here.file and self.line is not None:
            return f"line {self.line}"
        return str(self)


class Map(dict):
    """A YAML mapping that remembers where each key and value was written."""

    def __init__(self, loc):
        super().__init__()
        self.loc = loc
        self.key_locs = {}
        self.val_locs = {}

    def put(self, key, value, key_loc, val_loc):
        self[key] = value
        self.key_locs[key] = key_loc
        self.val_locs[key] = val_loc


class Seq(list):
    """A YAML sequence that remembers where each item was written."""

    def __init__(self, loc):
        super().__init__()
        self.loc = loc
        self.item_locs = []

    def put(self, value, loc):
        self.append(value)
        self.item_locs.append(loc)


class Invalid(PolicyError):
    """A problem that stops reading one file (unreadable, bad YAML, not a
    policy...); a PolicyError that also carries its Loc."""

    def __init__(self, loc, message):
        super().__init__(f"{loc}: {message}")
        self.loc, self.message = loc, message


def yaml_type(value):
    """The YAML name of a value's type, for 'expected X, got Y' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (dict, list)):
        return "mapping" if isinstance(value, dict) else "list"
    return {"int": "int", "float": "float", "str": "string"}.get(type(value).__name__,
                                                                  type(value).__name__)


def plain(value):
    """Located values back to plain dict/list (for the digest and Policy.data)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# --------------------------------------------------------------- reading

def _line_col(text, pos):
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def read_text(path, what="policy"):
    """The file as text; Invalid (a PolicyError) when unreadable, too large
    or not UTF-8. what: the kind of file, for the messages (a manifest
    reads its file here too)."""
    try:
        size = os.path.getsize(path)
        if size > MAX_POLICY_BYTES:
            raise Invalid(Loc(path, 1, 1), f"file is {size} bytes; a {what} may be at most "
                                           f"{MAX_POLICY_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise Invalid(Loc(path), f"cannot read {what}: {e.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:      # grew since stat, or a device
        raise Invalid(Loc(path, 1, 1), f"file is over {MAX_POLICY_BYTES} bytes; a {what} may be "
                                       f"at most {MAX_POLICY_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(raw.decode("latin-1"), e.start)
        raise Invalid(Loc(path, line, col), f"not a text file (invalid UTF-8 at byte {e.start})") from None


def yaml_error(path, e, text=None):
    """A YAML exception -> (Loc, 'invalid YAML: problem')."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        loc = Loc(path, mark.line + 1, mark.column + 1)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    elif isinstance(e, yaml.reader.ReaderError):
        loc = Loc(path, *_line_col(text, e.position)) if text is not None else Loc(path, 1, 1)
        problem = f"unacceptable character #x{e.character:04x}: not a text policy"
    else:
        loc, problem = Loc(path), str(e).splitlines()[0]
    return loc, f"invalid YAML: {problem}"


def yaml_error_message(path, e, text=None):
    """One line, FILE:LINE:COL: invalid YAML: problem."""
    loc, message = yaml_error(path, e, text)
    return f"{loc}: {message}"


# --------------------------------------------------------------- YAML -> located values

def _scalar(ev, loc):
    tag = ev.tag
    if tag is None or tag == "!":
        tag = _RESOLVER.resolve(yaml.ScalarNode, ev.value, ev.implicit) if tag is None else _TAG + "str"
    if tag == _TAG + "timestamp":
        return ev.value                  # a date in a description stays text
    if tag not in _SCALAR_TAGS:
        raise Invalid(loc, f"unsupported YAML tag {tag.replace(_TAG, '!!')}: a policy holds only "
                           f"strings, numbers, booleans, lists and mappings")
    return _CTOR.yaml_constructors[tag](_CTOR, yaml.ScalarNode(tag, ev.value))


class _Frame:
    __slots__ = ("value", "anchor", "size", "key", "key_loc")

    def __init__(self, value, anchor):
        self.value, self.anchor, self.size = value, anchor, 1
        self.key = self.key_loc = None


def _check_collection_tag(ev, loc, default):
    if ev.tag not in (None, "!", _TAG + default):
        raise Invalid(loc, f"unsupported YAML tag {ev.tag.replace(_TAG, '!!')}")


def _events_to_value(events, path):
    """Build one document's value from parser events; Invalid on problems."""
    stack, anchors, docs = [], {}, []
    budget = ALIAS_BUDGET
    result = None

    def deliver(value, loc, size):
        nonlocal result
        if not stack:
            result = value
            return
        top = stack[-1]
        top.size += size
        if isinstance(top.value, Seq):
            top.value.put(value, loc)
        elif top.key is None:
            if not isinstance(value, str):
                raise Invalid(loc, "a mapping key must be a plain string")
            if value == "<<":
                raise Invalid(loc, "YAML merge keys (<<) are not supported; use 'extends'")
            top.key, top.key_loc = value, loc
        else:
            key, m = top.key, top.value
            if key in m:
                raise Invalid(top.key_loc, f"duplicate key {key!r} (first at {m.key_locs[key].ref(loc)})")
            m.put(key, value, top.key_loc, loc)
            top.key = None

    for ev in events:
        loc = Loc(path, ev.start_mark.line + 1, ev.start_mark.column + 1)
        if isinstance(ev, yaml.DocumentStartEvent):
            docs.append(loc)
            if len(docs) > 1:
                raise Invalid(loc, "a policy file holds one YAML document; found a second '---'")
        elif isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            is_map = isinstance(ev, yaml.MappingStartEvent)
            _check_collection_tag(ev, loc, "map" if is_map else "seq")
            if len(stack) >= MAX_DEPTH:
                raise Invalid(loc, f"nested more than {MAX_DEPTH} levels deep; not a policy")
            stack.append(_Frame(Map(loc) if is_map else Seq(loc), ev.anchor))
            if ev.anchor:
                anchors[ev.anchor] = None            # open: an alias to it now is recursive
        elif isinstance(ev, yaml.CollectionEndEvent):
            frame = stack.pop()
            if frame.anchor:
                anchors[frame.anchor] = (frame.value, frame.size)
            deliver(frame.value, frame.value.loc, frame.size)
        elif isinstance(ev, yaml.ScalarEvent):
            awaiting_key = stack and isinstance(stack[-1].value, Map) and stack[-1].key is None
            value = ev.value if awaiting_key else _scalar(ev, loc)   # keys are their text
            if ev.anchor:
                anchors[ev.anchor] = (value, 1)
            deliver(value, loc, 1)
        elif isinstance(ev, yaml.AliasEvent):
            target = anchors.get(ev.anchor)
            if target is None:
                raise Invalid(loc, f"alias *{ev.anchor} refers to a collection that contains it")
            value, size = target
            budget -= size
            if budget < 0:
                raise Invalid(loc, f"YAML aliases expand to more than {ALIAS_BUDGET} nodes; "
                                   f"refusing (a policy needs no alias bombs)")
            deliver(copy.deepcopy(value), loc, size)
    return result


def parse(text, path):
    """Text -> located value of its single document (None when empty)."""
    try:
        return _events_to_value(yaml.parse(text, Loader=_Parser), path)
    except yaml.YAMLError as e:
        raise Invalid(*yaml_error(path, e, text)) from None
    except RecursionError:
        raise Invalid(Loc(path, 1, 1), "nested too deeply; not a policy") from None


# --------------------------------------------------------------- documents and extends

def read_document(path, kind="AgentPolicy", what="policy", start_from="a file in policies/",
                  keys="apiVersion, kind and metadata"):
    """One file -> its root Map, checked to be a non-empty mapping of this
    kind (a policy; a manifest, harness/manifest.py, reads its own here);
    Invalid otherwise."""
    text = read_text(path, what)
    root = parse(text, path)
    start = Loc(path, 1, 1)
    if root is None:
        raise Invalid(start, f"{what} is empty; start from {start_from}")
    if not isinstance(root, dict):
        raise Invalid(start, f"a {what} is a mapping with {keys}, not a {yaml_type(root)}")
    if root.get("kind") != kind:
        where = root.val_locs.get("kind", root.loc)
        got = f"kind is {root['kind']!r}; " if "kind" in root else ""
        raise Invalid(where, f"{got}'kind: {kind}' is required")
    return root


# lists a child's value replaces instead of appending to (None: any key):
# a command line is one value, not a list of permissions
REPLACED_LISTS = (("peers", "tools", None, "argv"),)


def _replaced(path):
    return any(len(p) == len(path) and all(a is None or a == b for a, b in zip(p, path))
               for p in REPLACED_LISTS)


def _merge_value(parent, child, path):
    if isinstance(parent, Map) and isinstance(child, Map):
        return _merge_maps(parent, child, skip=(), path=path)
    if isinstance(parent, Seq) and isinstance(child, Seq) and not _replaced(path):
        out = Seq(child.loc)
        for item, loc in zip(parent, parent.item_locs):
            out.put(item, loc)
        for item, loc in zip(child, child.item_locs):
            if item not in parent:
                out.put(item, loc)
        return out
    return child


def _merge_maps(parent, child, skip, path=()):
    out = Map(child.loc)
    for key, value in parent.items():
        if key not in child and key not in skip:
            out.put(key, value, parent.key_locs[key], parent.val_locs[key])
    for key, value in child.items():
        merged = (_merge_value(parent[key], value, path + (key,))
                  if key in parent and key not in skip else value)
        out.put(key, merged, child.key_locs[key], child.val_locs[key])
    return out


def merge(parent, child):
    """The effective document of ``child extends parent``: lists are
    appended (parent first, duplicates dropped; a REPLACED_LISTS one is the
    child's), mappings merged key by key, scalars and mismatched types taken
    from the child. ``metadata`` is the
    child's own; ``extends`` is consumed."""
    out = _merge_maps(parent, child, skip=("metadata", "extends"))
    if "metadata" not in child:
        out.pop("metadata", None)
    out.pop("extends", None)
    return out


def load_effective(path, _chain=()):
    """Read ``path`` and the chain it extends; return (effective Map, files)
    with files listed base first. Invalid on the first problem."""
    real = os.path.realpath(path)
    root = read_document(path)
    ext = root.get("extends")
    if ext is None:
        root.pop("extends", None)
        return root, [path]
    where = root.val_locs["extends"]
    if not isinstance(ext, str) or not ext:
        raise Invalid(where, f"extends: expected a file name, got {yaml_type(ext)}")
    base = ext if os.path.isabs(ext) else os.path.join(os.path.dirname(path), ext)
    chain = _chain + (real,)
    if os.path.realpath(base) in chain:
        names = [os.path.basename(p) for p in chain[chain.index(os.path.realpath(base)):]]
        raise Invalid(where, f"extends cycle: {' -> '.join(names + [os.path.basename(base)])}")
    if len(chain) > MAX_EXTENDS:
        raise Invalid(where, f"extends chain longer than {MAX_EXTENDS} files")
    if not os.path.isfile(base):
        reason = "no such file" if not os.path.exists(base) else "not a regular file"
        shown = f" ({base})" if base != ext else ""
        raise Invalid(where, f"cannot read base policy {ext!r}{shown}: {reason}")
    parent, files = load_effective(base, chain)
    return merge(parent, root), files + [path]
