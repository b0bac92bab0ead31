"""Accounts over HTTP: the usage API (`GET /billing/usage`) for everyone, and the admin API behind an admin token.

Services come from `request.app.state.billing` (billing.service.BillingService). Handlers are plain `def`:
billing talks to the database synchronously, so FastAPI runs them in its thread pool. Billing's typed errors
(401/402/403/404/409) are mapped by serving/errors.py.

`admission_for(request, ...)` is the one call the ingress makes before compute.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from billing.accounts import Caller
from billing.errors import Forbidden, InvalidRequest
from billing.reports import report_csv
from billing.service import Admission, BillingService

router = APIRouter()


def bearer_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer TOKEN`, or None."""
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _billing(request: Request) -> BillingService:
    return request.app.state.billing


async def admission_for(
    request: Request,
    model_id: str,
    estimate_nanousd: int,
    started_at: dt.datetime,
    *,
    request_id: str | None = None,
) -> Admission:
    """Admit a request before compute (401/402/403 raise): its token and X-HF-Bill-To, in a worker thread.

    `request_id`: the Inference-Id its charge will carry in the ledger (see BillingService.admit)."""
    billing = _billing(request)
    bill_to = request.headers.get("x-hf-bill-to")
    return await run_in_threadpool(
        billing.admit,
        bearer_token(request),
        bill_to,
        model_id,
        estimate_nanousd,
        started_at,
        request_id=request_id,
    )


def caller_of(request: Request) -> Caller:
    """The caller: as serving/security.py's Guard checked it before the handler ran, else from the token. In open
    mode a request without a token is the local account, which is not an administrator: the admin API needs a
    token in every mode."""
    known = getattr(request.state, "caller", None)
    if isinstance(known, Caller):
        return known
    billing = _billing(request)
    if billing.settings.mode == "open" and bearer_token(request) is None:
        return Caller(name=billing.settings.local_account, tier="", is_admin=False)  # a laptop: one account
    return billing.authenticate(bearer_token(request))


def _admin(request: Request) -> tuple[BillingService, Caller]:
    billing = _billing(request)
    caller = caller_of(request)
    if not caller.is_admin:
        raise Forbidden("This operation needs an administrator token")
    return billing, caller


def _manager(request: Request, account: str) -> BillingService:
    """Server admins, and an organization's admins for their organization."""
    billing = _billing(request)
    caller = caller_of(request)
    if not billing.can_manage(caller, account):
        raise Forbidden(f"You cannot manage {account!r}")
    return billing


# --- usage


# What GET /usage took before it moved here (it redirects, query and all): answered with what to use instead.
_MONTHS = (
    "the usage API reports calendar months: use month=YYYY-MM (`hfi usage` reads any window of the ledger)"
)
_MOVED_PARAMETERS = {
    "since": _MONTHS,
    "until": _MONTHS,
    "charges": "the report lists the month's charges itself (`charges`, a page at a time, or format=csv)",
}


@router.get("/billing/usage")
def usage(
    request: Request,
    response: Response,
    account: str | None = None,
    month: str | None = None,
    format: str = "json",
    limit: str | None = None,
    cursor: str | None = None,
) -> Any:
    """The usage API: a month's usage, as billing.usage_access allows (your own; your organizations' for their
    admins; any account's, or every account's, for an operator). Included credits used, pay-as-you-go, by
    model, hardware profile, day (and member, or account), and a page of its charges (`limit`, default 1000, at
    most 10000; `cursor`: the previous page's `next_cursor`, also sent as the `x-next-cursor` header). The
    totals are the whole month's. `GET /usage` redirects here."""
    for name, instead in _MOVED_PARAMETERS.items():
        if name in request.query_params:
            raise InvalidRequest(f"{name}: {instead}")
    if format not in ("json", "csv"):
        raise InvalidRequest(f"format: use json or csv, got {format!r}")
    report = _billing(request).usage(caller_of(request), account, month, limit=limit, cursor=cursor)
    headers = {"x-next-cursor": report["next_cursor"]} if report["next_cursor"] else {}
    if format == "csv":
        return Response(report_csv(report), media_type="text/csv", headers=headers)
    response.headers.update(headers)
    return report


# --- the admin API


class NewUser(BaseModel):
    """Body of POST /admin/users."""

    model_config = ConfigDict(extra="forbid")
    name: str
    tier: str | None = None
    admin: bool = False


class NewOrg(BaseModel):
    """Body of POST /admin/orgs."""

    model_config = ConfigDict(extra="forbid")
    name: str
    seats: int = Field(default=1, ge=1)
    enterprise: bool = False
    plan: str | None = None
    spending_limit_nanousd: int | None = Field(default=None, ge=0)


class TierBody(BaseModel):
    """Body of PUT /admin/users/{name}/tier."""

    model_config = ConfigDict(extra="forbid")
    tier: str


class PlanBody(BaseModel):
    """Body of PUT /admin/orgs/{org}/plan."""

    model_config = ConfigDict(extra="forbid")
    plan: str | None = None
    seats: int | None = Field(default=None, ge=1)


class MemberBody(BaseModel):
    """Body of PUT /admin/orgs/{org}/members/{user}."""

    model_config = ConfigDict(extra="forbid")
    admin: bool = False


class TokenBody(BaseModel):
    """Body of POST /admin/users/{name}/tokens."""

    model_config = ConfigDict(extra="forbid")
    label: str = ""


class LimitBody(BaseModel):
    """Body of PUT /admin/accounts/{name}/spending-limit; null removes the limit."""

    model_config = ConfigDict(extra="forbid")
    spending_limit_nanousd: int | None = Field(ge=0)


@router.get("/admin/accounts")
def list_accounts(request: Request) -> list[dict[str, Any]]:
    """Every user and organization (tokens by id and hint only)."""
    billing, _ = _admin(request)
    return [asdict(i) for i in billing.accounts.list_accounts()]


@router.post("/admin/users", status_code=201)
def create_user(request: Request, body: NewUser) -> dict[str, Any]:
    """Create a user."""
    billing, _ = _admin(request)
    billing.accounts.create_user(body.name, body.tier, is_admin=body.admin)
    return {"name": body.name}


@router.put("/admin/users/{name}/tier")
def set_tier(request: Request, name: str, body: TierBody) -> dict[str, Any]:
    """Set a user's tier."""
    billing, _ = _admin(request)
    billing.accounts.set_tier(name, body.tier)
    return {"name": name, "tier": body.tier}


@router.post("/admin/users/{name}/tokens", status_code=201)
def issue_token(request: Request, name: str, body: TokenBody | None = None) -> dict[str, Any]:
    """Issue a token (for a server admin, or a user for themselves); the secret is in this answer only."""
    billing = _billing(request)
    caller = caller_of(request)
    if not (caller.is_admin or caller.name == name):
        raise Forbidden("You cannot issue tokens for another user")
    tok = billing.accounts.issue_token(name, body.label if body else "")
    return {"token_id": tok.token_id, "user": tok.user, "token": tok.token}


@router.delete("/admin/tokens/{token_id}")
def revoke_token(request: Request, token_id: str) -> dict[str, Any]:
    """Revoke a token (a server admin, or its owner)."""
    billing = _billing(request)
    caller = caller_of(request)
    if not (caller.is_admin or billing.accounts.token_owner(token_id) == caller.name):
        raise Forbidden("You cannot revoke this token")
    billing.accounts.revoke_token(token_id)
    return {"token_id": token_id, "revoked": True}


@router.post("/admin/orgs", status_code=201)
def create_org(request: Request, body: NewOrg) -> dict[str, Any]:
    """Create an organization."""
    billing, _ = _admin(request)
    billing.accounts.create_org(
        body.name,
        seats=body.seats,
        plan=body.plan,
        enterprise=body.enterprise,
        spending_limit_nanousd=body.spending_limit_nanousd,
    )
    return {"name": body.name}


@router.put("/admin/orgs/{org}/plan")
def set_plan(request: Request, org: str, body: PlanBody) -> dict[str, Any]:
    """Change an organization's plan or seats."""
    billing, _ = _admin(request)
    billing.accounts.set_plan(org, plan=body.plan, seats=body.seats)
    return {"name": org}


@router.put("/admin/orgs/{org}/members/{user}")
def add_member(request: Request, org: str, user: str, body: MemberBody | None = None) -> dict[str, Any]:
    """Add a member (or change their admin flag)."""
    admin = bool(body and body.admin)
    _manager(request, org).accounts.add_member(org, user, admin=admin)
    return {"org": org, "user": user, "admin": admin}


@router.delete("/admin/orgs/{org}/members/{user}")
def remove_member(request: Request, org: str, user: str) -> dict[str, Any]:
    """Remove a member."""
    _manager(request, org).accounts.remove_member(org, user)
    return {"org": org, "user": user, "removed": True}


@router.put("/admin/accounts/{name}/spending-limit")
def set_spending_limit(request: Request, name: str, body: LimitBody) -> dict[str, Any]:
    """Set or clear an account's monthly pay-as-you-go limit."""
    _manager(request, name).accounts.set_spending_limit(name, body.spending_limit_nanousd)
    return {"name": name, "spending_limit_nanousd": body.spending_limit_nanousd}


@router.put("/admin/orgs/{org}/disabled-models/{model_id:path}")
def disable_model(request: Request, org: str, model_id: str) -> dict[str, Any]:
    """Refuse a model for requests billed to the organization."""
    _manager(request, org).accounts.disable_model(org, model_id)
    return {"org": org, "model_id": model_id, "disabled": True}


@router.delete("/admin/orgs/{org}/disabled-models/{model_id:path}")
def enable_model(request: Request, org: str, model_id: str) -> dict[str, Any]:
    """Allow the model again."""
    _manager(request, org).accounts.enable_model(org, model_id)
    return {"org": org, "model_id": model_id, "disabled": False}
