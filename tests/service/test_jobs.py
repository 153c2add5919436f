"""Jobs: accepted requests answered at once, ends kept readable, cancel
honoured only where the work can still be undone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dmd.service import errors
from dmd.service.auth import ROOT
from dmd.service.jobs import Job, JobEvent, Jobs, JobState, cancel_point, work_bytes
from dmd.service.journal import Journal, PoolArgs, PoolStopStep, intent
from tests.service.pools.kit import DISKS, GIB, assert_agree, open_pools, state


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


async def test_work_with_a_size_has_a_rate_and_an_end() -> None:
    jobs = Jobs()
    gate = asyncio.Event()
    work_bytes(10, 100)  # outside any job: nothing to say it to

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        work_bytes(0, 1000)
        await asyncio.sleep(0.2)
        work_bytes(400, 1000)
        await gate.wait()

    job, _ = await jobs.start("op", 0, body)
    await asyncio.sleep(0.3)
    assert (job.size_bytes, job.done_bytes) == (1000, 400)
    assert 0 < job.rate() <= 2000  # 400 bytes in 0.2 s or more
    end = job.expected_end()
    assert time.time() < end < time.time() + 600 / job.rate() + 1
    gate.set()
    assert await jobs.wait(job.id, 5)
    assert job.rate() == 0 and job.expected_end() == 0


async def test_a_refusal_before_accepting_is_an_error_and_no_job() -> None:
    jobs = Jobs()

    async def body(accept: Callable[[Any], None]) -> None:
        raise errors.InvalidArgument("no")

    with pytest.raises(errors.InvalidArgument):
        await jobs.start("op", 0, body)
    assert list(jobs) == []


async def test_a_uid_has_so_many_jobs_running_and_kept() -> None:
    """A service's jobs, waiting or running, are bounded (each may wait on a
    pool's lock); root's are not; finished ones beyond a uid's share are
    forgotten early, oldest first."""
    from dmd.service.jobs import MAX_KEPT_PER_UID, MAX_RUNNING_PER_UID

    jobs = Jobs()
    gate = asyncio.Event()

    async def waits(accept: Callable[[Any], None]) -> None:
        await gate.wait()  # not yet accepted: queued behind a pool's lock
        accept(None)

    starts = [asyncio.create_task(jobs.start("op", 1000, waits))
              for _ in range(MAX_RUNNING_PER_UID)]
    await asyncio.sleep(0)
    with pytest.raises(errors.LimitExceeded, match="uid 1000"):
        await jobs.start("op", 1000, waits)
    other = asyncio.create_task(jobs.start("op", 1001, waits))
    roots = [asyncio.create_task(jobs.start("op", 0, waits)) for _ in range(20)]
    gate.set()
    done = [job for job, _ in await asyncio.gather(*starts, other, *roots)]
    for job in done:
        await jobs.wait(job.id, 5)

    async def quick(accept: Callable[[Any], None]) -> None:
        accept(None)

    for _ in range(MAX_KEPT_PER_UID):
        job, _ = await jobs.start("op", 1000, quick)
        await jobs.wait(job.id, 5)
    await asyncio.sleep(0)
    mine = [j.id for j in jobs if j.started_by == 1000]
    assert len(mine) == MAX_KEPT_PER_UID and min(mine) > max(j.id for j in done)
    assert sum(1 for j in jobs if j.started_by == 0) == 20


async def test_calls_in_flight_are_bounded_per_uid() -> None:
    from dmd.service.limits import CallLimits

    limits = CallLimits(per_uid=2, per_connection=2)
    with limits.hold(1000), limits.hold(1000):
        with pytest.raises(errors.LimitExceeded), limits.hold(1000):
            pass
        with limits.hold(1001), limits.hold(0), limits.hold(0), limits.hold(0):
            pass
    with limits.hold(1000), limits.hold(1000):
        pass
    # Per connection, before its uid is known.
    assert limits.enter(":1.5") and limits.enter(":1.5")
    assert not limits.enter(":1.5") and limits.enter(":1.6")
    limits.leave(":1.5")
    assert limits.enter(":1.5")
    assert all(limits.enter(":1.7", 0) for _ in range(5))  # root's connection


async def test_failure_after_accepting_is_the_jobs_end() -> None:
    jobs = Jobs()

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        raise errors.Busy("the pool is busy")

    job, _ = await jobs.start("op", 0, body)
    await jobs.wait(job.id, 5)
    assert job.state is JobState.FAILED and job.error_name == "Busy"
    assert job.error_message == "the pool is busy"


async def cancelled_while_working(jobs: Jobs, *steps: bool) -> Job:
    """A job cancelled while it works between two steps, which then takes
    *steps* (each ``cancel_point(past_way_back=step)``); the job, ended."""
    working, go = asyncio.Event(), asyncio.Event()

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        working.set()
        await go.wait()
        for past_way_back in steps:
            cancel_point(past_way_back=past_way_back)

    job, _ = await jobs.start("op", 0, body)
    await working.wait()
    jobs.cancel(job.id)
    go.set()
    await jobs.wait(job.id, 5)
    return job


async def test_cancel_at_a_step_that_can_be_undone_and_not_after() -> None:
    jobs = Jobs()
    job = await cancelled_while_working(jobs, False)
    assert job.state is JobState.CANCELLED and job.error_name == "Cancelled"
    with pytest.raises(errors.InvalidArgument):
        jobs.cancel(job.id)  # it has ended

    go = asyncio.Event()

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


async def test_a_cancel_not_honoured_before_the_way_back_is_dropped_there() -> None:
    """Asked while the job worked between two steps, then the job crossed
    its point of no return: it rolls forward and completes; a later step
    (a nested operation's) does not raise the old cancel."""
    job = await cancelled_while_working(Jobs(), True, False)
    assert job.state is JobState.COMPLETED, job.error_message


async def test_at_a_stop_the_grace_then_a_cancel_for_running_and_later_jobs() -> None:
    """stop_after(grace): a job that ends within it completes; one still
    running after it is cancelled at its next step, and a job started after
    it (a call that waited for a pool) at its first."""
    jobs = Jobs()
    quick_go, slow_go = asyncio.Event(), asyncio.Event()

    def body(go: asyncio.Event, then_step: bool) -> Any:
        async def run(accept: Callable[[Any], None]) -> None:
            accept(None)
            await go.wait()
            if then_step:
                cancel_point(past_way_back=False)
        return run

    quick, _ = await jobs.start("quick", 0, body(quick_go, True))
    slow, _ = await jobs.start("slow", 0, body(slow_go, True))
    jobs.stop_after(0.2)
    quick_go.set()
    await jobs.wait(quick.id, 5)
    assert quick.state is JobState.COMPLETED
    await asyncio.sleep(0.3)

    async def late(accept: Callable[[Any], None]) -> None:
        cancel_point(past_way_back=False)  # its first step, before it accepts
        accept(None)

    with pytest.raises(errors.ServiceError, match="dmd is stopping"):
        await jobs.start("late", 0, late)
    slow_go.set()
    await jobs.drain()
    assert slow.state is JobState.CANCELLED
    assert slow.error_message == "slow: cancelled: dmd is stopping"


class MemoryIntents:
    """An IntentStore in memory: each intent's end state."""

    def __init__(self) -> None:
        self.states: dict[int, str] = {}

    async def begin_intent(self, operation: str, device: str, args: dict[str, Any]) -> int:
        self.states[len(self.states) + 1] = "pending"
        return len(self.states)

    async def advance_intent(self, intent_id: int, step: int) -> None:
        pass

    def advance_intent_soon(self, intent_id: int, step: int) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def finish_intent(self, intent_id: int, state: str) -> None:
        self.states[intent_id] = state


async def test_an_undo_runs_to_its_end_whatever_cancel_comes() -> None:
    """Once the body failed, its undo is not cancellable: a Cancel (or a
    stop's) asked meanwhile would have stopped it at its first nested step,
    half undone, its intent left for the next start."""
    jobs, store = Jobs(), MemoryIntents()
    undoing, go = asyncio.Event(), asyncio.Event()

    async def rollback(_: Journal) -> None:
        undoing.set()
        await go.wait()
        async with intent(store, None, "inner", "d", PoolArgs(pool="tank")) as inner:
            await inner.mark(PoolStopStep.DEVICES)  # a nested device removal's step

    async def body(accept: Callable[[Any], None]) -> None:
        accept(None)
        async with intent(store, None, "outer", "d", PoolArgs(pool="tank"), rollback):
            raise errors.Failed("mkfs.ext4 exited with status 1")

    job, _ = await jobs.start("op", 0, body)
    await undoing.wait()
    with pytest.raises(errors.Busy):
        jobs.cancel(job.id)
    go.set()
    await jobs.wait(job.id, 5)
    assert (job.state, job.error_name) == (JobState.FAILED, "Failed"), job.error_message
    assert store.states == {1: "rolled_back", 2: "done"}


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
