"""Error types. Every user-facing failure is a FusesnapError whose str() is one line."""


class FusesnapError(Exception):
    """Base of all errors reported to the user (exit code 1, one-line message)."""

    exit_code = 1


class NotFound(FusesnapError):
    """A layer, snapshot or path that was asked for does not exist."""


class AlreadyExists(FusesnapError):
    """A key or name is already taken."""


class InUse(FusesnapError):
    """Refused because something still references the object."""


class InvalidInput(FusesnapError):
    """Input (a tar, an option, a digest) is malformed or hostile."""


class IntegrityError(FusesnapError):
    """Stored data does not match its recorded checksum or digest."""


class DatabaseError(FusesnapError):
    """The store database cannot be used right now (no space, locked, unwritable)."""


class DamagedStore(DatabaseError):
    """The store's database or records are damaged; `fusesnap fsck --repair` rebuilds them."""
