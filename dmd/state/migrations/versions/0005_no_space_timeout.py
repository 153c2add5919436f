"""How long a full pool's writes wait for space (on-full "queue").

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    # 60: the kernel's default, what pools made before this revision got.
    op.add_column("pools", sa.Column("no_space_timeout", sa.Integer, nullable=False,
                                     server_default="60"))


def downgrade() -> None:
    op.drop_column("pools", "no_space_timeout")
