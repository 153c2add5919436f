"""Encrypted volumes on SimDM: the LUKS2 header and every key check are the
real cryptsetup's (on the simulated devices' backing files); only the
mapping is simulated. Data written through the cleartext device is read back
across Lock/Unlock, restarts and reboots; a crash at any step of an
encrypted create leaves nothing; the key is never in the database or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import DmError, keyring, luks
from dmd.engine.interface import Engine
from dmd.engine.luks import KdfSettings, Pbkdf
from dmd.engine.sim import SimDM
from dmd.service import errors
from dmd.service.auth import ROOT, Caller
from dmd.service.journal import VolumeCreateStep
from dmd.service.pools.crypt import (
    EncryptionRequest,
    KeyWaiter,
    change_key,
    lock,
    settle_at_start,
    unlock,
)
from dmd.service.pools.open import open_volume
from dmd.service.pools.service import PoolService
from tests.service.pools.kit import (
    DISKS,
    GIB,
    assert_agree,
    close,
    crash_at,
    open_pools,
    recovered,
    state,
)

KEY = b"correct horse battery staple"
OTHER = b"another key, for slot two"
# Cheap enough for tests; the default (argon2id benchmarked to 2 s) is what
# a volume gets when its creator does not choose.
FAST = KdfSettings(Pbkdf.ARGON2ID, memory_kib=32, iterations=4)
MIB = 1 << 20


def request(key: bytes = KEY, description: str | None = None) -> EncryptionRequest:
    return EncryptionRequest(bytearray(key), description, FAST)


async def write(pools: PoolService, name: str, data: bytes, offset: int = 0) -> None:
    fd = await open_volume(pools, "tank", name, "rw", caller=ROOT)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


async def digest(pools: PoolService, name: str, length: int, offset: int = 0) -> str:
    fd = await open_volume(pools, "tank", name, "r", caller=ROOT)
    try:
        return hashlib.sha256(os.pread(fd, length, offset)).hexdigest()
    finally:
        os.close(fd)


async def present(pools: PoolService, device: str) -> bool:
    try:
        await pools.kernel(Engine.device_info, device)
    except DmError:
        return False
    return True


async def header(pools: PoolService, device: str) -> luks.Header:
    fd = await pools.kernel(Engine.open_node, device, os.O_RDONLY)
    try:
        return await asyncio.to_thread(luks.dump, fd)
    finally:
        os.close(fd)


async def test_an_encrypted_volume_holds_data_across_lock_and_unlock(
        tank: PoolService) -> None:
    volume = await tank.create_volume("tank", "secret", GIB, encryption=request())
    assert volume.encryption is not None and volume.encryption.unlocked
    assert await present(tank, "tank-secret-crypt")
    # The volume's own device carries a real LUKS2 header, of the recorded UUID.
    assert (await header(tank, "tank-secret")).uuid == volume.encryption.luks_uuid
    data = os.urandom(MIB)
    await write(tank, "secret", data, 4096)
    await lock(tank, "tank", "secret")
    assert not await present(tank, "tank-secret-crypt")
    with pytest.raises(errors.Locked):
        await open_volume(tank, "tank", "secret", "r", caller=ROOT)
    with pytest.raises(errors.WrongKey):
        await unlock(tank, "tank", "secret", bytearray(OTHER))
    assert not await present(tank, "tank-secret-crypt")
    await unlock(tank, "tank", "secret", bytearray(KEY))
    assert await digest(tank, "secret", MIB, 4096) == hashlib.sha256(data).hexdigest()
    [record] = await tank.volumes("tank")
    assert record.encryption is not None and record.encryption.unlocked
    await assert_agree(tank)


async def test_lock_is_refused_while_the_cleartext_is_open(tank: PoolService) -> None:
    await tank.create_volume("tank", "held", GIB, encryption=request())
    engine: SimDM = tank.kernel.engine  # type: ignore[assignment]
    engine.open_device("tank-held-crypt")  # a mount, say (the lab holds a real fd)
    try:
        with pytest.raises(errors.Busy):
            await lock(tank, "tank", "held")
        with pytest.raises(errors.Busy):
            await tank.delete_volume("tank", "held")
    finally:
        engine.open_device("tank-held-crypt", -1)
    [record] = await tank.volumes("tank")
    assert record.encryption is not None and record.encryption.unlocked, \
        "a refused lock is recorded as not done"
    assert await present(tank, "tank-held-crypt")
    await tank.delete_volume("tank", "held")
    assert not await present(tank, "tank-held-crypt")
    await assert_agree(tank)


async def test_bad_requests_change_nothing(tank: PoolService) -> None:
    await tank.create_volume("tank", "plain", GIB)
    before = await state(tank)
    with pytest.raises(errors.InvalidArgument):
        await unlock(tank, "tank", "plain", bytearray(KEY))
    with pytest.raises(errors.InvalidArgument):
        await lock(tank, "tank", "plain")
    await tank.create_volume("tank", "enc", GIB, encryption=request())
    before = await state(tank)
    with pytest.raises(errors.NotAuthorized):
        await lock(tank, "tank", "enc", caller=Caller(uid=1000))
    with pytest.raises(errors.WrongKey):
        await change_key(tank, "tank", "enc", bytearray(OTHER), bytearray(KEY), kdf=FAST)
    with pytest.raises(errors.Busy, match="only key"):
        await change_key(tank, "tank", "enc", bytearray(KEY), None, remove=True)
    with pytest.raises(errors.InvalidArgument):
        await change_key(tank, "tank", "enc", bytearray(KEY), None)
    with pytest.raises(errors.Busy, match="Lock it"):
        await tank.resize_volume("tank", "enc", 2 * GIB)
    # No room for data past LUKS2's 16 MiB header: refused, not a failing job.
    with pytest.raises(errors.InvalidArgument, match="LUKS2 header"):
        await tank.create_volume("tank", "tiny", 16 << 20, encryption=request())
    assert await state(tank) == before
    assert (await header(tank, "tank-enc")).keyslots == (0,)


async def test_keys_are_added_and_removed(tank: PoolService) -> None:
    await tank.create_volume("tank", "v", GIB, encryption=request())
    await change_key(tank, "tank", "v", bytearray(KEY), bytearray(OTHER), kdf=FAST)
    assert (await header(tank, "tank-v")).keyslots == (0, 1)
    await change_key(tank, "tank", "v", bytearray(KEY), None, remove=True)
    assert (await header(tank, "tank-v")).keyslots == (1,)
    await lock(tank, "tank", "v")
    with pytest.raises(errors.WrongKey):
        await unlock(tank, "tank", "v", bytearray(KEY))
    await unlock(tank, "tank", "v", bytearray(OTHER))
    assert await present(tank, "tank-v-crypt")


async def test_a_snapshot_of_an_encrypted_volume_is_encrypted_and_locked(
        tank: PoolService) -> None:
    """(The simulator keeps no data in snapshots: that the origin's key opens
    the copy is a lab test.)"""
    origin = await tank.create_volume("tank", "origin", GIB, encryption=request())
    snap = await tank.snapshot("tank", "origin", "copy")
    assert origin.encryption is not None and snap.encryption is not None
    assert snap.encryption.luks_uuid == origin.encryption.luks_uuid
    assert not snap.encryption.unlocked
    assert not await present(tank, "tank-copy-crypt")
    await assert_agree(tank)


def reboot(tmp_path: Path) -> None:
    """Every device gone, as after a power cut (the disks stay)."""
    sim = SimDM(tmp_path / "kernel.json")
    while names := [d.name for d in sim.list_devices()]:
        for name in names:
            with contextlib.suppress(DmError):  # held by one removed later in this pass
                sim.device_remove(name)
    sim.close()


@pytest.fixture
def user_key() -> Any:
    """Adds keys to this process's user keyring, unlinked afterwards."""
    added: list[int] = []

    def add(description: str, payload: bytes) -> None:
        added.append(keyring.add_user_key(description, payload))

    yield add
    for serial in added:
        with contextlib.suppress(OSError):
            keyring.unlink_key(serial)


async def test_after_a_reboot_a_volume_waits_for_its_keyring_key(
        tmp_path: Path, user_key: Any) -> None:
    description = f"dmd-test:{os.getpid()}:{tmp_path.name}"
    user_key(description, KEY)
    pools = open_pools(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "auto", GIB, encryption=request(KEY, description))
    await pools.create_volume("tank", "manual", GIB, encryption=request())
    await pools.create_volume("tank", "shut", GIB, encryption=request())
    await lock(pools, "tank", "shut")
    data = os.urandom(MIB)
    await write(pools, "auto", data)
    close(pools)
    reboot(tmp_path)
    keyring.unlink_key(keyring.find_user_key(description) or 0)

    pools = await recovered(tmp_path)
    try:
        volumes = {v.name: v for v in await pools.volumes("tank")}
        assert pools.shown.waiting == {
            volumes["auto"].uuid: f"waiting for key {description!r} in the keyring",
            volumes["manual"].uuid: "waiting for a key: Unlock with one"}
        waiter = KeyWaiter(pools)
        await waiter.run_once()  # no key yet
        assert not await present(pools, "tank-auto-crypt")
        user_key(description, OTHER)  # the wrong one
        await waiter.run_once()
        assert "does not open it" in pools.shown.waiting[volumes["auto"].uuid]
        user_key(description, KEY)
        await waiter.run_once()
        assert volumes["auto"].uuid not in pools.shown.waiting
        assert await digest(pools, "auto", MIB) == hashlib.sha256(data).hexdigest()
        assert not await present(pools, "tank-manual-crypt")
        assert not await present(pools, "tank-shut-crypt")
        await unlock(pools, "tank", "manual", bytearray(KEY))
        assert pools.shown.waiting == {}
        await assert_agree(pools)
    finally:
        close(pools)


async def test_a_wrong_keyring_key_is_not_retried_until_it_changes(
        tmp_path: Path, user_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    description = f"dmd-test:{os.getpid()}:{tmp_path.name}"
    user_key(description, KEY)
    pools = open_pools(tmp_path)
    await pools.create_pool("tank", DISKS[:2])
    await pools.create_volume("tank", "v", GIB, encryption=request(KEY, description))
    close(pools)
    reboot(tmp_path)
    user_key(description, OTHER)
    pools = await recovered(tmp_path)
    tries: list[int] = []
    real = luks.open_mapping

    def counted(*args: Any) -> None:
        tries.append(1)
        real(*args)

    monkeypatch.setattr(luks, "open_mapping", counted)
    sim_open = SimDM.luks_open

    def sim_counted(self: SimDM, *args: Any) -> Any:
        tries.append(1)
        return sim_open(self, *args)

    monkeypatch.setattr(SimDM, "luks_open", sim_counted)
    try:
        waiter = KeyWaiter(pools)
        for _ in range(5):
            await waiter.run_once()
        assert len(tries) == 1, "a key that failed is tried again only once it changes"
    finally:
        close(pools)


def test_a_lock_cut_short_is_finished_at_start(tmp_path: Path) -> None:
    """Lock records "locked" first: a crash before the removal leaves the
    cleartext device, which start-up removes (no key stays in the kernel of
    a volume dmd shows locked)."""
    async def prepare() -> None:
        pools = open_pools(tmp_path)
        await pools.create_pool("tank", DISKS[:2])
        await pools.create_volume("tank", "v", GIB, encryption=request())
        [volume] = await pools.volumes("tank")
        assert volume.encryption is not None
        from dataclasses import replace
        await pools.store.pool_change("tank", update=replace(
            volume, encryption=replace(volume.encryption, unlocked=False)))
        close(pools)

    asyncio.run(prepare())

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert not await present(pools, "tank-v-crypt")
            assert pools.shown.waiting == {}
            await assert_agree(pools)
        finally:
            close(pools)

    asyncio.run(restart())


@pytest.mark.parametrize("step", [VolumeCreateStep.ENCRYPT, VolumeCreateStep.UNLOCK,
                                  VolumeCreateStep.FILESYSTEM])
def test_a_crash_during_an_encrypted_create_undoes_it(tmp_path: Path,
                                                      step: VolumeCreateStep) -> None:
    async def prepare() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            await pools.create_volume("tank", "kept", GIB, encryption=request())
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(prepare())
    crash_at(tmp_path, "volume-create", step, lambda pools: pools.create_volume(
        "tank", "half", GIB, filesystem="ext4", encryption=request()))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            after = await assert_agree(pools)
            assert after["volumes"] == before["volumes"]
            assert sorted(after["kernel"]) == sorted(before["kernel"])
            assert not await present(pools, "tank-half-crypt")
        finally:
            close(pools)

    asyncio.run(restart())


async def test_an_encrypted_volume_with_a_filesystem(tank: PoolService) -> None:
    await tank.create_volume("tank", "fs", GIB, filesystem="ext4", encryption=request())
    fd = await tank.kernel(Engine.open_node, "tank-fs-crypt", os.O_RDONLY)
    try:
        magic = os.pread(fd, 2, 1024 + 56)
    finally:
        os.close(fd)
    assert magic == b"\x53\xef", "ext4 is made on the cleartext device"
    assert (await header(tank, "tank-fs")).keyslots == (0,)


async def test_the_key_is_in_no_record_and_no_log(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    pools = open_pools(tmp_path)
    try:
        await pools.create_pool("tank", DISKS[:2])
        await pools.create_volume("tank", "v", GIB, encryption=request())
        await lock(pools, "tank", "v")
        await unlock(pools, "tank", "v", bytearray(KEY))
        with pytest.raises(errors.WrongKey):
            await change_key(pools, "tank", "v", bytearray(OTHER), bytearray(OTHER), kdf=FAST)
        await settle_at_start(pools, "tank")
    finally:
        close(pools)
    for path in tmp_path.rglob("*"):  # the database, the kernel model, the disks
        if path.is_file():
            content = path.read_bytes()
            assert KEY not in content and OTHER not in content, path
    assert KEY.decode() not in caplog.text and OTHER.decode() not in caplog.text


async def test_a_pool_with_unlocked_volumes_is_destroyed_whole(tank: PoolService) -> None:
    await tank.create_volume("tank", "a", GIB, encryption=request())
    await tank.create_volume("tank", "b", GIB, encryption=request())
    engine: SimDM = tank.kernel.engine  # type: ignore[assignment]
    engine.open_device("tank-b-crypt")
    with pytest.raises(errors.Busy, match="'b' is open"):
        await tank.destroy_pool("tank", force=True)
    engine.open_device("tank-b-crypt", -1)
    await tank.destroy_pool("tank", force=True)
    assert [d.name for d in engine.list_devices()] == []
    assert await tank.store.list_devices() == []


async def test_another_services_keys_and_volume_are_not_its_to_touch(
        tank: PoolService) -> None:
    """A uid allowed the volume action opens, locks, unlocks and re-keys its
    own encrypted volume only; another such uid gets NotAuthorized for each,
    and nothing changes."""
    from dmd.service.auth import Action

    class VolumesOnly:
        async def authorize(self, caller: Caller, action: Action, device: str) -> None:
            if action is not Action.VOLUME:
                raise errors.NotAuthorized("pools are for admins")

    tank.devices.authorizer = VolumesOnly()
    alice, bob = Caller(uid=1001), Caller(uid=1002)
    await tank.create_volume("tank", "secret", 64 * MIB, encryption=request(), caller=alice)
    before = await state(tank)
    for attempt in (lambda: lock(tank, "tank", "secret", caller=bob),
                    lambda: unlock(tank, "tank", "secret", bytearray(KEY), caller=bob),
                    lambda: change_key(tank, "tank", "secret", bytearray(KEY),
                                       bytearray(OTHER), kdf=FAST, caller=bob),
                    lambda: open_volume(tank, "tank", "secret", "r", caller=bob)):
        with pytest.raises(errors.NotAuthorized):
            await attempt()
    assert await state(tank) == before
    await lock(tank, "tank", "secret", caller=alice)
    with pytest.raises(errors.NotAuthorized):
        await unlock(tank, "tank", "secret", bytearray(KEY), caller=bob)
    await unlock(tank, "tank", "secret", bytearray(KEY), caller=alice)
