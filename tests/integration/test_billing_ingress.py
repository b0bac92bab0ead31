"""Billing through the real ingress (serving's IngressCore and routes, a real tiny model in process, no Ray),
served by uvicorn on 127.0.0.1 and driven by the real `huggingface_hub.InferenceClient` with `bill_to=`.

Checks what only the whole path shows: refused requests never reach compute or the ledger, the charge lands on
the billed organization, and billing's settled costs equal the metering ledger's charges request by request.
"""

from __future__ import annotations

import time
import warnings

import pytest
from fixtures.inprocess import tokens_mode_sentiment
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

MODEL = "local/tiny-sentiment"


@pytest.fixture(scope="module")
def service(model_store, tmp_path_factory):
    with tokens_mode_sentiment(model_store, tmp_path_factory.mktemp("billing-ingress")) as served:
        yield served


def _client(base: str, token: str | None, bill_to: str | None = None) -> InferenceClient:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bill_to with a key that does not start with hf_
        return InferenceClient(base_url=f"{base}/models/{MODEL}", api_key=token, bill_to=bill_to)


def _ledger_count(core) -> int:
    from metering.ledger import Ledger

    ledger = Ledger(core.billing.database_url)
    try:
        return ledger.count()
    finally:
        ledger.close()


def _wait_for_ledger(core, n: int) -> int:
    deadline = time.monotonic() + 20  # the spool drains in the background
    while time.monotonic() < deadline:
        count = _ledger_count(core)
        if count >= n:
            return count
        time.sleep(0.05)
    return _ledger_count(core)


def test_bill_to_and_refusals_through_the_ingress(service):
    base, core = service
    billing = core.billing
    a = billing.accounts
    a.create_user("ann", "pro")
    a.create_user("eve", "pro")
    a.create_org("acme", seats=1, enterprise=True)
    a.add_member("acme", "ann", admin=True)
    ann, eve = a.issue_token("ann").token, a.issue_token("eve").token

    out = _client(base, ann, bill_to="acme").text_classification("I love it")
    assert out and out[0].label
    assert _wait_for_ledger(core, 1) == 1

    refusals = [
        (_client(base, None), 401),
        (_client(base, "hf_a_token_found_on_disk"), 401),
        (_client(base, eve, bill_to="acme"), 403),  # not a member
    ]
    for client, status in refusals:
        with pytest.raises(HfHubHTTPError) as err:
            client.text_classification("I love it")
        assert err.value.response.status_code == status
        assert err.value.response.headers["content-type"] == "application/json"
    a.disable_model("acme", MODEL)
    with pytest.raises(HfHubHTTPError) as err:
        _client(base, ann, bill_to="acme").text_classification("I love it")
    assert err.value.response.status_code == 403 and "disabled" in err.value.response.json()["error"]
    a.enable_model("acme", MODEL)
    time.sleep(0.3)
    assert _ledger_count(core) == 1  # no refused request was charged

    month = billing.now().strftime("%Y-%m")
    report = billing.usage(billing.authenticate(ann), "acme", month)
    assert report["requests"] == 1 and report["by_member"][0]["user"] == "ann"
    assert report["charges"][0]["hardware_profile"] == "cpu-basic"
    assert (
        billing.usage(billing.authenticate(ann), None, month)["requests"] == 0
    )  # ann's own account untouched
    rec = billing.reconcile(month)
    assert rec.ok and rec.matched == 1, rec


def test_free_tier_runs_out_with_402_through_the_ingress(service):
    base, core = service
    billing = core.billing
    billing.accounts.create_user("fay", "free")
    fay = billing.accounts.issue_token("fay").token
    month = billing.now().strftime("%Y-%m")
    # exhaust the credits directly in the book, then one more request must be refused before compute
    cap = billing.settings.user_tiers["free"].included_nanousd
    adm = billing.admit(fay, None, MODEL, 1, billing.now())
    billing.settle(adm, cap)
    before = _ledger_count(core)
    with pytest.raises(HfHubHTTPError) as err:
        _client(base, fay).text_classification("hello")
    assert err.value.response.status_code == 402
    assert "exceeded your monthly included credits" in err.value.response.json()["error"]
    time.sleep(0.3)
    assert _ledger_count(core) == before
    assert billing.usage(billing.authenticate(fay), None, month)["total_nanousd"] == cap
