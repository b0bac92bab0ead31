"""Metering over HTTP: Prometheus `/metrics`, `GET /usage` reports, and Hugging Face's cost look-up.

The cost look-up (`POST /billing/requests`, body `{"requestIds": [...]}`) answers
`{"requests": [{"requestId", "costNanoUsd"}]}` read from the ledger; ids it does not know are left out (a charge
may still be on its way from another replica's spool: ask again). It takes `Authorization: Bearer` with the
provider secret (settings.metering.provider_secret); without a configured secret the endpoint answers 404.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from billing.errors import Forbidden, Unauthorized
from metering import metrics
from metering.reports import render_charges, render_report
from metering.service import MeteringService
from models.errors import InvalidInput, ServiceError
from serving.routes.accounts import bearer_token, caller_of
from serving.routes.base import json_response

router = APIRouter()

_MEDIA = {"json": "application/json", "csv": "text/csv; charset=utf-8", "table": "text/plain; charset=utf-8"}


class EndpointDisabled(ServiceError):
    status_code = 404


def _metering(request: Request) -> MeteringService:
    return request.app.state.metering


def _when(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO date or datetime, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


@router.get("/metrics")
def prometheus() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.get("/usage")
def usage(
    request: Request,
    since: str | None = None,
    until: str | None = None,
    account: str | None = None,
    format: str = "json",
    charges: bool = False,
) -> Response:
    """Charges per account, model, task, hardware profile and day (or the raw charges), exact totals.

    An operator (admin token, or anyone in open mode) sees every account; a caller sees their own, and an
    organization's admins see the organization's.
    """
    if format not in _MEDIA:
        raise InvalidInput(f"format must be one of {', '.join(_MEDIA)}, got {format!r}")
    caller = caller_of(request)
    billing = request.app.state.billing
    if not caller.is_admin:
        account = account or caller.name
        if not billing.can_manage(caller, account):
            raise Forbidden(f"You cannot see the usage of {account!r}")
    metering = _metering(request)
    start, end = _when(since, "since"), _when(until, "until")
    if charges:
        text = render_charges(metering.charges(start, end, account=account), format)
    else:
        text = render_report(metering.usage_report(start, end, account=account), format)
    return Response(text, media_type=_MEDIA[format])


@router.post("/billing/requests")
async def cost_lookup(request: Request) -> Response:
    """Hugging Face's per-request cost look-up, protected by the provider secret."""
    metering = _metering(request)
    if not metering.settings.provider_secret:
        raise EndpointDisabled("the billing endpoint is not enabled (set metering.provider_secret)")
    if not metering.check_provider_secret(bearer_token(request)):
        raise Unauthorized("Invalid credentials for the billing endpoint")
    try:
        body: Any = await request.json()
    except ValueError:
        raise InvalidInput('the request body must be JSON: {"requestIds": [...]}') from None
    if not isinstance(body, dict) or "requestIds" not in body:
        raise InvalidInput('requestIds is required: {"requestIds": [...]}')
    found = await run_in_threadpool(metering.cost_lookup, body["requestIds"])
    return json_response({"requests": found})
