"""Two-candidate pairs and the choices between them in the monitoring store (schema version 6).

Part of ``monitor.store``: a mixin of ``Store`` (the one public class). The service (``bento/pairs.py``) records a
pair when a request asks for ``"candidates": 2`` and a choice when the caller says which one it kept (``POST
/choose``); the preference data (``monitor/preference_data.py``) reads them back as DPO pairs. Every query stays in
``monitor/store*.py``.

The rules are the feedback table's, for the same reason (one caller must not overwrite another's evidence): one
choice per (pair, client id), a repeat replacing it only under the key that wrote it (``ChoiceOfAnotherKey``
otherwise); a key may choose on a pair it made, or on any with the ``rater`` scope (``may_choose``).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Optional, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from monitor.store_schema import _stamp, _utc, choices, generations, pairs
from sdloop.errors import UserError


class UnknownPair(KeyError):
    """A choice names a pair id the store never recorded (the service answers 404)."""


class NotInPair(UserError):
    """A choice names a generation that is not one of the pair's two (the service answers 400)."""


class ChoiceOfAnotherKey(UserError):
    """A choice would replace a row another API key wrote (the service answers 409)."""


class _PairQueries:
    """Recording pairs and choices, and reading them back for the preference data."""

    engine: Engine
    dialect: str

    def create_pair(self, generation_ids: Sequence[str], api_key_id: Optional[int] = None,
                    created: Optional[dt.datetime] = None) -> str:
        """Record two logged generations of one request as a pair; return its id (32 hex characters)."""
        a, b = (str(g) for g in generation_ids)
        pid = uuid.uuid4().hex
        with self.engine.begin() as conn:
            conn.execute(pairs.insert().values(id=pid, created=_stamp(created), generation_a=a, generation_b=b,
                                               api_key_id=None if api_key_id is None else int(api_key_id)))
        return pid

    def get_pair(self, pair_id: str) -> Optional[dict[str, Any]]:
        """One pair by id ({id, created, generation_a, generation_b, api_key_id}), or None."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(pairs).where(pairs.c.id == str(pair_id))).mappings().first()
        return {**dict(row), "created": _utc(row["created"])} if row else None

    def may_choose(self, key: Any, pair: dict[str, Any]) -> bool:
        """The feedback rule for pairs: ``rater`` (or ``admin``) chooses on any pair; ``feedback`` on those its key
        made; any other key on none."""
        if key.allows("rater"):
            return True
        return key.allows("feedback") and pair.get("api_key_id") is not None \
            and int(pair["api_key_id"]) == int(key.id)

    def add_choice(self, pair_id: str, chosen: str, client_id: str, api_key_id: Optional[int] = None,
                   created: Optional[dt.datetime] = None) -> dict[str, Any]:
        """Store a client's choice of one of the pair's generations (a repeat under the same key replaces it).
        Returns the row with ``rejected`` (the other generation) and ``updated_existing``. Raises UnknownPair,
        NotInPair, or ChoiceOfAnotherKey. Committed before this returns."""
        now = _stamp(created)
        mine = (choices.c.pair_id == str(pair_id)) & (choices.c.client_id == client_id)
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        values = {"pair_id": str(pair_id), "client_id": client_id, "chosen": str(chosen), "created": now,
                  "updated": now, "api_key_id": None if api_key_id is None else int(api_key_id)}
        stmt = insert(choices).values(**values)
        same_key = choices.c.api_key_id.is_(None) if api_key_id is None else choices.c.api_key_id == int(api_key_id)
        stmt = stmt.on_conflict_do_update(index_elements=["pair_id", "client_id"], where=same_key,
                                          set_={k: stmt.excluded[k] for k in ("chosen", "updated")})
        refusal = (f"client {client_id!r} already chose on pair {pair_id} under another key; send another client "
                   "id.")
        with self.engine.begin() as conn:
            pair = conn.execute(sa.select(pairs).where(pairs.c.id == str(pair_id))).mappings().first()
            if pair is None:
                raise UnknownPair(pair_id)
            both = (pair["generation_a"], pair["generation_b"])
            if str(chosen) not in both:
                raise NotInPair(f"chosen {chosen!r} is not one of pair {pair_id}'s generations ({both[0]}, "
                                f"{both[1]}); send the generation_id of the image you kept.")
            before = conn.execute(sa.select(choices.c.id, choices.c.api_key_id).where(mine)).first()
            if before is not None and before.api_key_id != api_key_id:
                raise ChoiceOfAnotherKey(refusal)
            conn.execute(stmt)
            row = conn.execute(sa.select(choices).where(mine)).mappings().one()
        if row["api_key_id"] != api_key_id:  # another key's row appeared between the check and the upsert
            raise ChoiceOfAnotherKey(refusal)
        rejected = both[1] if row["chosen"] == both[0] else both[0]
        return {**dict(row), "created": _utc(row["created"]), "updated": _utc(row["updated"]),
                "rejected": rejected, "updated_existing": before is not None}

    def pair_choices(self, since: Optional[dt.datetime] = None) -> list[dict[str, Any]]:
        """Every choice on a pair created since ``since`` (all when None), oldest first: the choice (``choice_id``,
        ``client_id``, ``api_key_id``, ``chosen``), the pair (``pair_id``, ``generation_a``, ``generation_b``) and
        each side's prompt and stored image (``prompt_a``, ``image_a``, ``prompt_b``, ``image_b``; None when the
        generation is gone). What the DPO data is made of."""
        ga, gb = generations.alias("ga"), generations.alias("gb")
        q = (sa.select(choices.c.id.label("choice_id"), choices.c.client_id, choices.c.api_key_id, choices.c.chosen,
                       pairs.c.id.label("pair_id"), pairs.c.created, pairs.c.generation_a, pairs.c.generation_b,
                       ga.c.prompt.label("prompt_a"), ga.c.image_path.label("image_a"),
                       gb.c.prompt.label("prompt_b"), gb.c.image_path.label("image_b"))
             .select_from(choices.join(pairs, choices.c.pair_id == pairs.c.id)
                          .outerjoin(ga, ga.c.id == pairs.c.generation_a)
                          .outerjoin(gb, gb.c.id == pairs.c.generation_b))
             .order_by(choices.c.id))
        if since is not None:
            q = q.where(pairs.c.created >= since)
        with self.engine.begin() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        for r in rows:
            r["created"] = _utc(r["created"])
        return rows

    def count_choices(self, updated_since: Optional[dt.datetime] = None) -> int:
        """Choices written (or changed) since ``updated_since`` (all when None)."""
        q = sa.select(sa.func.count()).select_from(choices)
        if updated_since is not None:
            q = q.where(choices.c.updated >= updated_since)
        with self.engine.begin() as conn:
            return int(conn.execute(q).scalar())
