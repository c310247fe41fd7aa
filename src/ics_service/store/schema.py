"""Tables of the execution store, as the queries see them (the latest schema version).

These definitions never create anything: migrations.py builds the schema with fixed SQL,
and a test checks that these tables match what the migrations build. Change both at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    DDL,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    event,
)

metadata = MetaData()

schema_version = Table(
    "ics_schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

executions = Table(
    "ics_executions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(255), unique=True, nullable=True),
    Column("status", String(16), nullable=False),
    Column("params", Text, nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("threshold", Float, nullable=False),
    Column("total", Integer, nullable=False, default=0),
    Column("succeeded", Integer, nullable=False, default=0),
    Column("low_confidence", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("error_type", String(128), nullable=True),
    Column("error_message", Text, nullable=True),
    # Which process runs it ("host:pid") and when it last said so; resume and cancel use
    # these to tell a live execution from one whose process died.
    Column("owner", String(255), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # True once every item of the sources is registered (a crash while listing is resumable).
    Column("items_listed", Boolean, nullable=False, default=False),
)
Index("ix_ics_executions_started", executions.c.started_at)

items = Table(
    "ics_items",
    metadata,
    Column("execution_id", String(64), ForeignKey("ics_executions.id"), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("uri", Text, nullable=False),
    # NULL until the item has its one final result.
    Column("status", String(16), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("result", Text, nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # Added by migration 2 (hence last): a FAILED item's error type, to count failures.
    Column("error_type", String(128), nullable=True),
    # Added by migration 4: the item's manifest fields besides its URI, as JSON text.
    Column("metadata", Text, nullable=True),
    # Added by migration 8: the result's label and confidence, for filters, sorting and
    # the review queue (least confident first) without reading every result's JSON.
    Column("label", String(255), nullable=True),
    Column("confidence", Float, nullable=True),
)
Index("ix_ics_items_status", items.c.execution_id, items.c.status, items.c.seq)
Index("ix_ics_items_confidence", items.c.status, items.c.confidence)
#: The index of resume's lookup of registered URIs (`Store.registered_uris`), per dialect.
#: PostgreSQL indexes an MD5 of the URI: a btree entry holds at most about 2,700 bytes,
#: which a long URL (a presigned query string) can pass, and an insert would then fail.
#: Migration 6 runs this SQL as it is, so it is fixed text: never edit it (a changed index
#: is a new migration). The tables created here get it too, so that both dialects' tables
#: match what the migrations build.
ITEMS_URI_INDEX = {
    "sqlite": "CREATE INDEX ix_ics_items_uri ON ics_items (execution_id, uri)",
    "postgresql": "CREATE INDEX ix_ics_items_uri ON ics_items (execution_id, md5(uri))",
}
for _dialect, _ddl in ITEMS_URI_INDEX.items():
    event.listen(items, "after_create", DDL(_ddl).execute_if(dialect=_dialect))  # type: ignore[no-untyped-call]


# Pending items and recorded results, each in seq order: PostgreSQL cannot read
# ix_ics_items_status in seq order under `status IS NULL` (or IS NOT NULL), and with
# statistics lagging behind a big batch it sorted every remaining row for each page.
# Declared when these tables are created (only the tests create them): a `*_where` option
# imports its dialect, and the PostgreSQL one cost every command on a SQLite store 20 ms.
@event.listens_for(items, "before_create")
def _partial_indexes(table: Table, *_args: Any, **_kw: Any) -> None:
    declared = {index.name for index in table.indexes}
    for name, where in [
        ("ix_ics_items_pending", table.c.status.is_(None)),
        ("ix_ics_items_done", table.c.status.is_not(None)),
    ]:
        if name not in declared:
            Index(
                name, table.c.execution_id, table.c.seq, postgresql_where=where, sqlite_where=where
            )


# Added by migration 8: people's answers about items (the console's review queue): the
# model's label accepted, another label, or none of the model's; one per item.
reviews = Table(
    "ics_reviews",
    metadata,
    Column("execution_id", String(64), primary_key=True),
    Column("item_seq", Integer, primary_key=True, autoincrement=False),
    Column("verdict", String(16), nullable=False),
    Column("label", String(255), nullable=True),
    Column("label_index", Integer, nullable=True),
    Column("reviewer", String(255), nullable=False),
    Column("reviewed_at", DateTime(timezone=True), nullable=False),
    ForeignKeyConstraint(["execution_id", "item_seq"], ["ics_items.execution_id", "ics_items.seq"]),
)
Index("ix_ics_reviews_reviewed", reviews.c.reviewed_at)

events = Table(
    "ics_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("execution_id", String(64), ForeignKey("ics_executions.id"), nullable=False),
    Column("ts", DateTime(timezone=True), nullable=False),
    Column("type", String(64), nullable=False),
    Column("item_seq", Integer, nullable=True),
    Column("details", Text, nullable=True),
)
Index("ix_ics_events_execution", events.c.execution_id, events.c.id)

# Added by migration 3: the alert outbox. The store keeps documents and delivery rows; what
# a subscription's spec means is the alerts package's business.
subscriptions = Table(
    "ics_subscriptions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("shown", Text, nullable=False),
    Column("spec", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

alerts = Table(
    "ics_alerts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("execution_id", String(64), nullable=True),
    Column("item_seq", Integer, nullable=True),
    Column("kind", String(32), nullable=False),
    Column("confidence", Float, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("document", Text, nullable=False),
)
Index("ix_ics_alerts_execution", alerts.c.execution_id, alerts.c.created_at)
Index("ix_ics_alerts_created", alerts.c.created_at)

deliveries = Table(
    "ics_deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alert_id", String(36), ForeignKey("ics_alerts.id"), nullable=False),
    Column("subscription_id", String(64), ForeignKey("ics_subscriptions.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_at", DateTime(timezone=True), nullable=False),
    # A dispatcher that is sending it ("host:pid") and until when: others leave it alone.
    Column("lease_owner", String(255), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    # The digest or "suppressed" notice that carries it instead (HELD/SUPPRESSED rows).
    Column("rolled_into", String(36), nullable=True),
)
Index("ix_ics_deliveries_due", deliveries.c.status, deliveries.c.next_at)
Index(
    "ix_ics_deliveries_subscription",
    deliveries.c.subscription_id,
    deliveries.c.status,
    deliveries.c.sent_at,
)
Index("ix_ics_deliveries_alert", deliveries.c.alert_id)

# Added by migration 5: what watchers (`ics watch`, `POST /v1/events`) have registered.
watchers = Table(
    "ics_watchers",
    metadata,
    Column("name", String(255), primary_key=True),
    # Micro-batches started so far: the next one's number (its execution name) comes from it.
    Column("batches", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Added by migration 7: the process running the watcher (NULL when none) and its
    # last heartbeat.
    Column("owner", String(255), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),
)

watched = Table(
    "ics_watched",
    metadata,
    Column("watcher", String(255), primary_key=True),
    Column("uri", Text, primary_key=True),
    # What tells one state of the object from another (size and mtime, or an ETag).
    Column("version", String(255), primary_key=True),
    Column("execution_id", String(64), ForeignKey("ics_executions.id"), nullable=False),
    Column("item_seq", Integer, nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
)
Index("ix_ics_watched_execution", watched.c.execution_id)
