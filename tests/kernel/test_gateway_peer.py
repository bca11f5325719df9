"""The LLM gateway names its callers by the kernel: resolve_caller is built
on core.peer.of_socket (inet_diag's cgroup of the client's socket), so a
real `agentwatch run` agent is served as its own run, and a host process
is refused."""
import http.server
import json
import sys
import threading
import time

import httpx
import pytest

from conftest import aw, read_events

from agentwatch.core import peer
from agentwatch.harness.gateway import Gateway
from agentwatch.harness.gateway_config import parse_config

pytestmark = pytest.mark.kernel

KEY = "sk-REAL-kernel-test-key-0123456789"

# The agent retries while its run is not yet registered (the test registers
# it once the kernel has named it), then prints what the gateway answered.
CLIENT = r"""
import http.client, json, sys, time
port = int(sys.argv[1])
body = json.dumps({"model": "gpt-k", "messages": [{"role": "user", "content": "hi"}]})
deadline = time.time() + 30
while True:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/v1/chat/completions", body,
              {"Content-Type": "application/json", "Authorization": "Bearer sk-dummy",
               "X-Agentwatch-Run": "run-forged"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 403 or time.time() > deadline:
        break
    time.sleep(0.1)
print(r.status, data.decode())
sys.exit(0 if r.status == 200 else 1)
"""


class Upstream(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Upstream.seen.append((self.headers.get("authorization"), json.loads(body)))
        out = json.dumps({"id": "x", "object": "chat.completion",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def gateway():
    up = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    text = f"""
upstreams:
  - name: fake
    api: openai
    base_url: http://127.0.0.1:{up.server_address[1]}
    api_key_env: AW_KERNEL_TEST_KEY
models:
  gpt-k: {{upstream: fake, model: gpt-upstream}}
"""
    cfg = parse_config(text, "gateway.yaml", environ={"AW_KERNEL_TEST_KEY": KEY})
    calls, named = [], []

    def resolve(sock):
        p = peer.of_socket(sock)            # the kernel's word, nothing the client said
        named.append(p.run_id)
        return p.run_id

    gw = Gateway(cfg, resolve, lambda run_id, rec: calls.append((run_id, rec))).start()
    yield gw, calls, named
    gw.close()
    up.shutdown()
    up.server_close()


def test_a_run_is_named_by_the_kernel_and_a_host_process_is_refused(gateway, state_dir, tmp_path):
    gw, calls, named = gateway
    # a host process: the kernel puts it in no run
    resp = httpx.post(f"{gw.url}/v1/chat/completions", trust_env=False,
                      json={"model": "gpt-k", "messages": []},
                      headers={"X-Agentwatch-Run": "run-forged"})
    assert resp.status_code == 403 and "in no run" in resp.json()["error"]["message"]
    assert named == [None] and calls[-1][0] is None

    stop = threading.Event()

    def register_what_the_kernel_names():
        while not stop.is_set():
            for run_id in list(named):
                if run_id and run_id not in gw.runs():
                    gw.register_run(run_id, "kernel-agent")
            time.sleep(0.02)
    t = threading.Thread(target=register_what_the_kernel_names, daemon=True)
    t.start()
    ev = tmp_path / "events.jsonl"
    try:
        r = aw("run", "--name", "kernel-agent", "--events", str(ev), "--",
               sys.executable, "-c", CLIENT, str(gw.port))
    finally:
        stop.set()
        t.join(5)
    assert r.returncode == 0, (r.stdout, r.stderr)
    run_id = read_events(ev)[0]["run_id"]
    assert run_id in named and "run-forged" not in gw.runs()
    served = [(rid, rec) for rid, rec in calls if rec["status"] == 200]
    assert len(served) == 1
    rid, rec = served[0]
    assert rid == run_id == rec["run_id"] and rec["agent"] == "kernel-agent"
    assert (rec["tokens_in"], rec["tokens_out"]) == (3, 2)
    assert Upstream.seen[-1][0] == f"Bearer {KEY}" and KEY not in r.stdout
