"""What every target module shares: base classes, the word cursor, devices.

A params or status line is a list of blank-separated words; the kernel's
``dm_split_args`` and its ``DMEMIT`` calls agree on nothing finer. So parsing
is a cursor over ``str.split()`` words, and building refuses any field value
that would itself contain a blank (it would shift every later argument).

Error messages name the field and the word position but never quote a word:
a crypt or integrity line carries key material, and exceptions end up in logs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Self, TypeVar

from dmd.engine.types import InvalidArgument, block_device_number

__all__ = [
    "DEV",
    "FAIL_WORDS",
    "SIGNED",
    "TargetFailed",
    "TargetFailedError",
    "TargetFormatError",
    "TargetParams",
    "TargetStatus",
    "Words",
    "device_number",
    "device_text",
    "same_device",
    "with_device_numbers",
]

_T = TypeVar("_T")

_UINT = re.compile(r"[0-9]+")
_INT = re.compile(r"-?[0-9]+")
_DEVNUM = re.compile(r"([0-9]+):([0-9]+)")
_WORD = re.compile(r"[^\s\x00]+")

# Whole-status words some targets print instead of their numbers once their
# metadata is unusable (thin-pool, thin, cache: "Fail"; "Error" when reading
# the metadata failed while building the status).
FAIL_WORDS = frozenset({"Fail", "Error"})


class TargetFormatError(InvalidArgument):
    """A params or status line that does not have the target's format."""


class TargetFailedError(TargetFormatError):
    """The target reported a failure word instead of its status fields."""

    def __init__(self, target_type: str, state: str) -> None:
        self.target_type = target_type
        self.state = state
        super().__init__(f"{target_type} status reports {state!r}")


@dataclasses.dataclass(frozen=True)
class TargetFailed:
    """A status that is only a failure word (see ``FAIL_WORDS``)."""

    target_type: str
    state: str


# Field metadata: DEV marks a device reference ("/dev/x" or "major:minor"),
# SIGNED an int that may be negative (every other int must not be).
DEV: Mapping[str, bool] = MappingProxyType({"device": True})
SIGNED: Mapping[str, bool] = MappingProxyType({"signed": True})


class Words:
    """A cursor over the words of one params or status line."""

    def __init__(self, text: str, what: str) -> None:
        self._words = text.split()
        self._pos = 0
        self.what = what

    def error(self, message: str) -> TargetFormatError:
        return TargetFormatError(f"{self.what}: {message} (at word {self._pos + 1})")

    def more(self) -> bool:
        return self._pos < len(self._words)

    def peek(self) -> str | None:
        return self._words[self._pos] if self.more() else None

    def word(self, name: str) -> str:
        if not self.more():
            raise self.error(f"{name} is missing")
        value = self._words[self._pos]
        self._pos += 1
        return value

    def uint(self, name: str) -> int:
        value = self.word(name)
        if not _UINT.fullmatch(value):
            self._pos -= 1
            raise self.error(f"{name} is not an unsigned integer")
        return int(value)

    def uint_or_dash(self, name: str) -> int | None:
        """An unsigned integer, or ``None`` for the kernel's "-" (not set)."""
        if self.peek() == "-":
            self._pos += 1
            return None
        return self.uint(name)

    def ratio(self, name: str) -> tuple[int, int]:
        """``a/b`` as printed for used/total counts."""
        value = self.word(name)
        left, sep, right = value.partition("/")
        if not sep or not _UINT.fullmatch(left) or not _UINT.fullmatch(right):
            self._pos -= 1
            raise self.error(f"{name} is not a used/total pair")
        return int(left), int(right)

    def counted(self, name: str) -> tuple[str, ...]:
        """A ``<#args> <arg>*`` group."""
        count = self.uint(f"number of {name}")
        if count > len(self._words) - self._pos:
            raise self.error(f"{count} {name} announced but fewer words follow")
        return tuple(self.word(name) for _ in range(count))

    def rest(self) -> tuple[str, ...]:
        words = tuple(self._words[self._pos:])
        self._pos = len(self._words)
        return words

    def done(self) -> None:
        if self.more():
            raise self.error("unexpected words after the last argument")


class Options:
    """A cursor over an optional-argument group (``<#opts> <opt>*``)."""

    def __init__(self, words: tuple[str, ...], what: str) -> None:
        self._words = words
        self._pos = 0
        self.what = what

    def __iter__(self) -> Options:
        return self

    def __next__(self) -> str:
        if self._pos >= len(self._words):
            raise StopIteration
        self._pos += 1
        return self._words[self._pos - 1]

    def value(self, option: str) -> str:
        if self._pos >= len(self._words):
            raise TargetFormatError(f"{self.what}: option {option} needs a value")
        self._pos += 1
        return self._words[self._pos - 1]

    def uint(self, option: str) -> int:
        value = self.value(option)
        if not _UINT.fullmatch(value):
            raise TargetFormatError(f"{self.what}: option {option} needs an unsigned integer")
        return int(value)

    def signed(self, option: str) -> int:
        value = self.value(option)
        if not _INT.fullmatch(value):
            raise TargetFormatError(f"{self.what}: option {option} needs an integer")
        return int(value)


def parse_uint(text: str, what: str) -> int:
    if not _UINT.fullmatch(text):
        raise TargetFormatError(f"{what} is not an unsigned integer")
    return int(text)


def counted(words: Iterable[str]) -> list[str]:
    """``[<#args>, <arg>*]`` for a group that is always printed."""
    items = list(words)
    return [str(len(items)), *items]


def optional_counted(words: Iterable[str]) -> list[str]:
    """Like ``counted``, but nothing at all when the group is empty."""
    items = list(words)
    return [str(len(items)), *items] if items else []


def join(*parts: object) -> str:
    return " ".join(str(p) for p in parts)


def _check_value(owner: str, name: str, value: object, signed: bool) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if value < 0 and not signed:
            raise InvalidArgument(f"{owner}: {name} must not be negative")
        return
    if isinstance(value, str):
        # One word, no blanks: anything else would shift the kernel's argv.
        if not _WORD.fullmatch(value):
            raise InvalidArgument(f"{owner}: {name} must be one non-empty word without blanks")
        return
    if isinstance(value, tuple):
        for item in value:
            _check_value(owner, name, item, signed)
        return
    if dataclasses.is_dataclass(value):
        return  # validated by its own constructor
    raise InvalidArgument(f"{owner}: {name} has unsupported type {type(value).__name__}")


class _Checked:
    """Validates every field of a dataclass subclass on construction."""

    def __post_init__(self) -> None:
        owner = getattr(self, "target_type", type(self).__name__)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_value(owner, f.name, getattr(self, f.name), bool(f.metadata.get("signed")))


class Part(_Checked):
    """Base of the records nested in params and status (legs, paths, ...)."""


class TargetParams(_Checked):
    """Base of the per-target table params dataclasses.

    Subclasses set ``target_type``, implement ``to_params`` and ``_parse``; the
    parser accepts what the kernel prints back (STATUSTYPE_TABLE) as well as
    what ``to_params`` makes.
    """

    target_type: ClassVar[str]

    def to_params(self) -> str:
        raise NotImplementedError

    def redacted(self) -> str:
        """``to_params()`` safe to log: key material replaced by zeros."""
        return self.to_params()

    @classmethod
    def from_params(cls, params: str) -> Self:
        words = Words(params, f"{cls.target_type} table")
        result = cls._parse(words)
        words.done()
        return result

    @classmethod
    def _parse(cls, words: Words) -> Self:
        raise NotImplementedError


class TargetStatus(_Checked):
    """Base of the per-target status dataclasses (STATUSTYPE_INFO).

    Fields the running kernel prints beyond those known here end up in
    ``extra`` instead of failing the parse; a status that is only a failure
    word raises ``TargetFailedError``.
    """

    target_type: ClassVar[str]

    @classmethod
    def from_status(cls, status: str) -> Self:
        if status.strip() in FAIL_WORDS:
            raise TargetFailedError(cls.target_type, status.strip())
        return cls._parse(Words(status, f"{cls.target_type} status"))

    @classmethod
    def _parse(cls, words: Words) -> Self:
        raise NotImplementedError


def device_number(ref: str) -> tuple[int, int]:
    """(major, minor) of a device given as "major:minor" or as a block device path."""
    match = _DEVNUM.fullmatch(ref)
    if match:
        return int(match[1]), int(match[2])
    number = block_device_number(ref)
    if number is None:
        raise InvalidArgument(f"{ref!r} is not a block device")
    return number


def device_text(ref: str) -> str:
    """The "major:minor" form the kernel prints for a device reference."""
    major, minor = device_number(ref)
    return f"{major}:{minor}"


def same_device(a: str, b: str) -> bool:
    """Whether two device references (path or "major:minor") name one device."""
    return a == b or device_number(a) == device_number(b)


def with_device_numbers(obj: _T) -> _T:
    """A copy of a params/status object with every device as "major:minor".

    The kernel prints devices by number, so this is what a table read back
    equals when it was loaded with paths.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("device") and isinstance(value, str):
            new: Any = device_text(value)
        elif isinstance(value, tuple):
            new = tuple(with_device_numbers(item) for item in value)
        else:
            new = with_device_numbers(value)
        if new != value:
            changes[f.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj
