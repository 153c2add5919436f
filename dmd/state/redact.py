"""Keep key material out of the database: tables are stored redacted.

The rules live in ``dmd.engine.keys``. A literal key is replaced by ``-`` and
the record says the key was withheld (such a device cannot be re-created
after a reboot by dmd alone); a kernel keyring reference is kept.
"""

from dmd.engine.keys import WITHHELD, redact_table

__all__ = ["WITHHELD", "redact_table"]
