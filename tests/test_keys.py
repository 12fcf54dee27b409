"""API keys in the monitoring store (schema version 4) through `sdloop keys` and the Store methods the service calls:
a key is shown once and stored only as its SHA-256; lookups, revocation, scopes, the feedback rule, the key behind
each generation and feedback row; an old store migrates keeping its rows. sqlite always, PostgreSQL when
SDLOOP_TEST_POSTGRES_URL names one."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

from monitor.store import (MIGRATIONS, SCHEMA_VERSION, ApiKeyError, FeedbackOfAnotherKey, Store, _versions,
                           feedback, generations)
from sdloop_cli.keys import parse_rate
from sdloop_cli.main import main


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh database of each backend, which `sdloop keys` also uses (SDLOOP_STORE_URL)."""
    value = f"sqlite:///{tmp_path / 'monitor.db'}" if request.param == "sqlite" \
        else request.getfixturevalue("postgres_db")
    monkeypatch.setenv("SDLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SDLOOP_STORE_URL", value)
    yield value


def _gen(store: Store, key_id: int | None = None) -> str:
    return store.log_generation(prompt="a red circle", negative_prompt="", params={"steps": 2}, model_version="m",
                                latency_s=0.1, descriptors={}, api_key_id=key_id)


def _create(capsys: pytest.CaptureFixture, *argv: str) -> str:
    capsys.readouterr()
    assert main(["keys", "create", *argv]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "only time the key is shown" in err
    return out.strip()


def test_create_list_revoke_through_the_command_line(url: str, capsys: pytest.CaptureFixture) -> None:
    key = _create(capsys, "--name", "alice", "--scope", "generate", "--scope", "feedback", "--rate-limit", "60/min")
    assert key.startswith("sdk_") and len(key) == 4 + 43
    other = _create(capsys, "--name", "reviewers", "--scope", "rater")
    assert other != key

    store = Store(url)
    alice = store.key_for(key)
    assert alice is not None and alice.name == "alice" and alice.scopes == ("generate", "feedback")
    assert alice.rate_limit_per_min == 60 and alice.revoked is None
    assert store.key_for(other).scopes == ("rater",) and store.key_for(other).rate_limit_per_min is None
    with store.engine.connect() as conn:  # only the hash is kept, nowhere the key
        rows = [dict(r) for r in conn.execute(sa.text("SELECT * FROM api_keys ORDER BY id")).mappings()]
    assert rows[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert not any(key in json.dumps(r, default=str) or other in json.dumps(r, default=str) for r in rows)
    if url.startswith("sqlite"):
        db = Path(url.removeprefix("sqlite:///"))
        assert not any(key.encode() in p.read_bytes() for p in db.parent.glob("monitor.db*"))

    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and "generate,feedback" in listed and "60/min" in listed and key not in listed
    assert main(["keys", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [k["name"] for k in data] == ["alice", "reviewers"] and all("hash" not in str(k) for k in data)

    assert main(["keys", "revoke", "alice"]) == 0
    assert "revoked key 1 'alice'" in capsys.readouterr().out
    assert store.key_for(key) is None, "a revoked key opens nothing"
    assert main(["keys", "revoke", "1"]) == 0 and "already revoked" in capsys.readouterr().out
    assert main(["keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["revoked"]
    store.close()


@pytest.mark.parametrize("argv, words", [
    (["keys", "create", "--name", "x1", "--scope", "root"], "unknown scope 'root'"),
    (["keys", "create", "--name", "x1"], "at least one --scope"),
    (["keys", "create", "--name", "1x", "--scope", "generate"], "is invalid"),
    (["keys", "create", "--name", "a b", "--scope", "generate"], "is invalid"),
    (["keys", "create", "--name", "x1", "--scope", "generate", "--rate-limit", "fast"], "not a rate"),
    (["keys", "create", "--name", "x1", "--scope", "generate", "--rate-limit", "0/min"], "at least 1"),
    (["keys", "create", "--name", "x1", "--scope", "generate", "--rate-limit", "10/h"], "whole number"),
    (["keys", "revoke", "nobody"], "no key named"),
    (["keys", "revoke", "99"], "no key named or numbered '99'"),
])
def test_mistakes_are_one_line(url: str, capsys: pytest.CaptureFixture, argv: list[str], words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err


def test_a_name_is_never_reused(url: str, capsys: pytest.CaptureFixture) -> None:
    _create(capsys, "--name", "ci", "--scope", "generate")
    assert main(["keys", "revoke", "ci"]) == 0
    capsys.readouterr()
    assert main(["keys", "create", "--name", "ci", "--scope", "generate"]) == 2
    assert "exists already" in capsys.readouterr().err


def test_rates() -> None:
    assert (parse_rate("60/min"), parse_rate("60"), parse_rate("2/s"), parse_rate("600/h"), parse_rate(None)) == \
        (60, 60, 120, 10, None)


def test_lookups_refuse_what_is_not_a_key(url: str) -> None:
    store = Store(url)
    record, key = store.create_key("svc", ["generate"])
    assert store.key_for(key) == record
    for presented in ("", key[:-1], key + "x", key.upper(), "sdk_" + "A" * 43, "x" * 10_000, None, 42,
                      key + "\x00", "\udcff"):
        assert store.key_for(presented) is None, presented
    assert record.allows("generate") and not record.allows("feedback")
    store.close()


def test_the_key_behind_each_row_and_the_feedback_rule(url: str) -> None:
    store = Store(url)
    maker, _ = store.create_key("maker", ["generate", "feedback"])
    stranger, _ = store.create_key("stranger", ["generate", "feedback"])
    rater, _ = store.create_key("rater", ["rater"])
    admin, _ = store.create_key("ops", ["admin"])
    gen_only, _ = store.create_key("gen-only", ["generate"])
    mine, keyless = _gen(store, maker.id), _gen(store)
    assert store.get_generation(mine)["api_key_id"] == maker.id and store.get_generation(keyless)["api_key_id"] is None
    assert store.key_made_generation(maker.id, mine) and not store.key_made_generation(stranger.id, mine)
    assert not store.key_made_generation(maker.id, keyless) and not store.key_made_generation(maker.id, "nope")
    assert store.may_rate(maker, mine) and not store.may_rate(stranger, mine) and not store.may_rate(maker, keyless)
    assert store.may_rate(rater, mine) and store.may_rate(rater, keyless) and store.may_rate(admin, mine)
    assert not store.may_rate(gen_only, mine)
    store.revoke_key("rater")
    assert not store.may_rate(store.find_key("rater"), mine), "a revoked key rates nothing"

    row = store.add_feedback(mine, "carol", rating=5, api_key_id=maker.id)
    assert row["api_key_id"] == maker.id and not row["updated_existing"]
    assert store.add_feedback(mine, "carol", rating=4, api_key_id=maker.id)["updated_existing"]
    with pytest.raises(FeedbackOfAnotherKey):  # another key sending carol's client id replaces nothing
        store.add_feedback(mine, "carol", rating=1, api_key_id=stranger.id)
    with pytest.raises(FeedbackOfAnotherKey):
        store.add_feedback(mine, "carol", rating=1)
    assert [(r["client_id"], r["rating"], r["api_key_id"]) for r in store.feedback_for(mine)] == \
        [("carol", 4, maker.id)]
    assert store.add_feedback(keyless, "dave", rating=3)["api_key_id"] is None
    assert store.add_feedback(keyless, "dave", rating=2)["updated_existing"]
    store.close()


def test_a_version_3_store_migrates_keeping_its_rows(url: str) -> None:
    """A database as the release before keys left it: versions 1 to 3, rows written by that release's SQL."""
    old = Store(url, migrate=False)
    now = dt.datetime.now(dt.timezone.utc)
    with old.engine.begin() as conn:
        _versions.create(conn)
        for version in (1, 2, 3):
            MIGRATIONS[version - 1](conn)
            conn.execute(_versions.insert().values(version=version, applied=now))
        conn.execute(generations.insert().values(id="g1", created=now, prompt="p", negative_prompt="", params={},
                                                 model_version="m", latency_s=0.1, descriptors={}))
        conn.execute(feedback.insert().values(generation_id="g1", client_id="alice", rating=4, tags=[], created=now,
                                              updated=now))
        assert "api_key_id" not in {c["name"] for c in sa.inspect(conn).get_columns("generations")}
    old.close()
    new = Store(url)
    assert new.schema_version() == SCHEMA_VERSION >= 4
    assert new.get_generation("g1")["api_key_id"] is None and new.feedback_for("g1")[0]["rating"] == 4
    key, _ = new.create_key("after", ["feedback"])
    assert new.add_feedback("g1", "alice", rating=5)["updated_existing"]
    assert not new.may_rate(key, "g1")
    with pytest.raises(ApiKeyError):
        new.find_key("missing")
    new.close()
