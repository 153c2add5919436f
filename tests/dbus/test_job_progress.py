"""How a job's progress reaches the bus: paced, so that a quick job is not
a storm of signals while a long one's still moves (the bus side of it is
in test_pools_api.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from dmd.dbus import pool_exporter
from dmd.dbus.job import JobInterface
from dmd.dbus.names import job_path
from dmd.dbus.pool_exporter import PoolExporter
from dmd.service.jobs import Jobs, progress


def exporter_of(jobs: Jobs) -> tuple[PoolExporter, list[float]]:
    """A pool exporter over *jobs* alone; the Progress values it publishes."""
    pools = SimpleNamespace(add_settler=lambda settler, begun=None: None, jobs=jobs)
    inventory = SimpleNamespace(subscribe=lambda listener: None)
    bus = SimpleNamespace(export=lambda path, obj: None)
    exporter = PoolExporter(bus, pools, inventory)  # type: ignore[arg-type]
    published: list[float] = []
    put = exporter._put

    def counted(path: str, cls: type[Any], values: dict[str, Any]) -> None:
        if cls is JobInterface:
            published.append(values["Progress"])
        put(path, cls, values)

    exporter._put = counted  # type: ignore[method-assign]
    return exporter, published


async def test_progress_is_published_at_most_every_interval(monkeypatch: Any) -> None:
    monkeypatch.setattr(pool_exporter, "PROGRESS_INTERVAL", 0.2)
    jobs = Jobs()
    _, published = exporter_of(jobs)

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        for step in range(1, 11):  # ten steps at once: none of them shown alone
            progress(step / 100)
        await asyncio.sleep(0.3)
        for step in range(1, 30):  # a long step: its progress moves while it runs
            progress(0.1 + step / 100)
            await asyncio.sleep(0.05)

    began = time.monotonic()
    job, _ = await jobs.start("op", 0, body)
    assert await jobs.wait(job.id, 10)
    took = time.monotonic() - began
    assert published[0] == 0.0 and published[-1] == 1.0
    middle = published[1:-1]
    # About one per interval over the job's 1.75 s or more (not 39), each
    # newer than the last.
    assert 4 <= len(middle) <= 1 + took / 0.2, (published, took)
    assert middle == sorted(set(middle)), published
    assert middle[0] == 0.1  # the burst, as one value once its interval was over
    count = len(published)
    await asyncio.sleep(0.3)
    assert len(published) == count, "a progress due was published after the end"


async def test_a_publication_due_is_dropped_with_the_job(monkeypatch: Any) -> None:
    """A progress due when the job ends is the end's (one publication, 1.0);
    due when the job is forgotten, it is dropped with the job's object."""
    monkeypatch.setattr(pool_exporter, "PROGRESS_INTERVAL", 0.3)
    jobs = Jobs(retention=0.05)
    exporter, published = exporter_of(jobs)

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        progress(0.5)  # due in 0.3 s: the job ends first

    job, _ = await jobs.start("op", 0, body)
    assert await jobs.wait(job.id, 10)
    assert published == [0.0, 1.0]
    await asyncio.sleep(0.5)  # forgotten after its retention
    assert published == [0.0, 1.0] and job_path(job.id) not in exporter.objects
