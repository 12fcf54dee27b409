"""The two windows a monitoring report compares: the champion's current traffic and its frozen reference.

Windows are per model version. The verdict is about the champion, so both windows hold only generations the champion
served (``Window.model_version``): after a promotion, the traffic the old champion served, and the ratings its images
got, say nothing about the new one. (Before, the reference of a new champion was the week of traffic before its
promotion, and the current window the last day: after a promotion both held mostly the old champion's generations,
and the new champion was judged on the old one's ratings.)

Drift only means something against a fixed yardstick. If the reference were "the week before now", a slow drift
would drag its own reference along and never be seen; so the reference of a champion is frozen once, in the store's
``reference_windows`` table, and never moves again while that champion serves (a new champion gets its own):

- the ``reference_hours`` before the champion's promotion, when it served ``min_generations`` generations in them
  itself (a version that served before: a rollback to it, or a canary);
- otherwise the champion's own first ``min_generations`` generations after its promotion, frozen as soon as they
  exist. Until then
there is no reference and the verdict is WAIT, with a reason saying how many of its own generations the champion has
served and how many the reference needs (``ReferenceChoice.wait``). A window frozen by the earlier rule (the traffic
before the promotion, which holds too few of the champion's own generations) is not used.

The current window may still overlap the champion's own reference while it is young (its first generations are in
both): that dilutes drift, but the feedback tests (mean rating, thumbs down) judge the current window alone, and
starting the current window after the reference would leave a small service with no verdict for another
``min_generations``. An explicit ``--reference SINCE..UNTIL`` is taken as given: every generation in that time,
whichever version served it.
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
    """A half-open time range [since, until) of the generation log (aware UTC datetimes), how it was chosen, and
    the model version whose generations it holds (None: all of them)."""

    since: dt.datetime
    until: dt.datetime
    how: str
    model_version: Optional[str] = None  # only this version's generations (None: every generation in the range)

    def to_dict(self) -> dict[str, Any]:
        return {"since": iso(self.since), "until": iso(self.until), "how": self.how,
                "hours": round((self.until - self.since).total_seconds() / 3600.0, 3),
                "model_version": self.model_version}


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
    """The reference window frozen for ``champion`` (holding only its generations), or None."""
    row = store.frozen_reference(champion)
    return Window(as_utc(row["since"]), as_utc(row["until"]), row["how"], champion) if row else None


def _freeze(store: "Store", champion: str, window: Window, now: dt.datetime) -> Window:
    """Record ``window`` for ``champion`` unless another process froze one first; return the one that holds."""
    store.freeze_reference(champion, window.since, window.until, window.how, now)  # False: theirs holds
    return frozen_window(store, champion) or window


@dataclass(frozen=True)
class ReferenceChoice:
    """The reference window, or None and, when a champion is waiting for its own traffic, why (``wait``)."""

    window: Optional[Window]
    wait: Optional[str] = None
    champion: Optional[str] = None


def _own(store: "Store", tag: str, since: dt.datetime, until: dt.datetime, n: int) -> list[dt.datetime]:
    return [as_utc(t) for t in store.first_generation_times(tag, since, until, n)]


def choose_reference(store: "Store", cfg: "MonitorConfig", now: Optional[dt.datetime] = None,
                     explicit: Optional[Window] = None) -> ReferenceChoice:
    """The window the current one is compared with: ``explicit`` when given, else the current champion's frozen one
    (freezing it now when the champion has served ``min_generations``); see the module docstring."""
    from sdloop.champion import champion_since

    champ = champion_since()
    tag = champ[0] if champ else None
    if explicit is not None:
        return ReferenceChoice(explicit, None, tag)
    if champ is None:
        return ReferenceChoice(None)
    promoted = champ[1]
    need = cfg.min_generations
    held = frozen_window(store, tag)
    if held is not None and len(_own(store, tag, held.since, held.until, need)) >= need:
        return ReferenceChoice(held, None, tag)
    end = _now(now)
    before = Window(promoted - dt.timedelta(hours=cfg.reference_hours), promoted,
                    f"frozen when {tag} was promoted: its own generations of the {cfg.reference_hours:g} h before", tag)
    if promoted <= end and len(_own(store, tag, before.since, before.until, need)) >= need:
        return ReferenceChoice(before if held is not None else _freeze(store, tag, before, end), None, tag)
    first = _own(store, tag, promoted, end, need) if promoted <= end else []
    if len(first) < need:
        wait = (f"the champion {tag} has served {len(first)} generation(s) since its promotion at {iso(promoted)}; "
                f"its reference window holds only its own traffic and needs {need}: wait for {need - len(first)} "
                "more")
        return ReferenceChoice(None, wait, tag)
    after = Window(promoted, first[-1] + dt.timedelta(microseconds=1),
                   f"frozen from {tag}'s first {need} generations after its promotion", tag)
    if held is not None:  # frozen by the earlier rule (traffic before the promotion): this one is deterministic
        return ReferenceChoice(after, None, tag)
    return ReferenceChoice(_freeze(store, tag, after, end), None, tag)


def reference_window(store: "Store", cfg: "MonitorConfig", now: Optional[dt.datetime] = None,
                     explicit: Optional[Window] = None) -> Optional[Window]:
    """``choose_reference``'s window alone. None: no champion, or not enough of its own traffic yet."""
    return choose_reference(store, cfg, now, explicit).window


def champion_current(current: Window, choice: ReferenceChoice) -> Window:
    """The current window of the champion: only the generations it served (the old champion's, still in the last
    ``current_hours`` after a promotion, are not its traffic)."""
    if choice.champion is None:
        return current
    return Window(current.since, current.until, f"{current.how}, {choice.champion}'s generations", choice.champion)
