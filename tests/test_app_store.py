"""The conversation store alone (no Qt): schema, migrations, recovery, search, export/import."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from app.store import SCHEMA_VERSION, Store, StoreError, migrate, schema_version

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.sqlite3")
    yield s
    s.close()


def _sample_conversation(store: Store) -> int:
    conv = store.create_conversation("Ternary weights", "You are a helpful assistant.\nBe brief.")
    store.add_message(conv.id, "user", "What is a ternary weight?")
    store.add_message(conv.id, "assistant", "A weight in {-1, 0, +1}:\n\n```python\nw = [-1, 0, 1]\n```")
    store.add_message(conv.id, "user", "And the scale?")
    store.add_message(conv.id, "assistant", "One float per tensor", status="interrupted")
    return conv.id


def test_migrations_run_one_version_at_a_time(tmp_path):
    db = sqlite3.connect(tmp_path / "m.sqlite3", isolation_level=None)
    migrate(db, target=1)
    assert schema_version(db) == 1
    db.execute("INSERT INTO conversations (title, created, updated) VALUES ('old', 0, 0)")
    db.execute("INSERT INTO messages (conversation_id, position, role, content, created) "
               "VALUES (1, 0, 'user', 'kept across the upgrade', 0)")
    db.close()
    store = Store(tmp_path / "m.sqlite3")  # migrates 1 -> 2
    assert schema_version(store._db) == SCHEMA_VERSION == 2
    assert store.messages(1)[0].content == "kept across the upgrade"
    assert store.messages(1)[0].stats == {}
    assert len(store.presets()) >= 3
    store.close()


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "n.sqlite3").close()
    db = sqlite3.connect(tmp_path / "n.sqlite3", isolation_level=None)
    db.execute("UPDATE schema_version SET version = 99")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "n.sqlite3")


def test_wal_mode_and_streaming_reply_recovered_as_interrupted(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conv = store.create_conversation()
    store.add_message(conv.id, "user", "hi")
    reply = store.add_message(conv.id, "assistant", "", status="streaming")
    store.update_message(reply.id, "partial rep")
    store.close()  # as if the process had died: status still 'streaming'
    reopened = Store(tmp_path / "s.sqlite3")
    assert reopened.recovered == 1
    last = reopened.messages(conv.id)[-1]
    assert (last.content, last.status) == ("partial rep", "interrupted")
    reopened.close()


def test_search_titles_and_contents(store):
    a = store.create_conversation("Cooking pasta")
    b = store.create_conversation("Weights")
    store.add_message(b.id, "user", "Explain 100% of the TERNARY format")
    assert [c.id for c in store.conversations("pasta")] == [a.id]
    assert [c.id for c in store.conversations("ternary")] == [b.id]
    assert [c.id for c in store.conversations("100%")] == [b.id]
    assert store.conversations("nothing like this") == []
    assert {c.id for c in store.conversations()} == {a.id, b.id}


def test_rename_delete_truncate(store):
    cid = _sample_conversation(store)
    store.rename_conversation(cid, "  Renamed ")
    assert store.conversation(cid).title == "Renamed"
    store.truncate_messages(cid, 2)
    assert [m.position for m in store.messages(cid)] == [0, 1]
    store.add_message(cid, "user", "again")
    assert store.messages(cid)[-1].position == 2
    store.delete_conversation(cid)
    assert store.conversations() == []
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_presets_and_settings(store):
    store.save_preset("Pirate", "Talk like a pirate.")
    store.save_preset("Pirate", "Talk like a pirate, briefly.")
    assert ("Pirate", "Talk like a pirate, briefly.") in store.presets()
    store.delete_preset("Pirate")
    assert all(name != "Pirate" for name, _ in store.presets())
    store.save_settings({"temperature": 0.6, "theme": "dark"})
    store.save_settings({"theme": "light"})
    assert store.settings() == {"temperature": 0.6, "theme": "light"}


def test_markdown_export_matches_golden(store):
    cid = _sample_conversation(store)
    assert store.export_markdown(cid) == (GOLDEN / "conversation.md").read_text(encoding="utf-8")


def test_json_round_trip(store):
    cid = _sample_conversation(store)
    data = json.loads(json.dumps(store.export_json(cid)))
    copy = store.import_json(data)
    assert copy.id != cid and copy.title == "Ternary weights"
    assert copy.system_prompt == store.conversation(cid).system_prompt
    assert [(m.role, m.content, m.status) for m in store.messages(copy.id)] == \
           [(m.role, m.content, m.status) for m in store.messages(cid)]


@pytest.mark.parametrize("bad", [
    [], {"format": "other"}, {"format": "tern-conversation", "version": 7, "messages": []},
    {"format": "tern-conversation", "version": 1},
    {"format": "tern-conversation", "version": 1, "messages": [{"role": "system", "content": "x"}]},
    {"format": "tern-conversation", "version": 1, "messages": [{"role": "user", "content": 5}]},
])
def test_bad_import_is_refused_and_writes_nothing(store, bad):
    with pytest.raises(StoreError):
        store.import_json(bad)
    assert store.conversations() == []


def test_write_failures_are_store_errors_and_roll_back(store):
    conv = store.create_conversation("x")
    store.add_message(conv.id, "user", "kept")
    store._db.execute("PRAGMA query_only = ON")
    with pytest.raises(StoreError, match="cannot be written"):
        store.add_message(conv.id, "assistant", "lost?")
    with pytest.raises(StoreError):
        store.save_settings({"theme": "dark"})
    store._db.execute("PRAGMA query_only = OFF")
    assert [m.content for m in store.messages(conv.id)] == ["kept"]
    assert not store._db.in_transaction
