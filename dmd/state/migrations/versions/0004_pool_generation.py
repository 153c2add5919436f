"""The generation of a pool's records, matched by its on-device description.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    # 0: no description written yet (dmd writes one at start-up).
    op.add_column("pools", sa.Column("generation", sa.Integer, nullable=False,
                                     server_default="0"))


def downgrade() -> None:
    op.drop_column("pools", "generation")
