"""Keys in the kernel's keyring, read by description.

A volume whose key is named by a keyring description is opened with the
``user`` key of that description found in the calling process's session
keyring or, failing that, in its user's keyring (for dmd, root's: a boot
agent or an admin puts it there with ``keyctl padd user DESC @u``). The
syscalls are made directly (keyutils is not needed): search, then read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_UNLINK = 9
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
MAX_DESCRIPTION = 4095  # the kernel's limit, with its NUL

# (add_key, keyctl) by machine.
_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219), "riscv64": (217, 219),
             "i686": (286, 288), "armv7l": (309, 311), "ppc64le": (269, 271),
             "s390x": (278, 280)}


class KeyringUnavailable(OSError):
    """This machine gives no access to the keyring (unknown architecture, or
    keyctl refused by a seccomp filter)."""


def _syscalls() -> tuple[int, int]:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise KeyringUnavailable(errno.ENOSYS, f"keyctl: unknown machine {platform.machine()}")
    return numbers


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _keyctl(*args: object) -> int:
    result = int(_libc.syscall(_syscalls()[1], *args))
    if result < 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM) and args[0] == KEYCTL_SEARCH:
            raise KeyringUnavailable(code, os.strerror(code))
        raise OSError(code, os.strerror(code))
    return result


def check_description(description: str) -> bytes:
    raw = description.encode()
    if not raw or len(raw) > MAX_DESCRIPTION or b"\0" in raw:
        raise ValueError(f"a key description is 1 to {MAX_DESCRIPTION} bytes without NUL")
    return raw


def find_user_key(description: str) -> int | None:
    """The serial of the ``user`` key *description* in the session or the
    user keyring; None if neither has it (or it may not be read)."""
    raw = check_description(description)
    for keyring in (KEY_SPEC_SESSION_KEYRING, KEY_SPEC_USER_KEYRING):
        try:
            return _keyctl(KEYCTL_SEARCH, ctypes.c_long(keyring), b"user", raw,
                           ctypes.c_long(0))
        except KeyringUnavailable:
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED,
                                 errno.EACCES):
                raise
    return None


def read_user_key(description: str, limit: int) -> bytearray | None:
    """The payload of the ``user`` key *description* (see find_user_key);
    None if there is none. A payload longer than *limit* raises ValueError."""
    serial = find_user_key(description)
    if serial is None:
        return None
    buffer = ctypes.create_string_buffer(limit)
    try:
        size = _keyctl(KEYCTL_READ, ctypes.c_long(serial), buffer, ctypes.c_size_t(limit))
        if size > limit:
            raise ValueError(f"key {description!r} is {size} bytes; at most {limit}")
        # Copied into a buffer the caller can wipe: buffer.raw would make an
        # immutable copy, which nothing can.
        key = bytearray(size)
        if size:
            ctypes.memmove((ctypes.c_char * size).from_buffer(key), buffer, size)
        return key
    except OSError as exc:
        if exc.errno in (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED):
            return None
        raise
    finally:
        ctypes.memset(buffer, 0, limit)


def add_user_key(description: str, payload: bytes, keyring: int = KEY_SPEC_USER_KEYRING) -> int:
    """Add (or update) a ``user`` key: what a key agent does (keyctl padd)."""
    raw = check_description(description)
    result = int(_libc.syscall(_syscalls()[0], b"user", raw, payload,
                               ctypes.c_size_t(len(payload)), ctypes.c_long(keyring)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def unlink_key(serial: int, keyring: int = KEY_SPEC_USER_KEYRING) -> None:
    _keyctl(KEYCTL_UNLINK, ctypes.c_long(serial), ctypes.c_long(keyring))
