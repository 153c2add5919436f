"""Engine calls off the event loop.

Any ioctl may wait (a suspend flushes I/O, a resume or remove waits for
udev), so every engine call runs on a worker thread. ``KernelWorkers`` is
the one way the service layer, the inventory, recovery and the reconciler
reach the kernel, naming the interface's method and its arguments (mypy
checks them against ``Engine``)::

    info = await kernel(Engine.device_info, name)

or a function of the engine, for several calls in one hand-over::

    infos = await kernel(read_many, names)     # read_many(engine, names)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, TypeVar

from dmd.engine.interface import Engine

T = TypeVar("T")
P = ParamSpec("P")


class KernelWorkers:
    def __init__(self, engine: Engine, workers: int = 8, slow_workers: int = 4) -> None:
        self.engine = engine  # for whoever owns it (the daemon, tests); calls go through __call__
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dmd-kernel")
        self._slow = ThreadPoolExecutor(max_workers=slow_workers, thread_name_prefix="dmd-slow")

    async def __call__(self, call: Callable[Concatenate[Engine, P], T], *args: P.args,
                       **kwargs: P.kwargs) -> T:
        """Run ``call(engine, *args)`` on a worker thread. A method of the
        ``Engine`` protocol is looked up on the engine itself (the protocol's
        own body is only a declaration)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._job(call, *args, **kwargs))

    async def slow(self, call: Callable[Concatenate[Engine, P], T], *args: P.args,
                   **kwargs: P.kwargs) -> T:
        """As calling, on workers of their own: for what takes seconds by
        design (cryptsetup's key derivation, zeroing gigabytes), so that it
        never holds a thread that the kernel calls of every pool need."""
        return await asyncio.get_running_loop().run_in_executor(
            self._slow, self._job(call, *args, **kwargs))

    def _job(self, call: Callable[Concatenate[Engine, P], T], *args: P.args,
             **kwargs: P.kwargs) -> Callable[[], T]:
        if getattr(Engine, call.__name__, None) is call:
            target: Callable[..., T] = getattr(self.engine, call.__name__)
            return functools.partial(target, *args, **kwargs)
        return functools.partial(call, self.engine, *args, **kwargs)

    async def run_slow(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args)`` (not the engine's) on the slow workers."""
        return await asyncio.get_running_loop().run_in_executor(
            self._slow, functools.partial(call, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._slow.shutdown(wait=True)
