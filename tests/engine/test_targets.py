"""Target params/status builders and parsers, on the host (no kernel).

Real lines come from two places: the kernel's documentation
(Documentation/admin-guide/device-mapper/*.rst) and what Debian's 6.1
kernel printed for ``dmsetup table`` / ``dmsetup status`` in the lab.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

import pytest

from dmd.engine import InvalidArgument, TargetLine
from dmd.engine.targets import (
    PARAMS,
    STATUS,
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
    RawParams,
    SnapshotMergeParams,
    SnapshotOriginParams,
    SnapshotParams,
    SnapshotStatus,
    Stripe,
    StripedParams,
    StripedStatus,
    TargetFailed,
    TargetFailedError,
    TargetFormatError,
    TargetParams,
    ThinParams,
    ThinPoolParams,
    ThinPoolStatus,
    ThinStatus,
    VerityFec,
    VerityParams,
    VerityStatus,
    WritecacheParams,
    WritecacheStatus,
    ZeroParams,
    device_number,
    line,
    parse_params,
    parse_status,
    same_device,
    with_device_numbers,
)

KEY64 = "0123456789abcdef" * 8  # 64 bytes: aes-xts-plain64 with AES-256
HMAC_KEY = "fedcba9876543210" * 4
DIGEST = "4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076"
SALT = "1234000000000000000000000000000000000000000000000000000000000000"

REQUIRED_TARGETS = {
    "linear", "striped", "zero", "error", "crypt", "delay", "flakey", "snapshot",
    "snapshot-origin", "snapshot-merge", "thin-pool", "thin", "cache", "era", "mirror",
    "raid", "multipath", "verity", "integrity", "log-writes", "writecache", "dust",
}
STATUS_TARGETS = {
    "striped", "delay", "snapshot", "snapshot-merge", "thin-pool", "thin", "cache", "era",
    "mirror", "raid", "multipath", "verity", "integrity", "log-writes", "writecache", "dust",
}

# -- one or more rich objects per target: build -> to_params -> from_params ---

SAMPLES: list[TargetParams] = [
    LinearParams("/dev/loop0", 0),
    LinearParams("8:16", 2048),
    StripedParams(128, (Stripe("/dev/sda1", 0), Stripe("8:17", 64))),
    StripedParams(8, (Stripe("7:0", 0),)),
    ZeroParams(),
    ErrorParams(),
    CryptParams(cipher="aes-xts-plain64", key=KEY64, device="/dev/loop1"),
    CryptParams(cipher="aes-cbc-essiv:sha256", key=":32:logon:my_prefix:my_key",
                device="8:2", offset_sectors=4096, iv_offset_sectors=8, allow_discards=True,
                same_cpu_crypt=True, submit_from_crypt_cpus=True, no_read_workqueue=True,
                no_write_workqueue=True, integrity_tag_bytes=28, integrity_type="aead",
                sector_size_bytes=4096, iv_large_sectors=True, extra_options=("high_priority",)),
    CryptParams(cipher="capi:xts(aes)-plain64", key="-", device="7:0"),
    DelayParams(DelayClass("/dev/sdb", 0, 500)),
    DelayParams(DelayClass("8:16", 0, 0), DelayClass("8:32", 0, 400)),
    DelayParams(DelayClass("7:0", 0, 1), DelayClass("7:1", 8, 2), DelayClass("7:2", 16, 3)),
    FlakeyParams("/dev/sdb", 0, 5, 5),
    FlakeyParams("7:0", 8, 180, 1, error_reads=True, drop_writes=True,
                 corrupt_bio_byte=CorruptBioByte(32, "r", 1, 0),
                 random_read_corrupt=1000, random_write_corrupt=2000),
    FlakeyParams("7:0", 0, 1, 1, error_writes=True,
                 corrupt_bio_byte=CorruptBioByte(224, "w", 0, 32)),
    SnapshotParams("/dev/mapper/base", "/dev/loop2", chunk_size_sectors=16),
    SnapshotParams("254:11", "254:12", persistent=True, overflow=True, chunk_size_sectors=8,
                   discard_zeroes_cow=True, discard_passdown_origin=True),
    SnapshotParams("254:11", "254:12", persistent=False, chunk_size_sectors=32),
    SnapshotMergeParams("254:11", "254:12", chunk_size_sectors=16),
    SnapshotOriginParams("254:11"),
    ThinPoolParams("/dev/loop2", "/dev/loop3", 128, 32768),
    ThinPoolParams("7:2", "7:3", 1024, 0, skip_block_zeroing=True, ignore_discard=True,
                   no_discard_passdown=True, read_only=True, error_if_no_space=True),
    ThinParams("/dev/mapper/pool", 0),
    ThinParams("254:0", 7, "/dev/image"),
    CacheParams("/dev/mapper/metadata", "/dev/mapper/ssd", "/dev/mapper/origin", 512,
                "writeback"),
    CacheParams("7:2", "7:3", "7:4", 1024, "passthrough", metadata2=True,
                no_discard_passdown=True, policy="smq",
                policy_args=(("migration_threshold", "2048"),)),
    EraParams("/dev/loop2", "/dev/loop3", 128),
    MirrorParams(MirrorLog("core", 1024), (MirrorLeg("253:1", 0), MirrorLeg("253:2", 0)),
                 handle_errors=True),
    MirrorParams(MirrorLog("disk", 64, "7:2", "nosync"),
                 (MirrorLeg("7:0", 0), MirrorLeg("7:1", 8), MirrorLeg("7:5", 16)),
                 handle_errors=True, keep_log=True),
    MirrorParams(MirrorLog("userspace", args=("3", "uuid1", "clustered-disk", "253:3")),
                 (MirrorLeg("7:0"), MirrorLeg("7:1"))),
    RaidParams("raid4", 2048, (RaidDevice(None, "8:17"), RaidDevice(None, "8:33"))),
    RaidParams("raid1", 0, (RaidDevice("7:0", "7:1"), RaidDevice(None, None)),
               sync=True, rebuild=(1,), daemon_sleep_ms=50, min_recovery_rate_kbs=10,
               max_recovery_rate_kbs=1000, write_mostly=(0,), max_write_behind=256,
               region_size_sectors=1024, data_offset_sectors=2048),
    RaidParams("raid10", 64, tuple(RaidDevice(None, f"8:{i}") for i in range(4)),
               nosync=True, stripe_cache=256, raid10_copies=2, raid10_format="far",
               delta_disks=-1, journal_dev="8:99", journal_mode="writeback"),
    MultipathParams((PathGroup((MultipathPath("/dev/loop0", ("1",)),)),)),
    MultipathParams(
        (PathGroup((MultipathPath("8:0", ("128", "1")), MultipathPath("8:16", ("128", "4"))),
                   "service-time"),
         PathGroup((MultipathPath("8:32", ("128",)),), "queue-length", ("0",))),
        initial_group=2, queue_if_no_path=True, pg_init_retries=3, pg_init_delay_msecs=100,
        retain_attached_hw_handler=True, queue_mode="bio", hw_handler=("alua",)),
    VerityParams(data_device="/dev/sda1", hash_device="/dev/sda2", data_blocks=262144,
                 root_digest=DIGEST, salt=SALT, hash_start_block=1),
    VerityParams(data_device="7:0", hash_device="7:1", data_blocks=16384,
                 root_digest=DIGEST.upper(), salt=None, version=0, data_block_bytes=1024,
                 corruption_mode="restart_on_corruption", error_mode="restart_on_error",
                 ignore_zero_blocks=True, check_at_most_once=True, try_verify_in_tasklet=True,
                 fec=VerityFec("7:2", 16500, 0, 2), root_hash_sig_key_desc="verity:key"),
    IntegrityParams("/dev/loop0", 0, 4, "D"),
    IntegrityParams("7:2", 0, 32, "J", journal_sectors=968, interleave_sectors=32768,
                    buffer_sectors=128, journal_watermark_percent=50, commit_time_ms=10000,
                    internal_hash=IntegrityAlg("hmac(sha256)", HMAC_KEY),
                    journal_crypt=IntegrityAlg("ctr(aes)", HMAC_KEY),
                    journal_mac=IntegrityAlg("hmac(sha256)", HMAC_KEY)),
    IntegrityParams("7:2", 8, 4, "B", meta_device="7:3", block_size_bytes=4096,
                    recalculate=True, reset_recalculate=True, allow_discards=True,
                    sectors_per_bit=8, bitmap_flush_interval_ms=10000, fix_padding=True,
                    fix_hmac=True, legacy_recalculate=True,
                    internal_hash=IntegrityAlg("crc32c"), extra_args=("future_arg:1",)),
    LogWritesParams("/dev/loop0", "/dev/loop1"),
    WritecacheParams(origin_device="/dev/loop0", cache_device="/dev/loop1"),
    WritecacheParams(origin_device="7:0", cache_device="7:1", mode="p",
                     block_size_bytes=512, start_sector=16, high_watermark_percent=60,
                     low_watermark_percent=10, writeback_jobs=100, autocommit_blocks=64,
                     autocommit_time_ms=1000, max_age_ms=2000, cleaner=True, fua=False,
                     metadata_only=True, pause_writeback_ms=3000),
    DustParams("/dev/vdb1", 0, 4096),
]


def test_registry_covers_every_required_target() -> None:
    assert set(PARAMS) >= REQUIRED_TARGETS
    assert set(STATUS) == STATUS_TARGETS
    for name, cls in PARAMS.items():
        assert cls.target_type == name
    for name, status_cls in STATUS.items():
        assert status_cls.target_type == name
    assert {type(s).target_type for s in SAMPLES} == set(PARAMS)


@pytest.mark.parametrize("params", SAMPLES, ids=lambda p: type(p).__name__)
def test_round_trip(params: TargetParams) -> None:
    text = params.to_params()
    assert type(params).from_params(text) == params
    assert parse_params(params.target_type, text) == params
    assert type(params).from_params(f"  {text}  ") == params  # the kernel's stray blanks


# -- real table lines: parse, compare, and print back identically -------------

# (target, params as the kernel printed them, expected object)
KERNEL_TABLES: list[tuple[str, str, TargetParams]] = [
    ("linear", "7:0 8", LinearParams("7:0", 8)),
    ("striped", "2 128 7:0 0 7:1 0",
     StripedParams(128, (Stripe("7:0", 0), Stripe("7:1", 0)))),
    ("striped", "3 8 7:0 0 7:1 16 7:2 32",
     StripedParams(8, (Stripe("7:0", 0), Stripe("7:1", 16), Stripe("7:2", 32)))),
    ("zero", "", ZeroParams()),
    ("error", "", ErrorParams()),
    ("crypt", f"aes-xts-plain64 {KEY64} 0 7:0 0 3 allow_discards sector_size:4096 "
     "iv_large_sectors",
     CryptParams(cipher="aes-xts-plain64", key=KEY64, device="7:0", allow_discards=True,
                 sector_size_bytes=4096, iv_large_sectors=True)),
    ("crypt", f"aes-xts-plain64 {KEY64} 7 7:0 16 2 same_cpu_crypt no_read_workqueue",
     CryptParams(cipher="aes-xts-plain64", key=KEY64, device="7:0", offset_sectors=16,
                 iv_offset_sectors=7, same_cpu_crypt=True, no_read_workqueue=True)),
    ("crypt", "aes-cbc-essiv:sha256 :32:logon:my_prefix:my_key 0 /dev/sdb 0",  # dm-crypt.rst
     CryptParams(cipher="aes-cbc-essiv:sha256", key=":32:logon:my_prefix:my_key",
                 device="/dev/sdb")),
    ("delay", "7:0 0 100", DelayParams(DelayClass("7:0", 0, 100))),
    ("delay", "7:0 0 100 7:1 0 200",
     DelayParams(DelayClass("7:0", 0, 100), DelayClass("7:1", 0, 200))),
    ("flakey", "7:0 0 5 5 0 ", FlakeyParams("7:0", 0, 5, 5)),
    ("flakey", "7:0 0 5 5 1 error_writes ", FlakeyParams("7:0", 0, 5, 5, error_writes=True)),
    ("flakey", "7:0 0 5 5 6 drop_writes corrupt_bio_byte 32 r 1 0 ",
     FlakeyParams("7:0", 0, 5, 5, drop_writes=True,
                  corrupt_bio_byte=CorruptBioByte(32, "r", 1, 0))),
    ("snapshot-origin", "254:0", SnapshotOriginParams("254:0")),
    ("snapshot", "254:0 7:1 P 16", SnapshotParams("254:0", "7:1", chunk_size_sectors=16)),
    ("snapshot", "254:0 7:2 N 8",
     SnapshotParams("254:0", "7:2", persistent=False, chunk_size_sectors=8)),
    ("snapshot-merge", "254:0 7:1 P 16",
     SnapshotMergeParams("254:0", "7:1", chunk_size_sectors=16)),
    ("thin-pool", "7:2 7:3 128 32768 2 skip_block_zeroing error_if_no_space ",
     ThinPoolParams("7:2", "7:3", 128, 32768, skip_block_zeroing=True,
                    error_if_no_space=True)),
    ("thin-pool", "7:2 7:3 128 0 0 ", ThinPoolParams("7:2", "7:3", 128, 0)),
    ("thin-pool", "7:2 7:3 128 100 3 skip_block_zeroing ignore_discard no_discard_passdown ",
     ThinPoolParams("7:2", "7:3", 128, 100, skip_block_zeroing=True, ignore_discard=True,
                    no_discard_passdown=True)),
    ("thin-pool", "7:2 7:3 128 100 1 read_only ",
     ThinPoolParams("7:2", "7:3", 128, 100, read_only=True)),
    ("thin", "254:0 0", ThinParams("254:0", 0)),
    ("thin", "254:0 7 7:4", ThinParams("254:0", 7, "7:4")),
    ("cache", "7:2 7:3 7:4 512 1 writethrough default 0",
     CacheParams("7:2", "7:3", "7:4", 512, "writethrough")),
    ("cache", "7:2 7:3 7:4 512 2 metadata2 writeback smq 2 migration_threshold 2048",
     CacheParams("7:2", "7:3", "7:4", 512, "writeback", metadata2=True, policy="smq",
                 policy_args=(("migration_threshold", "2048"),))),
    ("cache", "7:2 7:3 7:4 128 2 writeback no_discard_passdown cleaner 0",
     CacheParams("7:2", "7:3", "7:4", 128, "writeback", no_discard_passdown=True,
                 policy="cleaner")),
    ("cache", "/dev/mapper/metadata /dev/mapper/ssd /dev/mapper/origin 1024 1 writeback "
     "mq 4 sequential_threshold 1024 random_threshold 8",  # cache.rst
     CacheParams("/dev/mapper/metadata", "/dev/mapper/ssd", "/dev/mapper/origin", 1024,
                 "writeback", policy="mq",
                 policy_args=(("sequential_threshold", "1024"), ("random_threshold", "8")))),
    ("era", "7:2 7:3 128", EraParams("7:2", "7:3", 128)),
    ("mirror", "core 1 64 2 7:0 0 7:1 0 1 handle_errors",
     MirrorParams(MirrorLog("core", 64), (MirrorLeg("7:0"), MirrorLeg("7:1")),
                  handle_errors=True)),
    ("mirror", "core 2 64 nosync 2 7:0 0 7:1 0",
     MirrorParams(MirrorLog("core", 64, sync="nosync"), (MirrorLeg("7:0"), MirrorLeg("7:1")))),
    ("mirror", "disk 2 7:2 64 2 7:0 0 7:1 0",
     MirrorParams(MirrorLog("disk", 64, "7:2"), (MirrorLeg("7:0"), MirrorLeg("7:1")))),
    ("raid", "raid1 3 0 region_size 1024 2 - 7:0 - 7:1",
     RaidParams("raid1", 0, (RaidDevice(None, "7:0"), RaidDevice(None, "7:1")),
                region_size_sectors=1024)),
    ("raid", "raid1 1 0 2 7:2 7:3 7:4 7:5",
     RaidParams("raid1", 0, (RaidDevice("7:2", "7:3"), RaidDevice("7:4", "7:5")))),
    ("raid", "raid5_ls 3 128 min_recovery_rate 10 3 - 7:0 - 7:1 - 7:5",
     RaidParams("raid5_ls", 128, (RaidDevice(None, "7:0"), RaidDevice(None, "7:1"),
                                  RaidDevice(None, "7:5")), min_recovery_rate_kbs=10)),
    ("raid", "raid4 4 2048 sync min_recovery_rate 20 5 8:17 8:18 8:33 8:34 8:49 8:50 "
     "8:65 8:66 8:81 8:82",  # dm-raid.rst
     RaidParams("raid4", 2048, tuple(RaidDevice(f"8:{m}", f"8:{m + 1}")
                                     for m in (17, 33, 49, 65, 81)),
                sync=True, min_recovery_rate_kbs=20)),
    ("multipath", "0 0 1 1 round-robin 0 1 1 7:0 1 ",
     MultipathParams((PathGroup((MultipathPath("7:0", ("1",)),)),))),
    ("multipath", "1 queue_if_no_path 0 2 1 round-robin 0 1 1 7:0 1 service-time 0 1 2 "
     "7:1 1 5 ",
     MultipathParams((PathGroup((MultipathPath("7:0", ("1",)),)),
                      PathGroup((MultipathPath("7:1", ("1", "5")),), "service-time")),
                     queue_if_no_path=True)),
    ("multipath", "3 queue_if_no_path pg_init_retries 3 0 2 2 round-robin 0 1 1 7:0 1 "
     "queue-length 0 1 1 7:1 1 ",
     MultipathParams((PathGroup((MultipathPath("7:0", ("1",)),)),
                      PathGroup((MultipathPath("7:1", ("1",)),), "queue-length")),
                     initial_group=2, queue_if_no_path=True, pg_init_retries=3)),
    ("multipath", "3 retain_attached_hw_handler queue_mode bio 0 1 1 round-robin 0 1 1 7:0 1 ",
     MultipathParams((PathGroup((MultipathPath("7:0", ("1",)),)),),
                     retain_attached_hw_handler=True, queue_mode="bio")),
    ("multipath", "0 0 1 1 service-time 0 2 2 8:0 128 1 8:16 128 4",  # dm-service-time.rst
     MultipathParams((PathGroup((MultipathPath("8:0", ("128", "1")),
                                 MultipathPath("8:16", ("128", "4"))), "service-time"),))),
    ("verity", f"1 7:0 7:1 4096 4096 16384 1 sha256 {DIGEST} {SALT}",
     VerityParams(data_device="7:0", hash_device="7:1", data_blocks=16384, root_digest=DIGEST,
                  salt=SALT, hash_start_block=1)),
    ("verity", f"1 7:0 7:1 4096 4096 16384 1 sha256 {DIGEST} {SALT} 1 ignore_corruption",
     VerityParams(data_device="7:0", hash_device="7:1", data_blocks=16384, root_digest=DIGEST,
                  salt=SALT, hash_start_block=1, corruption_mode="ignore_corruption")),
    ("integrity", "7:0 0 4 D 3 journal_sectors:880 interleave_sectors:32768 buffer_sectors:128",
     IntegrityParams("7:0", 0, 4, "D", journal_sectors=880, interleave_sectors=32768,
                     buffer_sectors=128)),
    ("integrity", "7:1 0 4 J 8 journal_sectors:880 interleave_sectors:32768 buffer_sectors:128 "
     "journal_watermark:50 commit_time:10000 fix_padding fix_hmac internal_hash:crc32c",
     IntegrityParams("7:1", 0, 4, "J", journal_sectors=880, interleave_sectors=32768,
                     buffer_sectors=128, journal_watermark_percent=50, commit_time_ms=10000,
                     fix_padding=True, fix_hmac=True, internal_hash=IntegrityAlg("crc32c"))),
    ("integrity", "7:2 0 4 B 7 block_size:4096 journal_sectors:784 interleave_sectors:32768 "
     "buffer_sectors:128 sectors_per_bit:8 bitmap_flush_interval:10000 internal_hash:crc32c",
     IntegrityParams("7:2", 0, 4, "B", block_size_bytes=4096, journal_sectors=784,
                     interleave_sectors=32768, buffer_sectors=128, sectors_per_bit=8,
                     bitmap_flush_interval_ms=10000, internal_hash=IntegrityAlg("crc32c"))),
    ("integrity", f"7:2 0 32 J 7 journal_sectors:968 interleave_sectors:32768 "
     f"buffer_sectors:128 journal_watermark:50 commit_time:10000 "
     f"internal_hash:hmac(sha256):{HMAC_KEY} journal_mac:hmac(sha256):{HMAC_KEY}",
     IntegrityParams("7:2", 0, 32, "J", journal_sectors=968, interleave_sectors=32768,
                     buffer_sectors=128, journal_watermark_percent=50, commit_time_ms=10000,
                     internal_hash=IntegrityAlg("hmac(sha256)", HMAC_KEY),
                     journal_mac=IntegrityAlg("hmac(sha256)", HMAC_KEY))),
    ("log-writes", "7:0 7:1", LogWritesParams("7:0", "7:1")),
    ("writecache", "s 7:0 7:1 4096 0",
     WritecacheParams(origin_device="7:0", cache_device="7:1")),
    ("writecache", "s 7:0 7:1 512 10 start_sector 16 low_watermark 10 autocommit_blocks 64 "
     "autocommit_time 1000 max_age 2000",
     WritecacheParams(origin_device="7:0", cache_device="7:1", block_size_bytes=512,
                      start_sector=16, low_watermark_percent=10, autocommit_blocks=64,
                      autocommit_time_ms=1000, max_age_ms=2000)),
    ("dust", "252:17 0 4096", DustParams("252:17", 0, 4096)),  # dm-dust.rst
]


@pytest.mark.parametrize(("target", "text", "expected"), KERNEL_TABLES,
                         ids=[f"{t[0]}-{i}" for i, t in enumerate(KERNEL_TABLES)])
def test_kernel_table_lines(target: str, text: str, expected: TargetParams) -> None:
    parsed = parse_params(target, text)
    assert parsed == expected
    # Printing back gives the kernel's own text (it uses the same order).
    assert expected.to_params() == text.strip()


def test_what_the_kernel_reorders_still_parses_equal() -> None:
    # dm-raid prints options in its fixed order, repeated ones sorted.
    loaded = RaidParams.from_params(
        "raid1 10 0 region_size 1024 write_mostly 1 nosync rebuild 1 rebuild 0 2 - 7:0 - 7:1")
    printed = RaidParams.from_params(
        "raid1 10 0 nosync rebuild 0 rebuild 1 write_mostly 1 region_size 1024 2 - 7:0 - 7:1")
    assert loaded == printed and loaded.rebuild == (0, 1)
    # thin-pool, crypt, flakey: features in any order
    assert ThinPoolParams.from_params("7:2 7:3 128 0 2 error_if_no_space skip_block_zeroing") \
        == ThinPoolParams("7:2", "7:3", 128, 0, skip_block_zeroing=True, error_if_no_space=True)
    assert CryptParams.from_params(f"aes-xts-plain64 {KEY64} 0 7:0 0 2 iv_large_sectors "
                                   "allow_discards").to_params().endswith(
        "2 allow_discards iv_large_sectors")
    # optional groups may be left out or be "0"
    assert CryptParams.from_params(f"aes-xts-plain64 {KEY64} 0 7:0 0 0") == \
        CryptParams.from_params(f"aes-xts-plain64 {KEY64} 0 7:0 0")
    assert FlakeyParams.from_params("7:0 0 5 5") == FlakeyParams("7:0", 0, 5, 5)
    # an upper-case hex key comes back from the kernel in lower case
    upper = CryptParams(cipher="aes-xts-plain64", key=KEY64.upper(), device="7:0")
    assert upper == CryptParams(cipher="aes-xts-plain64", key=KEY64, device="7:0")


def test_unknown_options_are_kept() -> None:
    pool = ThinPoolParams.from_params("7:2 7:3 128 0 2 skip_block_zeroing future_flag")
    assert pool.extra_features == ("future_flag",)
    assert ThinPoolParams.from_params(pool.to_params()) == pool
    raid = RaidParams.from_params("raid1 2 0 future 2 - 7:0 - 7:1")
    assert raid.extra_options == ("future",)


# -- status lines ---------------------------------------------------------


def test_status_striped() -> None:
    st = StripedStatus.from_status("2 7:0 7:1 1 AA")
    assert st == StripedStatus(("7:0", "7:1"), "AA") and st.all_alive
    assert StripedStatus.from_status("3 7:0 7:1 7:2 1 ADA").all_alive is False


def test_status_delay() -> None:
    assert DelayStatus.from_status("0 0 0") == DelayStatus(0, 0, 0)
    assert DelayStatus.from_status("3 4") == DelayStatus(3, 4, None)
    assert DelayStatus.from_status("1 2 3 9 9").extra == ("9", "9")


def test_status_snapshot() -> None:
    assert SnapshotStatus.from_status("32/131072 32") == SnapshotStatus("valid", 32, 131072, 32)
    assert SnapshotStatus.from_status("0/131072 0").allocated_sectors == 0
    for state in ("Invalid", "Merge failed", "Overflow", "Unknown"):
        st = SnapshotStatus.from_status(state)
        assert st.state == state and not st.valid and st.allocated_sectors is None
    assert parse_status("snapshot-merge", "32/131072 32").total_sectors == 131072  # type: ignore[union-attr]
    with pytest.raises(TargetFormatError):
        SnapshotStatus.from_status("Weird")


def test_status_thin_pool() -> None:
    st = ThinPoolStatus.from_status(
        "0 1649/16384 2/1024 - rw discard_passdown error_if_no_space - 1024 ")
    assert st == ThinPoolStatus(0, 1649, 16384, 2, 1024, None, "rw", "discard_passdown",
                                "error_if_no_space", False, 1024)
    st = ThinPoolStatus.from_status(
        "0 1650/16384 0/1024 19 ro discard_passdown queue_if_no_space needs_check 1024 new")
    assert st.held_metadata_root == 19 and st.read_only and st.needs_check
    assert st.extra == ("new",)
    # Linux 3.x printed fewer fields
    old = ThinPoolStatus.from_status("1 10/100 20/200 - rw discard_passdown")
    assert old.no_space_policy is None and old.metadata_low_water_mark_blocks is None
    assert parse_status("thin-pool", "Fail") == TargetFailed("thin-pool", "Fail")
    with pytest.raises(TargetFailedError):
        ThinPoolStatus.from_status("Fail")


def test_status_thin() -> None:
    assert ThinStatus.from_status("0 -") == ThinStatus(0, None)
    assert ThinStatus.from_status("256 255") == ThinStatus(256, 255)
    assert parse_status("thin", "Error") == TargetFailed("thin", "Error")


def test_status_cache() -> None:
    st = CacheStatus.from_status(
        "8 8/16384 512 3/256 29 67 0 0 0 3 0 1 writethrough 2 migration_threshold 2048 "
        "smq 0 rw - ")
    assert (st.metadata_block_sectors, st.used_metadata_blocks, st.total_metadata_blocks) == \
        (8, 8, 16384)
    assert (st.cache_block_sectors, st.used_cache_blocks, st.total_cache_blocks) == (512, 3, 256)
    assert (st.read_hits, st.read_misses, st.promotions, st.dirty_blocks) == (29, 67, 3, 0)
    assert st.features == ("writethrough",) and st.io_mode == "writethrough"
    assert st.migration_threshold == 2048 and st.policy == "smq" and st.policy_args == ()
    assert st.metadata_mode == "rw" and not st.needs_check and st.extra == ()
    wb = CacheStatus.from_status(
        "8 10/16384 512 1/256 0 48 0 0 0 1 0 2 metadata2 writeback 2 migration_threshold 2048 "
        "smq 0 rw needs_check")
    assert wb.io_mode == "writeback" and wb.needs_check
    assert parse_status("cache", "Fail") == TargetFailed("cache", "Fail")


def test_status_era() -> None:
    assert EraStatus.from_status("8 11/16384 1 -") == EraStatus(8, 11, 16384, 1, None)
    assert EraStatus.from_status("8 17/16384 3 26").held_metadata_root == 26


def test_status_mirror() -> None:
    st = MirrorStatus.from_status("2 7:0 7:1 64/64 1 AA 1 core")
    assert st == MirrorStatus(("7:0", "7:1"), 64, 64, "AA", ("core",)) and st.in_sync
    disk = MirrorStatus.from_status("2 7:0 7:1 3/64 1 AD 3 disk 7:2 A")
    assert disk.log_status == ("disk", "7:2", "A") and not disk.in_sync


def test_status_raid() -> None:
    st = RaidStatus.from_status("raid1 2 AA 8192/8192 idle 0 0 -")
    assert st == RaidStatus("raid1", "AA", 8192, 8192, "idle", 0, 0, "-") and st.in_sync
    doc = RaidStatus.from_status("raid4 5 AAAAA 2/490221568 init 0")  # dm-raid.rst
    assert doc.sync_action == "init" and doc.data_offset_sectors is None and not doc.in_sync
    with pytest.raises(TargetFormatError):
        RaidStatus.from_status("raid1 3 AA 1/2 idle 0 0 -")


def test_status_multipath() -> None:
    st = MultipathStatus.from_status("2 0 0 0 1 1 A 0 1 0 7:0 A 0 ")
    assert not st.queueing_io and st.pg_init_count == 0 and st.next_group == 1
    assert st.groups[0].state == "A" and st.groups[0].paths[0].device == "7:0"
    assert st.active_paths == 1
    failed = MultipathStatus.from_status(
        "2 0 0 0 2 2 E 0 1 0 7:0 F 1 A 0 1 1 7:1 A 0 0 ")
    assert failed.groups[0].paths[0].fail_count == 1 and failed.active_paths == 1
    assert failed.groups[1].paths[0].selector_info == ("0",)
    doc = MultipathStatus.from_status(  # dm-service-time.rst
        "2 0 0 0 1 1 E 0 2 2 8:0 A 0 0 1 8:16 A 0 0 4")
    assert [p.selector_info for p in doc.groups[0].paths] == [("0", "1"), ("0", "4")]


def test_status_verity_integrity_logwrites_writecache_dust() -> None:
    assert VerityStatus.from_status("V") == VerityStatus("V")
    assert VerityStatus.from_status("C -") == VerityStatus("C", None)
    assert VerityStatus.from_status("V 3").fec_corrected_blocks == 3
    assert IntegrityStatus.from_status("0 129160 -") == IntegrityStatus(0, 129160, None)
    assert IntegrityStatus.from_status("12 121904 64").recalculate_sector == 64
    assert LogWritesStatus.from_status("1 1") == LogWritesStatus(1, 1)
    wc = WritecacheStatus.from_status("0 16320 16320 0 261 0 0 0 0 0 0 0 0 0")
    assert (wc.error, wc.total_blocks, wc.free_blocks, wc.writeback_blocks) == (0, 16320,
                                                                                16320, 0)
    assert wc.reads == 261 and wc.discards == 0
    assert WritecacheStatus.from_status("0 10 9 1").reads is None  # before Linux 5.15
    dust = DustStatus.from_status("252:17 bypass verbose")  # dm-dust.rst
    assert dust == DustStatus("252:17", False, False)
    assert DustStatus.from_status("252:17 fail_read_on_bad_block quiet").quiet


def test_statuses_keep_unknown_trailing_fields() -> None:
    samples = {
        "striped": "1 7:0 1 A", "delay": "0 0 0", "snapshot": "32/131072 32",
        "snapshot-merge": "32/131072 32",
        "thin-pool": "0 1/2 3/4 - rw discard_passdown queue_if_no_space - 10",
        "thin": "0 -", "cache": "8 8/16384 512 3/256 1 2 3 4 5 6 7 0 0 smq 0 rw -",
        "era": "8 1/2 3 -", "mirror": "2 7:0 7:1 1/2 1 AA 1 core",
        "raid": "raid1 2 AA 1/2 idle 0 0 -", "multipath": "2 0 0 0 0 0",
        "verity": "V -", "integrity": "0 1 -", "log-writes": "1 2",
        "writecache": "0 1 2 3 4 5 6 7 8 9 10 11 12 13", "dust": "7:0 bypass quiet",
    }
    assert set(samples) == set(STATUS)
    for target, text in samples.items():
        plain: Any = parse_status(target, text)
        future: Any = parse_status(target, text + " new_field 42")
        assert future.extra[-2:] == ("new_field", "42"), target
        assert dataclasses.replace(future, extra=plain.extra) == plain


def test_targets_without_status_pass_through() -> None:
    for target in ("linear", "zero", "error", "crypt", "flakey", "snapshot-origin", "switch"):
        assert parse_status(target, "") == ""
    assert parse_status("vdo", "/dev/x normal - online online 1 2") == \
        "/dev/x normal - online online 1 2"


# -- unknown targets, the line helper -------------------------------------


def test_unknown_targets_pass_through() -> None:
    assert parse_params("switch", "2 128 0 7:0 0 7:1 0") == "2 128 0 7:0 0 7:1 0"
    assert parse_params("clone", "") == ""
    raw = RawParams("unstriped", "2 256 0 7:0 0")
    assert line(0, 2048, raw) == TargetLine(0, 2048, "unstriped", "2 256 0 7:0 0")


def test_line_helper() -> None:
    assert line(0, 1000, LinearParams("/dev/loop0", 8)) == \
        TargetLine(0, 1000, "linear", "/dev/loop0 8")
    assert line(1000, 24, ZeroParams()) == TargetLine(1000, 24, "zero", "")


# -- key material -----------------------------------------------------------


def _crypt() -> CryptParams:
    return CryptParams(cipher="aes-xts-plain64", key=KEY64, device="7:0")


def test_crypt_key_never_in_repr_or_str() -> None:
    params = _crypt()
    for text in (repr(params), str(params), f"{params}", f"{params!r}", repr([params])):
        assert KEY64 not in text and "key=" not in text
    assert KEY64 in params.to_params()  # the kernel needs it
    redacted = params.redacted()
    assert KEY64 not in redacted
    assert redacted == f"aes-xts-plain64 {'0' * 128} 0 7:0 0"
    keyring = CryptParams(cipher="aes-xts-plain64", key=":64:logon:dmd:k1", device="7:0")
    assert keyring.redacted() == keyring.to_params() and keyring.key_in_keyring


def test_integrity_keys_never_in_repr() -> None:
    params = IntegrityParams("7:2", 0, 32, "J",
                             internal_hash=IntegrityAlg("hmac(sha256)", HMAC_KEY),
                             journal_crypt=IntegrityAlg("ctr(aes)", HMAC_KEY),
                             journal_mac=IntegrityAlg("hmac(sha256)", HMAC_KEY))
    assert params.carries_key
    assert HMAC_KEY not in repr(params) and HMAC_KEY not in str(params)
    assert HMAC_KEY in params.to_params()
    assert HMAC_KEY not in params.redacted()
    assert "internal_hash:hmac(sha256):" + "0" * 64 in params.redacted()
    assert not IntegrityParams("7:2", 0, 4, "J", internal_hash=IntegrityAlg("crc32c")).carries_key


def test_parse_errors_do_not_quote_keys() -> None:
    secret = "f00d" * 32
    bad = [f"aes-xts-plain64 {secret} notanumber 7:0 0",
           f"aes-xts-plain64 {secret} 0 7:0 0 5 allow_discards",
           f"aes-xts-plain64 {secret}"]
    for text in bad:
        with pytest.raises(TargetFormatError) as info:
            CryptParams.from_params(text)
        assert secret not in str(info.value)
    with pytest.raises(TargetFormatError) as info:
        IntegrityParams.from_params(f"7:2 x 32 J 1 internal_hash:hmac(sha256):{secret}")
    assert secret not in str(info.value)
    with pytest.raises(InvalidArgument) as err:
        CryptParams(cipher="aes-xts-plain64", key=secret + " x", device="7:0")
    assert secret not in str(err.value)


# -- validation ---------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: LinearParams("/dev/my disk", 0),
    lambda: LinearParams("", 0),
    lambda: LinearParams("7:0", -1),
    lambda: StripedParams(8, ()),
    lambda: CryptParams(cipher="aes", key="xyz", device="7:0"),
    lambda: CryptParams(cipher="aes", key=KEY64, device="7:0", integrity_tag_bytes=4),
    lambda: DelayParams(DelayClass("7:0"), None, DelayClass("7:1")),
    lambda: FlakeyParams("7:0", drop_writes=True, error_writes=True),
    lambda: CorruptBioByte(0, "r", 1),
    lambda: CorruptBioByte(1, "x", 1),
    lambda: SnapshotParams("7:0", "7:1", persistent=False, overflow=True),
    lambda: CacheParams("7:0", "7:1", "7:2", io_mode="writearound"),
    lambda: MirrorParams(MirrorLog("core", 64), (MirrorLeg("7:0"),)),
    lambda: MirrorLog("core"),
    lambda: MirrorLog("disk", 64),
    lambda: RaidParams("raid1", 0, (RaidDevice(None, "7:0"),), sync=True, nosync=True),
    lambda: PathGroup(()),
    lambda: PathGroup((MultipathPath("7:0", ("1",)), MultipathPath("7:1"))),
    lambda: MultipathParams((PathGroup((MultipathPath("7:0"),)),), initial_group=2),
    lambda: VerityParams(data_device="7:0", hash_device="7:1", data_blocks=1,
                         root_digest=DIGEST, corruption_mode="explode"),
    lambda: IntegrityParams("7:0", mode="X"),
    lambda: IntegrityAlg("hmac(sha256)", "not hex"),
    lambda: WritecacheParams(origin_device="7:0", cache_device="7:1", mode="x"),
])
def test_invalid_builds_are_refused(build: Any) -> None:
    with pytest.raises(InvalidArgument):
        build()


@pytest.mark.parametrize(("target", "text"), [
    ("linear", "7:0"),
    ("linear", "7:0 abc"),
    ("linear", "7:0 0 surplus"),
    ("striped", "3 8 7:0 0"),
    ("thin-pool", "7:2 7:3 128 0 3 skip_block_zeroing"),
    ("cache", "7:2 7:3 7:4 512 0 smq 1 migration_threshold"),
    ("raid", "raid1 0 2 - 7:0 - 7:1"),
    ("multipath", "0 0 1 1 round-robin 0 2 1 7:0 1"),
    ("verity", "1 7:0 7:1 4096 4096 16384 1 sha256"),
    ("snapshot", "7:0 7:1 X 16"),
    ("flakey", "7:0 0 5 5 1 corrupt_bio_byte"),
    ("integrity", "7:0 0 4 Q 0"),
])
def test_malformed_lines_raise(target: str, text: str) -> None:
    with pytest.raises(TargetFormatError):
        parse_params(target, text)


# -- devices ------------------------------------------------------------------


class _BlockStat:
    """Just what device_number reads from a stat result."""

    def __init__(self, rdev: int) -> None:
        self.st_mode = stat.S_IFBLK | 0o660
        self.st_rdev = rdev


def _fake_block_stat(monkeypatch: pytest.MonkeyPatch, devices: dict[str, tuple[int, int]]
                     ) -> None:
    # The host has no loop devices to spare; pretend these paths are block devices.
    real_stat = os.stat

    def fake_stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path in devices:
            return _BlockStat(os.makedev(*devices[path]))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", fake_stat)


def test_device_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_block_stat(monkeypatch, {"/dev/loop0": (7, 0), "/dev/loop1": (7, 1),
                                   "/dev/mapper/pool": (254, 3)})
    assert device_number("7:0") == (7, 0)
    assert device_number("/dev/loop1") == (7, 1)
    assert same_device("/dev/loop0", "7:0") and not same_device("/dev/loop0", "7:1")
    built = ThinPoolParams("/dev/loop0", "/dev/loop1", 128, 0)
    assert with_device_numbers(built) == ThinPoolParams("7:0", "7:1", 128, 0)
    thin = ThinParams("/dev/mapper/pool", 1, "/dev/loop0")
    assert with_device_numbers(thin) == ThinParams("254:3", 1, "7:0")
    raid = RaidParams("raid1", 0, (RaidDevice(None, "/dev/loop0"), RaidDevice(None, "7:1")))
    assert with_device_numbers(raid).devices == (RaidDevice(None, "7:0"), RaidDevice(None, "7:1"))
    mp = MultipathParams((PathGroup((MultipathPath("/dev/loop1", ("1",)),)),))
    assert with_device_numbers(mp).groups[0].paths[0].device == "7:1"
    crypt = CryptParams(cipher="aes-xts-plain64", key=KEY64, device="/dev/loop0")
    assert with_device_numbers(crypt).key == KEY64  # only devices change


def test_device_number_refuses_non_block_files(tmp_path: Any) -> None:
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(InvalidArgument):
        device_number(str(regular))
