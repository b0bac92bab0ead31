"""The one place errors become HTTP responses.

Typed errors (models.errors.ServiceError, and billing's errors, which carry `status_code` and `message`) keep
their status and message. Anything else is a bug: logged with its traceback, answered `500 unknown error`.
Errors raised in a replica arrive wrapped by Ray; the cause is unwrapped here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import ServiceError

log = logging.getLogger("serving.errors")


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

    4xx and 503 (loading, overloaded: the client should retry) are told; other 5xx details stay in the log.
    """
    status = getattr(err, "status_code", None)
    message = getattr(err, "message", None)
    if isinstance(status, int) and isinstance(message, str) and (400 <= status < 500 or status == 503):
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
    body: dict[str, Any] = {"error": message}
    error_type = getattr(err, "error_type", None)
    if error_type:
        body["error_type"] = error_type
    extra = getattr(err, "extra", None) or {}
    body.update({k: v for k, v in extra.items() if k in ("estimated_time",)})
    return status, body


def error_response(err: BaseException, request_id: str | None = None) -> JSONResponse:
    status, body = error_body(err)
    headers = {"x-request-id": request_id} if request_id else {}
    return JSONResponse(body, status_code=status, headers=headers)


def install(app: FastAPI, *, set_request_id: bool = True) -> None:
    """Register the handlers: typed errors, FastAPI's own validation and routing errors, and the rest.

    `set_request_id`: answer with x-request-id (off behind Ray Serve's proxy, which sets it itself).
    """

    def rid(request: Request) -> str | None:
        return getattr(request.state, "request_id", None) if set_request_id else None

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
        return error_response(err, rid(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(
            {"error": f"{where}: {first.get('msg')}", "error_type": "validation"}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _other(request: Request, err: Exception) -> JSONResponse:
        return error_response(err, rid(request))
