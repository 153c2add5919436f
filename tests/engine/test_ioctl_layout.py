"""The byte layout of dmd.engine.ioctl checked against the kernel's own header.

A C program compiled against <linux/dm-ioctl.h> prints sizeof/offsetof and the
ioctl request numbers; the Python structs must agree byte for byte.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from dmd.engine import ioctl
from dmd.engine.ioctl import Command
from dmd.engine.types import DmFlags, TargetLine

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/dm-ioctl.h>
#define F(s, m) printf(#s "." #m " %zu\n", offsetof(struct s, m))
int main(void) {
    printf("sizeof.dm_ioctl %zu\n", sizeof(struct dm_ioctl));
    printf("sizeof.dm_target_spec %zu\n", sizeof(struct dm_target_spec));
    printf("sizeof.dm_target_deps %zu\n", sizeof(struct dm_target_deps));
    printf("sizeof.dm_name_list %zu\n", offsetof(struct dm_name_list, name));
    printf("sizeof.dm_target_versions %zu\n", offsetof(struct dm_target_versions, name));
    printf("sizeof.dm_target_msg %zu\n", offsetof(struct dm_target_msg, message));
    F(dm_ioctl, version); F(dm_ioctl, data_size); F(dm_ioctl, data_start);
    F(dm_ioctl, target_count); F(dm_ioctl, open_count); F(dm_ioctl, flags);
    F(dm_ioctl, event_nr); F(dm_ioctl, padding); F(dm_ioctl, dev); F(dm_ioctl, name);
    F(dm_ioctl, uuid); F(dm_ioctl, data);
    F(dm_target_spec, sector_start); F(dm_target_spec, length); F(dm_target_spec, status);
    F(dm_target_spec, next); F(dm_target_spec, target_type);
    printf("request.DM_VERSION %lu\n", (unsigned long)DM_VERSION);
    printf("request.DM_REMOVE_ALL %lu\n", (unsigned long)DM_REMOVE_ALL);
    printf("request.DM_LIST_DEVICES %lu\n", (unsigned long)DM_LIST_DEVICES);
    printf("request.DM_DEV_CREATE %lu\n", (unsigned long)DM_DEV_CREATE);
    printf("request.DM_DEV_REMOVE %lu\n", (unsigned long)DM_DEV_REMOVE);
    printf("request.DM_DEV_RENAME %lu\n", (unsigned long)DM_DEV_RENAME);
    printf("request.DM_DEV_SUSPEND %lu\n", (unsigned long)DM_DEV_SUSPEND);
    printf("request.DM_DEV_STATUS %lu\n", (unsigned long)DM_DEV_STATUS);
    printf("request.DM_DEV_WAIT %lu\n", (unsigned long)DM_DEV_WAIT);
    printf("request.DM_TABLE_LOAD %lu\n", (unsigned long)DM_TABLE_LOAD);
    printf("request.DM_TABLE_CLEAR %lu\n", (unsigned long)DM_TABLE_CLEAR);
    printf("request.DM_TABLE_DEPS %lu\n", (unsigned long)DM_TABLE_DEPS);
    printf("request.DM_TABLE_STATUS %lu\n", (unsigned long)DM_TABLE_STATUS);
    printf("request.DM_LIST_VERSIONS %lu\n", (unsigned long)DM_LIST_VERSIONS);
    printf("request.DM_TARGET_MSG %lu\n", (unsigned long)DM_TARGET_MSG);
    printf("request.DM_DEV_SET_GEOMETRY %lu\n", (unsigned long)DM_DEV_SET_GEOMETRY);
    printf("request.DM_DEV_ARM_POLL %lu\n", (unsigned long)DM_DEV_ARM_POLL);
    printf("request.DM_GET_TARGET_VERSION %lu\n", (unsigned long)DM_GET_TARGET_VERSION);
    printf("flag.DM_READONLY %u\n", DM_READONLY_FLAG);
    printf("flag.DM_SUSPEND %u\n", DM_SUSPEND_FLAG);
    printf("flag.DM_PERSISTENT_DEV %u\n", DM_PERSISTENT_DEV_FLAG);
    printf("flag.DM_STATUS_TABLE %u\n", DM_STATUS_TABLE_FLAG);
    printf("flag.DM_ACTIVE_PRESENT %u\n", DM_ACTIVE_PRESENT_FLAG);
    printf("flag.DM_INACTIVE_PRESENT %u\n", DM_INACTIVE_PRESENT_FLAG);
    printf("flag.DM_BUFFER_FULL %u\n", DM_BUFFER_FULL_FLAG);
    printf("flag.DM_SKIP_BDGET %u\n", DM_SKIP_BDGET_FLAG);
    printf("flag.DM_SKIP_LOCKFS %u\n", DM_SKIP_LOCKFS_FLAG);
    printf("flag.DM_NOFLUSH %u\n", DM_NOFLUSH_FLAG);
    printf("flag.DM_QUERY_INACTIVE_TABLE %u\n", DM_QUERY_INACTIVE_TABLE_FLAG);
    printf("flag.DM_UEVENT_GENERATED %u\n", DM_UEVENT_GENERATED_FLAG);
    printf("flag.DM_UUID %u\n", DM_UUID_FLAG);
    printf("flag.DM_SECURE_DATA %u\n", DM_SECURE_DATA_FLAG);
    printf("flag.DM_DATA_OUT %u\n", DM_DATA_OUT_FLAG);
    printf("flag.DM_DEFERRED_REMOVE %u\n", DM_DEFERRED_REMOVE);
    printf("flag.DM_INTERNAL_SUSPEND %u\n", DM_INTERNAL_SUSPEND_FLAG);
    printf("flag.DM_IMA_MEASUREMENT %u\n", DM_IMA_MEASUREMENT_FLAG);
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is part of the test set-up (scripts/setup installs gcc)"
    assert Path("/usr/include/linux/dm-ioctl.h").exists(), "linux-libc-dev is missing"
    work = tmp_path_factory.mktemp("probe")
    (work / "probe.c").write_text(C_PROBE)
    subprocess.run([cc, "-o", str(work / "probe"), str(work / "probe.c")], check=True)
    out = subprocess.run([str(work / "probe")], check=True, capture_output=True, text=True)
    return {k: int(v) for k, v in (line.split() for line in out.stdout.splitlines())}


def test_struct_sizes_match_the_header(header_facts: dict[str, int]) -> None:
    assert ioctl.DM_IOCTL.size == header_facts["sizeof.dm_ioctl"] == 312
    assert ioctl.DM_TARGET_SPEC.size == header_facts["sizeof.dm_target_spec"] == 40
    assert ioctl.DM_TARGET_DEPS.size == header_facts["sizeof.dm_target_deps"]
    assert ioctl.DM_NAME_LIST.size == header_facts["sizeof.dm_name_list"]
    assert ioctl.DM_TARGET_VERSIONS.size == header_facts["sizeof.dm_target_versions"]
    assert ioctl.DM_TARGET_MSG.size == header_facts["sizeof.dm_target_msg"]


def test_dm_ioctl_field_offsets_match_the_header(header_facts: dict[str, int]) -> None:
    fields = ["version", "data_size", "data_start", "target_count", "open_count", "flags",
              "event_nr", "padding", "dev", "name", "uuid", "data"]
    sizes = [12, 4, 4, 4, 4, 4, 4, 4, 8, 128, 129, 7]
    offset = 0
    for name, size in zip(fields, sizes, strict=True):
        assert header_facts[f"dm_ioctl.{name}"] == offset, name
        offset += size
    spec = ["sector_start", "length", "status", "next", "target_type"]
    for name, at in zip(spec, [0, 8, 16, 20, 24], strict=True):
        assert header_facts[f"dm_target_spec.{name}"] == at, name


def test_request_numbers_match_the_header(header_facts: dict[str, int]) -> None:
    for command in Command:
        assert command.request == header_facts[f"request.{command.name}"], command.name
    assert Command.DM_VERSION.request == 0xC138FD00


def test_flag_values_match_the_header(header_facts: dict[str, int]) -> None:
    for flag in DmFlags:
        assert int(flag) == header_facts[f"flag.{flag.name}"], flag.name


def test_header_round_trip() -> None:
    raw = ioctl.pack_header(data_size=4096, name="dev", uuid="U", flags=3, event_nr=0x400000,
                            dev=0xFD01)
    header = ioctl.unpack_header(raw)
    assert header.version == ioctl.CLIENT_VERSION
    assert (header.data_size, header.data_start) == (4096, 312)
    assert (header.name, header.uuid, header.flags, header.event_nr, header.dev) == (
        "dev", "U", 3, 0x400000, 0xFD01)


def test_table_specs_are_8_byte_aligned_and_chained_relative() -> None:
    table = [TargetLine(0, 8, "linear", "7:0 0"), TargetLine(8, 8, "zero", ""),
             TargetLine(16, 8, "error", "x" * 13)]
    packed = ioctl.pack_table(table)
    offset = 0
    for line in table:
        start, length, status, nxt, ttype = ioctl.DM_TARGET_SPEC.unpack_from(packed, offset)
        assert (start, length, status) == (line.start, line.length, 0)
        assert ttype.rstrip(b"\0").decode() == line.target_type
        assert nxt % 8 == 0 and nxt >= 40 + len(line.params) + 1
        offset += nxt
    assert offset == len(packed)


def test_status_table_decodes_next_relative_to_first_spec() -> None:
    # DM_TABLE_STATUS chains ``next`` from the first spec, not from the current one.
    first = ioctl.DM_TARGET_SPEC.pack(0, 8, 0, 48, b"zero") + b"\0" * 8
    second = ioctl.DM_TARGET_SPEC.pack(8, 8, 0, 96, b"linear") + b"7:0 0\0\0\0"
    buf = b"\0" * 312 + first + second
    assert ioctl.unpack_table(buf, 312, 2) == [
        TargetLine(0, 8, "zero", ""), TargetLine(8, 8, "linear", "7:0 0")]


def _name_record(dev: int, name: str, event_nr: int, uuid: str | None, last: bool) -> bytes:
    body = struct.pack("=QI", dev, 0) + name.encode() + b"\0"
    body = body.ljust(ioctl.align8(len(body)), b"\0")
    flag = ioctl.DM_NAME_LIST_FLAG_HAS_UUID if uuid else ioctl.DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID
    body += struct.pack("=II", event_nr, flag) + ((uuid or "").encode() + b"\0")
    body = body.ljust(ioctl.align8(len(body)), b"\0")
    nxt = 0 if last else len(body)
    return struct.pack("=QI", dev, nxt) + body[12:]


def test_name_list_with_event_numbers_and_uuids() -> None:
    records = _name_record(0xFD00, "a", 3, "UUID-A", False) + _name_record(
        0xFD01, "bbbbbbbbbbbb", 0, None, True)
    buf = b"\0" * 312 + records
    entries = ioctl.unpack_name_list(buf, 312, len(buf), (4, 47, 0))
    assert [(e.dev, e.name, e.event_nr, e.uuid) for e in entries] == [
        (0xFD00, "a", 3, "UUID-A"), (0xFD01, "bbbbbbbbbbbb", 0, "")]


def test_empty_name_list() -> None:
    buf = b"\0" * 312 + struct.pack("=QI", 0, 0)
    assert ioctl.unpack_name_list(buf, 312, len(buf), (4, 47, 0)) == []


def test_old_kernels_name_list_has_no_extra_fields() -> None:
    buf = b"\0" * 312 + struct.pack("=QI", 0xFD00, 0) + b"a\0\0\0"
    entries = ioctl.unpack_name_list(buf, 312, len(buf), (4, 36, 0))
    assert [(e.name, e.event_nr, e.uuid) for e in entries] == [("a", None, None)]


def test_versions_chain() -> None:
    one = struct.pack("=I3I", 24, 1, 4, 0) + b"linear\0\0"
    two = struct.pack("=I3I", 0, 1, 2, 0) + b"zero\0\0\0\0"
    buf = b"\0" * 312 + one + two
    versions = ioctl.unpack_versions(buf, 312, len(buf))
    assert [(v.name, v.version) for v in versions] == [("linear", (1, 4, 0)), ("zero", (1, 2, 0))]
