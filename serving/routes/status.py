"""`GET /admin/status`: what the running service is doing now (serving/runtime_status.py), for `hfi status`.

Administrators only (the admin token, an admin user, or anyone in open mode without a token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from billing.errors import Forbidden
from serving.routes.accounts import caller_of

router = APIRouter()


@router.get("/admin/status")
def status(request: Request) -> dict[str, Any]:
    """Per model: replicas, in flight, queue, requests/s and p50 over the last minute, profile and price; the
    spend today and this month; the spool backlog and drain lag; the billing mode."""
    from serving.runtime_status import collect_status

    if not caller_of(request).is_admin:
        raise Forbidden("This operation needs an administrator token")
    return collect_status(request.app.state.core)
