"""The one place errors become HTTP responses.

Typed errors (core.errors.ServiceError: the runners', billing's, which carry `status_code` and `message`)
keep their status and message. Anything else is a bug: logged with its traceback, answered `500 unknown error`.
Errors raised in a replica arrive wrapped by Ray; the cause is unwrapped here. A database that cannot be
reached (SQLAlchemy's OperationalError, from the account API or reports) is a 503, not a bug. Every 503 carries
`Retry-After` (seconds): the error's `retry_after_s`, else its `estimated_time`, else DEFAULT_RETRY_AFTER_S.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import ServiceError

log = logging.getLogger("serving.errors")

DEFAULT_RETRY_AFTER_S = 5
DATABASE_DOWN_MESSAGE = "The database cannot be reached. Try again shortly."


def unwrap(err: BaseException) -> BaseException:
    """The original exception behind Ray's RayTaskError wrappers, where there is one."""
    seen = 0
    while seen < 5:
        cause = getattr(err, "cause", None)
        if isinstance(cause, BaseException) and cause is not err:
            err, seen = cause, seen + 1
            continue
        break
    return err


def _typed(err: BaseException) -> tuple[int, str] | None:
    """(status, message) of an error whose message the client may see, or None (answered 500 unknown error).

    4xx, 503 (loading, overloaded: the client should retry) and 504 (a compute limit reached) are told; other
    5xx details stay in the log.
    """
    if isinstance(err, OperationalError):  # the driver's details (host, port) stay in the log
        return 503, DATABASE_DOWN_MESSAGE
    status = getattr(err, "status_code", None)
    message = getattr(err, "message", None)
    if isinstance(status, int) and isinstance(message, str) and (400 <= status < 500 or status in (503, 504)):
        return status, message
    return None


def error_status(err: BaseException) -> int:
    """The status an exception is answered with (for metrics; logs nothing)."""
    typed = _typed(unwrap(err))
    return 500 if typed is None else typed[0]


def error_body(err: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) for an exception; never leaks a 5xx's details, which go to the log."""
    err = unwrap(err)
    typed = _typed(err)
    if typed is None:
        log.error("internal error", exc_info=err)
        return 500, {"error": "unknown error"}
    status, message = typed
    if isinstance(err, OperationalError):
        log.warning("database unavailable: %s", err.orig if err.orig is not None else err)
    body: dict[str, Any] = {"error": message}
    error_type = getattr(err, "error_type", None)
    if error_type:
        body["error_type"] = error_type
    extra = getattr(err, "extra", None) or {}
    body.update({k: v for k, v in extra.items() if k in ("estimated_time",)})
    return status, body


def retry_after_s(err: BaseException) -> int:
    """Whole seconds for the Retry-After of a 503: when the error says it may work again, at least 1."""
    extra = getattr(unwrap(err), "extra", None) or {}
    for key in ("retry_after_s", "estimated_time"):
        value = extra.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
            return max(1, math.ceil(value))
    return DEFAULT_RETRY_AFTER_S


def error_response(err: BaseException, request_id: str | None = None) -> JSONResponse:
    """The JSON error response of `err`, with x-request-id when given and Retry-After on a 503."""
    status, body = error_body(err)
    headers = {"x-request-id": request_id} if request_id else {}
    if status == 503:
        headers["retry-after"] = str(retry_after_s(err))
    return JSONResponse(body, status_code=status, headers=headers)


def handled_response(err: Exception, request_id: str | None = None) -> JSONResponse:
    """What the app's handlers answer an exception raised by a route with (see `install`)."""
    if isinstance(err, RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"  # the body as a whole
        return JSONResponse(
            {"error": f"{where}: {first.get('msg')}", "error_type": "validation"}, status_code=422
        )
    if isinstance(err, StarletteHTTPException):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)
    return error_response(err, request_id)


def request_response(request: Request, err: Exception, set_request_id: bool) -> JSONResponse:
    """`handled_response` for an exception a route raised on `request`, with its request id when we set it."""
    return handled_response(err, getattr(request.state, "request_id", None) if set_request_id else None)


def install(app: FastAPI, *, set_request_id: bool = True) -> None:
    """Register the handlers: typed errors, FastAPI's own validation and routing errors, and the rest.

    `set_request_id`: answer with x-request-id (off behind Ray Serve's proxy, which sets it itself).
    """

    @app.exception_handler(ServiceError)
    @app.exception_handler(RequestValidationError)
    @app.exception_handler(StarletteHTTPException)
    @app.exception_handler(Exception)
    async def _handled(request: Request, err: Exception) -> JSONResponse:
        return request_response(request, err, set_request_id)
