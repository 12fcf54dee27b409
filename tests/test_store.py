"""The monitoring store against a real database: sqlite always, PostgreSQL when one is reachable.

`.ci/run` starts a throwaway PostgreSQL cluster and exports SDLOOP_TEST_POSTGRES_URL; without it the PostgreSQL
variants skip and say why.
"""

from __future__ import annotations

import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

from monitor.store import SCHEMA_VERSION, Store, StoreError, UnknownGeneration, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'monitor.db'}"
        return
    yield request.getfixturevalue("postgres_db")


def _gen(store: Store, prompt: str = "a red circle") -> str:
    return store.log_generation(prompt=prompt, negative_prompt="", params={"steps": 2, "seed": 7},
                                model_version="sdloop:abc", latency_s=0.5,
                                descriptors={"brightness": 0.5, "contrast": 0.1, "sharpness": 0.01,
                                             "colourfulness": 3.0})


def test_migrations_from_empty_and_idempotent(url: str) -> None:
    store = Store(url, migrate=False)
    assert store.schema_version() == 0
    assert store.migrate() == list(range(1, SCHEMA_VERSION + 1))
    assert store.schema_version() == SCHEMA_VERSION
    assert store.migrate() == []  # again: nothing to do, nothing broken
    gid = _gen(store)
    again = Store(url)  # a second worker opening the same database
    assert again.schema_version() == SCHEMA_VERSION and again.get_generation(gid)["prompt"] == "a red circle"
    names = set(sa.inspect(store.engine).get_table_names())
    assert {"schema_version", "generations", "feedback"} <= names
    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version")).scalars().all()
    assert rows == list(range(1, SCHEMA_VERSION + 1))
    store.close(), again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    Store(url).close()
    con = sqlite3.connect(tmp_path / "m.db")
    con.execute("INSERT INTO schema_version VALUES (?, '2030-01-01 00:00:00')", (SCHEMA_VERSION + 1,))
    con.commit(), con.close()
    with pytest.raises(StoreError, match="newer than this sdloop"):
        Store(url)


def test_sqlite_is_wal_and_fully_synced(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'm.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def test_generation_round_trip(url: str) -> None:
    store = Store(url)
    gid = _gen(store, "a blue square")
    row = store.get_generation(gid)
    assert row["prompt"] == "a blue square" and row["params"] == {"steps": 2, "seed": 7}
    assert row["descriptors"]["colourfulness"] == 3.0 and row["model_version"] == "sdloop:abc"
    assert row["created"].tzinfo is not None
    assert [g["id"] for g in store.generations()] == [gid]
    assert store.get_generation(str(uuid.uuid4())) is None
    store.close()


def test_feedback_repeat_updates_and_unknown_is_refused(url: str) -> None:
    store = Store(url)
    gid = _gen(store)
    first = store.add_feedback(gid, "alice", rating=2, comment="meh", tags=["blurry"])
    assert first["updated_existing"] is False and first["rating"] == 2
    second = store.add_feedback(gid, "alice", rating=5, thumbs=1, tags=["sharp", "nice"])
    assert second["updated_existing"] is True and second["id"] == first["id"]
    store.add_feedback(gid, "bob", thumbs=-1)
    rows = store.feedback_for(gid)
    assert len(rows) == 2 and store.count("feedback") == 2
    alice = next(r for r in rows if r["client_id"] == "alice")
    assert (alice["rating"], alice["thumbs"], alice["comment"], alice["tags"]) == (5, 1, None, ["sharp", "nice"])
    assert alice["updated"] >= alice["created"]
    with pytest.raises(UnknownGeneration):
        store.add_feedback(str(uuid.uuid4()), "alice", rating=3)
    assert store.count("feedback") == 2
    store.close()


def test_500_concurrent_feedback_posts_lose_no_row(url: str) -> None:
    store = Store(url)
    gids = [_gen(store, f"prompt {i}") for i in range(50)]

    def post(i: int) -> int:
        return store.add_feedback(gids[i % 50], f"client-{i}", rating=1 + i % 5, tags=[f"t{i}"])["id"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        ids = list(pool.map(post, range(500)))
    assert len(set(ids)) == 500 and store.count("feedback") == 500
    # read back through a fresh engine: every row is on disk, not only in this engine's connection
    fresh = Store(url)
    rows = fresh.feedback_for()
    assert sorted(r["client_id"] for r in rows) == sorted(f"client-{i}" for i in range(500))
    assert all(r["rating"] == 1 + int(r["client_id"].split("-")[1]) % 5 for r in rows)
    store.close(), fresh.close()


def test_open_store_is_one_per_process_and_uses_the_workspace(workspace: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    monkeypatch.delenv("SDLOOP_STORE_URL", raising=False)
    store = open_store()
    assert open_store() is store
    assert Path(store.engine.url.database) == workspace / "monitor.db"
    assert (workspace / "monitor.db").is_file()


def test_bad_url_is_one_line() -> None:
    with pytest.raises(StoreError, match="SDLOOP_STORE_URL"):
        Store("not a url at all")
