"""The billing page (GET /billing) in a real headless Chromium, against the real ingress in tokens mode (a real
tiny model in process, SQLite, no Ray): sign-in, the month's figures against GET /billing/usage, the organization
views, the spending limit set through the page and then enforced (402), the CSV, a screenshot kept in
tests/output/billing-page/.

Skipped, with the reason, where Playwright or Chromium is missing (tests/fixtures/browser.py).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest
from fixtures.inprocess import tokens_mode_sentiment

MODEL = "local/tiny-sentiment"


@pytest.fixture(scope="module")
def service(model_store, tmp_path_factory):
    with tokens_mode_sentiment(model_store, tmp_path_factory.mktemp("billing-page")) as served:
        yield served


@pytest.fixture(scope="module")
def shots(artifacts_dir: Path) -> Path:
    path = artifacts_dir / "billing-page"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser, service):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    yield tab
    context.close()


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def infer(base: str, token: str, bill_to: str | None = None) -> httpx.Response:
    headers = {**h(token), **({"X-HF-Bill-To": bill_to} if bill_to else {})}
    return httpx.post(f"{base}/models/{MODEL}", json={"inputs": "I love it"}, headers=headers, timeout=60)


def api_usage(base: str, token: str, **params: str) -> dict:
    r = httpx.get(f"{base}/billing/usage", params=params, headers=h(token), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def sign_in(page, base: str, token: str, account: str) -> None:
    """Sign in with the keyboard only (focus the token field, type, Enter); wait for `account`'s month."""
    page.goto(f"{base}/billing")
    page.get_by_label("Access token").focus()
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    wait_view(page, account)


def wait_view(page, account: str, month: str | None = None) -> None:
    """Wait until the page shows all of `account`'s month (the report, the settings, the chart)."""
    month = month or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m")
    page.locator(f'#dashboard[data-view="{account} {month}"]').wait_for()


def shown_total(page) -> str:
    total = page.get_by_test_id("month-total")
    total.filter(has_text="$").wait_for()
    return total.inner_text()


def wait_for_total(page, expected: str) -> None:
    page.get_by_test_id("month-total").filter(has_text=expected).wait_for()


def test_sign_in_user_totals_month_picker_and_sign_out(page, service, shots):
    base, core = service
    a = core.billing.accounts
    a.create_user("ann", "pro")
    ann = a.issue_token("ann").token
    for _ in range(3):
        assert infer(base, ann).status_code == 200

    # a wrong token: a message on the page, not a blank page, and nothing kept
    page.goto(f"{base}/billing")
    page.get_by_label("Access token").fill("hfi_not_a_real_token")
    page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    alert.filter(has_text="not accepted").wait_for()
    assert page.evaluate("sessionStorage.length") == 0

    sign_in(page, base, ann, "ann")
    report = api_usage(base, ann)
    assert report["total_nanousd"] > 0 and report["requests"] == 3
    assert shown_total(page) == f"${report['total_usd']}"  # to the nano-dollar: the API's own figure
    assert page.get_by_test_id("month-total").get_attribute("data-nanousd") == str(report["total_nanousd"])
    assert page.locator("#requests").inner_text() == "3"
    assert MODEL in page.locator("#by-model").inner_text()
    assert "cpu-basic" in page.locator("#by-profile").inner_text()
    assert page.locator("#charges tbody tr").count() == 3
    assert page.locator("#chart").get_attribute("src").startswith("blob:")
    assert page.locator("#chart").evaluate("img => img.complete && img.naturalWidth > 0")

    # the token lives in this tab's sessionStorage only: not in the URL, not in a cookie
    assert page.evaluate("sessionStorage.getItem('hfi-billing-token')") == ann
    assert ann not in page.url
    assert page.context.cookies() == []
    # every form control has a label
    unlabeled = page.evaluate(
        "[...document.querySelectorAll('input, select')].filter(e => e.type !== 'checkbox' && e.labels.length === 0)"
        ".map(e => e.id)"
    )
    assert unlabeled == []
    page.screenshot(path=str(shots / "user-month.png"), full_page=True)

    # a past month: nothing charged then, and the page says so from the API
    now = core.billing.now()
    past = (now.replace(day=1) - dt.timedelta(days=1)).strftime("%Y-%m")
    page.get_by_label("Month (UTC)").fill(past)
    page.get_by_role("button", name="Show").click()
    wait_view(page, "ann", past)
    assert shown_total(page) == f"${api_usage(base, ann, month=past)['total_usd']}" == "$0.000000000"

    # 400 % zoom of a 1280 px window: 320 CSS px wide; the page reflows, nothing runs off to the side
    page.set_viewport_size({"width": 320, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.screenshot(path=str(shots / "user-month-400-percent.png"), full_page=True)

    page.get_by_role("button", name="Sign out").click()
    page.locator("#sign-in").wait_for(state="visible")
    assert page.evaluate("sessionStorage.getItem('hfi-billing-token')") is None


def test_org_admin_and_member_views(page, browser, service, shots):
    base, core = service
    a = core.billing.accounts
    a.create_user("oli", "pro")
    a.create_user("max", "pro")
    a.create_org("orbit", seats=2, enterprise=True)
    a.add_member("orbit", "oli", admin=True)
    a.add_member("orbit", "max")
    oli, mx = a.issue_token("oli").token, a.issue_token("max").token
    for token in (oli, mx, mx):
        assert infer(base, token, bill_to="orbit").status_code == 200

    sign_in(page, base, oli, "oli")
    page.get_by_label("Account", exact=True).select_option("orbit")
    wait_view(page, "orbit")
    org = api_usage(base, oli, account="orbit")
    assert org["requests"] == 3
    wait_for_total(page, f"${org['total_usd']}")
    assert shown_total(page) == f"${org['total_usd']}"
    members = page.locator("#by-member")
    assert members.is_visible() and "oli" in members.inner_text() and "max" in members.inner_text()
    # the admin disables the model through the page: a request billed to the org is refused (403), as the API says
    assert page.get_by_label("Limit in USD").is_enabled()
    box = page.get_by_role("checkbox", name=MODEL)
    box.uncheck()
    page.get_by_role("status").filter(has_text="disabled for orbit").wait_for()
    assert a.disabled_models("orbit") == [MODEL]
    refused = infer(base, mx, bill_to="orbit")
    assert refused.status_code == 403 and "disabled" in refused.json()["error"]
    box.check()
    page.get_by_role("status").filter(has_text="enabled for orbit").wait_for()
    assert a.disabled_models("orbit") == []
    page.screenshot(path=str(shots / "org-admin.png"), full_page=True)

    # a member: the org's totals, no per-member table, controls disabled, and the API refuses them anyway
    context = browser.new_context()
    member = context.new_page()
    try:
        sign_in(member, base, mx, "max")
        member.get_by_label("Account", exact=True).select_option("orbit")
        wait_view(member, "orbit")
        wait_for_total(member, f"${org['total_usd']}")
        assert member.locator("#members-section").is_hidden()
        assert member.locator("#charges tbody tr").count() == 2  # only max's own charges
        assert member.get_by_label("Limit in USD").is_disabled()
        assert member.get_by_role("button", name="Save the limit").is_disabled()
        assert member.get_by_role("checkbox", name=MODEL).is_disabled()
        assert "administrators" in member.locator("#settings-note").inner_text()
        member.screenshot(path=str(shots / "org-member.png"), full_page=True)
    finally:
        context.close()
    r = httpx.put(
        f"{base}/admin/accounts/orbit/spending-limit", json={"spending_limit_nanousd": 0}, headers=h(mx)
    )
    assert r.status_code == 403
    r = httpx.put(f"{base}/admin/orgs/orbit/disabled-models/{MODEL}", headers=h(mx))
    assert r.status_code == 403


def test_spending_limit_set_on_the_page_refuses_with_402(page, service, shots):
    base, core = service
    billing = core.billing
    billing.accounts.create_user("pia", "pro")
    pia = billing.accounts.issue_token("pia").token
    # the month's included credits already spent (straight in the book), so the next requests are pay-as-you-go
    included = billing.settings.user_tiers["pro"].included_nanousd
    billing.settle(billing.admit(pia, None, MODEL, 1, billing.now()), included)
    assert infer(base, pia).status_code == 200  # no limit yet

    sign_in(page, base, pia, "pia")
    page.get_by_label("Limit in USD").fill("abc")
    page.get_by_role("button", name="Save the limit").click()
    page.get_by_role("alert").filter(has_text="amount in USD").wait_for()  # checked before anything is sent
    assert billing.accounts.account_policy("pia").spending_limit_nanousd is None

    page.get_by_label("Limit in USD").fill("0")
    page.get_by_role("button", name="Save the limit").click()
    page.get_by_role("alert").filter(has_text="spending limit is now $0.000000000").wait_for()
    assert billing.accounts.account_policy("pia").spending_limit_nanousd == 0
    assert page.locator("#limit").inner_text() == "$0.000000000"

    refused = infer(base, pia)
    assert refused.status_code == 402
    assert "spending limit" in refused.json()["error"]
    page.get_by_role("button", name="Show").click()
    wait_view(page, "pia")
    report = api_usage(base, pia)
    wait_for_total(page, f"${report['total_usd']}")
    assert page.locator("#payg").inner_text() == "$" + _usd(report["pay_as_you_go_nanousd"])
    page.screenshot(path=str(shots / "spending-limit.png"), full_page=True)

    # removing it (an empty field) lets requests through again
    page.get_by_label("Limit in USD").fill("")
    page.get_by_role("button", name="Save the limit").click()
    page.get_by_role("alert").filter(has_text="removed").wait_for()
    assert infer(base, pia).status_code == 200


def test_csv_download_equals_the_api(page, service, tmp_path):
    base, core = service
    a = core.billing.accounts
    a.create_user("cid", "pro")
    cid = a.issue_token("cid").token
    for _ in range(2):
        assert infer(base, cid).status_code == 200
    sign_in(page, base, cid, "cid")
    with page.expect_download() as info:
        page.get_by_role("button", name="Download CSV").click()
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    month = core.billing.now().strftime("%Y-%m")
    api = httpx.get(
        f"{base}/billing/usage",
        params={"format": "csv", "month": month, "account": "cid", "limit": "10000"},
        headers=h(cid),
    )
    assert api.status_code == 200
    assert saved.read_text() == api.text
    assert len(api.text.splitlines()) == 4  # header, two charges, the total
    assert info.value.suggested_filename == f"billing-cid-{month}.csv"


def test_admin_looks_up_any_account_and_errors_are_messages(page, service, monkeypatch):
    from billing.errors import AccountsUnavailable

    base, core = service
    a = core.billing.accounts
    a.create_user("boss", "pro", is_admin=True)
    a.create_user("dan", "pro")
    boss, dan = a.issue_token("boss").token, a.issue_token("dan").token
    assert infer(base, dan).status_code == 200
    sign_in(page, base, boss, "boss")
    other = page.get_by_label("Another account (administrators)")
    other.fill("dan")
    page.get_by_role("button", name="Show").click()
    wait_view(page, "dan")
    assert shown_total(page) == f"${api_usage(base, dan)['total_usd']}"

    other.fill("nobody")
    page.get_by_role("button", name="Show").click()
    page.get_by_role("alert").filter(has_text="Not found").wait_for()

    # the accounts database down: the API's 503, shown as a message (the page stays usable)
    def down(*args, **kwargs):
        raise AccountsUnavailable("The accounts database cannot be reached. Try again shortly.")

    monkeypatch.setattr(core.billing, "usage", down)
    other.fill("dan")
    page.get_by_role("button", name="Show").click()
    page.get_by_role("alert").filter(has_text="temporarily unavailable").wait_for()
    assert page.locator("#dashboard").is_visible()


def test_page_works_offline_and_refuses_framing(service):
    """Everything the page loads comes from the service: no other host is named in it."""
    base, _ = service
    html = httpx.get(f"{base}/billing")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    csp = html.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "http://" not in html.text and "https://" not in html.text
    for name, kind in (("billing.js", "javascript"), ("billing.css", "css")):
        r = httpx.get(f"{base}/billing/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text
    assert httpx.get(f"{base}/billing/static/other.js").status_code == 404  # only the page's own files


def _usd(nanousd: int) -> str:
    return f"{nanousd // 10**9}.{nanousd % 10**9:09d}"
