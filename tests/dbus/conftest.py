"""A small D-Bus client for the API tests (dbus-fast, low-level messages, so
the tests see exactly what goes over the wire)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from dbus_fast import BusType
from dbus_fast.aio import MessageBus

from tests.dbus.bus_client import Client


@pytest.fixture
async def client(dmd_session: Any) -> AsyncIterator[Client]:
    bus = MessageBus(bus_address=dmd_session.address, bus_type=BusType.SESSION)
    await bus.connect()
    c = Client(bus)
    await c.watch()
    yield c
    bus.disconnect()
