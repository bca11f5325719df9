"""A client for the agentwatch broker, for agents: the standard library
only, one file, so any agent's environment can use it (a run's
AGENTWATCH_BROKER_CLIENT names this file):

    import os, sys
    sys.path.insert(0, os.path.dirname(os.environ["AGENTWATCH_BROKER_CLIENT"]))
    import broker_client
    c = broker_client.Client()                 # AGENTWATCH_BROKER, else AGENTWATCH_BROKER_URL
    c.send("reviewer", "please review", facts={"ticket": 42})
    for m in c.inbox()["messages"]: ...

or from a shell: ``python3 $AGENTWATCH_BROKER_CLIENT send reviewer "text"``.

Who you are is not yours to say: the broker asks the kernel (the socket's
peer), so there is no sender argument anywhere here.
"""
import http.client
import json
import os
import secrets
import socket
import sys
import uuid
from urllib.parse import urlsplit


class BrokerError(Exception):
    """A JSON-RPC error from the broker: code, message, data."""

    def __init__(self, code, message, data=None):
        super().__init__(f"{message} (code {code})")
        self.code, self.message, self.data = code, message, data or {}

    @property
    def rule(self):
        return self.data.get("rule")


class Client:
    """One connection to the broker: the unix socket (path, default
    $AGENTWATCH_BROKER), else the HTTP binding (url, default
    $AGENTWATCH_BROKER_URL). call(method, **params) is any JSON-RPC method;
    the others are the common ones. Not thread-safe: one per thread."""

    def __init__(self, path=None, url=None, timeout=60.0):
        self.path = path or (None if url else os.environ.get("AGENTWATCH_BROKER"))
        self.url = url or (None if self.path else os.environ.get("AGENTWATCH_BROKER_URL"))
        if not self.path and not self.url:
            raise BrokerError(-1, "no broker: AGENTWATCH_BROKER (its unix socket) and "
                                  "AGENTWATCH_BROKER_URL are unset (run under `agentwatch daemon`)")
        self.timeout = timeout
        self._sock = self._file = self._http = None
        self._id = 0

    def close(self):
        for f in (self._file, self._sock, self._http):
            if f is not None:
                f.close()
        self._sock = self._file = self._http = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, method, **params):
        """One JSON-RPC call; its result, or BrokerError."""
        self._id += 1
        req = {"jsonrpc": "2.0", "id": self._id, "method": method, "params": params}
        out = self._unix(req) if self.path else self._post(req)
        if "error" in out:
            e = out["error"]
            raise BrokerError(e.get("code"), e.get("message"), e.get("data"))
        return out.get("result")

    def _unix(self, req):
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                url = os.environ.get("AGENTWATCH_BROKER_URL")
                if not url:
                    raise
                # a policy with network.unix: false has the kernel refuse
                # every unix socket: the HTTP binding is open to every run
                self.path, self.url = None, url
                return self._post(req)
            self._sock, self._file = sock, sock.makefile("rb")
        self._sock.sendall(json.dumps(req).encode() + b"\n")
        line = self._file.readline()
        if not line:
            self.close()
            raise BrokerError(-1, "the broker closed the connection")
        return json.loads(line)

    def _post(self, req):
        if self._http is None:
            u = urlsplit(self.url)
            self._http = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=self.timeout)
        body = json.dumps(req).encode()
        self._http.request("POST", "/", body, {"Content-Type": "application/json"})
        resp = self._http.getresponse()
        return json.loads(resp.read())

    # -- A2A ---------------------------------------------------------------------------
    def send(self, to, text=None, facts=None, context=None, data=None, task_id=None, context_id=None,
             forward_of=None, state=None, parts=None):
        """Send a message to agent `to`. facts: a dict (or list of values)
        sent as data parts tagged "fact", which forwarding must keep byte
        for byte; context: text tagged "context". -> the Task."""
        parts = list(parts or [])
        if text is not None:
            parts.append({"text": text})
        if context is not None:
            parts.append({"text": context, "metadata": {"tag": "context"}})
        if data is not None:
            parts.append({"data": data})
        for f in (facts.items() if isinstance(facts, dict) else enumerate(facts or ())):
            key, value = f
            parts.append({"data": {key: value} if isinstance(facts, dict) else value,
                          "metadata": {"tag": "fact"}})
        msg = {"messageId": uuid.uuid4().hex, "role": "ROLE_USER", "parts": parts}
        if task_id:
            msg["taskId"] = task_id
        if context_id:
            msg["contextId"] = context_id
        params = {"message": msg, "recipient": to}
        if forward_of:
            params["forwardOf"] = forward_of
        if state:
            params["state"] = state
        return self.call("SendMessage", **params)["task"]

    def forward(self, original, to, extra_text=None):
        """Forward a received message to `to`, its facts unchanged."""
        parts = [p for p in original["parts"] if (p.get("metadata") or {}).get("tag") == "fact"]
        if extra_text:
            parts.append({"text": extra_text, "metadata": {"tag": "context"}})
        return self.send(to, parts=parts, forward_of=original["messageId"])

    def inbox(self, after=0, limit=100):
        return self.call("agentwatch.Inbox", after=after, pageSize=limit)

    def tasks(self, state=None):
        return self.call("ListTasks", **({"state": state} if state else {}))["tasks"]

    def task(self, task_id, history=100):
        return self.call("GetTask", id=task_id, historyLength=history)

    def cancel(self, task_id):
        return self.call("CancelTask", id=task_id)

    def card(self, name=None):
        return self.call("GetAgentCard", **({"name": name} if name else {}))

    def whoami(self):
        return self.call("agentwatch.Whoami")

    # -- scope tokens --------------------------------------------------------------------
    def mint(self, holder, tool, paths=(), args=(), ttl=300, uses=1):
        return self.call("agentwatch.MintToken", holder=holder,
                         scope={"tool": tool, "paths": list(paths), "args": list(args)},
                         ttlSeconds=ttl, uses=uses)["token"]

    def attenuate(self, token, scope=None, ttl=None, uses=None):
        params = {"token": token}
        for k, v in (("scope", scope), ("ttlSeconds", ttl), ("uses", uses)):
            if v is not None:
                params[k] = v
        return self.call("agentwatch.AttenuateToken", **params)["token"]

    def call_tool(self, token, args=(), nonce=None):
        return self.call("agentwatch.CallTool", token=token, args=list(args),
                         nonce=nonce or secrets.token_hex(16))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = ("usage: broker_client.py send AGENT TEXT [FACTS-JSON] | inbox [AFTER] | tasks | card [AGENT] | "
             "whoami | mint HOLDER TOOL [PATH...] | call TOKEN [ARG...] | rpc METHOD [PARAMS-JSON]")
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    c, cmd, rest = Client(), argv[0], argv[1:]
    try:
        if cmd == "send" and len(rest) >= 2:
            out = c.send(rest[0], rest[1], facts=json.loads(rest[2]) if len(rest) > 2 else None)
        elif cmd == "inbox":
            out = c.inbox(after=int(rest[0]) if rest else 0)
        elif cmd == "tasks":
            out = c.tasks()
        elif cmd == "card":
            out = c.card(rest[0] if rest else None)
        elif cmd == "whoami":
            out = c.whoami()
        elif cmd == "mint" and len(rest) >= 2:
            out = c.mint(rest[0], rest[1], paths=rest[2:])
        elif cmd == "call" and rest:
            out = c.call_tool(rest[0], rest[1:])
        elif cmd == "rpc" and rest:
            out = c.call(rest[0], **(json.loads(rest[1]) if len(rest) > 1 else {}))
        else:
            print(usage, file=sys.stderr)
            return 2
    except BrokerError as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message, "data": e.data}}))
        return 1
    except OSError as e:
        print(f"broker_client: {e}", file=sys.stderr)
        return 1
    finally:
        c.close()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
