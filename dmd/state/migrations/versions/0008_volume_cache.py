"""A volume's cache (dm-cache or dm-writecache, on which device).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    op.add_column("volumes", sa.Column("cache_json", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("volumes", "cache_json")
