"""The device-mapper names of a volume's devices (volume names have no "-",
so no volume's device name is another's)."""

from __future__ import annotations


def volume_device(pool: str, volume: str) -> str:
    return f"{pool}-{volume}"


def cleartext_device(pool: str, volume: str) -> str:
    """An encrypted volume's opened (cleartext) device."""
    return f"{pool}-{volume}-crypt"
