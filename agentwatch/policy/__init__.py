"""Policies: YAML loading with line-numbered errors, identity metadata and
the canonical digest that goes into a run's identity.

This is the loading layer; the permission sections are judged by the engine
(see docs/policy.md)."""
import hashlib
import json
import os
from dataclasses import dataclass, field

import yaml

from ..errors import PolicyError

MAX_POLICY_BYTES = 1 << 20
API_VERSION = "agentwatch/v1"


@dataclass
class Policy:
    path: str
    data: dict
    digest: str                      # "sha256:<hex>" of the canonical JSON form
    name: str = ""
    sensors: list = field(default_factory=list)

    @property
    def agent_name(self):
        ident = self.data.get("identity") or {}
        return ident.get("name") or ""


def canonical_digest(data):
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _where(path, node):
    mark = getattr(node, "start_mark", None)
    if mark is None:
        return path
    return f"{path}:{mark.line + 1}:{mark.column + 1}"


def yaml_error_message(path, e):
    """One line, FILE:LINE:COL: invalid YAML: problem."""
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        where = f"{path}:{mark.line + 1}:{mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    elif isinstance(e, yaml.reader.ReaderError):
        where = f"{path}:1:1"
        problem = f"unacceptable character #x{e.character:04x} at byte {e.position}: not a text policy"
    else:
        where, problem = path, str(e).splitlines()[0]
    return f"{where}: invalid YAML: {problem}"


def read_text(path):
    try:
        size = os.path.getsize(path)
        if size > MAX_POLICY_BYTES:
            raise PolicyError(f"{path}: file is {size} bytes; a policy may be at most "
                              f"{MAX_POLICY_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read policy: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: not a text file (invalid UTF-8 at byte {e.start})") from None


def load(path):
    """Read and check a policy file; PolicyError with FILE:LINE:COL on any problem."""
    text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(yaml_error_message(path, e)) from None
    if data is None:
        raise PolicyError(f"{path}:1:1: policy is empty; start from a file in policies/")
    if not isinstance(data, dict):
        raise PolicyError(f"{_where(path, node)}: a policy is a mapping with apiVersion, kind "
                          f"and metadata, not a {type(data).__name__}")
    if data.get("kind") != "AgentPolicy":
        raise PolicyError(f"{_where(path, node)}: 'kind: AgentPolicy' is required")
    meta = data.get("metadata") or {}
    monitor = data.get("monitor") or ["process", "file", "net", "sensitive"]
    return Policy(path=os.path.abspath(path), data=data, digest=canonical_digest(data),
                  name=str(meta.get("name", "")), sensors=list(monitor))
