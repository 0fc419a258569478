"""fusesnap errors as the gRPC status codes containerd's errdefs turn back into its error kinds.

containerd decides on codes, not messages: ErrNotFound lets its garbage
collector and `ctr snapshots rm` move on, ErrAlreadyExists makes the unpacker
Stat the layer it was about to extract and skip it, ErrFailedPrecondition is
"still in use" (a snapshot with children, a mounted upper).
"""

from __future__ import annotations

import grpc

from ..errors import AlreadyExists, FusesnapError, InUse, IntegrityError, InvalidInput, NotFound

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
)


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The code containerd expects for exc (UNKNOWN for anything unforeseen)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, FusesnapError):
        return grpc.StatusCode.UNKNOWN
    if isinstance(exc, OSError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


def error_of(code: grpc.StatusCode, message: str) -> FusesnapError:
    """The fusesnap error a client raises for a failed call (the inverse of status_of)."""
    for kind, c in _CODES:
        if c == code:
            return kind(message)   # type: ignore[return-value]
    return FusesnapError(message)
