"""The broker's JSON-RPC methods (A2A v1.0 shapes, and agentwatch's own
under "agentwatch."). Each takes the kernel-attested caller (a run, or the
operator: root outside every run) and the request's params; refusals are
RpcErrors, and those the caller's policy decides are also `msg` events
with a finding on the caller's run, which its judge makes violations:

    protocol.peer     a message to an agent the sender may not send to, or
                      that does not accept messages from the sender
    identity.sender   a message whose fields claim another sender
    protocol.facts    a forwarded message whose fact parts are not the
                      original's, byte for byte (RFC 8785 canonical form)
    protocol.grant    a token for a tool the issuer may not grant, or the
                      holder may not accept
    protocol.token_*  a token refused: invalid, expired, widened, replayed,
                      exhausted, holder (presented from another run), revoked
                      (its issuer's run ended), scope (a call outside it)

Methods: SendMessage, GetTask, ListTasks, CancelTask, GetAgentCard (and
GetExtendedAgentCard), agentwatch.ListAgentCards, agentwatch.Inbox,
agentwatch.MintToken, agentwatch.AttenuateToken, agentwatch.CallTool,
agentwatch.InspectToken, agentwatch.Whoami.
"""
import asyncio
import base64
import hashlib
import os
import stat
import time

from ..policy.model import Peers
from . import a2a, tokens
from .a2a import RpcError
from .tokens import TokenError

ACTIVE = "TASK_STATE_SUBMITTED"
GC_EVERY_PUTS = 50       # an agent's memory budget is enforced at its first put and every 50th
MAX_TOOL_OUTPUT = 1 << 20


class Methods:
    def __init__(self, broker):
        self.b = broker
        self._puts = {}               # agent -> memory.put count (the budget's check)
        self.table = {"SendMessage": self.send_message, "GetTask": self.get_task,
                      "ListTasks": self.list_tasks, "CancelTask": self.cancel_task,
                      "GetAgentCard": self.get_card, "GetExtendedAgentCard": self.get_card,
                      "agentwatch.ListAgentCards": self.list_cards, "agentwatch.Inbox": self.inbox,
                      "agentwatch.MintToken": self.mint, "agentwatch.AttenuateToken": self.attenuate,
                      "agentwatch.CallTool": self.call_tool, "agentwatch.InspectToken": self.inspect,
                      "agentwatch.Whoami": self.whoami,
                      "memory.put": self.memory_put, "memory.get": self.memory_get,
                      "memory.search": self.memory_search, "memory.verify": self.memory_verify,
                      "memory.list": self.memory_list, "memory.gc": self.memory_gc}

    async def call(self, caller, run, method, params):
        fn = self.table.get(method)
        if fn is None:
            raise RpcError(a2a.METHOD_NOT_FOUND, f"no method {method!r}; the broker has "
                                                 f"{', '.join(sorted(self.table))}")
        out = fn(caller, run, params)
        if hasattr(out, "__await__"):
            out = await out
        return out

    # -- helpers ------------------------------------------------------------------------
    def _refuse(self, run, method, code, message, category, rule, **event):
        """An RpcError for the caller, and its finding on the caller's run."""
        self.b.count("refused")
        if run is not None and run.policed:
            self.b.emit(run, {"method": method, "status": "refused", "error": message,
                              "finding": {"category": category, "rule": rule, "reason": message}, **event})
        data = {"rule": rule}
        if event.get("reason"):
            data["reason"] = event["reason"]
        return RpcError(code, message, data)

    def _who(self, caller, run):
        if run is None:
            return {"agent": "operator", "run_id": None, "uid": caller.peer.uid}
        out = run.identity()
        if caller.peer.pid:
            out["pid"] = caller.peer.pid
        out["uid"] = caller.peer.uid
        return out

    def _target(self, params, key="recipient", what="recipient"):
        """The one live run of the agent params[key] names (or the run id)."""
        name = params.get(key)
        if not isinstance(name, str) or not name:
            raise RpcError(a2a.INVALID_PARAMS, f"params.{key}: the {what}'s agent name (a string) is required")
        runs = self.b.live(run_id=name) or self.b.live(agent=name)
        if not runs:
            raise RpcError(a2a.UNKNOWN_AGENT, f"no live run of agent {name!r} is served by this broker")
        return runs[0]

    def _as_agent(self, caller, params, key="agent"):
        """Whose messages or tasks: the caller's own; the operator names one."""
        if caller.operator:
            name = params.get(key)
            if name is not None and not isinstance(name, str):
                raise RpcError(a2a.INVALID_PARAMS, f"params.{key}: an agent name")
            return name
        run = self.b.runs.get(caller.run_id)
        if params.get(key) not in (None, run.agent):
            raise RpcError(a2a.PERMISSION_DENIED, f"a run reads only its own agent's ({run.agent!r}) "
                                                  "messages and tasks")
        return run.agent

    @staticmethod
    def _limit(params, default=100, most=1000):
        n = params.get("pageSize", params.get("limit", default))
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= most:
            raise RpcError(a2a.INVALID_PARAMS, f"params.pageSize: an integer 1..{most}")
        return n

    # -- messages and tasks -------------------------------------------------------------
    @staticmethod
    async def _write(fn, *args, **kwargs):
        """fn, a write method of a store (the broker's, or the memory
        store), in that store's next group commit, awaited."""
        return await asyncio.wrap_future(fn.__self__.submit(fn, *args, **kwargs))

    async def send_message(self, caller, run, params):
        m = "SendMessage"
        message = a2a.parse_message(params.get("message"))
        who = self._who(caller, run)
        claim = a2a.check_sender_claims(message, params, {"agent": who["agent"], "run_id": who["run_id"]})
        if claim:
            raise self._refuse(run, m, a2a.IDENTITY_MISMATCH,
                               f"the message claims another sender than the kernel names "
                               f"({who['agent']}, run {who['run_id']}): {claim}",
                               "identity", "identity.sender", op="send", message_id=message["messageId"])
        task = None
        if message.get("taskId"):
            task = self.b.store.task(message["taskId"])
            if task is None or (not caller.operator and who["agent"] not in (task["creator"], task["assignee"])):
                raise RpcError(a2a.TASK_NOT_FOUND, f"no task {message['taskId']!r} of agent {who['agent']!r}")
            if task["state"] in a2a.TERMINAL_STATES:
                raise RpcError(a2a.TASK_NOT_CANCELABLE, f"task {task['id']} is {task['state']}: it takes "
                                                        "no more messages")
            other = task["assignee"] if who["agent"] == task["creator"] else task["creator"]
            params = dict(params, recipient=params.get("recipient") or other)
        target = self._target(params)
        if task is not None and target.agent not in (task["creator"], task["assignee"]):
            raise RpcError(a2a.INVALID_PARAMS, f"task {task['id']} is between {task['creator']!r} and "
                                               f"{task['assignee']!r}, not {target.agent!r}")
        if run is not None and run.policed and not self._may_talk(run, target):
            why = (f"peers.send of {run.agent!r} does not list {target.agent!r}"
                   if not _peers(run).may_send(target.agent)
                   else f"peers.receive of {target.agent!r} does not list {run.agent!r}")
            raise self._refuse(run, m, a2a.PERMISSION_DENIED, f"{run.agent!r} may not message "
                               f"{target.agent!r}: {why}", "protocol", "protocol.peer", op="send",
                               peer=target.agent, peer_run=target.run_id, message_id=message["messageId"])
        digest = a2a.facts_digest(message)
        forwarded = None
        if params.get("forwardOf") is not None:
            forwarded = self._check_forward(caller, run, who, params["forwardOf"], message, digest, target)
        stamped = a2a.stamp(message, who, digest)
        if forwarded:
            stamped["metadata"]["agentwatch"]["forwarded_from"] = forwarded
        now = time.time()
        state = params.get("state")
        new_task = None
        if task is None:
            new_task = dict(task_id=a2a.new_id(), context_id=message["contextId"],
                            creator_agent=who["agent"], creator_run=who["run_id"],
                            assignee=target.agent, state=ACTIVE, ts=now)
            task = {"id": new_task["task_id"], "contextId": message["contextId"], "creator": who["agent"],
                    "creator_run": who["run_id"], "assignee": target.agent, "state": ACTIVE,
                    "created": now, "updated": now}
        elif state is not None:
            if state not in a2a.TASK_STATES or who["agent"] != task["assignee"]:
                raise RpcError(a2a.INVALID_PARAMS, "params.state: the task's assignee may set one of "
                                                   + ", ".join(a2a.TASK_STATES))
        stamped["taskId"] = task["id"]
        try:
            await self._write(self.b.store.add_message, message=stamped, sender_agent=who["agent"],
                              sender_run=who["run_id"], recipient=target.agent, task_id=task["id"],
                              facts_digest=digest, ts=now, new_task=new_task)
        except KeyError as e:
            raise RpcError(a2a.INVALID_PARAMS, f"params.message.messageId: {e.args[0]}") from None
        if state is not None:
            task = await self._write(self.b.store.set_task_state, task["id"], state, now) or task
        self.b.count("messages")
        ev = {"method": m, "message_id": message["messageId"], "task_id": task["id"],
              "context_id": message["contextId"], "facts_digest": digest, "parts": len(message["parts"]),
              "tags": _tags(message)}
        op = "forward" if forwarded else "send"
        self.b.emit(run, {"op": op, "peer": target.agent, "peer_run": target.run_id, **ev})
        self.b.emit(target, {"op": "receive", "peer": who["agent"], "peer_run": who["run_id"], **ev})
        return {"task": _task_out(task, history=0)}

    def _may_talk(self, run, target):
        if not _peers(run).may_send(target.agent):
            return False
        return not target.policed or _peers(target).may_receive(run.agent)

    def _check_forward(self, caller, run, who, original_id, message, digest, target):
        if not isinstance(original_id, str):
            raise RpcError(a2a.INVALID_PARAMS, "params.forwardOf: the messageId of a message you received")
        orig = self.b.store.message(original_id, recipient=None if caller.operator else who["agent"])
        if orig is None:
            raise RpcError(a2a.INVALID_PARAMS, f"params.forwardOf: no message {original_id!r} reached "
                                               f"{who['agent']!r}")
        if orig["facts_digest"] != digest:
            raise self._refuse(run, "SendMessage", a2a.FACTS_CHANGED,
                               f"a forward of message {original_id} must carry its facts unchanged: they "
                               f"digest to {orig['facts_digest']}, the forward's to {digest}",
                               "protocol", "protocol.facts", op="forward", peer=target.agent,
                               message_id=message["messageId"], facts_digest=digest,
                               reason="facts changed")
        return {"message_id": original_id, "sender": orig["sender_agent"], "sender_run": orig["sender_run"]}

    def get_task(self, caller, run, params):
        task = self._task_of(caller, params)
        n = params.get("historyLength", 100)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RpcError(a2a.INVALID_PARAMS, "params.historyLength: an integer >= 0")
        return _task_out(task, history=n)

    def _task_of(self, caller, params):
        tid = params.get("id")
        if not isinstance(tid, str):
            raise RpcError(a2a.INVALID_PARAMS, "params.id: the task id")
        task = self.b.store.task(tid)
        agent = None if caller.operator else self.b.runs[caller.run_id].agent
        if task is None or (agent is not None and agent not in (task["creator"], task["assignee"])):
            raise RpcError(a2a.TASK_NOT_FOUND, f"no task {tid!r}" + (f" of agent {agent!r}" if agent else ""))
        return task

    def list_tasks(self, caller, run, params):
        agent = self._as_agent(caller, params)
        state = params.get("state")
        if state is not None and state not in a2a.TASK_STATES:
            raise RpcError(a2a.INVALID_PARAMS, f"params.state: one of {', '.join(a2a.TASK_STATES)}")
        tasks = self.b.store.list_tasks(agent, context_id=params.get("contextId"), state=state,
                                        limit=self._limit(params))
        return {"tasks": [_task_out(t, history=0) for t in tasks]}

    async def cancel_task(self, caller, run, params):
        task = self._task_of(caller, params)
        if task["state"] in a2a.TERMINAL_STATES:
            raise RpcError(a2a.TASK_NOT_CANCELABLE, f"task {task['id']} is {task['state']} already")
        task = await self._write(self.b.store.set_task_state, task["id"], "TASK_STATE_CANCELED", time.time())
        self.b.emit(run, {"op": "cancel", "method": "CancelTask", "task_id": task["id"],
                          "peer": task["assignee"]})
        return _task_out(task, history=0)

    def inbox(self, caller, run, params):
        agent = self._as_agent(caller, params)
        if agent is None:
            raise RpcError(a2a.INVALID_PARAMS, "params.agent: whose inbox (the operator names one)")
        after = params.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise RpcError(a2a.INVALID_PARAMS, "params.after: the last seq seen (an integer >= 0)")
        rows = self.b.store.inbox(agent, after=after, limit=self._limit(params))
        return {"messages": [dict(r["message"], seq=r["seq"]) for r in rows],
                "next": rows[-1]["seq"] if rows else after}

    # -- agent cards ----------------------------------------------------------------------
    def card(self, run):
        p = _peers(run)
        skills = [{"id": s["name"], "name": s["name"], "description": s.get("description") or s["name"],
                   "tags": []} for s in (p.skills or ())]
        return {"name": run.agent, "description": p.description or f"agent {run.agent} under agentwatch",
                "url": f"{self.b.url}/a2a/{run.agent}", "version": "1.0.0", "protocolVersion": "1.0",
                "preferredTransport": "JSONRPC", "capabilities": {"streaming": False, "pushNotifications": False},
                "defaultInputModes": ["text/plain", "application/json"],
                "defaultOutputModes": ["text/plain", "application/json"], "skills": skills,
                "agentwatch": {"run_id": run.run_id, "cgroup": run.cgroup, "policy_digest": run.policy_digest,
                               "tools": sorted(p.tools or ()), "attested_by": "kernel (socket peer -> cgroup)"}}

    def get_card(self, caller, run, params):
        name = params.get("name")
        if name is None:
            if run is None:
                return {"name": "agentwatch-broker", "description": "the agentwatch broker of this host",
                        "url": self.b.url, "agents": [self.card(r) for r in self.b.live()]}
            return self.card(run)
        return self.card(self._target(params, "name", "card"))

    def list_cards(self, caller, run, params):
        return {"cards": [self.card(r) for r in self.b.live()]}

    def whoami(self, caller, run, params):
        return dict(self._who(caller, run), transport=caller.transport)

    # -- scope tokens ---------------------------------------------------------------------
    async def mint(self, caller, run, params):
        m = "agentwatch.MintToken"
        issuer = run
        if caller.operator:          # root mints for a run's tools, under that run's policy
            issuer = self._target(params, "issuer", "issuer")
        holder = self._target(params, "holder", "holder")
        try:
            scope = tokens.normalise_scope(params.get("scope"))
        except ValueError as e:
            raise RpcError(a2a.INVALID_PARAMS, f"params.scope: {e}") from None
        tool, ip, hp = scope["tool"], _peers(issuer), _peers(holder)
        why = None
        if issuer.policed and not ip.may_grant(tool):
            why = f"peers.grant of {issuer.agent!r} does not list tool {tool!r}"
        elif tool not in (ip.tools or {}):
            why = f"the policy of {issuer.agent!r} declares no tool {tool!r} (peers.tools)"
        elif holder.policed and not hp.may_accept(tool):
            why = f"peers.accept of {holder.agent!r} does not list tool {tool!r}"
        if why:
            raise self._refuse(run, m, a2a.PERMISSION_DENIED, f"no token for {tool!r}: {why}", "protocol",
                               "protocol.grant", op="mint", peer=holder.agent, tool=tool)
        ttl = params.get("ttlSeconds", 300)
        uses = params.get("uses", 1)
        max_ttl = getattr(ip, "max_ttl", None) or 3600.0
        try:
            claims = tokens.new_claims(issuer={"run": issuer.run_id, "agent": issuer.agent},
                                       holder={"run": holder.run_id, "agent": holder.agent,
                                               "cgroup": holder.cgroup},
                                       scope=scope, ttl_s=ttl, uses=uses, now=time.time(), max_ttl_s=max_ttl)
        except (ValueError, TypeError) as e:
            raise RpcError(a2a.INVALID_PARAMS, f"params: {e}") from None
        text = self.b.signer.sign(claims)
        await self._write(self.b.store.add_token, claims, text, time.time())
        self.b.emit(run, {"op": "mint", "method": m, "peer": holder.agent, "peer_run": holder.run_id,
                          "token": claims["jti"], "tool": tool})
        return {"token": text, "claims": claims}

    def _verified(self, run, method, text, op, check_holder=True):
        """The claims of a token the caller presents, checked but for its
        use: signature, known to the store, not revoked, held by the caller."""
        try:
            claims = self.b.signer.verify(text)
            row = self.b.store.token(claims["jti"])
            if row is None:
                raise TokenError("invalid", "this broker never issued that token")
            if self.b.store.chain_revoked(claims):
                raise TokenError("revoked", "the token was revoked: the run that issued it has ended")
            if not self.b.live(run_id=claims["iss"]["run"]):
                raise TokenError("revoked", f"the token's issuer run {claims['iss']['run']} has ended")
            if check_holder and (run is None or claims["sub"]["run"] != run.run_id
                                 or claims["sub"]["cgroup"] != run.cgroup):
                who = "the operator" if run is None else f"run {run.run_id} ({run.agent})"
                raise TokenError("holder", f"the token is bound to run {claims['sub']['run']} "
                                           f"({claims['sub']['agent']}), and {who} presented it")
            return claims
        except TokenError as e:
            raise self._token_refusal(run, method, e, op) from None

    def _token_refusal(self, run, method, e, op, claims=None):
        self.b.count("tokens_refused")
        return self._refuse(run, method, a2a.TOKEN_REFUSED, f"token refused ({e.reason}): {e}", "protocol",
                            e.rule, op=op, reason=e.reason,
                            token=(claims or {}).get("jti"))

    async def attenuate(self, caller, run, params):
        m = "agentwatch.AttenuateToken"
        parent = self._verified(run, m, params.get("token"), "attenuate")
        try:
            child = tokens.attenuate(parent, scope=params.get("scope"), ttl_s=params.get("ttlSeconds"),
                                     uses=params.get("uses"), now=time.time())
        except TokenError as e:
            raise self._token_refusal(run, m, e, "attenuate", parent) from None
        except (ValueError, TypeError) as e:
            raise RpcError(a2a.INVALID_PARAMS, f"params: {e}") from None
        text = self.b.signer.sign(child)
        await self._write(self.b.store.add_token, child, text, time.time())
        self.b.emit(run, {"op": "attenuate", "method": m, "token": child["jti"],
                          "tool": child["scope"]["tool"]})
        return {"token": text, "claims": child}

    async def call_tool(self, caller, run, params):
        m = "agentwatch.CallTool"
        claims = self._verified(run, m, params.get("token"), "call_tool")
        args = params.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or len(args) > 64:
            raise RpcError(a2a.INVALID_PARAMS, "params.args: a list of at most 64 strings")
        now = time.time()
        try:
            tokens.check_call(claims, holder_run=run.run_id, holder_cgroup=run.cgroup, now=now,
                              tool=params.get("tool", claims["scope"]["tool"]), args=args)
            issuer = self.b.live(run_id=claims["iss"]["run"])[0]
            tool = (_peers(issuer).tools or {}).get(claims["scope"]["tool"])
            if tool is None:
                raise TokenError("revoked", f"the issuer's policy no longer declares tool "
                                            f"{claims['scope']['tool']!r}")
            await self._write(self.b.store.spend_token, claims, params.get("nonce"), now)
        except TokenError as e:
            raise self._token_refusal(run, m, e, "call_tool", claims) from None
        argv = list(tool.argv) + args
        self.b.count("tool_calls")
        t0 = time.monotonic()
        try:
            code, out, err, truncated = await self.b.run_tool(issuer.spawn, argv, tool.timeout)
        except Exception as e:
            raise RpcError(a2a.INTERNAL_ERROR, f"tool {tool.name!r} did not run in the sandbox of "
                                               f"{issuer.agent!r}: {e}") from None
        ev = {"method": m, "token": claims["jti"], "tool": tool.name, "args": args, "exit_code": code}
        self.b.emit(run, {"op": "call_tool", "peer": issuer.agent, "peer_run": issuer.run_id, **ev})
        self.b.emit(issuer, {"op": "tool", "peer": run.agent, "peer_run": run.run_id, **ev})
        return {"exitCode": code, "stdout": _text(out), "stderr": _text(err), "truncated": truncated,
                "seconds": round(time.monotonic() - t0, 3), "ranIn": {"agent": issuer.agent,
                                                                     "run_id": issuer.run_id}}

    def inspect(self, caller, run, params):
        text = params.get("token")
        try:
            claims = self.b.signer.verify(text)
            signature = "valid"
        except TokenError as e:
            try:
                claims = tokens.decode_unverified(text)
            except TokenError:
                raise RpcError(a2a.INVALID_PARAMS, f"params.token: {e}") from None
            signature = "invalid"
        row = self.b.store.token(claims.get("jti")) if isinstance(claims.get("jti"), str) else None
        now = time.time()
        status = ("forged" if signature != "valid" else "unknown" if row is None
                  else "revoked" if self.b.store.chain_revoked(claims)
                  else "expired" if now >= claims.get("exp", 0)
                  else "exhausted" if row["used"] >= claims.get("uses", 1) else "valid")
        return {"claims": claims, "signature": signature, "status": status,
                "used": row["used"] if row else None, "signer": self.b.signer.fingerprint}


    # -- memory (harness/memory.py): a namespace per agent, the caller's ------------------
    def _memory(self):
        if getattr(self.b, "memory", None) is None:
            raise RpcError(a2a.METHOD_NOT_FOUND, "this broker keeps no memory store")
        return self.b.memory

    async def memory_put(self, caller, run, params):
        from .memory import MAX_PROVENANCE_FILES, RecordError
        store = self._memory()
        agent = self._as_agent(caller, params)
        if agent is None:
            raise RpcError(a2a.INVALID_PARAMS, "params.agent: whose memory (the operator names one)")
        prov = params.get("provenance")
        files = prov.get("files") if isinstance(prov, dict) else None
        if isinstance(files, list):
            # hashed here, as the caller may read it (the daemon reads as
            # root), each distinct file once, at most MAX_HASHED_BYTES in all,
            # and only after the list's own bound: a request must not make
            # the daemon read without end
            if len(files) > MAX_PROVENANCE_FILES:
                raise RpcError(a2a.INVALID_PARAMS, f"params.provenance.files: {len(files)} files, more than "
                                                   f"the {MAX_PROVENANCE_FILES} a record may name")
            hashed, sums, left = [], {}, MAX_HASHED_BYTES
            for i, f in enumerate(files):
                path = f.get("path") if isinstance(f, dict) else None
                if not isinstance(path, str) or not os.path.isabs(path):
                    raise RpcError(a2a.INVALID_PARAMS, f"params.provenance.files[{i}].path: an absolute path")
                if path not in sums:
                    try:
                        sums[path], size = await asyncio.to_thread(_hash_as, run, path, left)
                    except _NotReadable as e:
                        raise self._refuse(run, "memory.put", a2a.PERMISSION_DENIED, f"provenance {path}: {e}",
                                           "filesystem", "filesystem.read", op="memory.put") from None
                    except OSError as e:
                        raise RpcError(a2a.INVALID_PARAMS, f"params.provenance.files[{i}]: {path} {e}") from None
                    left -= size
                hashed.append(dict(f, sha256=f.get("sha256") or sums[path]))
            prov = dict(prov, files=hashed)
        try:
            rec = await self._write(store.put, agent, text=params.get("text"), data=params.get("data"),
                                    tag=params.get("tag", "context"), provenance=prov)
        except RecordError as e:
            raise RpcError(a2a.INVALID_PARAMS, f"params: {e}") from None
        keeper = getattr(self.b, "keeper", None)
        if keeper is not None:
            keeper.track(f["path"] for f in rec.provenance.get("files", ()))
        n = self._puts[agent] = self._puts.get(agent, 0) + 1
        if n % GC_EVERY_PUTS == 1:            # the agent's budget: stale context goes first, facts never
            gc = await self._write(store.gc, agent)
            if gc["evicted"]:
                self.b.emit(run, {"op": "memory.gc", "method": "memory.put", "parts": gc["evicted"]})
        self.b.emit(run, {"op": "memory.put", "method": "memory.put", "message_id": rec.id})
        return rec.to_dict()

    def _own_record(self, caller, params, fn):
        agent = self._as_agent(caller, params)
        rid = params.get("id")
        if not isinstance(rid, str):
            raise RpcError(a2a.INVALID_PARAMS, "params.id: a record id")
        rec = fn(agent, rid)
        if rec is None:
            raise RpcError(a2a.INVALID_PARAMS, f"no record {rid!r}" + (f" of agent {agent!r}" if agent else ""))
        return rec.to_dict()

    def memory_get(self, caller, run, params):
        store = self._memory()
        return self._own_record(caller, params, lambda agent, rid: store.get(agent, rid) if agent
                                else store.record(rid))

    def memory_verify(self, caller, run, params):
        store = self._memory()

        def verify(agent, rid):
            rec = store.record(rid)
            if rec is None or (agent is not None and rec.agent != agent):
                return None
            return store.verify(rid)
        return self._own_record(caller, params, verify)

    def memory_search(self, caller, run, params):
        store = self._memory()
        agent = self._as_agent(caller, params)
        if agent is None:
            raise RpcError(a2a.INVALID_PARAMS, "params.agent: whose memory (the operator names one)")
        query = params.get("query", "")
        if not isinstance(query, str):
            raise RpcError(a2a.INVALID_PARAMS, "params.query: a string")
        recs = store.search(agent, query, valid_only=bool(params.get("valid_only")),
                            limit=self._limit(params, default=10, most=100))
        return {"records": [r.to_dict() for r in recs]}

    def memory_list(self, caller, run, params):
        store = self._memory()
        agent = self._as_agent(caller, params)
        recs = store.records(agent, validity=params.get("validity"), limit=self._limit(params))
        return {"records": [r.to_dict() for r in recs]}

    async def memory_gc(self, caller, run, params):
        if not caller.operator:
            raise RpcError(a2a.PERMISSION_DENIED, "memory.gc is the operator's (root, outside every run)")
        return await self._write(self._memory().gc, params.get("agent"))


MAX_HASHED_BYTES = 1 << 30      # read to hash one memory.put's provenance files, in all


class _NotReadable(Exception):
    """The caller's policy does not let it read the provenance file."""


def _hash_as(run, path, most):
    """(sha256, size) of a provenance file the run's policy lets it read
    (_NotReadable else), of at most `most` bytes (OSError else, as for a
    file that cannot be opened or is not a regular file). The file is
    opened first and the policy asked about the path as named and about
    what the opened descriptor is (its real path), so a symlink swapped in
    between cannot make the daemon (root) hash a file the agent may not
    read."""
    check = run.check_read if run is not None and run.check_read else (lambda p: None)
    why = check(path)
    if why:
        raise _NotReadable(f"a file this agent may not read: {why}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise OSError(f"cannot be read: {e.strerror}") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        why = check(real) if real != path else None
        if why:
            raise _NotReadable(f"names {real}, a file this agent may not read: {why}")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("is not a regular file")
        if st.st_size > most:
            raise OSError(f"is {st.st_size} bytes, more than the {most} left of the {MAX_HASHED_BYTES} "
                          "one record's provenance files may be in all")
        h = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest(), st.st_size
    finally:
        os.close(fd)


def _tags(message):
    """The message's metadata.tag and its parts' tags, in order, once each."""
    tags = [(message.get("metadata") or {}).get("tag")]
    tags += [(p.get("metadata") or {}).get("tag") for p in message["parts"]]
    return list(dict.fromkeys(t for t in tags if isinstance(t, str))) or None


def _peers(run):
    """A run's peers section; an unpoliced run may do everything."""
    if run.peers is not None:
        return run.peers
    return _OPEN if not run.policed else Peers()


class _Open:
    """The peers of a run with no policy: every agent, every tool it declares (none)."""
    description = None
    skills = ()
    tools = {}
    max_ttl = 3600.0
    rate = None

    def may_send(self, agent):
        return True

    may_receive = may_grant = may_accept = may_send


_OPEN = _Open()


def _task_out(task, history=0):
    out = {"id": task["id"], "contextId": task["contextId"], "kind": "task",
           "status": {"state": task["state"], "timestamp": _iso(task["updated"])},
           "metadata": {"agentwatch": {"creator": task["creator"], "creator_run": task.get("creator_run"),
                                       "assignee": task["assignee"], "created": _iso(task["created"])}}}
    if history:
        out["history"] = [h["message"] if "message" in h else h for h in (task.get("history") or [])][-history:]
    return out


def _iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int((ts % 1) * 1000):03d}Z"


def _text(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}
