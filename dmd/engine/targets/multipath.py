"""multipath (drivers/md/dm-mpath.c and the path selectors dm-ps-*.c).

``<#features> <features> <#hw handler args> [<hw handler> <args>] <#groups>
<initial group> (<selector> <#selector args> <selector args> <#paths>
<#path args> (<device> <path args>)+)+``.

What the kernel prints back differs from what was loaded in ways that are
the kernel's own: round-robin prints a repeat_count of 1 whatever was given
(dm-ps-round-robin ignores larger ones), the "initial group" is the group
it will use next, request-based devices print no queue_mode, and the hw
handler is printed without its args.
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
    counted,
    join,
)


@dataclass(frozen=True)
class MultipathPath(Part):
    device: str = field(metadata=DEV)
    args: tuple[str, ...] = ()  # the selector's per-path args, e.g. ("1",) repeat_count


@dataclass(frozen=True)
class PathGroup(Part):
    paths: tuple[MultipathPath, ...]
    selector: str = "round-robin"
    selector_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.paths:
            raise TargetFormatError("multipath: a path group needs a path")
        if len({len(p.args) for p in self.paths}) != 1:
            raise TargetFormatError("multipath: every path of a group needs as many args")

    def words(self) -> list[str]:
        out = [self.selector, *counted(self.selector_args), str(len(self.paths)),
               str(len(self.paths[0].args))]
        for path in self.paths:
            out += [path.device, *path.args]
        return out


@dataclass(frozen=True)
class MultipathParams(TargetParams):
    target_type: ClassVar[str] = "multipath"
    groups: tuple[PathGroup, ...]
    initial_group: int = 1
    queue_if_no_path: bool = False
    pg_init_retries: int | None = None
    pg_init_delay_msecs: int | None = None
    retain_attached_hw_handler: bool = False
    queue_mode: str | None = None  # "bio", "rq" or "mq"; the kernel prints only "bio"
    hw_handler: tuple[str, ...] = ()  # (name, args...), e.g. ("alua",)
    extra_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.groups and not 1 <= self.initial_group <= len(self.groups):
            raise TargetFormatError("multipath: initial_group is not a group number")
        if not self.groups and self.initial_group not in (0, 1):
            raise TargetFormatError("multipath: initial_group is not a group number")

    def _features(self) -> list[str]:
        # multipath_status() order.
        feats = ["queue_if_no_path"] if self.queue_if_no_path else []
        if self.pg_init_retries is not None:
            feats += ["pg_init_retries", str(self.pg_init_retries)]
        if self.pg_init_delay_msecs is not None:
            feats += ["pg_init_delay_msecs", str(self.pg_init_delay_msecs)]
        if self.retain_attached_hw_handler:
            feats.append("retain_attached_hw_handler")
        if self.queue_mode is not None:
            feats += ["queue_mode", self.queue_mode]
        return feats + list(self.extra_features)

    def to_params(self) -> str:
        groups = [word for group in self.groups for word in group.words()]
        return join(*counted(self._features()), *counted(self.hw_handler), len(self.groups),
                    self.initial_group if self.groups else 0, *groups)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        values: dict[str, object] = {}
        extra: list[str] = []
        opts = Options(words.counted("features"), "multipath table")
        for opt in opts:
            if opt in ("queue_if_no_path", "retain_attached_hw_handler"):
                values[opt] = True
            elif opt in ("pg_init_retries", "pg_init_delay_msecs"):
                values[opt] = opts.uint(opt)
            elif opt == "queue_mode":
                values[opt] = opts.value(opt)
            else:
                extra.append(opt)
        hw_handler = words.counted("hw handler args")
        count = words.uint("number of path groups")
        initial = words.uint("initial path group")
        groups = []
        for _ in range(count):
            selector = words.word("path selector")
            selector_args = words.counted("path selector args")
            npaths = words.uint("number of paths")
            nargs = words.uint("number of path args")
            paths = tuple(
                MultipathPath(words.word("path device"),
                              tuple(words.word("path arg") for _ in range(nargs)))
                for _ in range(npaths))
            groups.append(PathGroup(paths, selector, selector_args))
        return cls(tuple(groups), initial, hw_handler=hw_handler,
                   extra_features=tuple(extra), **values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PathStatus(Part):
    device: str
    active: bool  # "A" active, "F" failed
    fail_count: int
    selector_info: tuple[str, ...] = ()  # e.g. queue-length: in-flight I/Os


@dataclass(frozen=True)
class PathGroupStatus(Part):
    state: str  # "A" active, "E" enabled, "D" disabled (bypassed)
    selector_status: tuple[str, ...]
    paths: tuple[PathStatus, ...]


@dataclass(frozen=True)
class MultipathStatus(TargetStatus):
    """``<#info> <queue_io> <pg_init_count> <#hw handler status> <...>
    <#groups> <next group> (<state> <#selector status> <...> <#paths>
    <#path info> (<device> <A|F> <fail count> <path info>)+)+``."""

    target_type: ClassVar[str] = "multipath"
    queueing_io: bool
    pg_init_count: int
    hw_handler_status: tuple[str, ...]
    next_group: int
    groups: tuple[PathGroupStatus, ...]
    extra: tuple[str, ...] = ()

    @property
    def active_paths(self) -> int:
        return sum(p.active for g in self.groups for p in g.paths)

    @classmethod
    def _parse(cls, words: Words) -> Self:
        info = words.counted("multipath info fields")
        if len(info) < 2 or not all(w.isdigit() for w in info[:2]):
            raise words.error("queue_io and pg_init_count are missing")
        hw = words.counted("hw handler status args")
        count = words.uint("number of path groups")
        next_group = words.uint("next path group")
        groups = []
        for _ in range(count):
            state = words.word("path group state")
            selector_status = words.counted("path selector status args")
            npaths = words.uint("number of paths")
            ninfo = words.uint("number of path info args")
            paths = []
            for _ in range(npaths):
                device = words.word("path device")
                active = words.word("path state")
                if active not in ("A", "F"):
                    raise words.error("path state must be A or F")
                fails = words.uint("fail count")
                sel = tuple(words.word("path selector info") for _ in range(ninfo))
                paths.append(PathStatus(device, active == "A", fails, sel))
            groups.append(PathGroupStatus(state, selector_status, tuple(paths)))
        return cls(info[0] != "0", int(info[1]), hw, next_group, tuple(groups),
                   info[2:] + words.rest())
