"""Issue 17, items 4 and 6, through HTTP as a client calls: API keys (scopes, own generations, rate limits, the admin
token's limit), the non-loopback rule of `sdloop serve`, and clean 4xx answers for malformed requests, on sqlite and
PostgreSQL alike, plus a store outage answered 503 that heals by itself."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import pytest
from serve_support import Champion, promote, wait_for
from test_serve import TINY, _client, _env, _free_port, champ  # noqa: F401 - the shared fixtures (used by name)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The service's monitoring store: a fresh sqlite file, or a fresh PostgreSQL database (skipped without one)."""
    url = f"sqlite:///{tmp_path / 'monitor.db'}" if request.param == "sqlite" else \
        request.getfixturevalue("postgres_db")
    monkeypatch.setenv("SDLOOP_STORE_URL", url)
    return url


@pytest.fixture()
def serving(champ: Champion, store_url: str) -> Iterator[Any]:  # noqa: F811
    from sdloop.champion import current_champion_tag

    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        yield c


def _errors(endpoint: str, reason: str) -> float:
    from bento.runtime import ERRORS

    return ERRORS.labels(endpoint=endpoint, reason=reason)._value.get()


@pytest.mark.parametrize("path, body, headers, status, word", [
    ("/txt2img_json", {**TINY, "prompt": "a\x00b"}, {}, 400, "invalid"),
    ("/txt2img", {**TINY, "negative_prompt": "\x00"}, {}, 400, "invalid"),
    ("/txt2img_json", {**TINY, "steps": True}, {}, 400, "invalid"),
    ("/txt2img_json", {**TINY, "steps": "2"}, {}, 400, "invalid"),
    ("/feedback", {"generation_id": "g", "rating": True}, {}, 400, "invalid"),
    ("/feedback", {"generation_id": "g", "rating": 4, "comment": "nul\x00"}, {}, 400, "invalid"),
    ("/feedback", {"generation_id": "g", "rating": 4}, {"X-Client-Id": "c" * 300}, 400, "invalid"),
    ("/feedback", {"generation_id": "g", "rating": 4}, {"X-Client-Id": "a\x00b"}, 400, "invalid"),
    ("/feedback", None, {"Content-Type": "multipart/form-data"}, 415, "unsupported_media_type"),
    ("/txt2img_json", None, {"Content-Type": "application/json"}, 400, "invalid"),
])
def test_malformed_requests_are_4xx_with_the_documented_body(serving, store_url: str, caplog: Any, path: str,
                                                           body: Any, headers: dict, status: int,
                                                           word: str) -> None:  # noqa: ANN001
    from monitor.store import open_store

    endpoint = path.strip("/")
    before, generations = _errors(endpoint, word), open_store(store_url).count("generations")
    with caplog.at_level(logging.INFO):
        if body is None:
            r = serving.post(path, content=b"a=1", headers=headers)
        else:
            r = serving.post(path, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["status"] == word and r.json()["error"]
    assert _errors(endpoint, word) == before + 1
    assert open_store(store_url).count("generations") == generations  # refused before any generation
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert [rec for rec in caplog.records if rec.levelno == logging.WARNING and str(status) in rec.getMessage()]


def test_the_schema_400_names_the_field_and_keeps_a_good_request_working(serving) -> None:  # noqa: ANN001
    r = serving.post("/txt2img_json", json={**TINY, "steps": True})
    assert [d["loc"][-1] for d in r.json()["detail"]] == ["steps"] and r.json()["error"].startswith("steps:")
    r = serving.post("/txt2img_json", json={**TINY, "guidance_scale": 7, "timeout_s": 30})  # ints for floats: fine
    assert r.status_code == 200, r.text
    import json

    r = serving.post("/txt2img_json", content=json.dumps(TINY).encode())  # no Content-Type: read as JSON
    assert r.status_code == 200, r.text
    r = serving.post("/txt2img_json", content=json.dumps(TINY).encode(),  # curl -d without -H: a form
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and r.json()["status"] == "unsupported_media_type" and "application/json" in r.text


def test_keys_scopes_own_generations_and_rate_limits(champ: Champion, store_url: str,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.store import open_store

    monkeypatch.setenv("SDLOOP_AUTH", "keys")
    store = open_store(store_url)
    mine, mine_key = store.create_key("app", ["generate", "feedback"])
    _, other_key = store.create_key("other", ["generate", "feedback"])
    rater, rater_key = store.create_key("panel", ["rater"])
    _, fb_only = store.create_key("fbonly", ["feedback"], rate_limit_per_min=2)
    _, revoked = store.create_key("gone", ["generate"])
    store.revoke_key("gone")
    _, admin_key = store.create_key("ops", ["admin"])
    bearer = lambda k: {"Authorization": f"Bearer {k}"}  # noqa: E731
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        for headers in ({}, bearer("sdk_unknown"), bearer(revoked)):
            r = c.post("/txt2img_json", json=TINY, headers=headers)
            assert r.status_code == 401 and r.json()["status"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/txt2img_json", json=TINY, headers=bearer(fb_only))
        assert r.status_code == 403 and r.json()["status"] == "forbidden" and "generate" in r.json()["error"]
        r = c.post("/txt2img_json", json=TINY, headers={"X-API-Key": mine_key})
        assert r.status_code == 200, r.text
        gid = r.json()["images"][0]["generation_id"]
        assert store.get_generation(gid)["api_key_id"] == mine.id
        rate = {"generation_id": gid, "rating": 5}
        r = c.post("/feedback", json=rate, headers=bearer(other_key))
        assert r.status_code == 403 and "rater" in r.json()["error"]
        assert c.post("/feedback", json=rate, headers=bearer(mine_key)).status_code == 200
        assert c.post("/feedback", json={**rate, "client_id": "carol"}, headers=bearer(rater_key)).status_code == 200
        rows = {(f["client_id"], f["api_key_id"]) for f in store.feedback_for(gid)}
        assert rows == {("app", mine.id), ("carol", rater.id)}
        assert c.post("/admin/reload", headers=bearer(mine_key)).status_code == 403
        assert c.post("/admin/reload", headers=bearer(admin_key)).json()["status"] == "ok"
        unknown = {"generation_id": "0" * 32, "rating": 3}
        assert [c.post("/feedback", json=unknown, headers=bearer(fb_only)).status_code for _ in range(2)] == [404] * 2
        r = c.post("/feedback", json=unknown, headers=bearer(fb_only))
        assert r.status_code == 429 and r.json()["status"] == "rate_limited" and int(r.headers["retry-after"]) >= 1


def test_the_admin_token_has_a_failure_limit_per_peer(champ: Champion,  # noqa: F811
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from bento import handlers
    from sdloop.champion import current_champion_tag

    monkeypatch.setattr(handlers, "ADMIN_FAILURES", handlers.FailureLimit())
    monkeypatch.setenv("SDLOOP_ADMIN_TOKEN", "s3cret")
    if current_champion_tag() is None:
        promote(champ, champ.tags[0])
    with _client() as c:
        wait_for(lambda: c.get("/readyz").status_code == 200)
        wrong = {"Authorization": "Bearer guess"}
        assert [c.post("/admin/reload", headers=wrong).status_code for _ in range(5)] == [401] * 5
        # the right token now waits too, and an X-Forwarded-For from an untrusted peer changes nothing
        r = c.post("/admin/reload", headers={"Authorization": "Bearer s3cret", "X-Forwarded-For": "10.9.9.9"})
        assert r.status_code == 429 and r.json()["status"] == "rate_limited" and int(r.headers["retry-after"]) >= 1


def test_x_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    from bento.auth import client_address
    from bento.config import ServeConfig

    proxies = ServeConfig.from_env({"SDLOOP_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1"}).proxy_networks
    xff = [(b"x-forwarded-for", b"6.6.6.6, 203.0.113.7, 10.0.0.2")]
    assert client_address({"client": ("10.0.0.1", 1), "headers": xff}, proxies) == "203.0.113.7"
    assert client_address({"client": ("198.51.100.1", 1), "headers": xff}, proxies) == "198.51.100.1"
    assert client_address({"client": ("10.0.0.1", 1), "headers": xff}, []) == "10.0.0.1"


@contextlib.contextmanager
def _outage(store_url: str) -> Iterator[None]:
    """The store down for the block: the sqlite file overwritten in place (then restored), or the PostgreSQL database
    closed to connections and its sessions ended (then opened again)."""
    from monitor.store import open_store

    open_store(store_url).engine.dispose()
    if store_url.startswith("sqlite"):
        path = Path(store_url.removeprefix("sqlite:///"))
        saved = {p: p.read_bytes() for p in path.parent.glob(path.name + "*")}
        path.write_bytes(b"this is not a database" * 300)
        try:
            yield
        finally:
            for p, data in saved.items():
                p.write_bytes(data)
        return
    import os

    import sqlalchemy as sa

    name = sa.engine.make_url(store_url).database
    admin = sa.create_engine(os.environ["SDLOOP_TEST_POSTGRES_URL"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                     {"n": name})
    try:
        yield
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()


def test_a_store_outage_is_503_and_heals(serving, store_url: str) -> None:  # noqa: ANN001
    gid = serving.post("/txt2img_json", json=TINY).json()["images"][0]["generation_id"]
    rate = {"generation_id": gid, "rating": 4, "client_id": "a"}
    with _outage(store_url):
        r = serving.post("/feedback", json=rate)
        assert r.status_code == 503 and r.json()["status"] == "store_unavailable", r.text
        r = serving.post("/txt2img_json", json=TINY)
        assert r.status_code == 503 and r.json()["status"] == "store_unavailable", r.text
    wait_for(lambda: serving.post("/feedback", json=rate).status_code == 200)
    assert serving.post("/txt2img_json", json=TINY).status_code == 200


def test_sdloop_serve_refuses_a_public_address_without_keys(champ: Champion,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from sdloop_cli.main import main

    monkeypatch.delenv("SDLOOP_AUTH", raising=False)
    monkeypatch.delenv("SDLOOP_ALLOW_NO_AUTH", raising=False)
    monkeypatch.setattr("os.execv", lambda *a: (_ for _ in ()).throw(AssertionError(f"exec'd {a}")))
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and "--insecure-no-auth" in out.err and out.out == ""
    monkeypatch.setenv("SDLOOP_AUTH", "keys")
    with pytest.raises(AssertionError, match="exec'd"):
        main(["serve", "--host", "0.0.0.0", "--port", str(_free_port())])
    monkeypatch.setenv("SDLOOP_AUTH", "off")
    with pytest.raises(AssertionError, match="exec'd"):
        main(["serve", "--host", "0.0.0.0", "--port", str(_free_port()), "--insecure-no-auth"])
