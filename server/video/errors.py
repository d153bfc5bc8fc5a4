"""The error every media problem becomes (decode, probe, ranged reads)."""

from __future__ import annotations


class MediaError(Exception):
    """A video the gateway refuses; ``code`` is stable, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    def __reduce__(self):  # crosses process boundaries (decode workers)
        return (MediaError, (self.code, self.message, self.status))
