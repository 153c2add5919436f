"""verity (drivers/md/dm-verity-target.c, dm-verity-fec.c;
Documentation/admin-guide/device-mapper/verity.rst).

``<version> <data dev> <hash dev> <data block size> <hash block size>
<#data blocks> <hash start block> <algorithm> <root digest> <salt|->
[<#opt params> <opt params>]`` with block sizes in bytes and block numbers
in those blocks. The kernel prints digest and salt in lower-case hex.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from dmd.engine.targets.base import (
    DEV,
    Options,
    Part,
    TargetFormatError,
    TargetParams,
    TargetStatus,
    Words,
    join,
    optional_counted,
)

CORRUPTION_MODES = ("ignore_corruption", "restart_on_corruption", "panic_on_corruption")
ERROR_MODES = ("restart_on_error", "panic_on_error")  # Linux 6.12+


@dataclass(frozen=True)
class VerityFec(Part):
    """Forward error correction: ``use_fec_from_device <dev> fec_blocks <n>
    fec_start <block> fec_roots <n>`` (blocks of the data block size)."""

    device: str = field(metadata=DEV)
    blocks: int = 0
    start_block: int = 0
    roots: int = 2


@dataclass(frozen=True, kw_only=True)
class VerityParams(TargetParams):
    """Keyword-only: ten positional fields would be too easy to swap."""

    target_type: ClassVar[str] = "verity"
    data_device: str = field(metadata=DEV)
    hash_device: str = field(metadata=DEV)
    data_blocks: int
    root_digest: str
    salt: str | None = None  # hex; None is the kernel's "-" (no salt)
    algorithm: str = "sha256"
    version: int = 1
    data_block_bytes: int = 4096
    hash_block_bytes: int = 4096
    hash_start_block: int = 0
    corruption_mode: str | None = None  # None: I/O error on corruption (the default)
    error_mode: str | None = None
    ignore_zero_blocks: bool = False
    check_at_most_once: bool = False
    try_verify_in_tasklet: bool = False
    fec: VerityFec | None = None
    root_hash_sig_key_desc: str | None = None
    extra_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "root_digest", self.root_digest.lower())
        if self.salt is not None:
            object.__setattr__(self, "salt", self.salt.lower())
        if self.corruption_mode is not None and self.corruption_mode not in CORRUPTION_MODES:
            raise TargetFormatError("verity: unknown corruption_mode")
        if self.error_mode is not None and self.error_mode not in ERROR_MODES:
            raise TargetFormatError("verity: unknown error_mode")

    def _options(self) -> list[str]:
        # verity_status() order.
        opts = [m for m in (self.corruption_mode, self.error_mode) if m is not None]
        for name in ("ignore_zero_blocks", "check_at_most_once", "try_verify_in_tasklet"):
            if getattr(self, name):
                opts.append(name)
        if self.fec is not None:
            opts += ["use_fec_from_device", self.fec.device, "fec_blocks", str(self.fec.blocks),
                     "fec_start", str(self.fec.start_block), "fec_roots", str(self.fec.roots)]
        if self.root_hash_sig_key_desc is not None:
            opts += ["root_hash_sig_key_desc", self.root_hash_sig_key_desc]
        return opts + list(self.extra_options)

    def to_params(self) -> str:
        return join(self.version, self.data_device, self.hash_device, self.data_block_bytes,
                    self.hash_block_bytes, self.data_blocks, self.hash_start_block,
                    self.algorithm, self.root_digest, self.salt or "-",
                    *optional_counted(self._options()))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        version = words.uint("version")
        data_dev = words.word("data device")
        hash_dev = words.word("hash device")
        data_block = words.uint("data block size")
        hash_block = words.uint("hash block size")
        data_blocks = words.uint("number of data blocks")
        hash_start = words.uint("hash start block")
        algorithm = words.word("algorithm")
        digest = words.word("root digest")
        salt_word = words.word("salt")
        values: dict[str, object] = {}
        fec: dict[str, str] = {}
        extra: list[str] = []
        opts = Options(words.counted("optional params") if words.more() else (), "verity")
        for opt in opts:
            if opt in CORRUPTION_MODES:
                values["corruption_mode"] = opt
            elif opt in ERROR_MODES:
                values["error_mode"] = opt
            elif opt in ("ignore_zero_blocks", "check_at_most_once", "try_verify_in_tasklet"):
                values[opt] = True
            elif opt in ("use_fec_from_device", "fec_blocks", "fec_start", "fec_roots"):
                fec[opt] = opts.value(opt)
            elif opt == "root_hash_sig_key_desc":
                values[opt] = opts.value(opt)
            else:
                extra.append(opt)
        if fec:
            if set(fec) != {"use_fec_from_device", "fec_blocks", "fec_start", "fec_roots"}:
                raise TargetFormatError("verity table: incomplete FEC options")
            try:
                values["fec"] = VerityFec(fec["use_fec_from_device"], int(fec["fec_blocks"]),
                                          int(fec["fec_start"]), int(fec["fec_roots"]))
            except ValueError:
                raise TargetFormatError("verity table: FEC numbers are not integers") from None
        return cls(data_device=data_dev, hash_device=hash_dev, data_blocks=data_blocks,
                   root_digest=digest, salt=None if salt_word == "-" else salt_word,
                   algorithm=algorithm, version=version, data_block_bytes=data_block,
                   hash_block_bytes=hash_block, hash_start_block=hash_start,
                   extra_options=tuple(extra), **values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class VerityStatus(TargetStatus):
    """``V`` (every check so far passed) or ``C`` (corruption seen), then the
    number of blocks FEC corrected or "-" (newer kernels)."""

    target_type: ClassVar[str] = "verity"
    state: str
    fec_corrected_blocks: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.state == "V"

    @classmethod
    def _parse(cls, words: Words) -> Self:
        state = words.word("verity state")
        if state not in ("V", "C", "P"):
            raise words.error("verity state must be V, C or P")
        corrected = words.uint_or_dash("FEC corrected blocks") if words.more() else None
        return cls(state, corrected, words.rest())
