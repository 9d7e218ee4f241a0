"""Alembic environment: migrations run on a connection handed in by :meth:`Store.migrate`."""

from __future__ import annotations

from alembic import context

from skyport.server.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through skyport.server.store.engine.Store.migrate()")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
