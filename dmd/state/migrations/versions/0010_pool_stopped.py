"""A pool stopped (Pool.Stop): its devices removed, its records kept.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.add_column("pools", sa.Column("stopped", sa.Boolean, nullable=False,
                                     server_default="0"))


def downgrade() -> None:
    op.drop_column("pools", "stopped")
