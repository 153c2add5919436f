"""Jobs: accepted requests answered at once, ends kept readable, cancel
honoured only where the work can still be undone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_pools import DISKS, GIB, assert_agree, open_pools, state

from dmd.service import errors
from dmd.service.auth import ROOT
from dmd.service.jobs import JobEvent, Jobs, JobState, cancel_point


async def test_accepted_job_answers_before_it_ends() -> None:
    jobs = Jobs()
    events: list[tuple[int, JobEvent]] = []
    jobs.subscribe(lambda job, event: events.append((job.id, event)))
    gate = asyncio.Event()

    async def body(accept: Callable[[Any], None]) -> str:
        accept("subject")
        await gate.wait()
        return "result"

    job, subject = await jobs.start("op", 1000, body)
    assert subject == "subject" and job.state is JobState.RUNNING and job.subject == "subject"
    assert events == [(job.id, JobEvent.ADDED)]
    assert not await jobs.wait(job.id, 0.01)
    gate.set()
    assert await jobs.wait(job.id, 5)
    assert job.state is JobState.COMPLETED and job.result == "result" and job.progress == 1.0
    assert events[-1] == (job.id, JobEvent.FINISHED) and jobs.get(job.id) is job


async def test_a_refusal_before_accepting_is_an_error_and_no_job() -> None:
    jobs = Jobs()

    async def body(accept: Callable[[Any], None]) -> None:
        raise errors.InvalidArgument("no")

    with pytest.raises(errors.InvalidArgument):
        await jobs.start("op", 0, body)
    assert list(jobs) == []


async def test_failure_after_accepting_is_the_jobs_end() -> None:
    jobs = Jobs()

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        raise errors.Busy("the pool is busy")

    job, _ = await jobs.start("op", 0, body)
    await jobs.wait(job.id, 5)
    assert job.state is JobState.FAILED and job.error_name == "Busy"
    assert job.error_message == "the pool is busy"


async def test_cancel_at_a_step_that_can_be_undone_and_not_after() -> None:
    jobs = Jobs()
    step = asyncio.Event()
    go = asyncio.Event()

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        step.set()
        await go.wait()
        cancel_point(past_way_back=False)

    job, _ = await jobs.start("op", 0, body)
    await step.wait()
    jobs.cancel(job.id)
    go.set()
    await jobs.wait(job.id, 5)
    assert job.state is JobState.CANCELLED and job.error_name == "Cancelled"
    with pytest.raises(errors.InvalidArgument):
        jobs.cancel(job.id)  # it has ended

    go.clear()

    async def past(accept: Callable[[Any], None]) -> None:
        accept(None)
        cancel_point(past_way_back=True)
        await go.wait()

    job, _ = await jobs.start("op", 0, past)
    await asyncio.sleep(0)
    with pytest.raises(errors.Busy):
        jobs.cancel(job.id)
    go.set()
    await jobs.wait(job.id, 5)
    assert job.state is JobState.COMPLETED


async def test_finished_jobs_are_forgotten_after_their_retention() -> None:
    jobs = Jobs(retention=0.05)

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)

    job, _ = await jobs.start("op", 0, body)
    await jobs.wait(job.id, 5)
    assert jobs.get(job.id) is job
    await asyncio.sleep(0.2)
    with pytest.raises(errors.NotFound):
        jobs.get(job.id)


async def test_cancelling_a_volume_create_undoes_it(tmp_path: Path) -> None:
    pools = open_pools(tmp_path)
    try:
        await pools.create_pool("tank", DISKS[:1])
        before = await state(pools)

        def fault(op: str, step: int) -> None:  # the client's Cancel arrives at step 2
            if op == "volume-create" and step == 2:
                [running] = [j for j in pools.jobs if j.state is JobState.RUNNING]
                pools.jobs.cancel(running.id)

        pools.fault = fault
        job, _ = await pools.as_job("volume-create", ROOT, lambda accept: pools.create_volume(
            "tank", "v", GIB, caller=ROOT, accept=accept))
        await pools.jobs.wait(job.id, 5)
        assert job.state is JobState.CANCELLED
        after = await assert_agree(pools)
        assert after["volumes"] == before["volumes"] == []
        assert sorted(after["thins"].values()) == sorted(before["thins"].values())
    finally:
        pools.devices.close()
        pools.store.close()
