"""The pool fixtures of the service tests: ``pools``, a fresh pool service
(no pool yet), and ``tank``, that service with pool "tank" over two disks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dmd.service.pools.service import PoolService
from tests.service.pools.kit import DISKS, close, open_pools


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[PoolService]:
    svc = open_pools(tmp_path)
    yield svc
    close(svc)


@pytest.fixture
async def tank(pools: PoolService) -> PoolService:
    await pools.create_pool("tank", DISKS[:2])
    return pools
