"""containerd.services.snapshots.v1.Snapshots over gRPC: messages in, the
snapshotter's calls, messages or a status code out. No rules live here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from dmd.snapshotter import snapshots_pb2 as pb
from dmd.snapshotter.catalog import Kind, Snapshot
from dmd.snapshotter.service import Code, Mount, SnapshotError, Snapshotter

log = logging.getLogger("dmd.snapshotter")

SERVICE = "containerd.services.snapshots.v1.Snapshots"
NAMESPACE_HEADER = "containerd-namespace"
LIST_BATCH = 100  # Info messages per List reply (containerd's own server sends 100)

STATUS = {Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
          Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
          Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
          Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
          Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
          Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
          Code.UNKNOWN: grpc.StatusCode.UNKNOWN}
# grpc.aio.ServicerContext: grpcio ships no types
Context = Any
_KINDS = {Kind.VIEW: pb.VIEW, Kind.ACTIVE: pb.ACTIVE, Kind.COMMITTED: pb.COMMITTED}


def namespace_of(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER:
            return value if isinstance(value, str) else value.decode()
    return ""


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info(snapshot: Snapshot) -> pb.Info:
    return pb.Info(name=snapshot.name, parent=snapshot.parent, kind=_KINDS[snapshot.kind],
                   created_at=_timestamp(snapshot.created_ns),
                   updated_at=_timestamp(snapshot.updated_ns), labels=dict(snapshot.labels))


def mounts(found: list[Mount]) -> list[pb.Mount]:
    return [pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in found]




class Servicer:
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.s = snapshotter

    async def Prepare(self, request: pb.PrepareSnapshotRequest,
                      context: Context) -> pb.PrepareSnapshotResponse:
        found = await self.s.prepare(namespace_of(context), request.key, request.parent,
                                     dict(request.labels), Kind.ACTIVE)
        return pb.PrepareSnapshotResponse(mounts=mounts(found))

    async def View(self, request: pb.ViewSnapshotRequest,
                   context: Context) -> pb.ViewSnapshotResponse:
        found = await self.s.prepare(namespace_of(context), request.key, request.parent,
                                     dict(request.labels), Kind.VIEW)
        return pb.ViewSnapshotResponse(mounts=mounts(found))

    async def Mounts(self, request: pb.MountsRequest,
                     context: Context) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=mounts(
            await self.s.mounts(namespace_of(context), request.key)))

    async def Commit(self, request: pb.CommitSnapshotRequest,
                     context: Context) -> empty_pb2.Empty:
        await self.s.commit(namespace_of(context), request.name, request.key,
                            dict(request.labels))
        return empty_pb2.Empty()

    async def Remove(self, request: pb.RemoveSnapshotRequest,
                     context: Context) -> empty_pb2.Empty:
        await self.s.remove(namespace_of(context), request.key)
        return empty_pb2.Empty()

    async def Stat(self, request: pb.StatSnapshotRequest,
                   context: Context) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(
            info=info(await self.s.stat(namespace_of(context), request.key)))

    async def Update(self, request: pb.UpdateSnapshotRequest,
                     context: Context) -> pb.UpdateSnapshotResponse:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = await self.s.update(namespace_of(context), request.info.name,
                                      dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=info(updated))

    async def List(self, request: pb.ListSnapshotsRequest,
                   context: Context) -> AsyncIterator[pb.ListSnapshotsResponse]:
        found = await self.s.walk(namespace_of(context), list(request.filters))
        for start in range(0, len(found), LIST_BATCH):
            yield pb.ListSnapshotsResponse(
                info=[info(s) for s in found[start:start + LIST_BATCH]])

    async def Usage(self, request: pb.UsageRequest,
                    context: Context) -> pb.UsageResponse:
        size, inodes = await self.s.usage(namespace_of(context), request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    async def Cleanup(self, request: pb.CleanupRequest,
                      context: Context) -> empty_pb2.Empty:
        # Nothing is ever left to clean: every change is one journaled dmd call.
        return empty_pb2.Empty()


def _unary(method: Callable[[Any, Context], Awaitable[Any]]
           ) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handler(request: Any, context: Context) -> Any:
        try:
            return await method(request, context)
        except SnapshotError as exc:
            log.info("%s: %s", method.__name__, exc)
            await context.abort(STATUS[exc.code], str(exc))
    return handler


def _stream(method: Callable[[Any, Context], AsyncIterator[Any]]
            ) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handler(request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for reply in method(request, context):
                yield reply
        except SnapshotError as exc:
            log.info("%s: %s", method.__name__, exc)
            await context.abort(STATUS[exc.code], str(exc))
    return handler


def handlers(servicer: Servicer) -> grpc.GenericRpcHandler:
    unary: dict[str, tuple[Any, Any]] = {
             "Prepare": (pb.PrepareSnapshotRequest, pb.PrepareSnapshotResponse),
             "View": (pb.ViewSnapshotRequest, pb.ViewSnapshotResponse),
             "Mounts": (pb.MountsRequest, pb.MountsResponse),
             "Commit": (pb.CommitSnapshotRequest, empty_pb2.Empty),
             "Remove": (pb.RemoveSnapshotRequest, empty_pb2.Empty),
             "Stat": (pb.StatSnapshotRequest, pb.StatSnapshotResponse),
             "Update": (pb.UpdateSnapshotRequest, pb.UpdateSnapshotResponse),
             "Usage": (pb.UsageRequest, pb.UsageResponse),
             "Cleanup": (pb.CleanupRequest, empty_pb2.Empty)}
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name)), request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString)
        for name, (request, reply) in unary.items()}
    methods["List"] = grpc.unary_stream_rpc_method_handler(
        _stream(servicer.List), request_deserializer=pb.ListSnapshotsRequest.FromString,
        response_serializer=pb.ListSnapshotsResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)
