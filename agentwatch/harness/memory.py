"""Agents' memory: records whose validity is tracked apart from their recency.

A record is something an agent wants to remember: text, JSON data or both,
tagged "fact" (kept whatever the budget) or "context" (evictable), with its
provenance: the files it was derived from (path and SHA-256 of the content
the agent saw), the commands (argv, exit status) and the messages (ids).

Two clocks, never mixed:

- recency: last_accessed_at, moved by every get() and search() hit; it
  ranks search results and orders eviction, and says nothing about truth;
- validity: "valid" when made; "stale" once a file of its provenance was
  written (mark_stale, from the watchers, with the event as evidence) or a
  re-check found a hash that no longer matches (verify); "invalidated" for
  good by invalidate(). Reading a record never changes its validity, and a
  stale record stays readable: every result says what it is worth.

One SQLite file, a namespace per agent (the agent column): WAL with
synchronous=FULL, so a record put() acknowledged survives a kill -9 or a
power loss. Search is FTS5 (bm25 over the text and the data's JSON text)
weighted by recency. As in the broker's store (broker_store.py), one
connection shared by the threads behind a lock, and group commit through
submit(): waiting writes share one transaction (a savepoint each) and one
fsync, and each caller's future resolves only after that commit.
"""
import hashlib
import heapq
import json
import os
import re
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass

from .sqlite_store import SqliteStore

TAGS = ("fact", "context")
VALIDITY = ("valid", "stale", "invalidated")
MAX_RECORD_BYTES = 64 * 1024
MAX_PROVENANCE_FILES = 256           # files one record may name
RECENCY_HALF_LIFE_S = 86400.0        # a record not accessed for a day weighs 3/4, then -> 1/2
MAX_CHECKS = 100                     # re-checks kept per record (the newest)
MAX_QUERY_WORDS = 64                 # the first distinct words of a search query count
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    seq              INTEGER PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    agent            TEXT NOT NULL,
    text             TEXT,
    data             TEXT,
    tag              TEXT NOT NULL,
    provenance       TEXT NOT NULL,
    created_at       REAL NOT NULL,
    last_accessed_at REAL NOT NULL,
    validity         TEXT NOT NULL,
    stale_since      REAL,
    stale_event      TEXT,
    checks           TEXT NOT NULL DEFAULT '[]',
    size             INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_agent ON records (agent, created_at);

CREATE TABLE IF NOT EXISTS record_files (
    record_id TEXT NOT NULL,
    path      TEXT NOT NULL,
    sha256    TEXT NOT NULL,
    PRIMARY KEY (record_id, path)
);
CREATE INDEX IF NOT EXISTS record_files_path ON record_files (path);

CREATE TABLE IF NOT EXISTS budgets (
    agent   TEXT PRIMARY KEY,
    records INTEGER,
    bytes   INTEGER
);

CREATE VIRTUAL TABLE IF NOT EXISTS records_fts USING fts5(
    text, data, content='records', content_rowid='seq', tokenize='unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS records_fts_insert AFTER INSERT ON records BEGIN
    INSERT INTO records_fts (rowid, text, data) VALUES (new.seq, new.text, new.data);
END;
CREATE TRIGGER IF NOT EXISTS records_fts_delete AFTER DELETE ON records BEGIN
    INSERT INTO records_fts (records_fts, rowid, text, data) VALUES ('delete', old.seq, old.text, old.data);
END;
CREATE TRIGGER IF NOT EXISTS records_fts_update AFTER UPDATE OF text, data ON records BEGIN
    INSERT INTO records_fts (records_fts, rowid, text, data) VALUES ('delete', old.seq, old.text, old.data);
    INSERT INTO records_fts (rowid, text, data) VALUES (new.seq, new.text, new.data);
END;
"""

COLUMNS = ("id, agent, text, data, tag, provenance, created_at, last_accessed_at, validity, stale_since,"
           " stale_event, checks, size")
PROVENANCE_KEYS = ("files", "commands", "messages")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_WORD = re.compile(r"\w+")


class RecordError(ValueError):
    """Bad input to the memory store (unknown tag, a record too big, bad
    provenance, a provenance file that cannot be read...); the message is
    for the user."""


@dataclass
class Record:
    id: str
    agent: str
    text: object            # str or None
    data: object
    tag: str
    provenance: dict
    created_at: float
    last_accessed_at: float
    validity: str
    stale_since: object     # float or None
    stale_event: object     # dict or None
    checks: list
    size: int
    score: float = None     # set by search

    def to_dict(self):
        return asdict(self)


def file_sha256(path):
    """Hex SHA-256 of the file's content (OSError when it cannot be read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def _canonical(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _utf8_len(text, what):
    """len(text.encode()); RecordError for a string UTF-8 cannot carry (a
    lone surrogate, which JSON can spell)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise RecordError(f"{what} is not valid Unicode (a lone surrogate?)") from None


def _norm_path(path):
    """The normalised absolute form of a provenance path; RecordError for
    anything else (a relative path means nothing to the store, whose working
    directory is not the agent's)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise RecordError(f"a provenance file path must be a non-empty string, not {path!r}")
    if not path.startswith("/"):
        raise RecordError(f"provenance file path {path!r} is not absolute")
    path = os.path.normpath(path)
    return "/" + path.lstrip("/")


def _fts_query(query):
    """The user's words, each quoted for FTS5 (so no input is a syntax
    error), any of them matching; None when there is no word."""
    words = list(dict.fromkeys(_WORD.findall(query or "")))[:MAX_QUERY_WORDS]
    if not words:
        return None
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def _recency(age):
    return 0.5 + 0.5 * 2 ** (-max(age, 0.0) / RECENCY_HALF_LIFE_S)


def _record(row, score=None):
    return Record(id=row["id"], agent=row["agent"], text=row["text"],
                  data=json.loads(row["data"]) if row["data"] is not None else None,
                  tag=row["tag"], provenance=json.loads(row["provenance"]),
                  created_at=row["created_at"], last_accessed_at=row["last_accessed_at"],
                  validity=row["validity"], stale_since=row["stale_since"],
                  stale_event=json.loads(row["stale_event"]) if row["stale_event"] is not None else None,
                  checks=json.loads(row["checks"]), size=row["size"], score=score)


def _check_agent(agent):
    if not isinstance(agent, str) or not agent:
        raise RecordError(f"an agent name must be a non-empty string, not {agent!r}")
    _utf8_len(agent, "the agent name")


def _check_limit(limit):
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise RecordError(f"limit must be a positive integer, not {limit!r}")


def _check_choice(what, value, known):
    if value not in known:
        raise RecordError(f"unknown {what} {value!r} (known: {', '.join(known)})")


class MemoryStore(SqliteStore):
    """The memory store's database (see the module docstring).

    hasher(path) -> hex digest hashes provenance files (put without a
    sha256, verify); it must raise OSError for a file it cannot or may not
    read. The default reads the file as this process: a daemon acting for a
    confined agent should pass one that reads only what that agent may."""

    WHAT = "memory store"
    SCHEMA = SCHEMA
    SCHEMA_VERSION = SCHEMA_VERSION

    def __init__(self, path, *, max_record_bytes=MAX_RECORD_BYTES, budget_records=10000, budget_bytes=64 << 20,
                 hasher=file_sha256, synchronous="FULL"):
        self.max_record_bytes = max_record_bytes
        self.budget_records = budget_records
        self.budget_bytes = budget_bytes
        self._hasher = hasher
        super().__init__(path, synchronous=synchronous)

    def _create_schema(self):
        try:
            super()._create_schema()
        except sqlite3.OperationalError as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if "fts5" in str(e):
                raise RuntimeError(f"{self.path}: this Python's SQLite ({sqlite3.sqlite_version}) has no "
                                   "FTS5, which the memory store's search needs") from None
            raise

    # ------------------------------------------------------------ input

    def _hash(self, path):
        try:
            return self._hasher(path)
        except IsADirectoryError:
            raise RecordError(f"provenance file {path} is a directory, not a file") from None
        except OSError as e:
            raise RecordError(f"provenance file {path} cannot be read: {e.strerror or e}") from None

    def _provenance(self, provenance):
        """The provenance, checked and completed (every file with its
        sha256), in its canonical form."""
        if provenance is None:
            provenance = {}
        if not isinstance(provenance, dict):
            raise RecordError(f"provenance must be an object with {', '.join(PROVENANCE_KEYS)}, "
                              f"not {type(provenance).__name__}")
        unknown = sorted(str(k) for k in provenance if k not in PROVENANCE_KEYS)
        if unknown:
            raise RecordError(f"unknown provenance key(s) {', '.join(unknown)} (known: {', '.join(PROVENANCE_KEYS)})")
        out = {k: [] for k in PROVENANCE_KEYS}
        for k in PROVENANCE_KEYS:
            if not isinstance(provenance.get(k, []), list):
                raise RecordError(f"provenance {k} must be a list")
        if len(provenance.get("files", [])) > MAX_PROVENANCE_FILES:
            raise RecordError(f"a record names at most {MAX_PROVENANCE_FILES} provenance files, "
                              f"not {len(provenance['files'])}")
        seen = {}
        for f in provenance.get("files", []):
            if not isinstance(f, dict) or "path" not in f:
                raise RecordError(f"a provenance file must be an object with a path (and a sha256), not {f!r}")
            extra = sorted(str(k) for k in f if k not in ("path", "sha256"))
            if extra:
                raise RecordError(f"unknown provenance file key(s) {', '.join(extra)} (known: path, sha256)")
            path = _norm_path(f["path"])
            sha = f.get("sha256")
            if sha is None:
                sha = self._hash(path)
            elif not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
                raise RecordError(f"provenance file {path}: sha256 must be 64 hex digits, not {sha!r}")
            sha = sha.lower()
            if path in seen:
                if seen[path] != sha:
                    raise RecordError(f"provenance file {path} is listed twice with different sha256")
                continue
            seen[path] = sha
            out["files"].append({"path": path, "sha256": sha})
        for c in provenance.get("commands", []):
            if not isinstance(c, dict) or set(c) != {"argv", "exit"}:
                raise RecordError(f"a provenance command must be an object with exactly argv and exit, not {c!r}")
            argv, status = c["argv"], c["exit"]
            if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
                raise RecordError(f"a provenance command's argv must be a non-empty list of strings, not {argv!r}")
            if isinstance(status, bool) or not isinstance(status, int):
                raise RecordError(f"a provenance command's exit must be an integer, not {status!r}")
            out["commands"].append({"argv": list(argv), "exit": status})
        for m in provenance.get("messages", []):
            if not isinstance(m, str) or not m:
                raise RecordError(f"a provenance message must be a message id (a non-empty string), not {m!r}")
            out["messages"].append(m)
        text = _canonical(out)
        size = _utf8_len(text, "the provenance")
        if size > self.max_record_bytes:
            raise RecordError(f"the provenance is {size} bytes, over the cap of {self.max_record_bytes} bytes")
        return out, text

    # ------------------------------------------------------------ records

    def put(self, agent, *, text=None, data=None, tag="context", provenance=None, now=None):
        """Store a new (valid) record in agent's namespace; the Record.
        RecordError for bad input, before anything is written."""
        _check_agent(agent)
        _check_choice("tag", tag, TAGS)
        if text is None and data is None:
            raise RecordError("a record needs text, data or both")
        if text is not None and not isinstance(text, str):
            raise RecordError(f"a record's text must be a string, not {type(text).__name__}")
        try:
            data_json = _canonical(data) if data is not None else None
        except (TypeError, ValueError) as e:
            raise RecordError(f"a record's data must be JSON: {e}") from None
        size = _utf8_len(text, "the record's text") if text is not None else 0
        size += _utf8_len(data_json, "the record's data") if data_json is not None else 0
        if size > self.max_record_bytes:
            raise RecordError(f"the record is {size} bytes (text and data's JSON), over the cap of "
                              f"{self.max_record_bytes} bytes")
        prov, prov_json = self._provenance(provenance)
        now = time.time() if now is None else now
        record_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute(f"INSERT INTO records ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'valid', NULL, NULL, '[]', ?)",
                       (record_id, agent, text, data_json, tag, prov_json, now, now, size))
            db.executemany("INSERT OR IGNORE INTO record_files (record_id, path, sha256) VALUES (?, ?, ?)",
                           [(record_id, p, f["sha256"]) for f in prov["files"] for p in self._aliases(f["path"])])
        return Record(id=record_id, agent=agent, text=text,
                      data=json.loads(data_json) if data_json is not None else None, tag=tag,
                      provenance=json.loads(prov_json), created_at=now, last_accessed_at=now, validity="valid",
                      stale_since=None, stale_event=None, checks=[], size=size)

    @staticmethod
    def _aliases(path):
        """The paths a write to this file may be reported under: the path
        and, through symlinks, the real one."""
        real = os.path.realpath(path)
        return [path] if real == path else [path, real]

    def _touch(self, db, ids, now):
        if ids:
            db.executemany("UPDATE records SET last_accessed_at = max(last_accessed_at, ?) WHERE id = ?",
                           [(now, i) for i in ids])          # never backwards (a late writer, a clock step)

    def get(self, agent, record_id, now=None):
        """agent's record (None when there is none, or it is another
        agent's); moves its last_accessed_at, never its validity."""
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM records WHERE id = ? AND agent = ?",
                             (record_id, agent)).fetchone()
            if row is None:
                return None
            self._touch(db, [record_id], now)
        rec = _record(row)
        rec.last_accessed_at = max(rec.last_accessed_at, now)
        return rec

    def search(self, agent, query, *, valid_only=False, limit=10, now=None):
        """agent's records matching any word of query, best first: bm25
        relevance weighted by recency, relevance * (0.5 + 0.5 * 2 **
        (-age / 1 day)), age since the last access; each with its score and
        its validity. No word in query: the most recently accessed records.
        The results' last_accessed_at moves to now (never their validity)."""
        _check_limit(limit)
        if query is not None and not isinstance(query, str):
            raise RecordError(f"a search query must be a string, not {type(query).__name__}")
        now = time.time() if now is None else now
        match = _fts_query(query)
        valid = " AND r.validity = 'valid'" if valid_only else ""
        cols = ", ".join("r." + c.strip() for c in COLUMNS.split(","))
        with self._tx() as db:
            if match is None:
                rows = db.execute(f"SELECT {cols} FROM records r WHERE r.agent = ?{valid}"
                                  " ORDER BY r.last_accessed_at DESC, r.seq DESC LIMIT ?", (agent, limit)).fetchall()
                found = [(_recency(now - r["last_accessed_at"]), r) for r in rows]
            else:
                cur = db.execute(f"SELECT {cols}, r.seq, -bm25(records_fts) AS relevance FROM records_fts"
                                 f" JOIN records r ON r.seq = records_fts.rowid"
                                 f" WHERE records_fts MATCH ? AND r.agent = ?{valid} ORDER BY relevance DESC",
                                 (match, agent))
                best = []             # a min-heap of the limit best (score, -seq, row) so far
                for r in cur:         # by relevance, the most a score can be: stop when no later one can enter
                    if len(best) >= limit and r["relevance"] <= best[0][0]:
                        break
                    item = (r["relevance"] * _recency(now - r["last_accessed_at"]), -r["seq"], r)
                    if len(best) < limit:
                        heapq.heappush(best, item)
                    elif item[:2] > best[0][:2]:
                        heapq.heapreplace(best, item)
                cur.close()
                found = [(score, r) for score, _, r in sorted(best, key=lambda x: x[:2], reverse=True)]
            self._touch(db, [r["id"] for _, r in found], now)
        out = []
        for score, row in found:
            rec = _record(row, score=score)
            rec.last_accessed_at = max(rec.last_accessed_at, now)
            out.append(rec)
        return out

    def records(self, agent=None, *, validity=None, tag=None, limit=100):
        """Records, newest first (agent None: every namespace); no recency
        update."""
        if agent is not None:
            _check_agent(agent)
        if validity is not None:
            _check_choice("validity", validity, VALIDITY)
        if tag is not None:
            _check_choice("tag", tag, TAGS)
        _check_limit(limit)
        sql, args = f"SELECT {COLUMNS} FROM records WHERE 1 = 1", []
        for cond, value in (("agent = ?", agent), ("validity = ?", validity), ("tag = ?", tag)):
            if value is not None:
                sql += " AND " + cond
                args.append(value)
        args.append(limit)
        return [_record(r) for r in self._all(sql + " ORDER BY created_at DESC, seq DESC LIMIT ?", args)]

    def record(self, record_id):
        """The record, in any namespace, or None; no recency update."""
        row = self._one(f"SELECT {COLUMNS} FROM records WHERE id = ?", (record_id,))
        return _record(row) if row else None

    # ------------------------------------------------------------ validity

    def mark_stale(self, path, evidence, now=None):
        """Every valid record whose provenance names this file becomes stale,
        with evidence (the write event: run, pid, exe, op, by...) and the
        path as its stale_event; their ids. A record already stale or
        invalidated keeps its first evidence."""
        path = _norm_path(path)
        if not isinstance(evidence, dict):
            raise RecordError(f"stale evidence must be an object, not {type(evidence).__name__}")
        now = time.time() if now is None else now
        try:
            event = _canonical(dict(evidence, path=path))
        except (TypeError, ValueError) as e:
            raise RecordError(f"stale evidence must be JSON: {e}") from None
        size = _utf8_len(event, "the stale evidence")
        if size > self.max_record_bytes:
            raise RecordError(f"the stale evidence is {size} bytes, over the cap of {self.max_record_bytes} bytes")
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT DISTINCT f.record_id FROM record_files f CROSS JOIN records r ON r.id = f.record_id"
                " WHERE f.path = ? AND r.validity = 'valid'", (path,))]   # CROSS: by the path index first
            db.executemany("UPDATE records SET validity = 'stale', stale_since = ?, stale_event = ?"
                           " WHERE id = ? AND validity = 'valid'", [(now, event, i) for i in ids])
        return ids

    def watched_paths(self):
        """The provenance files of the valid records: what the watchers must
        watch (a file a symlink names appears under both paths)."""
        return {r[0] for r in self._all(
            "SELECT DISTINCT f.path FROM record_files f JOIN records r ON r.id = f.record_id"
            " WHERE r.validity = 'valid'")}

    def verify(self, record_id, now=None):
        """Re-check a record: re-hash each provenance file. All match: valid
        again (stale_since, stale_event cleared); else stale (a valid one gets
        stale_event {"by": "verify", "mismatched": [...]}). An invalidated
        record stays invalidated. The check is appended to checks either
        way; the Record, or None for an unknown id. Files are hashed
        outside the store's lock."""
        rec = self.record(record_id)
        if rec is None:
            return None
        mismatched = []
        for f in rec.provenance.get("files", []):
            try:
                sha = self._hasher(f["path"])
            except OSError:
                sha = None
            if sha != f["sha256"]:
                mismatched.append(f["path"])
        now = time.time() if now is None else now
        result = "stale" if mismatched else "valid"
        with self._tx() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is None:                      # evicted meanwhile
                return None
            rec = _record(row)
            rec.checks = (rec.checks + [{"at": now, "result": result, "mismatched": mismatched}])[-MAX_CHECKS:]
            if rec.validity != "invalidated":
                if result == "valid":
                    rec.validity, rec.stale_since, rec.stale_event = "valid", None, None
                elif rec.validity == "valid":
                    rec.validity, rec.stale_since = "stale", now
                    rec.stale_event = {"by": "verify", "mismatched": mismatched}
            db.execute("UPDATE records SET validity = ?, stale_since = ?, stale_event = ?, checks = ? WHERE id = ?",
                       (rec.validity, rec.stale_since,
                        _canonical(rec.stale_event) if rec.stale_event is not None else None,
                        _canonical(rec.checks), record_id))
        return rec

    def invalidate(self, record_id, reason, now=None):
        """Invalidate a record for good (the reason goes to its checks, as
        {"at", "result": "invalidated", "reason"}); the Record, or None for
        an unknown id."""
        if not isinstance(reason, str):
            raise RecordError(f"an invalidation reason must be a string, not {type(reason).__name__}")
        size = _utf8_len(reason, "the invalidation reason")
        if size > self.max_record_bytes:
            raise RecordError(f"the invalidation reason is {size} bytes, over the cap of {self.max_record_bytes} bytes")
        now = time.time() if now is None else now
        with self._tx() as db:
            row = db.execute(f"SELECT {COLUMNS} FROM records WHERE id = ?", (record_id,)).fetchone()
            if row is None:
                return None
            rec = _record(row)
            rec.validity = "invalidated"
            rec.checks = (rec.checks + [{"at": now, "result": "invalidated", "reason": reason}])[-MAX_CHECKS:]
            db.execute("UPDATE records SET validity = 'invalidated', checks = ? WHERE id = ?",
                       (_canonical(rec.checks), record_id))
        return rec

    # ------------------------------------------------------------ budget

    def set_budget(self, agent, *, records=None, bytes=None):
        """agent's budget: at most this many records, this many bytes (a
        None leaves that part as it is: the store's default at first)."""
        _check_agent(agent)
        for name, value in (("records", records), ("bytes", bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise RecordError(f"a {name} budget must be a non-negative integer, not {value!r}")
        with self._tx() as db:
            db.execute("INSERT INTO budgets (agent, records, bytes) VALUES (?, ?, ?) ON CONFLICT (agent) DO UPDATE"
                       " SET records = coalesce(excluded.records, records), bytes = coalesce(excluded.bytes, bytes)",
                       (agent, records, bytes))

    def budget(self, agent):
        """agent's budget: {"records": n, "bytes": b}."""
        row = self._one("SELECT records, bytes FROM budgets WHERE agent = ?", (agent,))
        records = row["records"] if row is not None and row["records"] is not None else self.budget_records
        size = row["bytes"] if row is not None and row["bytes"] is not None else self.budget_bytes
        return {"records": records, "bytes": size}

    def gc(self, agent=None, now=None):
        """Bring each agent (or this one) within its budget, evicting context
        records: stale ones first (least recently accessed first), then
        invalidated ones, then valid ones by oldest access. Facts are never
        evicted nor rewritten: an agent whose facts alone exceed its budget
        stays over it, and the result says so ("over_budget_facts": the
        number of fact records of such agents; per agent too)."""
        if agent is not None:
            _check_agent(agent)
        evicted, agents, over_facts = [], {}, 0
        with self._tx() as db:
            names = [agent] if agent is not None else [r[0] for r in db.execute(
                "SELECT DISTINCT agent FROM records ORDER BY agent")]
            for name in names:
                budget = self.budget(name)
                count, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM records WHERE agent = ?",
                                         (name,)).fetchone()
                if count > budget["records"] or size > budget["bytes"]:
                    cur = db.execute(
                        "SELECT id, size FROM records WHERE agent = ? AND tag = 'context' ORDER BY"
                        " CASE validity WHEN 'stale' THEN 0 WHEN 'invalidated' THEN 1 ELSE 2 END,"
                        " last_accessed_at, seq", (name,))
                    victims = []
                    for record_id, record_size in cur:
                        if count <= budget["records"] and size <= budget["bytes"]:
                            break
                        victims.append(record_id)
                        count, size = count - 1, size - record_size
                    cur.close()
                    db.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in victims])
                    db.executemany("DELETE FROM record_files WHERE record_id = ?", [(i,) for i in victims])
                    evicted += victims
                entry = {"records": count, "bytes": size, "budget": budget}
                if count > budget["records"] or size > budget["bytes"]:
                    entry["over_budget_facts"] = count        # only facts are left
                    over_facts += count
                agents[name] = entry
        return {"evicted": len(evicted), "evicted_ids": evicted, "agents": agents, "over_budget_facts": over_facts}

    def stats(self):
        """Records per validity and per tag, bytes (text and data), agents,
        and the database's size on disk (file and WAL)."""
        with self._reading() as db:
            validity = dict(db.execute("SELECT validity, count(*) FROM records GROUP BY validity").fetchall())
            tags = dict(db.execute("SELECT tag, count(*) FROM records GROUP BY tag").fetchall())
            agents = {r[0]: {"records": r[1], "bytes": r[2]} for r in db.execute(
                "SELECT agent, count(*), sum(size) FROM records GROUP BY agent ORDER BY agent")}
        file_bytes = self.file_bytes()
        return {"records": sum(validity.values()), "validity": {v: validity.get(v, 0) for v in VALIDITY},
                "tags": {t: tags.get(t, 0) for t in TAGS}, "bytes": sum(a["bytes"] for a in agents.values()),
                "agents": agents, "file_bytes": file_bytes}
