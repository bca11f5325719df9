"""run/services.py on the real kernel: a service of the monitor (the LLM
gateway's contract, here a fake) is reachable from a run whose policy
allows no loopback port, gives the agent its environment variables, and
what it emits for the run is logged and judged as the run's own events."""
import json
import socket
import sys
import threading

import pytest

from conftest import read_events

from agentwatch import api
from agentwatch.core import peer
from agentwatch.run.services import RunService

pytestmark = pytest.mark.kernel

POLICY = """\
apiVersion: agentwatch/v1
kind: AgentPolicy
metadata: {name: services-test}
network:
  allow: []
  loopback: false
on_violation:
  default: deny
  rules: {resources.llm_tokens: alert}
"""

AGENT = r"""
import os, socket, sys
port = int(os.environ["FAKE_SERVICE_PORT"])
with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
    s.sendall(b"hello " + os.environ["FAKE_SERVICE_KEY"].encode() + b"\n")
    print("GOT", s.recv(64).decode().strip(), flush=True)
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    print("OTHER reached", flush=True)
except OSError as e:
    print("OTHER", e.errno, flush=True)
"""


class FakeService(RunService):
    """A loopback line server standing in for the gateway."""
    name = "fake"

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.runs, self.lines, self.callers = {}, [], []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                self.callers.append(peer.of_socket(c).run_id)    # the kernel's word, via the relay
                line = c.makefile().readline().strip()
                self.lines.append(line)
                c.sendall(b"ok\n")
                run = next(iter(self.runs.values()))
                run.emit({"kind": "llm", "api": "openai", "path": "/v1/chat/completions",
                          "model": "m", "status": 200, "tokens_in": 3, "tokens_out": 5})
                run.emit({"kind": "llm", "api": "openai", "path": "/v1/chat/completions",
                          "model": "m", "status": 429, "finding": {
                              "category": "resource", "rule": "resources.llm_tokens",
                              "reason": "token budget 8 reached", "refused": True}})

    def loopback_ports(self):
        return [self.port]

    def open_run(self, run):
        self.runs[run.run_id] = run
        return {"FAKE_SERVICE_PORT": str(self.port), "FAKE_SERVICE_KEY": f"dummy-{run.run_id}"}

    def close_run(self, run_id):
        self.runs.pop(run_id, None)
        return {"calls": len(self.lines)}

    def close(self):
        self.sock.close()


def test_a_service_is_reachable_gives_env_and_its_records_are_the_runs(state_dir, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    (tmp_path / "agent.py").write_text(AGENT)
    other = socket.create_server(("127.0.0.1", 0))    # a loopback port the policy does not allow
    ev = tmp_path / "events.jsonl"
    out = tmp_path / "out"
    svc = FakeService()
    try:
        with open(out, "w") as o, open(tmp_path / "err", "w") as e, api.open_monitor() as monitor:
            monitor.add_service(svc)
            h = api.start(api.RunOptions(argv=[sys.executable, str(tmp_path / "agent.py"),
                                               str(other.getsockname()[1])],
                                         policy_path=str(policy), events_path=str(ev),
                                         stdio=(0, o.fileno(), e.fileno()), stderr=e), monitor=monitor)
            r = h.wait(timeout=120)
    finally:
        svc.close()
        other.close()
    text = out.read_text()
    assert r.exit_status == 0, text + (tmp_path / "err").read_text()
    lines = text.split("\n")
    assert "GOT ok" in lines and any(ln.startswith("OTHER ") and ln != "OTHER reached" for ln in lines), text
    # the service reached; another loopback port refused
    assert svc.lines == [f"hello dummy-{r.run_id}"]
    assert svc.callers == [r.run_id]
    start = next(e for e in read_events(ev) if e["kind"] == "lifecycle" and e["phase"] == "start")
    assert start["detail"]["enforcement"]["loopback_relay"] == [svc.port], \
        "the run has a network namespace of its own: the service's port is relayed into it"
    evs = read_events(ev)
    start = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "start")
    assert start["detail"]["services"] == {"names": ["fake"], "env_removed": [],
                                           "env": ["FAKE_SERVICE_KEY", "FAKE_SERVICE_PORT"]}
    llm = [e for e in evs if e["kind"] == "llm"]
    assert [(e["status"], e["tokens_in"], e["tokens_out"]) for e in llm] == [(200, 3, 5), (429, 0, 0)]
    assert all(e["run_id"] == r.run_id for e in llm)
    viol = [e for e in evs if e["kind"] == "violation"]
    assert sorted((v["category"], v["rule"], v["action"]) for v in viol) == [
        ("network", "network.loopback", "deny"),          # the other port, not the service's
        ("resource", "resources.llm_tokens", "alert")], json.dumps(viol)
    (llm_v,) = [v for v in viol if v["category"] == "resource"]
    assert llm_v["detail"]["layer"] == "llm-gateway" and llm_v["detail"]["refused"] is True
    assert llm_v["detail"]["kernel"] == "refused by the LLM gateway (HTTP 429)"
    end = next(e for e in evs if e["kind"] == "lifecycle" and e["phase"] == "end")
    assert end["detail"]["kernel_denials"]["fake"] == {"calls": 1}
