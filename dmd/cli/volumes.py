"""dmctl's pool and volume verbs: the service-facing half of dmd.

Every change runs as a Job on dmd's side; these verbs wait for it (showing
its progress on a terminal) unless --no-wait, and fail with the job's error.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from dbus_fast import Variant

from dmd.cli.client import Client, Failure
from dmd.cli.output import emit, labels_of
from dmd.dbus.names import (
    JOB_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    POOL_INTERFACE,
    PROPERTIES_INTERFACE,
    ROOT_PATH,
    VOLUME_INTERFACE,
)

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "20G", "20GiB", "512M", "1073741824"; G is GiB (as lvcreate
    and dmsetup read sizes), GB is 10^9."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20G, 512MiB, 4096)")
    number, prefix, suffix = match.groups()
    unit = prefix.lower() + ("b" if suffix.lower() == "b" and prefix else "")
    return int(number) * _UNITS[unit if unit in _UNITS else prefix.lower()]


def human(size: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f}{unit}"
    return f"{size}B"


async def _props(c: Client, path: str, interface: str) -> dict[str, Any]:
    (values,) = await c.call(path, PROPERTIES_INTERFACE, "GetAll", "s", [interface])
    return dict(values)


async def _objects(c: Client, interface: str) -> dict[str, dict[str, Any]]:
    (objects,) = await c.call(ROOT_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
    return {path: dict(ifaces[interface]) for path, ifaces in objects.items()
            if interface in ifaces}


async def _pool_path(c: Client, pool: str) -> str:
    (path,) = await c.call(ROOT_PATH, MANAGER_INTERFACE, "GetPool", "s", [pool])
    return str(path)


async def _volume_path(c: Client, pool: str, volume: str) -> str:

    await _pool_path(c, pool)  # NotFound names the pool
    for path, p in (await _objects(c, VOLUME_INTERFACE)).items():
        if p["PoolName"] == pool and p["Name"] == volume:
            return path
    raise Failure(f"pool {pool!r} has no volume named {volume!r} (NotFound)")


async def wait_job(c: Client, a: argparse.Namespace, job: str) -> dict[str, Any]:
    """Wait for *job*; its final properties. A failed job is a Failure."""

    show = sys.stderr.isatty() and not a.json
    while True:
        (done,) = await c.call(job, JOB_INTERFACE, "Wait", "d", [1.0])
        props = await _props(c, job, JOB_INTERFACE)
        if show:
            sys.stderr.write(f"\r{props['Operation']}: {props['Progress'] * 100:3.0f}%")
            sys.stderr.flush()
        if done:
            break
    if show:
        sys.stderr.write("\n")
    if props["State"] != "completed":
        raise Failure(f"{props['ErrorMessage']} ({props['ErrorName'] or props['State']})")
    return props


async def _run_job(c: Client, a: argparse.Namespace, job: str, subject: str | None,
                   interface: str | None, text: Callable[[dict[str, Any]], str]) -> None:

    if a.no_wait:
        emit(a, {"job": job, "object": subject}, job)
        return
    await wait_job(c, a, job)
    props = await _props(c, subject, interface) if subject and interface else {}
    emit(a, {"job": job, "object": subject, **props}, text(props))


async def cmd_pool_create(c: Client, a: argparse.Namespace) -> None:
    options: dict[str, Variant] = {}
    if a.force:
        options["force"] = Variant("b", True)
    if a.block_size is not None:
        options["block-size"] = Variant("t", a.block_size)
    if a.on_full:
        options["on-full"] = Variant("s", a.on_full)
    if a.low_water is not None:
        options["low-water"] = Variant("u", a.low_water)
    if a.data_size is not None:
        options["data-size"] = Variant("t", a.data_size)
    if a.metadata_size is not None:
        options["metadata-size"] = Variant("t", a.metadata_size)
    if a.no_space_timeout is not None:
        options["no-space-timeout"] = Variant("u", a.no_space_timeout)
    pool, job = await c.call(ROOT_PATH, MANAGER_INTERFACE, "CreatePool", "sasa{sv}",
                             [a.name, a.devices, options], mutating=True)
    await _run_job(c, a, job, pool, POOL_INTERFACE,
                   lambda p: f"{p['Name']}: {human(p['DataTotal'])} of data")


async def cmd_pool_import(c: Client, a: argparse.Namespace) -> None:
    pool, job = await c.call(ROOT_PATH, MANAGER_INTERFACE, "ImportPool", "asa{sv}",
                             [a.devices, {}], mutating=True)
    await _run_job(c, a, job, pool, POOL_INTERFACE,
                   lambda p: f"{p['Name']}: imported, {human(p['DataTotal'])} of data")


async def cmd_pools(c: Client, a: argparse.Namespace) -> None:

    pools = sorted((await _objects(c, POOL_INTERFACE)).values(), key=lambda p: str(p["Name"]))
    volumes = list((await _objects(c, VOLUME_INTERFACE)).values())
    rows = [f"{p['Name']}\t{p['State']}\t{p['Mode']}\tdata {human(p['DataUsed'])}/"
            f"{human(p['DataTotal'])}\tmetadata {human(p['MetadataUsed'])}/"
            f"{human(p['MetadataTotal'])}\t"
            f"{sum(1 for v in volumes if v['PoolName'] == p['Name'])} volume(s)" for p in pools]
    emit(a, pools, "\n".join(rows) or "No pools")


async def cmd_disks(c: Client, a: argparse.Namespace) -> None:
    (listed,) = await c.call(ROOT_PATH, MANAGER_INTERFACE, "ListDisks", "a{sv}", [{}])
    disks = [{"Path": p, "Size": size, "Signature": sig, "Busy": busy}
             for p, size, sig, busy in listed]
    rows = [f"{d['Path']}\t{human(d['Size'])}\t{d['Signature'] or '-'}\t"
            f"{d['Busy'] or ('free (--force overwrites it)' if d['Signature'] else 'free')}"
            for d in disks]
    emit(a, disks, "\n".join(rows) or "No disks")


async def cmd_pool_destroy(c: Client, a: argparse.Namespace) -> None:
    options = {"force": Variant("b", True)} if a.force else {}
    (job,) = await c.call(await _pool_path(c, a.name), POOL_INTERFACE, "Destroy", "a{sv}",
                          [options], mutating=True)
    await _run_job(c, a, job, None, None, lambda _: "")


async def cmd_pool_stop_start(c: Client, a: argparse.Namespace) -> None:
    """pool-stop, pool-start and pool-repair: a job on the pool."""
    path = await _pool_path(c, a.name)
    options = {"devices": Variant("as", a.device)} if getattr(a, "device", None) else {}
    if getattr(a, "accept_loss", False):
        options["accept-loss"] = Variant("b", True)
    member = {"pool-stop": "Stop", "pool-start": "Start", "pool-repair": "Repair"}[a.command]
    (job,) = await c.call(path, POOL_INTERFACE, member, "a{sv}", [options], mutating=True)
    await _run_job(c, a, job, path, POOL_INTERFACE, lambda p: f"{a.name}: {p.get('State')}")


async def cmd_pool_rename(c: Client, a: argparse.Namespace) -> None:
    path = await _pool_path(c, a.name)
    await c.call(path, POOL_INTERFACE, "Rename", "sa{sv}", [a.new_name, {}], mutating=True)
    emit(a, {"object": path, "name": a.new_name}, a.new_name)


async def cmd_pool_add(c: Client, a: argparse.Namespace) -> None:
    options = {"force": Variant("b", True)} if a.force else {}
    path = await _pool_path(c, a.name)
    (job,) = await c.call(path, POOL_INTERFACE, "AddDevice", "sa{sv}", [a.device, options],
                          mutating=True)
    await _run_job(c, a, job, path, POOL_INTERFACE,
                   lambda p: f"{p['Name']}: {human(p['DataTotal'])} of data")


def _key_fd(path: str) -> int:
    """A descriptor of the key file *path* ("-": standard input) for dmd to
    read: the key goes to dmd as a descriptor, never as a string."""

    if path == "-":
        return os.dup(0)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise Failure(f"{path}: {exc.strerror}") from None


class _Keys:
    """Key files opened for one call: options that name them, the fds."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, path: str) -> Variant:
        self.fds.append(_key_fd(path))
        return Variant("h", len(self.fds) - 1)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


async def cmd_vol_create(c: Client, a: argparse.Namespace) -> None:

    options = {"labels": Variant("a{ss}", labels_of(a.label))} if a.label else {}
    if a.filesystem:
        options["filesystem"] = Variant("s", a.filesystem)
    if a.thick or a.stripes:
        options["thin"] = Variant("b", False)
    if a.stripes:
        options["stripes"] = Variant("u", a.stripes)
    if a.stripe_size:
        options["stripe-size"] = Variant("t", a.stripe_size)
    keys = _Keys()
    try:
        if a.encrypt or a.key_file or a.key_description:
            options["encryption"] = Variant("s", "luks2")
        if a.key_file:
            options["key"] = keys.add(a.key_file)
        if a.key_description:
            options["key-description"] = Variant("s", a.key_description)
        if a.pbkdf_memory:
            options["pbkdf-memory-kib"] = Variant("u", a.pbkdf_memory)
        if a.pbkdf_iterations:
            options["pbkdf-iterations"] = Variant("u", a.pbkdf_iterations)
        volume, job = await c.call(await _pool_path(c, a.pool), POOL_INTERFACE,
                                   "CreateVolume", "sta{sv}", [a.name, a.size, options],
                                   mutating=True, fds=keys.fds)
    finally:
        keys.close()
    await _run_job(c, a, job, volume, VOLUME_INTERFACE,
                   lambda p: p.get("CleartextPath") or p.get("DevicePath", ""))


async def cmd_unlock(c: Client, a: argparse.Namespace) -> None:
    keys = _Keys()
    try:
        options = {"key": keys.add(a.key_file)} if a.key_file else {}
        path = await _volume_path(c, a.pool, a.volume)
        await c.call(path, VOLUME_INTERFACE, "Unlock", "a{sv}", [options], mutating=True,
                     fds=keys.fds)
    finally:
        keys.close()
    print((await _props(c, path, VOLUME_INTERFACE))["CleartextPath"])


async def cmd_lock(c: Client, a: argparse.Namespace) -> None:
    path = await _volume_path(c, a.pool, a.volume)
    await c.call(path, VOLUME_INTERFACE, "Lock", "a{sv}", [{}], mutating=True)


async def cmd_vol_label(c: Client, a: argparse.Namespace) -> None:
    path = await _volume_path(c, a.pool, a.volume)
    await c.call(path, VOLUME_INTERFACE, "SetLabels", "a{ss}a{sv}", [labels_of(a.labels), {}],
                 mutating=True)


async def cmd_vol_rename(c: Client, a: argparse.Namespace) -> None:
    path = await _volume_path(c, a.pool, a.volume)
    await c.call(path, VOLUME_INTERFACE, "Rename", "sa{sv}", [a.name, {}], mutating=True)
    print((await _props(c, path, VOLUME_INTERFACE))["DevicePath"] or f"{a.pool}/{a.name}")


async def cmd_change_key(c: Client, a: argparse.Namespace) -> None:
    keys = _Keys()
    try:
        options = {"key": keys.add(a.key_file)}
        if a.command == "add-key":
            options["new-key"] = keys.add(a.new_key_file)
        else:
            options["remove"] = Variant("b", True)
        path = await _volume_path(c, a.pool, a.volume)
        await c.call(path, VOLUME_INTERFACE, "ChangeKey", "a{sv}", [options], mutating=True,
                     fds=keys.fds)
    finally:
        keys.close()


async def cmd_vols(c: Client, a: argparse.Namespace) -> None:

    if a.pool:
        await _pool_path(c, a.pool)
    volumes = sorted((v for v in (await _objects(c, VOLUME_INTERFACE)).values()
                      if not a.pool or v["PoolName"] == a.pool),
                     key=lambda v: (str(v["PoolName"]), str(v["Name"])))
    rows = [f"{v['PoolName']}/{v['Name']}\t{v['State']}\t{human(v['Size'])}\tused "
            f"{human(v['UsedBytes'])}\t{v['DevicePath'] or '-'}"
            + (f"\t{'locked' if v['Locked'] else v['CleartextPath']}" if v["Encryption"] else "")
            for v in volumes]
    emit(a, volumes, "\n".join(rows) or "No volumes")


async def cmd_snapshot(c: Client, a: argparse.Namespace) -> None:
    options = {"activate": Variant("b", False)} if a.inactive else {}
    snap, job = await c.call(await _volume_path(c, a.pool, a.volume), VOLUME_INTERFACE,
                             "Snapshot", "sa{sv}", [a.name, options], mutating=True)
    await _run_job(c, a, job, snap, VOLUME_INTERFACE,
                   lambda p: p.get("DevicePath") or f"{a.pool}/{a.name} (inactive)")


async def cmd_resize(c: Client, a: argparse.Namespace) -> None:
    options = {flag: Variant("b", True) for flag in ("shrink", "filesystem")
               if getattr(a, flag)}
    path = await _volume_path(c, a.pool, a.volume)
    (job,) = await c.call(path, VOLUME_INTERFACE, "Resize", "ta{sv}", [a.size, options],
                          mutating=True)
    await _run_job(c, a, job, path, VOLUME_INTERFACE, lambda p: human(p["Size"]))


async def cmd_vol_simple(c: Client, a: argparse.Namespace) -> None:
    member = {"vol-delete": "Delete", "activate": "Activate", "deactivate": "Deactivate"}[
        a.command]
    path = await _volume_path(c, a.pool, a.volume)
    (job,) = await c.call(path, VOLUME_INTERFACE, member, "a{sv}", [{}], mutating=True)
    keeps = a.command != "vol-delete"
    await _run_job(c, a, job, path if keeps else None, VOLUME_INTERFACE if keeps else None,
                   lambda p: p.get("DevicePath", ""))


async def cmd_revert(c: Client, a: argparse.Namespace) -> None:
    snapshot = await _volume_path(c, a.pool, a.volume)
    origin = (await _props(c, snapshot, VOLUME_INTERFACE))["Origin"]
    (job,) = await c.call(snapshot, VOLUME_INTERFACE, "Revert", "a{sv}", [{}], mutating=True)
    await _run_job(c, a, job, origin if origin != "/" else None, VOLUME_INTERFACE,
                   lambda p: f"{p.get('Name', '?')}: " + (
                       "reverted at its next activation (it is open now)"
                       if p.get("RevertScheduled") else "reverted"))


async def cmd_cache_attach(c: Client, a: argparse.Namespace) -> None:
    options = {"mode": Variant("s", a.mode)}
    if a.block_size:
        options["block-size"] = Variant("t", a.block_size)
    if a.force:
        options["force"] = Variant("b", True)
    path = await _volume_path(c, a.pool, a.volume)
    (job,) = await c.call(path, VOLUME_INTERFACE, "AttachCache", "sa{sv}",
                          [a.device, options], mutating=True)
    await _run_job(c, a, job, path, VOLUME_INTERFACE,
                   lambda p: f"{p['Cache']} cache on {p['CacheDevice']}")


async def cmd_cache_detach(c: Client, a: argparse.Namespace) -> None:
    path = await _volume_path(c, a.pool, a.volume)
    (job,) = await c.call(path, VOLUME_INTERFACE, "DetachCache", "a{sv}", [{}], mutating=True)
    await _run_job(c, a, job, path, VOLUME_INTERFACE, lambda p: p.get("DevicePath", ""))


Verb = Callable[["Client", argparse.Namespace], Coroutine[Any, Any, None]]
# The verbs that name a volume as POOL VOLUME: they take POOL/VOLUME too.
VOLUME_VERBS: set[str] = set()


def split_volume_argument(argv: list[str]) -> list[str]:
    """*argv* with a volume verb's POOL/VOLUME (as ``dmctl vols`` prints a
    volume) made POOL VOLUME; anything else as it is."""
    verb = next((i for i, arg in enumerate(argv) if arg in VOLUME_VERBS), None)
    if verb is None:
        return argv
    first = next((i for i in range(verb + 1, len(argv)) if not argv[i].startswith("-")), None)
    if first is None or "/" not in argv[first]:
        return argv
    pool, _, volume = argv[first].partition("/")
    return [*argv[:first], pool, volume, *argv[first + 1:]]


def register(verb: Callable[[str, Verb, str], argparse.ArgumentParser]) -> None:
    def no_wait(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--no-wait", action="store_true",
                        help="print the job's object path and return at once")
        return sp

    def volume_only(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        VOLUME_VERBS.add(sp.prog.rsplit(" ", 1)[-1])
        sp.add_argument("pool", metavar="POOL", help="the pool's name (or POOL/VOLUME, as "
                        "dmctl vols prints a volume, for both)")
        sp.add_argument("volume", metavar="VOLUME", help="the volume's name")
        return sp

    def volume_args(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return no_wait(volume_only(sp))

    sp = no_wait(verb("pool-create", cmd_pool_create,
                      "lay a thin pool over whole devices (their data is overwritten)"))
    sp.add_argument("name", metavar="NAME", help="the pool's name (letters, digits, _ . + -)")
    sp.add_argument("devices", nargs="+", metavar="DEVICE", help="block devices to use")
    sp.add_argument("-f", "--force", action="store_true",
                    help="overwrite a device that carries a signature (filesystem, LVM, ...)")
    sp.add_argument("--block-size", type=parse_size, metavar="SIZE",
                    help="data block size, a multiple of 64K up to 1G (default: 64K)")
    sp.add_argument("--on-full", choices=("queue", "error"),
                    help="when the pool is full: queue writes (default) or fail them at once")
    sp.add_argument("--low-water", type=int, metavar="PERCENT",
                    help="raise the pool's low-space event at PERCENT of data left "
                         "(default: 20)")
    sp.add_argument("--data-size", type=parse_size, metavar="SIZE",
                    help="start with SIZE of data and keep the rest of the devices for the "
                         "pool to grow into when it runs low (default: all of them)")
    sp.add_argument("--metadata-size", type=parse_size, metavar="SIZE",
                    help="the pool's metadata (2M to 16G; default: 48 bytes a data block of "
                         "all the devices, at least 2M)")
    sp.add_argument("--no-space-timeout", type=int, metavar="SECONDS",
                    help="with --on-full queue: fail the queued writes after SECONDS "
                         "without space (default: 60; 0: as long as the kernel allows)")
    sp = no_wait(verb("pool-import", cmd_pool_import,
                      "bring a pool back from its devices (state lost, or another machine)"))
    sp.add_argument("devices", nargs="+", metavar="DEVICE",
                    help="every device of the pool, by any name")
    verb("pools", cmd_pools, "list pools")
    verb("disks", cmd_disks, "list the disks a pool could be made on, and why not")
    sp = no_wait(verb("pool-add", cmd_pool_add, "grow a pool's data over one more device"))
    sp.add_argument("name", metavar="NAME", help="the pool's name")
    sp.add_argument("device", metavar="DEVICE", help="the block device to add")
    sp.add_argument("-f", "--force", action="store_true",
                    help="overwrite a device that carries a signature")
    sp = no_wait(verb("pool-destroy", cmd_pool_destroy, "remove a pool and its devices"))
    sp.add_argument("name", metavar="NAME", help="the pool's name")
    sp.add_argument("-f", "--force", action="store_true",
                    help="also when it has volumes (their data is lost)")
    sp = no_wait(verb("pool-stop", cmd_pool_stop_start,
                      "remove a pool's devices, keeping it (its disks may then move)"))
    sp.add_argument("name", metavar="NAME", help="the pool's name")
    sp = verb("pool-rename", cmd_pool_rename, "give a stopped pool another name")
    sp.add_argument("name", metavar="NAME", help="the pool's name")
    sp.add_argument("new_name", metavar="NEW", help="its new name")
    sp = no_wait(verb("pool-start", cmd_pool_stop_start, "make a stopped pool's devices again"))
    sp.add_argument("name", metavar="NAME", help="the pool's name")
    sp.add_argument("--device", action="append", metavar="PATH",
                    help="where a disk of the pool is now, if the disks moved (once per "
                         "disk; each found by its label)")
    sp = no_wait(verb("pool-repair", cmd_pool_stop_start,
                      "mend a pool's damaged metadata into its spare area (thin_repair)"))
    sp.add_argument("name", metavar="NAME", help="the pool's name")
    sp.add_argument("--device", action="append", metavar="PATH",
                    help="a stopped pool's disk where it is now, if the disks moved (once "
                         "per disk; each found by its label)")
    sp.add_argument("--accept-loss", action="store_true",
                    help="forget the volumes whose mappings the repair cannot find, and keep "
                         "the rest (else nothing changes and they are named)")
    sp = no_wait(verb("vol-create", cmd_vol_create, "create a volume in a pool"))
    sp.add_argument("pool", metavar="POOL", help="the pool's name")
    sp.add_argument("name", metavar="NAME", help="the volume's name")
    sp.add_argument("size", type=parse_size, metavar="SIZE",
                    help="its size: bytes, or with K, M, G, T (powers of 1024)")
    sp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="a label kept with the volume (repeatable)")
    sp.add_argument("--filesystem", choices=("ext4", "xfs"),
                    help="make this filesystem on it (labelled with its name)")
    sp.add_argument("--encrypt", action="store_true",
                    help="LUKS2 under it, opened as /dev/mapper/POOL-NAME-crypt")
    sp.add_argument("--key-file", metavar="FILE",
                    help="the key for --encrypt: all of FILE ('-': standard input)")
    sp.add_argument("--key-description", metavar="DESC",
                    help="the key for --encrypt: the user key DESC in root's keyring "
                         "(opened again from there after a reboot)")
    sp.add_argument("--pbkdf-memory", type=int, metavar="KIB",
                    help="argon2's memory cost (default: cryptsetup's benchmark)")
    sp.add_argument("--pbkdf-iterations", type=int, metavar="N",
                    help="argon2's time cost, fixed instead of benchmarked")
    sp.add_argument("--thick", action="store_true",
                    help="allocate all of it now from the pool's room (not thin)")
    sp.add_argument("--stripes", type=int, metavar="N",
                    help="a thick volume striped over N of the pool's devices")
    sp.add_argument("--stripe-size", type=parse_size, metavar="SIZE",
                    help="with --stripes: the chunk on each device (default: 64K)")
    sp = volume_only(verb("unlock", cmd_unlock, "open an encrypted volume"))
    sp.add_argument("--key-file", metavar="FILE",
                    help="its key ('-': standard input; default: its keyring key)")
    volume_only(verb("lock", cmd_lock, "close an encrypted volume (the key leaves the kernel)"))
    sp = volume_only(verb("vol-rename", cmd_vol_rename,
                          "give a volume another name (its data, UUID and owner stay)"))
    sp.add_argument("name", metavar="NEW", help="its new name")
    sp = volume_only(verb("vol-label", cmd_vol_label, "set a volume's labels"))
    sp.add_argument("labels", nargs="*", metavar="KEY=VALUE",
                    help="the labels, replacing all the old ones (none: clear them)")
    sp = volume_only(verb("add-key", cmd_change_key, "add a key to an encrypted volume"))
    sp.add_argument("--key-file", metavar="FILE", required=True, help="a key it opens with")
    sp.add_argument("--new-key-file", metavar="FILE", required=True, help="the key to add")
    sp = volume_only(verb("remove-key", cmd_change_key,
                          "remove the key given from an encrypted volume (never its last)"))
    sp.add_argument("--key-file", metavar="FILE", required=True, help="the key to remove")
    sp = volume_args(verb("cache-attach", cmd_cache_attach,
                          "put a cache in front of a volume"))
    sp.add_argument("device", metavar="DEVICE",
                    help="a fast block device (taken whole) or a volume as POOL/VOLUME")
    sp.add_argument("--mode", choices=("writeback", "writethrough", "writecache"),
                    default="writeback",
                    help="dm-cache writeback (default) or writethrough, or dm-writecache")
    sp.add_argument("--block-size", type=parse_size, metavar="SIZE",
                    help="dm-cache's block, a multiple of 32K (default: 64K)")
    sp.add_argument("-f", "--force", action="store_true",
                    help="overwrite a device that carries a signature")
    volume_args(verb("cache-detach", cmd_cache_detach,
                     "write the cache's dirty blocks back and remove it (a job)"))
    sp = verb("vols", cmd_vols, "list volumes")
    sp.add_argument("pool", nargs="?", metavar="POOL", help="only this pool's")
    sp = volume_args(verb("snapshot", cmd_snapshot, "snapshot a volume"))
    sp.add_argument("name", metavar="NAME", help="the snapshot's name")
    sp.add_argument("--inactive", action="store_true",
                    help="do not make a device for the snapshot")
    sp = volume_args(verb("resize", cmd_resize, "grow (or with --shrink, shrink) a volume"))
    sp.add_argument("size", type=parse_size, metavar="SIZE", help="the new size")
    sp.add_argument("--shrink", action="store_true",
                    help="allow a smaller size (the data past the new end is lost)")
    sp.add_argument("--filesystem", action="store_true",
                    help="resize its ext4 or xfs with it (grown mounted or not; ext4 "
                         "shrinks unmounted, checked first)")
    volume_args(verb("revert", cmd_revert,
                     "give a snapshot's origin the snapshot's data (VOLUME: the snapshot; "
                     "scheduled while the origin is open)"))
    volume_args(verb("vol-delete", cmd_vol_simple, "delete a volume and its data"))
    volume_args(verb("activate", cmd_vol_simple, "make a volume's device"))
    volume_args(verb("deactivate", cmd_vol_simple,
                     "remove a volume's device (its data and record stay)"))
