"""Metering over HTTP: Prometheus `/metrics`, Hugging Face's cost look-up, and `GET /usage`, which redirects to
the usage API (`GET /billing/usage`, serving/routes/accounts.py) with its query.

The cost look-up (`POST /billing/requests`, body `{"requestIds": [...]}`) answers
`{"requests": [{"requestId", "costNanoUsd"}]}` read from the ledger; ids it does not know are left out (a charge
may still be on its way from another replica's spool: ask again). It takes `Authorization: Bearer` with the
provider secret (settings.metering.provider_secret); without a configured secret the endpoint answers 404.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from billing.errors import Unauthorized
from core.errors import ServiceError
from metering import metrics
from metering.service import MeteringService
from models.errors import InvalidInput
from serving.routes.accounts import bearer_token
from serving.routes.base import json_response

router = APIRouter()


class EndpointDisabled(ServiceError):
    status_code = 404


def _metering(request: Request) -> MeteringService:
    return request.app.state.metering


@router.get("/metrics")
def prometheus() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


@router.api_route("/usage", methods=["GET", "HEAD"], include_in_schema=False)
def usage_moved(request: Request) -> Response:
    """`GET /usage` moved to the usage API, `GET /billing/usage`: a permanent redirect that keeps the query (a
    relative reference, so it holds behind a path prefix too)."""
    query = request.url.query
    return Response(status_code=308, headers={"location": "billing/usage" + (f"?{query}" if query else "")})


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
