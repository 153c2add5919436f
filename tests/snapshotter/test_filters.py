"""containerd's filter language: what parses, what it means, what fails."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dmd.snapshotter import filters
from dmd.snapshotter.filters import Operator, Selector

FIELDS = {("name",): "sha256:abc", ("kind",): "active", ("parent",): "",
          ("labels", "containerd.io/gc.root"): "2026", ("labels", "a.b"): "x,y"}


def fields(path: Sequence[str]) -> tuple[str, bool]:
    key = tuple(path) if path[0] != "labels" else ("labels", ".".join(path[1:]))
    return FIELDS.get(key, ""), key in FIELDS


@pytest.mark.parametrize(("text", "parsed"), [
    ("name==a", (Selector(("name",), Operator.EQUAL, "a"),)),
    ('labels."containerd.io/gc.root"', (Selector(("labels", "containerd.io/gc.root"),
                                                  Operator.PRESENT),)),
    ('parent!=""', (Selector(("parent",), Operator.NOT_EQUAL, ""),)),
    (' kind == view,labels.l', (Selector(("kind",), Operator.EQUAL, "view"),
                                Selector(("labels", "l"), Operator.PRESENT))),
    ('name=="a\\"b\\x41\\u00e9"', (Selector(("name",), Operator.EQUAL, 'a"bAé'),)),
    ("labels.a.b==1.2", (Selector(("labels", "a", "b"), Operator.EQUAL, "1.2"),)),
    ("", ()),
])
def test_parse(text: str, parsed: tuple[Selector, ...]) -> None:
    assert tuple((s.path, s.operator, s.value) for s in filters.parse(text)) == tuple(
        (s.path, s.operator, s.value) for s in parsed)


@pytest.mark.parametrize("text", [
    "name==", "==a", "name=a", "name===a", "name==/a/", 'name=="open', "name==a,",
    "name==a b", "labels.", "name~=/(/", 'name=="\\q"', "na-me==a",
    # spaces only before a field, an operator or a value, as containerd's parser
    "kind==view ,labels.l", "labels.l ", "labels .l"])
def test_bad_filters_are_refused(text: str) -> None:
    with pytest.raises(filters.FilterError):
        filters.parse(text)


@pytest.mark.parametrize(("texts", "expected"), [
    ([], True),
    (["name==sha256:abc"], True),
    (["name==sha256:abc,kind==view"], False),  # all selectors of one filter
    (["kind==view", "kind==active"], True),  # any one filter
    (["parent"], True),  # present, though empty
    (["labels.nope"], False),
    (["labels.nope!=x"], True),  # absent is not equal
    (["labels.nope==x"], False),
    (['labels."a.b"=="x,y"'], True),
    (["labels.a.b"], True),  # the label key is the rest of the path
    (["name~=/^sha256:/"], True),
    (["name~=|abc$|"], True),
    (["name~=^x"], False),
])
def test_matches(texts: list[str], expected: bool) -> None:
    assert filters.matches(filters.parse_all(texts), fields) is expected
