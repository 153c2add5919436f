"""Signatures dmd must see before it lays a pool over a device, and the thin
pool's sizing rules (pure functions: no kernel needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmd.engine.blockdev import POOL_MAGIC, PROBE_BYTES, list_disks, probe_signature
from dmd.engine.targets import thin


def _head(offset: int, magic: bytes) -> bytes:
    head = bytearray(PROBE_BYTES)
    head[offset:offset + len(magic)] = magic
    return bytes(head)


@pytest.mark.parametrize(("offset", "magic", "name"), [
    (0, POOL_MAGIC, "dmd_pool"),
    (0, b"LUKS\xba\xbe\x00\x02", "crypto_LUKS"),
    (0, b"XFSB", "xfs"),
    (0x438, b"\x53\xef", "ext4"),
    (0x10040, b"_BHRfS_M", "btrfs"),
    (512, b"LABELONE\x01\x00\x00\x00", "LVM2_member"),
    (4096, b"\xfc\x4e\x2b\xa9", "linux_raid_member"),
    (4086, b"SWAPSPACE2", "swap"),
    (512, b"EFI PART", "gpt"),
])
def test_signatures_are_found(offset: int, magic: bytes, name: str) -> None:
    assert probe_signature(_head(offset, magic)) == name


def test_zeroed_device_has_no_signature() -> None:
    assert probe_signature(bytes(PROBE_BYTES)) is None
    assert probe_signature(b"") is None


def test_mbr_counts_only_with_a_partition() -> None:
    head = bytearray(PROBE_BYTES)
    head[510:512] = b"\x55\xaa"
    assert probe_signature(bytes(head)) is None  # a boot sector without partitions
    head[446 + 4] = 0x83
    assert probe_signature(bytes(head)) == "dos"


def test_metadata_size_follows_the_kernel_rule() -> None:
    block = 128  # 64 KiB
    # Small pools get the 2 MiB floor.
    assert thin.metadata_sectors(2048 * 100, block) == 4096
    # 48 bytes a block: 1 TiB of 64 KiB blocks is 16 Mi blocks, 768 MiB.
    tib = 2 * 1024 ** 3
    assert thin.metadata_sectors(tib, block) == 768 * 2048
    # Never beyond what the kernel uses.
    assert thin.metadata_sectors(1 << 50, block) == thin.MAX_METADATA_SECTORS
    assert thin.metadata_sectors(tib, block) % 8 == 0


def test_block_sizes_the_kernel_takes() -> None:
    assert thin.valid_block_sectors(128) and thin.valid_block_sectors(2048)
    assert not thin.valid_block_sectors(64) and not thin.valid_block_sectors(192 + 1)
    assert not thin.valid_block_sectors(4 * 1024 * 1024)


def test_messages_refuse_ids_out_of_range() -> None:
    assert thin.create_snap(2, 1) == "create_snap 2 1"
    with pytest.raises(ValueError):
        thin.create_thin(1 << 24)
    with pytest.raises(ValueError):
        thin.delete(-1)
    with pytest.raises(ValueError):
        thin.set_transaction_id(0, 1 << 64)


def test_disks_are_listed_from_sysfs_alone(tmp_path: Path) -> None:
    """Disks and partitions with a size, loop devices bound to a file; no
    device-mapper device, RAM disk, floppy, optical drive or empty loop."""
    for name, sectors in [("sda", 2048), ("sda1", 1024), ("loop0", 4096), ("loop1", 0),
                          ("dm-0", 2048), ("ram0", 8192), ("zram0", 8192), ("sr0", 2048),
                          ("fd0", 2880), ("nvme0n1", 8192), ("broken", None)]:
        (tmp_path / name).mkdir()
        if sectors is not None:
            (tmp_path / name / "size").write_text(f"{sectors}\n")
    assert [d.path for d in list_disks(str(tmp_path))] == [
        "/dev/loop0", "/dev/nvme0n1", "/dev/sda", "/dev/sda1"]
    assert list_disks(str(tmp_path / "nothing")) == []


def test_a_partition_knows_its_disk_and_a_held_one_says_so(tmp_path: Path) -> None:
    """sysfs's class folder links each device into the tree of disks: a
    partition's folder lies in its disk's; holders/ lists what is stacked."""
    tree, listed = tmp_path / "devices", tmp_path / "class"
    for rel, sectors, holders in [("sda", 8192, []), ("sda/sda1", 4096, ["dm-0"])]:
        (tree / rel / "holders").mkdir(parents=True)
        (tree / rel / "size").write_text(f"{sectors}\n")
        for holder in holders:
            (tree / rel / "holders" / holder).touch()
    (tree / "sda/sda1/partition").write_text("1\n")
    listed.mkdir()
    for name, rel in [("sda", "sda"), ("sda1", "sda/sda1")]:
        (listed / name).symlink_to(tree / rel)
    found = {d.path: d for d in list_disks(str(listed))}
    assert (found["/dev/sda"].parent, found["/dev/sda"].held) == ("", False)
    assert (found["/dev/sda1"].parent, found["/dev/sda1"].held) == ("/dev/sda", True)
