"""LUKS2 through the cryptsetup command, with every key on a pipe.

dmd does not implement LUKS: a volume it encrypts must open with
``cryptsetup open`` on any rescue system, and the on-disk format (keyslots,
anti-forensic split, argon2) is cryptsetup's to get right. The command is
run rather than libcryptsetup loaded through ctypes because the command is
the interface cryptsetup keeps stable (its exit codes are documented), a
crash or a hang in it cannot take the daemon down, and a killed dmd does
not leave it running (``setpriv --pdeathsig``).

A key never appears in an argument: it is written into a pipe before the
command starts (a key is at most MAX_KEY_BYTES, well under a pipe's buffer)
and the command reads it as ``--key-file=/dev/fd/N``. The device is passed
the same way, as a descriptor the caller opened and checked, except for
``open``, which maps the device and names it by path.

Every function blocks for as long as the key derivation takes (seconds, by
design): call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

MIN_KEY_BYTES = 8
HEADER_BYTES = 16 << 20  # LUKS2's default metadata and keyslots area: data starts after it
MAX_KEY_BYTES = 8192
KEYSLOTS = 32  # LUKS2's
# seconds: argon2 at 1 GiB and the most passes a caller may ask for
# (dmd.service.pools.crypt) on a slow machine; past it, the command is killed.
TIMEOUT = 180.0


class Pbkdf(enum.Enum):
    ARGON2ID = "argon2id"
    ARGON2I = "argon2i"
    PBKDF2 = "pbkdf2"


@dataclass(frozen=True, slots=True)
class KdfSettings:
    """How a new keyslot derives its key; None leaves cryptsetup's default
    (argon2id, benchmarked to 2 s, memory up to 1 GiB or half the RAM)."""

    pbkdf: Pbkdf = Pbkdf.ARGON2ID
    time_ms: int | None = None
    memory_kib: int | None = None
    iterations: int | None = None

    def arguments(self) -> list[str]:
        args = [f"--pbkdf={self.pbkdf.value}"]
        if self.time_ms is not None:
            args.append(f"--iter-time={self.time_ms}")
        if self.memory_kib is not None and self.pbkdf is not Pbkdf.PBKDF2:
            args.append(f"--pbkdf-memory={self.memory_kib}")
        if self.iterations is not None:
            args.append(f"--pbkdf-force-iterations={self.iterations}")
        return args


class LuksError(Exception):
    """cryptsetup failed: *status* is its exit code, *message* its last words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WrongKey(LuksError):
    """No keyslot opens with the key (cryptsetup's exit status 2)."""


class NotLuks(LuksError):
    """The device carries no LUKS header."""


class DeviceBusy(LuksError):
    """The device is in use, or a mapping of that name exists (status 5)."""


def check_key(key: bytes | bytearray) -> None:
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, "
                         f"not {len(key)}")


@contextlib.contextmanager
def _key_pipes(keys: Sequence[bytes | bytearray]) -> Iterator[list[int]]:
    """One pipe per key, already holding it and closed for writing: the read
    ends, for the command to inherit."""
    ends: list[int] = []
    try:
        for key in keys:
            check_key(key)
            read_end, write_end = os.pipe()
            ends.append(read_end)
            try:
                os.write(write_end, key)  # fits the pipe's buffer: never blocks
            finally:
                os.close(write_end)
        yield ends
    finally:
        for fd in ends:
            os.close(fd)


def _command() -> list[str]:
    cryptsetup, setpriv = shutil.which("cryptsetup"), shutil.which("setpriv")
    if cryptsetup is None:
        raise LuksError(127, "cryptsetup is not installed")
    # Killed with dmd: a format or an open must not outlive the recovery
    # that undoes it.
    return ([setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []) + [cryptsetup]


def _fill(arg: str, paths: dict[str, str]) -> str:
    for placeholder, path in paths.items():
        arg = arg.replace(placeholder, path)
    return arg


def _run(args: list[str], *, keys: Sequence[bytes | bytearray] = (),
         device_fd: int | None = None) -> str:
    """Run cryptsetup *args*; "{key0}", "{key1}" and "{device}" in them are
    replaced by the /dev/fd paths of the key pipes and of *device_fd*."""
    with _key_pipes(keys) as ends:
        paths = {f"{{key{i}}}": f"/dev/fd/{fd}" for i, fd in enumerate(ends)}
        if device_fd is not None:
            paths["{device}"] = f"/dev/fd/{device_fd}"
        argv = [*_command(), *(_fill(a, paths) for a in args)]
        inherit = (*ends, *(() if device_fd is None else (device_fd,)))
        try:
            done = subprocess.run(argv, pass_fds=inherit, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=TIMEOUT,
                                  env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"),
                                       "LC_ALL": "C"})
        except subprocess.TimeoutExpired:
            raise LuksError(-1, f"cryptsetup {args[0]} took more than {TIMEOUT:.0f} s") \
                from None
    if done.returncode == 0:
        return done.stdout.decode(errors="replace")
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    message = lines[-1] if lines else f"cryptsetup {args[0]} exited with {done.returncode}"
    kind = {2: WrongKey, 5: DeviceBusy}.get(done.returncode, LuksError)
    if "is not a valid LUKS device" in message or "not a valid LUKS" in message:
        kind = NotLuks
    raise kind(done.returncode, message)


def format_device(device_fd: int, key: bytes | bytearray, kdf: KdfSettings,
                  label: str | None = None, uuid: str | None = None) -> str:
    """Make a LUKS2 header on the device with *key* in keyslot 0; its UUID
    (*uuid*, if given)."""
    named = ([f"--label={label}"] if label else []) + ([f"--uuid={uuid}"] if uuid else [])
    _run(["luksFormat", "--type=luks2", "--batch-mode", "--key-file={key0}",
          *kdf.arguments(), *named, "{device}"], keys=[key], device_fd=device_fd)
    return dump(device_fd).uuid


@dataclass(frozen=True, slots=True)
class Header:
    uuid: str
    keyslots: tuple[int, ...]
    data_offset_bytes: int


def dump(device_fd: int) -> Header:
    """What the device's LUKS2 header says (no key needed)."""
    text = _run(["luksDump", "--dump-json-metadata", "{device}"], device_fd=device_fd)
    try:
        meta = json.loads(text)
        offset = int(meta["segments"]["0"]["offset"])
    except (ValueError, KeyError, TypeError):
        raise LuksError(0, "cryptsetup luksDump printed no readable metadata") from None
    uuid = _run(["luksUUID", "{device}"], device_fd=device_fd).strip()
    return Header(uuid, tuple(sorted(int(k) for k in meta.get("keyslots", {}))), offset)


def test_key(device_fd: int, key: bytes | bytearray) -> None:
    """Return if *key* opens a keyslot; raise WrongKey if none."""
    _run(["open", "--type=luks2", "--test-passphrase", "--key-file={key0}", "{device}"],
         keys=[key], device_fd=device_fd)


def open_mapping(device_path: str, name: str, key: bytes | bytearray) -> None:
    """Map the LUKS2 device at *device_path* as /dev/mapper/*name*.

    cryptsetup loads the dm-crypt table with DM_SECURE_DATA and the volume
    key by reference to a kernel keyring entry that lives only while it
    runs, so no table read (``dmsetup table --showkeys`` included) shows
    the key."""
    _run(["open", "--type=luks2", "--key-file={key0}", device_path, name], keys=[key])


def add_key(device_fd: int, key: bytes | bytearray, new_key: bytes | bytearray,
            kdf: KdfSettings) -> None:
    """Add a keyslot for *new_key*, authorized by *key*."""
    _run(["luksAddKey", "--batch-mode", "--key-file={key0}", *kdf.arguments(), "{device}",
          "{key1}"], keys=[key, new_key], device_fd=device_fd)


def remove_key(device_fd: int, key: bytes | bytearray) -> None:
    """Remove the keyslot *key* opens (the caller keeps at least one)."""
    _run(["luksRemoveKey", "--batch-mode", "--key-file={key0}", "{device}"], keys=[key],
         device_fd=device_fd)
