"""A bus that goes away is one clear line, not tracebacks.

Replies and signals are sent without anyone awaiting them; when the bus
daemon is gone, each such write fails, and asyncio used to print "Future
exception was never retrieved" with a BrokenPipeError traceback for every one
(seen as two tracebacks from dbus-fast's release_name when a dmd was stopped
while its session bus was going away).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from typing import Any

import pytest
from dbus_fast import Message

from dmd.dbus.bus import DmdBus
from tests.conftest import PrivateBus


async def test_failed_sends_are_not_unretrieved_exceptions(private_bus: PrivateBus) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    bus = await DmdBus(bus_address=private_bus.address).connect()
    assert bus._sock is not None
    bus._sock.shutdown(socket.SHUT_WR)  # every write from now on: EPIPE
    futures = [bus.send(Message.new_signal("/test", "org.example.Test", "Gone", "u", [i]))
               for i in range(3)]
    await asyncio.wait(futures, timeout=5)
    assert all(f.done() for f in futures)
    assert isinstance(futures[0].exception(), BrokenPipeError)  # the failure is real
    del futures
    gc.collect()  # an unretrieved exception is reported when its future dies
    await asyncio.sleep(0)
    assert not reported, [c.get("message") for c in reported]
    assert not bus.connected  # the first failed write ended the connection


@pytest.mark.parametrize("bus_first", [True, False], ids=["bus-then-sigterm",
                                                         "sigterm-then-bus"])
def test_stop_while_the_bus_goes_away_is_one_line(make_dmd: Any, private_bus: PrivateBus,
                                                   bus_first: bool) -> None:
    dmd = make_dmd()
    assert dmd.proc is not None
    if bus_first:
        os.kill(private_bus.pid, signal.SIGKILL)
        dmd.proc.send_signal(signal.SIGTERM)
    else:
        dmd.proc.send_signal(signal.SIGTERM)
        os.kill(private_bus.pid, signal.SIGKILL)
    code = dmd.proc.wait(timeout=20)
    log = dmd.log.read_text()
    assert "Traceback" not in log and "never retrieved" not in log, log
    # Stopped (0), or lost the bus before the signal was seen (1): either
    # way, what happened to the bus is said at most once.
    assert code in (0, 1), log
    about_bus = [line for line in log.splitlines()
                 if "connection" in line and "bus" in line]
    assert len(about_bus) <= 1, about_bus


def test_losing_the_bus_says_so_once(make_dmd: Any, private_bus: PrivateBus) -> None:
    dmd = make_dmd()
    assert dmd.proc is not None
    os.kill(private_bus.pid, signal.SIGKILL)
    assert dmd.proc.wait(timeout=20) == 1
    lines = [line for line in dmd.log.read_text().splitlines() if "bus" in line.lower()]
    lost = [line for line in lines if "lost the connection to the bus" in line]
    assert len(lost) == 1, lines
    assert "Traceback" not in dmd.log.read_text()
