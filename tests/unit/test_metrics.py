"""sinks/metrics.py: the counters fed from runs' events, the families a
scrape gets (through the real HTTP endpoint on loopback), the BPF
programs' statistics read from fdinfo, and address parsing."""
import os
import urllib.request

import pytest

from agentwatch.core.errors import UsageError
from agentwatch.core.events import FlowEvent, LifecycleEvent, SyscallEvent, ViolationEvent
from agentwatch.sinks import metrics as m


def _start(run_id="r1", agent="coder"):
    return LifecycleEvent(phase="start", run_id=run_id, agent=agent, detail={"run_id": run_id})


def _end(run_id="r1", agent="coder", exit_status=0, reason="exit", guard=None):
    return LifecycleEvent(phase="end", run_id=run_id, agent=agent, detail={
        "exit_status": exit_status, "termination": {"reason": reason},
        "kernel_denials": {"egress-guard": guard} if guard else {}})


def _samples(reg):
    """{(name, labels tuple): value} of every sample."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in reg.collect() for s in fam.samples}


def test_events_violations_runs_counted():
    mx = m.Metrics()
    for ev in (_start(), SyscallEvent(run_id="r1", agent="coder", name="mount"),
               ViolationEvent(run_id="r1", agent="coder", category="filesystem", rule="filesystem.deny",
                              action="deny"),
               ViolationEvent(run_id="r1", agent="coder", category="filesystem", rule="filesystem.deny",
                              action="deny", count=4),
               FlowEvent(run_id="r1", agent="coder", decision="deny"),
               _end(exit_status=3, guard={"flows": 2, "denied": 1})):
        mx.feed(ev)
    s = _samples(mx.registry())
    assert s[("agentwatch_events_total", (("kind", "lifecycle"),))] == 2
    assert s[("agentwatch_events_total", (("kind", "syscall"),))] == 1
    assert s[("agentwatch_violations_total", (("action", "deny"), ("agent", "coder"),
                                              ("category", "filesystem"), ("rule", "filesystem.deny")))] == 5
    assert s[("agentwatch_runs_started_total", ())] == 1
    assert s[("agentwatch_runs_finished_total", (("outcome", "exit_error"),))] == 1
    assert s[("agentwatch_runs_active", ())] == 0
    assert s[("agentwatch_egress_flows_total", (("decision", "deny"),))] == 1
    assert s[("agentwatch_egress_guard_total", (("counter", "flows"),))] == 2


def test_run_without_end_counts_failed_once():
    mx = m.Metrics()
    mx.feed(_start("a"))
    mx.feed(_start("b"))
    mx.feed(_end("b", reason="violation"))
    assert _samples(mx.registry())[("agentwatch_runs_active", ())] == 1
    mx.run_done("a")
    mx.run_done("b")
    mx.run_done("never-started")
    s = _samples(mx.registry())
    assert s[("agentwatch_runs_finished_total", (("outcome", "failed"),))] == 1
    assert s[("agentwatch_runs_finished_total", (("outcome", "violation"),))] == 1
    assert s[("agentwatch_runs_active", ())] == 0


def test_outcome_labels():
    assert m.outcome({"exit_status": 0, "termination": {"reason": "exit"}}) == "exit_ok"
    assert m.outcome({"exit_status": 1}) == "exit_error"
    assert m.outcome({"exit_status": 0, "termination": {"reason": "done"}}) == "done"


def test_feed_never_raises():
    mx = m.Metrics()
    mx.feed(object())                 # no .kind: counted, not raised into the bus
    assert mx.errors == 1


def test_sources_at_scrape_and_a_failing_one():
    rings = {"priority": {"submitted": 5, "lost": 1, "received": 4},
             "bulk": {"submitted": 10, "lost": 0, "received": 10}}

    class Sched:
        queued, in_flight, cap = 3, 2, 4

    def broken():
        raise RuntimeError("gone")
    mx = m.Metrics(sources={
        "sensors": lambda: {"rings": rings, "lost_stash": 2, "killed_in_kernel": 0, "folded": 7},
        "gateway": lambda: {"counters": {"requests": 9}, "scheduler": Sched(), "active_clients": 1},
        "runs": lambda: 2, "bpf": lambda: [{"prog_id": 7, "name": "tp_exec", "type": "tracepoint",
                                            "run_time_ns": 2_500_000_000, "run_cnt": 40}],
        "bpf_stats": broken, "exporters": lambda: {"otlp": {"dropped": 3}}})
    s = _samples(mx.registry())
    assert s[("agentwatch_ring_records_lost_total", (("ring", "priority"),))] == 1
    assert s[("agentwatch_ring_records_submitted_total", (("ring", "bulk"),))] == 10
    assert s[("agentwatch_lost_stash_total", ())] == 2
    assert s[("agentwatch_gateway_queue_depth", ())] == 3
    assert s[("agentwatch_gateway_total", (("counter", "requests"),))] == 9
    assert s[("agentwatch_runs_active", ())] == 2
    key = (("name", "tp_exec"), ("prog_id", "7"), ("type", "tracepoint"))
    assert s[("agentwatch_bpf_prog_run_time_seconds_total", key)] == 2.5
    assert s[("agentwatch_bpf_prog_run_count_total", key)] == 40
    assert s[("agentwatch_export_total", (("counter", "dropped"), ("sink", "otlp")))] == 3
    assert s[("agentwatch_export_total", (("counter", "errors"), ("sink", "metrics")))] == 1
    assert not any(k[0] == "agentwatch_bpf_stats_enabled" for k in s)


def test_own_registry_served_on_loopback():
    mx = m.Metrics()
    mx.feed(_start())
    srv = m.MetricsServer(mx.registry(), "127.0.0.1", 0)
    try:
        assert srv.port and srv.url.startswith("http://127.0.0.1:")
        text = urllib.request.urlopen(srv.url, timeout=5).read().decode()
    finally:
        srv.close()
    assert "agentwatch_runs_started_total 1.0" in text
    assert "python_gc" not in text and "process_cpu" not in text   # not the global registry


def test_metrics_port_in_use_is_a_usage_error():
    srv = m.MetricsServer(m.Metrics().registry(), "127.0.0.1", 0)
    try:
        with pytest.raises(UsageError, match="--metrics 127.0.0.1:"):
            m.MetricsServer(m.Metrics().registry(), "127.0.0.1", srv.port)
    finally:
        srv.close()


@pytest.mark.parametrize("text, want", [("9464", ("127.0.0.1", 9464)), ("0.0.0.0:9100", ("0.0.0.0", 9100)),
                                        ("[::1]:9464", ("::1", 9464)), (":9464", ("127.0.0.1", 9464))])
def test_parse_address(text, want):
    assert m.parse_address(text) == want


@pytest.mark.parametrize("text", ["", "host", "host:http", "1.2.3.4:70000"])
def test_parse_address_refused(text):
    with pytest.raises(UsageError, match="HOST:PORT"):
        m.parse_address(text)


def test_bpf_programs_from_fdinfo(tmp_path):
    """Each program once (two fds of one), its fields from fdinfo; other fds skipped."""
    (tmp_path / "fd").mkdir()
    (tmp_path / "fdinfo").mkdir()
    for fd, target in (("3", "anon_inode:bpf-prog"), ("4", "anon_inode:bpf-prog"),
                       ("5", "anon_inode:bpf-map"), ("6", "/dev/null")):
        os.symlink(target, tmp_path / "fd" / fd)
    info = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nprog_id:\t{}\nrun_time_ns:\t{}\nrun_cnt:\t{}\n"
    (tmp_path / "fdinfo" / "3").write_text(info.format(42, 1000, 3))
    (tmp_path / "fdinfo" / "4").write_text(info.format(42, 1000, 3))
    (tmp_path / "fdinfo" / "5").write_text("map_id:\t9\n")
    assert m.bpf_programs(str(tmp_path)) == [{"prog_id": 42, "type": "5", "name": "", "run_time_ns": 1000,
                                              "run_cnt": 3}]


def test_bpf_stats_sysctl_fallback_restores(tmp_path, monkeypatch):
    """Where BPF_ENABLE_STATS is refused, the sysctl is written and its old value put back."""
    sysctl = tmp_path / "bpf_stats_enabled"
    sysctl.write_text("0\n")
    monkeypatch.setattr(m, "_bpf", lambda cmd, attr: -1)
    st = m.BpfStats(str(sysctl)).open()
    assert st.how == "sysctl" and sysctl.read_text() == "1"
    assert m.bpf_stats_enabled(str(sysctl)) is True
    st.close()
    assert sysctl.read_text() == "0"
    assert m.bpf_stats_enabled(str(tmp_path / "missing")) is None


def test_the_clis_export_flags_are_what_the_daemon_reads():
    """`daemon start --metrics ... --otlp ... --otlp-events all --bpf-stats`
    sets api.export_env(); the daemon's ExportConfig.from_env reads it back."""
    from agentwatch import api
    from agentwatch.daemon.server import ExportConfig
    env = api.export_env("127.0.0.1:9464", "http://127.0.0.1:4318", "all", True)
    cfg = ExportConfig.from_env(env)
    assert cfg.metrics == ("127.0.0.1", 9464) and cfg.otlp_events == "all" and cfg.bpf_stats
    assert cfg.otlp.startswith("http://127.0.0.1:4318")
    assert api.export_env() == {}
    assert ExportConfig.from_env(api.export_env()) == ExportConfig()
