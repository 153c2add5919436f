"""dmd: a device-mapper daemon."""

__version__ = "0.1.0"
