"""`agentwatch policy diff OLD NEW`: what a change grants or revokes.

Both policies are compared as effective policies (after extends), with
patterns as written (variables unexpanded, so the answer does not depend on
the machine). Lines:

    + grants: write ${WORKSPACE}/**
    - revokes: network to pypi.org:443/tcp
    ~ changes: on_violation.filesystem alert -> deny

An absent list or section means "not restricted", so adding one revokes and
removing one grants. No lines at all: "no permission changes".
"""
import shlex

from .model import (BUDGET_KEYS, LOOP_KEYS, RULES, SECTIONS, TOGGLES, Filesystem, Peers,
                    TerminationRules, duration_text, host_network_why, size_text)

GRANT, REVOKE, CHANGE = "+ grants:", "- revokes:", "~ changes:"
_VERBS = (("read", "read"), ("write", "write"), ("exec", "execute from"))


def _items(old, new):
    """Entries only in new, only in old (order kept)."""
    return [x for x in new if x not in old], [x for x in old if x not in new]


def _allow_list(out, what, key, old, new):
    """An allow list where None (the key not set) means anything."""
    if old == new:
        return
    if old is None:
        out.append(f"{REVOKE} {what} anything (now only: {', '.join(new) or 'nothing'})")
    elif new is None:
        out.append(f"{GRANT} {what} anything ({key} removed)")
    else:
        added, removed = _items(old, new)
        out += [f"{GRANT} {what} {x}" for x in added]
        out += [f"{REVOKE} {what} {x}" for x in removed]


def _values(items):
    return None if items is None else [i.value for i in items]


def _filesystem(out, a, b):
    a, b = a or Filesystem(), b or Filesystem()
    for key, verb in _VERBS:
        _allow_list(out, verb, f"filesystem.{key}", _values(getattr(a, key)), _values(getattr(b, key)))
    added, removed = _items(_values(a.deny), _values(b.deny))
    out += [f"{REVOKE} any access to {x} (filesystem.deny)" for x in added]
    out += [f"{GRANT} access to {x} (removed from filesystem.deny)" for x in removed]


def _rule_text(rule):
    ports = rule.ports_text() if rule.ports else ("*" if rule.protocol == "any" else f"*/{rule.protocol}")
    return f"{rule.target}:{ports}"


def _socket_scope(out, what, old, new):
    """loopback / unix: True = any, False/() = none, list = only these."""
    if old == new:
        return
    if new is True:
        out.append(f"{GRANT} {what} to anything")
    elif old is True:
        out.append(f"{REVOKE} {what} to anything (now only: {', '.join(new or ()) or 'nothing'})")
    else:
        added, removed = _items(list(old or ()), list(new or ()))
        out += [f"{GRANT} {what} to {x}" for x in added]
        out += [f"{REVOKE} {what} to {x}" for x in removed]


def _ports(value):
    if isinstance(value, bool):
        return value
    return [f"port {a}" if a == b else f"ports {a}-{b}" for a, b in value]


def _network(out, a, b):
    if a is None and b is None:
        return
    if a is None or b is None:
        verb = REVOKE if a is None else GRANT
        now = b if a is None else a
        rules = ", ".join(_rule_text(r) for r in now.allow) or "none"
        out.append(f"{verb} unrestricted network ({'now' if a is None else 'was'} egress only to: {rules})")
        return
    added, removed = _items([_rule_text(r) for r in a.allow], [_rule_text(r) for r in b.allow])
    out += [f"{GRANT} network to {x}" for x in added]
    out += [f"{REVOKE} network to {x}" for x in removed]
    _socket_scope(out, "loopback", _ports(a.loopback), _ports(b.loopback))
    _socket_scope(out, "unix sockets", a.unix if isinstance(a.unix, bool) else _values(a.unix),
                  b.unix if isinstance(b.unix, bool) else _values(b.unix))
    added, removed = _items(list(a.families), list(b.families))
    out += [f"{GRANT} {x} sockets (network.families)" for x in added]
    out += [f"{REVOKE} {x} sockets (network.families)" for x in removed]
    if a.netlink != b.netlink:
        if b.netlink is True:
            out.append(f"{GRANT} netlink sockets of any protocol (network.netlink)")
        elif a.netlink is True:
            out.append(f"{REVOKE} netlink sockets of any protocol (now only: "
                       f"{', '.join(b.netlink) or 'none'})")
        else:
            added, removed = _items(list(a.netlink), list(b.netlink))
            out += [f"{GRANT} netlink {x} sockets (network.netlink)" for x in added]
            out += [f"{REVOKE} netlink {x} sockets (network.netlink)" for x in removed]
    if a.guarded() != b.guarded():
        out.append(f"{REVOKE} egress by address: the egress guard now decides TCP by name and answers DNS "
                   "(network.guard)" if b.guarded() else
                   f"{GRANT} egress by address: the egress guard is off, domain rules become the "
                   "addresses they resolve to at start, DNS is judged by address (network.guard)")
    was = host_network_why(a.allow, a.loopback, a.guarded())
    now = host_network_why(b.allow, b.loopback, b.guarded())
    if (was is None) != (now is None):
        out.append(f"{GRANT} the host's net namespace ({now}: /proc/net lists every socket of the host)"
                   if now else f"{REVOKE} the host's net namespace (no remote egress: a run gets its own)")


def _limit(out, what, old, new, old_text=None, new_text=None):
    """A limit where None means unlimited; raising it grants."""
    if old == new:
        return
    was = "unlimited" if old is None else (old_text or old)
    now = "unlimited" if new is None else (new_text or new)
    grants = new is None or (old is not None and new > old)
    out.append(f"{GRANT if grants else REVOKE} {what} {now} (was {was})")


def _process(out, a, b):
    old_exec = None if a is None or a.exec is None else [e.describe() for e in a.exec]
    new_exec = None if b is None or b.exec is None else [e.describe() for e in b.exec]
    _allow_list(out, "run", "process.exec", old_exec, new_exec)
    _limit(out, "process.max_processes", a and a.max_processes, b and b.max_processes)
    _run_as(out, a and a.run_as, b and b.run_as)
    was_shared = set(a.host_namespaces if a else ())
    now_shared = set(b.host_namespaces if b else ())
    out += [f"{GRANT} the host's {k} namespace (process.host_namespaces)"
            for k in sorted(now_shared - was_shared)]
    out += [f"{REVOKE} the host's {k} namespace (process.host_namespaces)"
            for k in sorted(was_shared - now_shared)]
    for toggle in TOGGLES:
        was = a is None or a.toggles.get(toggle, True)
        now = b is None or b.toggles.get(toggle, True)
        if was != now:
            out.append(f"{GRANT if now else REVOKE} process.{toggle}")


def _run_as(out, old, new):
    """Without process.run_as the agent runs as agentwatch's user (root)."""
    was, now = (r.describe() if r else None for r in (old, new))
    root = "running as agentwatch's user, root"
    if was != now:
        out.append(f"{REVOKE} {root} (now process.run_as {now})" if was is None else
                   f"{GRANT} {root} (process.run_as {was} removed)" if now is None else
                   f"{CHANGE} process.run_as {was} -> {now}")


def _syscalls(out, a, b):
    added, removed = _items(_values(a.syscalls) or [], _values(b.syscalls) or [])
    out += [f"{REVOKE} syscall {x} (syscalls.deny)" for x in added]
    out += [f"{GRANT} syscall {x} (removed from syscalls.deny)" for x in removed]


def _resources(out, a, b):
    ra, rb = a.resources, b.resources
    for key in ("memory", "cpu", "pids", "wall_time"):
        _limit(out, f"resources.{key}", ra and getattr(ra, key), rb and getattr(rb, key),
               ra and ra.written.get(key), rb and rb.written.get(key))


def _changed(out, what, old, new):
    if old != new:
        out.append(f"{CHANGE} {what} {old if old is not None else '(unset)'} -> "
                   f"{new if new is not None else '(unset)'}")


def _on_violation(out, a, b):
    oa, ob = a.on_violation, b.on_violation
    _changed(out, "on_violation.default", oa.default or "alert", ob.default or "alert")
    for section in SECTIONS:
        if section in oa.sections or section in ob.sections:
            _changed(out, f"on_violation.{section}", a.action_for(section), b.action_for(section))
    for rule in RULES:
        if rule in oa.rules or rule in ob.rules:
            category = rule.split(".")[0]
            _changed(out, f"on_violation.rules.{rule}", a.action_for(category, rule),
                     b.action_for(category, rule))


def _identity(out, a, b):
    for key in ("name", "owner", "required_signer"):
        _changed(out, f"identity.{key}", a.identity and getattr(a.identity, key),
                 b.identity and getattr(b.identity, key))
    _changed(out, "metadata.name", a.name, b.name)
    _changed(out, "sensors", ",".join(a.sensor_groups()), ",".join(b.sensor_groups()))


_PEER_LISTS = (("send", "messages to {}"), ("receive", "messages from {}"),
               ("grant", "granting tokens for its tool {}"), ("accept", "accepting tokens for {}"))


def _skills_text(skills):
    return ", ".join(s["name"] + (f" ({s['description']})" if s["description"] else "")
                     for s in skills) or None


def _peers(out, a, b):
    """An absent peers section allows no message: compared as the defaults."""
    if a is None and b is None:
        return
    pa, pb = a or Peers(), b or Peers()
    _changed(out, "peers.description", pa.description, pb.description)
    _changed(out, "peers.skills", _skills_text(pa.skills), _skills_text(pb.skills))
    for key, what in _PEER_LISTS:
        added, removed = _items(_values(getattr(pa, key)), _values(getattr(pb, key)))
        out += [f"{GRANT} {what.format(x)} (peers.{key})" for x in added]
        out += [f"{REVOKE} {what.format(x)} (peers.{key})" for x in removed]
    for name in [*pa.tools, *(n for n in pb.tools if n not in pa.tools)]:
        old, new = pa.tools.get(name), pb.tools.get(name)
        if old is None:
            out.append(f"{GRANT} tool {name} run for token holders: {new.describe()} (peers.tools)")
        elif new is None:
            out.append(f"{REVOKE} tool {name} run for token holders: {old.describe()} (peers.tools)")
        else:
            _changed(out, f"peers.tools.{name}.argv", shlex.join(old.argv), shlex.join(new.argv))
            _limit(out, f"peers.tools.{name}.timeout", old.timeout, new.timeout,
                   duration_text(old.timeout), duration_text(new.timeout))
    _limit(out, "peers.max_ttl", pa.max_ttl, pb.max_ttl, duration_text(pa.max_ttl), duration_text(pb.max_ttl))
    _limit(out, "peers.rate", pa.rate, pb.rate)


def _budget_text(key, value):
    if value is None:
        return None
    if key == "wall_time":
        return duration_text(value)
    return size_text(value) if key == "bytes_written" else str(value)


def _termination(out, a, b):
    """A limit raised (or removed) lets the agent run on: a grant; a done
    condition is neither, it ends the run as a success: a change."""
    if a is None and b is None:
        return
    ta, tb = a or TerminationRules(), b or TerminationRules()
    da, db = [c.describe() for c in ta.done], [c.describe() for c in tb.done]
    added, removed = _items(da, db)
    out += [f"{CHANGE} termination.done adds: the run is done when {x}" for x in added]
    out += [f"{CHANGE} termination.done drops: the run is done when {x}" for x in removed]
    _limit(out, "termination.no_progress", ta.no_progress, tb.no_progress,
           ta.no_progress and duration_text(ta.no_progress), tb.no_progress and duration_text(tb.no_progress))
    for key in LOOP_KEYS:
        _limit(out, f"termination.loop.{key}", ta.loop.get(key), tb.loop.get(key))
    for key in BUDGET_KEYS:
        old, new = ta.budget.get(key), tb.budget.get(key)
        _limit(out, f"termination.budget.{key}", old, new, _budget_text(key, old), _budget_text(key, new))
    _changed(out, "termination.grace", duration_text(ta.grace), duration_text(tb.grace))


def diff_specs(a, b):
    """PolicySpec, PolicySpec -> lines (empty when nothing changed)."""
    out = []
    _filesystem(out, a.filesystem, b.filesystem)
    _network(out, a.network, b.network)
    _process(out, a.process, b.process)
    _syscalls(out, a, b)
    _resources(out, a, b)
    _peers(out, a.peers, b.peers)
    _termination(out, a.termination, b.termination)
    _identity(out, a, b)
    _on_violation(out, a, b)
    return out


def diff(old, new):
    """Policy, Policy -> lines to print; ["no permission changes"] when none."""
    return diff_specs(old.spec, new.spec) or ["no permission changes"]
