"""Long work as Jobs: a caller is answered as soon as its request is accepted
(validated, and its intent durable), and learns the end from the Job.

A job's body runs as its own task and calls ``accept(value)`` once nothing
can refuse the request any more; ``Jobs.start`` returns then, with the job
and that value. A body that fails before accepting raises to the caller as
a plain error and leaves no job behind: bad input is an error reply, never a
job that fails a moment later.

Cancel is cooperative: it is honoured at the body's next journal step (see
``cancel_point``), where the intent's rollback undoes what was done, and
refused once the operation is past its way back. A finished job stays
readable for ``retention`` seconds, so a client that looks late still
learns how it ended.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from dmd.service import errors

log = logging.getLogger(__name__)

RETENTION_SECONDS = 600.0
# What one uid other than root may have: jobs running (each waits on a pool
# lock, and may hold it), and finished jobs kept on the bus (each an object):
# past this, its oldest finished job is forgotten early.
MAX_RUNNING_PER_UID = 16
MAX_KEPT_PER_UID = 64


class JobState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Cancelled(errors.ServiceError):
    name = "Cancelled"


@dataclass
class Job:
    id: int
    operation: str
    started_by: int
    started_at: float  # time.time()
    state: JobState = JobState.RUNNING
    progress: float = 0.0
    error_name: str = ""
    error_message: str = ""
    subject: Any = None  # what it works on (the record it accepted with)
    result: Any = None
    cancellable: bool = True
    finished_at: float | None = None
    # Work with a size (a filesystem made on a volume, a cache's dirty blocks
    # written back, room zeroed): its bytes, how many are done, and when
    # (time.monotonic()) it began; see work_bytes.
    size_bytes: int = 0
    done_bytes: int = 0
    sized_since: float | None = None
    _cancel_requested: bool = field(default=False, repr=False)
    _cancel_reason: str = field(default="cancelled", repr=False)
    _jobs: Jobs | None = field(default=None, repr=False)


    def rate(self, now: float | None = None) -> int:
        """Bytes a second of its sized work so far (0: none, or not yet)."""
        if self.sized_since is None or self.state is not JobState.RUNNING:
            return 0
        elapsed = (time.monotonic() if now is None else now) - self.sized_since
        return int(self.done_bytes / elapsed) if elapsed > 0 else 0

    def expected_end(self) -> float:
        """When its sized work should be done, at its rate so far
        (time.time(); 0: not known)."""
        rate = self.rate()
        if rate <= 0:
            return 0.0
        return time.time() + (self.size_bytes - self.done_bytes) / rate


class JobEvent(enum.Enum):
    ADDED = "added"  # accepted: the job is there to be read
    PROGRESS = "progress"
    FINISHED = "finished"
    FORGOTTEN = "forgotten"  # its retention ended


JobListener = Callable[[Job, JobEvent], None]

_current: contextvars.ContextVar[Job | None] = contextvars.ContextVar("dmd_job", default=None)


def cancel_point(past_way_back: bool) -> None:
    """Called at every journal step of the running job (if any): raise
    Cancelled if a cancel was asked for and the step can still be undone."""
    job = _current.get()
    if job is None:
        return
    if past_way_back:
        # Too late for a cancel asked before this step and not yet honoured:
        # the operation rolls forward now, and ends as done.
        job.cancellable = False
        job._cancel_requested = False
    elif job._cancel_requested and job.cancellable:
        # Once: the undo that follows has steps of its own (a nested
        # device removal's journal), and a second Cancelled there would
        # leave the operation half undone, its intent for recovery.
        job._cancel_requested = False
        job.cancellable = False
        raise Cancelled(f"{job.operation}: {job._cancel_reason}")


def progress(fraction: float) -> None:
    """The running job (if any) is *fraction* done."""
    job = _current.get()
    if job is not None and fraction > job.progress and job.state is JobState.RUNNING:
        job.progress = min(fraction, 0.99)  # 1.0 is for the end
        if job._jobs is not None and job.id in job._jobs._jobs:
            job._jobs._tell(job, JobEvent.PROGRESS)


def work_bytes(done: int, total: int) -> None:
    """The running job (if any) has done *done* of the *total* bytes of
    its sized work: its Bytes, Rate and ExpectedEndTime (as udisks' jobs show
    them) follow, published with its next progress. Work of another size
    begins the count again."""
    job = _current.get()
    if job is None or job.state is not JobState.RUNNING:
        return
    if job.sized_since is None or job.size_bytes != total:
        job.size_bytes, job.sized_since = total, time.monotonic()
    job.done_bytes = min(max(done, 0), total)


class Jobs:
    def __init__(self, retention: float = RETENTION_SECONDS) -> None:
        self.retention = retention
        self._jobs: dict[int, Job] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._live: dict[int, Job] = {}  # every running job, accepted or not yet
        self._stopping = False  # dmd is stopping and the grace is over
        self._listeners: list[JobListener] = []
        self._next = 1

    def subscribe(self, listener: JobListener) -> None:
        self._listeners.append(listener)

    def get(self, job_id: int) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise errors.NotFound(f"no job {job_id} (finished jobs are kept "
                                  f"{self.retention:.0f} s)")
        return job

    def __iter__(self) -> Any:
        return iter(list(self._jobs.values()))

    async def start(self, operation: str, started_by: int,
                    body: Callable[[Callable[[Any], None]], Awaitable[Any]]) -> tuple[Job, Any]:
        """Run *body(accept)* as a job; return (job, accepted value) once it
        accepts. If it fails first, its error is raised here."""
        if started_by != 0 and sum(
                1 for j in self._live.values()
                if j.started_by == started_by) >= MAX_RUNNING_PER_UID:
            raise errors.LimitExceeded(f"uid {started_by} has {MAX_RUNNING_PER_UID} jobs "
                                       "running; wait for one to end")
        job = Job(self._next, operation, started_by, time.time(), _jobs=self)
        self._next += 1
        self._live[job.id] = job
        if self._stopping:
            self._cancel_for_stop(job)
        accepted: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def accept(value: Any) -> None:
            if not accepted.done():
                job.subject = value
                self._jobs[job.id] = job
                self._tell(job, JobEvent.ADDED)
                accepted.set_result(value)

        async def run() -> None:
            _current.set(job)
            try:
                job.result = await body(accept)
                job.state = JobState.COMPLETED
                job.progress = 1.0
            except Exception as exc:
                if not accepted.done():
                    accepted.set_exception(exc)
                    return
                job.state = JobState.CANCELLED if isinstance(exc, Cancelled) else JobState.FAILED
                if isinstance(exc, errors.ServiceError):
                    job.error_name, job.error_message = exc.name, str(exc)
                else:
                    log.exception("job %d (%s) failed", job.id, operation)
                    job.error_name, job.error_message = "Failed", f"{operation}: internal error"
            finally:
                self._tasks.pop(job.id, None)
                self._live.pop(job.id, None)
            if not accepted.done():  # finished without accepting: accepted at its end
                accept(job.result)
            job.finished_at = time.time()
            job.cancellable = False
            self._tell(job, JobEvent.FINISHED)
            asyncio.get_running_loop().call_later(self.retention, self._forget, job.id)
            if job.started_by != 0:
                kept = [j.id for j in self._jobs.values()
                        if j.started_by == job.started_by and j.finished_at is not None]
                for old in sorted(kept)[:-MAX_KEPT_PER_UID]:
                    self._forget(old)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks[job.id] = task
        return job, await accepted

    def cancel(self, job_id: int) -> None:
        job = self.get(job_id)
        if job.state is not JobState.RUNNING:
            raise errors.InvalidArgument(f"job {job_id} has ended ({job.state.value})")
        if not job.cancellable:
            raise errors.Busy(f"job {job_id} ({job.operation}) is past the point where it "
                              "could be undone")
        job._cancel_requested = True

    async def wait(self, job_id: int, timeout: float) -> bool:
        """True once the job has ended; False if *timeout* passed first."""
        job = self.get(job_id)
        task = self._tasks.get(job_id)
        if job.state is JobState.RUNNING and task is not None:
            done, _ = await asyncio.wait({task}, timeout=timeout)
            return bool(done)
        return True

    def stop_after(self, grace: float) -> None:
        """dmd is stopping: *grace* seconds from now, every running job that
        can still be undone is cancelled (as Cancel would), and so is each
        started after then, at its first step (a call that waited for a pool
        a hung job held). A mkfs of a large volume or a long write-back must
        not hold a stop past systemd's patience, whose SIGKILL would leave
        the undo to the next start. Honoured at each job's next step."""
        asyncio.get_running_loop().call_later(grace, self._stop_now)

    def _stop_now(self) -> None:
        self._stopping = True
        for job in list(self._live.values()):
            self._cancel_for_stop(job)

    @staticmethod
    def _cancel_for_stop(job: Job) -> None:
        if job.state is JobState.RUNNING and job.cancellable and not job._cancel_requested:
            what = " ".join(filter(None, (job.operation, getattr(job.subject, "name", ""))))
            log.info("job %d (%s): to be cancelled, dmd is stopping", job.id, what)
            job._cancel_reason = "cancelled: dmd is stopping"
            job._cancel_requested = True

    async def drain(self) -> None:
        """Wait for every running job (at shutdown: see stop_after)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    def _tell(self, job: Job, event: JobEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(job, event)
            except Exception:
                log.exception("job listener failed on job %d", job.id)

    def _forget(self, job_id: int) -> None:
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self._tell(job, JobEvent.FORGOTTEN)
