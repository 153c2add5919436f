"""Pools and their thin volumes.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("owner_uid", sa.Integer, nullable=False),
        sa.Column("block_sectors", sa.Integer, nullable=False),
        sa.Column("on_full", sa.String(16), nullable=False),
        sa.Column("low_water_percent", sa.Integer, nullable=False),
        sa.Column("transaction_id", sa.Integer, nullable=False),
        sa.Column("next_thin_id", sa.Integer, nullable=False),
        sa.Column("layout_json", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "volumes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False, unique=True),
        sa.Column("pool_id", sa.Integer, sa.ForeignKey("pools.id", ondelete="RESTRICT"),
                  nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("thin_id", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("origin_uuid", sa.String(36)),
        sa.Column("owner_uid", sa.Integer, nullable=False),
        sa.Column("labels_json", sa.Text, nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("pool_id", "name"),
        sa.UniqueConstraint("pool_id", "thin_id"),
    )


def downgrade() -> None:
    op.drop_table("volumes")
    op.drop_table("pools")
