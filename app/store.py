"""Conversations, messages, system-prompt presets and settings in one SQLite file.

No Qt here, so the store is testable alone and a crash of the GUI cannot corrupt it. WAL mode
with synchronous=NORMAL: a committed transaction survives the process being killed (only a power
loss can take the last commits back). Every write commits at once.

Message status: 'complete', 'streaming' (a reply being generated, saved about once a second),
'interrupted' (found 'streaming' when the store was opened: the app died mid-reply) and
'stopped' (the user pressed Stop; the partial reply is kept).
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import TernError

log = logging.getLogger(__name__)

DB_NAME = "tern.sqlite3"
EXPORT_FORMAT = "tern-conversation"
EXPORT_VERSION = 1
ROLES = ("user", "assistant")
STATUSES = ("complete", "streaming", "interrupted", "stopped")

DEFAULT_PRESETS = [
    ("Helpful assistant", "You are a helpful assistant."),
    ("Concise", "You are a helpful assistant. Answer briefly and to the point."),
    ("Programmer", "You are an expert programmer. Answer with correct, idiomatic code "
                   "in fenced code blocks and explain only what is not obvious."),
]


class StoreError(TernError):
    """The database cannot be opened or a file to import is not a Tern conversation."""


@dataclass
class StoredMessage:
    id: int
    conversation_id: int
    position: int
    role: str
    content: str
    status: str = "complete"
    stats: dict = field(default_factory=dict)


@dataclass
class Conversation:
    id: int
    title: str
    system_prompt: str
    created: float
    updated: float


# ---------------------------------------------------------------------------------------------
# Schema migrations: MIGRATIONS[i] takes the database from version i to version i + 1
# ---------------------------------------------------------------------------------------------

def _migrate_to_1(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE conversations (
        id INTEGER PRIMARY KEY, title TEXT NOT NULL, system_prompt TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL, updated REAL NOT NULL)""")
    db.execute("""CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'complete', created REAL NOT NULL,
        UNIQUE (conversation_id, position))""")
    db.execute("CREATE INDEX messages_by_conversation ON messages(conversation_id, position)")


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """Presets, settings, and the generation statistics of each reply."""
    db.execute("ALTER TABLE messages ADD COLUMN stats TEXT NOT NULL DEFAULT '{}'")
    db.execute("CREATE TABLE presets (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, text TEXT NOT NULL)")
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.executemany("INSERT INTO presets (name, text) VALUES (?, ?)", DEFAULT_PRESETS)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1, _migrate_to_2]
SCHEMA_VERSION = len(MIGRATIONS)


@contextmanager
def transaction(db: sqlite3.Connection):
    """One explicit transaction (the connection is in autocommit mode, so DDL is covered too).
    A database error (read-only, disk full, locked) becomes a StoreError; nothing half-written
    stays."""
    try:
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
    except BaseException as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"the conversation database cannot be written: {exc}") from exc
        raise


def schema_version(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'").fetchone()
    if row is None:
        return 0
    return int(db.execute("SELECT version FROM schema_version").fetchone()[0])


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> None:
    """Bring the database to `target`, one transaction per step, so a failure leaves the
    last complete version behind."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise StoreError(f"the conversation database has schema version {version}, newer than this "
                         f"Tern ({SCHEMA_VERSION}); update Tern to open it")
    while version < target:
        with transaction(db):
            MIGRATIONS[version](db)
            if version == 0:
                db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                db.execute("INSERT INTO schema_version VALUES (0)")
            version += 1
            db.execute("UPDATE schema_version SET version = ?", (version,))
        log.info("conversation database migrated to schema version %d", version)


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            migrate(self._db)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the conversation database {self.path}: {exc}") from exc
        self.recovered = self._mark_interrupted()

    @classmethod
    def open_default(cls) -> "Store":
        from engine.paths import data_dir
        return cls(data_dir() / DB_NAME)

    def close(self) -> None:
        self._db.close()

    def _mark_interrupted(self) -> int:
        """A reply still 'streaming' when the store opens was cut off by a crash or a kill."""
        with transaction(self._db):
            return self._db.execute("UPDATE messages SET status = 'interrupted' "
                                    "WHERE status = 'streaming'").rowcount

    # -- conversations ----------------------------------------------------------------------

    def create_conversation(self, title: str = "New chat", system_prompt: str = "") -> Conversation:
        now = time.time()
        with transaction(self._db):
            cur = self._db.execute("INSERT INTO conversations (title, system_prompt, created, updated) "
                                   "VALUES (?, ?, ?, ?)", (title, system_prompt, now, now))
        return Conversation(cur.lastrowid, title, system_prompt, now, now)

    def conversation(self, conversation_id: int) -> Conversation:
        row = self._db.execute("SELECT id, title, system_prompt, created, updated FROM conversations "
                               "WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            raise StoreError(f"no conversation with id {conversation_id}")
        return Conversation(*row)

    def conversations(self, search: str = "") -> list[Conversation]:
        """Newest first; `search` matches titles and message contents, case-insensitively."""
        sql = "SELECT id, title, system_prompt, created, updated FROM conversations"
        args: tuple = ()
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            sql += (" WHERE title LIKE ?1 ESCAPE '\\' OR id IN (SELECT conversation_id FROM messages "
                    "WHERE content LIKE ?1 ESCAPE '\\')")
            args = (pattern,)
        rows = self._db.execute(sql + " ORDER BY updated DESC, id DESC", args).fetchall()
        return [Conversation(*row) for row in rows]

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self._update_conversation(conversation_id, "title", title.strip() or "Untitled")

    def set_system_prompt(self, conversation_id: int, text: str) -> None:
        self._update_conversation(conversation_id, "system_prompt", text)

    def _update_conversation(self, conversation_id: int, column: str, value) -> None:
        with transaction(self._db):
            self._db.execute(f"UPDATE conversations SET {column} = ?, updated = ? WHERE id = ?",
                             (value, time.time(), conversation_id))

    def delete_conversation(self, conversation_id: int) -> None:
        with transaction(self._db):
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # -- messages ---------------------------------------------------------------------------

    def messages(self, conversation_id: int) -> list[StoredMessage]:
        rows = self._db.execute("SELECT id, conversation_id, position, role, content, status, stats "
                                "FROM messages WHERE conversation_id = ? ORDER BY position",
                                (conversation_id,)).fetchall()
        return [StoredMessage(*row[:6], stats=json.loads(row[6])) for row in rows]

    def add_message(self, conversation_id: int, role: str, content: str,
                    status: str = "complete", stats: dict | None = None) -> StoredMessage:
        if role not in ROLES or status not in STATUSES:
            raise StoreError(f"bad message role/status: {role!r}/{status!r}")
        now = time.time()
        with transaction(self._db):
            row = self._db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM messages "
                                   "WHERE conversation_id = ?", (conversation_id,)).fetchone()
            cur = self._db.execute(
                "INSERT INTO messages (conversation_id, position, role, content, status, created, stats) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, row[0], role, content, status, now, json.dumps(stats or {})))
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation_id))
        return StoredMessage(cur.lastrowid, conversation_id, row[0], role, content, status, stats or {})

    def update_message(self, message_id: int, content: str, status: str | None = None,
                       stats: dict | None = None) -> None:
        """Used for the reply being streamed (about once a second) and when it completes."""
        if status is not None and status not in STATUSES:
            raise StoreError(f"bad message status {status!r}")
        with transaction(self._db):
            self._db.execute("UPDATE messages SET content = ?, status = COALESCE(?, status), "
                             "stats = COALESCE(?, stats) WHERE id = ?",
                             (content, status, None if stats is None else json.dumps(stats), message_id))

    def truncate_messages(self, conversation_id: int, keep: int) -> None:
        """Keep the first `keep` messages (edit-and-resend, regenerate)."""
        with transaction(self._db):
            self._db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                             (conversation_id, keep))

    # -- presets and settings ---------------------------------------------------------------

    def presets(self) -> list[tuple[str, str]]:
        return [tuple(r) for r in self._db.execute("SELECT name, text FROM presets ORDER BY id")]

    def save_preset(self, name: str, text: str) -> None:
        with transaction(self._db):
            self._db.execute("INSERT INTO presets (name, text) VALUES (?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET text = excluded.text", (name.strip(), text))

    def delete_preset(self, name: str) -> None:
        with transaction(self._db):
            self._db.execute("DELETE FROM presets WHERE name = ?", (name,))

    def settings(self) -> dict:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM settings")}

    def save_settings(self, values: dict) -> None:
        with transaction(self._db):
            self._db.executemany("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) "
                                 "DO UPDATE SET value = excluded.value",
                                 [(k, json.dumps(v)) for k, v in values.items()])

    # -- export and import ------------------------------------------------------------------

    def export_json(self, conversation_id: int) -> dict:
        conv = self.conversation(conversation_id)
        return {
            "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
            "title": conv.title, "system_prompt": conv.system_prompt, "created": conv.created,
            "messages": [{"role": m.role, "content": m.content, "status": m.status}
                         for m in self.messages(conversation_id)],
        }

    def export_markdown(self, conversation_id: int) -> str:
        conv = self.conversation(conversation_id)
        parts = [f"# {conv.title}\n"]
        if conv.system_prompt.strip():
            quoted = "\n".join("> " + line if line else ">" for line in conv.system_prompt.strip().splitlines())
            parts.append(f"**System prompt**\n\n{quoted}\n")
        for m in self.messages(conversation_id):
            note = {"interrupted": " *(interrupted)*", "stopped": " *(stopped)*"}.get(m.status, "")
            parts.append(f"## {m.role.capitalize()}{note}\n\n{m.content.strip()}\n")
        return "\n".join(parts)

    def import_json(self, data: dict) -> Conversation:
        """A new conversation from `export_json` output; validates everything before writing."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise StoreError("not a Tern conversation export (missing format 'tern-conversation')")
        if data.get("version") != EXPORT_VERSION:
            raise StoreError(f"unsupported conversation export version {data.get('version')!r}")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise StoreError("conversation export has no message list")
        for m in messages:
            if (not isinstance(m, dict) or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)):
                raise StoreError(f"bad message in conversation export: {str(m)[:80]}")
        title = str(data.get("title") or "Imported chat")
        conv = self.create_conversation(title, str(data.get("system_prompt") or ""))
        for m in messages:
            status = m.get("status") if m.get("status") in ("complete", "interrupted", "stopped") else "complete"
            self.add_message(conv.id, m["role"], m["content"], status)
        return self.conversation(conv.id)
