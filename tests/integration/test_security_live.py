"""The front door on the live Serve service (open mode, HAProxy to each model's own application and the router):
both kinds of application refuse a web page's admin requests and answer CORS only on inference routes."""

from __future__ import annotations

import httpx

EVIL = "http://evil.example"


def test_admin_and_usage_refuse_other_origins_and_need_a_token_on_the_live_service(hfi_service):
    base = hfi_service.url
    r = httpx.get(f"{base}/admin/accounts", headers={"origin": EVIL}, timeout=30)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers, r.text
    r = httpx.get(f"{base}/admin/accounts", timeout=30)
    assert r.status_code == 401, r.text  # open mode: no tokenless administrator
    r = httpx.get(f"{base}/usage", headers={"origin": EVIL}, timeout=30)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_cors_on_a_models_own_application_and_the_router(hfi_service):
    base = hfi_service.url
    preflight = {"origin": EVIL, "access-control-request-method": "POST"}
    for path in ("/models/local/tiny-sentiment", "/v1/chat/completions"):
        r = httpx.options(f"{base}{path}", headers=preflight, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", path
    r = httpx.post(
        f"{base}/models/local/tiny-sentiment", json={"inputs": "hi"}, headers={"origin": EVIL}, timeout=60
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
