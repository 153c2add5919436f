"""The snapshotter's side of dmd's D-Bus API: one pool's volumes, mirrored.

The mirror follows dmd's ObjectManager and PropertiesChanged signals. dmd
settles a change's objects on the bus before it replies to the call or ends
the change's Job, and a connection receives one sender's messages in order,
so once a call has returned (or its Job's Wait has said done) the mirror
already shows what the call did. It is read again whole (``settled``, before
the next request is answered) when it may have missed something: dmd's name
got a new owner (dmd started again), or a call to dmd was cut off. The whole
read is applied where its reply arrives among the signals (in the message
handler, not when the awaiting code resumes), so a signal dmd sent after it
is never overwritten by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from dmd.dbus.names import (
    BUS_NAME,
    DEVICE_INTERFACE,
    ERROR_PREFIX,
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    POOL_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)
from dmd.snapshotter.catalog import Volume

log = logging.getLogger("dmd.snapshotter")

DBUS = "org.freedesktop.DBus"
NO_REPLY = {"org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner", "org.freedesktop.DBus.Error.Disconnected"}
JOB_SIGNAL_SECONDS = 10.0  # then Job.Wait is asked too: a lost signal never hangs a call
ENDED_KEPT = 256  # Completed signals of jobs nobody waits for yet (the call's reply is
                  # handled after the signals that followed it)


class DmdError(Exception):
    """An error reply from dmd (or from the bus on its way there); *name* is
    dmd's short error name (``NotFound``, ``Busy`` ...) or the bus's full one."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{text} ({name})")
        self.name, self.text = name, text

    @property
    def unreachable(self) -> bool:
        """dmd went away or never answered: whether the call took effect is
        unknown (dmd's journal finishes or undoes it on its next start)."""
        return self.name in NO_REPLY


def _plain(value: Any) -> Any:
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class DmdPool:
    """One pool of dmd, seen through the bus: its volumes (those of
    *owner*, the snapshotter's uid) and the calls that change them."""

    def __init__(self, bus: MessageBus, pool: str, owner: int) -> None:
        self.bus, self.pool, self.owner = bus, pool, owner
        self.volumes: dict[str, Volume] = {}
        self.minors: dict[str, int] = {}  # Device object -> its dm minor
        self.pool_path = ""
        self._dmd = ""  # dmd's unique name: only its signals count
        self._stale = False  # read everything again before the next answer
        self._objects_serial = 0  # of the GetManagedObjects call in flight
        self._reading = asyncio.Lock()
        # jobs' ends from their Completed signals, (success, error name,
        # message), keyed by (dmd's unique name, job path): a dmd started
        # again numbers its jobs from 1 again
        self._waiting: dict[tuple[str, str], asyncio.Future[tuple[bool, str, str]]] = {}
        self._ended: dict[tuple[str, str], tuple[bool, str, str]] = {}
        self._following = False

    # -- calls ------------------------------------------------------------------
    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: list[Any] | None = None, destination: str = BUS_NAME) -> list[Any]:
        return (await self._send(Message(destination=destination, path=path,
                                         interface=interface, member=member,
                                         signature=signature, body=body or [])))[0]

    async def _send(self, message: Message) -> tuple[list[Any], str]:
        """The reply's body, and its sender (dmd's unique name)."""
        reply = await self.bus.call(message)
        assert reply is not None
        if reply.message_type is MessageType.ERROR:
            name = (reply.error_name or "?").removeprefix(ERROR_PREFIX)
            error = DmdError(name, str(reply.body[0]) if reply.body else "")
            if error.unreachable:
                self._stale = True
            raise error
        return [_plain(v) for v in reply.body], reply.sender or ""

    async def job_call(self, path: str, interface: str, member: str, signature: str,
                       body: list[Any]) -> list[Any]:
        """A call that starts a job (its path last in the reply); once the
        job has ended well, the reply. DmdError otherwise."""
        reply, sender = await self._send(Message(destination=BUS_NAME, path=path,
                                                 interface=interface, member=member,
                                                 signature=signature, body=body))
        await self.wait_job(str(reply[-1]), sender)
        return reply

    async def wait_job(self, job: str, dmd: str) -> None:
        """Until *job* of the dmd whose unique name is *dmd* ends, told by
        its Completed signal (no call: a job's Wait and GetAll would be two
        more round trips through the bus); DmdError when it did not
        complete, and at once (unreachable) when that dmd has gone."""
        key = (dmd, job)
        ended = self._ended.pop(key, None)
        if ended is None:
            if dmd != self._dmd:
                raise DmdError("org.freedesktop.DBus.Error.NoReply", "dmd went away")
            future = asyncio.get_running_loop().create_future()
            self._waiting[key] = future
            try:
                while ended is None:
                    try:
                        ended = await asyncio.wait_for(asyncio.shield(future),
                                                       JOB_SIGNAL_SECONDS)
                    except TimeoutError:
                        # Asked of that dmd itself: never another's job of the same path.
                        if (await self.call(job, JOB_INTERFACE, "Wait", "d", [0.0],
                                            destination=dmd))[0]:
                            ended = await self._job_end(job, dmd)
            finally:
                self._waiting.pop(key, None)
        success, name, text = ended
        if not success:
            raise DmdError(name.removeprefix(ERROR_PREFIX) or "Failed", text)

    async def _job_end(self, job: str, dmd: str) -> tuple[bool, str, str]:
        (props,) = await self.call(job, PROPERTIES_INTERFACE, "GetAll", "s", [JOB_INTERFACE],
                                   destination=dmd)
        return (props["State"] == "completed", str(props["ErrorName"] or props["State"]),
                str(props["ErrorMessage"]))

    async def create_volume(self, name: str, size: int, options: Mapping[str, Variant]
                            ) -> str:
        volume, _ = await self.job_call(self.pool_path, POOL_INTERFACE, "CreateVolume",
                                        "sta{sv}", [name, size, dict(options)])
        return str(volume)

    async def snapshot(self, origin: str, name: str, labels: Mapping[str, str]) -> str:
        """The new volume's path, once the kernel and dmd's records hold it;
        udev's part (the /dev/mapper link) may follow: see node()."""
        options = {"labels": Variant("a{ss}", dict(labels)), "activate": Variant("b", True),
                   "udev-sync": Variant("b", False)}
        volume, _ = await self.job_call(origin, VOLUME_INTERFACE, "Snapshot", "sa{sv}",
                                        [name, options])
        return str(volume)

    async def set_labels(self, path: str, labels: Mapping[str, str]) -> None:
        await self.call(path, VOLUME_INTERFACE, "SetLabels", "a{ss}a{sv}", [dict(labels), {}])

    async def volume_job(self, path: str, member: str, *, udev_sync: bool = True) -> None:
        """Delete, Activate or Deactivate; until its job ends (*udev_sync*
        False: not until udev's work on the device, as lvremove --noudevsync;
        nothing here waits for a removed device's udev work)."""
        await self.job_call(path, VOLUME_INTERFACE, member, "a{sv}",
                            [{"udev-sync": Variant("b", udev_sync)}])

    # -- the mirror --------------------------------------------------------------
    async def start(self) -> None:
        """Follow dmd's signals, then read the pool and its volumes (again
        when called again: the handler and the rules are added once)."""
        if not self._following:
            await self._follow()
            self._following = True
        await self.read_all()

    async def _follow(self) -> None:
        self.bus.add_message_handler(self._on_message)
        for rule in (f"type='signal',sender='{BUS_NAME}',interface='{OBJECT_MANAGER_INTERFACE}'",
                     f"type='signal',sender='{BUS_NAME}',interface='{PROPERTIES_INTERFACE}',"
                     f"member='PropertiesChanged',arg0='{VOLUME_INTERFACE}'",
                     f"type='signal',sender='{BUS_NAME}',interface='{JOB_INTERFACE}',"
                     "member='Completed'",
                     f"type='signal',sender='{DBUS}',member='NameOwnerChanged',"
                     f"arg0='{BUS_NAME}'"):
            await self.call("/org/freedesktop/DBus", DBUS, "AddMatch", "s", [rule],
                            destination=DBUS)

    async def read_all(self) -> None:
        """Read dmd's owner, the pool's path and every volume again."""
        (self._dmd,) = await self.call("/org/freedesktop/DBus", DBUS, "GetNameOwner", "s",
                                       [BUS_NAME], destination=DBUS)
        (self.pool_path,) = await self.call(ROOT_PATH, MANAGER_INTERFACE, "GetPool", "s",
                                            [self.pool])
        message = Message(destination=BUS_NAME, path=ROOT_PATH,
                          interface=OBJECT_MANAGER_INTERFACE, member="GetManagedObjects",
                          serial=self.bus.next_serial())
        self._objects_serial = message.serial
        try:
            await self._send(message)  # _on_message applies the reply, in order
        finally:
            self._objects_serial = 0

    def _load(self, objects: Mapping[str, Any]) -> None:
        self.volumes, self.minors = {}, {}
        for path, interfaces in objects.items():
            self._added(path, interfaces)

    def _added(self, path: str, interfaces: Mapping[str, Any]) -> None:
        if VOLUME_INTERFACE in interfaces:
            self._put(path, _plain(interfaces[VOLUME_INTERFACE]))
        if DEVICE_INTERFACE in interfaces:
            self.minors[path] = int(_plain(interfaces[DEVICE_INTERFACE]).get("Minor", -1))

    def _job_ended(self, key: tuple[str, str], ended: tuple[bool, str, str]) -> None:
        future = self._waiting.get(key)
        if future is not None and not future.done():
            future.set_result(ended)
            return
        self._ended[key] = ended
        while len(self._ended) > ENDED_KEPT:
            del self._ended[next(iter(self._ended))]

    def node(self, volume: Volume) -> str:
        """The volume's block device node: /dev/dm-N, which the kernel's
        devtmpfs makes when the device is made (udev's /dev/mapper link may
        not be there yet); its /dev/mapper path when the minor is unknown."""
        minor = self.minors.get(volume.device, -1)
        return f"/dev/dm-{minor}" if minor >= 0 else volume.device_path

    async def settled(self) -> None:
        """Read everything again first if the mirror may have missed something."""
        async with self._reading:
            if self._stale:
                self._stale = False
                try:
                    await self.read_all()
                except DmdError:
                    self._stale = True
                    raise

    def _put(self, path: str, props: Mapping[str, Any]) -> None:
        volume = Volume.from_properties(path, props)
        if volume.pool == self.pool and volume.owner == self.owner:
            self.volumes[path] = volume
        else:
            self.volumes.pop(path, None)

    def _on_message(self, msg: Message) -> bool:
        if (msg.message_type is MessageType.METHOD_RETURN and self._objects_serial
                and msg.reply_serial == self._objects_serial):
            self._load(msg.body[0])
            return False
        if msg.message_type is not MessageType.SIGNAL:
            return False
        if msg.member == "NameOwnerChanged" and msg.sender == DBUS:
            if msg.body and msg.body[0] == BUS_NAME:
                self._dmd = str(msg.body[2])
                self._stale = True
                for (dmd, _), future in self._waiting.items():  # their jobs died with it
                    if dmd != self._dmd and not future.done():
                        future.set_exception(DmdError(
                            "org.freedesktop.DBus.Error.NoReply", "dmd went away"))
            return False
        if not self._dmd or msg.sender != self._dmd:
            return False
        body = msg.body
        if msg.member == "Completed" and msg.interface == JOB_INTERFACE:
            self._job_ended((msg.sender or "", msg.path or ""),
                            (bool(body[0]), str(body[1]), str(body[2])))
        elif msg.member == "InterfacesAdded":
            self._added(str(body[0]), body[1])
        elif msg.member == "InterfacesRemoved":
            if VOLUME_INTERFACE in body[1]:
                self.volumes.pop(str(body[0]), None)
            if DEVICE_INTERFACE in body[1]:
                self.minors.pop(str(body[0]), None)
        elif msg.member == "PropertiesChanged" and body[0] == VOLUME_INTERFACE:
            old = self.volumes.get(msg.path or "")
            if old is not None:
                self._put(old.path, {**self._properties(old), **_plain(body[1])})
            if body[2]:  # invalidated, not sent: read them
                self._stale = True
        return False

    @staticmethod
    def _properties(volume: Volume | None) -> dict[str, Any]:
        if volume is None:
            return {}
        return {"Name": volume.name, "PoolName": volume.pool, "Owner": volume.owner,
                "State": volume.state, "DevicePath": volume.device_path,
                "Device": volume.device, "UsedBytes": volume.used_bytes,
                "Labels": dict(volume.labels)}
