"""The Landlock TCP rules a network section gets: every allowed port, or
none (cgroup BPF alone) when there are too many to list, never a silent cut."""
from agentwatch.policy import load
from agentwatch.sandbox.landlock import NET_CONNECT_TCP
from agentwatch.sandbox.plan import LANDLOCK_PORTS_MAX, make_plan


def _plan(tmp_path, network):
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: t}\n"
                    f"network: {network}\non_violation: {{default: deny}}\n")
    pol = load(str(path))
    return make_plan(pol.data, {"WORKSPACE": str(tmp_path)}, [str(path)], landlock_abi=7, ns_missing={})


def test_a_port_range_gets_every_port(tmp_path):
    p = _plan(tmp_path, "{allow: [{cidr: 10.0.0.0/8, ports: ['1000-1200', 443]}], loopback: [18080]}")
    assert sorted(port for port, _ in p.landlock.ports) == sorted([*range(1000, 1201), 443, 18080])


def test_too_many_ports_leave_them_to_cgroup_bpf_and_say_so(tmp_path):
    p = _plan(tmp_path, f"{{allow: [{{cidr: 10.0.0.0/8, ports: ['1-{LANDLOCK_PORTS_MAX + 1}']}}]}}")
    assert p.landlock.ports == [] and not p.landlock.handled_net & NET_CONNECT_TCP
    assert any("cgroup BPF alone holds the ports" in n for n in p.notes)
    assert p.egress.allow == [("10.0.0.0/8", 1, LANDLOCK_PORTS_MAX + 1, "any")]
