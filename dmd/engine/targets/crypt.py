"""crypt (drivers/md/dm-crypt.c, Documentation/admin-guide/device-mapper/dm-crypt.rst).

``<cipher> <key> <iv_offset> <device> <offset> [<#opt_params> <opt_params>]``

The key is a hex string, ``:<key_size>:<logon|user>:<description>`` for a key
in the kernel keyring, or ``-`` for none. The kernel prints a hex key back in
lower case (``%02x`` per byte), so hex keys are kept in lower case here too.
The key never appears in ``repr``; ``redacted()`` gives a loggable line.
crypt has no status (STATUSTYPE_INFO prints nothing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Options,
    TargetFormatError,
    TargetParams,
    Words,
    join,
    optional_counted,
    parse_uint,
)

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_KEYRING = re.compile(r":[0-9]+:(?:logon|user|encrypted|trusted):\S+")


@dataclass(frozen=True, kw_only=True)
class CryptParams(TargetParams):
    """Keyword-only: the table's order (cipher key iv_offset device offset)
    mixes two offsets that would be too easy to swap positionally."""

    target_type: ClassVar[str] = "crypt"
    cipher: str
    key: str = field(repr=False)
    device: str = field(metadata=DEV)
    offset_sectors: int = 0
    iv_offset_sectors: int = 0
    allow_discards: bool = False
    same_cpu_crypt: bool = False
    submit_from_crypt_cpus: bool = False
    no_read_workqueue: bool = False
    no_write_workqueue: bool = False
    integrity_tag_bytes: int | None = None
    integrity_type: str | None = None  # "none" or "aead"; pairs with integrity_tag_bytes
    sector_size_bytes: int | None = None
    iv_large_sectors: bool = False
    extra_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if _HEX.fullmatch(self.key):
            object.__setattr__(self, "key", self.key.lower())
        elif self.key != "-" and not _KEYRING.fullmatch(self.key):
            raise TargetFormatError(
                "crypt: key must be hex, ':<size>:<type>:<description>' or '-'")
        if (self.integrity_tag_bytes is None) != (self.integrity_type is None):
            raise TargetFormatError(
                "crypt: integrity_tag_bytes and integrity_type go together")

    @property
    def key_in_keyring(self) -> bool:
        return self.key.startswith(":")

    def _options(self) -> list[str]:
        # The order crypt_status() prints them in.
        opts = [name for name, on in (
            ("allow_discards", self.allow_discards),
            ("same_cpu_crypt", self.same_cpu_crypt),
            ("submit_from_crypt_cpus", self.submit_from_crypt_cpus),
            ("no_read_workqueue", self.no_read_workqueue),
            ("no_write_workqueue", self.no_write_workqueue),
        ) if on]
        if self.integrity_tag_bytes is not None:
            opts.append(f"integrity:{self.integrity_tag_bytes}:{self.integrity_type}")
        if self.sector_size_bytes is not None:
            opts.append(f"sector_size:{self.sector_size_bytes}")
        if self.iv_large_sectors:
            opts.append("iv_large_sectors")
        return opts + list(self.extra_options)

    def _line(self, key: str) -> str:
        return join(self.cipher, key, self.iv_offset_sectors, self.device,
                    self.offset_sectors, *optional_counted(self._options()))

    def to_params(self) -> str:
        return self._line(self.key)

    def redacted(self) -> str:
        # Like dmsetup without --showkeys: same length, all zeros.
        return self._line("0" * len(self.key) if _HEX.fullmatch(self.key) else self.key)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        cipher = words.word("cipher")
        key = words.word("key")
        iv_offset = words.uint("iv_offset")
        device = words.word("device")
        offset = words.uint("offset")
        flags: dict[str, bool] = {}
        tag_bytes: int | None = None
        tag_type: str | None = None
        sector_size: int | None = None
        extra: list[str] = []
        opts = Options(words.counted("optional params") if words.more() else (), "crypt table")
        for opt in opts:
            if opt in ("allow_discards", "same_cpu_crypt", "submit_from_crypt_cpus",
                       "no_read_workqueue", "no_write_workqueue", "iv_large_sectors"):
                flags[opt] = True
            elif opt.startswith("integrity:") and opt.count(":") == 2:
                _, size, tag_type = opt.split(":")
                tag_bytes = parse_uint(size, "crypt integrity tag size")
            elif opt.startswith("sector_size:"):
                sector_size = parse_uint(opt.partition(":")[2], "crypt sector_size")
            else:
                extra.append(opt)
        return cls(cipher=cipher, key=key, device=device, offset_sectors=offset,
                   iv_offset_sectors=iv_offset, integrity_tag_bytes=tag_bytes,
                   integrity_type=tag_type,
                   sector_size_bytes=sector_size, extra_options=tuple(extra), **flags)
