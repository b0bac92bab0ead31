"""The admission layer over real HTTP, driven by the real `huggingface_hub.InferenceClient` with `bill_to=`.

The server here is uvicorn with serving's error mapping, serving/routes/accounts.py, and a minimal inference route
that does what the ingress must do (admission_for before compute, settle after). The same client calls
against the full service belong with the ingress's end-to-end tests.
"""

from __future__ import annotations

import datetime as dt
import warnings

import httpx
import pytest
from fastapi import FastAPI, Request
from fixtures.net import serve_in_thread
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from billing.config import BillingSettings
from billing.service import BillingService
from serving import errors
from serving.routes.accounts import admission_for, router

COST = 10_000_000  # $0.01 a request


@pytest.fixture
def server(tmp_path):
    billing = BillingService(BillingSettings(mode="tokens"), f"sqlite:///{tmp_path}/c.db")
    app = FastAPI()
    errors.install(app)
    app.include_router(router)
    app.state.billing = billing
    ran: list[str] = []

    @app.post("/models/{model_id:path}")
    async def infer(request: Request, model_id: str):
        adm = await admission_for(request, model_id, COST, dt.datetime.now(dt.timezone.utc))
        try:
            ran.append(model_id)  # "compute"
            vector = [0.5, 0.25]
        except BaseException:
            billing.release(adm)
            raise
        billing.settle(adm, COST, request_id=f"req-{len(ran)}", hardware_profile="cpu-basic")
        return vector

    with serve_in_thread(app) as url:
        yield url, billing, ran
    billing.close()


def _client(base: str, token: str | None, bill_to: str | None = None) -> InferenceClient:
    with warnings.catch_warnings():
        # the client warns that bill_to is for HF billing when the key does not start with hf_; it still sends it
        warnings.simplefilter("ignore", UserWarning)
        return InferenceClient(base_url=f"{base}/models/org/embed", api_key=token, bill_to=bill_to)


def test_bill_to_through_the_python_client(server):
    base, billing, ran = server
    a = billing.accounts
    a.create_user("ann", "free")
    a.create_user("eve", "pro")
    a.create_org("acme", seats=1, enterprise=True, spending_limit_nanousd=0)
    a.add_member("acme", "ann", admin=True)
    a.disable_model("acme", "org/embed")
    ann, eve = a.issue_token("ann").token, a.issue_token("eve").token

    with pytest.raises(HfHubHTTPError) as err:
        _client(base, ann, bill_to="acme").feature_extraction("hi")
    assert err.value.response.status_code == 403 and "disabled" in str(err.value)
    a.enable_model("acme", "org/embed")
    out = _client(base, ann, bill_to="acme").feature_extraction("hi")
    assert list(out) == [0.5, 0.25]
    with pytest.raises(HfHubHTTPError) as err:
        _client(base, eve, bill_to="acme").feature_extraction("hi")  # not a member
    assert err.value.response.status_code == 403
    assert ran == ["org/embed"]  # the refused requests never reached compute

    usage = httpx.get(
        f"{base}/billing/usage", params={"account": "acme"}, headers={"Authorization": f"Bearer {ann}"}
    )
    report = usage.json()
    assert report["total_nanousd"] == COST and report["by_member"][0]["user"] == "ann"
    assert (
        httpx.get(f"{base}/billing/usage", headers={"Authorization": f"Bearer {ann}"}).json()["total_nanousd"]
        == 0
    )


def test_clean_401_and_402_through_the_python_client(server):
    base, billing, ran = server
    billing.accounts.create_user("fay", "free")
    fay = billing.accounts.issue_token("fay").token
    for token in (None, "hf_a_token_the_client_found_on_disk", "hfi_revoked_or_unknown"):
        with pytest.raises(HfHubHTTPError) as err:
            InferenceClient(base_url=f"{base}/models/org/embed", api_key=token).feature_extraction("hi")
        assert err.value.response.status_code == 401
        assert err.value.response.headers["content-type"] == "application/json"
    client = _client(base, fay)
    for _ in range(10):
        client.feature_extraction("hi")
    with pytest.raises(HfHubHTTPError) as err:
        client.feature_extraction("hi")
    assert err.value.response.status_code == 402
    assert "exceeded your monthly included credits" in err.value.response.json()["error"]
    assert len(ran) == 10
