"""Every target's typed params and status against the real kernel.

For each target: build the params with its dataclass (devices as /dev paths),
load them through the engine, read the table back (DM_STATUS_TABLE), parse
it and compare with what was built (devices as major:minor, the way the
kernel prints them), check that ``dmsetup table`` shows the engine's text,
then parse the status line and check its values make sense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from dmd.engine import DM, DmError, DmFlags, TargetLine
from dmd.engine.targets import (
    CacheParams,
    CacheStatus,
    CorruptBioByte,
    CryptParams,
    DelayClass,
    DelayParams,
    DelayStatus,
    DustParams,
    DustStatus,
    EraParams,
    EraStatus,
    ErrorParams,
    FlakeyParams,
    IntegrityAlg,
    IntegrityParams,
    IntegrityStatus,
    LinearParams,
    LogWritesParams,
    LogWritesStatus,
    MirrorLeg,
    MirrorLog,
    MirrorParams,
    MirrorStatus,
    MultipathParams,
    MultipathPath,
    MultipathStatus,
    PathGroup,
    RaidDevice,
    RaidParams,
    RaidStatus,
    SnapshotMergeParams,
    SnapshotOriginParams,
    SnapshotParams,
    SnapshotStatus,
    Stripe,
    StripedParams,
    StripedStatus,
    TargetParams,
    ThinParams,
    ThinPoolParams,
    ThinPoolStatus,
    ThinStatus,
    VerityParams,
    VerityStatus,
    WritecacheParams,
    WritecacheStatus,
    ZeroParams,
    line,
    parse_params,
    parse_status,
    with_device_numbers,
)

pytestmark = pytest.mark.kernel

LoopDevice = Callable[[int], str]
MakeDevice = Callable[..., str]

KEY64 = "00112233445566778899aabbccddeeff" * 4  # 64 bytes: aes-xts-plain64, AES-256
HMAC_KEY = "0123456789abcdef" * 4


def _sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


def _dmsetup(*args: str) -> str:
    return _sh("dmsetup", *args)


def _text(lines: list[TargetLine]) -> str:
    return "".join(f"{t.start} {t.length} {t.target_type} {t.params}\n" for t in lines)


def _sectors(path: str) -> int:
    return int(_sh("blockdev", "--getsz", path))


def _zero(path: str, nbytes: int) -> None:
    """Zero the start of a device (fresh metadata for thin/cache/era/...)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, bytes(nbytes))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: str, nbytes: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, os.urandom(nbytes))
        os.fsync(fd)
    finally:
        os.close(fd)
    # Closing a written device makes udev probe it; let that finish so the
    # device is not busy when a test (or the teardown) removes it.
    subprocess.run(["udevadm", "settle"], check=False)


def _remove(dm: DM, name: str) -> None:
    """Remove a device we wrote to: closing it after a write makes udev probe
    it (inotify "change" event), and while blkid holds it open removal is EBUSY."""
    deadline = time.monotonic() + 30
    while True:
        subprocess.run(["udevadm", "settle"], check=False)
        try:
            dm.device_remove(name)
            return
        except DmError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _mapper(name: str) -> str:
    return f"/dev/mapper/{name}"


def round_trip(dm: DM, make_device: MakeDevice, suffix: str, length: int,
               params: TargetParams, flags: DmFlags = DmFlags(0)) -> tuple[str, Any, Any]:
    """Load *params*, check the table reads back equal; returns (name, table, status)."""
    name = make_device(suffix, [line(0, length, params)], flags=flags)
    _, table = dm.table_status(name, DmFlags.DM_STATUS_TABLE)
    assert len(table) == 1 and table[0].target_type == params.target_type
    assert (table[0].start, table[0].length) == (0, length)
    parsed = parse_params(table[0].target_type, table[0].params)
    assert parsed == with_device_numbers(params)
    # dmsetup, the independent witness, sees the text the engine read
    # (--showkeys: without it dmsetup zeroes crypt and integrity keys).
    assert _dmsetup("table", "--showkeys", name) == _text(table)
    _, status_lines = dm.table_status(name)
    assert len(status_lines) == 1 and status_lines[0].target_type == params.target_type
    status = parse_status(params.target_type, status_lines[0].params)
    # A status can move between two reads (resync progress): retry until
    # dmsetup and the engine agree on one snapshot of it.
    for _ in range(100):
        if _dmsetup("status", name) == _text(status_lines):
            break
        time.sleep(0.1)
        _, status_lines = dm.table_status(name)
    else:
        pytest.fail(f"dmsetup status of {name} never matched the engine's")
    return name, parsed, status


def status_of(dm: DM, name: str) -> Any:
    _, lines = dm.table_status(name)
    return parse_status(lines[0].target_type, lines[0].params)


def wait_for(dm: DM, name: str, done: Callable[[Any], bool], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    status = status_of(dm, name)
    while not done(status) and time.monotonic() < deadline:
        time.sleep(0.2)
        status = status_of(dm, name)
    return status


# -- linear, striped, zero, error -------------------------------------------


def test_linear(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    loop = loop_device(16)
    _, _, status = round_trip(clean_dm, make_device, "linear", 1000, LinearParams(loop, 8))
    assert status == ""  # linear reports nothing


def test_striped(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    a, b = loop_device(16), loop_device(16)
    params = StripedParams(128, (Stripe(a, 0), Stripe(b, 64)))
    _, _, status = round_trip(clean_dm, make_device, "striped", 4096, params)
    assert isinstance(status, StripedStatus)
    assert status.devices == tuple(s.device for s in with_device_numbers(params).stripes)
    assert status.health == "AA" and status.all_alive


def test_zero_and_error(clean_dm: DM, make_device: MakeDevice) -> None:
    _, _, zero = round_trip(clean_dm, make_device, "zero", 1000, ZeroParams())
    _, _, error = round_trip(clean_dm, make_device, "error", 1000, ErrorParams())
    assert zero == "" and error == ""


# -- crypt, delay, flakey ------------------------------------------------------


def test_crypt(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    loop = loop_device(16)
    params = CryptParams(cipher="aes-xts-plain64", key=KEY64, device=loop, offset_sectors=16,
                         iv_offset_sectors=8, allow_discards=True, same_cpu_crypt=True,
                         sector_size_bytes=4096, iv_large_sectors=True)
    name, parsed, status = round_trip(clean_dm, make_device, "crypt", 2048, params)
    assert status == ""  # crypt reports nothing
    assert KEY64 not in repr(parsed)
    # Without --showkeys dmsetup hides the key the way redacted() does.
    assert _dmsetup("table", name) == f"0 2048 crypt {parsed.redacted()}\n"


def test_crypt_plain_key(clean_dm: DM, loop_device: LoopDevice,
                         make_device: MakeDevice) -> None:
    loop = loop_device(16)
    params = CryptParams(cipher="aes-cbc-essiv:sha256", key=KEY64[:32].upper(), device=loop)
    round_trip(clean_dm, make_device, "crypt2", 1000, params)


def test_delay(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    a, b = loop_device(16), loop_device(16)
    params = DelayParams(DelayClass(a, 0, 100), DelayClass(b, 8, 200), DelayClass(a, 16, 50))
    _, _, status = round_trip(clean_dm, make_device, "delay", 1000, params)
    assert status == DelayStatus(0, 0, 0)
    one = DelayParams(DelayClass(b, 0, 10))
    round_trip(clean_dm, make_device, "delay1", 1000, one)


def test_flakey(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    loop = loop_device(16)
    params = FlakeyParams(loop, 0, 5, 5, drop_writes=True,
                          corrupt_bio_byte=CorruptBioByte(32, "r", 1, 0))
    _, _, status = round_trip(clean_dm, make_device, "flakey", 1000, params)
    assert status == ""
    round_trip(clean_dm, make_device, "flakey0", 1000, FlakeyParams(loop, 8, 1, 0))
    round_trip(clean_dm, make_device, "flakey1", 1000,
               FlakeyParams(loop, 0, 3, 1, error_writes=True))


# -- snapshots -----------------------------------------------------------------


def test_snapshot_and_origin(clean_dm: DM, loop_device: LoopDevice,
                             make_device: MakeDevice) -> None:
    data, cow, cow2 = loop_device(32), loop_device(16), loop_device(16)
    size = _sectors(data)
    base = make_device("snapbase", [line(0, size, LinearParams(data, 0))])
    origin = SnapshotOriginParams(_mapper(base))
    _, _, origin_status = round_trip(clean_dm, make_device, "origin", size, origin)
    assert origin_status == ""
    snap = SnapshotParams(_mapper(base), cow, chunk_size_sectors=16)
    name, _, status = round_trip(clean_dm, make_device, "snap", size, snap)
    assert isinstance(status, SnapshotStatus) and status.valid
    assert status.total_sectors == _sectors(cow)
    assert status.allocated_sectors is not None and status.metadata_sectors is not None
    _write(_mapper(name), 64 * 1024)
    after = status_of(clean_dm, name)
    assert after.allocated_sectors > status.allocated_sectors
    transient = SnapshotParams(_mapper(base), cow2, persistent=False, chunk_size_sectors=8)
    _, _, tstatus = round_trip(clean_dm, make_device, "snapn", size, transient)
    assert tstatus.valid and tstatus.allocated_sectors == 0


def test_snapshot_merge(clean_dm: DM, loop_device: LoopDevice,
                        make_device: MakeDevice) -> None:
    data, cow = loop_device(32), loop_device(16)
    size = _sectors(data)
    base = make_device("mergebase", [line(0, size, LinearParams(data, 0))])
    snap = make_device("mergesnap", [line(0, size, SnapshotParams(_mapper(base), cow))])
    _write(_mapper(snap), 64 * 1024)
    _remove(clean_dm, snap)  # the exceptions stay in the persistent COW store
    merge = SnapshotMergeParams(_mapper(base), cow, chunk_size_sectors=16)
    _, _, status = round_trip(clean_dm, make_device, "merge", size, merge)
    assert isinstance(status, SnapshotStatus) and status.valid
    assert status.total_sectors == _sectors(cow)


# -- thin provisioning -----------------------------------------------------


def test_thin_pool_and_thin(clean_dm: DM, loop_device: LoopDevice,
                            make_device: MakeDevice) -> None:
    meta, data, external = loop_device(16), loop_device(64), loop_device(16)
    _zero(meta, 4096)
    size = _sectors(data)
    pool = ThinPoolParams(meta, data, 128, 32, skip_block_zeroing=True,
                          error_if_no_space=True)
    pool_name, _, status = round_trip(clean_dm, make_device, "pool", size, pool)
    assert isinstance(status, ThinPoolStatus)
    assert status.transaction_id == 0 and status.total_data_blocks == size // 128
    assert status.used_data_blocks == 0 and status.mode == "rw"
    assert 0 < status.used_metadata_blocks < status.total_metadata_blocks
    assert status.no_space_policy == "error_if_no_space" and not status.needs_check
    assert status.held_metadata_root is None

    clean_dm.target_msg(pool_name, 0, "create_thin 0")
    thin = ThinParams(_mapper(pool_name), 0)
    thin_name, _, tstatus = round_trip(clean_dm, make_device, "thin", 4096, thin)
    assert tstatus == ThinStatus(0, None)
    _write(_mapper(thin_name), 64 * 1024)
    tstatus = status_of(clean_dm, thin_name)
    assert tstatus.mapped_sectors == 128 and tstatus.highest_mapped_sector == 127
    assert status_of(clean_dm, pool_name).used_data_blocks == 1

    clean_dm.target_msg(pool_name, 0, "create_thin 1")
    ext = ThinParams(_mapper(pool_name), 1, external)
    _, _, estatus = round_trip(clean_dm, make_device, "thinext", _sectors(external), ext)
    assert estatus == ThinStatus(0, None)


# -- cache, era --------------------------------------------------------------


def test_cache(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    meta, cache, origin = loop_device(16), loop_device(16), loop_device(64)
    _zero(meta, 4096)
    size = _sectors(origin)
    params = CacheParams(meta, cache, origin, 512, "writeback", metadata2=True, policy="smq",
                         policy_args=(("migration_threshold", "2048"),))
    _, _, status = round_trip(clean_dm, make_device, "cache", size, params)
    assert isinstance(status, CacheStatus)
    assert status.metadata_block_sectors == 8 and status.cache_block_sectors == 512
    assert status.total_cache_blocks == _sectors(cache) // 512
    assert status.io_mode == "writeback" and "metadata2" in status.features
    assert status.migration_threshold == 2048 and status.policy == "smq"
    assert status.metadata_mode == "rw" and not status.needs_check


def test_era(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    meta, origin = loop_device(16), loop_device(32)
    _zero(meta, 4096)
    params = EraParams(meta, origin, 128)
    name, _, status = round_trip(clean_dm, make_device, "era", _sectors(origin), params)
    assert isinstance(status, EraStatus)
    assert status.metadata_block_sectors == 8 and status.held_metadata_root is None
    assert 0 < status.used_metadata_blocks < status.total_metadata_blocks
    clean_dm.target_msg(name, 0, "checkpoint")
    assert status_of(clean_dm, name).current_era == status.current_era + 1


# -- mirror, raid ----------------------------------------------------------


def test_mirror(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    a, b = loop_device(16), loop_device(16)
    params = MirrorParams(MirrorLog("core", 64), (MirrorLeg(a, 0), MirrorLeg(b, 8)),
                          handle_errors=True)
    name, _, status = round_trip(clean_dm, make_device, "mirror", 4096, params)
    assert isinstance(status, MirrorStatus)
    assert status.total_regions == 4096 // 64 and status.log_status == ("core",)
    status = wait_for(clean_dm, name, lambda s: s.in_sync)
    assert status.in_sync and status.health == "AA"
    nosync = MirrorParams(MirrorLog("core", 128, sync="nosync"),
                          (MirrorLeg(a, 8192), MirrorLeg(b, 8192)))
    _, _, ns = round_trip(clean_dm, make_device, "mirrorns", 4096, nosync)
    assert ns.in_sync  # nosync: no initial resync


def test_raid1(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    a, b = loop_device(16), loop_device(16)
    params = RaidParams("raid1", 0, (RaidDevice(None, a), RaidDevice(None, b)),
                        region_size_sectors=1024)
    name, _, status = round_trip(clean_dm, make_device, "raid1", 8192, params)
    assert isinstance(status, RaidStatus)
    assert status.raid_type == "raid1" and len(status.health) == 2
    status = wait_for(clean_dm, name, lambda s: s.in_sync)
    assert status.in_sync and status.health == "AA" and status.sync_total_sectors == 8192
    assert status.mismatch_count == 0 and status.journal == "-"


def test_raid1_with_metadata_devices(clean_dm: DM, loop_device: LoopDevice,
                                     make_device: MakeDevice) -> None:
    meta_a, a, meta_b, b = (loop_device(16) for _ in range(4))
    _zero(meta_a, 1 << 20)
    _zero(meta_b, 1 << 20)
    params = RaidParams("raid1", 0, (RaidDevice(meta_a, a), RaidDevice(meta_b, b)),
                        nosync=True, max_recovery_rate_kbs=100000, region_size_sectors=2048)
    _, _, status = round_trip(clean_dm, make_device, "raid1m", 8192, params)
    assert isinstance(status, RaidStatus) and status.raid_type == "raid1"


# -- multipath -------------------------------------------------------------


def test_multipath(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    a, b = loop_device(16), loop_device(16)
    # round-robin's repeat_count: the kernel ignores anything but 1 and prints 1.
    params = MultipathParams(
        (PathGroup((MultipathPath(a, ("1",)),)),
         PathGroup((MultipathPath(b, ("1", "5")),), "service-time")),
        pg_init_retries=3)
    name, built, status = round_trip(clean_dm, make_device, "mpath", _sectors(a), params)
    assert isinstance(status, MultipathStatus)
    assert not status.queueing_io and status.next_group == 1
    assert [len(g.paths) for g in status.groups] == [1, 1] and status.active_paths == 2
    assert status.groups[0].paths[0].device == built.groups[0].paths[0].device
    clean_dm.target_msg(name, 0, f"fail_path {built.groups[1].paths[0].device}")
    failed = status_of(clean_dm, name)
    assert failed.active_paths == 1 and failed.groups[1].paths[0].fail_count == 1


# -- verity, integrity -------------------------------------------------------


def test_verity(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    data, hashes = loop_device(16), loop_device(4)
    out = _sh("veritysetup", "format", data, hashes)
    fields = dict(row.split(":", 1) for row in out.splitlines() if ":" in row)
    root = fields["Root hash"].strip()
    salt = fields["Salt"].strip()
    data_blocks = int(fields["Data blocks"].strip())
    params = VerityParams(data_device=data, hash_device=hashes, data_blocks=data_blocks,
                          root_digest=root, salt=salt, hash_start_block=1,  # after the superblock
                          corruption_mode="ignore_corruption", ignore_zero_blocks=True,
                          check_at_most_once=True)
    name, _, status = round_trip(clean_dm, make_device, "verity", data_blocks * 8, params,
                                 flags=DmFlags.DM_READONLY)
    assert isinstance(status, VerityStatus)
    with open(_mapper(name), "rb") as f:
        f.read(1 << 20)
    assert status_of(clean_dm, name).valid


def test_integrity_direct(clean_dm: DM, loop_device: LoopDevice,
                          make_device: MakeDevice) -> None:
    loop, loop2 = loop_device(16), loop_device(16)
    _zero(loop, 1 << 20)
    built = IntegrityParams(loop, 0, 4, "D")
    name = make_device("integrity", [line(0, 8, built)])
    _, table = clean_dm.table_status(name, DmFlags.DM_STATUS_TABLE)
    assert _dmsetup("table", "--showkeys", name) == _text(table)
    kernel = IntegrityParams.from_params(table[0].params)
    # The kernel prints its defaults back; apart from those it is what we built.
    assert None not in (kernel.journal_sectors, kernel.interleave_sectors, kernel.buffer_sectors)
    assert kernel == dataclasses.replace(
        with_device_numbers(built), journal_sectors=kernel.journal_sectors,
        interleave_sectors=kernel.interleave_sectors, buffer_sectors=kernel.buffer_sectors)
    status = status_of(clean_dm, name)
    assert isinstance(status, IntegrityStatus)
    assert status.mismatches == 0 and status.provided_data_sectors > 8
    # Loading exactly what the kernel printed gives the same text back.
    _zero(loop2, 1 << 20)
    again = dataclasses.replace(kernel, device=loop2)
    round_trip(clean_dm, make_device, "integrity2", 8, again)


def test_integrity_journal_with_keys(clean_dm: DM, loop_device: LoopDevice,
                                     make_device: MakeDevice) -> None:
    loop = loop_device(16)
    _zero(loop, 4 << 20)
    params = IntegrityParams(
        loop, 0, 32, "J", journal_sectors=968, interleave_sectors=32768, buffer_sectors=128,
        journal_watermark_percent=50, commit_time_ms=10000,
        internal_hash=IntegrityAlg("hmac(sha256)", HMAC_KEY),
        journal_mac=IntegrityAlg("hmac(sha256)", HMAC_KEY))
    name, parsed, status = round_trip(clean_dm, make_device, "integrityk", 8, params)
    assert HMAC_KEY not in repr(parsed) and parsed.carries_key
    # The device was never formatted, so its tags do not match the HMAC of
    # the zeros: udev's probe reads count as mismatches. The kernel is right.
    assert isinstance(status, IntegrityStatus) and status.provided_data_sectors > 8
    assert status.recalculate_sector is None
    assert _dmsetup("table", name) == f"0 8 integrity {parsed.redacted()}\n"


# -- log-writes, writecache, dust --------------------------------------------


def test_log_writes(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    dev, log = loop_device(16), loop_device(16)
    name, _, status = round_trip(clean_dm, make_device, "logw", _sectors(dev),
                                 LogWritesParams(dev, log))
    assert isinstance(status, LogWritesStatus)
    _write(_mapper(name), 3 * 4096)
    after = status_of(clean_dm, name)
    assert after.logged_entries > status.logged_entries
    assert after.highest_allocated_sector >= status.highest_allocated_sector


def test_writecache(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    origin, cache = loop_device(32), loop_device(16)
    _zero(cache, 1 << 20)
    params = WritecacheParams(origin_device=origin, cache_device=cache, mode="s",
                              block_size_bytes=4096, high_watermark_percent=60,
                              low_watermark_percent=10, writeback_jobs=100,
                              autocommit_blocks=64, autocommit_time_ms=1000, max_age_ms=2000)
    name, _, status = round_trip(clean_dm, make_device, "wcache", _sectors(origin), params)
    assert isinstance(status, WritecacheStatus)
    assert status.error == 0 and status.total_blocks > 0
    assert status.free_blocks == status.total_blocks and status.writeback_blocks == 0
    plain = WritecacheParams(origin_device=origin, cache_device=cache)
    _remove(clean_dm, name)
    _zero(cache, 1 << 20)
    round_trip(clean_dm, make_device, "wcache0", _sectors(origin), plain)


def test_dust(clean_dm: DM, loop_device: LoopDevice, make_device: MakeDevice) -> None:
    if "dust" not in {v.name for v in clean_dm.list_versions()}:
        with contextlib.suppress(subprocess.CalledProcessError):
            _sh("modprobe", "dm_dust")
        if "dust" not in {v.name for v in clean_dm.list_versions()}:
            pytest.skip("this kernel has no dm-dust (Debian 6.1 lacks CONFIG_DM_DUST)")
    loop = loop_device(16)
    _, built, status = round_trip(clean_dm, make_device, "dust", 1024,
                                  DustParams(loop, 0, 4096))
    assert status == DustStatus(built.device, False, False)
