"""`agentwatch policy explain`: the effective policy (after extends and
variables) in plain language, one section at a time. Every pattern is shown
as written and, when it uses a variable, as expanded for this machine."""
import os

from . import matchers as M
from .model import RULES, TOGGLES, duration_text, host_network_why, relay_ports, size_text

_TOGGLE_WORDS = {"ptrace": "trace or read other processes (ptrace)",
                 "change_uid": "change user or group id",
                 "namespaces": "create or join namespaces",
                 "bpf": "load BPF programs", "modules": "load kernel modules or kexec",
                 "io_uring": "use io_uring", "memfd_exec": "create memfds (code run from memory)"}


def _pattern(value, variables):
    if "${" not in value:
        return value
    try:
        return f"{value}  (= {M.expand(value, variables)})"
    except KeyError:
        return value


def _list(title, items, variables, indent="  "):
    lines = [f"{indent}{title}"]
    lines += [f"{indent}  {_pattern(v, variables)}" for v in items] or [f"{indent}  nothing"]
    return lines


def _filesystem(spec, v):
    fs = spec.filesystem
    if fs is None:
        return ["Filesystem: not restricted (no filesystem section)"]
    lines = ["Filesystem"]
    for key, title in (("read", "May read:"), ("write", "May write, create, delete:"),
                       ("exec", "May execute or map code from:")):
        items = getattr(fs, key)
        if items is None:
            lines.append(f"  {title} anywhere (filesystem.{key} not set)")
        else:
            lines += _list(title, [i.value for i in items], v)
    lines += _list("May never touch (deny wins over every allow):", [i.value for i in fs.deny], v)
    return lines


def _sockets(value, what):
    if value is True:
        return f"{what}: yes, any"
    if not value:
        return f"{what}: no"
    return f"{what}: only " + ", ".join(value)


def _network(spec):
    net = spec.network
    if net is None:
        return ["Network: not restricted (no network section)"]
    egress = ", ".join(r.describe() for r in net.allow) if net.allow else "none"
    lo = net.loopback
    loopback = _sockets(True if lo is True else [f"port {a}" if a == b else f"ports {a}-{b}"
                                                  for a, b in lo or ()], "Loopback")
    unix = _sockets(True if net.unix is True else [i.value for i in net.unix or ()], "Unix sockets")
    netlink = ("netlink of any protocol" if net.netlink is True else
               f"netlink ({', '.join(net.netlink)} only)" if net.netlink else "no netlink")
    return ["Network (everything not listed is denied)",
            f"  Egress: {'only ' if net.allow else ''}{egress}",
            f"  {loopback}", f"  {unix}",
            f"  Socket families: only {', '.join(net.families) or 'none'}; {netlink}; "
            "no raw inet sockets (network.families, network.netlink)",
            "  " + _guard(net, spec),
            "  " + _net_namespace(spec)]


def _guard(net, spec):
    """What the egress guard (guards/guard.py) does for an enforced run."""
    enforced = any(spec.action_for("network", r) in ("deny", "kill")   # as plan.section_action
                   for r in RULES if r.startswith("network."))
    if net.guarded() and not enforced:
        return ("Egress guard: not used while the network section only alerts (on_violation); "
                "with deny or kill, TCP would be decided by name and DNS answered only for "
                "allowed names")
    if not net.guarded():
        why = "network.guard: false" if net.guard is False else "no domain rules"
        return (f"Egress guard: off ({why}); destinations are judged by address"
                + ("; domain rules are resolved once, when the run starts, and every name "
                   "sharing those addresses is reachable" if any(r.domain for r in net.allow) else ""))
    return ("Egress guard: on; TCP that no CIDR or loopback rule allows is redirected by the "
            "kernel to agentwatch's proxy, which allows it only by name (TLS SNI, HTTP Host or "
            "CONNECT) to an address of that name; every DNS lookup (port 53) goes to "
            "agentwatch's responder, which answers only allowed names; other UDP, QUIC included, "
            "is refused unless a CIDR rule allows it")


def _net_namespace(spec):
    """Which network namespace an enforced run of this policy gets (the
    plan's decision: sandbox/plan.py _host_network_why)."""
    net = spec.network
    if spec.process is not None and "net" in spec.process.host_namespaces:
        return ("Network namespace: the host's (process.host_namespaces): /proc/net lists every "
                "socket of the host")
    why = host_network_why(net.allow, net.loopback, net.guarded())
    if why is not None:
        return f"Network namespace: the host's ({why}): /proc/net lists every socket of the host"
    ports = relay_ports(net.loopback)
    relayed = (f"loopback port{'s' if len(ports) > 1 else ''} {', '.join(map(str, ports))} relayed "
               "to the host's, TCP only" if ports else "no loopback port")
    return f"Network namespace: its own when enforced (only lo; {relayed}; sees no host socket)"


def _process(spec, v):
    proc = spec.process
    if proc is None:
        return ["Process: not restricted (no process section)"]
    lines = ["Process"]
    if proc.exec is None:
        lines.append("  May run: any program")
    else:
        lines += _list("May run only:", [e.describe() for e in proc.exec], v)
    if proc.max_processes is not None:
        lines.append(f"  At most {proc.max_processes} processes")
    if proc.run_as is not None:
        lines.append(f"  Runs as: {proc.run_as.describe()} (process.run_as), with no capabilities; "
                     "agentwatch itself stays root")
    lines.append("  Signals only to its own processes (process.signal)")
    own = [k.upper() for k in ("pid", "ipc") if k not in proc.host_namespaces]
    if own:
        lines.append(f"  Own {' and '.join(own)} namespace{'s' if len(own) > 1 else ''} when enforced "
                     "(sees no host process or IPC object of that kind)")
    if proc.host_namespaces:
        lines.append(f"  Shares the host's {', '.join(proc.host_namespaces)} namespace "
                     "(process.host_namespaces)")
    never = [_TOGGLE_WORDS[t] for t in TOGGLES if proc.toggles.get(t) is False]
    may = [_TOGGLE_WORDS[t] for t in TOGGLES if proc.toggles.get(t) is True]
    if never:
        lines.append("  May never: " + "; ".join(never))
    if may:
        lines.append("  Explicitly may: " + "; ".join(may))
    return lines


def _names(items, nobody="nobody"):
    return ", ".join(i.value for i in items) or nobody


def _peers(spec):
    peers = spec.peers
    if peers is None:
        return ["Peers: no agent-to-agent messages (no peers section)"]
    lines = ["Peers (agent-to-agent broker)"]
    if peers.description is not None:
        lines.append(f"  Agent card: {peers.description}")
    if peers.skills:
        lines.append("  Skills: " + "; ".join(
            s["name"] + (f" ({s['description']})" if s["description"] else "") for s in peers.skills))
    lines += [f"  May send to: {_names(peers.send)}",
              f"  Accepts messages from: {_names(peers.receive)}",
              f"  May grant tokens for its tools: {_names(peers.grant, 'none')}",
              f"  May accept tokens for: {_names(peers.accept, 'none')}"]
    if peers.tools:
        lines.append("  Tools the broker runs in this run's sandbox for a token holder:")
        lines += [f"    {t.name}: {t.describe()}" for t in peers.tools.values()]
    else:
        lines.append("  Tools the broker runs for a token holder: none")
    lines += [f"  Tokens it mints live at most {duration_text(peers.max_ttl)} (peers.max_ttl)",
              f"  Sends at most {peers.rate} messages per second (peers.rate)"]
    return lines


def _budget_words(key, value):
    if key == "wall_time":
        return f"it has run {duration_text(value)}"
    what = {"execs": "programs started (successful execs)", "processes": "processes started",
            "llm_tokens": "LLM tokens used (in and out, through the gateway)",
            "bytes_written": "written (the sizes of the files it wrote, once per change seen)"}[key]
    return f"{size_text(value) if key == 'bytes_written' else value} {what}"


_LOOP_WORDS = {"exec": "it runs the same command line {} times",
               "failing": "the same command fails the same way {} times",
               "workspace": "the workspace's content comes back to an earlier state {} times (undo/redo, A-B-A-B)"}


def _termination(spec):
    term = spec.termination
    if term is None:
        return ["Termination: the run ends when the agent exits (no termination section)"]
    lines = ["Termination (the run is stopped although the agent still runs)"]
    for c in term.done:
        lines.append(f"  Done (exit status 0) when {c.describe()}")
    if term.no_progress is not None:
        lines.append(f"  No progress (exit status 82) when it neither writes in the workspace nor starts "
                     f"a program for {duration_text(term.no_progress)}")
    for key, k in term.loop.items():
        lines.append("  Loop (exit status 81) when " + _LOOP_WORDS[key].format(k)
                     + (" with no change to the workspace in between" if key != "workspace" else ""))
    for key, value in term.budget.items():
        status = 124 if key == "wall_time" else 83
        lines.append(f"  {'Timeout' if key == 'wall_time' else 'Budget'} (exit status {status}) once "
                     f"{_budget_words(key, value)}")
    lines.append(f"  Stopping: SIGTERM to every process of the run, SIGKILL {duration_text(term.grace)} "
                 f"later (termination.grace)")
    return lines


def _rest(spec):
    lines = []
    if spec.syscalls:
        lines.append("Syscalls: never " + ", ".join(i.value for i in spec.syscalls))
    res = spec.resources
    if res is not None and res.written:
        lines.append("Resources: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in res.written.items()))
    ov = spec.on_violation
    parts = [f"{ov.default or 'alert'} by default"]
    parts += [f"{k}: {a}" for k, a in ov.sections.items()]
    parts += [f"rule {k}: {a}" for k, a in ov.rules.items()]
    lines.append("On violation: " + "; ".join(parts))
    how = "monitor:" if spec.monitor is not None else "derived from the rules"
    lines.append(f"Sensors: {', '.join(spec.sensor_groups())} ({how})")
    return lines


def _header(policy, spec):
    lines = [f"Policy {spec.name}: {spec.description}" if spec.description else f"Policy {spec.name}"]
    if len(policy.files) > 1:
        chain = " -> ".join(os.path.basename(f) for f in policy.files)
        lines.append(f"  Built from: {chain} (lists appended, settings overridden)")
    lines.append(f"  Digest: {policy.digest}")
    ident = spec.identity
    if ident is not None:
        if ident.name:
            lines.append(f"  Agent name must match: {ident.name}")
        if ident.owner:
            lines.append(f"  Owner: {ident.owner}")
        lines.append(f"  Signer required: {ident.required_signer or 'no'}")
    return lines


def explain(policy, variables):
    """Policy (from load) -> the plain-language text, ending with a newline."""
    spec = policy.spec
    lines = _header(policy, spec)
    lines.append("Variables: " + ", ".join(f"${{{k}}}={variables[k]}" for k in sorted(variables)))
    for block in (_filesystem(spec, variables), _network(spec), _process(spec, variables), _peers(spec),
                  _termination(spec), _rest(spec)):
        lines.append("")
        lines += block
    return "\n".join(lines) + "\n"
