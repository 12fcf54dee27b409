"""Who is calling: API keys with scopes and per-key rate limits, the admin token's failure limit, the client address.

Why here and not in the handlers: the key is checked before BentoML parses the request (``bento.guard``), so an
unknown caller costs one hash and one indexed lookup, never a generation. Keys live in the monitoring store
(``monitor/store_keys.py``); a looked-up record is cached for ``CACHE_S`` seconds, so a revocation takes effect
within that. Rate limits are token buckets per worker process (the key's ``rate_limit_per_min``, else
``SDLOOP_RATE_LIMIT_PER_MIN``): with N workers a key may get up to N times its limit, a bound, not a quota.

The peer address is never an identity: it is logged, and counts failed admin-token attempts. ``X-Forwarded-For`` is
believed only from a peer inside ``SDLOOP_TRUSTED_PROXIES``, and only as far back as the hops stay trusted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import threading
import time
from typing import Any, Optional

from bento.config import ServeConfig

CACHE_S = 5.0
ADMIN_FAILURES = 5          # failed admin-token attempts per peer ...
ADMIN_WINDOW_S = 60.0       # ... per this window, then 429


def _trusted(address: str, proxies: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(scope: dict[str, Any], proxies: list[Any]) -> str:
    """The caller's address for logs and the admin limiter: the peer, or, behind trusted proxies, the right-most
    X-Forwarded-For hop that is not itself a trusted proxy (the left-most ones are whatever the client wrote)."""
    peer = (scope.get("client") or ("unknown", 0))[0]
    if not proxies or not _trusted(peer, proxies):
        return peer
    forwarded = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-forwarded-for"]
    hops = [h.strip() for h in ",".join(forwarded).split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer


def presented_key(scope: dict[str, Any]) -> str:
    """The key a caller sent: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` ('' when none)."""
    headers = dict(scope.get("headers", []))
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


class Authenticator:
    """Keys (cached lookups), scopes and one token bucket per key, for one worker process."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}
        self._buckets: dict[int, tuple[float, float]] = {}   # key id -> (tokens, when)

    def _store(self) -> Any:
        import bentoml

        return bentoml.get_current_service().store

    def lookup(self, key: str) -> Any:
        """The store's record of ``key`` (None: unknown or revoked), cached for CACHE_S; 503 when the store is down."""
        from bento.guard import Refusal
        from bento.handlers import store_outage

        digest, now = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest(), time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit and hit[0] > now:
            return hit[1]
        try:
            record = self._store().key_for(key)
        except Exception as e:  # noqa: BLE001 - only a store outage is answered; anything else is ours
            if not store_outage(e):
                raise
            raise Refusal(503, "store_unavailable", f"the monitoring store cannot be read ({type(e).__name__}); "
                                                    "try again shortly") from None
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + CACHE_S, record)
        return record

    def authorize(self, scope: dict[str, Any], needs: str) -> Any:
        """The caller's key record if it may call an endpoint needing ``needs``; a Refusal (401/403/429) if not.
        For /admin/* a caller without an ``sdk_`` key goes on to the admin-token check (None)."""
        from bento.guard import Refusal

        key = presented_key(scope)
        if needs == "admin" and not key.startswith("sdk_"):
            return None
        record = self.lookup(key) if key else None
        if record is None:
            raise Refusal(401, "unauthorized", "send an API key as 'Authorization: Bearer sdk_...' (`sdloop keys "
                                               "create`); this one is missing, unknown or revoked",
                          headers={"WWW-Authenticate": "Bearer"})
        if not (record.allows(needs) or (needs == "feedback" and record.allows("rater"))):
            raise Refusal(403, "forbidden", f"key {record.name!r} lacks the {needs!r} scope (it has "
                                            f"{', '.join(record.scopes)})")
        wait = self.take(record.id, record.rate_limit_per_min or self.config.rate_limit_per_min)
        if wait:
            raise Refusal(429, "rate_limited", f"key {record.name!r} is over its rate limit; retry in {wait} s",
                          headers={"Retry-After": str(wait)})
        return record

    def take(self, key_id: int, per_min: int) -> int:
        """Take one token from the key's bucket (capacity ``per_min``, refilled at per_min/60 a second); 0 when
        taken, else the whole seconds until one is there (Retry-After)."""
        rate, now = per_min / 60.0, time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key_id, (float(per_min), now))
            tokens = min(float(per_min), tokens + (now - then) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0
            self._buckets[key_id] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / rate))


class FailureLimit:
    """At most ``limit`` failures per ``window_s`` per address (the admin token): guessing it takes forever."""

    def __init__(self, limit: int = ADMIN_FAILURES, window_s: float = ADMIN_WINDOW_S) -> None:
        self.limit, self.window_s = limit, window_s
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def retry_after(self, address: str) -> int:
        """0 when ``address`` may try now, else the seconds until its oldest failure leaves the window."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(address, []) if now - t < self.window_s]
            self._failures[address] = recent
            return 0 if len(recent) < self.limit else max(1, math.ceil(self.window_s - (now - recent[0])))

    def failed(self, address: str) -> None:
        with self._lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._failures.setdefault(address, []).append(time.monotonic())


def key_of(request: Any) -> Optional[Any]:
    """The key record the guard attached to this request (None with keys off, or an admin-token caller)."""
    return getattr(request.state, "api_key", None) if request is not None else None
