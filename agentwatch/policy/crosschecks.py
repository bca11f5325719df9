"""Cross checks: what is wrong only across sections of a valid policy
(an allow shadowed by a deny, W^X, a program that can never run, a toggle
that a syscalls.deny contradicts, loopback in network.allow, rules no sensor
judges, a peers.grant of a tool peers.tools does not declare). ``validate``
(schema.py) runs CROSS_CHECKS after the sections.
"""
import ipaddress

from . import matchers as M
from .model import DEFAULT_FAMILIES, TOGGLES

def _check_shadowed(ck, spec):
    """An allow entry inside a deny pattern never applies: deny wins."""
    fs = spec.filesystem
    if fs is None or not fs.deny:
        return
    allows = [(f"filesystem.{k}", i.value, i.loc) for k in ("read", "write", "exec")
              for i in (getattr(fs, k) or ())]
    if spec.process is not None:
        allows += [("process.exec", e.path, e.loc) for e in spec.process.exec or ()]
    for name, pattern, loc in allows:
        same = [d for d in fs.deny if d.value == pattern]
        if same:
            ck.error(loc, f"{name}: {pattern!r} is also in filesystem.deny ({same[0].loc.ref(loc)}); "
                          f"deny wins, so this allow never applies")
            continue
        for deny in fs.deny:
            if M.covers(pattern, deny.value):
                ck.warn(loc, f"{name}: {pattern!r} is shadowed by filesystem.deny {deny.value!r} "
                             f"({deny.loc.ref(loc)}): deny wins, so it never applies")
                break


def _check_wx(ck, spec):
    """W^X: a path the agent may write and then execute defeats an exec allow list."""
    fs = spec.filesystem
    if fs is None or not fs.write:
        return
    if fs.exec is not None:
        execs = [(e.value, e.loc, "filesystem.exec") for e in fs.exec]
    elif spec.process is not None and spec.process.exec is not None:
        execs = [(e.path, e.loc, "process.exec") for e in spec.process.exec]
    else:
        return
    for w in fs.write:
        for pattern, xloc, name in execs:
            if M.overlap(w.value, pattern):
                ck.warn(w.loc, f"filesystem.write: {w.value!r} is also executable ({name} {pattern!r}, "
                               f"{xloc.ref(w.loc)}): the agent could run what it writes (W^X)")
                break


def _check_exec_reachable(ck, spec):
    fs, proc = spec.filesystem, spec.process
    if fs is None or fs.exec is None or proc is None or not proc.exec:
        return
    for e in proc.exec:
        if not any(M.covers(e.path, x.value) for x in fs.exec):
            ck.warn(e.loc, f"process.exec: {e.path!r} is not under filesystem.exec, so it can never run")


def _check_toggles(ck, spec):
    if spec.process is None or not spec.syscalls:
        return
    for toggle, allowed in spec.process.toggles.items():
        if not allowed:
            continue
        for item in spec.syscalls:
            if item.value in TOGGLES[toggle]:
                ck.error(item.loc, f"syscalls.deny: {item.value!r} contradicts process.{toggle}: true "
                                   f"({spec.locs[f'process.{toggle}'].ref(item.loc)})")


_LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def _check_network(ck, spec):
    if spec.network is None:
        return
    if "network.families" in spec.locs:
        missing = [f for f in DEFAULT_FAMILIES if f not in spec.network.families]
        if missing:
            ck.warn(spec.locs["network.families"],
                    f"network.families: without {', '.join(missing)} the agent cannot create "
                    f"{'that kind' if len(missing) == 1 else 'those kinds'} of socket, which most "
                    f"programs need; the list replaces the default [unix, inet, inet6]")
    for rule in spec.network.allow:
        if rule.cidr:
            net = ipaddress.ip_network(rule.cidr)
            if any(net.version == lo.version and net.subnet_of(lo) for lo in _LOOPBACK_NETS):
                ck.warn(rule.loc, f"network.allow: {rule.cidr} is loopback, which only "
                                  f"network.loopback judges; this rule never applies")
    domains = [r for r in spec.network.allow if r.domain]
    if spec.network.guard is False and domains:
        ck.warn(spec.locs["network.guard"],
                "network.guard: false with domain rules: each name is resolved once, when the "
                "run starts, and every other name on those addresses (a CDN's, say) is reachable "
                "too; DNS is judged by address. Leave guard out to decide by name")
    for rule in domains:
        if rule.protocol == "udp":
            ck.warn(rule.loc, f"network.allow: {rule.domain} over UDP: the egress guard decides "
                              "names for TCP only (QUIC is refused, clients fall back to TCP); "
                              "write a cidr rule for UDP to an address")


def _check_coverage(ck, spec):
    fs = spec.filesystem
    if fs is not None and fs.read is not None and fs.write is None:
        ck.warn(spec.locs["filesystem.read"], "filesystem.read is set but filesystem.write is not, "
                                              "so writes are not restricted (write 'write: []' to forbid them)")
    if spec.monitor is not None:
        missing = [g for g in spec.needed_groups() if g not in spec.monitor]
        if missing:
            ck.warn(spec.locs["monitor"], f"monitor: without {', '.join(missing)} some rules of this "
                                          f"policy are never judged")


def _check_peers(ck, spec):
    """The broker runs the granter's tools: a grant must name one of
    peers.tools, a tool no grant names is never run, and a tool's program
    must be one the sandbox lets this run start."""
    peers = spec.peers
    if peers is None:
        return
    written = [k.split(".", 2)[2] for k in spec.locs if k.startswith("peers.tools.")]
    for item in peers.grant:
        if item.value not in written:          # written but invalid: reported where it is
            declared = ", ".join(written) or "none"
            ck.error(item.loc, f"peers.grant: {item.value!r} is not in peers.tools (declared: "
                               f"{declared}); the broker runs the granter's own tools, so a token "
                               f"for it could never be used")
    granted = {i.value for i in peers.grant}
    proc, fs = spec.process, spec.filesystem

    def may_run(program, patterns):
        # a pattern with a variable may cover it on the machine that runs it
        return any("${" in p or M.covers(program, p) for p in patterns)

    for tool in peers.tools.values():
        if tool.name not in granted:
            ck.warn(tool.loc, f"peers.tools.{tool.name}: not in peers.grant, so no token can be "
                              f"minted for it and the broker never runs it")
        program = tool.argv[0]
        if proc is not None and proc.exec is not None and not may_run(program, [e.path for e in proc.exec]):
            ck.warn(tool.loc, f"peers.tools.{tool.name}: {program!r} is not in process.exec, so "
                              f"the sandbox refuses to run it")
        elif fs is not None and fs.exec is not None and not may_run(program, [x.value for x in fs.exec]):
            ck.warn(tool.loc, f"peers.tools.{tool.name}: {program!r} is not under filesystem.exec, "
                              f"so the sandbox refuses to run it")


CROSS_CHECKS = (_check_shadowed, _check_wx, _check_exec_reachable, _check_toggles,
                 _check_network, _check_coverage, _check_peers)
