"""agentwatch/daemon/protocol.py without a daemon: the run request both ways, the
errors a client gets back, the socket's place."""
import os
import socket
import threading
import time

import pytest

from agentwatch import daemon as D
from agentwatch.core.errors import AgentwatchError, LaunchError, PolicyError, UsageError
from agentwatch.run import RunOptions


def test_request_carries_absolute_paths_cwd_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AW_PROBE", "1")
    opts = RunOptions(argv=["tool", "-x"], policy_path="p.yaml", events_path="out/ev.jsonl",
                      workspace="ws", trust=["k.pub"], allow_downgrade=True, fold=False)
    req = D.request_options(opts)
    assert req["argv"] == ["tool", "-x"] and req["cwd"] == str(tmp_path)
    assert req["policy_path"] == str(tmp_path / "p.yaml")
    assert req["events_path"] == str(tmp_path / "out" / "ev.jsonl")
    assert req["workspace"] == str(tmp_path / "ws") and req["trust"] == [str(tmp_path / "k.pub")]
    assert req["env"]["AW_PROBE"] == "1" and req["allow_downgrade"] is True
    assert "prompt_path" not in req and "stdio" not in req
    back = D.options_from_request(req)
    assert back.policy_path == req["policy_path"] and back.env["AW_PROBE"] == "1"
    assert back.argv == ["tool", "-x"] and back.client is None
    assert req["fold"] is False and back.fold is False     # --no-fold reaches the daemon's run
    req = D.request_options(RunOptions(argv=["tool"], weight=300))
    assert req["weight"] == 300 and D.options_from_request(req).weight == 300


@pytest.mark.parametrize("raw, says", [
    ({"argv": ["x"], "stdio": [0, 1, 2]}, "unknown run option 'stdio'"),   # fds come by SCM_RIGHTS only
    ({"argv": ["x"], "show": "yes"}, "'show' must be a bool"),
    ({"argv": ["x"], "fold": 0}, "'fold' must be a bool"),
    ({"argv": ["x"], "weight": "300"}, "'weight' must be a int"),
    ({"argv": []}, "no command given"),
    ({"argv": ["x"], "policy_path": "rel.yaml"}, "not absolute"),
    ({"argv": ["x"], "trust": ["k.pub"]}, "not absolute"),
    ({"argv": ["x"], "env": {"A": 1}}, "strings to strings"),
    (None, "without options"),
])
def test_bad_requests_are_usage_errors(raw, says):
    with pytest.raises(UsageError, match=says):
        D.options_from_request(raw)


def test_errors_come_back_as_their_own_class_and_exit_code():
    e = D.protocol.error_from({"error": "p.yaml:3:1: bad", "type": "PolicyError", "exit_code": 1})
    assert isinstance(e, PolicyError) and str(e) == "p.yaml:3:1: bad"
    e = D.protocol.error_from({"error": "exec failed", "type": "LaunchError", "exit_code": 127})
    assert isinstance(e, LaunchError) and e.exit_code == 127
    e = D.protocol.error_from({"error": "?", "type": "SystemExit", "exit_code": 3})   # not ours: base class
    assert type(e) is AgentwatchError and e.exit_code == 3


def test_messages_round_trip_with_fds():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        r, w = os.pipe()
        D.protocol.send(a, {"op": "run"}, fds=[r, w])
        msg, fds = D.protocol.recv(b, maxfds=3)
        assert msg == {"op": "run"} and len(fds) == 2
        os.write(fds[1], b"x")
        assert os.read(r, 1) == b"x"
        for fd in fds + [r, w]:
            os.close(fd)
        a.send(b"[1]")
        with pytest.raises(UsageError, match="not a JSON object"):
            D.protocol.recv(b)
        a.close()
        assert D.protocol.recv(b) == (None, [])


def test_socket_lives_in_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AGENTWATCH_STATE_DIR", str(tmp_path))
    assert D.socket_path() == str(tmp_path / "daemon.sock")
    assert D.ping() is None                      # nobody answers: no daemon
    with pytest.raises(UsageError, match="agentwatch daemon start"):
        D.run_remote(RunOptions(argv=["true"]), require=True)
    assert D.run_remote(RunOptions(argv=["true"])) is None


def test_client_stream_never_blocks_and_counts_what_it_drops():
    """A stopped terminal (a full pipe nobody reads) must not block the
    daemon's run thread: writes queue up to a bound, then are dropped and
    counted, and the count is written once the reader drains."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    cs = D.ClientStream(w, max_items=2)
    t0 = time.monotonic()
    for i in range(50):
        print(f"line {i}", file=cs)          # two writes each: the text and "\n"
    assert time.monotonic() - t0 < 1.0
    assert cs.dropped >= 90
    got = []
    reader = threading.Thread(target=lambda: got.append(b"".join(iter(lambda: os.read(r, 65536), b""))))
    reader.start()
    cs.close()
    reader.join(10)
    os.close(r)
    assert b"line(s) of output dropped" in got[0] and b"line 0" in got[0]


def test_events_to_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "ev"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        D.options_from_request({"argv": ["x"], "events_path": str(fifo)})
    D.options_from_request({"argv": ["x"], "events_path": str(tmp_path / "new.jsonl")})
