"""The monitoring store's schema: its tables, the ordered migrations that build them, and how times are stored.

Part of ``monitor.store`` (split out to keep each module readable): only the store's modules (``monitor/store*.py``)
import these tables; every other module goes through ``monitor.store.Store``'s named methods, so every query of the
monitoring database is in one place (a test checks it).

A column added by a later migration is declared on its table with ``info={"since": N}`` so the queries can name it,
and ``_create`` builds a table as the migration that first made it did (without the later columns): version 1 run
today creates exactly what version 1 created in its release, and the migration that adds the column adds it to old
and new databases alike.
"""

from __future__ import annotations

import datetime as dt
from typing import Callable, Optional

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.schema import CreateIndex, CreateTable

metadata = sa.MetaData()

generations = sa.Table(
    "generations", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("negative_prompt", sa.Text, nullable=False, default=""),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("model_version", sa.String(200), nullable=False, index=True),
    sa.Column("latency_s", sa.Float, nullable=False),
    sa.Column("descriptors", sa.JSON, nullable=False),
    sa.Column("image_path", sa.Text, nullable=True),
    # version 4: the API key that asked for it (NULL: keys were off, or a row from before version 4)
    sa.Column("api_key_id", sa.Integer, nullable=True, info={"since": 4}),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("generation_id", sa.String(36), sa.ForeignKey("generations.id", ondelete="CASCADE"), nullable=False),
    sa.Column("client_id", sa.String(200), nullable=False),
    sa.Column("rating", sa.Integer, nullable=True),
    sa.Column("thumbs", sa.Integer, nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, index=True),
    # version 4: the API key that sent it (NULL: keys were off, or a row from before version 4)
    sa.Column("api_key_id", sa.Integer, nullable=True, info={"since": 4}),
    sa.UniqueConstraint("generation_id", "client_id", name="uq_feedback_generation_client"),
)


# Version 3: what the monitoring loop adds. Failed requests (the error rate), the frozen reference window of each
# champion, the retraining log (one row per retraining, one per step) and the scheduler's job results.
failures = sa.Table(
    "failures", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("endpoint", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(100), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("model_version", sa.String(200), nullable=True),
)

reference_windows = sa.Table(
    "reference_windows", metadata,
    sa.Column("champion", sa.String(200), primary_key=True),
    sa.Column("since", sa.DateTime(timezone=True), nullable=False),
    sa.Column("until", sa.DateTime(timezone=True), nullable=False),
    sa.Column("frozen", sa.DateTime(timezone=True), nullable=False),
    sa.Column("how", sa.Text, nullable=False),
)

retrains = sa.Table(
    "retrains", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("trigger", sa.String(100), nullable=False),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("champion", sa.String(200), nullable=True),
    sa.Column("challenger", sa.String(200), nullable=True),
    sa.Column("run_dir", sa.Text, nullable=True),
    sa.Column("reasons", sa.JSON, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
)

retrain_steps = sa.Table(
    "retrain_steps", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("retrain_id", sa.String(36), sa.ForeignKey("retrains.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("step", sa.String(50), nullable=False),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("detail", sa.JSON, nullable=False),
)

job_runs = sa.Table(
    "job_runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(100), nullable=False, index=True),
    sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished", sa.DateTime(timezone=True), nullable=True),
    sa.Column("status", sa.String(30), nullable=False),
    sa.Column("summary", sa.JSON, nullable=False),
)


# Version 4: API keys. Only the SHA-256 of a key is kept (see monitor/store_keys.py); keys are revoked, never
# deleted, so an ``api_key_id`` in the generation log always names a row here and a name is never reused.
api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("rate_limit_per_min", sa.Integer, nullable=True),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked", sa.DateTime(timezone=True), nullable=True),
)


# Version 5: generations run as jobs (bento/jobs.py), shared by every worker and replica: a submit lands on one worker,
# its status, result and cancel on any. ``updated`` is the heartbeat (the worker that owns a queued or running job
# touches it); ``result`` holds the finished answer (base64 PNGs and generation ids) until the TTL purges the row.
jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(32), primary_key=True, info={"since": 5}),
    sa.Column("api_key_id", sa.Integer, nullable=True, info={"since": 5}),
    sa.Column("state", sa.String(20), nullable=False, info={"since": 5}),
    sa.Column("step", sa.Integer, nullable=False, info={"since": 5}),
    sa.Column("steps", sa.Integer, nullable=False, info={"since": 5}),
    sa.Column("request", sa.JSON, nullable=False, info={"since": 5}),
    sa.Column("model_version", sa.String(200), nullable=True, info={"since": 5}),
    sa.Column("error", sa.Text, nullable=True, info={"since": 5}),
    sa.Column("result", sa.JSON, nullable=True, info={"since": 5}),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, info={"since": 5}),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, index=True, info={"since": 5}),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, info={"since": 5}),
    sa.Column("worker", sa.String(200), nullable=True, info={"since": 5}),
)


# Version 6: two-candidate generations and the caller's choice between them (bento/pairs.py): the preference pairs
# a DPO retraining learns from. A pair is two generations of one request (one prompt, two seeds); a choice is one
# rater's pick of one of them, one row per (pair, client id), a repeat replacing it under the same key only.
pairs = sa.Table(
    "pairs", metadata,
    sa.Column("id", sa.String(32), primary_key=True, info={"since": 6}),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, index=True, info={"since": 6}),
    sa.Column("generation_a", sa.String(36), sa.ForeignKey("generations.id", ondelete="CASCADE"), nullable=False,
              info={"since": 6}),
    sa.Column("generation_b", sa.String(36), sa.ForeignKey("generations.id", ondelete="CASCADE"), nullable=False,
              info={"since": 6}),
    sa.Column("api_key_id", sa.Integer, nullable=True, info={"since": 6}),
)

choices = sa.Table(
    "choices", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True, info={"since": 6}),
    sa.Column("pair_id", sa.String(32), sa.ForeignKey("pairs.id", ondelete="CASCADE"), nullable=False,
              info={"since": 6}),
    sa.Column("client_id", sa.String(200), nullable=False, info={"since": 6}),
    sa.Column("chosen", sa.String(36), nullable=False, info={"since": 6}),
    sa.Column("api_key_id", sa.Integer, nullable=True, info={"since": 6}),
    sa.Column("created", sa.DateTime(timezone=True), nullable=False, info={"since": 6}),
    sa.Column("updated", sa.DateTime(timezone=True), nullable=False, index=True, info={"since": 6}),
    sa.UniqueConstraint("pair_id", "client_id", name="uq_choices_pair_client"),
)


def _since(column: sa.Column) -> int:
    return int(column.info.get("since", 1))


def _create(conn: Connection, table: sa.Table, version: int) -> None:
    """Create ``table`` as schema version ``version`` had it: only its columns (and indexes) of that version or
    older, so a migration run today builds what it built in its own release."""
    ddl = CreateTable(table)
    ddl.columns = [c for c in ddl.columns if _since(c.element) <= version]
    conn.execute(ddl)
    for index in sorted(table.indexes, key=lambda i: str(i.name)):
        if all(_since(c) <= version for c in index.columns):
            conn.execute(CreateIndex(index))


def _v1(conn: Connection) -> None:
    """Version 1: the generation log and the feedback table."""
    _create(conn, generations, 1)
    _create(conn, feedback, 1)


def _v2(conn: Connection) -> None:
    """Version 2: an index for the monitor's per-generation feedback joins (plain DDL: a migration must not change
    the module's Table objects, or version 1 would create it too)."""
    conn.execute(sa.text("CREATE INDEX ix_feedback_generation ON feedback (generation_id)"))


def _v3(conn: Connection) -> None:
    """Version 3: failed requests, frozen reference windows, the retraining log and the scheduler's job results."""
    for table in (failures, reference_windows, retrains, retrain_steps, job_runs):
        _create(conn, table, 3)


def _v4(conn: Connection) -> None:
    """Version 4: API keys (stored hashed), and the key behind each generation and feedback row (NULL for rows
    written without keys). Plain ``ADD COLUMN`` of a nullable column: instant on both backends, rows kept."""
    _create(conn, api_keys, 4)
    for table in (generations, feedback):
        conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN api_key_id INTEGER"))


def _v5(conn: Connection) -> None:
    """Version 5: the jobs table (long generations: submit, progress, result, cancel). A new table only: the rows
    of versions 1 to 4 are untouched."""
    _create(conn, jobs, 5)


def _v6(conn: Connection) -> None:
    """Version 6: two-candidate pairs and the choices between them (new tables only: older rows untouched)."""
    _create(conn, pairs, 6)
    _create(conn, choices, 6)


# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Append, never edit an applied one (``_create``
# keeps what each one builds as it was).
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6]
SCHEMA_VERSION = len(MIGRATIONS)

_versions = sa.Table("schema_version", sa.MetaData(),
                     sa.Column("version", sa.Integer, primary_key=True),
                     sa.Column("applied", sa.DateTime(timezone=True), nullable=False))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _stamp(value: Optional[dt.datetime]) -> dt.datetime:
    """A timestamp to store: now, or ``value`` in UTC (sqlite keeps the wall-clock time and drops the offset)."""
    if value is None:
        return _now()
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _utc(value: Optional[dt.datetime]) -> Optional[dt.datetime]:
    """sqlite returns naive datetimes (we wrote UTC); PostgreSQL returns aware ones."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)
