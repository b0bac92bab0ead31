"""The billing page: GET /billing, its own script and style sheet, and the small reads it needs.

The page is static HTML with a script served by the service itself (no CDN: it works offline). The script keeps
the caller's token in the tab's sessionStorage and sends it as `Authorization: Bearer` to the same APIs any
client uses (`GET /billing/usage`, the admin API for the spending limit and the disabled models), so the page
has exactly their rules and errors; no cookie carries it, so another site cannot ride it.

Its own routes here:
- `GET /billing/me`: who the token is, the accounts it can look at (its own and its organizations), the
  catalog's models, the current month;
- `GET /billing/account?name=`: one account's settings (spending limit, disabled models, whether the caller may
  change them, the members for those who manage it);
- `GET /billing/chart.svg?account=&month=`: the month's spend per UTC day as an SVG drawn here, from the
  `by_day` of the usage report (the script shows it as an image: an image runs no script).
"""

from __future__ import annotations

from importlib import resources
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from billing.accounts import Caller
from billing.errors import Forbidden, InvalidRequest, NotFound
from billing.service import BillingService
from core.money import usd_str
from serving.routes.accounts import caller_of

router = APIRouter()

STATIC = {  # file name -> media type: only these are served
    "billing.js": "text/javascript; charset=utf-8",
    "billing.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere, runs no inline script, and may not be framed.
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _static(name: str) -> bytes:
    return resources.files("serving").joinpath("static", "billing", name).read_bytes()


def _billing(request: Request) -> BillingService:
    return request.app.state.billing


@router.get("/billing", include_in_schema=False)
def page() -> Response:
    """The billing page (HTML)."""
    return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/billing/", include_in_schema=False)
def page_slash() -> Response:
    # Relative, so that it holds under any mount point: the page's own links are relative to /billing.
    return RedirectResponse("../billing", status_code=308)


@router.get("/billing/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in STATIC:
        raise NotFound(f"no static file {name!r}")
    headers = {"x-content-type-options": "nosniff", "cache-control": "no-cache"}
    return Response(_static(name), media_type=STATIC[name], headers=headers)


def _is_user(billing: BillingService, caller: Caller) -> bool:
    """Whether the caller is a user account (not the admin secret, not open mode's local account)."""
    if billing.settings.mode == "open" and caller.name == billing.settings.local_account:
        return False
    return not caller.name.startswith("(")  # the admin secret's caller is "(admin)": no account name can be


@router.get("/billing/me")
def me(request: Request) -> dict[str, Any]:
    """The caller, the accounts the page offers them, the catalog's models and the current month (UTC)."""
    billing = _billing(request)
    caller = caller_of(request)
    accounts: list[dict[str, Any]] = []
    if billing.settings.mode == "open" and caller.name == billing.settings.local_account:
        accounts.append({"name": caller.name, "kind": "user", "admin": True})
    elif _is_user(billing, caller):
        accounts.append({"name": caller.name, "kind": "user", "admin": True})
        accounts += [
            {"name": org, "kind": "org", "admin": admin}
            for org, admin in billing.accounts.memberships(caller.name)
        ]
    core = request.app.state.core
    return {
        "name": caller.name,
        "is_admin": caller.is_admin,
        "mode": billing.settings.mode,
        "accounts": accounts,
        "models": [m.id for m in core.catalog.models],
        "month": billing.now().strftime("%Y-%m"),
    }


@router.get("/billing/account")
def account(request: Request, name: str | None = None) -> dict[str, Any]:
    """One account's settings as the caller may see them (its members and anyone who manages it)."""
    billing = _billing(request)
    caller = caller_of(request)
    if not name:
        raise InvalidRequest("name: give an account name")
    if billing.settings.mode == "open" and name == billing.settings.local_account:
        return {
            "name": name,
            "kind": "user",
            "plan": "open",
            "spending_limit_nanousd": None,
            "can_manage": False,
            "note": "Open mode: nothing is enforced, there is no limit to set.",
        }
    accounts = billing.accounts
    kind = accounts.account_kind(name)
    manages = billing.can_manage(caller, name)
    if not manages and not (kind == "org" and caller.name in accounts.org_members(name)):
        raise Forbidden(f"You cannot see the account {name!r}")
    policy = accounts.account_policy(name)
    info: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "plan": policy.policy_name,
        "pay_as_you_go": policy.pay_as_you_go,
        "included_credits_nanousd": policy.included_nanousd,
        "spending_limit_nanousd": policy.spending_limit_nanousd,
        "can_manage": manages,
    }
    if kind == "org":
        info["disabled_models"] = accounts.disabled_models(name)
    return info


@router.get("/billing/chart.svg")
def chart(request: Request, account: str | None = None, month: str | None = None) -> Response:
    """The month's spend per UTC day as an SVG bar chart (the same report as GET /billing/usage)."""
    report = _billing(request).usage(caller_of(request), account, month, limit=1)
    who = report["account"] or "every account"
    svg = daily_chart_svg(report["by_day"], f"Daily spend of {who}, {report['month']} (UTC)")
    return Response(svg, media_type="image/svg+xml", headers={"x-content-type-options": "nosniff"})


def _label(nanousd: int) -> str:
    """A short USD label for an axis (the exact amounts are in the tables)."""
    text = usd_str(nanousd).rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def daily_chart_svg(by_day: list[dict[str, Any]], title: str, width: int = 720, height: int = 260) -> str:
    """A bar per day; each bar's <title> gives its day and exact amount. Pure: no I/O."""
    left, right, top, bottom = 100, 12, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [int(d["cost_nanousd"]) for d in by_day]
    peak = max(values, default=0)
    n = max(1, len(values))
    step = plot_w / n
    total = sum(values)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="chart-title chart-desc" font-family="system-ui, sans-serif" font-size="12">',
        f'<title id="chart-title">{escape(title)}</title>',
        f'<desc id="chart-desc">{len(values)} days; total {escape(usd_str(total))} USD; highest day '
        f"{escape(usd_str(peak))} USD.</desc>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for i in range(5):  # horizontal grid lines and their labels, bottom to top
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="#d0d7de" stroke-width="1"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#24292f">'
            f"{escape(_label(peak * i // 4))}</text>"
        )
    for i, (day, value) in enumerate(zip(by_day, values, strict=True)):
        bar_h = 0.0 if peak == 0 else plot_h * value / peak
        x = left + i * step + step * 0.15
        y = top + plot_h - bar_h
        label = f"{day['day']}: {usd_str(value)} USD"
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{step * 0.7:.1f}" height="{bar_h:.1f}" fill="#0b5cad">'
            f"<title>{escape(label)}</title></rect>"
        )
        if i % 5 == 0 or i == len(values) - 1:
            parts.append(
                f'<text x="{x + step * 0.35:.1f}" y="{height - bottom + 16}" text-anchor="middle" '
                f'fill="#24292f">{escape(str(day["day"])[-2:])}</text>'
            )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" fill="#24292f">'
        f"Day of the month (UTC)</text>"
    )
    parts.append(
        f'<text x="{left}" y="16" fill="#24292f" data-total={quoteattr(str(total))}>USD per day</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)
