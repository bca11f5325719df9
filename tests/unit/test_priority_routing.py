"""The priority ring buffer, userspace side: which deny patterns the BPF
sensor can route (CompiledPolicy.kernel_routes), and the reader's ordered
delivery of records from the two rings (Sensors._deliver). No kernel here:
tests/kernel/test_priority.py floods the real one."""
import os

from agentwatch.policy import load
from agentwatch.policy.compile import compile_policy
from agentwatch.sensors import Sensors

VARS = {"WORKSPACE": "/w", "HOME": "/home/u", "TMPDIR": "/t"}


def routes(tmp_path, deny):
    path = tmp_path / "p.yaml"
    path.write_text("apiVersion: agentwatch/v1\nkind: AgentPolicy\nmetadata: {name: p}\n"
                    f"filesystem:\n  deny: {deny!r}\n")
    return compile_policy(load(str(path)), VARS).kernel_routes()


def test_prefixes_are_the_literal_leading_directories_after_expansion(tmp_path):
    prefixes, names = routes(tmp_path, ["${HOME}/.ssh/**", "/etc/secret*.key", "${WORKSPACE}/a/*/b"])
    assert prefixes == ["/etc", "/home/u/.ssh", "/w/a"]
    assert names == ["b"]      # a literal last segment is also a basename


def test_literal_last_segments_are_basenames(tmp_path):
    prefixes, names = routes(tmp_path, ["**/.env", "${HOME}/.netrc", "/**/id_rsa"])
    assert prefixes == ["/home/u/.netrc"]     # ** first: no prefix, only the basename
    assert names == [".env", ".netrc", "id_rsa"]


def test_patterns_with_neither_are_not_routed(tmp_path):
    assert routes(tmp_path, ["**/*.pem", "/*/x*"]) == ([], [])


def test_shipped_coding_agent_policy_routes_its_secrets():
    p = load(os.path.join(os.path.dirname(__file__), "..", "..", "policies", "coding-agent.yaml"))
    prefixes, names = compile_policy(p, VARS).kernel_routes()
    assert {"/home/u/.ssh", "/home/u/.aws", "/home/u/.gnupg", "/home/u/.netrc"} <= set(prefixes)
    assert ".env" in names


# ---- ordered delivery -------------------------------------------------------------

def reader():
    s = Sensors()              # not opened: no bcc, no kernel
    got = []
    s._callback = lambda etype, rec: got.append(rec["ts"])
    return s, got


def hold(s, *stamps):
    for ts in stamps:
        s._held.append((ts, next(s._seq), 1, {"ts": ts}))


def test_records_are_delivered_in_timestamp_order_up_to_the_watermark():
    s, got = reader()
    hold(s, 50, 10, 40)        # say a priority record (40) read before older bulk ones
    hold(s, 20, 60)
    s._watermark = 45
    s._deliver()
    assert got == [10, 20, 40]
    s._watermark = 100
    s._deliver()
    assert got == [10, 20, 40, 50, 60]
    assert s._held == []


def test_drain_delivers_everything_held():
    s, got = reader()
    hold(s, 30, 20)
    s._deliver(everything=True)
    assert got == [20, 30]


def test_equal_timestamps_keep_reading_order_and_a_bad_record_is_counted():
    s, got = reader()
    seen = []

    def cb(etype, rec):
        if rec.get("bad"):
            raise ValueError("bad record")
        seen.append(rec["n"])
    s._callback = cb
    for n in range(3):
        s._held.append((5, next(s._seq), 1, {"ts": 5, "n": n, "bad": n == 1}))
    s._watermark = 5
    s._deliver()
    assert seen == [0, 2]
    assert s.errors == ["ValueError: bad record"]
