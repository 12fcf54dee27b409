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

from monitor.store_schema import _utc, choices, failures, feedback, generations, reference_windows


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
        """Feedback rows and two-candidate choices written (or changed) since ``updated_since`` (all of them when
        None): what the policy asks for before a retraining has anything new to learn from (a choice is what a dpo
        retraining learns from, as a rating is for sft and kto)."""
        q = sa.select(sa.func.count()).select_from(feedback)
        c = sa.select(sa.func.count()).select_from(choices)
        if updated_since is not None:
            q, c = q.where(feedback.c.updated >= updated_since), c.where(choices.c.updated >= updated_since)
        with self.engine.begin() as conn:
            return int(conn.execute(q).scalar()) + int(conn.execute(c).scalar())

    def rating_votes(self, since: Optional[dt.datetime] = None) -> tuple[list[dict[str, Any]], int]:
        """Every feedback row with a rating or a thumb on a generation created since ``since`` (all when None), one
        dict each: the vote (``feedback_id``, ``client_id``, ``api_key_id``, ``rating``, ``thumbs``) and its
        generation (``generation_id``, ``created`` as aware UTC, ``prompt``, ``image_path``), oldest vote first; and
        how many generations since then have no such vote. The retraining data weighs votes per rater
        (``monitor.raters``), so it reads them one by one rather than as averages."""
        q = (sa.select(feedback.c.id.label("feedback_id"), feedback.c.client_id, feedback.c.api_key_id,
                       feedback.c.rating, feedback.c.thumbs, generations.c.id.label("generation_id"),
                       generations.c.created, generations.c.prompt, generations.c.image_path)
             .select_from(feedback.join(generations, feedback.c.generation_id == generations.c.id))
             .where(sa.or_(feedback.c.rating.is_not(None), feedback.c.thumbs.is_not(None)))
             .order_by(feedback.c.id))
        voted = (sa.select(sa.func.count(sa.distinct(feedback.c.generation_id)))
                 .select_from(feedback.join(generations, feedback.c.generation_id == generations.c.id))
                 .where(sa.or_(feedback.c.rating.is_not(None), feedback.c.thumbs.is_not(None))))
        total_q = sa.select(sa.func.count()).select_from(generations)
        if since is not None:
            q, voted = q.where(generations.c.created >= since), voted.where(generations.c.created >= since)
            total_q = total_q.where(generations.c.created >= since)
        with self.engine.begin() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
            total, with_votes = int(conn.execute(total_q).scalar()), int(conn.execute(voted).scalar())
        for r in rows:
            r["created"] = _utc(r["created"])
        return rows, total - with_votes
