"""Thick volumes: no thin id, their segments of the pool's devices.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    # SQLite changes a column's nullability by copying the table.
    with op.batch_alter_table("volumes") as batch:
        batch.alter_column("thin_id", existing_type=sa.Integer, nullable=True)
        batch.add_column(sa.Column("thick_json", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("volumes") as batch:
        batch.drop_column("thick_json")
        batch.alter_column("thin_id", existing_type=sa.Integer, nullable=False)
