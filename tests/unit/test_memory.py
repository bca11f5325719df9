"""agentwatch.harness.memory: records, search by relevance and recency,
validity apart from recency (stale, verify, invalidate), budgets and gc,
namespaces, bad input, concurrency, durability and crash safety."""
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time

import pytest

from agentwatch.harness.memory import (MAX_RECORD_BYTES, SCHEMA_VERSION, TAGS, VALIDITY, MemoryStore, Record,
                                       RecordError, file_sha256)

NOW = 1_700_000_000.0
DAY = 86400.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "state" / "memory.db")


@pytest.fixture
def store(path):
    s = MemoryStore(path)
    yield s
    s.close()


@pytest.fixture
def src(tmp_path):
    """A provenance file."""
    p = tmp_path / "src" / "config.toml"
    p.parent.mkdir()
    p.write_text("port = 8080\n")
    return str(p)


def filler(store, agent="a", n=8, now=NOW):
    for i in range(n):
        store.put(agent, text=f"unrelated note number {i} about lunch and weather", now=now)


# ---------------------------------------------------------------- the file

def test_constants():
    assert TAGS == ("fact", "context")
    assert VALIDITY == ("valid", "stale", "invalidated")
    assert MAX_RECORD_BYTES == 64 * 1024
    assert issubclass(RecordError, ValueError)


def test_wal_durable_private_versioned(store, path):
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    with store._lock:
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2          # FULL


def test_newer_schema_refused(path):
    MemoryStore(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        MemoryStore(path)


def test_reopen_keeps_everything(path, src):
    s = MemoryStore(path)
    r = s.put("a", text="remember this", data={"k": [1, 2]}, tag="fact",
              provenance={"files": [{"path": src}], "commands": [{"argv": ["make"], "exit": 0}],
                          "messages": ["m1"]}, now=NOW)
    s.mark_stale(src, {"by": "outsider", "pid": 7}, now=NOW + 1)
    s.set_budget("a", records=5)
    s.close()
    s = MemoryStore(path)
    got = s.record(r.id)
    assert (got.text, got.data, got.tag, got.validity, got.stale_since) == ("remember this", {"k": [1, 2]},
                                                                           "fact", "stale", NOW + 1)
    assert got.provenance["commands"] == [{"argv": ["make"], "exit": 0}]
    assert s.budget("a") == {"records": 5, "bytes": 64 << 20}
    assert [x.id for x in s.search("a", "remember", now=NOW + 2)] == [r.id]
    s.close()


# ---------------------------------------------------------------- put / get

def test_put_get(store, src):
    r = store.put("a", text="the build uses port 8080", provenance={"files": [{"path": src}]}, now=NOW)
    assert isinstance(r, Record) and len(r.id) == 32 and int(r.id, 16) >= 0
    assert (r.agent, r.tag, r.validity, r.created_at, r.last_accessed_at) == ("a", "context", "valid", NOW, NOW)
    assert r.provenance == {"files": [{"path": src, "sha256": file_sha256(src)}], "commands": [], "messages": []}
    assert r.size == len("the build uses port 8080")
    g = store.get("a", r.id, now=NOW + 5)
    assert g.text == r.text and g.last_accessed_at == NOW + 5 and g.created_at == NOW
    assert store.record(r.id).last_accessed_at == NOW + 5
    assert store.get("a", "nope") is None
    d = g.to_dict()
    assert d["id"] == r.id and d["score"] is None and d["provenance"] == r.provenance


def test_given_sha256_is_kept_and_data_counts_in_size(store, tmp_path):
    sha = "ab" * 32
    r = store.put("a", data={"b": 1, "a": "é"},
                  provenance={"files": [{"path": str(tmp_path / "gone"), "sha256": sha}]})
    assert r.provenance["files"][0]["sha256"] == sha            # the file need not exist: the agent saw it
    assert r.text is None and r.data == {"a": "é", "b": 1}
    assert r.size == len('{"a":"é","b":1}'.encode())


def test_path_normalised(store, src):
    d, name = os.path.split(src)
    r = store.put("a", text="x", provenance={"files": [{"path": d + "/./../" + os.path.basename(d) + "//" + name}]})
    assert r.provenance["files"][0]["path"] == src
    assert src in store.watched_paths()


def test_records_listing(store):
    a1 = store.put("a", text="one", now=NOW)
    a2 = store.put("a", text="two", tag="fact", now=NOW + 1)
    b1 = store.put("b", text="three", now=NOW + 2)
    assert [r.id for r in store.records()] == [b1.id, a2.id, a1.id]
    assert [r.id for r in store.records("a")] == [a2.id, a1.id]
    assert [r.id for r in store.records("a", tag="fact")] == [a2.id]
    assert [r.id for r in store.records(limit=1)] == [b1.id]
    store.invalidate(a1.id, "wrong")
    assert [r.id for r in store.records(validity="invalidated")] == [a1.id]
    assert store.record(b1.id).last_accessed_at == NOW + 2          # no recency update
    with pytest.raises(RecordError, match="unknown validity"):
        store.records(validity="bogus")


# ---------------------------------------------------------------- search

def test_search_relevance_beats_recency(store):
    filler(store, n=10, now=NOW)
    strong = store.put("a", text="deploy key rotation: rotate the deploy key with vault", now=NOW - 30 * DAY)
    weak = store.put("a", text="deploy notes", now=NOW)
    found = store.search("a", "deploy key rotation", now=NOW)
    assert [r.id for r in found] == [strong.id, weak.id]
    assert found[0].score > found[1].score > 0


def test_search_recency_breaks_ties(store):
    filler(store, now=NOW)
    old = store.put("a", text="the cache lives in /var/cache/app", now=NOW - 10 * DAY)
    new = store.put("a", text="the cache lives in /var/cache/app", now=NOW - DAY)
    found = store.search("a", "cache", now=NOW)
    assert [r.id for r in found] == [new.id, old.id]
    # reading the old one makes it the most recent: it now wins the tie
    store.get("a", old.id, now=NOW + 1)
    assert [r.id for r in store.search("a", "cache", now=NOW + 2)] == [old.id, new.id]


def test_search_limit_and_data_indexed(store):
    filler(store, now=NOW)
    ids = [store.put("a", data={"service": "postgres", "n": i}, now=NOW + i).id for i in range(5)]
    found = store.search("a", "postgres", limit=3, now=NOW + 10)
    assert [r.id for r in found] == ids[::-1][:3]
    assert store.search("a", "nothingmatches", now=NOW) == []


def test_search_empty_or_punctuation_query_returns_most_recent(store):
    r1 = store.put("a", text="first", now=NOW)
    r2 = store.put("a", text="second", now=NOW + 1)
    assert [r.id for r in store.search("a", "", now=NOW)] == [r2.id, r1.id]
    store.get("a", r1.id, now=NOW + 5)                            # r1 is now the most recently accessed
    for q in ("   ", "!!! ?? ((", None):
        found = store.search("a", q, limit=1, now=NOW + 3)     # now is before r1's access: no tie
        assert [r.id for r in found] == [r1.id] and 0.5 <= found[0].score <= 1


@pytest.mark.parametrize("query", ['"', 'a"b', "NEAR(x y)", "x AND", "OR", "col:val", "*", "^start", "a - b",
                                   "x) OR (y", "'; DROP TABLE records; --", "\0"])
def test_search_query_syntax_never_errors(store, query):
    store.put("a", text="x y start val b", now=NOW)
    store.search("a", query, now=NOW)


def test_search_valid_only(store, src):
    stale = store.put("a", text="port is 8080", provenance={"files": [{"path": src}]}, now=NOW)
    fresh = store.put("a", text="port is 9090", now=NOW)
    store.mark_stale(src, {"by": "agent"}, now=NOW + 1)
    everything = store.search("a", "port", now=NOW + 2)
    assert {r.id: r.validity for r in everything} == {stale.id: "stale", fresh.id: "valid"}
    assert [r.id for r in store.search("a", "port", valid_only=True, now=NOW + 2)] == [fresh.id]
    assert [r.id for r in store.search("a", "", valid_only=True, now=NOW + 2)] == [fresh.id]


def test_reads_never_change_validity(store, src):
    r = store.put("a", text="port is 8080", provenance={"files": [{"path": src}]}, now=NOW)
    store.mark_stale(src, {"by": "outsider", "pid": 42}, now=NOW + 1)
    g = store.get("a", r.id, now=NOW + 2)
    assert (g.validity, g.last_accessed_at, g.stale_since) == ("stale", NOW + 2, NOW + 1)
    s = store.search("a", "port", now=NOW + 3)[0]
    assert (s.validity, s.last_accessed_at) == ("stale", NOW + 3)
    again = store.record(r.id)
    assert (again.validity, again.last_accessed_at, again.stale_since) == ("stale", NOW + 3, NOW + 1)
    assert again.stale_event == {"by": "outsider", "pid": 42, "path": src}
    assert again.checks == []


def test_search_bad_query_and_long_query(store):
    r = store.put("a", text="needle", now=NOW)
    with pytest.raises(RecordError, match="query must be a string"):
        store.search("a", ["needle"])
    with pytest.raises(RecordError, match="limit"):
        store.search("a", "needle", limit=0)
    assert [x.id for x in store.search("a", "needle " + "hay " * 10000, now=NOW)] == [r.id]


def test_access_time_never_moves_backwards(store):
    r = store.put("a", text="x", now=NOW)
    store.get("a", r.id, now=NOW + 10)
    assert store.get("a", r.id, now=NOW + 5).last_accessed_at == NOW + 10
    assert store.search("a", "x", now=NOW + 1)[0].last_accessed_at == NOW + 10


# ---------------------------------------------------------------- validity

def test_mark_stale_by_path_with_evidence(store, src, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("o")
    r1 = store.put("a", text="one", provenance={"files": [{"path": src}]}, now=NOW)
    r2 = store.put("b", text="two", provenance={"files": [{"path": src}, {"path": str(other)}]}, now=NOW)
    r3 = store.put("a", text="three", provenance={"files": [{"path": str(other)}]}, now=NOW)
    assert store.watched_paths() == {src, str(other)}
    ev = {"run": "run-1", "pid": 99, "exe": "/usr/bin/sed", "op": "write", "by": "agent"}
    assert sorted(store.mark_stale(src, ev, now=NOW + 5)) == sorted([r1.id, r2.id])
    for rid in (r1.id, r2.id):
        rec = store.record(rid)
        assert (rec.validity, rec.stale_since, rec.stale_event) == ("stale", NOW + 5, dict(ev, path=src))
    assert store.record(r3.id).validity == "valid"
    assert store.watched_paths() == {str(other)}
    # a second write: the first evidence stands, nothing newly stale
    assert store.mark_stale(src, {"by": "outsider"}, now=NOW + 9) == []
    assert store.record(r1.id).stale_event["by"] == "agent" and store.record(r1.id).stale_since == NOW + 5
    assert store.mark_stale(src + ".bak", {}, now=NOW) == []
    with pytest.raises(RecordError, match="evidence must be JSON"):
        store.mark_stale(str(other), {"pid": object()})
    with pytest.raises(RecordError, match="not absolute"):
        store.mark_stale("other.txt", {})
    assert store.record(r3.id).validity == "valid"


def test_mark_stale_through_a_symlink(store, tmp_path, src):
    link = tmp_path / "link"
    link.symlink_to(os.path.dirname(src))
    r = store.put("a", text="via link", provenance={"files": [{"path": str(link / "config.toml")}]})
    assert store.mark_stale(src, {"by": "agent"}) == [r.id]        # the write is reported on the real path


def test_verify_back_to_valid_and_stays_stale(store, src):
    r = store.put("a", text="port 8080", provenance={"files": [{"path": src}]}, now=NOW)
    original = open(src).read()
    with open(src, "w") as f:
        f.write("port = 9090\n")
    store.mark_stale(src, {"by": "agent", "pid": 5}, now=NOW + 1)
    v = store.verify(r.id, now=NOW + 2)                            # still changed: stays stale, first evidence
    assert (v.validity, v.stale_since, v.stale_event["pid"]) == ("stale", NOW + 1, 5)
    assert v.checks == [{"at": NOW + 2, "result": "stale", "mismatched": [src]}]
    with open(src, "w") as f:
        f.write(original)                                          # restored: the hash matches again
    v = store.verify(r.id, now=NOW + 3)
    assert (v.validity, v.stale_since, v.stale_event) == ("valid", None, None)
    assert [c["result"] for c in v.checks] == ["stale", "valid"]
    assert store.record(r.id).to_dict() == v.to_dict()
    assert src in store.watched_paths()


def test_verify_finds_a_change_nobody_reported(store, src):
    r = store.put("a", text="port 8080", provenance={"files": [{"path": src}]}, now=NOW)
    os.unlink(src)
    v = store.verify(r.id, now=NOW + 1)
    assert (v.validity, v.stale_since, v.stale_event) == ("stale", NOW + 1, {"by": "verify", "mismatched": [src]})
    assert store.verify("unknown") is None


def test_invalidate_for_good(store, src):
    r = store.put("a", text="port 8080", provenance={"files": [{"path": src}]}, now=NOW)
    inv = store.invalidate(r.id, "the user said it is wrong", now=NOW + 1)
    assert inv.validity == "invalidated"
    assert inv.checks == [{"at": NOW + 1, "result": "invalidated", "reason": "the user said it is wrong"}]
    v = store.verify(r.id, now=NOW + 2)                             # hashes match, but it stays invalidated
    assert v.validity == "invalidated" and v.checks[-1] == {"at": NOW + 2, "result": "valid", "mismatched": []}
    assert store.mark_stale(src, {"by": "agent"}) == []
    assert store.get("a", r.id).validity == "invalidated"
    assert src not in store.watched_paths()
    assert store.invalidate("unknown", "x") is None


# ---------------------------------------------------------------- budget and gc

def test_gc_order_and_facts_survive(path, src):
    store = MemoryStore(path, budget_records=100)
    facts = [store.put("a", text=f"fact {i}", data={"i": i}, tag="fact", now=NOW + i) for i in range(3)]
    before = {f.id: store.record(f.id).to_dict() for f in facts}
    old_ctx = store.put("a", text="old context", now=NOW)
    new_ctx = store.put("a", text="new context", now=NOW + 50)
    stale_recent = store.put("a", text="stale but recent", provenance={"files": [{"path": src}]}, now=NOW + 60)
    inv = store.put("a", text="invalidated", now=NOW + 70)
    store.mark_stale(src, {"by": "agent"}, now=NOW + 61)
    store.invalidate(inv.id, "wrong")
    store.put("b", text="b's own", now=NOW)
    assert store.gc()["evicted"] == 0                                     # within budget: nothing

    store.set_budget("a", records=6)
    out = store.gc("a", now=NOW + 100)
    assert out["evicted_ids"] == [stale_recent.id] and out["evicted"] == 1
    store.set_budget("a", records=5)
    assert store.gc(now=NOW + 100)["evicted_ids"] == [inv.id]
    store.set_budget("a", records=4)
    assert store.gc(now=NOW + 100)["evicted_ids"] == [old_ctx.id]        # then valid context, oldest access
    store.set_budget("a", records=0)                                      # tighter than the facts
    out = store.gc(now=NOW + 100)
    assert out["evicted_ids"] == [new_ctx.id]
    assert out["agents"]["a"]["records"] == 3 and out["agents"]["a"]["over_budget_facts"] == 3
    assert out["over_budget_facts"] == 3
    assert out["agents"]["b"] == {"records": 1, "bytes": len("b's own"),
                                  "budget": {"records": 100, "bytes": 64 << 20}}
    assert {f.id: store.record(f.id).to_dict() for f in facts} == before     # byte for byte
    assert [r.id for r in store.records("a")] == [f.id for f in facts[::-1]]
    assert store.search("a", "context", now=NOW + 101) == []                 # gone from the index too
    assert store.watched_paths() == set()
    store.close()


def test_gc_by_bytes_uses_access_time(store):
    a = store.put("a", text="x" * 100, now=NOW)
    b = store.put("a", text="y" * 100, now=NOW + 1)
    store.get("a", a.id, now=NOW + 2)                                     # a is now the more recent
    store.set_budget("a", bytes=150)
    out = store.gc("a")
    assert out["evicted_ids"] == [b.id] and out["agents"]["a"]["bytes"] == 100


def test_set_budget_validates(store):
    with pytest.raises(RecordError):
        store.set_budget("a", records=-1)
    store.set_budget("a", bytes=10)
    store.set_budget("a", records=3)
    assert store.budget("a") == {"records": 3, "bytes": 10}


def test_stats(store, src):
    store.put("a", text="abc", now=NOW)
    r = store.put("b", text="de", tag="fact", provenance={"files": [{"path": src}]}, now=NOW)
    store.mark_stale(src, {})
    s = store.stats()
    assert s["records"] == 2 and s["bytes"] == 5
    assert s["validity"] == {"valid": 1, "stale": 1, "invalidated": 0}
    assert s["tags"] == {"fact": 1, "context": 1}
    assert s["agents"] == {"a": {"records": 1, "bytes": 3}, "b": {"records": 1, "bytes": 2}}
    assert s["file_bytes"] > 0
    assert r.id


# ---------------------------------------------------------------- namespaces

def test_isolation(store):
    a = store.put("alice", text="alice's secret plan", now=NOW)
    b = store.put("bob", text="bob's secret plan", now=NOW)
    assert store.get("bob", a.id) is None and store.get("alice", b.id) is None
    assert [r.id for r in store.search("alice", "secret plan", now=NOW)] == [a.id]
    assert [r.id for r in store.search("bob", "", now=NOW)] == [b.id]
    assert [r.id for r in store.search("carol", "secret", now=NOW)] == []
    assert store.record(a.id).last_accessed_at == NOW            # bob's attempt did not touch it
    assert {r.agent for r in store.records()} == {"alice", "bob"}


# ---------------------------------------------------------------- bad input

def test_huge_record_capped(store):
    with pytest.raises(RecordError) as e:
        store.put("a", text="x" * (MAX_RECORD_BYTES + 1))
    assert str(MAX_RECORD_BYTES + 1) in str(e.value) and str(MAX_RECORD_BYTES) in str(e.value)
    with pytest.raises(RecordError, match="over the cap of 65536 bytes"):
        store.put("a", text="x" * 40000, data={"y": "z" * 40000})
    store.put("a", text="x" * MAX_RECORD_BYTES)                    # exactly the cap is fine
    with pytest.raises(RecordError, match="cap of"):
        store.put("a", text="", provenance={"messages": ["m" * 100] * 1000})
    assert store.stats()["records"] == 1


def test_small_cap(path):
    s = MemoryStore(path, max_record_bytes=10)
    with pytest.raises(RecordError, match="11 bytes.*cap of 10 bytes"):
        s.put("a", text="x" * 11)
    s.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "x", "tag": "opinion"}, "unknown tag 'opinion'"),
    ({}, "text, data or both"),
    ({"text": 5}, "text must be a string"),
    ({"data": {1, 2}}, "must be JSON"),
    ({"data": float("nan")}, "must be JSON"),
    ({"text": "x", "provenance": []}, "provenance must be an object"),
    ({"text": "x", "provenance": {"urls": []}}, "unknown provenance key.*urls"),
    ({"text": "x", "provenance": {"files": "/etc/passwd"}}, "files must be a list"),
    ({"text": "x", "provenance": {"files": [{"path": "rel/path", "sha256": "ab" * 32}]}}, "not absolute"),
    ({"text": "x", "provenance": {"files": [{"sha256": "ab" * 32}]}}, "with a path"),
    ({"text": "x", "provenance": {"files": [{"path": "/x", "sha256": "nothex"}]}}, "64 hex digits"),
    ({"text": "x", "provenance": {"files": [{"path": "/x", "sha256": "ab" * 32, "mtime": 1}]}}, "mtime"),
    ({"text": "x", "provenance": {"files": [{"path": "/x", "sha256": "ab" * 32},
                                            {"path": "/x", "sha256": "cd" * 32}]}}, "listed twice"),
    ({"text": "x", "provenance": {"commands": [{"argv": "make", "exit": 0}]}}, "argv"),
    ({"text": "x", "provenance": {"commands": [{"argv": ["make", 1], "exit": 0}]}}, "argv"),
    ({"text": "x", "provenance": {"commands": [{"argv": ["make"], "exit": "0"}]}}, "exit must be an integer"),
    ({"text": "x", "provenance": {"commands": [{"argv": ["make"], "exit": True}]}}, "exit must be an integer"),
    ({"text": "x", "provenance": {"commands": [{"argv": ["make"]}]}}, "exactly argv and exit"),
    ({"text": "x", "provenance": {"messages": [3]}}, "message id"),
    ({"text": "lone \ud800"}, "not valid Unicode"),
    ({"data": {"k": "\udfff"}}, "not valid Unicode"),
    ({"text": "x", "provenance": {"messages": ["\ud800"]}}, "not valid Unicode"),
])
def test_bad_input(store, kwargs, message):
    with pytest.raises(RecordError, match=message):
        store.put("a", **kwargs)
    assert store.stats()["records"] == 0


def test_missing_or_unreadable_file(store, tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(RecordError, match=f"{missing} cannot be read"):
        store.put("a", text="x", provenance={"files": [{"path": missing}]})
    with pytest.raises(RecordError, match="is a directory"):
        store.put("a", text="x", provenance={"files": [{"path": str(tmp_path)}]})
    with pytest.raises(RecordError, match="agent name"):
        store.put("", text="x")
    assert store.stats()["records"] == 0


def test_custom_hasher_refusal(path, src):
    def hasher(p):
        raise PermissionError(13, "Permission denied", p)
    s = MemoryStore(path, hasher=hasher)
    with pytest.raises(RecordError, match="Permission denied"):
        s.put("a", text="x", provenance={"files": [{"path": src}]})
    s.close()


# ---------------------------------------------------------------- concurrency

def test_concurrent_writers(store):
    ids, errors = [], []
    lock = threading.Lock()

    def writer(n):
        try:
            futs = [store.submit(store.put, f"agent{n % 3}", text=f"submitted {n} {i}") for i in range(40)]
            mine = [store.put(f"agent{n % 3}", text=f"direct {n} {i}") .id for i in range(20)]
            mine += [f.result(timeout=30).id for f in futs]
            store.search(f"agent{n % 3}", "submitted")
            with lock:
                ids.extend(mine)
        except Exception as e:          # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(ids) == len(set(ids)) == 8 * 60
    assert store.stats()["records"] == 8 * 60
    assert all(store.record(i) is not None for i in ids)


def test_submit_error_undoes_only_its_own(store):
    good = store.submit(store.put, "a", text="fine")
    bad = store.submit(store.put, "a", text="x", tag="nope")
    assert good.result(timeout=10).text == "fine"
    with pytest.raises(RecordError):
        bad.result(timeout=10)
    assert store.stats()["records"] == 1


# ---------------------------------------------------------------- crash safety

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from agentwatch.harness import memory
store = memory.MemoryStore(sys.argv[2])
ack = open(sys.argv[3], "a")
print("ready", flush=True)
i = 0
while True:
    r = store.put("a", text=f"record {i} " + "x" * (i % 300), data={"i": i}, tag=("fact", "context")[i % 2],
                  provenance={"commands": [{"argv": ["echo", str(i)], "exit": 0}]})
    ack.write(r.id + "\n")
    ack.flush()
    i += 1
"""


def acknowledged(ack_path):
    with open(ack_path) as f:
        return [line[:-1] for line in f if line.endswith("\n") and len(line) == 33]


def test_sigkill_at_random_moments_loses_nothing_acknowledged(tmp_path):
    db_path, ack_path = str(tmp_path / "memory.db"), str(tmp_path / "acked")
    module = REPO
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    deadline = time.monotonic() + 25
    rounds = 0
    while rounds < 100 and time.monotonic() < deadline:
        child = subprocess.Popen([sys.executable, "-c", CHILD, module, db_path, ack_path],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if rng.random() < 0.9:            # most often mid-put, sometimes while opening the store
                assert child.stdout.readline() == "ready\n", child.stderr.read()
            time.sleep(rng.uniform(0, 0.02))
        finally:
            os.kill(child.pid, signal.SIGKILL)  # only the child this test started
            child.wait()
            child.stdout.close()
            child.stderr.close()
        rounds += 1
        db = sqlite3.connect(db_path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"seed {seed}, round {rounds}"
        if db.execute("PRAGMA user_version").fetchone()[0]:     # (a kill while creating the schema leaves none)
            db.execute("INSERT INTO records_fts (records_fts) VALUES ('integrity-check')")   # the index matches
        db.close()
    assert rounds >= 50, "too slow a machine for the crash loop"
    print(f"crash loop: {rounds} rounds, seed {seed}")
    acked = acknowledged(ack_path)
    assert len(acked) > rounds                   # the kills did land mid-loop
    print(f"acknowledged: {len(acked)}")
    s = MemoryStore(db_path)
    with s._lock:
        present = {r[0] for r in s._db.execute("SELECT id FROM records")}
    missing = [i for i in acked if i not in present]
    assert missing == [], f"seed {seed}: {len(missing)} acknowledged records lost"
    assert s.search("a", "record", limit=1)[0].id in present
    s.close()
