"""Thousands of generated bad calls at one ``dmd --sim``: it never crashes or
hangs, every bad call gets an error reply that is dmd's own (never the
internal ``Error.Failed``) or a standard one for calls dmd never takes, and a
refused call changes nothing.

"Nothing" is the whole visible state, compared before and after every
refused call (and around every storm of concurrent ones): every property of
every object (GetManagedObjects), the Manager's properties, and the simulated
kernel itself (the sim's JSON file), because dmd's objects are a cache that
is only refreshed after a change that succeeded.

Hypothesis draws programs of steps against one daemon: a single bad call, a
valid call on a scratch device (so the state does change now and then; after
those the state is only re-read), or 20-50 small bad calls at once. Shrinking
is off: the examples share a daemon whose state moves on, so a failure is
reported as drawn, with the exact call in the message.

Bugs it found, each now fixed and pinned by a test at the end of this file:
a table longer than a u64 of bytes was accepted and broke GetManagedObjects;
a refused Reload threw away the device's pending inactive table; a refused
Resume left the objects showing an inactive table the kernel had dropped;
GetDevice with a name the kernel cannot hold was an internal error;
GetManagedObjects answered any path and any arguments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import BusType, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dmd.dbus.convert import (
    MAX_STRING_BYTES,
    MAX_TABLE_BYTES,
    MAX_TABLE_LINES,
    OPTIONS,
)
from dmd.dbus.device import DEVICE_PROPERTIES, DeviceInterface
from dmd.dbus.manager import ManagerInterface
from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    DEVICES_PATH,
    ERROR_PREFIX,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
    device_path,
)
from dmd.engine import MAX_DEVICE_SECTORS, InvalidArgument, validate_name, validate_uuid
from dmd.engine.sim import SIM_TARGETS, SimDM

U64 = (1 << 64) - 1
CALL_TIMEOUT = 10.0  # seconds; every call must be answered well within this
EXAMPLES = 360  # 240 drew 2,276 calls once the Volume interface grew; the floor is 3,000

FAILED = ERROR_PREFIX + "Failed"
INVALID = ERROR_PREFIX + "InvalidArgument"
NOT_FOUND = ERROR_PREFIX + "NotFound"
# What dbus-fast answers for calls that never reach dmd's router.
STANDARD_ERRORS = {
    "org.freedesktop.DBus.Error.UnknownMethod",
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.InvalidArgs",
}
# ... and for org.freedesktop.DBus.Properties calls on names that do not exist.
PROPERTY_ERRORS = STANDARD_ERRORS | {
    "org.freedesktop.DBus.Error.UnknownInterface",
    "org.freedesktop.DBus.Error.UnknownProperty",
    "org.freedesktop.DBus.Error.PropertyReadOnly",
    # dbus-fast does not implement Get/Set with an empty interface name.
    "org.freedesktop.DBus.Error.NotSupported",
}

# Two fixed devices no valid call ever touches (dm_0, dm_1), both managed and
# both with a UUID (so SetUUID on them is always refused), two scratch names
# the valid calls create, rename and remove, and a name never created.
ANCHOR, OTHER = "fuzz-anchor", "fuzz-other"
ANCHOR_UUID, OTHER_UUID = "fuzz-uuid-anchor", "fuzz-uuid-other"
SCRATCH = ("fuzz-scratch-a", "fuzz-scratch-b")
FRESH = "fuzz-fresh"
KNOWN_NAMES = {ANCHOR, OTHER, *SCRATCH, FRESH}
DEVICE_REFS = (ANCHOR, OTHER, *SCRATCH)
MISSING_PATH = f"{DEVICES_PATH}/dm_999"  # where a scratch name that is not there points

MANAGER_PROPERTIES = ("KernelVersion", "Version")


# -- D-Bus types and values ---------------------------------------------------
# A type is a basic type code ("s"), "v", ("a", T), ("e", K, V) for a{KV},
# or ("r", (T, ...)) for a struct.

BASIC = "ybnqiuxtdsog"
KEYS = "ybnqiuxtsog"


def sig(t: Any) -> str:
    if isinstance(t, str):
        return t
    if t[0] == "a":
        return "a" + sig(t[1])
    if t[0] == "e":
        return "a{" + sig(t[1]) + sig(t[2]) + "}"
    return "(" + "".join(sig(x) for x in t[1]) + ")"


def sigs(types: list[Any]) -> str:
    return "".join(sig(t) for t in types)


TABLE_T = ("a", ("r", ("t", "t", "s", "s")))
OPTS_T = ("e", "s", "v")
LABELS_T = ("e", "s", "s")
ARGS: dict[str, list[Any]] = {
    "CreateDevice": ["s", TABLE_T, OPTS_T], "GetDevice": ["s"], "ListTargets": [],
    "RemoveAllManaged": [OPTS_T], "CreatePool": ["s", ("a", "s"), OPTS_T], "GetPool": ["s"],
    "ImportPool": [("a", "s"), OPTS_T], "ListDisks": [OPTS_T],
    "LoadTable": [TABLE_T, OPTS_T], "ClearTable": [OPTS_T], "Reload": [TABLE_T, OPTS_T],
    "Suspend": [OPTS_T], "Resume": [OPTS_T], "Rename": ["s", OPTS_T],
    "SetUUID": ["s", OPTS_T], "Message": ["t", "s", OPTS_T], "GetStatus": [OPTS_T],
    "GetTypedStatus": [OPTS_T],
    "Remove": [OPTS_T], "Adopt": [OPTS_T], "SetLabels": [LABELS_T, OPTS_T],
}
MANAGER_METHODS = ("CreateDevice", "GetDevice", "ListTargets", "RemoveAllManaged",
                   "CreatePool", "GetPool", "ImportPool", "ListDisks")
DEVICE_METHODS = tuple(m for m in ARGS if m not in MANAGER_METHODS)
STANDARD_MEMBERS = {"Ping", "GetMachineId", "Introspect", "Get", "GetAll", "Set",
                    "GetManagedObjects"}
KNOWN_MEMBERS = set(ARGS) | STANDARD_MEMBERS


def _declared() -> dict[str, str]:
    out = {}
    for interface in (ManagerInterface("", ""), DeviceInterface({})):
        out.update({m.name: m.in_signature for m in interface.introspect().methods})
    return out


# The fuzzer's idea of the API must be the daemon's.
assert {m: sigs(a) for m, a in ARGS.items()} == _declared()

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
               max_size=40)
long_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"),
                    max_size=300)
element = st.from_regex(r"[A-Za-z0-9_]{1,16}", fullmatch=True)
object_paths = st.one_of(st.just("/"), st.lists(element, min_size=1, max_size=4).map(
    lambda es: "/" + "/".join(es)))
member_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,30}", fullmatch=True)
interface_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}(\.[A-Za-z_][A-Za-z0-9_]{0,10}){1,3}",
                                fullmatch=True).filter(
    lambda i: i not in (MANAGER_INTERFACE, DEVICE_INTERFACE)
    and not i.startswith("org.freedesktop.DBus"))

_INTS = {"y": (0, 255), "n": (-(1 << 15), (1 << 15) - 1), "q": (0, (1 << 16) - 1),
         "i": (-(1 << 31), (1 << 31) - 1), "u": (0, (1 << 32) - 1),
         "x": (-(1 << 63), (1 << 63) - 1), "t": (0, U64)}


def types(depth: int = 2) -> st.SearchStrategy[Any]:
    basic = st.sampled_from([*list(BASIC), "v"])
    if depth <= 0:
        return st.sampled_from(list(BASIC))
    sub = types(depth - 1)
    return st.one_of(
        basic, sub.map(lambda t: ("a", t)),
        st.tuples(st.sampled_from(list(KEYS)), sub).map(lambda kv: ("e", *kv)),
        st.lists(sub, min_size=1, max_size=4).map(lambda ts: ("r", tuple(ts))))


def values(t: Any) -> st.SearchStrategy[Any]:
    """Values of type *t* as dbus-fast marshals them."""
    if isinstance(t, str) and t in _INTS:
        return st.integers(*_INTS[t])
    if t == "b":
        return st.booleans()
    if t == "d":
        return st.floats()
    if t == "s":
        return text
    if t == "o":
        return object_paths
    if t == "g":
        return st.sampled_from(["", "s", "a{sv}", "(ttss)", "ay", "v"])
    if t == "v":
        return variants(1)
    if t == ("a", "y"):
        return st.binary(max_size=16)
    if t[0] == "a":
        return st.lists(values(t[1]), max_size=3)
    if t[0] == "e":
        return st.dictionaries(values(t[1]), values(t[2]), max_size=3)
    return st.tuples(*[values(x) for x in t[1]]).map(list)


def variants(depth: int = 1) -> st.SearchStrategy[Variant]:
    return types(depth).flatmap(lambda t: values(t).map(lambda v: Variant(sig(t), v)))


def bodies(types_: list[Any]) -> st.SearchStrategy[tuple[str, list[Any]]]:
    return st.tuples(*[values(t) for t in types_]).map(lambda vs: (sigs(types_), list(vs)))


random_bodies = st.lists(types(), max_size=4).flatmap(bodies)


# -- names, tables, options ------------------------------------------------------

def refused_name(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidArgument:
        return True
    return name in (ANCHOR, OTHER)  # AlreadyExists


def refused_uuid(uuid: str) -> bool:
    try:
        validate_uuid(uuid)
    except InvalidArgument:
        return True
    return uuid in (ANCHOR_UUID, OTHER_UUID)  # in use


UDEV_SAFE = string.ascii_letters + string.digits + "#+-.:=@_"
safe_text = st.text(UDEV_SAFE, min_size=1, max_size=30)
small_bad_names = st.one_of(
    long_text.filter(refused_name),
    st.sampled_from(["", ".", "..", "control", "/", "a/b", "/dev/mapper/x", " ", "a b",
                     "tab\there", "new\nline", "caf\u00e9", "\U0001f4a9", ANCHOR, OTHER]),
    st.integers(128, 400).map(lambda n: "n" * n),                        # > 127 bytes
    st.integers(64, 127).map(lambda n: "\u00e9" * n),               # <= 127 chars, > 127 bytes
    st.tuples(safe_text, st.sampled_from("/ \u00e9$%!*?'\"\\\x01\x7f")).map("".join),
)
small_bad_uuids = st.one_of(
    long_text.filter(refused_uuid),
    st.sampled_from(["", "/", "a b", ANCHOR_UUID, OTHER_UUID]),
    st.integers(129, 300).map(lambda n: "u" * n),
)
# Strings over dmd's 64 KiB limit: never in a storm (see STEPS).
over_limit = st.integers(MAX_STRING_BYTES + 1, MAX_STRING_BYTES + 5000).map(lambda n: "x" * n)
BAD_NAMES = {True: small_bad_names, False: st.one_of(small_bad_names, over_limit)}
BAD_UUIDS = {True: small_bad_uuids, False: st.one_of(small_bad_uuids, over_limit)}
missing_names = safe_text.filter(lambda n: n not in KNOWN_NAMES and not refused_name(n))


def layout(lines: list[tuple[int, str]]) -> list[list[Any]]:
    """Contiguous lines from (length, target); every start stays a u64."""
    out, start = [], 0
    for length, target in lines:
        if start > U64:
            break
        out.append([start, length, target, ""])
        start += length
    return out


lengths = st.one_of(st.integers(1, 1 << 20), st.integers(U64 - 1024, U64),
                    st.sampled_from([1, 1 << 32, 1 << 55, 1 << 63, U64]))
base_tables = st.lists(st.tuples(lengths, st.sampled_from(["zero", "error"])),
                       min_size=1, max_size=5).map(layout)
TARGET_NAME = re.compile(r"[A-Za-z0-9_\-]+")
unknown_targets = st.from_regex(r"[A-Za-z0-9_\-]{1,15}", fullmatch=True).filter(
    lambda t: t not in SIM_TARGETS)
bad_target_names = st.one_of(
    text.filter(lambda t: not TARGET_NAME.fullmatch(t)),
    st.integers(16, 40).map(lambda n: "z" * n))
words = text.filter(lambda p: bool(p.split()))
# Linear and striped parameters the simulator can never accept (no such
# device, wrong count, bad chunk size): never "253:0 0", which is the anchor.
bad_linear = st.one_of(
    st.sampled_from(["", "7:99 0", "253:0", "253:0 x", "253:0 -1", "253:9999 0",
                     "/dev/mapper/nosuch 0", "/dev/dm-9999 0", "253:0 0 extra"]),
    text.filter(lambda p: ":" not in p and "/" not in p))
bad_striped = st.sampled_from(["", "2", "0 8", "2 8 7:99 0 7:98 0", "2 7 253:0 0 253:1 0",
                               "3 8 253:0 0", "x 8 253:0 0", "1 8 7:99 0", "1 0 253:0 0"])

CHEAP_DEFECTS = ["empty", "misplaced", "misplaced", "gap", "overlap", "zero-length",
                 "zero-length", "unknown-target", "unknown-target", "bad-target-name",
                 "zero-params", "linear", "striped", "oversized"]
COSTLY_DEFECTS = ["huge-params", "big-params", "too-many-lines", "thousands"]


@st.composite
def bad_tables(draw: Any, cheap: bool = False) -> list[list[Any]]:
    """A table with one defect the daemon must refuse before the table is live."""
    defect = draw(st.sampled_from(CHEAP_DEFECTS + ([] if cheap else COSTLY_DEFECTS)))
    if defect == "empty":
        return []
    if defect == "too-many-lines":
        n = draw(st.integers(MAX_TABLE_LINES + 1, MAX_TABLE_LINES + 100))
        return [[i, 1, "zero", ""] for i in range(n)]
    if defect == "thousands":  # contiguous, and the last line (or one) is wrong
        n = draw(st.integers(1000, 5000))
        lines = [[i * 8, 8, "zero", ""] for i in range(n)]
        i = draw(st.integers(0, n - 1))
        if draw(st.booleans()):
            lines[i][2] = draw(unknown_targets)
        else:
            lines[i][0] += draw(st.integers(1, 7))
        return lines
    if defect == "oversized":  # well laid out, but ends past the largest device
        end = draw(st.integers(MAX_DEVICE_SECTORS + 1, U64))
        cut = draw(st.integers(1, end - 1))
        return draw(st.sampled_from([[[0, end, "zero", ""]],
                                     [[0, cut, "zero", ""], [cut, end - cut, "error", ""]]]))
    lines = draw(base_tables)
    i = draw(st.integers(0, len(lines) - 1))
    line = lines[i]
    if defect == "misplaced":
        line[0] = draw(st.integers(0, U64).filter(lambda s: s != line[0]))
    elif defect == "gap":
        line[0] = line[0] + 1 if line[0] < U64 else line[0] - 1
    elif defect == "overlap":
        line[0] = line[0] - 1 if line[0] > 0 else 1
    elif defect == "zero-length":
        line[1] = 0
    elif defect == "unknown-target":
        line[2] = draw(unknown_targets)
    elif defect == "bad-target-name":
        line[2] = draw(bad_target_names)
    elif defect == "zero-params":
        line[2], line[3] = "zero", draw(words)
    elif defect == "linear":
        line[2], line[3] = "linear", draw(bad_linear)
    elif defect == "striped":
        line[2], line[3] = "striped", draw(bad_striped)
    elif defect == "huge-params":  # over the 4 MiB table limit
        line[3] = "x" * draw(st.integers(MAX_TABLE_BYTES + 1, MAX_TABLE_BYTES + (1 << 20)))
    elif defect == "big-params":  # under the limit: the kernel refuses it
        line[2] = draw(st.sampled_from(["zero", "nosuch"]))
        line[3] = "x " * draw(st.integers(1 << 19, 3 << 19))
    return lines


def right_types(method: str) -> st.SearchStrategy[dict[str, Variant]]:
    """A few options *method* accepts, with values it takes."""
    allowed = OPTIONS.get(method, {})
    value = {"b": st.booleans().map(lambda b: Variant("b", b)),
             "s": safe_text.filter(lambda u: not refused_uuid(u)).map(lambda u: Variant("s", u)),
             "a{ss}": st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), safe_text,
                                      max_size=3).map(lambda d: Variant("a{ss}", d)),
             "t": st.integers(0, U64).map(lambda n: Variant("t", n)),
             "u": st.integers(0, (1 << 32) - 1).map(lambda n: Variant("u", n))}
    if not allowed:
        return st.just({})
    return st.fixed_dictionaries({}, optional={k: value[s] for k, s in allowed.items()})


small_bad_labels = st.one_of(
    st.integers(65, 100).map(lambda n: {f"k{i}": "v" for i in range(n)}),       # too many
    st.integers(1025, 1100).map(lambda n: {"k": "v" * n}),                      # too long
    st.integers(1025, 1100).map(lambda n: {"k" * n: ""}),
    st.dictionaries(text, text, max_size=3).map(lambda d: {**d, "": "empty key"}),
)
BAD_LABELS = {True: small_bad_labels, False: st.one_of(
    small_bad_labels,
    st.integers(100, 5000).map(lambda n: {f"k{i}": "v" * 10 for i in range(n)}),
    st.integers(1100, 2 << 20).map(lambda n: {"k": "v" * n}),
    st.integers(1100, 1 << 16).map(lambda n: {"k" * n: "v" * n}))}


@st.composite
def bad_options(draw: Any, method: str, cheap: bool) -> dict[str, Variant]:
    """An a{sv} *method* must refuse: valid entries plus one that is not."""
    allowed = OPTIONS.get(method, {})
    options = dict(draw(right_types(method)))
    defects = ["unknown-key", "unknown-key", "named"]
    if allowed:
        defects += ["wrong-type", "wrong-type"]
    if method == "CreateDevice":
        defects += ["labels", "uuid"]
    defect = draw(st.sampled_from(defects))
    if defect == "unknown-key":
        options[draw(text.filter(lambda k: k not in allowed))] = draw(variants())
    elif defect == "named":  # the classic mistakes, under names some method knows
        key, value = draw(st.sampled_from([
            ("read-only", Variant("s", "yes")), ("read-only", Variant("i", 1)),
            ("force", Variant("s", "true")), ("noflush", Variant("ay", b"\x01")),
            ("labels", Variant("a{sv}", {"k": Variant("s", "v")})),
            ("labels", Variant("as", ["k", "v"])), ("uuid", Variant("u", 5)),
            ("persistent", Variant("v", Variant("b", True))), ("labels", Variant("s", "k=v")),
        ]))
        if allowed.get(key) == value.signature:  # cannot happen, but never send a valid one
            key = "no-such-option"
        options[key] = value
    elif defect == "wrong-type":
        key = draw(st.sampled_from(sorted(allowed)))
        options[key] = draw(variants().filter(lambda v: v.signature != allowed[key]))
    elif defect == "labels":
        options["labels"] = Variant("a{ss}", draw(BAD_LABELS[cheap]))
    else:  # "" is not bad here: CreateDevice documents it as "no UUID"
        options["uuid"] = Variant("s", draw(BAD_UUIDS[cheap].filter(bool)))
    return options


# -- calls -----------------------------------------------------------------------

@dataclasses.dataclass
class Call:
    target: str  # "root", a device name (resolved when sent) or an object path
    interface: str | None
    member: str
    signature: str
    body: list[Any]
    errors: str = "own"  # "own": dmd's errors only; "std" / "props": see above
    expect: str | None = None  # the one error name this call must get
    bad: bool = True  # False: a valid call on a scratch device, any outcome
    interactive: bool = False

    def describe(self, path: str) -> str:
        body = repr(self.body)
        if len(body) > 300:
            body = body[:300] + f"... ({len(body)} chars)"
        return (f"{self.interface}.{self.member}({self.signature}) on {path}"
                f" [{self.target}]: {body}")


def manager(member: str, signature: str, body: list[Any], **kw: Any) -> Call:
    return Call("root", MANAGER_INTERFACE, member, signature, body, **kw)


def device(target: str, member: str, signature: str, body: list[Any], **kw: Any) -> Call:
    return Call(target, DEVICE_INTERFACE, member, signature, body, **kw)


devices = st.sampled_from(DEVICE_REFS)
missing_paths = st.one_of(
    st.integers(64, 1 << 63).map(device_path),
    element.filter(lambda e: not re.fullmatch(r"dm_\d+", e)).map(
        lambda e: f"{DEVICES_PATH}/{e}"),
    st.lists(element, min_size=2, max_size=4).map(lambda es: DEVICES_PATH + "/" + "/".join(es)),
)
foreign_paths = st.one_of(object_paths.filter(
    lambda p: p != ROOT_PATH and not p.startswith(DEVICES_PATH + "/")), st.sampled_from(
    ["/", "/org", "/org/example", DEVICES_PATH, ROOT_PATH + "/x", ROOT_PATH + "/devicesx"]))
good_tables = st.lists(st.tuples(st.integers(1, 1 << 20), st.sampled_from(["zero", "error"])),
                       min_size=1, max_size=3).map(layout)


def create_calls(cheap: bool) -> st.SearchStrategy[Call]:
    sig_ = sigs(ARGS["CreateDevice"])
    return st.one_of(
        st.tuples(BAD_NAMES[cheap], good_tables, right_types("CreateDevice")).map(
            lambda a: manager("CreateDevice", sig_, list(a))),
        st.tuples(bad_tables(cheap), right_types("CreateDevice")).map(
            lambda a: manager("CreateDevice", sig_, [FRESH, a[0], a[1]])),
        st.tuples(good_tables, bad_options("CreateDevice", cheap)).map(
            lambda a: manager("CreateDevice", sig_, [FRESH, a[0], a[1]])),
        st.tuples(st.sampled_from([ANCHOR, OTHER]), good_tables).map(
            lambda a: manager("CreateDevice", sig_, [a[0], a[1], {}],
                              expect=ERROR_PREFIX + "AlreadyExists")),
        good_tables.map(lambda t: manager(
            "CreateDevice", sig_, [FRESH, t, {"uuid": Variant("s", ANCHOR_UUID)}],
            expect=ERROR_PREFIX + "AlreadyExists")),
    )


def table_calls(cheap: bool) -> st.SearchStrategy[Call]:
    return st.one_of(
        st.tuples(devices, bad_tables(cheap), right_types("LoadTable")).map(
            lambda a: device(a[0], "LoadTable", "a(ttss)a{sv}", [a[1], a[2]])),
        st.tuples(devices, bad_tables(cheap), right_types("Reload")).map(
            lambda a: device(a[0], "Reload", "a(ttss)a{sv}", [a[1], a[2]])),
    )


def option_calls(cheap: bool) -> st.SearchStrategy[Call]:
    """Every method that takes options, with options it must refuse (the
    other arguments valid: the options alone make the call wrong)."""
    def one(method: str) -> st.SearchStrategy[Call]:
        opts = bad_options(method, cheap)
        if method in ("RemoveAllManaged", "ListDisks"):
            return opts.map(lambda o: manager(method, "a{sv}", [o]))
        if method == "CreatePool":
            return opts.map(lambda o: manager(method, "sasa{sv}",
                                              ["fuzzpool", ["/dev/nothing"], o]))
        if method == "ImportPool":
            return opts.map(lambda o: manager(method, "asa{sv}", [["/dev/nothing"], o]))
        if method == "CreateDevice":
            return st.nothing()  # in create_calls
        rest = {"LoadTable": good_tables.map(lambda t: [t]),
                "Reload": good_tables.map(lambda t: [t]),
                "Rename": st.sampled_from((*SCRATCH, "fuzz-new")).map(lambda n: [n]),
                "SetUUID": st.just(["fuzz-uuid-new"]),
                "Message": st.tuples(st.integers(0, U64), text).map(list),
                "SetLabels": st.just([{"k": "v"}])}.get(method, st.just([]))
        return st.tuples(devices, rest, opts).map(
            lambda a: device(a[0], method, sigs(ARGS[method]), [*a[1], a[2]]))

    return st.one_of([one(m) for m in ARGS if OPTS_T in ARGS[m]])


def device_calls(cheap: bool) -> st.SearchStrategy[Call]:
    return st.one_of(
        st.tuples(devices, BAD_NAMES[cheap]).map(
            lambda a: device(a[0], "Rename", "sa{sv}", [a[1], {}])),
        st.tuples(st.sampled_from([ANCHOR, OTHER]),
                  st.one_of(BAD_UUIDS[cheap], safe_text)).map(  # they have a UUID already
            lambda a: device(a[0], "SetUUID", "sa{sv}", [a[1], {}])),
        st.tuples(devices, BAD_UUIDS[cheap]).map(
            lambda a: device(a[0], "SetUUID", "sa{sv}", [a[1], {}])),
        st.tuples(devices, BAD_LABELS[cheap]).map(
            lambda a: device(a[0], "SetLabels", "a{ss}a{sv}", [a[1], {}])),
        st.tuples(devices, st.integers(0, U64), st.one_of(
            long_text, st.just(""), *([] if cheap else [over_limit]))).map(
            lambda a: device(a[0], "Message", "tsa{sv}", [a[1], a[2], {}])),  # the sim has none
        st.tuples(st.sampled_from([ANCHOR, OTHER]), right_types("Adopt")).map(
            lambda a: device(a[0], "Adopt", "a{sv}", [a[1]],
                             expect=ERROR_PREFIX + "AlreadyExists")),
        missing_names.map(lambda n: manager("GetDevice", "s", [n], expect=NOT_FOUND)),
        BAD_NAMES[cheap].filter(lambda n: n not in KNOWN_NAMES).map(
            lambda n: manager("GetDevice", "s", [n], expect=INVALID)),
    )


@st.composite
def wrong_signatures(draw: Any) -> Call:
    """A method of dmd's with arguments of the wrong types: one argument
    missing, one too many, one of another type, or anything at all."""
    method = draw(st.sampled_from(sorted(ARGS)))
    declared = list(ARGS[method])
    near = {"s": ["o", "g", ("a", "s"), "v", "y"], "t": ["u", "x", "i", "d"],
            TABLE_T: [("a", ("r", ("t", "t", "s"))), ("a", ("r", ("t", "t", "s", "s", "s"))),
                      ("a", ("r", ("u", "u", "s", "s"))), ("r", ("t", "t", "s", "s")),
                      ("a", TABLE_T), ("a", "s"), ("e", "t", ("r", ("t", "s", "s")))],
            OPTS_T: [LABELS_T, ("a", "v"), ("e", "u", "v"), "v", ("a", ("r", ("s", "v")))],
            LABELS_T: [OPTS_T, ("a", "s"), ("e", "s", "v")],
            ("a", "s"): ["s", ("a", "o"), ("a", "v"), ("a", ("a", "s")), OPTS_T]}
    how = draw(st.sampled_from(["drop", "add", "swap", "near", "random"]))
    types_ = list(declared)
    if how == "drop" and types_:
        del types_[draw(st.integers(0, len(types_) - 1))]
    elif how == "add":
        types_.insert(draw(st.integers(0, len(types_))), draw(types()))
    elif how == "swap" and types_:
        types_[draw(st.integers(0, len(types_) - 1))] = draw(types())
    elif how == "near" and types_:
        i = draw(st.integers(0, len(types_) - 1))
        types_[i] = draw(st.sampled_from(near[types_[i]]))
    else:
        types_ = draw(st.lists(types(), max_size=4))
    if sigs(types_) == sigs(declared):
        types_.append("s")
    signature, body = draw(bodies(types_))
    interface = draw(st.sampled_from(
        [MANAGER_INTERFACE if method in MANAGER_METHODS else DEVICE_INTERFACE, None]))
    target = "root" if method in MANAGER_METHODS else draw(
        st.one_of(devices, missing_paths))
    # The router checks the signature first, even for a device that is not there.
    return Call(target, interface, method, signature, body, expect=INVALID)


@st.composite
def missing_devices(draw: Any) -> Call:
    """A device method, correctly typed, on an object that is not there."""
    method = draw(st.sampled_from(DEVICE_METHODS))
    signature, body = draw(bodies(ARGS[method]))
    return Call(draw(missing_paths), draw(st.sampled_from([DEVICE_INTERFACE, None])), method,
                signature, body, expect=NOT_FOUND)


@st.composite
def foreign_calls(draw: Any) -> Call:
    """Calls dmd's router never takes: unknown members, dmd's members on the
    wrong interface or path, and standard interfaces misused."""
    kind = draw(st.sampled_from(["member", "interface", "path", "properties", "standard"]))
    target = draw(st.one_of(st.just("root"), devices, missing_paths, foreign_paths))
    if kind == "member":
        member = draw(member_names.filter(lambda m: m not in KNOWN_MEMBERS))
        interface = draw(st.one_of(st.sampled_from([MANAGER_INTERFACE, DEVICE_INTERFACE, None]),
                                   interface_names))
        signature, body = draw(random_bodies)
        return Call(target, interface, member, signature, body, errors="std")
    if kind in ("interface", "path"):
        method = draw(st.sampled_from(sorted(ARGS)))
        signature, body = draw(bodies(ARGS[method]))
        if kind == "interface":
            interface = draw(interface_names)
        else:  # the other interface's path, or no dmd path at all
            interface = draw(st.sampled_from([MANAGER_INTERFACE, DEVICE_INTERFACE, None]))
            ours = "root" if method in MANAGER_METHODS else DEVICE_REFS
            target = draw(foreign_paths) if interface is None else (
                draw(devices) if ours == "root" else "root")
        return Call(target, interface, method, signature, body, errors="std")
    if kind == "properties":
        which = draw(st.sampled_from(["Get", "GetAll", "Set", "wrong"]))
        interface = draw(st.one_of(st.sampled_from([DEVICE_INTERFACE, MANAGER_INTERFACE, ""]),
                                   interface_names))
        known = set(DEVICE_PROPERTIES) | set(MANAGER_PROPERTIES)
        prop = draw(st.one_of(text.filter(lambda p: p not in known), st.sampled_from(
            sorted(known))))
        if which == "Get":
            if interface in (DEVICE_INTERFACE, MANAGER_INTERFACE) and prop in known:
                prop += "X"
            signature, body = "ss", [interface, prop]
        elif which == "GetAll":
            interface = draw(interface_names)
            signature, body = "s", [interface]
        elif which == "Set":  # every property is read-only
            signature, body = "ssv", [interface, prop, draw(variants())]
        else:
            which = draw(st.sampled_from(["Get", "GetAll", "Set"]))
            signature, body = draw(random_bodies.filter(lambda sb: sb[0] not in ("s", "ss",
                                                                                 "ssv")))
        return Call(target, PROPERTIES_INTERFACE, which, signature, body, errors="props")
    # standard members with arguments they do not take
    interface, member = draw(st.sampled_from([
        ("org.freedesktop.DBus.Introspectable", "Introspect"),
        ("org.freedesktop.DBus.Peer", "Ping"),
        (OBJECT_MANAGER_INTERFACE, "GetManagedObjects"),
    ]))
    if member == "GetManagedObjects" and target == "root":
        target = DEVICE_REFS[0]  # the root's own: test_get_managed_objects_checks_its_signature
    signature, body = draw(random_bodies.filter(lambda sb: sb[0] != ""))
    return Call(target, interface, member, signature, body, errors="std")


def bad_calls(cheap: bool) -> st.SearchStrategy[Call]:
    kinds: list[st.SearchStrategy[Call]] = [
        create_calls(cheap), create_calls(cheap), table_calls(cheap), table_calls(cheap),
        option_calls(cheap), option_calls(cheap), device_calls(cheap), device_calls(cheap),
        wrong_signatures(), wrong_signatures(), missing_devices(), foreign_calls(),
        foreign_calls()]
    calls = st.sampled_from(range(len(kinds))).flatmap(lambda i: kinds[i])
    return st.tuples(calls, st.integers(0, 7)).map(
        lambda ci: dataclasses.replace(ci[0], interactive=ci[1] == 0))


@st.composite
def valid_calls(draw: Any) -> Call:
    """A call on a scratch device that may well succeed."""
    name = draw(st.sampled_from(SCRATCH))
    op = draw(st.sampled_from(["create", "create", "create", "remove", "rename", "suspend",
                               "resume", "load", "clear", "reload", "labels", "uuid",
                               "status", "typed-status", "adopt"]))
    flags = st.fixed_dictionaries({}, optional={
        k: st.booleans().map(lambda b: Variant("b", b)) for k in ("force", "deferred")})
    if op == "create":
        opts = draw(right_types("CreateDevice"))
        if "uuid" in opts:
            opts["uuid"] = Variant("s", draw(st.sampled_from(
                ["fuzz-uuid-a", "fuzz-uuid-b", ANCHOR_UUID])))
        return manager("CreateDevice", "sa(ttss)a{sv}", [name, draw(good_tables), opts],
                       bad=False)
    calls: dict[str, tuple[str, str, list[Any]]] = {
        "remove": ("Remove", "a{sv}", [draw(flags)]),
        "rename": ("Rename", "sa{sv}", [draw(st.sampled_from(SCRATCH)), {}]),
        "suspend": ("Suspend", "a{sv}", [draw(right_types("Suspend"))]),
        "resume": ("Resume", "a{sv}", [{}]),
        "load": ("LoadTable", "a(ttss)a{sv}", [draw(good_tables), draw(right_types("LoadTable"))]),
        "clear": ("ClearTable", "a{sv}", [{}]),
        "reload": ("Reload", "a(ttss)a{sv}", [draw(good_tables), {}]),
        "labels": ("SetLabels", "a{ss}a{sv}", [draw(st.dictionaries(
            st.from_regex(r"[a-z]{1,8}", fullmatch=True), text, max_size=4)), {}]),
        "uuid": ("SetUUID", "sa{sv}", [draw(st.sampled_from(["fuzz-uuid-a", "fuzz-uuid-b"])),
                                       {}]),
        "status": ("GetStatus", "a{sv}", [{}]),
        "typed-status": ("GetTypedStatus", "a{sv}", [{}]),
        "adopt": ("Adopt", "a{sv}", [{}]),
    }
    member, signature, body = calls[op]
    return device(name, member, signature, body, bad=False)


def weight(value: Any) -> int:
    """About the bytes *value* takes in a message."""
    if isinstance(value, (str, bytes)):
        return len(value) + 8
    if isinstance(value, Variant):
        return weight(value.value) + 8
    if isinstance(value, (list, tuple)):
        return sum(weight(v) for v in value) + 8
    if isinstance(value, dict):
        return sum(weight(k) + weight(v) for k, v in value.items()) + 8
    return 8


# A storm holds only small calls: dbus-fast's writer gives up (EAGAIN, and the
# connection is dropped) when a message is queued while a big one is still
# being written; that is the client library's bug, not dmd's. Big calls are
# sent one at a time, each after the previous reply.
STEPS = {
    "one": bad_calls(cheap=False),
    "valid": valid_calls(),
    "many": st.lists(bad_calls(cheap=True).filter(lambda c: weight(c.body) <= 4096),
                     min_size=20, max_size=50),
}
steps = st.sampled_from(["one"] * 6 + ["valid"] * 3 + ["many"]).flatmap(
    lambda kind: STEPS[kind].map(lambda payload: (kind, payload)))
programs = st.lists(steps, min_size=1, max_size=12)


# -- running -------------------------------------------------------------------

def plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return (value.signature, plain(value.value))
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class State:
    objects: dict[str, Any]
    manager: dict[str, Any]
    kernel: dict[str, Any]

    def path_of(self, name: str) -> str | None:
        for path, interfaces in self.objects.items():
            if interfaces[DEVICE_INTERFACE]["Name"][1] == name:
                return path
        return None


def diff(before: State, after: State) -> str:
    out = []
    for part in ("manager", "kernel"):
        if getattr(before, part) != getattr(after, part):
            out.append(f"{part}: {getattr(before, part)} -> {getattr(after, part)}")
    for path in sorted(set(before.objects) | set(after.objects)):
        old = before.objects.get(path, {}).get(DEVICE_INTERFACE)
        new = after.objects.get(path, {}).get(DEVICE_INTERFACE)
        if old is None or new is None:
            out.append(f"{path}: {'added' if old is None else 'removed'}")
        elif old != new:
            out += [f"{path} {k}: {old.get(k)} -> {new.get(k)}"
                    for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "\n".join(out)


class Fuzzer:
    def __init__(self, bus: MessageBus, sim: Path) -> None:
        self.bus, self.sim = bus, sim
        self.calls = 0
        self.refused = 0

    async def raw(self, path: str, interface: str | None, member: str, signature: str = "",
                  body: list[Any] | None = None, interactive: bool = False) -> Message:
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if interactive else \
            MessageFlag.NONE
        msg = Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                      signature=signature, body=body or [], flags=flags)
        reply = await asyncio.wait_for(self.bus.call(msg), CALL_TIMEOUT)
        assert reply is not None
        return reply

    async def ok(self, path: str, interface: str, member: str, signature: str = "",
                 body: list[Any] | None = None) -> list[Any]:
        reply = await self.raw(path, interface, member, signature, body)
        assert reply.message_type is MessageType.METHOD_RETURN, (
            member, reply.error_name, reply.body)
        return list(reply.body)

    async def state(self) -> State:
        (objects,) = await self.ok(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        (props,) = await self.ok(ROOT_PATH, PROPERTIES_INTERFACE, "GetAll", "s",
                                 [MANAGER_INTERFACE])
        kernel = SimDM(self.sim).snapshot()
        return State(plain(objects), plain(props), kernel)

    def resolve(self, call: Call, state: State) -> str:
        if call.target == "root":
            return ROOT_PATH
        if call.target.startswith("/"):
            return call.target
        path = state.path_of(call.target) or MISSING_PATH
        return path

    async def send(self, call: Call, path: str) -> Message:
        self.calls += 1
        try:
            return await self.raw(path, call.interface, call.member, call.signature, call.body,
                                  call.interactive)
        except TimeoutError:
            raise AssertionError(f"no reply in {CALL_TIMEOUT} s: {call.describe(path)}") from None

    def check(self, call: Call, path: str, reply: Message) -> bool:
        """True if the call was refused (with a name it may be refused with)."""
        if reply.message_type is not MessageType.ERROR:
            assert reply.message_type is MessageType.METHOD_RETURN
            assert not call.bad, f"a bad call was accepted: {call.describe(path)}"
            return False
        self.refused += 1
        name = reply.error_name or ""
        what = f"{name} {reply.body} for {call.describe(path)}"
        assert name != FAILED, f"internal error: {what}"
        allowed = {"own": set(), "std": STANDARD_ERRORS, "props": PROPERTY_ERRORS}[call.errors]
        if call.errors == "own":
            assert name.startswith(ERROR_PREFIX), f"not dmd's error: {what}"
        else:
            assert name.startswith(ERROR_PREFIX) or name in allowed, f"unexpected error: {what}"
        if call.expect is not None:
            assert name == call.expect, f"expected {call.expect}: {what}"
        return True

    async def run(self, program: list[tuple[str, Any]]) -> None:
        state = await self.state()
        for kind, payload in program:
            if kind == "many":
                paths = [self.resolve(c, state) for c in payload]
                replies = await asyncio.gather(*(self.send(c, p)
                                                 for c, p in zip(payload, paths, strict=True)))
                for call, path, reply in zip(payload, paths, replies, strict=True):
                    self.check(call, path, reply)
                after = await self.state()
                assert after == state, f"{len(payload)} refused calls at once changed:\n" \
                    f"{diff(state, after)}\n" + "\n".join(
                        c.describe(p) for c, p in zip(payload, paths, strict=True))
                continue
            call: Call = payload
            path = self.resolve(call, state)
            refused = self.check(call, path, await self.send(call, path))
            after = await self.state()
            if refused:
                assert after == state, \
                    f"a refused call changed:\n{diff(state, after)}\n{call.describe(path)}"
            state = after


async def connect(address: str) -> MessageBus:
    return await MessageBus(bus_address=address, bus_type=BusType.SESSION).connect()


async def create(fuzzer: Fuzzer, name: str, table: list[Any],
                 options: dict[str, Variant] | None = None) -> str:
    (path,) = await fuzzer.ok(ROOT_PATH, MANAGER_INTERFACE, "CreateDevice", "sa(ttss)a{sv}",
                              [name, table, options or {}])
    return str(path)


def test_bad_calls_are_refused_and_change_nothing(dmd_session: Any) -> None:
    loop = asyncio.new_event_loop()
    bus = loop.run_until_complete(connect(dmd_session.address))
    fuzzer = Fuzzer(bus, dmd_session.sim)
    try:
        for name, uuid, minor in ((ANCHOR, ANCHOR_UUID, 0), (OTHER, OTHER_UUID, 1)):
            path = loop.run_until_complete(create(
                fuzzer, name, [[0, 2048, "zero", ""]],
                {"uuid": Variant("s", uuid), "labels": Variant("a{ss}", {"role": "anchor"})}))
            assert path == device_path(minor)

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example,
                                         HealthCheck.filter_too_much])
        @given(programs)
        def run(program: list[tuple[str, Any]]) -> None:
            loop.run_until_complete(fuzzer.run(program))
            assert dmd_session.proc.poll() is None, "dmd died"

        run()
        # After all that the daemon still answers, and the fixed devices are intact.
        state = loop.run_until_complete(fuzzer.state())
        assert state.path_of(ANCHOR) == device_path(0)
        assert state.path_of(OTHER) == device_path(1)
    finally:
        bus.disconnect()
        loop.close()
    print(f"\nfuzz: {fuzzer.calls} calls, {fuzzer.refused} refused")
    assert dmd_session.proc.poll() is None, "dmd died"
    assert fuzzer.calls >= 3000, fuzzer.calls


# -- bugs the fuzzer found: each is the smallest call that shows it ---------------

def run_async(dmd_session: Any, body: Callable[[Fuzzer], Any]) -> None:
    async def main() -> None:
        bus = await connect(dmd_session.address)
        try:
            await body(Fuzzer(bus, dmd_session.sim))
        finally:
            bus.disconnect()

    asyncio.run(main())
    assert dmd_session.proc.poll() is None, "dmd died"


def test_table_larger_than_a_u64_of_bytes_is_refused(dmd_session: Any) -> None:
    async def body(f: Fuzzer) -> None:
        before = await f.state()
        reply = await f.raw(ROOT_PATH, MANAGER_INTERFACE, "CreateDevice", "sa(ttss)a{sv}",
                            ["huge", [[0, U64, "zero", ""]], {}])
        assert reply.message_type is MessageType.ERROR, "accepted"
        assert reply.error_name == INVALID
        assert await f.state() == before

    run_async(dmd_session, body)


def test_reload_over_a_loaded_inactive_table_is_busy_and_keeps_it(dmd_session: Any) -> None:
    """Reload would have to throw away somebody's loaded table (and a rollback
    could not bring it back): it is refused and nothing changes."""
    async def body(f: Fuzzer) -> None:
        path = await create(f, "one", [[0, 8, "zero", ""]])
        await f.ok(path, DEVICE_INTERFACE, "LoadTable", "a(ttss)a{sv}", [[[0, 16, "zero", ""]],
                                                                         {}])
        before = await f.state()
        for table in ([[0, 8, "nosuch", ""]], [[0, 32, "zero", ""]]):
            reply = await f.raw(path, DEVICE_INTERFACE, "Reload", "a(ttss)a{sv}", [table, {}])
            assert reply.error_name == ERROR_PREFIX + "Busy", (reply.error_name, reply.body)
            after = await f.state()
            assert after == before, diff(before, after)
        await f.ok(path, DEVICE_INTERFACE, "Rename", "sa{sv}", ["two", {}])

    run_async(dmd_session, body)


def test_refused_reload_changes_nothing(dmd_session: Any) -> None:
    async def body(f: Fuzzer) -> None:
        path = await create(f, "one", [[0, 8, "zero", ""]])
        before = await f.state()
        reply = await f.raw(path, DEVICE_INTERFACE, "Reload", "a(ttss)a{sv}",
                            [[[0, 8, "nosuch", ""]], {}])
        assert reply.error_name == ERROR_PREFIX + "Kernel"
        after = await f.state()
        assert after == before, diff(before, after)

    run_async(dmd_session, body)


def test_refused_resume_leaves_objects_that_match_the_kernel(dmd_session: Any) -> None:
    async def body(f: Fuzzer) -> None:
        await create(f, "base", [[0, 8, "zero", ""]])
        path = await create(f, "top", [[0, 8, "zero", ""]])
        await f.ok(path, DEVICE_INTERFACE, "LoadTable", "a(ttss)a{sv}",
                   [[[0, 16, "linear", "253:0 100"]], {}])
        before = await f.state()
        reply = await f.raw(path, DEVICE_INTERFACE, "Resume", "a{sv}", [{}])
        assert reply.error_name == ERROR_PREFIX + "Kernel"
        # The kernel threw the table away; dmd loaded it back: nothing changed.
        after = await f.state()
        assert after == before, diff(before, after)
        assert after.kernel["devices"]["top"]["inactive"] is not None
        assert after.objects[path][DEVICE_INTERFACE]["Suspended"][1] is False

    run_async(dmd_session, body)


@pytest.mark.parametrize("name", ["a b", "", "x" * 200, "caf\u00e9", "/"])
def test_get_device_refuses_an_invalid_name(dmd_session: Any, name: str) -> None:
    async def body(f: Fuzzer) -> None:
        reply = await f.raw(ROOT_PATH, MANAGER_INTERFACE, "GetDevice", "s", [name])
        assert reply.error_name == INVALID, (reply.error_name, reply.body)

    run_async(dmd_session, body)


def test_get_managed_objects_checks_its_signature_and_path(dmd_session: Any) -> None:
    async def body(f: Fuzzer) -> None:
        reply = await f.raw(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects", "s",
                            ["x"])
        assert reply.message_type is MessageType.ERROR, f"answered: {reply.body}"
        assert reply.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
        # Only the root is an object manager (dbus-fast would answer anywhere).
        reply = await f.raw(device_path(0), OBJECT_MANAGER_INTERFACE, "GetManagedObjects",
                            "", [])
        assert reply.error_name == "org.freedesktop.DBus.Error.UnknownObject", reply.body
        reply = await f.raw(ROOT_PATH, None, "GetManagedObjects", "", [])
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body

    run_async(dmd_session, body)
