"""The committed snapshots_pb2.py is what its .proto says (regenerate with
scripts/gen-snapshotter-proto when this fails)."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from dmd.snapshotter import snapshots_pb2

HERE = Path(snapshots_pb2.__file__).parent


def test_the_generated_module_matches_the_proto(tmp_path: Path) -> None:
    out = tmp_path / "set.pb"
    include = importlib.resources.files("grpc_tools") / "_proto"
    assert protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--descriptor_set_out={out}",
                        "snapshots.proto"]) == 0
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    _drop_json_names(compiled.message_type)  # protoc leaves them out of generated code
    committed = descriptor_pb2.FileDescriptorProto()
    snapshots_pb2.DESCRIPTOR.CopyToProto(committed)
    assert committed == compiled


def _drop_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_the_service_is_containerds() -> None:
    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert service.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in service.methods] == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup"]
