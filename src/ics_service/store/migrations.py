"""Versioned migrations of the execution store, and applying them.

Each migration is fixed SQL per dialect, never built from the live tables of schema.py: a
shipped migration must keep building what it built, whatever the tables become later.
Add a migration; never edit one that has shipped. The store applies every one newer than
its recorded version, in order, so an upgrade never needs a wipe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import Connection, Engine, func, insert, inspect, select

from ..errors import StoreError
from ..types import utcnow
from . import schema
from .connection import lock_for_migration

log = logging.getLogger(__name__)

#: The table recording applied versions: created before any migration, if missing.
_VERSION_TABLE = {
    "sqlite": """
CREATE TABLE IF NOT EXISTS ics_schema_version (
	version INTEGER NOT NULL,
	applied_at DATETIME NOT NULL,
	PRIMARY KEY (version)
)""",
    "postgresql": """
CREATE TABLE IF NOT EXISTS ics_schema_version (
	version SERIAL NOT NULL,
	applied_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (version)
)""",
}

# Version 1, as SQLAlchemy 2.1's create_all emitted it from the first tables (frozen).
_V1_EXECUTIONS = """
CREATE TABLE ics_executions (
	id VARCHAR(64) NOT NULL,
	name VARCHAR(255),
	status VARCHAR(16) NOT NULL,
	params TEXT NOT NULL,
	model_name VARCHAR(128) NOT NULL,
	model_version VARCHAR(64) NOT NULL,
	threshold FLOAT NOT NULL,
	total INTEGER NOT NULL,
	succeeded INTEGER NOT NULL,
	low_confidence INTEGER NOT NULL,
	failed INTEGER NOT NULL,
	started_at {ts} NOT NULL,
	updated_at {ts} NOT NULL,
	finished_at {ts},
	error_type VARCHAR(128),
	error_message TEXT,
	owner VARCHAR(255),
	heartbeat_at {ts},
	cancel_requested BOOLEAN NOT NULL,
	items_listed BOOLEAN NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (name)
)"""
_V1_ITEMS = """
CREATE TABLE ics_items (
	execution_id VARCHAR(64) NOT NULL,
	seq INTEGER NOT NULL,
	uri TEXT NOT NULL,
	status VARCHAR(16),
	attempts INTEGER NOT NULL,
	result TEXT,
	finished_at {ts},
	PRIMARY KEY (execution_id, seq),
	FOREIGN KEY(execution_id) REFERENCES ics_executions (id)
)"""
_V1_EVENTS = """
CREATE TABLE ics_events (
	id {serial} NOT NULL,
	execution_id VARCHAR(64) NOT NULL,
	ts {ts} NOT NULL,
	type VARCHAR(64) NOT NULL,
	item_seq INTEGER,
	details TEXT,
	PRIMARY KEY (id),
	FOREIGN KEY(execution_id) REFERENCES ics_executions (id)
)"""
_V1_INDEXES = [
    "CREATE INDEX ix_ics_executions_started ON ics_executions (started_at)",
    "CREATE INDEX ix_ics_items_status ON ics_items (execution_id, status, seq)",
    "CREATE INDEX ix_ics_items_pending ON ics_items (execution_id, seq) WHERE status IS NULL",
    "CREATE INDEX ix_ics_items_done ON ics_items (execution_id, seq) WHERE status IS NOT NULL",
    "CREATE INDEX ix_ics_events_execution ON ics_events (execution_id, id)",
]
#: The only words of version 1's DDL that differ between the dialects.
_V1_TYPES = {
    "sqlite": {"ts": "DATETIME", "serial": "INTEGER"},
    "postgresql": {"ts": "TIMESTAMP WITH TIME ZONE", "serial": "SERIAL"},
}


def _v1(conn: Connection) -> None:
    words = _V1_TYPES[conn.dialect.name]
    for table in (_V1_EXECUTIONS, _V1_ITEMS, _V1_EVENTS):
        conn.exec_driver_sql(table.format(**words))
    for index in _V1_INDEXES:
        conn.exec_driver_sql(index)


#: A FAILED item's error type, read from its JSON result (the only place v1 kept it).
_V2_BACKFILL = {
    "sqlite": "substr(json_extract(result, '$.error.type'), 1, 128)",
    "postgresql": "substr(CAST(result AS json) -> 'error' ->> 'type', 1, 128)",
}


def _v2(conn: Connection) -> None:
    """ics_items.error_type, so failures can be counted by type without parsing results."""
    conn.exec_driver_sql("ALTER TABLE ics_items ADD COLUMN error_type VARCHAR(128)")
    # Only FAILED items carry an error; parsing their JSON alone keeps this cheap.
    conn.exec_driver_sql(
        f"UPDATE ics_items SET error_type = {_V2_BACKFILL[conn.dialect.name]} "
        "WHERE status = 'FAILED'"
    )


# Version 3: the alert outbox (subscriptions, alert documents, one delivery row per
# subscription), frozen like version 1.
_V3_SUBSCRIPTIONS = """
CREATE TABLE ics_subscriptions (
	id VARCHAR(64) NOT NULL,
	shown TEXT NOT NULL,
	spec TEXT NOT NULL,
	created_at {ts} NOT NULL,
	PRIMARY KEY (id)
)"""
_V3_ALERTS = """
CREATE TABLE ics_alerts (
	id VARCHAR(36) NOT NULL,
	execution_id VARCHAR(64),
	item_seq INTEGER,
	kind VARCHAR(32) NOT NULL,
	confidence FLOAT,
	created_at {ts} NOT NULL,
	document TEXT NOT NULL,
	PRIMARY KEY (id)
)"""
_V3_DELIVERIES = """
CREATE TABLE ics_deliveries (
	id {serial} NOT NULL,
	alert_id VARCHAR(36) NOT NULL,
	subscription_id VARCHAR(64) NOT NULL,
	status VARCHAR(16) NOT NULL,
	attempts INTEGER NOT NULL,
	created_at {ts} NOT NULL,
	next_at {ts} NOT NULL,
	lease_owner VARCHAR(255),
	lease_until {ts},
	sent_at {ts},
	last_error TEXT,
	rolled_into VARCHAR(36),
	PRIMARY KEY (id),
	FOREIGN KEY(alert_id) REFERENCES ics_alerts (id),
	FOREIGN KEY(subscription_id) REFERENCES ics_subscriptions (id)
)"""
_V3_INDEXES = [
    "CREATE INDEX ix_ics_alerts_execution ON ics_alerts (execution_id, created_at)",
    "CREATE INDEX ix_ics_alerts_created ON ics_alerts (created_at)",
    "CREATE INDEX ix_ics_deliveries_due ON ics_deliveries (status, next_at)",
    # sent_at too: a rate limit counts the recent sends of one subscription.
    "CREATE INDEX ix_ics_deliveries_subscription ON ics_deliveries "
    "(subscription_id, status, sent_at)",
    "CREATE INDEX ix_ics_deliveries_alert ON ics_deliveries (alert_id)",
]


def _v3(conn: Connection) -> None:
    """The alert outbox."""
    words = _V1_TYPES[conn.dialect.name]
    for table in (_V3_SUBSCRIPTIONS, _V3_ALERTS, _V3_DELIVERIES):
        conn.exec_driver_sql(table.format(**words))
    for index in _V3_INDEXES:
        conn.exec_driver_sql(index)


def _v4(conn: Connection) -> None:
    """ics_items.metadata: an item's manifest fields (JSON), kept so a resume has them."""
    conn.exec_driver_sql("ALTER TABLE ics_items ADD COLUMN metadata TEXT")


# Version 5: the state of watchers (`ics watch`, `POST /v1/events`), frozen.
_V5_WATCHERS = """
CREATE TABLE ics_watchers (
	name VARCHAR(255) NOT NULL,
	batches INTEGER NOT NULL,
	created_at {ts} NOT NULL,
	PRIMARY KEY (name)
)"""
_V5_WATCHED = """
CREATE TABLE ics_watched (
	watcher VARCHAR(255) NOT NULL,
	uri TEXT NOT NULL,
	version VARCHAR(255) NOT NULL,
	execution_id VARCHAR(64) NOT NULL,
	item_seq INTEGER NOT NULL,
	registered_at {ts} NOT NULL,
	PRIMARY KEY (watcher, uri, version),
	FOREIGN KEY(execution_id) REFERENCES ics_executions (id)
)"""
_V5_INDEXES = ["CREATE INDEX ix_ics_watched_execution ON ics_watched (execution_id)"]
_V5_TYPES = {"sqlite": {"ts": "DATETIME"}, "postgresql": {"ts": "TIMESTAMP WITH TIME ZONE"}}


def _v5(conn: Connection) -> None:
    """ics_watchers (a batch counter per watcher) and ics_watched (every object a watcher
    registered, with the execution and item it became): a watcher's exactly-once state."""
    words = _V5_TYPES[conn.dialect.name]
    for table in (_V5_WATCHERS, _V5_WATCHED):
        conn.exec_driver_sql(table.format(**words))
    for index in _V5_INDEXES:
        conn.exec_driver_sql(index)


#: Version 6: the index of resume's lookup of registered URIs, one fixed SQL text per
#: dialect shared with schema.py (which says why PostgreSQL's is over md5(uri)).
_V6_URI_INDEX = schema.ITEMS_URI_INDEX


def _v6(conn: Connection) -> None:
    """ix_ics_items_uri: which of a chunk of listed URIs an execution registered is a few
    index lookups, not a scan of all its items (a resume of a 1,000,000-item execution)."""
    conn.exec_driver_sql(_V6_URI_INDEX[conn.dialect.name])


def _v7(conn: Connection) -> None:
    """ics_watchers.owner and heartbeat_at: the process running a watcher now, so that
    `ics watch forget` refuses to forget the state of a watcher that runs."""
    ts = _V5_TYPES[conn.dialect.name]["ts"]
    conn.exec_driver_sql("ALTER TABLE ics_watchers ADD COLUMN owner VARCHAR(255)")
    conn.exec_driver_sql(f"ALTER TABLE ics_watchers ADD COLUMN heartbeat_at {ts}")


# Version 8: items' label and confidence as columns, and people's reviews (frozen).
_V8_BACKFILL = {
    "sqlite": "UPDATE ics_items SET label = substr(json_extract(result, '$.label'), 1, 255), "
    "confidence = json_extract(result, '$.confidence') WHERE result IS NOT NULL",
    "postgresql": "UPDATE ics_items SET label = left(result::json->>'label', 255), "
    "confidence = (result::json->>'confidence')::float WHERE result IS NOT NULL",
}
_V8_REVIEWS = """
CREATE TABLE ics_reviews (
	execution_id VARCHAR(64) NOT NULL,
	item_seq INTEGER NOT NULL,
	verdict VARCHAR(16) NOT NULL,
	label VARCHAR(255),
	label_index INTEGER,
	reviewer VARCHAR(255) NOT NULL,
	reviewed_at {ts} NOT NULL,
	PRIMARY KEY (execution_id, item_seq),
	FOREIGN KEY(execution_id, item_seq) REFERENCES ics_items (execution_id, seq)
)"""
_V8_INDEXES = [
    "CREATE INDEX ix_ics_items_confidence ON ics_items (status, confidence)",
    "CREATE INDEX ix_ics_reviews_reviewed ON ics_reviews (reviewed_at)",
]


def _v8(conn: Connection) -> None:
    """ics_items.label and .confidence (filled from the recorded results) with an index on
    (status, confidence): the console's filters and its review queue, least confident
    first, read columns instead of every result's JSON; and ics_reviews, one answer per
    item."""
    conn.exec_driver_sql("ALTER TABLE ics_items ADD COLUMN label VARCHAR(255)")
    conn.exec_driver_sql("ALTER TABLE ics_items ADD COLUMN confidence FLOAT")
    conn.exec_driver_sql(_V8_BACKFILL[conn.dialect.name])
    conn.exec_driver_sql(_V8_REVIEWS.format(**_V5_TYPES[conn.dialect.name]))
    for index in _V8_INDEXES:
        conn.exec_driver_sql(index)


#: (version, migration) in order. The last version is the schema this code expects.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _v1),
    (2, _v2),
    (3, _v3),
    (4, _v4),
    (5, _v5),
    (6, _v6),
    (7, _v7),
    (8, _v8),
]
LATEST = MIGRATIONS[-1][0]


def migrate(engine: Engine, shown_url: str, *, create: bool = True) -> None:
    """Apply the migrations newer than the store's version, all in one transaction.

    The usual case (up to date) only reads. Otherwise the migrating transaction first
    takes a lock, so stores opened at once on a new database queue instead of racing on
    the DDL, and a migration that fails leaves the store exactly as it was. With
    create=False a database holding no store yet is refused, not given the tables.
    """
    with engine.connect() as conn:
        current = stored_version(conn)
    if current == LATEST:
        return
    if current == 0 and not create:
        raise StoreError(
            f"no execution store in {shown_url}: nothing has run with this store yet "
            "(or --store/ICS_STORE points elsewhere)"
        )
    _refuse_newer(current, shown_url)
    applied = []
    with engine.begin() as conn:
        lock_for_migration(conn)
        conn.exec_driver_sql(_VERSION_TABLE[conn.dialect.name])
        current = stored_version(conn)
        _refuse_newer(current, shown_url)
        for version, migration in MIGRATIONS:
            if version <= current:
                continue
            migration(conn)
            conn.execute(insert(schema.schema_version).values(version=version, applied_at=utcnow()))
            applied.append(version)
    for version in applied:
        log.info("store %s migrated to schema version %d", shown_url, version)


def stored_version(conn: Connection) -> int:
    """The store's schema version; 0 for a new database."""
    if not inspect(conn).has_table(schema.schema_version.name):
        return 0
    return int(conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0)


def _refuse_newer(current: int, shown_url: str) -> None:
    if current > LATEST:
        raise StoreError(
            f"the store {shown_url} has schema version {current}, newer than this "
            f"ICS understands ({LATEST}); upgrade ICS"
        )
