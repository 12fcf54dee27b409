"""API keys in the monitoring store: created, listed, revoked, and looked up by the service for each request.

Part of ``monitor.store``: a mixin of ``Store`` (the one public class); ``sdloop keys`` (``sdloop_cli/keys.py``) and
the service call these named methods, so every query of the monitoring database stays in ``monitor/store*.py``.

A key is ``sdk_`` + 32 random bytes (``secrets.token_urlsafe``: 256 bits). It is shown once, when it is created;
the store keeps only its SHA-256. A fast hash is right here, unlike for passwords: a slow hash (bcrypt, scrypt,
argon2) exists to make guessing a *low-entropy* secret from a stolen hash expensive, but nobody can enumerate 2**256
random keys at any speed, so a slow hash would add nothing except milliseconds of CPU to every request. For the same
reason the hash needs no salt (no two keys share a value, and precomputed tables of random 256-bit keys cannot
exist).

Scopes say what a key may do: ``generate`` (txt2img, jobs), ``feedback`` (rate generations it made), ``rater`` (rate
any generation: a review team or a trusted rating front end), ``admin`` (reload, and anything else an operator does).
Keys are revoked, never deleted, and a name is never reused, so the ``api_key_id`` of every generation and feedback
row names one key for good.

How the service uses them (``bento/`` wires it): it reads the key from ``Authorization: Bearer <key>`` (or
``X-API-Key``), calls ``Store.key_for(key)`` (None: 401; a record without the scope the endpoint needs: 403),
passes ``record.id`` as ``api_key_id`` to ``log_generation`` and ``add_feedback``, asks ``may_rate(record,
generation_id)`` before storing feedback (403 otherwise: a key may rate only generations it made unless it holds
``rater``), and enforces ``record.rate_limit_per_min`` itself (None: the service's default). A looked-up record may be
cached for a few seconds; a revocation takes effect when the cache entry expires.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from monitor.store_schema import _now, _utc, api_keys, generations
from sdloop.errors import UserError

SCOPES = ("generate", "feedback", "rater", "admin")
KEY_PREFIX = "sdk_"
MAX_PRESENTED = 256           # longer than any key we make: not looked up at all
MAX_RATE_PER_MIN = 1_000_000
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.@-]{0,63}")


class ApiKeyError(UserError):
    """A key cannot be created or found (a bad or taken name, an unknown scope, no such key); one line."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the store knows it: never the key itself, only what it may do and whether it still may."""

    id: int
    name: str
    scopes: tuple[str, ...]
    rate_limit_per_min: Optional[int]
    created: dt.datetime
    revoked: Optional[dt.datetime]

    @property
    def active(self) -> bool:
        return self.revoked is None

    def allows(self, scope: str) -> bool:
        """Whether this (active) key holds ``scope``; ``admin`` holds every scope."""
        return self.active and (scope in self.scopes or "admin" in self.scopes)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "scopes": list(self.scopes),
                "rate_limit_per_min": self.rate_limit_per_min, "created": self.created.isoformat(),
                "revoked": self.revoked.isoformat() if self.revoked else None}


def hash_key(key: str) -> str:
    """The hex SHA-256 of a presented key: what the store keeps and looks up (see the module docstring for why a fast
    unsalted hash is the right one for 256-bit random keys)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh key: ``sdk_`` + 32 random bytes, URL-safe base64 (43 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    """The scopes in the order of ``SCOPES``, each once; ApiKeyError for none or an unknown one."""
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ApiKeyError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}.")
    if not scopes:
        raise ApiKeyError(f"a key needs at least one --scope ({', '.join(SCOPES)}).")
    return tuple(s for s in SCOPES if s in scopes)


def _record(row: Any) -> ApiKey:
    return ApiKey(int(row["id"]), row["name"], tuple(row["scopes"] or ()), row["rate_limit_per_min"],
                  _utc(row["created"]), _utc(row["revoked"]))


class _KeyQueries:
    """Creating, listing, revoking and looking up API keys, and the one question feedback needs: who made what."""

    engine: Engine

    def create_key(self, name: str, scopes: Sequence[str],
                   rate_limit_per_min: Optional[int] = None) -> tuple[ApiKey, str]:
        """Create a key; return its record and the key itself, which is never available again (only its hash is
        stored). ``name``: a letter, then letters, digits or ``_.@-``, at most 64, unique for good (a revoked key's
        name is not reused). ``rate_limit_per_min`` None: the service's default limit."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ApiKeyError(f"key name {name!r} is invalid: a letter, then letters, digits or _.@- (at most 64).")
        checked = check_scopes(scopes)
        if rate_limit_per_min is not None and not 1 <= rate_limit_per_min <= MAX_RATE_PER_MIN:
            raise ApiKeyError(f"rate limit {rate_limit_per_min} is invalid: 1 to {MAX_RATE_PER_MIN} per minute.")
        key = new_key()
        try:
            with self.engine.begin() as conn:
                rid = conn.execute(api_keys.insert().values(
                    name=name, key_hash=hash_key(key), scopes=list(checked), rate_limit_per_min=rate_limit_per_min,
                    created=_now())).inserted_primary_key[0]
                row = conn.execute(sa.select(api_keys).where(api_keys.c.id == rid)).mappings().one()
        except sa.exc.IntegrityError:
            raise ApiKeyError(f"a key named {name!r} exists already (names are never reused, revoked keys' "
                              "included); pick another name.") from None
        return _record(row), key

    def list_keys(self) -> list[ApiKey]:
        """Every key ever created, oldest first, revoked ones included (their ``revoked`` time set)."""
        with self.engine.begin() as conn:
            return [_record(r) for r in conn.execute(sa.select(api_keys).order_by(api_keys.c.id)).mappings()]

    def find_key(self, name_or_id: str) -> ApiKey:
        """The key named ``name_or_id``, or with that id (names start with a letter, so a number is an id)."""
        text = str(name_or_id).strip()
        where = api_keys.c.id == int(text) if text.isdigit() and len(text) < 10 else api_keys.c.name == text
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(api_keys).where(where)).mappings().first()
        if row is None:
            raise ApiKeyError(f"no key named or numbered {text!r}; `sdloop keys list` shows them.")
        return _record(row)

    def revoke_key(self, name_or_id: str) -> tuple[ApiKey, bool]:
        """Revoke a key from now on; return its record and whether this call revoked it (False: it already was)."""
        key = self.find_key(name_or_id)
        if key.revoked is not None:
            return key, False
        with self.engine.begin() as conn:
            done = conn.execute(api_keys.update().where(api_keys.c.id == key.id, api_keys.c.revoked.is_(None))
                                .values(revoked=_now())).rowcount
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key.id)).mappings().one()
        return _record(row), bool(done)

    def key_for(self, presented: Any) -> Optional[ApiKey]:
        """The active key whose hash matches ``presented`` (the string a caller sent), or None (unknown, revoked,
        malformed, absurdly long: the service answers 401 alike).

        Looked up by its hash (a unique index), then the hashes compared with ``hmac.compare_digest``: the time an
        answer takes tells a caller nothing about how close a guess came (the index search runs on the SHA-256 of
        the guess, whose prefix the guesser cannot steer towards a stored one without inverting SHA-256)."""
        if not isinstance(presented, str) or not presented or len(presented) > MAX_PRESENTED:
            return None
        digest = hash_key(presented)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.key_hash == digest)).mappings().first()
        if row is None or not hmac.compare_digest(str(row["key_hash"]), digest):
            return None
        key = _record(row)
        return key if key.active else None

    def key_made_generation(self, key_id: int, generation_id: str) -> bool:
        """Whether the generation ``generation_id`` was made with key ``key_id`` (False for an unknown id, and for
        a generation made without a key or before keys existed)."""
        q = sa.select(generations.c.api_key_id).where(generations.c.id == str(generation_id))
        with self.engine.begin() as conn:
            made_by = conn.execute(q).scalar()
        return made_by is not None and int(made_by) == int(key_id)

    def may_rate(self, key: ApiKey, generation_id: str) -> bool:
        """The feedback rule: an active key with the ``rater`` (or ``admin``) scope may rate any generation; one with
        ``feedback`` only those it made; any other key none."""
        if key.allows("rater"):
            return True
        return key.allows("feedback") and self.key_made_generation(key.id, generation_id)
