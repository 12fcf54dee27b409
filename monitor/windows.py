"""The two time windows a monitoring report compares: the current traffic and the champion's frozen reference.

Drift only means something against a fixed yardstick. If the reference were "the week before now", a slow drift
would drag its own reference along and never be seen; so the reference of a champion is frozen once, in the store's
``reference_windows`` table, and never moves again while that champion serves (a new champion gets its own):

- the ``reference_hours`` of traffic before the champion's promotion, when that holds at least ``min_generations``
  generations (the traffic the champion was chosen for);
- otherwise the champion's own first ``min_generations`` generations after its promotion, frozen as soon as they
  exist (a fresh service has no earlier traffic); until then there is no reference ("not enough data").
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from sdloop.errors import UserError

if TYPE_CHECKING:
    from monitor.config import MonitorConfig
    from monitor.store import Store


@dataclass(frozen=True)
class Window:
    """A half-open time range [since, until) of the generation log (aware UTC datetimes) and how it was chosen."""

    since: dt.datetime
    until: dt.datetime
    how: str

    def to_dict(self) -> dict[str, Any]:
        return {"since": iso(self.since), "until": iso(self.until), "how": self.how,
                "hours": round((self.until - self.since).total_seconds() / 3600.0, 3)}


def iso(when: dt.datetime) -> str:
    """UTC ISO-8601 with a Z, to the second (how reports and the CLI print times)."""
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now(now: Optional[dt.datetime]) -> dt.datetime:
    return as_utc(now) if now is not None else dt.datetime.now(dt.timezone.utc)


def as_utc(when: dt.datetime) -> dt.datetime:
    """Aware UTC; a naive datetime is taken as UTC (sqlite hands those back)."""
    return when.replace(tzinfo=dt.timezone.utc) if when.tzinfo is None else when.astimezone(dt.timezone.utc)


def parse_time(text: str, what: str = "time") -> dt.datetime:
    """An ISO date or date-time (``2026-11-28``, ``2026-11-28T12:00``, with Z or an offset; naive means UTC)."""
    value = text.strip()
    try:
        parsed = dt.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value)
    except ValueError:
        raise UserError(f"{what} {text!r} is not a date or time; write it as ISO 8601, e.g. 2026-11-28 or "
                        "2026-11-28T12:00Z.") from None
    return as_utc(parsed)


def parse_window(text: str, how: str = "explicit") -> Window:
    """``SINCE..UNTIL`` (the CLI's ``--reference``) as a Window."""
    since, sep, until = text.partition("..")
    if not sep or not since.strip() or not until.strip():
        raise UserError(f"window {text!r} must be SINCE..UNTIL, e.g. 2026-11-20..2026-11-27T12:00Z.")
    return explicit_window(parse_time(since, "window start"), parse_time(until, "window end"), how)


def explicit_window(since: dt.datetime, until: dt.datetime, how: str = "explicit") -> Window:
    since, until = as_utc(since), as_utc(until)
    if until <= since:
        raise UserError(f"window end {iso(until)} is not after its start {iso(since)}; swap them.")
    return Window(since, until, how)


def current_window(cfg: "MonitorConfig", now: Optional[dt.datetime] = None, since: Optional[dt.datetime] = None,
                   until: Optional[dt.datetime] = None) -> Window:
    """The window a report judges: the last ``cfg.current_hours`` ending now, or the explicit bounds given."""
    end = as_utc(until) if until is not None else _now(now)
    if since is not None:
        how = "explicit" if until is not None else f"explicit since, until {'now' if now is None else iso(end)}"
        return explicit_window(since, end, how)
    hours = cfg.current_hours
    how = f"current {hours:g} h" if until is None else f"{hours:g} h before {iso(end)}"
    return Window(end - dt.timedelta(hours=hours), end, how)


def frozen_window(store: "Store", champion: str) -> Optional[Window]:
    """The reference window frozen for ``champion``, or None."""
    row = store.frozen_reference(champion)
    return Window(as_utc(row["since"]), as_utc(row["until"]), row["how"]) if row else None


def _freeze(store: "Store", champion: str, window: Window, now: dt.datetime) -> Window:
    """Record ``window`` for ``champion`` unless another process froze one first; return the one that holds."""
    store.freeze_reference(champion, window.since, window.until, window.how, now)  # False: theirs holds
    return frozen_window(store, champion) or window


def reference_window(store: "Store", cfg: "MonitorConfig", now: Optional[dt.datetime] = None,
                     explicit: Optional[Window] = None) -> Optional[Window]:
    """The window the current one is compared with: ``explicit`` when given, else the current champion's frozen one
    (freezing it now when the rule above allows). None: no champion, or not enough traffic yet to freeze one."""
    if explicit is not None:
        return explicit
    from sdloop.champion import champion_since

    champ = champion_since()
    if champ is None:
        return None
    tag, promoted = champ
    held = frozen_window(store, tag)
    if held is not None:
        return held
    end = _now(now)
    before = Window(promoted - dt.timedelta(hours=cfg.reference_hours), promoted,
                    f"frozen when {tag} was promoted: {cfg.reference_hours:g} h before")
    if promoted <= end and store.count_generations(before.since, before.until) >= cfg.min_generations:
        return _freeze(store, tag, before, end)
    first = [as_utc(t) for t in store.first_generation_times(tag, promoted, end, cfg.min_generations)]
    if len(first) < cfg.min_generations:
        return None
    after = Window(promoted, first[-1] + dt.timedelta(microseconds=1),
                   f"frozen from {tag}'s first {cfg.min_generations} generations after its promotion")
    return _freeze(store, tag, after, end)
