"""`sdloop keys create|list|revoke`: the service's API keys, kept hashed in the monitoring store.

Part of the command line (``sdloop_cli.main`` assembles the parser): it parses and calls the store's named methods
(``monitor.store.Store``: ``create_key``, ``list_keys``, ``revoke_key``), whose ``UserError`` becomes one line in
``sdloop_cli.main.main``. The store is the service's (``$SDLOOP_STORE_URL`` or ``$SDLOOP_HOME/monitor.db``), so a key
made here is one every serving replica knows. ``create`` prints the key alone on stdout (``KEY=$(sdloop keys create
...)`` works) and what it is on stderr; the key is never shown again, and ``list`` never shows one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Optional

from sdloop.errors import UserError

_RATE = re.compile(r"\s*(\d{1,9})\s*(?:/\s*(s|sec|min|m|h|hour))?\s*")
_PER_MIN = {None: 1.0, "min": 1.0, "m": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}


def parse_rate(text: Optional[str]) -> Optional[int]:
    """``60/min`` (or ``60``, ``2/s``, ``600/h``) as requests per minute; None for no flag. A rate that is not a
    whole number per minute, or below one, is one line."""
    if text is None:
        return None
    m = _RATE.fullmatch(text)
    if not m:
        raise UserError(f"--rate-limit {text!r} is not a rate: write N/min (or N/s, N/h), e.g. 60/min.")
    per_min = int(m.group(1)) * _PER_MIN[m.group(2)]
    if per_min < 1 or per_min != int(per_min):
        raise UserError(f"--rate-limit {text!r} is {per_min:g} per minute; give a whole number of at least 1 per "
                        "minute, e.g. 60/min.")
    return int(per_min)


def _store() -> Any:
    from monitor.store import open_store

    return open_store()


def _rate_text(rate: Optional[int]) -> str:
    return "the service's default" if rate is None else f"{rate}/min"


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key and print it once (stdout), with its name, scopes and rate limit (stderr)."""
    rate = parse_rate(args.rate_limit)
    record, key = _store().create_key(args.name, args.scope or [], rate)
    print(key)
    print(f"created key {record.id} {record.name!r}: scopes {', '.join(record.scopes)}, rate limit "
          f"{_rate_text(record.rate_limit_per_min)}. This is the only time the key is shown (the store keeps its "
          "SHA-256); send it as 'Authorization: Bearer <key>'.", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Every key: id, name, scopes, rate limit, created, revoked. Never a key (the store has none to show)."""
    keys = _store().list_keys()
    if args.json:
        print(json.dumps([k.to_dict() for k in keys], indent=2))
        return 0
    if not keys:
        print("no API keys yet; create one with `sdloop keys create --name NAME --scope generate --scope feedback`.")
        return 0
    rows = [("id", "name", "scopes", "rate limit", "created", "revoked")]
    rows += [(str(k.id), k.name, ",".join(k.scopes), _rate_text(k.rate_limit_per_min).replace("the service's ", ""),
              f"{k.created:%Y-%m-%d %H:%M}Z", f"{k.revoked:%Y-%m-%d %H:%M}Z" if k.revoked else "-") for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by name or id; revoking a revoked key says so and changes nothing."""
    record, now = _store().revoke_key(args.key)
    when = f"{record.revoked:%Y-%m-%d %H:%M:%S}Z" if record.revoked else "?"
    if now:
        print(f"revoked key {record.id} {record.name!r} at {when}: the service refuses it from its next lookup.")
    else:
        print(f"key {record.id} {record.name!r} was already revoked at {when}; nothing changed.")
    return 0


def add_parsers(sub: Any, parser: argparse.ArgumentParser) -> None:
    """Add ``sdloop keys`` and its actions to the top-level subparsers (the store's SCOPES, named here so that
    building the parser imports no database library)."""
    p_keys = sub.add_parser("keys", help="API keys of the service: create (shown once), list, revoke")
    ksub = p_keys.add_subparsers(dest="keys_command", metavar="ACTION")
    p = ksub.add_parser("create", help="make a key and print it once (only its SHA-256 is stored)")
    p.add_argument("--name", required=True, help="a unique name: a letter, then letters, digits or _.@-")
    p.add_argument("--scope", action="append", metavar="SCOPE",
                   help="what the key may do, repeatable: generate, feedback, rater, admin (generate: make "
                        "images; feedback: rate its own generations; rater: rate any generation; admin: everything); "
                        "no default: at least one is needed")
    p.add_argument("--rate-limit", dest="rate_limit", metavar="N/min",
                   help="requests per minute the service allows this key (default: the service's limit)")
    p.set_defaults(func=cmd_keys_create)
    p = ksub.add_parser("list", help="every key with its scopes, limit and state (never the key itself)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_keys_list)
    p = ksub.add_parser("revoke", help="revoke a key by name or id (kept, never reused)")
    p.add_argument("key", metavar="NAME_OR_ID", help="the key's name or id (`sdloop keys list`)")
    p.set_defaults(func=cmd_keys_revoke)
    p_keys.set_defaults(group_parsers={"keys": p_keys})
