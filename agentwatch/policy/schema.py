"""What a policy MAY SAY: the one validator that both ``load`` and
``lint`` use.

``validate(doc)`` takes the effective document (a located Map, see
source.py) and returns the typed ``PolicySpec`` (model.py) and every problem
found, each a ``Problem`` with FILE:LINE:COL. Errors make a policy unusable;
warnings (shadowed rules, W^X...) are reported by lint and kept on the
Policy. Here are the top-level checks and one function per section; the
primitives they use are checker.py's, the checks across sections are
crosschecks.py's. The format itself is documented in docs/policy.md and, for
editors, in policies/agentpolicy.schema.json; tests keep the three in step.
"""
import re

from ..core import units
from . import matchers as M
from .checker import MAX_PROBLEMS, Checker, TooMany, did_you_mean
from .crosschecks import CROSS_CHECKS
from .model import (API_VERSION, BUDGET_KEYS, HOST_NAMESPACES, LOOP_KEYS, MAX_CHECK_TIMEOUT,
                    MAX_GRACE, MAX_MAX_TTL, MAX_RATE, MAX_TOOL_TIMEOUT, MIN_CHECK_EVERY,
                    MIN_NO_PROGRESS, NETLINK_PROTOCOLS, PROTOCOLS, RULES, SECTIONS, SENSOR_GROUPS,
                    SOCKET_FAMILIES, TOGGLES, DoneCondition, ExecRule, Filesystem, Identity, Item,
                    Network, NetRule, Peers, PolicySpec, Problem, Process, Resources, RunAs,
                    TerminationRules, Tool, duration_text, native_syscalls, syscall_status)
from .source import yaml_type

_SIGNER = re.compile(r"ed25519:[0-9a-fA-F]{64}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# a user or group name as shadow-utils accepts it (no all-digit names: those are ids)
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
MAX_ID = 4294967294              # (uid_t)-1 means "unchanged" to the set*id calls
# what the kernel takes as a limit (sandbox/limits.py writes them; more or
# less is refused with EINVAL/ERANGE, measured on 6.18):
MAX_PIDS = 4194304               # PID_MAX_LIMIT, the largest pids.max
MIN_CPU, MAX_CPU = 0.01, 4096    # a CFS quota of at least 1 ms per 100 ms period
RUN_AS_KEYS = ("user", "group", "groups")
PROCESS_KEYS = ("exec", "max_processes", *TOGGLES, "run_as", "host_namespaces")
PEERS_KEYS = ("description", "skills", "send", "receive", "grant", "accept", "max_ttl", "rate", "tools")
SKILL_KEYS = ("name", "description")
TOOL_KEYS = ("argv", "timeout")
_TOOL = re.compile(r"[A-Za-z0-9_.-]{1,63}")
TERMINATION_KEYS = ("done", "no_progress", "loop", "budget", "grace")
DONE_KEYS = ("file", "matches", "command", "message", "every", "timeout")
DONE_MESSAGE_KEYS = ("to", "tag")
MAX_LOOP = 1000000
MAX_COUNT = 1 << 62              # a budget count (execs, processes, tokens)


# --------------------------------------------------------------- sections

TOP_KEYS = ("apiVersion", "kind", "metadata", "extends", "identity", "filesystem", "network",
            "process", "syscalls", "resources", "peers", "termination", "on_violation", "monitor")


def _metadata(ck, value, loc, spec):
    m = ck.mapping(value, loc, "metadata", ("name", "description"))
    if m is None:
        return
    if "name" not in m:
        ck.error(loc, "metadata: missing required key 'name'")
    for key, v, vloc in ck.entries(m, ("name", "description")):
        s = ck.string(v, vloc, f"metadata.{key}")
        if key == "name" and s is not None:
            if not _NAME.fullmatch(s):
                ck.error(vloc, f"metadata.name: {s!r} is not a name (letters, digits, '.', '_', '-'; "
                               f"at most 63)")
            spec.name = s
        elif key == "description" and s is not None:
            spec.description = s


def _identity(ck, value, loc, spec):
    keys = ("name", "owner", "required_signer")
    m = ck.mapping(value, loc, "identity", keys)
    if m is None:
        return
    ident = spec.identity = Identity()
    for key, v, vloc in ck.entries(m, keys):
        s = ck.string(v, vloc, f"identity.{key}")
        if s is None:
            continue
        if key == "name":
            for message in M.check_name_glob(s, "agent name glob"):
                ck.error(vloc, f"identity.name: {message}")
        elif key == "required_signer" and not _SIGNER.fullmatch(s):
            ck.error(vloc, f"identity.required_signer: expected 'ed25519:' and the key's 64 hex "
                           f"digit fingerprint, got {s!r}")
            continue
        setattr(ident, key, s.lower() if key == "required_signer" else s)


def _filesystem(ck, value, loc, spec):
    keys = ("read", "write", "exec", "deny")
    m = ck.mapping(value, loc, "filesystem", keys)
    if m is None:
        return
    fs = spec.filesystem = Filesystem()
    for key, v, vloc in ck.entries(m, keys):
        globs = ck.globs(v, vloc, f"filesystem.{key}")
        if globs is not None:
            setattr(fs, key, globs)
            spec.locs[f"filesystem.{key}"] = vloc
    fs.deny = fs.deny or ()


def _ports(ck, value, loc, name):
    triples = ck.items(value, loc, name, 'ports (443 or "8000-8100")')
    if triples is None:
        return None
    out = []
    for _, item, iloc in triples:
        rng, err = M.parse_port(item)
        if err:
            ck.error(iloc, f"{name}: {err}")
        else:
            out.append(rng)
    return tuple(out)


def _net_rule(ck, value, loc, name):
    keys = ("cidr", "domain", "ports", "protocol")
    m = ck.mapping(value, loc, name, keys)
    if m is None:
        return None
    if ("cidr" in m) == ("domain" in m):
        ck.error(loc, f"{name}: give exactly one of 'cidr' or 'domain'")
        return None
    rule = {"loc": loc}
    for key, v, vloc in ck.entries(m, keys):
        if key == "ports":
            rule["ports"] = _ports(ck, v, vloc, f"{name}.ports")
            continue
        s = ck.string(v, vloc, f"{name}.{key}")
        if s is None:
            return None
        if key == "cidr":
            net, err = M.parse_cidr(s)
            if err:
                ck.error(vloc, f"{name}.cidr: {err}")
                return None
            rule["cidr"] = str(net)
        elif key == "domain":
            err = M.check_domain(s)
            if err:
                ck.error(vloc, f"{name}.domain: {err}")
                return None
            rule["domain"] = s.lower().rstrip(".")
        elif s not in PROTOCOLS:
            ck.error(vloc, f"{name}.protocol: unknown protocol {s!r}{did_you_mean(s, PROTOCOLS)}; "
                           f"expected tcp, udp or any")
            return None
        else:
            rule["protocol"] = s
    return NetRule(**rule)


def _unix_entries(ck, value, loc, name):
    items = ck.strings(value, loc, name, 'socket path globs ("@name" for abstract)', "a socket path glob")
    if items is None:
        return None
    good = []
    for item in items:
        if item.value.startswith("@"):
            errors = M.check_name_glob(item.value[1:], "abstract socket name")
            for message in errors:
                ck.error(item.loc, f"{name}: {message}")
            ok = not errors
        else:
            ok = ck.glob(item, name)
        if ok:
            good.append(item)
    return tuple(good)


def _names(ck, value, loc, name, table, what):
    """A list of names from table (socket families, netlink protocols), or None."""
    items = ck.strings(value, loc, name, f"{what} names", f"a {what} name")
    if items is None:
        return None
    good = []
    for item in items:
        if item.value in table:
            good.append(item.value)
        elif name == "network.families" and item.value == "netlink":
            ck.error(item.loc, "network.families: netlink is allowed by protocol: list them in "
                               "network.netlink (default [route])")
        else:
            ck.error(item.loc, f"{name}: unknown {what} {item.value!r}"
                               f"{did_you_mean(item.value, table)}; known: {', '.join(sorted(table))}")
    return tuple(dict.fromkeys(good))


def _network(ck, value, loc, spec):
    keys = ("allow", "loopback", "unix", "families", "netlink", "guard")
    m = ck.mapping(value, loc, "network", keys)
    if m is None:
        return
    net = spec.network = Network()
    for key, v, vloc in ck.entries(m, keys):
        spec.locs[f"network.{key}"] = vloc
        if key == "families":
            net.families = _names(ck, v, vloc, "network.families", SOCKET_FAMILIES, "socket family") or ()
        elif key == "netlink" and not isinstance(v, bool):
            net.netlink = _names(ck, v, vloc, "network.netlink", NETLINK_PROTOCOLS, "netlink protocol") or ()
        elif key == "netlink":
            net.netlink = True if v else ()
        elif key == "guard":
            if isinstance(v, bool):
                net.guard = v
            else:
                ck.error(vloc, f"network.guard: expected true or false, got {yaml_type(v)}")
        elif key == "allow":
            triples = ck.items(v, vloc, "network.allow", "rules ({cidr: ...} or {domain: ...})")
            rules = [_net_rule(ck, item, iloc, f"network.allow[{i}]") for i, item, iloc in triples or ()]
            net.allow = tuple(r for r in rules if r is not None)
        elif isinstance(v, bool):
            setattr(net, key, v)
        elif not isinstance(v, list):
            what = "a list of ports" if key == "loopback" else "a list of socket path globs"
            ck.error(vloc, f"network.{key}: expected true, false or {what}, got {yaml_type(v)}")
        elif key == "loopback":
            net.loopback = _ports(ck, v, vloc, "network.loopback") or ()
        else:
            net.unix = _unix_entries(ck, v, vloc, "network.unix") or ()


def _exec_entry(ck, item, iloc, name):
    if isinstance(item, str):
        entry = Item(item, iloc)
        return ExecRule(item, None, iloc) if ck.glob(entry, name) else None
    m = ck.mapping(item, iloc, name, ("path", "sha256"))
    if m is None:
        return None
    if "path" not in m:
        ck.error(iloc, f"{name}: missing required key 'path'")
        return None
    path = ck.string(m["path"], m.val_locs["path"], f"{name}.path", "a path")
    if path is None or not ck.glob(Item(path, m.val_locs["path"]), f"{name}.path"):
        return None
    digest = None
    if "sha256" in m:
        sloc = m.val_locs["sha256"]
        digest = ck.string(m["sha256"], sloc, f"{name}.sha256", "64 hex digits")
        if digest is None:
            return None
        if not _SHA256.fullmatch(digest):
            ck.error(sloc, f"{name}.sha256: expected 64 hex digits, got {digest!r}")
            return None
        if M.has_wildcards(path):
            ck.error(sloc, f"{name}.sha256: a pinned hash needs a literal path, not the glob {path!r}")
            return None
    return ExecRule(path, digest.lower() if digest else None, iloc)


def _account(ck, value, loc, name, what):
    """A user or group as written: a name (str) or an id (int, or a string
    of digits); None (reported) when it is neither."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= MAX_ID:
            ck.error(loc, f"{name}: {what} id must be between 0 and {MAX_ID}, got {value}")
            return None
        return value
    if not isinstance(value, str):
        ck.error(loc, f"{name}: expected a {what} name or numeric id, got {yaml_type(value)}")
        return None
    if not _ACCOUNT.fullmatch(value):
        ck.error(loc, f"{name}: {value!r} is not a {what} name (letters, digits, '_', '.', '-'; "
                      f"at most 32; not starting with a digit or '-')")
        return None
    return value


def _host_has(kind, value):
    """Whether a named user/group exists on this host (ids always count)."""
    if isinstance(value, int):
        return True
    import grp
    import pwd
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(value)
        return True
    except KeyError:
        return False


def _run_as(ck, value, loc):
    m = ck.mapping(value, loc, "process.run_as", RUN_AS_KEYS)
    if m is None:
        return None
    if "user" not in m:
        ck.error(loc, "process.run_as: missing required key 'user'")
        return None
    fields, ok = {}, True
    for key, v, vloc in ck.entries(m, RUN_AS_KEYS):
        kind = "user" if key == "user" else "group"
        if key == "groups":
            triples = ck.items(v, vloc, "process.run_as.groups", "groups (names or ids)")
            written = [(g, gloc, f"process.run_as.groups[{i}]") for i, g, gloc in triples or ()]
            ok = ok and triples is not None
        else:
            written = [(v, vloc, f"process.run_as.{key}")]
        accounts = []
        for value_, aloc, name in written:
            account = _account(ck, value_, aloc, name, kind)
            ok = ok and account is not None
            accounts.append(account)
            # the policy may be written for another host: a missing account is a
            # warning here, and `agentwatch run` refuses to start on such a host
            if account is not None and not _host_has(kind, account):
                ck.warn(aloc, f"{name}: no {kind} {account!r} on this host; agentwatch run "
                              f"refuses to start here (use a numeric id, or create the {kind})")
        fields[key] = tuple(accounts) if key == "groups" else accounts[0]
    if not ok:
        return None
    if isinstance(fields["user"], int) and fields.get("group") is None:
        import pwd
        try:
            pwd.getpwuid(fields["user"])
        except KeyError:
            ck.warn(m.val_locs["user"], f"process.run_as.user: uid {fields['user']} has no passwd "
                                        f"entry on this host, so it has no primary group here: give "
                                        f"process.run_as.group (agentwatch run refuses to start "
                                        f"without one)")
    return RunAs(loc=loc, **fields)


def _process(ck, value, loc, spec):
    keys = PROCESS_KEYS
    m = ck.mapping(value, loc, "process", keys)
    if m is None:
        return
    proc = spec.process = Process()
    for key, v, vloc in ck.entries(m, keys):
        spec.locs[f"process.{key}"] = vloc
        if key == "exec":
            triples = ck.items(v, vloc, "process.exec", "programs (paths or {path, sha256})")
            if triples is not None:
                rules = [_exec_entry(ck, item, iloc, f"process.exec[{i}]") for i, item, iloc in triples]
                proc.exec = tuple(r for r in rules if r is not None)
        elif key == "max_processes":
            proc.max_processes = ck.integer(v, vloc, "process.max_processes", maximum=MAX_PIDS)
        elif key == "run_as":
            proc.run_as = _run_as(ck, v, vloc)
        elif key == "host_namespaces":
            proc.host_namespaces = _host_namespaces(ck, v, vloc)
        else:
            b = ck.boolean(v, vloc, f"process.{key}")
            if b is not None:
                proc.toggles[key] = b


_SHARED_RISK = {"net": "the agent reads the host's network tables in /proc/net and /proc/<pid>/net "
                       "(every socket of the host: addresses, ports, unix socket paths) and shares "
                       "the host's abstract unix sockets",
                "pid": "the agent sees every host process in /proc (command lines, and more where "
                       "their owner allows) and can name them by pid (prlimit, setpriority, signals "
                       "where no other layer refuses)",
                "ipc": "the agent can attach host SysV shared memory, semaphores and message queues "
                       "and host POSIX queues"}


def _host_namespaces(ck, value, loc):
    """process.host_namespaces: the private namespaces an enforced run gives
    up (sandbox/namespaces.py); each one shared is a warning with its risk."""
    items = ck.strings(value, loc, "process.host_namespaces", "namespace names", "a namespace name")
    out = []
    for item in items or ():
        if item.value not in HOST_NAMESPACES:
            ck.error(item.loc, f"process.host_namespaces: unknown namespace {item.value!r} "
                               f"(one of: {', '.join(HOST_NAMESPACES)})")
            continue
        ck.warn(item.loc, f"process.host_namespaces: {item.value}: {_SHARED_RISK[item.value]}")
        out.append(item.value)
    return tuple(dict.fromkeys(out))


def _syscalls(ck, value, loc, spec):
    m = ck.mapping(value, loc, "syscalls", ("deny",))
    if m is None:
        return
    spec.syscalls = ()
    if "deny" not in m:
        return
    items = ck.strings(m["deny"], m.val_locs["deny"], "syscalls.deny", "syscall names", "a syscall name")
    good = []
    for item in items or ():
        status = syscall_status(item.value)
        if status == "unknown":
            ck.error(item.loc, f"syscalls.deny: unknown syscall {item.value!r}"
                               f"{did_you_mean(item.value.lower(), native_syscalls())}")
            continue
        if status == "other-arch":
            ck.warn(item.loc, f"syscalls.deny: {item.value!r} does not exist on this architecture")
        good.append(item)
    spec.syscalls = tuple(good)


def _resources(ck, value, loc, spec):
    keys = ("memory", "cpu", "pids", "wall_time")
    m = ck.mapping(value, loc, "resources", keys)
    if m is None:
        return
    res = spec.resources = Resources()
    for key, v, vloc in ck.entries(m, keys):
        res.written[key] = v
        if key == "memory":
            res.memory = ck.unit(units.parse_size, v, vloc, "resources.memory")
        elif key == "cpu":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and MIN_CPU <= v <= MAX_CPU
            if not ok:
                got = repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else yaml_type(v)
                ck.error(vloc, f"resources.cpu: expected a number of CPUs like 1.5 "
                               f"({MIN_CPU}-{MAX_CPU}), got {got}")
            res.cpu = float(v) if ok else None
        elif key == "pids":
            res.pids = ck.integer(v, vloc, "resources.pids", maximum=MAX_PIDS)
        else:
            res.wall_time = ck.unit(units.parse_duration, v, vloc, "resources.wall_time")


def _duration(ck, value, loc, name, maximum, maximum_text=None):
    """A duration (core/units.py) of at most ``maximum`` seconds, or None (reported)."""
    seconds = ck.unit(units.parse_duration, value, loc, name)
    if seconds is not None and seconds > maximum:
        ck.error(loc, f"{name}: must be at most {maximum_text or duration_text(maximum)}, got {value!r}")
        return None
    return seconds


def _skills(ck, value, loc):
    """peers.skills: names, or {name, description} -> ({"name", "description"}, ...)."""
    out, seen = [], {}
    for i, item, iloc in ck.items(value, loc, "peers.skills", "skills (names or {name, description})") or ():
        name = f"peers.skills[{i}]"
        if isinstance(item, str):
            skill, nloc = {"name": item, "description": None}, iloc
        elif isinstance(item, dict):
            m = ck.mapping(item, iloc, name, SKILL_KEYS)
            if "name" not in m:
                ck.error(iloc, f"{name}: missing required key 'name'")
                continue
            skill, nloc = {"name": None, "description": None}, m.val_locs["name"]
            for key, v, vloc in ck.entries(m, SKILL_KEYS):
                skill[key] = ck.string(v, vloc, f"{name}.{key}")
            if skill["name"] is None or ("description" in m and skill["description"] is None):
                continue
        else:
            ck.error(iloc, f"{name}: expected a skill name or {{name, description}}, got {yaml_type(item)}")
            continue
        if not skill["name"].strip():
            ck.error(nloc, f"{name}: empty skill name")
            continue
        if skill["name"] in seen:
            ck.error(nloc, f"{name}: skill {skill['name']!r} is already listed (at {seen[skill['name']].ref(nloc)})")
            continue
        seen[skill["name"]] = nloc
        out.append(skill)
    return tuple(out)


def _agent_globs(ck, value, loc, name):
    items = ck.strings(value, loc, name, "agent name globs", "an agent name glob")
    good = []
    for item in items or ():
        errors = M.check_name_glob(item.value, "agent name glob")
        for message in errors:
            ck.error(item.loc, f"{name}: {message}")
        if not errors:
            good.append(item)
    return tuple(good)


def _tool_name_error(text):
    if _TOOL.fullmatch(text):
        return None
    return f"{text!r} is not a tool name (letters, digits, '.', '_', '-'; 1 to 63)"


def _tool_names(ck, value, loc, name):
    items = ck.strings(value, loc, name, "tool names", "a tool name")
    good = []
    for item in items or ():
        err = _tool_name_error(item.value)
        if err:
            ck.error(item.loc, f"{name}: {err}")
        else:
            good.append(item)
    return tuple(good)


def _argv(ck, value, loc, name, runner="the broker runs it"):
    """A command line: a non-empty list of strings, argv[0] an absolute path.
    Not ck.strings: a repeated argument ('-v', '-v') is an argument, not a
    duplicate entry."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else yaml_type(value)
        ck.error(loc, f"{name}: expected a non-empty list of strings (the program and its "
                      f"first arguments), got {got}")
        return None
    ok = True
    for i, (item, iloc) in enumerate(zip(value, value.item_locs)):
        if not isinstance(item, str):
            ck.error(iloc, f"{name}[{i}]: expected a string, got {yaml_type(item)}")
            ok = False
        elif "\0" in item:
            ck.error(iloc, f"{name}[{i}]: a NUL byte cannot be in an argument")
            ok = False
        elif i == 0 and not item.startswith("/"):
            ck.error(iloc, f"{name}[0]: {item!r} is not an absolute path ({runner} "
                           f"without a PATH search)")
            ok = False
    return tuple(value) if ok else None


def _tools(ck, value, loc, spec):
    """peers.tools -> {name: Tool} of the valid ones; every name written is
    in spec.locs ("peers.tools.NAME"), so a grant of a tool written wrong is
    not also reported as undeclared."""
    if not isinstance(value, dict):
        ck.error(loc, f"peers.tools: expected a mapping of tool names to {{argv, timeout}}, "
                      f"got {yaml_type(value)}")
        return {}
    tools = {}
    for tool, v in value.items():
        name, tloc = f"peers.tools.{tool}", value.val_locs[tool]
        spec.locs[name] = tloc
        err = _tool_name_error(tool)
        if err:
            ck.error(value.key_locs[tool], f"peers.tools: {err}")
            continue
        m = ck.mapping(v, tloc, name, TOOL_KEYS)
        if m is None:
            continue
        if "argv" not in m:
            ck.error(tloc, f"{name}: missing required key 'argv'")
            continue
        fields = {}
        for key, tv, vloc in ck.entries(m, TOOL_KEYS):
            if key == "argv":
                fields["argv"] = _argv(ck, tv, vloc, f"{name}.argv")
            else:
                fields["timeout"] = _duration(ck, tv, vloc, f"{name}.timeout", MAX_TOOL_TIMEOUT)
        if all(f is not None for f in fields.values()):
            tools[tool] = Tool(tool, loc=tloc, **fields)
    return tools


def _peers(ck, value, loc, spec):
    m = ck.mapping(value, loc, "peers", PEERS_KEYS)
    if m is None:
        return
    peers = spec.peers = Peers()
    for key, v, vloc in ck.entries(m, PEERS_KEYS):
        spec.locs[f"peers.{key}"] = vloc
        name = f"peers.{key}"
        if key == "description":
            peers.description = ck.string(v, vloc, name)
        elif key == "skills":
            peers.skills = _skills(ck, v, vloc)
        elif key in ("send", "receive"):
            setattr(peers, key, _agent_globs(ck, v, vloc, name))
        elif key in ("grant", "accept"):
            setattr(peers, key, _tool_names(ck, v, vloc, name))
        elif key == "max_ttl":
            peers.max_ttl = _duration(ck, v, vloc, name, MAX_MAX_TTL, "24h") or peers.max_ttl
        elif key == "rate":
            peers.rate = ck.integer(v, vloc, name, maximum=MAX_RATE) or peers.rate
        else:
            peers.tools = _tools(ck, v, vloc, spec)


def _done_file(ck, value, loc, name):
    """A literal absolute path, or one starting with a variable (${WORKSPACE}/...)."""
    path = ck.string(value, loc, name, "a path")
    if path is None:
        return None
    errors, _ = M.check_glob(path, "path")
    if not errors and (path.startswith("**") or M.has_wildcards(path)):
        errors = [f"{path!r} is a glob: a done file is one literal path"]
    for message in errors:
        ck.error(loc, f"{name}: {message}")
    return None if errors else path


def _regex(ck, value, loc, name):
    text = ck.string(value, loc, name, "a regular expression")
    if text is None:
        return None
    try:
        re.compile(text)
    except (re.error, RecursionError, OverflowError) as e:
        ck.error(loc, f"{name}: not a regular expression: {e}")
        return None
    return text


def _done(ck, value, loc):
    """termination.done: a list of {file, matches?}, {command, every?, timeout?}
    or {message: {to, tag}}."""
    out = []
    for i, item, iloc in ck.items(value, loc, "termination.done",
                                  "conditions ({file: PATH}, {command: [ARGV]} or {message: {to, tag}})") or ():
        name = f"termination.done[{i}]"
        m = ck.mapping(item, iloc, name, DONE_KEYS)
        if m is None:
            continue
        if sum(k in m for k in ("file", "command", "message")) != 1:
            ck.error(iloc, f"{name}: give exactly one of 'file', 'command' or 'message'")
            continue
        takes = {"matches": "file", "every": "command", "timeout": "command"}
        kind = next(k for k in ("file", "command", "message") if k in m)
        wrong = [k for k, owner in takes.items() if k in m and owner != kind]
        for key in wrong:
            ck.error(m.key_locs[key], f"{name}.{key}: only a {takes[key]} condition takes {key!r}")
        fields, ok = {}, not wrong
        for key, v, vloc in ck.entries(m, DONE_KEYS):
            if key in wrong:
                continue
            if key == "file":
                fields[key] = _done_file(ck, v, vloc, f"{name}.file")
            elif key == "matches":
                fields[key] = _regex(ck, v, vloc, f"{name}.matches")
            elif key == "command":
                fields[key] = _argv(ck, v, vloc, f"{name}.command", "the check runs it")
            elif key == "message":
                fields[key] = _done_message(ck, v, vloc, f"{name}.message")
            elif key == "every":
                fields[key] = _duration(ck, v, vloc, f"{name}.every", 86400.0, "24h")
                if fields[key] is not None and fields[key] < MIN_CHECK_EVERY:
                    ck.error(vloc, f"{name}.every: must be at least {duration_text(MIN_CHECK_EVERY)}, "
                                   f"got {v!r}")
                    fields[key] = None
            else:
                fields[key] = _duration(ck, v, vloc, f"{name}.timeout", MAX_CHECK_TIMEOUT)
            ok = ok and fields[key] is not None
        if ok:
            out.append(DoneCondition(loc=iloc, **fields))
    return tuple(out)


def _done_message(ck, value, loc, name):
    """{to: AGENT, tag: TAG}: both names (a tag is a message's or a part's metadata.tag)."""
    m = ck.mapping(value, loc, name, DONE_MESSAGE_KEYS)
    if m is None:
        return None
    out = {}
    for key in DONE_MESSAGE_KEYS:
        if key not in m:
            ck.error(loc, f"{name}: missing required key {key!r}")
    for key, v, vloc in ck.entries(m, DONE_MESSAGE_KEYS):
        text = ck.string(v, vloc, f"{name}.{key}")
        if text is not None and not _NAME.fullmatch(text):
            ck.error(vloc, f"{name}.{key}: {text!r} is not a name (letters, digits, '.', '_', '-'; at most 63)")
        elif text is not None:
            out[key] = text
    return out if len(out) == 2 else None


def _loop(ck, value, loc):
    m = ck.mapping(value, loc, "termination.loop", LOOP_KEYS)
    out = {}
    for key, v, vloc in ck.entries(m or {}, LOOP_KEYS):
        n = ck.integer(v, vloc, f"termination.loop.{key}", minimum=2, maximum=MAX_LOOP)
        if n is not None:
            out[key] = n
    return out


def _budget(ck, value, loc):
    m = ck.mapping(value, loc, "termination.budget", BUDGET_KEYS)
    out = {}
    for key, v, vloc in ck.entries(m or {}, BUDGET_KEYS):
        name = f"termination.budget.{key}"
        if key == "bytes_written":
            n = ck.unit(units.parse_size, v, vloc, name)
        elif key == "wall_time":
            n = ck.unit(units.parse_duration, v, vloc, name)
        else:
            n = ck.integer(v, vloc, name, maximum=MAX_COUNT)
        if n is not None:
            out[key] = n
    return out


def _termination(ck, value, loc, spec):
    m = ck.mapping(value, loc, "termination", TERMINATION_KEYS)
    if m is None:
        return
    term = spec.termination = TerminationRules()
    for key, v, vloc in ck.entries(m, TERMINATION_KEYS):
        spec.locs[f"termination.{key}"] = vloc
        if key == "done":
            term.done = _done(ck, v, vloc)
        elif key == "no_progress":
            term.no_progress = _duration(ck, v, vloc, "termination.no_progress", 86400.0 * 365, "365d")
            if term.no_progress is not None and term.no_progress < MIN_NO_PROGRESS:
                ck.error(vloc, f"termination.no_progress: must be at least "
                               f"{duration_text(MIN_NO_PROGRESS)}, got {v!r}")
                term.no_progress = None
        elif key == "loop":
            term.loop = _loop(ck, v, vloc)
        elif key == "budget":
            term.budget = _budget(ck, v, vloc)
        else:
            term.grace = _duration(ck, v, vloc, "termination.grace", MAX_GRACE) or term.grace


def _on_violation(ck, value, loc, spec):
    keys = ("default", *SECTIONS, "rules")
    m = ck.mapping(value, loc, "on_violation", keys)
    if m is None:
        return
    ov = spec.on_violation
    for key, v, vloc in ck.entries(m, keys):
        if key == "rules":
            rules = ck.mapping(v, vloc, "on_violation.rules", RULES)
            for rule, action in (rules or {}).items():
                if rule in RULES and ck.action(action, rules.val_locs[rule], f"on_violation.rules.{rule}"):
                    ov.rules[rule] = action
        elif ck.action(v, vloc, f"on_violation.{key}"):
            if key == "default":
                ov.default = v
            else:
                ov.sections[key] = v


def _monitor(ck, value, loc, spec):
    items = ck.strings(value, loc, "monitor", "sensor groups", "a sensor group")
    if items is None:
        return
    good = []
    for item in items:
        if item.value in SENSOR_GROUPS:
            good.append(item.value)
        else:
            ck.error(item.loc, f"monitor: unknown sensor group {item.value!r}"
                               f"{did_you_mean(item.value, SENSOR_GROUPS)}; expected {', '.join(SENSOR_GROUPS)}")
    spec.monitor = tuple(good)
    spec.locs["monitor"] = loc


_SECTIONS = {"metadata": _metadata, "identity": _identity, "filesystem": _filesystem,
             "network": _network, "process": _process, "syscalls": _syscalls,
             "resources": _resources, "peers": _peers, "termination": _termination,
             "on_violation": _on_violation,
             "monitor": _monitor}


# --------------------------------------------------------------- entry point

def _top(ck, root):
    ck.mapping(root, root.loc, "policy", TOP_KEYS)
    for key in ("apiVersion", "kind", "metadata"):
        if key not in root:
            ck.error(root.loc, f"missing required key {key!r}")
    api = root.get("apiVersion", API_VERSION)
    if "apiVersion" in root and api != API_VERSION:
        ck.error(root.val_locs["apiVersion"], f"apiVersion {api!r} is not supported; "
                                              f"this agentwatch reads {API_VERSION}")


def validate(doc):
    """Effective document (located Map) -> (PolicySpec, [Problem]) in file order."""
    ck, spec, stopped = Checker(), PolicySpec(), []
    try:
        _top(ck, doc)
        for key, value, loc in ck.entries(doc, tuple(_SECTIONS)):
            _SECTIONS[key](ck, value, loc, spec)
        for check in CROSS_CHECKS:
            check(ck, spec)
    except TooMany:
        stopped.append(Problem(ck.problems[-1].loc, f"stopped after {MAX_PROBLEMS} problems; "
                                                    f"fix these first"))
    order = {}
    problems = sorted(ck.problems, key=lambda p: (order.setdefault(p.loc.file, len(order)),
                                                  p.loc.line or 0, p.loc.col or 0))
    return spec, problems + stopped
