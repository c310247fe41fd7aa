"""The execution store: executions, their items' results and their history, over SQLAlchemy.

One code path serves SQLite (the embedded default, a file in WAL mode so several processes
can share it) and PostgreSQL. Modules, by job: `connection` (URLs, engines, dialects,
database errors as StoreErrors), `schema` (the tables the queries use), `migrations`
(fixed DDL per version, and applying it), `rows` (rows as domain records), `store`
(the Store) and `outbox` (alerts and their deliveries, written with the results).
"""

from __future__ import annotations

from .rows import Event
from .store import Store, new_execution_id

__all__ = ["Event", "Store", "new_execution_id"]
