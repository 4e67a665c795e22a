"""Errors of the ``wl_shm`` family that end a client's session."""

from __future__ import annotations

from ..wire.codec import WireError


class ShmError(WireError):
    """A ``wl_shm`` protocol error (``wl_shm.error`` code) on a client object."""

    def __init__(self, object_id: int, code: int, message: str) -> None:
        super().__init__(message, code, object_id)
