"""Manifests: several agents declared in one YAML file (apiVersion
agentwatch/v1, kind AgentManifest) for `agentwatch up` (docs/manifest.md,
JSON Schema policies/agentmanifest.schema.json).

Read and validated the way policies are, with their machinery: the YAML
reader that keeps FILE:LINE:COL for every key and value and refuses
hostile input (policy/source.py), the Checker that reports each problem
at its value (policy/checker.py), and Problem, whose str() is
FILE:LINE:COL: message. Each agent's policy is checked too, and its
problems are reported at their own place in the policy file. Paths are
relative to the manifest's directory and come out absolute.
"""
import fnmatch
import os
import re
from dataclasses import dataclass, field

from ..core.errors import PolicyError
from ..policy import check as check_policy
from ..policy.checker import Checker, TooMany
from ..policy.model import API_VERSION, Problem
from ..policy.source import Invalid, Loc, read_document, yaml_type

KIND = "AgentManifest"
TOP_KEYS = ("apiVersion", "kind", "metadata", "gateway", "agents")
METADATA_KEYS = ("name", "description")
GATEWAY_KEYS = ("config",)
AGENT_KEYS = ("name", "command", "policy", "weight", "budgets", "workspace", "env", "prompt",
              "allow_downgrade")
BUDGET_KEYS = ("tokens", "requests", "cost")
WEIGHT_RANGE = (1, 10000)          # the run option's (core/options.py RunOptions.weight)
DEFAULT_WEIGHT = 100               # the kernel's own default cpu.weight: an equal share
MAX_AGENTS = 256
# a manifest's and an agent's name name files (<state dir>/up/NAME.json, an agent's log)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


@dataclass(frozen=True)
class AgentSpec:
    """One agent of a manifest, paths absolute."""
    name: str
    command: tuple
    policy: str
    weight: int = DEFAULT_WEIGHT
    budgets: dict = field(default_factory=dict)     # tokens, requests, cost (the gateway's)
    workspace: str = None          # default: the manifest's directory
    env: dict = field(default_factory=dict)         # added to the environment `up` runs in
    prompt: str = None
    allow_downgrade: bool = False  # `agentwatch run --allow-downgrade`
    loc: Loc = None


@dataclass(frozen=True)
class Manifest:
    path: str                      # absolute
    name: str
    agents: tuple                  # (AgentSpec, ...), in file order
    description: str = None
    gateway_config: str = None     # gateway.config, absolute (the LLM gateway's, later)

    def agent(self, name):
        return next((a for a in self.agents if a.name == name), None)


def check(path):
    """Read and validate a manifest without raising for its problems:
    (Manifest or None, [Problem]); None when there is any error."""
    c = Checker()
    try:
        root = read_document(path, KIND, "manifest", "examples/manifest.yaml",
                             "apiVersion, kind, metadata and agents")
        manifest = _manifest(c, root, path)
    except Invalid as e:
        return None, [Problem(e.loc, e.message)]
    except TooMany:
        manifest = None
    if any(p.severity == "error" for p in c.problems):
        return None, c.problems
    return manifest, c.problems


def load(path):
    """A valid Manifest; PolicyError listing its errors, one per line,
    each FILE:LINE:COL: message."""
    manifest, problems = check(path)
    if manifest is None:
        raise PolicyError("\n".join(str(p) for p in problems if p.severity == "error"))
    return manifest


# ---------------------------------------------------------------- the sections

def _manifest(c, root, path):
    c.mapping(root, root.loc, "manifest", TOP_KEYS)
    if root.get("apiVersion") != API_VERSION:
        c.error(root.val_locs.get("apiVersion", root.loc),
                f"apiVersion: expected {API_VERSION!r}, got {root.get('apiVersion')!r}")
    here = os.path.dirname(os.path.abspath(path))
    name = description = None
    meta = _required(c, root, "metadata", "manifest")
    if meta is not None and c.mapping(meta, root.val_locs["metadata"], "metadata", METADATA_KEYS):
        name = _name(c, meta, "metadata")
        if "description" in meta:
            description = c.string(meta["description"], meta.val_locs["description"],
                                   "metadata.description")
    gateway = None
    if "gateway" in root:
        g = c.mapping(root["gateway"], root.val_locs["gateway"], "gateway", GATEWAY_KEYS)
        if g is not None:
            # the LLM gateway's configuration: read by the gateway, checked here as a path only
            gateway = _path(c, g, "config", "gateway.config", here, must=None)
    agents = []
    raw = _required(c, root, "agents", "manifest")
    if raw is not None:
        agents = _agents(c, raw, root.val_locs["agents"], here)
    if name is None:
        return None
    return Manifest(path=os.path.abspath(path), name=name, agents=tuple(agents),
                    description=description, gateway_config=gateway)


def _agents(c, raw, loc, here):
    if not isinstance(raw, list):
        c.error(loc, f"agents: expected a list of agents, got {yaml_type(raw)}")
        return []
    if not raw:
        c.error(loc, "agents: a manifest declares at least one agent")
    if len(raw) > MAX_AGENTS:
        c.error(loc, f"agents: at most {MAX_AGENTS} agents, got {len(raw)}")
        return []
    out, seen = [], {}
    for i, (item, iloc) in enumerate(zip(raw, raw.item_locs)):
        where = f"agents[{i}]"
        if c.mapping(item, iloc, where, AGENT_KEYS) is None:
            continue
        agent = _agent(c, item, where, here)
        if agent is None:
            continue
        if agent.name in seen:
            c.error(item.val_locs["name"], f"{where}.name: duplicate agent name {agent.name!r} "
                                           f"(first at {seen[agent.name].ref(item.val_locs['name'])})")
            continue
        seen[agent.name] = item.val_locs["name"]
        out.append(agent)
    return out


def _agent(c, m, where, here):
    ok = True
    name = _name(c, m, where)
    command = _command(c, m, where)
    policy = _path(c, m, "policy", f"{where}.policy", here, must="file", required=True)
    if policy is not None:
        pol, found = check_policy(policy)
        for p in found:
            if p.severity == "error":
                ok = False
                c.error(p.loc, p.message)     # at its own FILE:LINE:COL, in the policy
        pattern = pol.agent_name if pol is not None else ""
        if name is not None and pattern and not fnmatch.fnmatchcase(name, pattern):
            # the run would refuse it (run/prepare.py): said here, where it is fixed
            c.error(m.val_locs["name"], f"{where}.name: {name!r} does not match identity.name "
                                        f"{pattern!r} of its policy {m['policy']!r}")
            ok = False
    weight = DEFAULT_WEIGHT
    if "weight" in m:
        weight = c.integer(m["weight"], m.val_locs["weight"], f"{where}.weight", *WEIGHT_RANGE)
    budgets = _budgets(c, m, where)
    workspace = _path(c, m, "workspace", f"{where}.workspace", here, must="dir")
    env = _env(c, m, where)
    prompt = _path(c, m, "prompt", f"{where}.prompt", here, must="file")
    downgrade = False
    if "allow_downgrade" in m:
        downgrade = c.boolean(m["allow_downgrade"], m.val_locs["allow_downgrade"], f"{where}.allow_downgrade")
    if None in (name, command, policy, weight, budgets, env, downgrade) or not ok:
        return None
    if ("workspace" in m and workspace is None) or ("prompt" in m and prompt is None):
        return None
    return AgentSpec(name=name, command=tuple(command), policy=policy, weight=weight, budgets=budgets,
                     workspace=workspace, env=env, prompt=prompt, allow_downgrade=downgrade, loc=m.loc)


def _required(c, m, key, where):
    if key not in m:
        c.error(m.loc, f"{where}: {key!r} is required")
        return None
    return m[key]


def _name(c, m, where):
    value = _required(c, m, "name", where)
    if value is None:
        return None
    value = c.string(value, m.val_locs["name"], f"{where}.name")
    if value is not None and not NAME.match(value):
        c.error(m.val_locs["name"], f"{where}.name: {value!r} is not a name: letters, digits, '_', "
                                    "'.' and '-', starting with a letter or digit, at most 64")
        return None
    return value


def _command(c, m, where):
    value = _required(c, m, "command", where)
    if value is None:
        return None
    loc = m.val_locs["command"]
    if not isinstance(value, list) or not value:
        c.error(loc, f"{where}.command: expected a list of strings (the program and its "
                     f"arguments), got {'an empty list' if value == [] else yaml_type(value)}")
        return None
    out = []
    for i, (arg, aloc) in enumerate(zip(value, value.item_locs)):
        if not isinstance(arg, str):
            c.error(aloc, f"{where}.command[{i}]: expected a string, got {yaml_type(arg)} "
                          "(quote it)")
            return None
        out.append(arg)
    if not out[0]:
        c.error(value.item_locs[0], f"{where}.command[0]: the program is an empty string")
        return None
    return out


def _path(c, m, key, name, here, must, required=False):
    """An absolute path from a string relative to the manifest's
    directory; must: "file" or "dir" that exists, or None."""
    if key not in m:
        if required:
            c.error(m.loc, f"{name.rpartition('.')[0] or name}: {key!r} is required")
        return None
    loc = m.val_locs[key]
    value = c.string(m[key], loc, name, "a path")
    if value is None:
        return None
    if not value:
        c.error(loc, f"{name}: expected a path, got an empty string")
        return None
    path = os.path.normpath(os.path.join(here, value))
    if must == "file" and not os.path.isfile(path):
        c.error(loc, f"{name}: {value!r} is not a file ({path})")
        return None
    if must == "dir" and not os.path.isdir(path):
        c.error(loc, f"{name}: {value!r} is not a directory ({path})")
        return None
    return path


def _budgets(c, m, where):
    if "budgets" not in m:
        return {}
    b = c.mapping(m["budgets"], m.val_locs["budgets"], f"{where}.budgets", BUDGET_KEYS)
    if b is None:
        return None
    out, ok = {}, True
    for key, value, loc in c.entries(b, BUDGET_KEYS):
        name = f"{where}.budgets.{key}"
        if key == "cost":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                c.error(loc, f"{name}: expected a number (the upstream's currency), got "
                             f"{yaml_type(value)}")
                ok = False
            elif not value > 0 or value != value or value == float("inf"):
                c.error(loc, f"{name}: must be more than zero and finite, got {value}")
                ok = False
            else:
                out[key] = value
        else:
            n = c.integer(value, loc, name, 1, 10 ** 15)
            ok = ok and n is not None
            out[key] = n
    return out if ok else None


def _env(c, m, where):
    if "env" not in m:
        return {}
    e = m["env"]
    loc = m.val_locs["env"]
    if not isinstance(e, dict):
        c.error(loc, f"{where}.env: expected a mapping of names to strings, got {yaml_type(e)}")
        return None
    ok = True
    for key, value in e.items():
        if not key or "=" in key or "\0" in key:
            c.error(e.key_locs[key], f"{where}.env: {key!r} is not an environment variable name")
            ok = False
        elif not isinstance(value, str):
            c.error(e.val_locs[key], f"{where}.env.{key}: expected a string, got {yaml_type(value)} "
                                     "(quote it)")
            ok = False
        elif "\0" in value:
            c.error(e.val_locs[key], f"{where}.env.{key}: a NUL byte cannot be in the environment")
            ok = False
    return dict(e) if ok else None
