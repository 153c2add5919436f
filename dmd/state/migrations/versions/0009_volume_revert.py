"""A revert scheduled for a volume (Volume.Revert while its device is open).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    op.add_column("volumes", sa.Column("revert_json", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("volumes", "revert_json")
