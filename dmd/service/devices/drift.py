"""Whether a managed device's live table is still the one dmd recorded.

The kernel prints a table back in its own words (device paths become
major:minor), and key material is compared redacted: a record may hold the
table without its key.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmd.engine import TargetLine
from dmd.engine.interface import Engine
from dmd.service.devices.operations import DeviceService
from dmd.state.redact import redact_table


async def as_kernel_prints(service: DeviceService,
                           table: Sequence[TargetLine]) -> list[TargetLine]:
    """The recorded table with device paths as the kernel prints them (major:minor)."""
    out = []
    for line in table:
        tokens = []
        for token in line.params.split():
            number = (await service.kernel(Engine.device_number, token)
                      if token.startswith("/dev/") else None)
            tokens.append(f"{number[0]}:{number[1]}" if number else token)
        out.append(TargetLine(line.start, line.length, line.target_type, " ".join(tokens)))
    return out


async def live_differs(service: DeviceService, live: Sequence[TargetLine],
                       recorded: Sequence[TargetLine]) -> bool:
    expected = await as_kernel_prints(service, recorded)
    return _words(redact_table(list(live))[0]) != _words(redact_table(expected)[0])


def _words(table: Sequence[TargetLine]) -> list[TargetLine]:
    # The kernel separates words as it likes (thin-pool ends with a space);
    # a target reads its params as words.
    return [TargetLine(line.start, line.length, line.target_type, " ".join(line.params.split()))
            for line in table]
