"""Typed, picklable errors that carry their HTTP status and error type.

They cross Ray handles (a replica raises, the ingress maps), so each pickles with its message intact. The
mapping to HTTP lives in one place: serving/errors.py.
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


class InvalidInput(ServiceError):
    """400: the inputs or a parameter are wrong; the message names the field."""

    status_code = 400
    error_type = "validation"


class UnprocessableRequest(ServiceError):
    """422: an OpenAI-style body that does not validate."""

    status_code = 422
    error_type = "validation"


class ModelNotFound(ServiceError):
    status_code = 404

    def __init__(self, model_id: str, **extra: object) -> None:
        super().__init__(f"Model {model_id} does not exist", **extra)


class TaskNotSupported(ServiceError):
    status_code = 400
    error_type = "validation"


class PayloadTooLarge(ServiceError):
    status_code = 413


class ModelLoading(ServiceError):
    """503 with an estimated time: the model's replicas are not ready yet."""

    status_code = 503
    error_type = "overloaded"


class Overloaded(ServiceError):
    status_code = 503
    error_type = "overloaded"


class ReplicaUnavailable(ServiceError):
    """503 with Retry-After: the replica running the request died before answering, and the one retry failed too.
    Nothing was charged."""

    status_code = 503
    error_type = "overloaded"


class GenerationError(ServiceError):
    """A fault while running the model: the details go to the log, the client sees `unknown error`."""

    status_code = 500
    error_type = "generation"
