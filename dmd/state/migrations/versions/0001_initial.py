"""The first schema: managed devices, their labels, the intent journal.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(127), nullable=False, unique=True),
        sa.Column("uuid", sa.String(128), unique=True),
        sa.Column("table_json", sa.Text, nullable=False),
        sa.Column("read_only", sa.Boolean, nullable=False),
        sa.Column("owner_uid", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("persistent", sa.Boolean, nullable=False),
        sa.Column("key_withheld", sa.Boolean, nullable=False),
    )
    op.create_table(
        "labels",
        sa.Column("device_id", sa.Integer, sa.ForeignKey("devices.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "intents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("device", sa.String(127), nullable=False),
        sa.Column("args_json", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime),
    )
    op.create_index("ix_intents_state", "intents", ["state"])


def downgrade() -> None:
    op.drop_table("intents")
    op.drop_table("labels")
    op.drop_table("devices")
