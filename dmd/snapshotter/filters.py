"""containerd's filter language, as List (containerd's Walk) receives it.

A filter is selectors joined by ``,``, all of which must match; a List
request carries several filters, any one of which may match (none: all).
A selector is a field path, optionally an operator and a value::

    kind==active,labels."containerd.io/gc.root"==check-walk
    parent!=""          labels.l          name~=/^sha256:/

Field paths are words of ``[A-Za-z0-9_]`` or quoted strings joined by
``.``; operators ``==``, ``!=`` and ``~=`` (a regular expression); a value is
a run of anything but ``,`` and space, or quoted. ``"`` quotes with Go's
escapes; ``/`` and ``|`` quote regular expressions. A selector with no
operator asks whether the field is there. A snapshot's fields: ``name``,
``parent``, ``kind`` and ``labels.KEY``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (value, present) of a field path of one object
Fields = Callable[[Sequence[str]], tuple[str, bool]]


class FilterError(ValueError):
    """A filter that does not parse: containerd's InvalidArgument."""


class Operator(enum.Enum):
    PRESENT = ""
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    operator: Operator
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, fields: Fields) -> bool:
        value, present = fields(self.path)
        match self.operator:
            case Operator.PRESENT:
                return present
            case Operator.EQUAL:
                return present and value == self.value
            case Operator.NOT_EQUAL:
                return value != self.value
            case Operator.MATCHES:
                assert self.pattern is not None
                return self.pattern.search(value) is not None


Filter = tuple[Selector, ...]

_FIELD = re.compile(r"[A-Za-z0-9_]+")
_QUOTES = '"/|'
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
                   "v": "\v", "\\": "\\"}
_NUMERIC_ESCAPES = {"x": (16, 2), "u": (16, 4), "U": (16, 8)}


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def fail(self, why: str) -> FilterError:
        return FilterError(f"filter {self.text!r}, at {self.at}: {why}")

    def skip_space(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1

    def peek(self) -> str:
        """The next character, spaces included: as in containerd's parser,
        spaces may come before a field, an operator or a value, nowhere else
        (not before "," or "." or the end)."""
        return self.text[self.at] if self.at < len(self.text) else ""

    def quoted(self) -> tuple[str, str]:
        """The quote character and the text between, escapes undone."""
        quote = self.text[self.at]
        self.at += 1
        out: list[str] = []
        while True:
            if self.at >= len(self.text) or self.text[self.at] == "\n":
                raise self.fail("quoted text not terminated")
            char = self.text[self.at]
            self.at += 1
            if char == quote:
                return quote, "".join(out)
            if char != "\\":
                out.append(char)
                continue
            out.append(self._escape(quote))

    def _escape(self, quote: str) -> str:
        if self.at >= len(self.text):
            raise self.fail("quoted text not terminated")
        char = self.text[self.at]
        self.at += 1
        if char in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[char]
        if char == quote:
            return quote
        if char in "01234567":
            digits, base = char + self.text[self.at:self.at + 2], 8
            self.at += 2
        elif char in _NUMERIC_ESCAPES:
            base, count = _NUMERIC_ESCAPES[char]
            digits = self.text[self.at:self.at + count]
            self.at += count
            if len(digits) != count:
                raise self.fail("a numeric escape too short")
        else:
            raise self.fail(f"an escape \\{char} that Go's strings do not have")
        try:
            code = int(digits, base)
            return chr(code)
        except ValueError:
            raise self.fail(f"a bad numeric escape {digits!r}") from None


def parse(text: str) -> Filter:
    """One filter; () for the empty string, which matches everything."""
    if text == "":
        return ()
    reader = _Reader(text)
    selectors = [_selector(reader)]
    while True:
        char = reader.peek()
        if char == "":
            return tuple(selectors)
        if char != ",":
            raise reader.fail(f"unexpected {char!r}")
        reader.at += 1
        selectors.append(_selector(reader))


def _selector(reader: _Reader) -> Selector:
    path = [_field(reader)]
    while reader.peek() == ".":
        reader.at += 1
        path.append(_field(reader))
    if reader.peek() in ("", ","):
        return Selector(tuple(path), Operator.PRESENT)
    reader.skip_space()
    start = reader.at
    while reader.at < len(reader.text) and reader.text[reader.at] in "=!~":
        reader.at += 1
    try:
        operator = Operator(reader.text[start:reader.at])
    except ValueError:
        reader.at = start
        raise reader.fail('expected an operator ("==", "!=" or "~=")') from None
    if operator is Operator.PRESENT:
        raise reader.fail('expected an operator ("==", "!=" or "~=")')
    value = _value(reader, regex=operator is Operator.MATCHES)
    pattern = None
    if operator is Operator.MATCHES:
        try:
            pattern = re.compile(value, re.ASCII)  # as RE2's \w and \d
        except re.error as exc:
            raise reader.fail(f"not a regular expression: {exc}") from None
    return Selector(tuple(path), operator, value, pattern)


def _field(reader: _Reader) -> str:
    reader.skip_space()
    char = reader.peek()
    if char == '"':
        return reader.quoted()[1]
    match = _FIELD.match(reader.text, reader.at)
    if not match:
        raise reader.fail("expected a field name or a quoted one")
    reader.at = match.end()
    return match.group()


def _value(reader: _Reader, regex: bool) -> str:
    reader.skip_space()
    char = reader.peek()
    if char in _QUOTES and char:
        quote, value = reader.quoted()
        if quote != '"' and not regex:
            raise reader.fail(f"{quote} quotes only a regular expression (~=)")
        return value
    start = reader.at
    while (reader.at < len(reader.text) and reader.text[reader.at] != ","
           and not reader.text[reader.at].isspace()):
        reader.at += 1
    if reader.at == start:
        raise reader.fail("expected a value")
    return reader.text[start:reader.at]


def parse_all(texts: Sequence[str]) -> list[Filter]:
    return [parse(text) for text in texts]


def matches(filters: Sequence[Filter], fields: Fields) -> bool:
    """Whether any of *filters* matches (every object when there are none)."""
    if not filters:
        return True
    return any(all(s.matches(fields) for s in selectors) for selectors in filters)
