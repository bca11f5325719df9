"""agentwatch.harness.broker_store: durability, messages, tasks, tokens, replay."""
import os
import sqlite3
import stat
import threading

import pytest

from agentwatch.harness import tokens as t
from agentwatch.harness.broker_store import SCHEMA_VERSION, Store
from agentwatch.harness.tokens import TokenError

NOW = 1_700_000_000.0


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state" / "broker.db")


@pytest.fixture
def store(path):
    s = Store(path)
    yield s
    s.close()


def message(mid, text="hi", context="c1", task=None):
    return {"messageId": mid, "contextId": context, "taskId": task, "role": "ROLE_USER",
            "parts": [{"text": text}], "metadata": {"agentwatch": {"sender": {"agent": "alice"}}}}


def add(store, mid, recipient="bob", sender_run="run-a", sender_agent="alice", task=None, ts=NOW):
    return store.add_message(message=message(mid, task=task), sender_agent=sender_agent, sender_run=sender_run,
                             recipient=recipient, task_id=task, facts_digest=None, ts=ts)


def token_claims(issuer_run="run-a", scope=None):
    return t.new_claims(issuer={"run": issuer_run, "agent": "alice"},
                        holder={"run": "run-b", "agent": "bob", "cgroup": "/agentwatch/run-b"},
                        scope=scope or {"tool": "cat", "paths": ["/work/**"]}, ttl_s=600, uses=3, now=NOW)


# ---------------------------------------------------------------- the file

def test_wal_durable_and_private(store, path):
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    with store._lock:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL
        assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_reopen_keeps_everything(path):
    s = Store(path)
    seq = add(s, "m1", task="t1")
    s.create_task(task_id="t1", context_id="c1", creator_agent="alice", creator_run="run-a",
                  assignee="bob", state="TASK_STATE_SUBMITTED", ts=NOW)
    c = token_claims()
    s.add_token(c, "aw1.x.y", NOW)
    s.use_token(c["jti"], "nonce-0001", 3, NOW)
    before = (s.message("m1"), s.task("t1"), s.token(c["jti"]), s.inbox("bob"))
    s.close()
    s = Store(path)                                  # schema exists: opened, not recreated
    assert (s.message("m1"), s.task("t1"), s.token(c["jti"]), s.inbox("bob")) == before
    assert s.message("m1")["seq"] == seq and s.token(c["jti"])["used"] == 1
    with pytest.raises(TokenError):
        s.use_token(c["jti"], "nonce-0001", 3, NOW)  # the nonce survived too
    s.close()


def test_newer_schema_is_refused(path):
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Store(path)


# ---------------------------------------------------------------- messages

def test_message_roundtrip(store):
    seq = store.add_message(message=message("m1"), sender_agent="alice", sender_run="run-a", recipient="bob",
                            task_id=None, facts_digest="sha256:ab", ts=NOW)
    assert store.message("m1") == {"seq": seq, "message_id": "m1", "sender_agent": "alice", "sender_run": "run-a",
                                   "recipient": "bob", "task_id": None, "context_id": "c1",
                                   "facts_digest": "sha256:ab", "ts": NOW, "message": message("m1")}
    assert store.message("m1", recipient="bob", sender_agent="alice")["seq"] == seq
    assert store.message("m1", recipient="carol") is None
    assert store.message("m1", sender_agent="mallory") is None
    assert store.message("nope") is None
    assert store.messages_count() == 1


def test_duplicate_message_id(store):
    add(store, "m1")
    with pytest.raises(KeyError, match="duplicate messageId 'm1'"):
        add(store, "m1", recipient="carol")
    add(store, "m1", sender_run="run-c")                     # another run may use the same id
    assert store.messages_count() == 2


def test_inbox_cursor(store):
    seqs = [add(store, f"m{i}", recipient="bob" if i % 2 else "carol") for i in range(10)]
    bob = store.inbox("bob")
    assert [m["message_id"] for m in bob] == ["m1", "m3", "m5", "m7", "m9"]
    page = store.inbox("bob", after=0, limit=2)
    assert [m["message_id"] for m in page] == ["m1", "m3"]
    page = store.inbox("bob", after=page[-1]["seq"], limit=2)
    assert [m["message_id"] for m in page] == ["m5", "m7"]
    assert store.inbox("bob", after=seqs[-1]) == []
    assert store.inbox("nobody") == []


def test_concurrent_writers(store):
    def write(n):
        for i in range(20):
            add(store, f"m{n}-{i}", sender_run=f"run-{n}")
    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert store.messages_count() == 80


# ---------------------------------------------------------------- tasks

def test_task_lifecycle(store):
    task = store.create_task(task_id="t1", context_id="c1", creator_agent="alice", creator_run="run-a",
                             assignee="bob", state="TASK_STATE_SUBMITTED", ts=NOW)
    assert task == {"id": "t1", "contextId": "c1", "creator": "alice", "creator_run": "run-a", "assignee": "bob",
                    "state": "TASK_STATE_SUBMITTED", "created": NOW, "updated": NOW, "history": []}
    s1 = add(store, "m1", task="t1")                 # linked by its task_id
    s2 = add(store, "m2")
    store.add_to_task("t1", s2)                      # linked explicitly
    store.add_to_task("t1", s1)                      # twice is once
    assert [m["messageId"] for m in store.task("t1")["history"]] == ["m1", "m2"]
    done = store.set_task_state("t1", "TASK_STATE_COMPLETED", NOW + 5)
    assert done["state"] == "TASK_STATE_COMPLETED" and done["updated"] == NOW + 5 and done["created"] == NOW
    assert store.set_task_state("nope", "TASK_STATE_COMPLETED", NOW) is None
    assert store.task("nope") is None
    with pytest.raises(KeyError, match="duplicate task id"):
        store.create_task(task_id="t1", context_id="c1", creator_agent="x", creator_run="r", assignee="y",
                          state="TASK_STATE_SUBMITTED", ts=NOW)
    with pytest.raises(ValueError, match="unknown task state"):
        store.set_task_state("t1", "done", NOW)


def test_list_tasks_filters(store):
    def mk(tid, creator, assignee, context, state, ts):
        store.create_task(task_id=tid, context_id=context, creator_agent=creator, creator_run="r",
                          assignee=assignee, state=state, ts=ts)
    mk("t1", "alice", "bob", "c1", "TASK_STATE_SUBMITTED", NOW)
    mk("t2", "bob", "carol", "c2", "TASK_STATE_WORKING", NOW + 1)
    mk("t3", "carol", "alice", "c1", "TASK_STATE_COMPLETED", NOW + 2)
    mk("t4", "carol", "dave", "c1", "TASK_STATE_SUBMITTED", NOW + 3)
    ids = lambda agent, **kw: [x["id"] for x in store.list_tasks(agent, **kw)]
    assert ids("alice") == ["t3", "t1"]
    assert ids("bob") == ["t2", "t1"]
    assert ids("carol", context_id="c1") == ["t4", "t3"]
    assert ids("carol", state="TASK_STATE_WORKING") == ["t2"]
    assert ids("carol", after=NOW + 1) == ["t4", "t3"]
    assert ids("carol", limit=1) == ["t4"]
    assert ids("eve") == []
    assert "history" not in store.list_tasks("alice")[0]
    store.set_task_state("t1", "TASK_STATE_WORKING", NOW + 10)
    assert ids("alice") == ["t1", "t3"]


# ---------------------------------------------------------------- tokens

def test_token_roundtrip_and_listing(store):
    a, b = token_claims("run-a"), token_claims("run-x")
    store.add_token(a, "aw1.a.a", NOW)
    store.add_token(b, "aw1.b.b", NOW + 1)
    assert store.token(a["jti"]) == {"jti": a["jti"], "claims": a, "text": "aw1.a.a", "issuer_run": "run-a",
                                     "holder_run": "run-b", "holder_agent": "bob", "revoked_at": None, "used": 0}
    assert store.token("nope") is None
    assert [x["jti"] for x in store.tokens()] == [b["jti"], a["jti"]]
    assert [x["jti"] for x in store.tokens(issuer_run="run-a")] == [a["jti"]]
    assert store.tokens(holder_agent="carol") == []
    with pytest.raises(KeyError):
        store.add_token(a, "aw1.a.a", NOW)


def test_replay_and_exhaustion(store):
    c = token_claims()
    store.add_token(c, "aw1.x.y", NOW)
    assert store.use_token(c["jti"], "nonce-0001", 2, NOW) == 1
    with pytest.raises(TokenError) as e:
        store.use_token(c["jti"], "nonce-0001", 2, NOW)
    assert e.value.reason == "replayed"
    assert store.use_token(c["jti"], "nonce-0002", 2, NOW) == 2
    with pytest.raises(TokenError) as e:
        store.use_token(c["jti"], "nonce-0003", 2, NOW)
    assert e.value.reason == "exhausted" and "2 of 2" in str(e.value)
    assert store.token(c["jti"])["used"] == 2                       # a refused use is not counted
    with pytest.raises(TokenError) as e:
        store.use_token(c["jti"], "nonce-0001", 2, NOW)
    assert e.value.reason == "replayed"


@pytest.mark.parametrize("nonce", ["short", "x" * 129, None, 12345678])
def test_bad_nonce(store, nonce):
    c = token_claims()
    store.add_token(c, "aw1.x.y", NOW)
    with pytest.raises(TokenError) as e:
        store.use_token(c["jti"], nonce, 3, NOW)
    assert e.value.reason == "invalid"


def test_unknown_token_use(store):
    with pytest.raises(TokenError) as e:
        store.use_token("0" * 32, "nonce-0001", 3, NOW)
    assert e.value.reason == "invalid"


def test_revoke_issuer_revokes_descendants(store):
    root = token_claims("run-a")
    child = t.attenuate(root, now=NOW)
    grandchild = t.attenuate(child, now=NOW)
    other = token_claims("run-x")
    for c in (root, child, grandchild, other):
        store.add_token(c, "aw1.x.y", NOW)
    assert not any(store.chain_revoked(c) for c in (root, child, grandchild, other))
    assert store.revoke_issuer("run-a", NOW + 1) == 3
    assert store.revoke_issuer("run-a", NOW + 2) == 0                 # already revoked
    assert all(store.chain_revoked(c) for c in (root, child, grandchild))
    assert store.token(child["jti"])["revoked_at"] == NOW + 1
    assert not store.chain_revoked(other)


def test_chain_revoked_by_an_ancestor_or_unknown(store):
    root = token_claims()
    child = t.attenuate(root, now=NOW)
    grandchild = t.attenuate(child, now=NOW)
    assert store.chain_revoked(root)                                  # not recorded: not honoured
    for c in (root, child, grandchild):
        store.add_token(c, "aw1.x.y", NOW)
    assert not store.chain_revoked(grandchild)
    with store._lock:
        store._db.execute("UPDATE tokens SET revoked_at = ? WHERE jti = ?", (NOW, child["jti"]))
    assert store.chain_revoked(grandchild) and not store.chain_revoked(root)
    orphan = t.attenuate(t.attenuate(token_claims(), now=NOW), now=NOW)
    store.add_token(orphan, "aw1.x.y", NOW)                          # its ancestors are unknown
    assert store.chain_revoked(orphan)


def test_group_commit_many_writers_one_batch_each_durable(tmp_path):
    """submit(): concurrent writes share commits; each future resolves only
    once its write is committed (a fresh connection sees it); one write's
    error undoes only that write."""
    import threading
    s = Store(str(tmp_path / "g.db"))
    futs = []

    def writer(k):
        for i in range(50):
            futs.append(s.submit(s.add_message, message={"messageId": f"{k}-{i}", "parts": [{"text": "x"}]},
                                 sender_agent="a", sender_run=f"r{k}", recipient="b", task_id=None,
                                 facts_digest=None, ts=1.0))
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dup = s.submit(s.add_message, message={"messageId": "0-0", "parts": [{"text": "x"}]}, sender_agent="a",
                   sender_run="r0", recipient="b", task_id=None, facts_digest=None, ts=1.0)
    seqs = [f.result(10) for f in futs]
    with pytest.raises(KeyError):
        dup.result(10)
    assert len(set(seqs)) == 200
    other = Store(str(tmp_path / "g.db"))
    assert other.messages_count() == 200
    other.close()
    s.close()


def test_spend_token_spends_the_root_too_and_nothing_when_refused(tmp_path):
    s = Store(str(tmp_path / "t.db"))
    root = {"jti": "r" * 32, "iss": {"run": "A"}, "sub": {"run": "B", "agent": "b"}, "root": "r" * 32,
            "parent": None, "uses": 1, "exp": 9e9}
    child = dict(root, jti="c" * 32, parent="r" * 32, uses=1)
    s.add_token(root, "t-root", 1.0)
    s.add_token(child, "t-child", 1.0)
    assert s.spend_token(child, "nonce-0001", 2.0) == 1
    assert s.token("r" * 32)["used"] == 1
    child2 = dict(root, jti="d" * 32, parent="r" * 32, uses=5)
    s.add_token(child2, "t-child2", 1.0)
    with pytest.raises(TokenError) as e:
        s.spend_token(child2, "nonce-0002", 3.0)      # the root is spent
    assert e.value.reason == "exhausted"
    assert s.token("d" * 32)["used"] == 0, "nothing spent when the root refuses"
    s.close()


def test_revoke_all_at_a_broker_start(tmp_path):
    s = Store(str(tmp_path / "r.db"))
    claims = {"jti": "a" * 32, "iss": {"run": "A"}, "sub": {"run": "B", "agent": "b"}, "root": "a" * 32,
              "parent": None, "uses": 1, "exp": 9e9}
    s.add_token(claims, "t", 1.0)
    assert not s.chain_revoked(claims)
    assert s.revoke_all(2.0) == 1 and s.chain_revoked(claims)
    assert s.revoke_all(3.0) == 0
    s.close()
