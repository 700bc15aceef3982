"""The one exception tree of the gateway.

::

    GatewayError(code, message, details, retryable)
    ├── RequestError            the request is bad: reply with the error, change nothing
    │   ├── ValidationError         VALIDATION_ERROR      (details[] name each field)
    │   ├── IdempotencyMismatch     IDEMPOTENCY_MISMATCH  (same id, other body)
    │   ├── ProtocolError           PROTOCOL_ERROR        (framing, JSON, UTF-8)
    │   ├── LineTooLong             LINE_TOO_LONG
    │   ├── UnknownTill             UNKNOWN_TILL
    │   ├── NotFound                NOT_FOUND
    │   ├── Conflict                CONFLICT              (e.g. cancelling twice)
    │   ├── Busy                    BUSY                  (one till has too many requests
    │   │                                                  in flight; retry, same id)
    │   └── OfflineLimitReached     OFFLINE_LIMIT_REACHED (the chain's offline budget is
    │                                                      spent and the policy is block)
    ├── IntegrityError          INTEGRITY_ERROR: the chain or the database is not what we
    │                           wrote; signing halts until a technician intervenes
    ├── SigningHalted           SIGNING_HALTED: a request arrived while signing is halted
    ├── StorageError            STORAGE_ERROR: the disk refused a write; signing halts
    ├── KeyError_               KEY_ERROR: a signing key is missing or unsafe
    ├── DeviceError             DEVICE_ERROR: a printer (or other device) failed; retryable:
    │   │                       back off and try again, signing is never affected
    │   ├── DeviceUnavailable       DEVICE_UNAVAILABLE    (cannot open, disconnected)
    │   └── DeviceTimeout           DEVICE_TIMEOUT        (no answer / no progress in time)
    ├── CloudError              CLOUD_ERROR: a fiscal cloud call failed (docs/sync.md);
    │   │                       signing is never affected
    │   ├── CloudUnavailable        CLOUD_UNAVAILABLE     (connect error, timeout, dropped
    │   │                                                  connection, 5xx: goes offline)
    │   ├── CloudBusy               CLOUD_BUSY            (409/429; carries Retry-After)
    │   ├── CloudAuthFailed         CLOUD_AUTH_FAILED     (credentials refused)
    │   └── CloudRejected           CLOUD_REJECTED        (422/400/other 4xx: permanent,
    │                                                      not retryable)
    └── ConfigError             CONFIG_ERROR: bad configuration (exit 78)

Codes are stable: clients and docs depend on them; messages may be improved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Detail:
    """One problem with one field of a request (``field`` is a JSON-path-like string)."""

    field: str
    message: str
    code: str

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message, "code": self.code}


class GatewayError(Exception):
    code = "INTERNAL_ERROR"
    retryable = False

    def __init__(self, message: str, details: list[Detail] | tuple[Detail, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[Detail, ...] = tuple(details)

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "details": [d.to_json() for d in self.details],
        }


class RequestError(GatewayError):
    code = "BAD_REQUEST"


class ValidationError(RequestError):
    code = "VALIDATION_ERROR"


class IdempotencyMismatch(RequestError):
    code = "IDEMPOTENCY_MISMATCH"


class ProtocolError(RequestError):
    code = "PROTOCOL_ERROR"


class LineTooLong(RequestError):
    code = "LINE_TOO_LONG"


class UnknownTill(RequestError):
    code = "UNKNOWN_TILL"


class NotFound(RequestError):
    code = "NOT_FOUND"


class Conflict(RequestError):
    code = "CONFLICT"


class Busy(RequestError):
    """Too many requests from one till are in flight (MQTT); nothing was done."""

    code = "BUSY"
    retryable = True


class IntegrityError(GatewayError):
    code = "INTEGRITY_ERROR"


class SigningHalted(GatewayError):
    code = "SIGNING_HALTED"
    retryable = True


class StorageError(GatewayError):
    code = "STORAGE_ERROR"
    retryable = True


class KeyError_(GatewayError):
    code = "KEY_ERROR"


class ConfigError(GatewayError):
    code = "CONFIG_ERROR"


class DeviceError(GatewayError):
    code = "DEVICE_ERROR"
    retryable = True


class DeviceUnavailable(DeviceError):
    code = "DEVICE_UNAVAILABLE"


class DeviceTimeout(DeviceError):
    code = "DEVICE_TIMEOUT"


class OfflineLimitReached(RequestError):
    """The chain's offline budget is spent (policy ``block``, or the 9,999-record ceiling of
    the replay counter); nothing was signed. Retry once the uplink has caught up."""

    code = "OFFLINE_LIMIT_REACHED"
    retryable = True


class CloudError(GatewayError):
    code = "CLOUD_ERROR"
    retryable = True


class CloudUnavailable(CloudError):
    code = "CLOUD_UNAVAILABLE"


class CloudBusy(CloudError):
    """409/429; ``retry_after`` is the answer's ``Retry-After`` header as sent (the caller
    reads it on its own clock: ``gateway.core.sync_policy.retry_after_s``)."""

    code = "CLOUD_BUSY"

    def __init__(self, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CloudAuthFailed(CloudError):
    code = "CLOUD_AUTH_FAILED"


class CloudRejected(CloudError):
    """The cloud refused the request for good (HTTP ``status``); never retried."""

    code = "CLOUD_REJECTED"
    retryable = False

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status
