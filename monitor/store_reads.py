"""The monitoring store's queries for reports and retraining data: windows, votes, failures, frozen references.

Part of ``monitor.store``: a mixin of ``Store`` (the one public class), kept in its own module so each stays readable.
The report (``monitor.frames``, ``monitor.windows``), the check and the retraining data call these named methods and
never build SQL themselves, so every query of the monitoring database lives in ``monitor/store*.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from monitor.store_schema import _utc, failures, feedback, generations, reference_windows


class _ReportQueries:
    """Reads the monitor's report and the retraining data make (and the one write they need: freezing a reference)."""

    engine: Engine

    def count_generations(self, since: dt.datetime, until: dt.datetime) -> int:
        """Generations logged in [since, until): whether a window holds enough traffic to be a reference."""
        q = sa.select(sa.func.count()).select_from(generations).where(
            generations.c.created >= since, generations.c.created < until)
        with self.engine.begin() as conn:
            return int(conn.execute(q).scalar())

    def first_generation_times(self, model_version: str, since: dt.datetime, until: dt.datetime,
                               limit: int) -> list[dt.datetime]:
        """Creation times of the first ``limit`` generations of ``model_version`` in [since, until), oldest first:
        a fresh champion's own first traffic, which becomes its reference when it had none before its promotion."""
        q = (sa.select(generations.c.created)
             .where(generations.c.created >= since, generations.c.created < until,
                    generations.c.model_version == model_version)
             .order_by(generations.c.created).limit(limit))
        with self.engine.begin() as conn:
            return list(conn.execute(q).scalars())

    def frozen_reference(self, champion: str) -> Optional[dict[str, Any]]:
        """The reference window frozen for ``champion`` ({since, until, how}), or None."""
        rw = reference_windows
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(rw).where(rw.c.champion == champion)).mappings().first()
        return {"since": row["since"], "until": row["until"], "how": row["how"]} if row else None

    def freeze_reference(self, champion: str, since: dt.datetime, until: dt.datetime, how: str,
                         frozen: dt.datetime) -> bool:
        """Record ``champion``'s reference window unless one is recorded already (a concurrent report froze it
        first: theirs holds, since a reference must never move). Returns whether this call recorded it."""
        try:
            with self.engine.begin() as conn:
                conn.execute(reference_windows.insert().values(champion=champion, since=since, until=until,
                                                               frozen=frozen, how=how))
        except sa.exc.IntegrityError:
            return False
        return True

    def feedback_votes(self, since: dt.datetime, until: dt.datetime) -> list[tuple[str, Optional[int], Optional[int]]]:
        """(generation_id, rating, thumbs) of every feedback row on a generation logged in [since, until)."""
        q = (sa.select(feedback.c.generation_id, feedback.c.rating, feedback.c.thumbs)
             .join(generations, generations.c.id == feedback.c.generation_id)
             .where(generations.c.created >= since, generations.c.created < until))
        with self.engine.begin() as conn:
            return [tuple(r) for r in conn.execute(q).all()]

    def count_failures(self, since: dt.datetime, until: dt.datetime) -> int:
        """Requests in [since, until) that produced no image: the report's error rate."""
        q = sa.select(sa.func.count()).select_from(failures).where(failures.c.created >= since,
                                                                   failures.c.created < until)
        with self.engine.begin() as conn:
            return int(conn.execute(q).scalar())

    def count_feedback(self, updated_since: Optional[dt.datetime] = None) -> int:
        """Feedback rows written (or changed) since ``updated_since`` (all of them when None): what the policy asks
        for before a retraining has anything new to learn from."""
        q = sa.select(sa.func.count()).select_from(feedback)
        if updated_since is not None:
            q = q.where(feedback.c.updated >= updated_since)
        with self.engine.begin() as conn:
            return int(conn.execute(q).scalar())

    def rated_generations(self, since: Optional[dt.datetime] = None) -> tuple[list[dict[str, Any]], int]:
        """Generations since ``since`` that have a rating or a thumb, each with its mean rating, rating count, mean
        thumbs and thumbs count (``created`` as aware UTC), and how many generations since then have neither: what
        the retraining data keeps or drops."""
        votes = sa.func.count(feedback.c.rating) + sa.func.count(feedback.c.thumbs)
        q = (sa.select(generations.c.id, generations.c.created, generations.c.prompt, generations.c.image_path,
                       sa.func.avg(feedback.c.rating).label("rating"),
                       sa.func.count(feedback.c.rating).label("ratings"),
                       sa.func.avg(feedback.c.thumbs).label("thumbs"),
                       sa.func.count(feedback.c.thumbs).label("thumbs_n"))
             .select_from(generations.join(feedback, feedback.c.generation_id == generations.c.id))
             .group_by(generations.c.id, generations.c.created, generations.c.prompt, generations.c.image_path)
             .having(votes > 0))
        total_q = sa.select(sa.func.count()).select_from(generations)
        if since is not None:
            q = q.where(generations.c.created >= since)
            total_q = total_q.where(generations.c.created >= since)
        with self.engine.begin() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
            total = int(conn.execute(total_q).scalar())
        for r in rows:
            r["created"] = _utc(r["created"])
            r["rating"] = None if r["rating"] is None else float(r["rating"])
            r["thumbs"] = None if r["thumbs"] is None else float(r["thumbs"])
        return rows, total - len(rows)
