"""Policies: the YAML permission language (apiVersion agentwatch/v1, kind
AgentPolicy). ``load(path)`` reads a file and the chain it ``extends``,
validates the effective policy and returns a ``Policy`` with its canonical
digest; ``compile_policy`` (compile.py) turns it into the matchers the engine
judges events with. docs/policy.md is the reference.

Modules: source (files, YAML with positions, extends), schema (typed model
and the validator lint and load share), matchers (globs, paths, CIDRs),
compile (CompiledPolicy), lint / explain / diff (the `agentwatch policy` tools).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field

from ..core.errors import PolicyError
from .model import API_VERSION, PolicySpec, Problem
from .schema import validate
from .source import (MAX_POLICY_BYTES, Invalid, load_effective, plain, read_text,
                     yaml_error_message)

__all__ = ["API_VERSION", "MAX_POLICY_BYTES", "Policy", "PolicyError", "Problem", "canonical_digest",
           "check", "load", "read_text", "yaml_error_message"]


@dataclass
class Policy:
    path: str
    data: dict                       # effective policy after extends, before variables
    digest: str                      # "sha256:<hex>" of the canonical JSON form of data
    name: str = ""
    sensors: list = field(default_factory=list)
    spec: PolicySpec = None          # typed model (model.py)
    warnings: list = field(default_factory=list)   # [Problem]
    files: list = field(default_factory=list)      # the extends chain, base first

    @property
    def agent_name(self):
        ident = self.data.get("identity") or {}
        name = ident.get("name") if isinstance(ident, dict) else None
        return name if isinstance(name, str) else ""


def canonical_digest(data):
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def check(path):
    """Read and validate a policy without raising for its problems:
    (Policy or None, [Problem]). Policy is None when there is any error."""
    try:
        doc, files = load_effective(path)
    except Invalid as e:
        return None, [Problem(e.loc, e.message)]
    spec, problems = validate(doc)
    if any(p.severity == "error" for p in problems):
        return None, problems
    data = plain(doc)
    policy = Policy(path=os.path.abspath(path), data=data, digest=canonical_digest(data),
                    name=spec.name, sensors=spec.sensor_groups(), spec=spec,
                    warnings=problems, files=[os.path.abspath(f) for f in files])
    return policy, problems


def load(path):
    """Read and check a policy file; PolicyError listing every error, one
    per line, each FILE:LINE:COL: message."""
    policy, problems = check(path)
    if policy is None:
        raise PolicyError("\n".join(str(p) for p in problems if p.severity == "error"))
    return policy
