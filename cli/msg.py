"""agentwatch msg send | inbox | tasks, and agentwatch token mint | inspect:
the daemon's agent-to-agent broker (docs/broker.md) from a shell.

Who sends is the kernel's word: inside a run, these commands speak as that
run; as root outside every run, as the operator (who may read any agent's
inbox and tasks with --agent, and mint a token for a run's tools with
--from)."""
import json
import time

import click

from agentwatch import api


def _client():
    return api.broker()


def _call(fn):
    try:
        return fn()
    except api.BrokerError as e:
        rule = f" [{e.rule}]" if e.rule else ""
        raise click.ClickException(f"the broker refused: {e.message}{rule}") from None
    except OSError as e:
        raise click.ClickException(f"cannot reach the broker: {e}") from None


def _parse_fact(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"{text!r}: expected KEY=VALUE (VALUE may be JSON)", param_hint="--fact")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


@click.group("msg")
def msg_group():
    """Agent-to-agent messages through the daemon's broker."""


@msg_group.command("send")
@click.argument("recipient")
@click.argument("text", required=False)
@click.option("--fact", "facts", multiple=True, metavar="KEY=VALUE",
              help="A fact part (forwarding must keep it byte for byte); repeatable.")
@click.option("--context", help="A context part (summaries may compress it).")
@click.option("--task", "task_id", help="Send within this task (a reply).")
@click.option("--state", help="As the task's assignee, set its state (e.g. TASK_STATE_COMPLETED).")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
def send(recipient, text, facts, context, task_id, state, as_json):
    """Send TEXT to agent RECIPIENT; prints the task it belongs to."""
    if text is None and not facts and context is None:
        raise click.UsageError("give TEXT, --fact or --context: a message has at least one part")
    fact_map = dict(_parse_fact(f) for f in facts)
    with _client() as c:
        task = _call(lambda: c.send(recipient, text, facts=fact_map or None, context=context,
                                    task_id=task_id, state=state))
    if as_json:
        click.echo(json.dumps(task, indent=1))
    else:
        click.echo(f"sent to {recipient}: task {task['id']} ({task['status']['state']})")


@msg_group.command("inbox")
@click.option("--agent", help="Whose inbox (the operator; a run reads its own).")
@click.option("--after", type=int, default=0, help="Only messages after this seq.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100)
@click.option("--json", "as_json", is_flag=True, help="One JSON message a line.")
def inbox(agent, after, limit, as_json):
    """Messages sent to an agent, oldest first, with their kernel-attested sender."""
    params = {"after": after, "pageSize": limit}
    if agent:
        params["agent"] = agent
    with _client() as c:
        out = _call(lambda: c.call("agentwatch.Inbox", **params))
    for m in out["messages"]:
        if as_json:
            click.echo(json.dumps(m))
            continue
        aw = (m.get("metadata") or {}).get("agentwatch") or {}
        sender = aw.get("sender") or {}
        text = " | ".join(_part_text(p) for p in m.get("parts", []))
        facts = f"  facts {aw['facts_digest'][:19]}" if aw.get("facts_digest") else ""
        click.echo(f"#{m['seq']} from {sender.get('agent')} (run {sender.get('run_id')}) "
                   f"task {m.get('taskId')}{facts}: {text}")
    if not out["messages"] and not as_json:
        click.echo("no messages")


def _part_text(p):
    tag = (p.get("metadata") or {}).get("tag")
    for key in ("text", "data", "url"):
        if key in p:
            body = p[key] if key != "data" else json.dumps(p[key], sort_keys=True)
            return f"[{tag}] {body}" if tag else str(body)
    return "[raw]"


@msg_group.command("tasks")
@click.option("--agent", help="Whose tasks (the operator; a run sees its own).")
@click.option("--state", help="Only tasks in this state (TASK_STATE_...).")
@click.option("--json", "as_json", is_flag=True)
def tasks(agent, state, as_json):
    """Tasks an agent created or was given, newest first."""
    params = {k: v for k, v in (("agent", agent), ("state", state)) if v}
    with _client() as c:
        out = _call(lambda: c.call("ListTasks", **params))["tasks"]
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    for t in out:
        aw = t["metadata"]["agentwatch"]
        click.echo(f"{t['id']}  {t['status']['state']:<26} {aw['creator']} -> {aw['assignee']}  "
                   f"{t['status']['timestamp']}")
    if not out:
        click.echo("no tasks")


@click.group("token")
def token_group():
    """Scope tokens: delegate one of a run's tools to another agent."""


@token_group.command("mint")
@click.argument("holder")
@click.argument("tool")
@click.option("--path", "paths", multiple=True, help="A path glob the tool's arguments may name.")
@click.option("--arg", "args", multiple=True, help="A glob other arguments must match.")
@click.option("--ttl", default="5m", show_default=True, help="Lifetime (at most the policy's peers.max_ttl).")
@click.option("--uses", type=click.IntRange(1, 1000), default=1, show_default=True)
@click.option("--from", "issuer", help="The operator mints for this agent's (or run's) tools.")
def mint(holder, tool, paths, args, ttl, uses, issuer):
    """Mint a token that lets HOLDER run TOOL (declared in the issuer's policy)."""
    try:
        ttl_s = api.parse_duration(ttl)
    except api.UsageError as e:
        raise click.BadParameter(str(e), param_hint="--ttl") from None
    params = {"holder": holder, "scope": {"tool": tool, "paths": list(paths), "args": list(args)},
              "ttlSeconds": ttl_s, "uses": uses}
    if issuer:
        params["issuer"] = issuer
    with _client() as c:
        out = _call(lambda: c.call("agentwatch.MintToken", **params))
    click.echo(out["token"])


@token_group.command("inspect")
@click.argument("token")
@click.option("--json", "as_json", is_flag=True)
def inspect(token, as_json):
    """Decode TOKEN and check its signature offline (this host's broker key)."""
    try:
        out = api.inspect_token(token.strip())
    except api.UsageError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    c = out["claims"]
    scope = c.get("scope") or {}
    left = c.get("exp", 0) - time.time()
    click.echo(f"token {c.get('jti')}  signature: {out['signature']}")
    click.echo(f"  issued by {c.get('iss', {}).get('agent')} (run {c.get('iss', {}).get('run')})")
    click.echo(f"  held by   {c.get('sub', {}).get('agent')} (run {c.get('sub', {}).get('run')}, "
               f"cgroup {c.get('sub', {}).get('cgroup')})")
    click.echo(f"  tool {scope.get('tool')}  paths {scope.get('paths') or 'none'}  "
               f"args {scope.get('args') or 'none'}  uses {c.get('uses')}")
    click.echo(f"  {'expires in' if left > 0 else 'expired'} {abs(left):.0f} s"
               + (f"  (attenuated from {c['parent']}, depth {c.get('depth')})" if c.get("parent") else ""))
