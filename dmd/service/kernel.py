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
    def __init__(self, engine: Engine, workers: int = 8) -> None:
        self.engine = engine  # for whoever owns it (the daemon, tests); calls go through __call__
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dmd-kernel")

    async def __call__(self, call: Callable[Concatenate[Engine, P], T], *args: P.args,
                       **kwargs: P.kwargs) -> T:
        """Run ``call(engine, *args)`` on a worker thread. A method of the
        ``Engine`` protocol is looked up on the engine itself (the protocol's
        own body is only a declaration)."""
        if getattr(Engine, call.__name__, None) is call:
            target: Callable[..., T] = getattr(self.engine, call.__name__)
            job = functools.partial(target, *args, **kwargs)
        else:
            job = functools.partial(call, self.engine, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
