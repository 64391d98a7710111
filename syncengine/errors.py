"""The syncengine exception tree.

Every error syncengine raises is a :class:`SyncError`. The tree is shallow and grouped by
what the caller does next, not by where the error happened::

    SyncError
    ├── RetryableError          retry later; nothing is wrong with the request
    │   ├── LinkError           the hub could not be reached or the connection broke
    │   ├── HubUnavailableError the hub answered 5xx / 503 (e.g. PostgreSQL is down)
    │   └── NotAvailableOffline the data lives only at the hub and the hub is unreachable
    ├── InvalidInputError       fix the input: retrying the same thing fails the same way
    │   ├── ValidationError     a value, key, field or cell id is not acceptable
    │   ├── DecodeError         bytes on the wire are not a valid message
    │   ├── LimitExceededError  a size, count or depth limit was exceeded
    │   ├── ClockDriftError     a stamp is further ahead of our clock than allowed
    │   ├── SequenceError       a push batch's seq range does not follow what the hub has
    │   └── ConfigError         a configuration file or variable is wrong
    ├── PermissionDeniedError   fix the grant or the credentials
    │   ├── AuthenticationError no, wrong, expired or revoked token (HTTP 401)
    │   └── ForbiddenError      cell outside the grants or of another region (HTTP 403)
    └── StorageError            fix the storage (disk, file, database)
        ├── CorruptStoreError   the SQLite file failed its integrity check
        └── MigrationError      schema migrations are missing, edited or failed

Each error carries a stable wire ``code`` (used in the hub's ``{error, message, detail}``
bodies and in dead letters), a human ``message`` that says what was wrong, a ``hint`` that
says what to do, and a ``detail`` mapping with machine-readable context. Foreign exceptions
(sqlite3, asyncpg, aiohttp, msgpack) are translated into this tree once, at the I/O seam.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "ClockDriftError",
    "ConfigError",
    "CorruptStoreError",
    "DecodeError",
    "ForbiddenError",
    "HubUnavailableError",
    "InvalidInputError",
    "LimitExceededError",
    "LinkError",
    "MigrationError",
    "NotAvailableOffline",
    "PermissionDeniedError",
    "RetryableError",
    "SequenceError",
    "StorageError",
    "SyncError",
    "ValidationError",
    "error_from_wire",
]


class SyncError(Exception):
    """Root of every syncengine error.

    Subclasses set ``code`` (stable, snake_case, part of the wire protocol), ``http_status``
    and a default ``hint``; instances may override ``code`` and ``hint``.
    """

    code: ClassVar[str] = "sync_error"
    http_status: ClassVar[int] = 500
    default_hint: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        detail: Mapping[str, Any] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.detail: dict[str, Any] = dict(detail or {})
        if code is not None:
            # Instance-level override of the class code; ClassVar only guards class writes.
            self.__dict__["code"] = code

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message

    def to_wire(self) -> dict[str, Any]:
        """The error body of the sync protocol: ``{error, message, detail}``."""
        detail = dict(self.detail)
        if self.hint:
            detail.setdefault("hint", self.hint)
        return {"error": self.code, "message": self.message, "detail": detail}


# -- retry later -------------------------------------------------------------------------


class RetryableError(SyncError):
    code = "retryable"
    http_status = 503
    default_hint = "This is transient; it is retried automatically with backoff."


class LinkError(RetryableError):
    code = "link_error"
    default_hint = "Check the network path to the hub; changes stay queued meanwhile."


class HubUnavailableError(RetryableError):
    code = "hub_unavailable"
    default_hint = "The hub or its database is down or overloaded; changes stay queued."


class NotAvailableOffline(RetryableError):
    code = "not_available_offline"
    default_hint = "The record was evicted locally; read it again when the hub is reachable."


# -- fix the input -------------------------------------------------------------------------


class InvalidInputError(SyncError):
    code = "invalid_input"
    http_status = 400
    default_hint = "Fix the input; sending it again unchanged fails the same way."


class ValidationError(InvalidInputError):
    code = "invalid_value"


class DecodeError(InvalidInputError):
    code = "malformed_body"
    default_hint = "Send a msgpack body as described in the sync protocol."


class LimitExceededError(InvalidInputError):
    code = "limit_exceeded"
    http_status = 413
    default_hint = "Split the data into smaller pieces or raise the limit in the config."


class ClockDriftError(InvalidInputError):
    code = "clock_drift"
    http_status = 422
    default_hint = "Set this machine's clock (enable NTP); stamps too far ahead are refused."


class SequenceError(InvalidInputError):
    code = "seq_gap"
    http_status = 409
    default_hint = "The edge and the hub disagree on what was pushed; run `syncengine status`."


class ConfigError(InvalidInputError):
    code = "config_error"
    default_hint = "Fix the named file or variable and start again."


# -- fix the permission ----------------------------------------------------------------------


class PermissionDeniedError(SyncError):
    code = "permission_denied"
    http_status = 403
    default_hint = "Ask the hub operator for a grant covering this cell."


class AuthenticationError(PermissionDeniedError):
    code = "unauthenticated"
    http_status = 401
    default_hint = "Check token/token_file in edge.toml; a revoked token needs a new one."


class ForbiddenError(PermissionDeniedError):
    code = "forbidden"
    http_status = 403


# -- fix the storage -----------------------------------------------------------------------


class StorageError(SyncError):
    code = "storage_error"
    http_status = 500
    default_hint = "Check the disk (space, permissions, health) holding the database."


class CorruptStoreError(StorageError):
    code = "corrupt_store"
    default_hint = (
        "The file is left untouched. Move it aside and run `syncengine edge recover`, "
        "or restore a backup."
    )


class MigrationError(StorageError):
    code = "migration_error"
    default_hint = "Restore the original migration files, or migrate with a matching release."


_BY_STATUS: dict[int, type[SyncError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    403: ForbiddenError,
    409: SequenceError,
    413: LimitExceededError,
    422: ClockDriftError,
}


def _all_subclasses(cls: type[SyncError]) -> list[type[SyncError]]:
    out: list[type[SyncError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_from_wire(status: int, body: Mapping[str, Any]) -> SyncError:
    """Rebuild a typed error from a hub error body (the client side of ``to_wire``).

    The class is chosen by the wire code when known, else by the HTTP status; 5xx and unknown
    statuses become :class:`HubUnavailableError` so that the caller retries.
    """
    code = str(body.get("error", "")) or f"http_{status}"
    message = str(body.get("message", "")) or f"hub answered HTTP {status}"
    raw_detail = body.get("detail")
    detail = dict(raw_detail) if isinstance(raw_detail, Mapping) else {}
    hint = detail.pop("hint", None)
    by_code = {c.code: c for c in _all_subclasses(SyncError)}
    cls = by_code.get(code)
    if cls is None:
        cls = _BY_STATUS.get(status, HubUnavailableError if status >= 500 else InvalidInputError)
    return cls(message, hint=hint if isinstance(hint, str) else None, detail=detail, code=code)
