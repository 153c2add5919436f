"""A thin pool's metadata checked and repaired by thin-provisioning-tools.

The kernel trusts the metadata it is given: a damaged btree node surfaces as
I/O errors once a thin device reads it, and the pool then stops its writes
(``needs_check``); a damaged superblock makes the pool's table refuse to
load. ``thin_check`` reads all of it without the kernel (the pool must not
be active on it), and ``thin_repair`` writes a new metadata device from
whatever of the old one can be read, its mapping trees found by a scan when
the superblock is gone (then it needs the transaction id, data block size
and data block count, which the caller gives from its own records).

The tools run with the calling thread waiting, killed with the process (a
repair must not outlive the recovery that undoes it), each within a time
limit, so a metadata that makes a tool loop cannot hold a thread for ever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

TIMEOUT = 1800.0  # seconds: a 16 GiB metadata device read end to end, and more
NOT_INSTALLED = 127  # a ThinToolError's status when the tool is not there
REPORT_LINES = 20


class ThinToolError(Exception):
    """A tool failed: its exit status and its last words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class MetadataCheck:
    """What thin_check found: ``ok``, or the damage in its own words."""

    ok: bool
    report: str = ""


def _command(tool: str) -> list[str]:
    path, setpriv = shutil.which(tool), shutil.which("setpriv")
    if path is None:
        raise ThinToolError(NOT_INSTALLED,
                            f"{tool} is not installed (thin-provisioning-tools)")
    return ([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []) + [path]


def _run(tool: str, args: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([*_command(tool), *args], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=TIMEOUT,
                              env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
                                   "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise ThinToolError(-1, f"{tool} took more than {TIMEOUT:.0f} s") from None


def _words(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = [line.strip() for line in
             (done.stderr + done.stdout).decode(errors="replace").splitlines()]
    # thin_check names every stage it examines; the damage is the rest.
    lines = [line for line in lines if line and not line.startswith(
        ("examining ", "checking space map", "TRANSACTION_ID=", "METADATA_FREE_BLOCKS="))]
    return "; ".join(lines[:REPORT_LINES])


def check(path: str) -> MetadataCheck:
    """thin_check of the metadata at *path* (a device no active pool uses);
    a metadata found whole has its needs_check flag cleared, so the kernel
    lets the pool write again (what LVM does at each activation). A device
    that cannot be opened is a ThinToolError, not damage."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise ThinToolError(1, f"thin_check: {path}: {exc.strerror}") from None
    done = _run("thin_check", ["--clear-needs-check-flag", path])
    if done.returncode == 0:
        return MetadataCheck(True)
    return MetadataCheck(False, _words(done) or f"thin_check exited with {done.returncode}")


def repair(source: str, dest: str, transaction_id: int, block_sectors: int,
           data_blocks: int) -> None:
    """thin_repair from *source* into *dest* (a device at least as large,
    whose old content is overwritten). The figures are used where the
    source's superblock is unreadable."""
    done = _run("thin_repair", ["-i", source, "-o", dest,
                                "--transaction-id", str(transaction_id),
                                "--data-block-size", str(block_sectors),
                                "--nr-data-blocks", str(data_blocks)])
    if done.returncode != 0:
        raise ThinToolError(done.returncode,
                            _words(done) or f"thin_repair exited with {done.returncode}")


def thin_ids(path: str) -> list[int]:
    """The thin devices the metadata at *path* holds (thin_ls)."""
    done = _run("thin_ls", ["--no-headers", "-o", "DEV", path])
    if done.returncode != 0:
        raise ThinToolError(done.returncode,
                            _words(done) or f"thin_ls exited with {done.returncode}")
    words = done.stdout.decode(errors="replace").split()
    if not all(word.isdigit() for word in words):
        raise ThinToolError(1, f"thin_ls printed what is no thin id: {' '.join(words[:5])}")
    return sorted(int(word) for word in words)
