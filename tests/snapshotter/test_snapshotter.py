"""containerd's snapshot calls against dmd (simulated kernel, real bus)."""

from __future__ import annotations

import shutil
from typing import Any

import grpc
import pytest

from dmd.dbus.names import (
    DEVICE_INTERFACE,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
)
from dmd.engine.sim import SimDM
from dmd.snapshotter import snapshots_pb2 as pb
from tests.snapshotter.conftest import POOL, Rig

ACTIVE, VIEW, COMMITTED = pb.ACTIVE, pb.VIEW, pb.COMMITTED


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code()


async def test_a_layer_is_prepared_committed_and_built_on(rig: Rig) -> None:
    api = rig.api
    (mount,) = await api.prepare("extract-1", **{"containerd.io/gc.root": "x"})
    volumes = await rig.volumes()
    (name,) = [n for n in volumes if n != "containerd.base"]
    assert mount.type == "ext4" and list(mount.options) == []
    # The kernel's own node (devtmpfs makes it with the device): the
    # snapshotter does not wait for udev's /dev/mapper link.
    (minor,) = await rig.client.call(volumes[name]["Device"], PROPERTIES_INTERFACE, "Get",
                                     "ss", [DEVICE_INTERFACE, "Minor"])
    assert mount.source == f"/dev/dm-{minor.value}"
    assert volumes[name]["DevicePath"] == f"/dev/mapper/{POOL}-{name}"
    # The base is made once, and stays inactive: snapshots of it need no suspend.
    assert volumes["containerd.base"]["State"] == "inactive"
    info = await api.stat("extract-1")
    assert (info.name, info.parent, info.kind) == ("extract-1", "", ACTIVE)
    assert dict(info.labels) == {"containerd.io/gc.root": "x"}
    assert info.created_at == info.updated_at

    await api.commit("sha256:layer1", "extract-1", l="1")
    assert await code_of(api.stat("extract-1")) is grpc.StatusCode.NOT_FOUND
    info = await api.stat("sha256:layer1")
    assert (info.name, info.parent, info.kind, dict(info.labels)) == (
        "sha256:layer1", "", COMMITTED, {"l": "1"})
    # The committed layer is the same volume: nothing was copied. Its device
    # is gone: nothing mounts a committed layer.
    assert set(await rig.volumes()) == set(volumes)
    assert (await rig.volumes())[name]["State"] == "inactive"

    (child,) = await api.prepare("container-1", "sha256:layer1")
    (view,) = await api.view("view-1", "sha256:layer1")
    assert list(view.options) == ["ro", "noload"] and list(child.options) == []
    assert {(i.name, i.parent, i.kind) for i in await api.walk()} == {
        ("sha256:layer1", "", COMMITTED), ("container-1", "sha256:layer1", ACTIVE),
        ("view-1", "sha256:layer1", VIEW)}
    mounts = await api("Mounts", pb.MountsRequest(key="view-1"))
    assert list(mounts.mounts) == [view]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.remove("sha256:layer1")
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "remove" in (caught.value.details() or "")
    for key in ("container-1", "view-1", "sha256:layer1"):
        await api.remove(key)
    assert set(await rig.volumes()) == {"containerd.base"}
    assert await api.walk() == []


async def test_walk_filters_as_containerd_writes_them(rig: Rig) -> None:
    api = rig.api
    await api.prepare("p-tmp", **{"containerd.io/gc.root": "w"})
    await api.commit("p", "p-tmp", **{"containerd.io/gc.root": "w"})
    await api.prepare("a", "p", l="2")
    await api.view("v", "p", **{"containerd.io/gc.root": "w", "l": "3"})
    await api.prepare("a-np", **{"containerd.io/gc.root": "w"})
    cases = {
        ('labels."containerd.io/gc.root"==w',): {"p", "v", "a-np"},
        ("kind==active",): {"a", "a-np"},
        ("kind==view,labels.l",): {"v"},
        ("name==p", "name==a"): {"p", "a"},
        ("parent==p",): {"a", "v"},
        ('parent!=""',): {"a", "v"},
        ("labels.l==2",): {"a"},
        ("name~=/^a/",): {"a", "a-np"},
        ("labels.l", 'labels."containerd.io/gc.root"'): {"a", "v", "p", "a-np"},
        (): {"p", "a", "v", "a-np"},
    }
    for filters, names in cases.items():
        assert {i.name for i in await api.walk(*filters)} == names, filters
    assert await code_of(api.walk("name==")) is grpc.StatusCode.INVALID_ARGUMENT


async def test_update_changes_labels_only(rig: Rig) -> None:
    api = rig.api
    await api.prepare("a", k1="v1", k2="v2")
    before = await api.stat("a")
    info = pb.Info(name="a", parent="elsewhere", labels={"k1": "new", "k3": "v3"})
    reply = await api("Update", pb.UpdateSnapshotRequest(
        info=info, update_mask={"paths": ["labels.k1", "labels.k2"]}))
    assert dict(reply.info.labels) == {"k1": "new"}
    assert reply.info.parent == "" and reply.info.created_at == before.created_at
    assert reply.info.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
    reply = await api("Update", pb.UpdateSnapshotRequest(info=info))
    assert dict(reply.info.labels) == {"k1": "new", "k3": "v3"}
    assert dict((await api.stat("a")).labels) == {"k1": "new", "k3": "v3"}
    for path in ("parent", "kind", "name"):
        request = pb.UpdateSnapshotRequest(info=info, update_mask={"paths": [path]})
        assert await code_of(api("Update", request)) is grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_requests_get_containerd_codes_and_change_nothing(rig: Rig) -> None:
    api = rig.api
    await api.prepare("active")
    await api.prepare("base-tmp")
    await api.commit("committed", "base-tmp")
    before = await rig.volumes()
    codes = [
        (api.stat("nope"), grpc.StatusCode.NOT_FOUND),
        (api.remove("nope"), grpc.StatusCode.NOT_FOUND),
        (api.prepare("x", "nope"), grpc.StatusCode.NOT_FOUND),
        (api.commit("c2", "nope"), grpc.StatusCode.NOT_FOUND),
        (api.prepare("x", "active"), grpc.StatusCode.INVALID_ARGUMENT),
        (api.prepare("active"), grpc.StatusCode.ALREADY_EXISTS),
        (api.view("committed", "committed"), grpc.StatusCode.ALREADY_EXISTS),
        (api.commit("committed", "active"), grpc.StatusCode.ALREADY_EXISTS),
        (api.commit("c3", "committed"), grpc.StatusCode.FAILED_PRECONDITION),
        (api("Mounts", pb.MountsRequest(key="committed")), grpc.StatusCode.FAILED_PRECONDITION),
        (api.prepare("huge", big="x" * 4000), grpc.StatusCode.INVALID_ARGUMENT),
        (api.prepare("many", **{f"l{i}": "v" for i in range(80)}),
         grpc.StatusCode.INVALID_ARGUMENT),
        (api.prepare("ctl", bad="a\nb"), grpc.StatusCode.INVALID_ARGUMENT),
        (api.prepare(""), grpc.StatusCode.INVALID_ARGUMENT),
        (api.using("bad namespace").prepare("x"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in codes:
        assert await code_of(call) is code
    after = await rig.volumes()
    assert after.keys() == before.keys()
    assert all(after[n]["Labels"] == before[n]["Labels"] for n in after)
    assert {i.name for i in await api.walk()} == {"active", "committed"}


async def test_namespaces_hold_their_own_keys(rig: Rig) -> None:
    one, two = rig.api.using("one"), rig.api.using("two")
    await one.prepare("k", mine="one")
    await two.prepare("k", mine="two")
    assert [dict(i.labels) for i in await one.walk()] == [{"mine": "one"}]
    assert dict((await two.stat("k")).labels) == {"mine": "two"}
    await one.remove("k")
    assert await code_of(one.stat("k")) is grpc.StatusCode.NOT_FOUND
    assert (await two.stat("k")).name == "k"
    # Without a namespace (containerd's garbage collector): every namespace.
    unscoped = rig.api.using(None)
    await one.prepare("only-one")
    assert {i.name for i in await unscoped.walk()} == {"k", "only-one"}
    await one.prepare("k")
    assert await code_of(unscoped.remove("k")) is grpc.StatusCode.FAILED_PRECONDITION
    await unscoped.remove("only-one")
    assert {i.name for i in await one.walk()} == {"k"}
    # containerd 1.6 sends no namespace at all: its snapshots live in "", and a
    # name any namespace holds is taken there.
    assert await code_of(unscoped.prepare("k")) is grpc.StatusCode.ALREADY_EXISTS
    await unscoped.prepare("gc-visible-tmp")
    await unscoped.commit("gc-visible", "gc-visible-tmp")
    assert {i.name for i in await one.walk()} == {"k"}
    assert {i.name for i in await unscoped.walk()} == {"k", "gc-visible"}
    await unscoped.prepare("child", "gc-visible")
    assert (await unscoped.stat("child")).parent == "gc-visible"


async def test_a_restarted_snapshotter_knows_everything_from_dmd(rig: Rig) -> None:
    api = rig.api
    await api.prepare("tmp", gc="1")
    await api.commit("layer", "tmp", gc="2")
    await api.prepare("rw", "layer")
    before = {i.name: i for i in await api.walk()}
    await rig.restart()
    assert {i.name: i for i in await api.walk()} == before
    await api.prepare("rw2", "layer")
    await api.remove("rw")
    assert {i.name for i in await api.walk()} == {"layer", "rw2"}


async def test_snapshots_survive_a_lost_state_directory(rig: Rig, dmd_session: Any) -> None:
    """Everything a snapshot is lives in the pool's description on its disk:
    dmd's state directory deleted and every device gone (a reboot), the pool
    brought back by ImportPool, a new snapshotter lists the same snapshots."""
    api = rig.api
    await api.prepare("tmp", **{"containerd.io/gc.root": "x"})
    await api.commit("layer", "tmp", l="1")
    await api.prepare("rw", "layer")
    await api.view("ro", "layer")
    before = {i.name: i for i in await api.walk()}
    assert dmd_session.stop() == 0
    shutil.rmtree(dmd_session.state_dir)
    sim = SimDM(dmd_session.sim)
    sim.remove_all()
    assert sim.list_devices() == []
    dmd_session.start()
    (_, job) = await rig.client.call(ROOT_PATH, MANAGER_INTERFACE, "ImportPool", "asa{sv}",
                                     [["/dev/simdisk1"], {}])
    assert (await rig.client.call(job, JOB_INTERFACE, "Wait", "d", [30.0]))[0]
    await rig.restart()
    assert {i.name: i for i in await api.walk()} == before
    await api.prepare("rw2", "layer")
    await api.remove("ro")
    assert {i.name for i in await api.walk()} == {"layer", "rw", "rw2"}


async def test_remove_of_a_mounted_snapshot_is_a_failed_precondition(rig: Rig,
                                                                     dmd_session: Any) -> None:
    """dmd's Delete fails (Busy) while the device is open: containerd hears
    FailedPrecondition and the snapshot stays; closed, it goes."""
    api = rig.api
    await api.prepare("busy")
    (name,) = [n for n in await rig.volumes() if n != "containerd.base"]
    sim = SimDM(dmd_session.sim)
    sim.open_device(f"{POOL}-{name}")  # mounted, say
    assert await code_of(api.remove("busy")) is grpc.StatusCode.FAILED_PRECONDITION
    assert (await api.stat("busy")).name == "busy"
    sim.open_device(f"{POOL}-{name}", -1)
    await api.remove("busy")
    assert await code_of(api.stat("busy")) is grpc.StatusCode.NOT_FOUND


async def test_mounts_and_usage_after_labels_change(rig: Rig) -> None:
    """A label change (PropertiesChanged of Labels alone) keeps what the
    snapshotter knows of the volume's device; a committed layer's Usage is
    what its volume held when committed (its device is gone since)."""
    api = rig.api
    (before,) = await api.prepare("a")
    await api("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="a", labels={"x": "1"})))
    (after,) = list((await api("Mounts", pb.MountsRequest(key="a"))).mounts)
    assert after == before and after.source.startswith("/dev/dm-")
    await api.commit("layer", "a")
    (name,) = [n for n in await rig.volumes() if n != "containerd.base"]
    labels = (await rig.volumes())[name]["Labels"]
    usage = await api("Usage", pb.UsageRequest(key="layer"))
    assert str(usage.size) == labels["containerd/usage"] and usage.inodes == 0
