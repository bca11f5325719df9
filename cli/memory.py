"""agentwatch memory ls | show | verify | gc: agents' memory records
(docs/memory.md), through the daemon's broker. As root outside every run
(the operator) every namespace is readable; inside a run, only the run's
own agent's."""
import json
import time

import click

from agentwatch import api

from .msg import _call


def _ago(ts):
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _line(r):
    what = r.get("text") if r.get("text") is not None else json.dumps(r.get("data"), sort_keys=True)
    what = what if len(what) <= 60 else what[:57] + "..."
    stale = ""
    if r["validity"] != "valid" and r.get("stale_event"):
        ev = r["stale_event"]
        who = f"run {ev['run']}" if ev.get("run") else (f"pid {ev['pid']}" if ev.get("pid") else ev.get("by"))
        stale = f"  ({ev.get('op')} of {ev.get('path')} by {who}, {_ago(r.get('stale_since'))})"
    return (f"{r['id'][:12]}  {r['agent']:<12} {r['tag']:<7} {r['validity']:<11} "
            f"used {_ago(r['last_accessed_at']):<9} {what}{stale}")


@click.group("memory")
def memory_group():
    """Agents' memory records: validity apart from recency."""


@memory_group.command("ls")
@click.option("--agent", help="Only this agent's records.")
@click.option("--validity", type=click.Choice(["valid", "stale", "invalidated"]))
@click.option("--limit", type=click.IntRange(1, 1000), default=100)
@click.option("--json", "as_json", is_flag=True, help="One JSON record a line.")
def ls(agent, validity, limit, as_json):
    """Records, newest first, with their validity and when last used."""
    params = {k: v for k, v in (("agent", agent), ("validity", validity)) if v}
    with api.broker() as c:
        recs = _call(lambda: c.call("memory.list", pageSize=limit, **params))["records"]
    for r in recs:
        click.echo(json.dumps(r) if as_json else _line(r))
    if not recs and not as_json:
        click.echo("no records")


@memory_group.command("show")
@click.argument("record_id")
def show(record_id):
    """One record in full, with its provenance and the evidence that staled it."""
    with api.broker() as c:
        r = _call(lambda: c.call("memory.get", id=_full_id(c, record_id)))
    click.echo(json.dumps(r, indent=1, sort_keys=True))


def _full_id(c, prefix):
    """A record id from its first characters, as `ls` shows them."""
    if len(prefix) >= 32:
        return prefix
    recs = c.call("memory.list", pageSize=1000)["records"]
    hits = [r["id"] for r in recs if r["id"].startswith(prefix)]
    if len(hits) != 1:
        raise click.ClickException(f"{len(hits)} records start with {prefix!r}: give more of the id")
    return hits[0]


@memory_group.command("verify")
@click.argument("record_id")
def verify(record_id):
    """Re-check a record's files: valid again only if every hash matches."""
    with api.broker() as c:
        r = _call(lambda: c.call("memory.verify", id=_full_id(c, record_id)))
    check = (r.get("checks") or [{}])[-1]
    click.echo(f"{r['id']}: {r['validity']}"
               + (f" (changed: {', '.join(check['mismatched'])})" if check.get("mismatched") else ""))
    if r["validity"] != "valid":
        raise SystemExit(1)


@memory_group.command("gc")
@click.option("--agent", help="Only this agent's namespace.")
def gc(agent):
    """Evict over-budget records: stale context first, then old context; never facts."""
    with api.broker() as c:
        out = _call(lambda: c.call("memory.gc", **({"agent": agent} if agent else {})))
    click.echo(f"evicted {out.get('evicted', 0)} record(s)"
               + (f"; {out['over_budget_facts']} fact record(s) alone exceed the budget"
                  if out.get("over_budget_facts") else ""))
