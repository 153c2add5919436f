"""CreateVolume's filesystem option, on the simulator (the volume's device is
a file there; mkfs writes to it as to a block device): the filesystem is
made and labelled; the job's progress follows mke2fs's counters; a tool that
fails names itself and its exit status and undoes the volume; so does an
error or a crash while mkfs runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dmd.engine.interface import Engine
from dmd.service import errors
from dmd.service.auth import ROOT
from dmd.service.journal import VolumeCreateStep
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

MIB = 1 << 20


async def probe(pools: PoolService, device: str) -> dict[str, str]:
    """blkid's answer for the device, read through a descriptor of it."""
    fd = await pools.kernel(Engine.open_node, device, os.O_RDONLY)
    try:
        out = subprocess.run(["blkid", "-p", "-o", "export", f"/dev/fd/{fd}"], pass_fds=(fd,),
                             capture_output=True, text=True, check=False)
    finally:
        os.close(fd)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
async def test_a_volume_is_made_with_its_filesystem(tank: PoolService, fstype: str) -> None:
    await tank.create_volume("tank", "home", 320 * MIB, filesystem=fstype)
    found = await probe(tank, "tank-home")
    assert found.get("TYPE") == fstype and found.get("LABEL") == "home", found
    await tank.create_volume("tank", "raw", 64 * MIB)
    assert "TYPE" not in await probe(tank, "tank-raw")
    await assert_agree(tank)


async def test_an_unknown_filesystem_is_refused_before_anything(tank: PoolService) -> None:
    before = await state(tank)
    with pytest.raises(errors.InvalidArgument, match="ext4, xfs"):
        await tank.create_volume("tank", "v", GIB, filesystem="ntfs")
    assert await state(tank) == before


def assert_undone(before: dict[str, Any], after: dict[str, Any]) -> None:
    """The volume is undone whole: no device, no record, no thin id."""
    for key in ("kernel", "devices", "volumes"):
        assert after[key] == before[key], key


def fake_tool(directory: Path, script: str) -> None:
    directory.mkdir()
    tool = directory / "mkfs.ext4"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)


async def test_a_filesystems_job_says_its_bytes_rate_and_end(
        tank: PoolService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Making a filesystem is work with a size (the volume's bytes): the job
    says how many, at what rate, and when it should end, as mkfs counts."""
    fake_tool(tmp_path / "bin", "sleep 0.3; echo 'Writing inode tables: 1/4'; sleep 0.6\n"
                                "echo 'Writing inode tables: 3/4'; sleep 0.6\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    job, _ = await tank.as_job("volume-create", ROOT, lambda accept: tank.create_volume(
        "tank", "v", 4 * GIB, filesystem="ext4", accept=accept))
    seen: list[tuple[int, int, int, float]] = []
    while job.state.value == "running":
        seen.append((job.size_bytes, job.done_bytes, job.rate(), job.expected_end()))
        await asyncio.sleep(0.05)
    assert job.state.value == "completed"
    quarter = [s for s in seen if s[1] == GIB]
    assert quarter and all(s[0] == 4 * GIB for s in quarter)
    # A gibibyte in about 0.3 s or more: a rate, and an end some seconds away.
    _, _, rate, end = quarter[-1]
    assert 0 < rate < 4 * GIB and time.time() < end < time.time() + 60
    assert any(s[1] == 3 * GIB for s in seen)
    assert job.rate() == 0  # over: no rate, no end
    assert job.expected_end() == 0


async def test_progress_follows_mke2fs_and_a_failure_names_the_tool(
        tank: PoolService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(tmp_path / "bin", "echo 'Writing inode tables: 1/4'; sleep 0.3\n"
                                "echo 'Writing inode tables: 3/4'; sleep 0.3\n"
                                "echo 'the device is on fire' >&2; exit 7\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    before = await state(tank)
    seen: list[float] = []
    job, _ = await tank.as_job("volume-create", ROOT, lambda accept: tank.create_volume(
        "tank", "v", GIB, filesystem="ext4", accept=accept))
    while job.state.value == "running":
        seen.append(job.progress)
        await asyncio.sleep(0.05)
    assert job.state.value == "failed" and job.error_name == "Failed"
    assert job.error_message == "mkfs.ext4 exited with status 7: the device is on fire"
    # mkfs is the job's last part (after the step that announces it): 1/4
    # and 3/4 of it.
    parts = len(VolumeCreateStep) + 1
    assert any(abs(p - (VolumeCreateStep.FILESYSTEM + 0.25) / parts) < 0.01 for p in seen), seen
    assert any(abs(p - (VolumeCreateStep.FILESYSTEM + 0.75) / parts) < 0.01 for p in seen), seen
    assert_undone(before, await assert_agree(tank))


def test_a_crash_while_mkfs_runs_undoes_the_volume(tmp_path: Path) -> None:
    async def prepare() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            await pools.create_volume("tank", "kept", GIB, filesystem="ext4")
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(prepare())
    crash_at(tmp_path, "volume-create", VolumeCreateStep.FILESYSTEM,
             lambda pools: pools.create_volume("tank", "half", GIB, filesystem="ext4"))

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert_undone(before, await assert_agree(pools))
            assert (await probe(pools, "tank-kept")).get("TYPE") == "ext4"
        finally:
            close(pools)

    asyncio.run(restart())


def hanging_mkfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A mkfs.ext4 first on PATH that writes its pid, then prints nothing
    and never ends (silent, as mkfs.xfs is); the file its pid goes to."""
    pid_file = tmp_path / "mkfs.pid"
    fake_tool(tmp_path / "bin", f"echo $$ > {pid_file}; exec sleep 60\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return pid_file


async def mkfs_started(pid_file: Path) -> int:
    """The fake mkfs's pid, once it runs."""
    while not pid_file.exists() or not pid_file.read_text().strip():
        await asyncio.sleep(0.02)
    return int(pid_file.read_text())


def test_mkfs_dies_with_dmd_and_the_volume_is_undone(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """dmd killed while mkfs runs: mkfs must not go on writing to a volume
    that recovery undoes."""
    pid_file = hanging_mkfs(tmp_path, monkeypatch)

    async def prepare() -> dict[str, Any]:
        pools = open_pools(tmp_path)
        try:
            await pools.create_pool("tank", DISKS[:2])
            return await state(pools)
        finally:
            close(pools)

    before = asyncio.run(prepare())
    child = os.fork()
    if child == 0:
        try:
            async def run() -> None:
                pools = open_pools(tmp_path)
                await pools.start()
                task = asyncio.create_task(
                    pools.create_volume("tank", "half", GIB, filesystem="ext4"))
                await mkfs_started(pid_file)
                os._exit(42)  # dmd dies while mkfs runs
                await task

            asyncio.run(run())
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 42
    mkfs = int(pid_file.read_text())
    for _ in range(100):
        if not Path(f"/proc/{mkfs}").exists():
            break
        time.sleep(0.02)
    assert not Path(f"/proc/{mkfs}").exists(), "mkfs outlived dmd"

    async def restart() -> None:
        pools = await recovered(tmp_path)
        try:
            assert_undone(before, await assert_agree(pools))
        finally:
            close(pools)

    asyncio.run(restart())


async def test_a_cancel_while_mkfs_runs_stops_it_and_undoes_the_volume(
        tank: PoolService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = hanging_mkfs(tmp_path, monkeypatch)
    before = await state(tank)
    job, _ = await tank.as_job("volume-create", ROOT, lambda accept: tank.create_volume(
        "tank", "v", GIB, filesystem="ext4", accept=accept))
    mkfs = await mkfs_started(pid_file)
    assert job.cancellable
    tank.jobs.cancel(job.id)
    assert await tank.jobs.wait(job.id, 10)
    assert job.state.value == "cancelled"
    assert not Path(f"/proc/{mkfs}").exists(), "mkfs still runs"
    after = await assert_agree(tank)
    assert_undone(before, after)
