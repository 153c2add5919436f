"""The names of dmd's D-Bus API: one place, shared by the daemon and dmctl.

This module is a contract: clients may import it, and it imports nothing.
"""

from __future__ import annotations

BUS_NAME = "org.example.DeviceMapper"
ROOT_PATH = "/org/example/DeviceMapper"
DEVICES_PATH = ROOT_PATH + "/devices"
MANAGER_INTERFACE = "org.example.DeviceMapper.Manager"
DEVICE_INTERFACE = "org.example.DeviceMapper.Device"
POOL_INTERFACE = "org.example.DeviceMapper.Pool"
VOLUME_INTERFACE = "org.example.DeviceMapper.Volume"
JOB_INTERFACE = "org.example.DeviceMapper.Job"
POOLS_PATH = ROOT_PATH + "/pools"
VOLUMES_PATH = ROOT_PATH + "/volumes"
JOBS_PATH = ROOT_PATH + "/jobs"
NO_OBJECT = "/"  # an object-path property that points nowhere (D-Bus has no null)
OBJECT_MANAGER_INTERFACE = "org.freedesktop.DBus.ObjectManager"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
ERROR_PREFIX = "org.example.DeviceMapper.Error."

# polkit action ids, one per kind of change (see data/polkit/).
ACTION_PREFIX = "org.example.devicemapper."
ACTION_CREATE = ACTION_PREFIX + "create"
ACTION_MODIFY = ACTION_PREFIX + "modify"
ACTION_REMOVE = ACTION_PREFIX + "remove"
ACTION_MANAGE = ACTION_PREFIX + "manage"
ACTION_POOL = ACTION_PREFIX + "pool"
ACTION_VOLUME = ACTION_PREFIX + "volume"


def device_path(minor: int) -> str:
    """Object path of the device with dm minor *minor*: a rename keeps it."""
    return f"{DEVICES_PATH}/dm_{minor}"


def pool_path(uuid: str) -> str:
    """Object path of the pool with UUID *uuid*: renames never move it."""
    return f"{POOLS_PATH}/p{uuid.replace('-', '')}"


def volume_path(uuid: str) -> str:
    return f"{VOLUMES_PATH}/v{uuid.replace('-', '')}"


def job_path(job_id: int) -> str:
    return f"{JOBS_PATH}/{job_id}"
