"""Alembic environment: dmd runs migrations in-process on its own connection."""

from __future__ import annotations

from alembic import context

from dmd.state.models import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,  # SQLite cannot ALTER most things: copy-and-move tables
)
with context.begin_transaction():
    context.run_migrations()
