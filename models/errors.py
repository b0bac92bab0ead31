"""The runners' typed errors: ServiceError subclasses (core.errors), each with its HTTP status and error type.

They cross Ray handles (a replica raises, the ingress maps), so each pickles with its message intact. The
mapping to HTTP lives in one place: serving/errors.py.
"""

from __future__ import annotations

from core.errors import ServiceError


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
