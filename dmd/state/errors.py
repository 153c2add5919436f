"""Errors of the state store."""

from __future__ import annotations


class StateError(Exception):
    """The database cannot be used; the message names the file and what to do."""


class RecordNotFound(LookupError):
    """No record of that device."""


class RecordExists(ValueError):
    """A record with that name or UUID exists already."""
