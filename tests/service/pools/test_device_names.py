"""Names and the device names dmd makes of them: no two different lists of
parts make the same device name, no volume name makes a pool's own device's
name, and the names people use (with "-") are taken, end to end on SimDM."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmd.service import errors
from dmd.service.pools.names import (
    DM_NAME_MAX,
    PoolName,
    PoolPart,
    VolumeName,
    VolumePart,
    check_cleartext,
    join,
    legacy_name,
    parts,
    pool_devices,
    volume_device,
)
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import DISKS, GIB, close, open_pools

NAMES = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9_.+-]{0,10}[A-Za-z0-9])?", fullmatch=True)
WORDS = st.sampled_from([*PoolPart, *VolumePart]).map(str)


@given(st.lists(NAMES | WORDS, min_size=1, max_size=4))
def test_a_device_name_splits_back_into_its_parts(split: list[str]) -> None:
    assert parts(join(*split)) == split


@given(st.lists(NAMES | WORDS, min_size=1, max_size=4),
       st.lists(NAMES | WORDS, min_size=1, max_size=4))
def test_different_parts_never_make_the_same_name(a: list[str], b: list[str]) -> None:
    if a != b:
        assert join(*a) != join(*b)


@given(NAMES, NAMES)
def test_no_volume_is_named_as_a_pools_own_device(pool: str, volume: str) -> None:
    try:
        name = VolumeName(volume)
    except errors.InvalidArgument:
        assert volume in {str(p) for p in PoolPart}
        return
    assert volume_device(pool, name) not in pool_devices(pool)


@pytest.mark.parametrize("bad", [
    "", "-a", "a-", ".", "..", "a\n", "a/b", "a b", "é", "a" * 65, "tdata", "tmeta", "tpool",
    1, None, b"ab",
])
def test_bad_volume_names_are_refused(bad: object) -> None:
    with pytest.raises(errors.InvalidArgument):
        VolumeName(bad)


def test_a_name_that_makes_too_long_a_device_name_is_refused() -> None:
    pool = PoolName("p" * 64)
    with pytest.raises(errors.InvalidArgument, match="characters"):
        VolumeName("v" * 64, pool)
    longest = VolumeName("v" * (DM_NAME_MAX - 64 - 1 - len("-corig")), pool)
    assert len(join(pool, longest, VolumePart.CORIG)) == DM_NAME_MAX


async def test_names_with_dashes_and_pools_that_share_a_prefix(tmp_path: Path) -> None:
    pools: PoolService = open_pools(tmp_path)
    try:
        await pools.create_pool("a", DISKS[:1])
        await pools.create_pool("a-b", DISKS[1:2])
        await pools.create_volume("a", "web-data", GIB)
        await pools.create_volume("a-b", "web", GIB)
        names = {d.name for d in pools.kernel.engine.list_devices()}  # type: ignore[attr-defined]
        assert {"a-web--data", "a--b-web", "a--b-tpool", "a-tpool"} <= names
        # Pool a's calls may not touch pool a-b's devices, and the other way.
        with pytest.raises(errors.Busy):
            await pools.devices.remove("a--b-web", claim=pools.owner("a"))
        await pools.delete_volume("a", "web-data")
        await pools.destroy_pool("a")
        names = {d.name for d in pools.kernel.engine.list_devices()}  # type: ignore[attr-defined]
        assert names == {"a--b-web", "a--b-tpool", "a--b-tdata", "a--b-tmeta"}
        assert [v.name for v in await pools.volumes("a-b")] == ["web"]
    finally:
        close(pools)


def test_a_pool_name_whose_devices_the_kernel_refuses_is_refused() -> None:
    with pytest.raises(errors.InvalidArgument, match="characters"):
        PoolName("a" + "-" * 62 + "a")  # doubled: 126 before "-tpool"
    assert PoolName("a" * 64) == "a" * 64


def test_an_encrypted_volumes_name_fits_cryptsetups_dm_uuid() -> None:
    check_cleartext("tank", "v" * 60)
    with pytest.raises(errors.InvalidArgument, match="cleartext"):
        check_cleartext("p" * 30, "v" * 60)


@pytest.mark.parametrize("name", ["_scratch", "data.", "+x", "web_1"])
def test_an_older_dmds_names_are_read_back_from_a_description(name: str) -> None:
    """ImportPool is how a pool comes back: names an older dmd took (no
    "-" then) still are, except a pool's own device parts."""
    assert legacy_name(name, "volume", "tank") == name
    assert legacy_name(name, "pool") == name
    with pytest.raises(errors.InvalidArgument):
        legacy_name("tdata", "volume", "tank")
    with pytest.raises(errors.InvalidArgument):
        legacy_name("x\n", "volume", "tank")
