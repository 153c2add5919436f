"""mkfs on a new volume: told that a plain volume reads zeros, so its inode
tables are marked zeroed and nothing writes them later; not through dm-crypt."""

from __future__ import annotations

import os
import re
import subprocess

from dmd.engine.interface import Engine
from dmd.service.pools.service import PoolService
from tests.service.pools.test_volume_encryption import request

GIB = 1 << 30


async def inode_tables(pools: PoolService, device: str) -> tuple[int, int]:
    """(block groups, those whose inode table mke2fs marked zeroed)."""
    fd = await pools.kernel(Engine.open_node, device, os.O_RDONLY)
    try:
        out = subprocess.run(["dumpe2fs", f"/dev/fd/{fd}"], pass_fds=(fd,), check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.close(fd)
    groups = re.findall(r"^Group \d+: .*$", out, re.MULTILINE)
    return len(groups), sum("ITABLE_ZEROED" in group for group in groups)


async def test_a_plain_volumes_inode_tables_are_never_written(tank: PoolService) -> None:
    await tank.create_volume("tank", "thin", GIB, filesystem="ext4")
    groups, zeroed = await inode_tables(tank, "tank-thin")
    assert groups == zeroed == 8


async def test_through_dm_crypt_mkfs_assumes_nothing(tank: PoolService) -> None:
    await tank.create_volume("tank", "sealed", GIB, filesystem="ext4", encryption=request())
    groups, zeroed = await inode_tables(tank, "tank-sealed-crypt")
    # mke2fs zeroes group 0's table itself; the kernel does the rest once mounted
    assert groups == 8 and zeroed < groups
