"""The broker's SQLite store: messages, tasks, tokens and token nonces.

A SqliteStore (sqlite_store.py): WAL, synchronous=FULL by default (a
message the broker acknowledged survives a kill -9 of the daemon or a power
loss; AGENTWATCH_BROKER_SYNC=normal keeps the first only), every write
committed before it returns; the broker's writes go through submit()'s
group commit (one fsync, ~250 µs here, for every write waiting).
"""
import json
import sqlite3

from .a2a import TASK_STATES
from .sqlite_store import SqliteStore
from .tokens import TokenError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq          INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL,
    sender_agent TEXT,
    sender_run   TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    task_id      TEXT,
    context_id   TEXT,
    facts_digest TEXT,
    ts           REAL NOT NULL,
    body         TEXT NOT NULL,
    UNIQUE (sender_run, message_id)
);
CREATE INDEX IF NOT EXISTS messages_inbox ON messages (recipient, seq);

CREATE TABLE IF NOT EXISTS tasks (
    id            TEXT PRIMARY KEY,
    context_id    TEXT,
    creator_agent TEXT,
    creator_run   TEXT,
    assignee      TEXT,
    state         TEXT NOT NULL,
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_creator ON tasks (creator_agent);
CREATE INDEX IF NOT EXISTS tasks_assignee ON tasks (assignee);

CREATE TABLE IF NOT EXISTS task_history (
    task_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    PRIMARY KEY (task_id, seq)
);

CREATE TABLE IF NOT EXISTS tokens (
    jti          TEXT PRIMARY KEY,
    claims       TEXT NOT NULL,
    text         TEXT NOT NULL,
    issuer_run   TEXT,
    holder_run   TEXT,
    holder_agent TEXT,
    root         TEXT,
    parent       TEXT,
    exp          REAL,
    revoked_at   REAL,
    used         INTEGER NOT NULL DEFAULT 0,
    ts           REAL
);
CREATE INDEX IF NOT EXISTS tokens_root ON tokens (root);
CREATE INDEX IF NOT EXISTS tokens_issuer ON tokens (issuer_run);

CREATE TABLE IF NOT EXISTS token_nonces (
    jti   TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts    REAL,
    PRIMARY KEY (jti, nonce)
);
"""

MESSAGE_COLUMNS = "seq, message_id, sender_agent, sender_run, recipient, task_id, context_id, facts_digest, ts, body"
TASK_COLUMNS = "id, context_id, creator_agent, creator_run, assignee, state, created, updated"
TOKEN_COLUMNS = "jti, claims, text, issuer_run, holder_run, holder_agent, revoked_at, used"


def _message_row(row):
    d = dict(row)
    d["message"] = json.loads(d.pop("body"))
    return d


def _task_row(row):
    return {"id": row["id"], "contextId": row["context_id"], "creator": row["creator_agent"],
            "creator_run": row["creator_run"], "assignee": row["assignee"], "state": row["state"],
            "created": row["created"], "updated": row["updated"]}


def _token_row(row):
    d = dict(row)
    d["claims"] = json.loads(d["claims"])
    return d


def _filtered(sql, args, conditions):
    """sql and args with " AND <column op> ?" for each (column op, value)
    whose value is not None."""
    for cond, value in conditions:
        if value is not None:
            sql += f" AND {cond} ?"
            args.append(value)
    return sql, args


def _check_state(state):
    if state not in TASK_STATES:
        raise ValueError(f"unknown task state {state!r} (known: {', '.join(TASK_STATES)})")


class Store(SqliteStore):
    """The broker's database (see the module docstring)."""

    WHAT = "broker store"
    SCHEMA = SCHEMA
    SCHEMA_VERSION = SCHEMA_VERSION

    # ------------------------------------------------------------ messages

    def add_message(self, *, message, sender_agent, sender_run, recipient, task_id, facts_digest, ts,
                    new_task=None):
        """Store a (stamped) message; its seq. KeyError when this sender run
        already sent a message with this messageId. new_task: the task
        (create_task's keyword arguments) the message opens, created in the
        same transaction: one commit, and never a task without its message."""
        message_id = message["messageId"]
        try:
            with self._tx() as db:
                if new_task is not None:
                    t = new_task
                    _check_state(t["state"])
                    db.execute(f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (t["task_id"], t["context_id"], t["creator_agent"], t["creator_run"],
                                t["assignee"], t["state"], t["ts"], t["ts"]))
                seq = db.execute(
                    "INSERT INTO messages (message_id, sender_agent, sender_run, recipient, task_id,"
                    " context_id, facts_digest, ts, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (message_id, sender_agent, sender_run, recipient, task_id, message.get("contextId"),
                     facts_digest, ts, json.dumps(message))).lastrowid
                if task_id is not None:
                    db.execute("INSERT OR IGNORE INTO task_history (task_id, seq) VALUES (?, ?)", (task_id, seq))
        except sqlite3.IntegrityError:
            raise KeyError(f"duplicate messageId {message_id!r}: run {sender_run} already sent a message "
                           f"with this id") from None
        return seq

    def message(self, message_id, recipient=None, sender_agent=None):
        """The first stored message with this messageId (and recipient,
        sender agent when given), or None."""
        sql, args = _filtered(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE message_id = ?", [message_id],
                              (("recipient =", recipient), ("sender_agent =", sender_agent)))
        row = self._one(sql + " ORDER BY seq LIMIT 1", args)
        return _message_row(row) if row else None

    def inbox(self, agent, after=0, limit=100):
        """Messages to agent with seq > after, oldest first."""
        rows = self._all(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE recipient = ? AND seq > ?"
                         " ORDER BY seq LIMIT ?", (agent, after, limit))
        return [_message_row(r) for r in rows]

    def messages_count(self):
        return self._one("SELECT count(*) FROM messages")[0]

    # ------------------------------------------------------------ tasks

    def create_task(self, *, task_id, context_id, creator_agent, creator_run, assignee, state, ts):
        _check_state(state)
        try:
            with self._tx() as db:
                db.execute(f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (task_id, context_id, creator_agent, creator_run, assignee, state, ts, ts))
        except sqlite3.IntegrityError:
            raise KeyError(f"duplicate task id {task_id!r}") from None
        return self.task(task_id)

    def task(self, task_id):
        """The task with its history (the stored message dicts, oldest
        first), or None."""
        with self._reading() as db:
            row = db.execute(f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            history = db.execute(
                "SELECT m.body FROM task_history h JOIN messages m ON m.seq = h.seq"
                " WHERE h.task_id = ? ORDER BY m.seq", (task_id,)).fetchall()
        task = _task_row(row)
        task["history"] = [json.loads(h["body"]) for h in history]
        return task

    def set_task_state(self, task_id, state, ts):
        """Set a task's state; the task, or None when there is no such task."""
        _check_state(state)
        with self._tx() as db:
            changed = db.execute("UPDATE tasks SET state = ?, updated = ? WHERE id = ?",
                                 (state, ts, task_id)).rowcount
        return self.task(task_id) if changed else None

    def add_to_task(self, task_id, seq):
        """Link message seq to the task's history (once)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO task_history (task_id, seq) VALUES (?, ?)", (task_id, seq))

    def list_tasks(self, agent, *, context_id=None, state=None, after=None, limit=100):
        """Tasks agent created or is assigned, newest (last updated) first,
        without history; after: only those updated after this time."""
        sql, args = _filtered(f"SELECT {TASK_COLUMNS} FROM tasks WHERE (creator_agent = ? OR assignee = ?)",
                              [agent, agent], (("context_id =", context_id), ("state =", state),
                                               ("updated >", after)))
        sql += " ORDER BY updated DESC, rowid DESC LIMIT ?"
        args.append(limit)
        return [_task_row(r) for r in self._all(sql, args)]

    # ------------------------------------------------------------ tokens

    def add_token(self, claims, text, ts):
        """Record an issued token. KeyError if its jti is already known."""
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO tokens (jti, claims, text, issuer_run, holder_run, holder_agent, root,"
                    " parent, exp, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (claims["jti"], json.dumps(claims), text, claims["iss"]["run"], claims["sub"]["run"],
                     claims["sub"]["agent"], claims["root"], claims["parent"], claims["exp"], ts))
        except sqlite3.IntegrityError:
            raise KeyError(f"duplicate token id {claims['jti']!r}") from None

    def token(self, jti):
        row = self._one(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE jti = ?", (jti,))
        return _token_row(row) if row else None

    def tokens(self, *, holder_agent=None, issuer_run=None, limit=100):
        """Tokens, newest first, filtered by holder agent and issuer run."""
        sql, args = _filtered(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE 1 = 1", [],
                              (("holder_agent =", holder_agent), ("issuer_run =", issuer_run)))
        sql += " ORDER BY ts DESC, rowid DESC LIMIT ?"
        args.append(limit)
        return [_token_row(r) for r in self._all(sql, args)]

    def revoke_issuer(self, run_id, ts):
        """Revoke every token run_id issued and every token descended from
        one (same root); the number newly revoked."""
        with self._tx() as db:
            return db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE revoked_at IS NULL AND (issuer_run = ?"
                " OR root IN (SELECT jti FROM tokens WHERE issuer_run = ?))", (ts, run_id, run_id)).rowcount

    def revoke_all(self, ts):
        """Revoke every token still valid: a broker starting finds no run of
        its own alive (the runs of a daemon that died died with it); the
        number revoked."""
        with self._tx() as db:
            return db.execute("UPDATE tokens SET revoked_at = ? WHERE revoked_at IS NULL", (ts,)).rowcount

    def chain_revoked(self, claims):
        """True when the token, its root or any ancestor is revoked or not
        known to this store (a token we did not record is not honoured)."""
        with self._reading() as db:
            jti, seen = claims["jti"], set()
            while jti is not None:
                if jti in seen or len(seen) > 16:
                    return True                     # a loop or an absurd chain: refuse
                seen.add(jti)
                row = db.execute("SELECT parent, root, revoked_at FROM tokens WHERE jti = ?",
                                       (jti,)).fetchone()
                if row is None or row["revoked_at"] is not None:
                    return True
                jti = row["parent"]
            root = db.execute("SELECT revoked_at FROM tokens WHERE jti = ?", (claims["root"],)).fetchone()
            return root is None or root["revoked_at"] is not None

    def use_token(self, jti, nonce, max_uses, ts):
        """Spend one use of token jti with a fresh nonce, atomically; the new
        use count. TokenError: "replayed" for a nonce seen before,
        "exhausted" when all uses are spent, "invalid" for a bad nonce or an
        unknown token."""
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
            raise TokenError("invalid", "a token call's nonce must be a string of 8 to 128 characters")
        with self._tx() as db:
            row = db.execute("SELECT used FROM tokens WHERE jti = ?", (jti,)).fetchone()
            if row is None:
                raise TokenError("invalid", f"token {jti} is not known to this broker")
            if db.execute("SELECT 1 FROM token_nonces WHERE jti = ? AND nonce = ?", (jti, nonce)).fetchone():
                raise TokenError("replayed", f"nonce {nonce!r} was already used with token {jti}")
            if row["used"] >= max_uses:
                raise TokenError("exhausted", f"token {jti} has been used {row['used']} of {max_uses} times")
            db.execute("INSERT INTO token_nonces (jti, nonce, ts) VALUES (?, ?, ?)", (jti, nonce, ts))
            db.execute("UPDATE tokens SET used = used + 1 WHERE jti = ?", (jti,))
            return row["used"] + 1

    def spend_token(self, claims, nonce, ts):
        """One use of the token whose claims these are, and of its root (an
        attenuated token spends its root's uses too), in one transaction:
        use_token's errors, and nothing spent when either refuses."""
        with self._tx():
            used = self.use_token(claims["jti"], nonce, claims["uses"], ts)
            if claims["root"] != claims["jti"]:
                root = self.token(claims["root"])
                if root is None:
                    raise TokenError("invalid", f"the token's root {claims['root']} is not known to this broker")
                self.use_token(root["jti"], nonce, root["claims"]["uses"], ts)
            return used
