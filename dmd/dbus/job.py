"""The Job object (org.example.DeviceMapper.Job): work that outlives its
call. Its declaration, its properties (the one list of them, made from the
job) and its methods' handlers."""

# No "from __future__ import annotations": dbus-fast reads the annotations.
from typing import Annotated, Any

from dbus_fast.annotations import DBusSignature
from dbus_fast.service import dbus_method, dbus_signal

from dmd.dbus.convert import options_in
from dmd.dbus.declare import Bool, CachedObject, Options, Str, Timeout, cached_properties, routed
from dmd.dbus.names import JOB_INTERFACE
from dmd.service import errors
from dmd.service.auth import Caller
from dmd.service.jobs import Job
from dmd.service.pools.service import PoolService

JOB_PROPERTIES: dict[str, str] = {
    "Operation": "s", "Objects": "ao", "StartedBy": "u", "StartTime": "t", "Progress": "d",
    "State": "s", "ErrorName": "s", "ErrorMessage": "s", "Result": "o", "Cancellable": "b",
    "Bytes": "t", "Rate": "t", "ExpectedEndTime": "t",
}


def job_properties(job: Job, objects: list[str], result: str) -> dict[str, Any]:
    return {
        "Operation": job.operation, "Objects": objects, "StartedBy": job.started_by,
        "StartTime": int(job.started_at * 1_000_000), "Progress": float(job.progress),
        "State": job.state.value, "ErrorName": job.error_name,
        "ErrorMessage": job.error_message, "Result": result,
        "Cancellable": job.cancellable and job.state.value == "running",
        # Where the work has a size; 0 where it has none, or is not known yet.
        "Bytes": job.size_bytes, "Rate": job.rate(),
        "ExpectedEndTime": int(job.expected_end() * 1_000_000),
    }


@cached_properties
class JobInterface(CachedObject):
    """Work that outlives its call: its end is the Completed signal and the
    State property (a finished job stays readable for a while)."""

    INTERFACE = JOB_INTERFACE
    PROPERTIES = JOB_PROPERTIES

    @dbus_method()
    def Cancel(self, options: Options) -> None:
        routed()

    @dbus_method()
    def Wait(self, timeout: Timeout) -> Bool:
        routed()

    @dbus_signal()
    def Completed(self, success: Bool, error_name: Str, error_message: Str
                  ) -> Annotated[list[Any], DBusSignature("bss")]:
        return [success, error_name, error_message]


class JobHandlers:
    def __init__(self, pools: PoolService) -> None:
        self.pools = pools

    async def Cancel(self, caller: Caller, job_id: int, options: dict[str, Any]) -> None:
        options_in("Cancel", options)
        job = self.pools.jobs.get(job_id)
        if caller.uid not in (0, job.started_by):
            raise errors.NotAuthorized(f"job {job_id} was started by uid {job.started_by}")
        self.pools.jobs.cancel(job_id)

    async def Wait(self, caller: Caller, job_id: int, timeout: float) -> bool:
        if not isinstance(timeout, float) or not 0 <= timeout <= 3600:
            raise errors.InvalidArgument("timeout is 0 to 3600 seconds")
        return await self.pools.jobs.wait(job_id, timeout)
