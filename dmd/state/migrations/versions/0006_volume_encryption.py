"""A volume's encryption (its LUKS2 layer, how it is opened at start).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.add_column("volumes", sa.Column("encryption_json", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("volumes", "encryption_json")
