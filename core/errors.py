"""The typed error a client is told about: picklable, carrying its HTTP status and error type.

Runners (models.errors), billing (billing.errors) and serving subclass it; they cross Ray handles (a replica
raises, the ingress maps), so each pickles with its message intact. The mapping to HTTP lives in one place:
serving/errors.py.
"""

from __future__ import annotations


class ServiceError(Exception):
    """An error the client is told about: `message` is safe to show; `status_code` says what happened."""

    status_code: int = 500
    error_type: str | None = None

    def __init__(self, message: str, **extra: object) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def __reduce__(self):  # keep subclass, message and extra fields across pickling (Ray handles)
        return (_rebuild, (type(self), self.message, self.extra))


def _rebuild(cls: type[ServiceError], message: str, extra: dict) -> ServiceError:
    return cls(message, **extra)
