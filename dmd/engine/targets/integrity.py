"""integrity (drivers/md/dm-integrity.c, Documentation/admin-guide/device-mapper/dm-integrity.rst).

``<device> <offset> <tag size> <mode> <#args> <args>`` with mode J
(journal), B (bitmap), D (direct), R (recovery) or I (inline, 6.11+).

The kernel prints every tunable back, defaults included (journal_sectors,
interleave_sectors, buffer_sectors; journal_watermark and commit_time in J
mode; sectors_per_bit and bitmap_flush_interval in B mode), and prints
fix_padding/fix_hmac/recalculate from the superblock flags. A table read
back therefore equals what was loaded only if those were given explicitly.

``internal_hash``, ``journal_crypt`` and ``journal_mac`` may carry a key
(``alg:hexkey``); the key is kept out of ``repr`` and ``redacted()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.keys import KEYED_INTEGRITY_ARGS
from dmd.engine.targets.base import (
    DEV,
    Part,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    Words,
    counted,
    join,
    parse_uint,
)

MODES = ("J", "B", "D", "R", "I")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")

# (option, field) of the numeric "option:value" args, in the order
# dm_integrity_status() prints them (between the early and late flags).
_VALUE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("journal_sectors", "journal_sectors"),
    ("interleave_sectors", "interleave_sectors"),
    ("buffer_sectors", "buffer_sectors"),
    ("journal_watermark", "journal_watermark_percent"),
    ("commit_time", "commit_time_ms"),
    ("sectors_per_bit", "sectors_per_bit"),
    ("bitmap_flush_interval", "bitmap_flush_interval_ms"),
)
_FLAGS_EARLY = ("recalculate", "reset_recalculate", "allow_discards")
_FLAGS_LATE = ("fix_padding", "fix_hmac", "legacy_recalculate")
_ALGS = KEYED_INTEGRITY_ARGS


@dataclass(frozen=True)
class IntegrityAlg(Part):
    """A crypto API algorithm, with its key (hex) when it takes one."""

    name: str
    key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if ":" in self.name:
            raise TargetFormatError("integrity: algorithm names cannot contain ':'")
        if self.key is not None:
            if not _HEX.fullmatch(self.key):
                raise TargetFormatError("integrity: algorithm keys must be hex")
            object.__setattr__(self, "key", self.key.lower())

    def text(self, *, redact: bool = False) -> str:
        if self.key is None:
            return self.name
        return f"{self.name}:{'0' * len(self.key) if redact else self.key}"

    @classmethod
    def parse(cls, text: str) -> IntegrityAlg:
        name, sep, key = text.partition(":")
        return cls(name, key if sep else None)


@dataclass(frozen=True)
class IntegrityParams(TargetParams):
    target_type: ClassVar[str] = "integrity"
    device: str = field(metadata=DEV)
    offset_sectors: int = 0
    tag_size_bytes: int = 0  # 0 (or "-"): the internal hash's digest size
    mode: str = "J"
    meta_device: str | None = field(default=None, metadata=DEV)
    block_size_bytes: int | None = None
    recalculate: bool = False
    reset_recalculate: bool = False
    allow_discards: bool = False
    journal_sectors: int | None = None
    interleave_sectors: int | None = None
    buffer_sectors: int | None = None
    journal_watermark_percent: int | None = None
    commit_time_ms: int | None = None
    sectors_per_bit: int | None = None
    bitmap_flush_interval_ms: int | None = None
    fix_padding: bool = False
    fix_hmac: bool = False
    legacy_recalculate: bool = False
    internal_hash: IntegrityAlg | None = None
    journal_crypt: IntegrityAlg | None = None
    journal_mac: IntegrityAlg | None = None
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise TargetFormatError(f"integrity: mode must be one of {' '.join(MODES)}")

    @property
    def carries_key(self) -> bool:
        return any(alg is not None and alg.key is not None
                   for alg in (self.internal_hash, self.journal_crypt, self.journal_mac))

    def _args(self, redact: bool) -> list[str]:
        # dm_integrity_status() order.
        args: list[str] = []
        if self.meta_device is not None:
            args.append(f"meta_device:{self.meta_device}")
        if self.block_size_bytes is not None:
            args.append(f"block_size:{self.block_size_bytes}")
        args += [name for name in _FLAGS_EARLY if getattr(self, name)]
        for word, name in _VALUE_OPTIONS:
            if getattr(self, name) is not None:
                args.append(f"{word}:{getattr(self, name)}")
        args += [name for name in _FLAGS_LATE if getattr(self, name)]
        for name in _ALGS:
            alg: IntegrityAlg | None = getattr(self, name)
            if alg is not None:
                args.append(f"{name}:{alg.text(redact=redact)}")
        return args + list(self.extra_args)

    def _line(self, redact: bool) -> str:
        return join(self.device, self.offset_sectors, self.tag_size_bytes, self.mode,
                    *counted(self._args(redact)))

    def to_params(self) -> str:
        return self._line(False)

    def redacted(self) -> str:
        return self._line(True)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        device = words.word("device")
        offset = words.uint("offset")
        tag = words.word("tag size")
        tag_size = 0 if tag == "-" else parse_uint(tag, "integrity tag size")
        mode = words.word("mode")
        values: dict[str, object] = {}
        extra: list[str] = []
        by_word = dict(_VALUE_OPTIONS)
        for arg in words.counted("args") if words.more() else ():
            key, sep, value = arg.partition(":")
            if not sep and key in _FLAGS_EARLY + _FLAGS_LATE:
                values[key] = True
            elif sep and key in by_word:
                values[by_word[key]] = parse_uint(value, f"integrity {key}")
            elif sep and key == "block_size":
                values["block_size_bytes"] = parse_uint(value, "integrity block_size")
            elif sep and key == "meta_device":
                values["meta_device"] = value
            elif sep and key in _ALGS:
                values[key] = IntegrityAlg.parse(value)
            else:
                extra.append(arg)
        return cls(device, offset, tag_size, mode, extra_args=tuple(extra),
                   **values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class IntegrityStatus(TargetStatus):
    """``<mismatches> <provided data sectors> <recalculate position|->``."""

    target_type: ClassVar[str] = "integrity"
    mismatches: int
    provided_data_sectors: int
    recalculate_sector: int | None = None
    extra: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, words: Words) -> Self:
        mismatches = words.uint("mismatches")
        provided = words.uint("provided data sectors")
        recalc = words.uint_or_dash("recalculate position") if words.more() else None
        return cls(mismatches, provided, recalc, words.rest())
