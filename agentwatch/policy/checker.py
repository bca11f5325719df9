"""The validator's primitives: ``Checker`` reads values of a located
document (source.py's Map and List) as mappings, strings, integers, lists,
globs, actions..., each reporting a ``Problem`` at the value's FILE:LINE:COL
when it is not one, and stops a validation at MAX_PROBLEMS. schema.py's
sections and crosschecks.py's checks are written with it.
"""
import difflib

from ..core import units
from ..core.events import ACTIONS          # the violation actions (the contract in events.py)
from . import matchers as M
from .model import Item, Problem
from .source import yaml_type

def did_you_mean(word, choices):
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


MAX_PROBLEMS = 100


class TooMany(Exception):
    pass


class Checker:
    """Collects problems; stops the validation at MAX_PROBLEMS (a file of
    70,000 unknown keys needs its first hundred reported, not all)."""

    def __init__(self):
        self.problems = []

    def _add(self, problem):
        self.problems.append(problem)
        if len(self.problems) >= MAX_PROBLEMS:
            raise TooMany()

    def error(self, loc, message):
        self._add(Problem(loc, message))

    def warn(self, loc, message):
        self._add(Problem(loc, message, "warning"))

    def mapping(self, value, loc, name, known):
        """value if it is a mapping (reporting unknown keys), else None."""
        if not isinstance(value, dict):
            self.error(loc, f"{name}: expected a mapping, got {yaml_type(value)}")
            return None
        for key in value:
            if key not in known:
                where = f" in {name}" if name != "policy" else ""
                self.error(value.key_locs[key], f"unknown key {key!r}{where}{did_you_mean(key, known)}")
        return value

    def entries(self, m, known):
        """(key, value, value_loc) of the known keys present, in schema order."""
        for key in known:
            if key in m:
                yield key, m[key], m.val_locs[key]

    def string(self, value, loc, name, what="a string"):
        if not isinstance(value, str):
            self.error(loc, f"{name}: expected {what}, got {yaml_type(value)}")
            return None
        return value

    def boolean(self, value, loc, name):
        if not isinstance(value, bool):
            self.error(loc, f"{name}: expected true or false, got {yaml_type(value)}")
            return None
        return value

    def integer(self, value, loc, name, minimum=1, maximum=None):
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(loc, f"{name}: expected an integer, got {yaml_type(value)}")
            return None
        if value < minimum:
            self.error(loc, f"{name}: must be at least {minimum}, got {value}")
            return None
        if maximum is not None and value > maximum:
            self.error(loc, f"{name}: must be at most {maximum}, got {value}")
            return None
        return value

    def unit(self, parse, value, loc, name):
        """A duration or size parsed by agentwatch.core.units, the parser the
        sandbox applies it with; None (reported) when it is not one."""
        try:
            return parse(value)
        except units.UnitError as e:
            self.error(loc, f"{name}: {e}")
            return None

    def items(self, value, loc, name, what):
        """(index, item, loc) of a list; reports a non-list and exact
        duplicates (dropped)."""
        if not isinstance(value, list):
            self.error(loc, f"{name}: expected a list of {what}, got {yaml_type(value)}")
            return None
        seen, out = {}, []
        for i, (item, iloc) in enumerate(zip(value, value.item_locs)):
            key = repr(item)
            if key in seen:
                self.warn(iloc, f"{name}: duplicate entry {item!r} (already at {seen[key].ref(iloc)})")
                continue
            seen[key] = iloc
            out.append((i, item, iloc))
        return out

    def strings(self, value, loc, name, what, one):
        """Items of a list of strings (``what``; each ``one``), as Item;
        None if value is not a list."""
        triples = self.items(value, loc, name, what)
        if triples is None:
            return None
        out = []
        for i, item, iloc in triples:
            if isinstance(item, str):
                out.append(Item(item, iloc))
            else:
                self.error(iloc, f"{name}[{i}]: expected {one}, got {yaml_type(item)}")
        return out

    def globs(self, value, loc, name):
        out = self.strings(value, loc, name, "path globs", "a path glob")
        if out is None:
            return None
        good = []
        for item in out:
            if self.glob(item, name):
                good.append(item)
        return tuple(good)

    def glob(self, item, name):
        errors, warnings = M.check_glob(item.value)
        for message in errors:
            self.error(item.loc, f"{name}: {message}")
        for message in warnings:
            self.warn(item.loc, f"{name}: {message}")
        return not errors

    def action(self, value, loc, name):
        if value not in ACTIONS:
            shown = value if isinstance(value, str) else yaml_type(value)
            hint = did_you_mean(value, ACTIONS) if isinstance(value, str) else ""
            self.error(loc, f"{name}: unknown action {shown!r}{hint}; expected one of {', '.join(ACTIONS)}")
            return None
        return value
