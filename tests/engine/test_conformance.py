"""One behaviour suite for every engine: SimDM (in memory and file-backed) on the
host, and the real kernel through DM inside the lab.

A test here states what the kernel does; where SimDM disagrees, SimDM is wrong.
Every device is named dmdtest-* so the kernel fixtures can clean up after a
failure. No test here clears a table and then renames (see docs/kernel-lab.md).
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmd.engine import (
    DM,
    MAX_DEVICE_SECTORS,
    DevId,
    DmError,
    DmFlags,
    InvalidArgument,
    MetadataCheck,
    TargetLine,
    ThinToolError,
)
from dmd.engine.sim import SimDM
from dmd.engine.udevsync import UdevSync, UdevWait

P = "dmdtest-"
Engine = Any  # DM or SimDM: the same interface


@pytest.fixture(params=["sim", "sim-file", pytest.param("kernel", marks=pytest.mark.kernel)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "kernel":
        yield request.getfixturevalue("clean_dm")
    elif request.param == "sim-file":
        yield SimDM(tmp_path / "kernel.json")
    else:
        yield SimDM()


@pytest.fixture
def disk(engine: Engine, request: pytest.FixtureRequest) -> Callable[[int], str]:
    """``disk(size_mib)``: a backing block device path the engine can map."""
    counter = itertools.count(10)
    if isinstance(engine, DM):
        loop: Callable[[int], str] = request.getfixturevalue("loop_device")
        return loop

    def make(size_mib: int = 16) -> str:
        n = next(counter)
        path = f"/dev/simdisk{n}"
        engine.add_disk(path, 7, n, size_mib * 2048)
        return path

    return make


def devnum(engine: Engine, path: str) -> tuple[int, int]:
    if isinstance(engine, DM):
        st = os.stat(path)
        return os.major(st.st_rdev), os.minor(st.st_rdev)
    return 7, int(path.removeprefix("/dev/simdisk"))


def zero(sectors: int = 2048) -> list[TargetLine]:
    return [TargetLine(0, sectors, "zero", "")]


def active(engine: Engine, name: str, table: list[TargetLine] | None = None,
           uuid: str | None = None, flags: DmFlags = DmFlags(0)) -> str:
    engine.device_create(name, uuid)
    engine.table_load(name, table or zero(), flags)
    engine.device_suspend(name, DmFlags(0))
    return name


def errno_of(call: Callable[[], object]) -> int:
    with pytest.raises(DmError) as caught:
        call()
    return caught.value.errno or 0


def test_version_is_4(engine: Engine) -> None:
    assert engine.version()[0] == 4


def test_created_device_is_empty_and_listed(engine: Engine) -> None:
    info = engine.device_create(P + "a", "DMDTEST-uuid-a")
    assert (info.name, info.uuid) == (P + "a", "DMDTEST-uuid-a")
    assert not info.suspended and not info.active_present and not info.inactive_present
    assert info.open_count == 0 and info.target_count == 0
    listed = {d.name: d for d in engine.list_devices()}
    assert listed[P + "a"].device == info.device
    assert listed[P + "a"].uuid == "DMDTEST-uuid-a"
    assert listed[P + "a"].event_nr == info.event_nr


def test_names_and_uuids_are_unique(engine: Engine) -> None:
    engine.device_create(P + "a", "DMDTEST-u1")
    assert errno_of(lambda: engine.device_create(P + "a")) == errno.EBUSY
    assert errno_of(lambda: engine.device_create(P + "b", "DMDTEST-u1")) == errno.EBUSY
    assert [d.name for d in engine.list_devices() if d.name.startswith(P)] == [P + "a"]


@pytest.mark.parametrize("call", [
    lambda e: e.device_info(P + "missing"),
    lambda e: e.device_remove(P + "missing"),
    lambda e: e.device_suspend(P + "missing", DmFlags.DM_SUSPEND),
    lambda e: e.table_load(P + "missing", zero()),
    lambda e: e.table_status(P + "missing"),
    lambda e: e.table_clear(P + "missing"),
    lambda e: e.table_deps(P + "missing"),
    lambda e: e.device_rename(P + "missing", DevId.name(P + "other")),
    lambda e: e.device_info(DevId.uuid("DMDTEST-missing")),
])
def test_missing_device_is_enxio(engine: Engine, call: Callable[[Engine], object]) -> None:
    assert errno_of(lambda: call(engine)) == errno.ENXIO


def test_load_then_resume_swaps_tables(engine: Engine) -> None:
    engine.device_create(P + "a")
    info = engine.table_load(P + "a", zero(4096))
    assert info.inactive_present and not info.active_present
    _, inactive = engine.table_status(
        P + "a", DmFlags.DM_STATUS_TABLE | DmFlags.DM_QUERY_INACTIVE_TABLE)
    assert inactive == [TargetLine(0, 4096, "zero", "")]
    info = engine.device_suspend(P + "a", DmFlags(0))
    assert info.active_present and not info.inactive_present and not info.suspended
    info, live = engine.table_status(P + "a", DmFlags.DM_STATUS_TABLE)
    assert live == [TargetLine(0, 4096, "zero", "")]
    assert info.target_count == 1


def test_largest_device_the_kernel_takes(engine: Engine) -> None:
    """A table may end at LLONG_MAX >> 9 sectors (the byte size fits a loff_t);
    one sector more is refused before any ioctl."""
    engine.device_create(P + "big")
    engine.table_load(P + "big", zero(MAX_DEVICE_SECTORS))
    engine.device_suspend(P + "big", DmFlags(0))
    _, live = engine.table_status(P + "big", DmFlags.DM_STATUS_TABLE)
    assert live == [TargetLine(0, MAX_DEVICE_SECTORS, "zero", "")]
    with pytest.raises(InvalidArgument, match="largest device"):
        engine.table_load(P + "big", zero(MAX_DEVICE_SECTORS + 1))
    engine.device_remove(P + "big")


def test_reload_keeps_old_table_live_until_resume(engine: Engine) -> None:
    active(engine, P + "a", zero(2048))
    engine.table_load(P + "a", [TargetLine(0, 1024, "zero", ""),
                                TargetLine(1024, 1024, "error", "")])
    _, live = engine.table_status(P + "a", DmFlags.DM_STATUS_TABLE)
    assert live == zero(2048)
    engine.device_suspend(P + "a", DmFlags.DM_SUSPEND)
    info = engine.device_suspend(P + "a", DmFlags(0))
    assert info.target_count == 2 and not info.suspended


def test_suspend_and_resume(engine: Engine) -> None:
    active(engine, P + "a")
    assert engine.device_suspend(P + "a", DmFlags.DM_SUSPEND).suspended
    assert engine.device_info(P + "a").suspended
    assert engine.device_suspend(P + "a", DmFlags.DM_SUSPEND).suspended  # idempotent
    assert not engine.device_suspend(P + "a", DmFlags(0)).suspended
    assert not engine.device_suspend(P + "a", DmFlags(0)).suspended  # idempotent


def test_resume_without_any_table_is_a_no_op(engine: Engine) -> None:
    engine.device_create(P + "a")
    info = engine.device_suspend(P + "a", DmFlags(0))
    assert not info.suspended and not info.active_present


def test_read_only_table(engine: Engine) -> None:
    engine.device_create(P + "a")
    engine.table_load(P + "a", zero(), DmFlags.DM_READONLY)
    assert engine.device_suspend(P + "a", DmFlags(0)).read_only
    assert engine.device_info(P + "a").read_only
    engine.table_load(P + "a", zero())
    engine.device_suspend(P + "a", DmFlags(0))
    assert not engine.device_info(P + "a").read_only


def test_linear_reads_back_as_major_minor_with_deps(engine: Engine,
                                                     disk: Callable[[int], str]) -> None:
    path = disk(16)
    major, minor = devnum(engine, path)
    active(engine, P + "lin", [TargetLine(0, 8192, "linear", f"{path} 2048")])
    _, table = engine.table_status(P + "lin", DmFlags.DM_STATUS_TABLE)
    assert table == [TargetLine(0, 8192, "linear", f"{major}:{minor} 2048")]
    assert engine.table_deps(P + "lin") == [(major, minor)]
    assert engine.device_number(path) == (major, minor)
    assert engine.device_number(f"/dev/mapper/{P}lin") == engine.device_info(P + "lin").device
    assert engine.device_number("/dev/dmdtest-nonexistent") is None
    _, status = engine.table_status(P + "lin")
    assert status == [TargetLine(0, 8192, "linear", "")]


def test_bad_table_is_refused_and_changes_nothing(engine: Engine,
                                                  disk: Callable[[int], str]) -> None:
    path = disk(16)
    active(engine, P + "a")
    bad_tables = [[TargetLine(0, 8, "nosuchtarget", "")],
                  [TargetLine(0, 8, "zero", "unexpected")],
                  [TargetLine(0, 8, "linear", "/dev/dmdtest-nonexistent 0")]]
    for table in bad_tables:
        assert errno_of(lambda t=table: engine.table_load(P + "a", t)) in (
            errno.EINVAL, errno.ENODEV, errno.ENXIO, errno.ENOENT)
        info = engine.device_info(P + "a")
        assert not info.inactive_present and info.active_present and not info.suspended
    # and EINVAL specifically for the cases where nothing is looked up
    assert errno_of(lambda: engine.table_load(P + "a", bad_tables[0])) == errno.EINVAL
    assert errno_of(lambda: engine.table_load(P + "a", bad_tables[1])) == errno.EINVAL
    assert errno_of(lambda: engine.table_load(
        P + "a", [TargetLine(0, 8, "linear", f"{path} x")])) == errno.EINVAL


def test_area_beyond_the_device_fails_at_resume_leaving_it_suspended(
        engine: Engine, disk: Callable[[int], str]) -> None:
    """The kernel checks device areas only when it swaps the table in: the
    resume fails, the new table is gone, and the device stays suspended on its
    old table until it is resumed again. The service layer relies on this."""
    path = disk(16)
    active(engine, P + "a", zero(8192))
    too_far = [TargetLine(0, 8192, "linear", f"{path} {16 * 2048 - 100}")]
    assert engine.table_load(P + "a", too_far).inactive_present
    assert errno_of(lambda: engine.device_suspend(P + "a", DmFlags(0))) == errno.EINVAL
    info, live = engine.table_status(P + "a", DmFlags.DM_STATUS_TABLE)
    assert info.suspended and not info.inactive_present
    assert live == zero(8192)
    assert not engine.device_suspend(P + "a", DmFlags(0)).suspended


def test_striped(engine: Engine, disk: Callable[[int], str]) -> None:
    a, b = disk(8), disk(8)
    (ma, na), (mb, nb) = devnum(engine, a), devnum(engine, b)
    active(engine, P + "s", [TargetLine(0, 16384, "striped", f"2 128 {a} 0 {b} 0")])
    _, table = engine.table_status(P + "s", DmFlags.DM_STATUS_TABLE)
    assert table[0].params == f"2 128 {ma}:{na} 0 {mb}:{nb} 0"
    _, status = engine.table_status(P + "s")
    assert status[0].params == f"2 {ma}:{na} {mb}:{nb} 1 AA"
    assert sorted(engine.table_deps(P + "s")) == sorted([(ma, na), (mb, nb)])
    bad = [TargetLine(0, 16383, "striped", f"2 128 {a} 0 {b} 0")]
    assert errno_of(lambda: engine.table_load(P + "s", bad)) == errno.EINVAL


def test_rename_and_set_uuid(engine: Engine) -> None:
    active(engine, P + "a")
    engine.device_create(P + "b")
    info = engine.device_rename(P + "a", DevId.name(P + "c"))
    assert info.name == P + "c"
    assert errno_of(lambda: engine.device_info(P + "a")) == errno.ENXIO
    assert errno_of(lambda: engine.device_rename(P + "c", DevId.name(P + "b"))) == errno.EBUSY
    info = engine.device_rename(P + "c", DevId.uuid("DMDTEST-set"))
    assert info.uuid == "DMDTEST-set" and info.name == P + "c"
    assert engine.device_info(DevId.uuid("DMDTEST-set")).name == P + "c"
    assert errno_of(
        lambda: engine.device_rename(P + "c", DevId.uuid("DMDTEST-again"))) == errno.EINVAL
    assert errno_of(
        lambda: engine.device_rename(P + "b", DevId.uuid("DMDTEST-set"))) == errno.EBUSY


def test_device_in_use_cannot_be_removed_unless_deferred(engine: Engine) -> None:
    lower = active(engine, P + "lower")
    lower_dev = engine.device_info(lower).device
    active(engine, P + "upper", [TargetLine(0, 2048, "linear", f"/dev/mapper/{lower} 0")])
    assert engine.table_deps(P + "upper") == [lower_dev]
    assert engine.device_info(lower).open_count == 1
    assert errno_of(lambda: engine.device_remove(lower)) == errno.EBUSY
    info = engine.device_remove(lower, DmFlags.DM_DEFERRED_REMOVE)
    assert info.flags & DmFlags.DM_DEFERRED_REMOVE
    assert engine.device_info(lower).flags & DmFlags.DM_DEFERRED_REMOVE
    engine.device_remove(P + "upper")
    deadline = time.monotonic() + 10
    while any(d.name == lower for d in engine.list_devices()):
        assert time.monotonic() < deadline, "deferred remove never happened"
        time.sleep(0.05)


def test_inactive_table_holds_its_devices_open(engine: Engine) -> None:
    lower = active(engine, P + "lower")
    engine.device_create(P + "upper")
    engine.table_load(P + "upper", [TargetLine(0, 2048, "linear", f"/dev/mapper/{lower} 0")])
    assert engine.device_info(lower).open_count == 1
    assert errno_of(lambda: engine.device_remove(lower)) == errno.EBUSY
    engine.table_clear(P + "upper")
    assert engine.device_info(lower).open_count == 0
    engine.device_remove(lower)
    engine.device_remove(P + "upper")


def test_remove_suspended_device(engine: Engine) -> None:
    active(engine, P + "a")
    engine.device_suspend(P + "a", DmFlags.DM_SUSPEND)
    engine.device_remove(P + "a")
    assert all(d.name != P + "a" for d in engine.list_devices())


def test_persistent_minor(engine: Engine) -> None:
    major = engine.dev_majors()[0]
    info = engine.device_create(P + "a", flags=DmFlags.DM_PERSISTENT_DEV, device=(major, 200))
    assert info.device == (major, 200)
    assert errno_of(lambda: engine.device_create(
        P + "b", flags=DmFlags.DM_PERSISTENT_DEV, device=(major, 200))) == errno.ENXIO


def test_message_to_target_without_messages_is_einval(engine: Engine) -> None:
    active(engine, P + "a")
    assert errno_of(lambda: engine.target_msg(P + "a", 0, "hello")) == errno.EINVAL


def test_wait_returns_at_once_for_a_stale_event_number(engine: Engine) -> None:
    active(engine, P + "a")
    current = engine.device_info(P + "a").event_nr
    info, _ = engine.device_wait(P + "a", event_nr=current + 1000)
    assert info.event_nr == current


def test_target_versions(engine: Engine) -> None:
    names = {t.name for t in engine.list_versions()}
    assert {"linear", "striped", "zero", "error"} <= names
    assert engine.get_target_version("linear")[0] == 1
    assert errno_of(lambda: engine.get_target_version("nosuchtarget")) in (
        errno.EINVAL, errno.ENOENT)


def test_many_devices_listed_in_few_ioctls(engine: Engine) -> None:
    names = [f"{P}many-{i:04d}-" + "x" * 40 for i in range(300)]
    for name in names:
        engine.device_create(name, "DMDTEST-" + name)
    before = engine.ioctl_count
    listed = {d.name: d.uuid for d in engine.list_devices()}
    first = engine.ioctl_count - before
    before = engine.ioctl_count
    engine.list_devices()
    second = engine.ioctl_count - before
    assert all(listed[n] == "DMDTEST-" + n for n in names)
    assert first <= 2 and second == 1


def test_udev_work_can_be_waited_for_later(engine: Engine) -> None:
    """A resume or a remove given a list hands its udev wait there (its
    caller goes on, and waits once it needs the node): waited for, the node
    is there, then gone. A remove's wait names no device: nothing waits for
    a removed node later, so a caller keeping waits by device (one that went
    on without udev) closes it rather than holding its monitor socket."""
    name = active(engine, P + "later")
    engine.device_suspend(name, DmFlags.DM_SUSPEND)
    later: list[UdevWait] = []
    info = engine.device_suspend(name, DmFlags(0), later)
    assert not info.suspended and len(later) == 1
    later.pop().wait()
    node = Path("/dev/mapper") / name
    if isinstance(engine, DM):
        assert node.is_block_device()
    engine.device_remove(name, DmFlags(0), later)
    assert len(later) == 1 and later[0].name == ""
    later.pop().wait()
    if isinstance(engine, DM):
        assert not node.exists()


@pytest.mark.kernel
def test_without_udevd_the_node_is_made_at_once_even_when_asked_later(
        clean_dm: DM, tmp_path: Path) -> None:
    """Without udevd the engine makes and removes the node itself: that is
    the work, not a wait, so it is done at once (a caller's giving a wait up
    must never leave a node naming a freed device number)."""
    engine = DM(udev_sync=UdevSync.NODES, dev_dir=str(tmp_path))
    try:
        name = P + "nodes"
        engine.device_create(name)
        engine.table_load(name, zero())
        later: list[UdevWait] = []
        engine.device_suspend(name, DmFlags(0), later)
        assert later == [] and (tmp_path / "mapper" / name).is_block_device()
        engine.device_remove(name, DmFlags(0), later)
        assert later == [] and not (tmp_path / "mapper" / name).exists()
    finally:
        engine.close()


def test_remove_all_removes_unused_devices(tmp_path: Path) -> None:
    # SimDM only: remove_all would take the lab's other devices with it.
    engine = SimDM(tmp_path / "kernel.json")
    lower = active(engine, P + "lower")
    active(engine, P + "upper", [TargetLine(0, 2048, "linear", f"/dev/mapper/{lower} 0")])
    engine.device_create(P + "lonely")
    engine.remove_all()
    assert engine.list_devices() == []


@pytest.mark.parametrize("call", [
    lambda e: e.device_create("x" * 128),
    lambda e: e.device_create("a/b"),
    lambda e: e.device_create("control"),
    lambda e: e.device_create(".."),
    lambda e: e.device_create("with space"),
    lambda e: e.device_create(P + "u", "u" * 129),
    lambda e: e.device_create(P + "f", flags=DmFlags(1 << 30)),
    lambda e: e.table_load(P + "x", [TargetLine(8, 8, "zero", "")]),
    lambda e: e.table_load(P + "x", [(0, 8, "zero", ""), (9, 8, "zero", "")]),
    lambda e: e.table_load(P + "x", [(0, 0, "zero", "")]),
    lambda e: e.table_load(P + "x", []),
    lambda e: e.table_load(P + "x", [(0, 8, "bad type!", "")]),
    lambda e: e.device_suspend(P + "x", DmFlags.DM_DEFERRED_REMOVE),
    lambda e: e.device_remove(P + "x", DmFlags.DM_SUSPEND),
])
def test_invalid_input_is_refused_before_any_ioctl(engine: Engine,
                                                   call: Callable[[Engine], object]) -> None:
    before = engine.ioctl_count
    with pytest.raises(InvalidArgument):
        call(engine)
    assert engine.ioctl_count == before


# -- thin pools: what a pool manager relies on ---------------------------------

def _thin_pool(engine: Engine, disk: Callable[[int], str], suffix: str = "",
               wipe: bool = True, backing: str | None = None) -> tuple[str, str]:
    """A pool on one disk: metadata in its first 4 MiB, data after it.
    Returns (pool device name, the disk)."""
    from dmd.engine.targets.thin import ThinPoolParams

    backing = backing or disk(64)
    meta, data, pool = (f"{P}tmeta{suffix}", f"{P}tdata{suffix}", f"{P}pool{suffix}")
    active(engine, meta, [TargetLine(0, 8192, "linear", f"{backing} 0")])
    active(engine, data, [TargetLine(0, 122880, "linear", f"{backing} 8192")])
    if wipe:
        engine.wipe(backing, 0, 4096)
    params = ThinPoolParams(f"/dev/mapper/{meta}", f"/dev/mapper/{data}", 128, 0)
    active(engine, pool, [TargetLine(0, 122880, "thin-pool", params.to_params())])
    return pool, backing


def _pool_status(engine: Engine, pool: str) -> Any:
    from dmd.engine.targets import parse_status

    _, lines = engine.table_status(pool)
    return parse_status("thin-pool", lines[0].params)


def _msg_errno(engine: Engine, pool: str, message: str) -> int:
    with pytest.raises(DmError) as caught:
        engine.target_msg(pool, 0, message)
    return caught.value.errno


def _remove_pool(engine: Engine, suffix: str = "") -> None:
    for name in (f"{P}pool{suffix}", f"{P}tdata{suffix}", f"{P}tmeta{suffix}"):
        engine.device_remove(name)


def test_a_thin_pool_table_comes_back_with_a_space_after_its_features(
        engine: Engine, disk: Callable[[int], str]) -> None:
    """The kernel's emit_flags() prints the feature count and each feature
    followed by a space: a table compared as a string with the one loaded
    never matches (every pool looked drifted)."""
    pool, _ = _thin_pool(engine, disk)
    _, lines = engine.table_status(pool, DmFlags.DM_STATUS_TABLE)
    meta = engine.device_info(f"{P}tmeta").device
    data = engine.device_info(f"{P}tdata").device
    assert lines[0].params == f"{meta[0]}:{meta[1]} {data[0]}:{data[1]} 128 0 0 "


def test_thin_pool_messages_and_their_errors(engine: Engine,
                                             disk: Callable[[int], str]) -> None:
    from dmd.engine.targets import thin

    pool, _ = _thin_pool(engine, disk)
    status = _pool_status(engine, pool)
    assert status.transaction_id == 0 and status.mode == "rw"
    assert status.total_data_blocks == 122880 // 128
    assert status.used_data_blocks == 0 and not status.needs_check
    engine.target_msg(pool, 0, thin.create_thin(0))
    assert _msg_errno(engine, pool, thin.create_thin(0)) == errno.EEXIST
    engine.target_msg(pool, 0, thin.create_snap(1, 0))
    assert _msg_errno(engine, pool, thin.create_snap(1, 0)) == errno.EEXIST
    assert _msg_errno(engine, pool, thin.create_snap(2, 7)) == errno.ENODATA
    assert _msg_errno(engine, pool, thin.delete(7)) == errno.ENODATA
    assert _msg_errno(engine, pool, f"create_thin {1 << 24}") == errno.EINVAL
    assert _msg_errno(engine, pool, "create_thin x") == errno.EINVAL
    assert _msg_errno(engine, pool, "no_such_message 1") == errno.EINVAL
    # The transaction id moves only from the value it has.
    assert _msg_errno(engine, pool, thin.set_transaction_id(5, 6)) == errno.EINVAL
    engine.target_msg(pool, 0, thin.set_transaction_id(0, 1))
    assert _pool_status(engine, pool).transaction_id == 1
    engine.target_msg(pool, 0, thin.delete(1))
    assert _msg_errno(engine, pool, thin.delete(1)) == errno.ENODATA


def test_thin_device_needs_an_existing_id_and_holds_it(engine: Engine,
                                                       disk: Callable[[int], str]) -> None:
    from dmd.engine.targets import parse_status, thin

    pool, _ = _thin_pool(engine, disk)
    engine.target_msg(pool, 0, thin.create_thin(3))
    volume = f"{P}thin3"
    engine.device_create(volume)
    with pytest.raises(DmError) as caught:
        engine.table_load(volume, [TargetLine(0, 4096, "thin", f"/dev/mapper/{pool} 4")])
    assert caught.value.errno == errno.ENODATA
    engine.table_load(volume, [TargetLine(0, 1 << 30, "thin", f"/dev/mapper/{pool} 3")])
    engine.device_suspend(volume, DmFlags(0))
    # A thin id with a table (live or loaded) cannot be deleted.
    assert _msg_errno(engine, pool, thin.delete(3)) == errno.EBUSY
    _, lines = engine.table_status(volume)
    status = parse_status("thin", lines[0].params)
    assert status.mapped_sectors == 0 and status.highest_mapped_sector is None
    # The pool is held open by its thin device.
    with pytest.raises(DmError) as busy:
        engine.device_remove(pool)
    assert busy.value.errno == errno.EBUSY
    engine.device_remove(volume)
    engine.target_msg(pool, 0, thin.delete(3))


def test_pool_metadata_outlives_its_devices_until_wiped(engine: Engine,
                                                        disk: Callable[[int], str]) -> None:
    from dmd.engine.targets import thin

    pool, backing = _thin_pool(engine, disk)
    engine.target_msg(pool, 0, thin.create_thin(5))
    engine.target_msg(pool, 0, thin.set_transaction_id(0, 9))
    _remove_pool(engine)
    # The same disk, devices made again: the kernel opens the pool it finds.
    pool, _ = _thin_pool(engine, disk, wipe=False, backing=backing)
    assert _pool_status(engine, pool).transaction_id == 9
    assert _msg_errno(engine, pool, thin.create_thin(5)) == errno.EEXIST
    _remove_pool(engine)
    # Zeroed metadata is a new, empty pool.
    pool, _ = _thin_pool(engine, disk, wipe=True, backing=backing)
    assert _pool_status(engine, pool).transaction_id == 0
    engine.target_msg(pool, 0, thin.create_thin(5))


def _damage_superblock(engine: Engine, backing: str) -> None:
    """The pool's superblock (its metadata's first block) overwritten."""
    if isinstance(engine, SimDM):
        engine.damage_metadata(backing, 0, superblock=True)
    else:
        engine.write_disk(backing, 0, os.urandom(4096))


def test_thin_tools_check_a_metadata_and_repair_it_into_another_device(
        engine: Engine, disk: Callable[[int], str]) -> None:
    """thin_check and thin_repair on the pool's metadata device, the pool
    down: a whole metadata passes; a damaged superblock fails the check and
    the pool's table load (pool_ctr), and thin_repair, given the figures the
    superblock held, finds every thin in the rest and writes a metadata the
    kernel opens."""
    from dmd.engine.targets import thin
    from dmd.engine.targets.thin import ThinPoolParams

    pool, backing = _thin_pool(engine, disk)
    for ident in (1, 2):
        engine.target_msg(pool, 0, thin.create_thin(ident))
        # Mappings: thin_repair finds a lost superblock's trees by a scan,
        # which found none for thins that map nothing (seen in the lab).
        name = active(engine, f"{P}thin{ident}",
                      [TargetLine(0, 8192, "thin", f"/dev/mapper/{pool} {ident}")])
        for block in range(0, 64, 2):
            _write(engine, name, block * 128, 8)
        _remove_written(engine, name)
    engine.target_msg(pool, 0, thin.set_transaction_id(0, 4))
    with pytest.raises(ThinToolError, match="busy"):  # the pool holds it
        engine.thin_check(f"{P}tmeta")
    engine.device_remove(pool)
    assert engine.thin_check(f"{P}tmeta") == MetadataCheck(True)
    assert engine.thin_ids(f"{P}tmeta") == [1, 2]

    _damage_superblock(engine, backing)
    check = engine.thin_check(f"{P}tmeta")
    assert not check.ok and "superblock" in check.report, check
    params = ThinPoolParams(f"/dev/mapper/{P}tmeta", f"/dev/mapper/{P}tdata", 128, 0)
    active(engine, pool)
    line = [TargetLine(0, 122880, "thin-pool", params.to_params())]
    # sb_check: the block is not where its block number says
    assert errno_of(lambda: engine.table_load(pool, line)) == errno.ENOTBLK
    engine.device_remove(pool)

    spare = disk(8)
    active(engine, f"{P}tspare", [TargetLine(0, 8192, "linear", f"{spare} 0")])
    engine.wipe(spare, 0, 4096)
    engine.thin_repair(f"{P}tmeta", f"{P}tspare", 4, 128, 960)
    assert engine.thin_check(f"{P}tspare") == MetadataCheck(True)
    assert engine.thin_ids(f"{P}tspare") == [1, 2]
    params = ThinPoolParams(f"/dev/mapper/{P}tspare", f"/dev/mapper/{P}tdata", 128, 0)
    active(engine, pool, [TargetLine(0, 122880, "thin-pool", params.to_params())])
    assert _pool_status(engine, pool).transaction_id == 4
    assert _msg_errno(engine, pool, thin.create_thin(2)) == errno.EEXIST
    for name in (pool, f"{P}tspare", f"{P}tdata", f"{P}tmeta"):
        engine.device_remove(name)


def test_a_pool_never_takes_less_data_than_its_metadata_has(
        engine: Engine, disk: Callable[[int], str]) -> None:
    """pool_preresume: a thin-pool table with less data than the metadata
    records fails its resume ("pool target too small"): do_resume has swapped
    it in, so the device stays suspended on it, and every resume fails until
    a table of the pool's size is loaded. (An import of a pool whose growth
    its description did not name failed so.)"""
    from dmd.engine.targets.thin import ThinPoolParams

    pool, _ = _thin_pool(engine, disk)
    params = ThinPoolParams(f"/dev/mapper/{P}tmeta", f"/dev/mapper/{P}tdata", 128, 0)
    small = [TargetLine(0, 61440, "thin-pool", params.to_params())]
    engine.table_load(pool, small)
    assert errno_of(lambda: engine.device_suspend(pool, DmFlags(0))) == errno.EINVAL
    info, live = engine.table_status(pool, DmFlags.DM_STATUS_TABLE)
    assert info.suspended and not info.inactive_present and live[0].length == 61440
    assert errno_of(lambda: engine.device_suspend(pool, DmFlags(0))) == errno.EINVAL
    engine.table_load(pool, [TargetLine(0, 122880, "thin-pool", params.to_params())])
    assert not engine.device_suspend(pool, DmFlags(0)).suspended
    assert _pool_status(engine, pool).total_data_blocks == 960
    _remove_pool(engine)


def test_pool_with_a_bad_block_size_is_refused(engine: Engine,
                                               disk: Callable[[int], str]) -> None:
    backing = disk(64)
    meta = active(engine, f"{P}tmeta", [TargetLine(0, 8192, "linear", f"{backing} 0")])
    data = active(engine, f"{P}tdata", [TargetLine(0, 122880, "linear", f"{backing} 8192")])
    engine.wipe(backing, 0, 4096)
    engine.device_create(f"{P}pool")
    with pytest.raises(DmError) as caught:
        engine.table_load(f"{P}pool", [TargetLine(
            0, 122880, "thin-pool", f"/dev/mapper/{meta} /dev/mapper/{data} 100 0")])
    assert caught.value.errno == errno.EINVAL


def test_block_device_facts(engine: Engine, disk: Callable[[int], str]) -> None:
    from dmd.engine import NotABlockDevice

    backing = disk(16)
    facts = engine.block_device(backing)
    assert facts.size_bytes == 16 << 20 and facts.device == devnum(engine, backing)
    assert not facts.in_use and facts.signature is None
    active(engine, f"{P}user", [TargetLine(0, 2048, "linear", f"{backing} 0")])
    assert engine.block_device(backing).in_use
    with pytest.raises(NotABlockDevice):
        engine.block_device("/dev/null" if isinstance(engine, DM) else "/dev/nothing")


def test_disk_bytes_read_back_and_a_pool_label_is_probed(engine: Engine,
                                                           disk: Callable[[int], str]) -> None:
    from dmd.engine.blockdev import POOL_MAGIC

    backing = disk(16)
    assert engine.read_disk(backing, 8192, 4096) == bytes(4096)  # a fresh disk reads zeros
    engine.write_disk(backing, 65536 + 100, b"description")
    assert engine.read_disk(backing, 65536, 4096)[100:111] == b"description"
    engine.write_disk(backing, 0, POOL_MAGIC + bytes(4088))
    assert engine.block_device(backing).signature == "dmd_pool"
    # Held by a device-mapper table, the disk is still read and written
    # (the header a pool's layout reserves is mapped by none of its devices).
    active(engine, f"{P}user", [TargetLine(0, 2048, "linear", f"{backing} 8192")])
    engine.write_disk(backing, 65536, b"again")
    assert engine.read_disk(backing, 65536, 5) == b"again"
    engine.wipe(backing, 0, 1 << 20)
    assert engine.block_device(backing).signature is None
    assert engine.read_disk(backing, 65536, 5) == bytes(5)
    # At the end of the disk a read comes back short and a write fails.
    assert engine.read_disk(backing, (16 << 20) - 10, 20) == bytes(10)
    with pytest.raises(OSError) as beyond:
        engine.write_disk(backing, (16 << 20) - 10, bytes(20))
    assert beyond.value.errno == errno.ENOSPC
    with pytest.raises(FileNotFoundError):
        engine.read_disk("/dev/nothing-here", 0, 512)


def test_open_node_gives_its_node_and_the_bytes_written_through_it(
        engine: Engine, disk: Callable[[int], str]) -> None:
    backing = disk(16)
    name = active(engine, f"{P}opened", [TargetLine(0, 4096, "linear", f"{backing} 0")],
                  uuid="dmdtest-opened-uuid")
    fd = engine.open_node(name, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 4096 * 512
        assert os.pwrite(fd, b"\xa5" * 4096, 8192) == 4096
        os.fsync(fd)
        if isinstance(engine, DM):
            st = os.fstat(fd)
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == engine.device_info(
                name).device
    finally:
        os.close(fd)
    reader = engine.open_node(name, os.O_RDONLY)
    try:
        assert os.pread(reader, 4096, 8192) == b"\xa5" * 4096  # another open sees it
        assert os.pread(reader, 512, 0) == bytes(512)
        assert os.get_inheritable(reader) is False
        with pytest.raises(OSError):
            os.write(reader, b"x")  # opened for reading only
    finally:
        os.close(reader)
    assert errno_of(lambda: engine.open_node(f"{P}missing", os.O_RDONLY)) == errno.ENXIO


def test_zero_range_zeroes_exactly_its_range(engine: Engine, disk: Callable[[int], str]
                                             ) -> None:
    backing = disk(16)
    name = active(engine, f"{P}zeroed", [TargetLine(0, 4096, "linear", f"{backing} 0")],
                  uuid="dmdtest-zeroed-uuid")
    fd = engine.open_node(name, os.O_RDWR)
    try:
        os.pwrite(fd, b"\x5a" * 65536, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    engine.zero_range(name, 8192, 16384)
    with pytest.raises(InvalidArgument):
        engine.zero_range(name, 100, 512)
    reader = engine.open_node(name, os.O_RDONLY | os.O_DIRECT if isinstance(engine, DM)
                              else os.O_RDONLY)
    try:
        import mmap
        buffer = mmap.mmap(-1, 65536)
        os.preadv(reader, [buffer], 0)
        got = bytes(buffer)
    finally:
        os.close(reader)
    assert got == b"\x5a" * 8192 + bytes(16384) + b"\x5a" * (65536 - 24576)


def _write(engine: Engine, name: str, sector: int, sectors: int) -> None:
    """Write *sectors* at *sector* of device *name* (the simulator is told)."""
    if not isinstance(engine, DM):
        engine.write(name, sector, sectors)
        return
    import mmap

    fd = os.open(f"/dev/mapper/{name}", os.O_WRONLY | os.O_DIRECT)
    try:
        buffer = mmap.mmap(-1, sectors * 512)
        buffer.write(b"\xa5" * (sectors * 512))
        os.pwrite(fd, buffer, sector * 512)
    finally:
        os.close(fd)


def _thin(engine: Engine, pool: str, thin_id: int, sectors: int = 1 << 16) -> str:
    name = f"{P}thin{thin_id}"
    return active(engine, name, [TargetLine(0, sectors, "thin", f"/dev/mapper/{pool} {thin_id}")])


def _small_pool(engine: Engine, disk: Callable[[int], str], blocks: int, low_water: int,
                features: str = "0") -> str:
    backing = disk(16)
    meta = active(engine, f"{P}tmeta", [TargetLine(0, 4096, "linear", f"{backing} 0")])
    data = active(engine, f"{P}tdata",
                  [TargetLine(0, blocks * 128, "linear", f"{backing} 4096")])
    engine.wipe(backing, 0, 4096)
    return active(engine, f"{P}pool", [TargetLine(
        0, blocks * 128, "thin-pool",
        f"/dev/mapper/{meta} /dev/mapper/{data} 128 {low_water} {features}")])


def _used_blocks(engine: Engine, pool: str) -> int:
    return int(_pool_status(engine, pool).used_data_blocks)


def test_thin_writes_map_blocks_and_snapshots_share_them(
        engine: Engine, disk: Callable[[int], str]) -> None:
    from dmd.engine.targets import parse_status, thin

    pool, _ = _thin_pool(engine, disk)
    engine.target_msg(pool, 0, thin.create_thin(0))
    origin = _thin(engine, pool, 0)
    _write(engine, origin, 0, 128)  # block 0
    _write(engine, origin, 5 * 128, 8)  # part of block 5: a block all the same
    assert _used_blocks(engine, pool) == 2
    _, lines = engine.table_status(origin)
    status = parse_status("thin", lines[0].params)
    assert status.mapped_sectors == 256 and status.highest_mapped_sector == 6 * 128 - 1
    _write(engine, origin, 0, 8)  # its own block: in place
    assert _used_blocks(engine, pool) == 2
    engine.device_suspend(origin, DmFlags.DM_SUSPEND)  # as a snapshot must be taken
    engine.target_msg(pool, 0, thin.create_snap(1, 0))
    engine.device_suspend(origin, DmFlags(0))
    assert _used_blocks(engine, pool) == 2  # shared
    _write(engine, origin, 0, 8)  # shared with the snapshot: copied on write
    assert _used_blocks(engine, pool) == 3
    engine.target_msg(pool, 0, thin.delete(1))  # frees what only it held
    assert _used_blocks(engine, pool) == 2
    _remove_written(engine, origin)
    engine.target_msg(pool, 0, thin.delete(0))
    assert _used_blocks(engine, pool) == 0


def _remove_written(engine: Engine, name: str) -> None:
    """Remove a device just written to: on the kernel, closing it after a
    write makes udev probe it, and the remove is EBUSY while blkid has it."""
    import subprocess

    for _ in range(100):
        if isinstance(engine, DM):
            subprocess.run(["udevadm", "settle"], check=False)
        try:
            engine.device_remove(name)
            return
        except DmError as exc:
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(0.2)
    engine.device_remove(name)


def test_low_water_mark_raises_the_pools_event_once(engine: Engine,
                                                    disk: Callable[[int], str]) -> None:
    from dmd.engine.targets import thin

    pool = _small_pool(engine, disk, blocks=16, low_water=13)
    engine.target_msg(pool, 0, thin.create_thin(0))
    volume = _thin(engine, pool, 0)
    before = engine.device_info(pool).event_nr
    # The kernel checks the mark against the free blocks before each
    # allocation (alloc_data_block): 16, 15, 14 free, no event; 13 left after.
    _write(engine, volume, 0, 3 * 128)
    assert engine.device_info(pool).event_nr == before
    _write(engine, volume, 3 * 128, 128)  # starts at 13 free: the mark
    assert engine.device_info(pool).event_nr == before + 1
    _write(engine, volume, 4 * 128, 128)
    assert engine.device_info(pool).event_nr == before + 1  # once, until a resume


def test_a_full_pool_that_errors_fails_writes_with_enospc(
        engine: Engine, disk: Callable[[int], str]) -> None:
    from dmd.engine.targets import thin

    pool = _small_pool(engine, disk, blocks=4, low_water=0, features="1 error_if_no_space")
    engine.target_msg(pool, 0, thin.create_thin(0))
    volume = _thin(engine, pool, 0)
    _write(engine, volume, 0, 4 * 128)
    with pytest.raises(OSError) as full:
        _write(engine, volume, 4 * 128, 128)
    assert full.value.errno == errno.ENOSPC
    status = _pool_status(engine, pool)
    assert status.mode == "out_of_data_space" and status.used_data_blocks == 4
    assert status.no_space_policy == "error_if_no_space"
