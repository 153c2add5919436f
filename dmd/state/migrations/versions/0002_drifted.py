"""Remember drift: why a managed device's live table differs from its record.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("drifted", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("drifted")
