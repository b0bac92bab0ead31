"""`hfi status` and GET /admin/status: in one process (tokens mode, the real ingress and a real tiny model), and
on the session's Ray Serve service, where the replica counts come from Serve and the figures from every
replica's own process."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fixtures.inprocess import tokens_mode_sentiment
from typer.testing import CliRunner

MODEL = "local/tiny-sentiment"


@pytest.fixture(scope="module")
def service(model_store, tmp_path_factory):
    with tokens_mode_sentiment(model_store, tmp_path_factory.mktemp("status")) as served:
        yield served


def h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_status_endpoint_and_command_in_one_process(service):
    from serving.cli import app

    base, core = service
    a = core.billing.accounts
    a.create_user("root", "pro", is_admin=True)
    a.create_user("una", "pro")
    root, una = a.issue_token("root").token, a.issue_token("una").token
    for _ in range(3):
        r = httpx.post(f"{base}/models/{MODEL}", json={"inputs": "fine"}, headers=h(una), timeout=60)
        assert r.status_code == 200
    core.metering.flush()

    assert httpx.get(f"{base}/admin/status").status_code == 401
    assert httpx.get(f"{base}/admin/status", headers=h(una)).status_code == 403
    r = httpx.get(f"{base}/admin/status", headers=h(root), timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["source"] == "in-process" and doc["billing"]["mode"] == "tokens"
    (model,) = doc["models"]
    assert model["model_id"] == MODEL and model["hardware_profile"] == "cpu-basic"
    assert model["replicas"] == {"running": 1, "starting": 0, "target": 1}
    assert model["requests_last_minute"] >= 3 and model["p50_ms"] is not None and model["p50_ms"] > 0
    assert model["requests_per_s"] == round(model["requests_last_minute"] / doc["window_s"], 3)
    assert model["queue"] == 0 and model["price"]["usd_per_hour"]
    ledger_total = sum(c.cost_nanousd for c in core.metering.charges())
    assert doc["spend"]["month_nanousd"] == ledger_total > 0
    assert doc["spend"]["today_nanousd"] <= doc["spend"]["month_nanousd"]
    assert doc["ledger"]["pending_charges"] == 0 and doc["ledger"]["drain_lag_s"] == 0

    runner = CliRunner(env={"COLUMNS": "160"})
    out = runner.invoke(app, ["status", "--url", base, "--token", root, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["models"][0]["model_id"] == MODEL
    table = runner.invoke(app, ["status", "--url", base, "--token", root])
    assert table.exit_code == 0, table.output
    assert MODEL in table.output and "billing mode" in table.output and "tokens" in table.output
    refused = runner.invoke(app, ["status", "--url", base, "--token", una])
    assert refused.exit_code == 1 and "403" in refused.output and "admin token" in refused.output


def test_status_on_ray_serve(hfi_service):
    """Replicas from Serve's controller; each replica's window, queue and spool from its own process."""
    from billing.config import BillingSettings
    from billing.service import BillingService

    billing = BillingService(BillingSettings(), hfi_service.database_url)
    try:
        billing.accounts.create_user("status-admin", "pro", is_admin=True)
        token = billing.accounts.issue_token("status-admin").token
    finally:
        billing.close()
    r = httpx.post(f"{hfi_service.url}/models/{MODEL}", json={"inputs": "fine"}, timeout=120)
    assert r.status_code == 200
    r = httpx.get(f"{hfi_service.url}/admin/status", headers=h(token), timeout=120)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["source"] == "ray-serve" and doc["billing"]["mode"] == "open"
    models = {m["model_id"]: m for m in doc["models"]}
    assert doc["processes"] >= len(models) + 1  # every model's replica and the router answered
    for m in models.values():
        assert m["replicas"]["running"] >= 1 and m["replicas"]["target"] >= 1, m
        assert m["in_flight"] is not None and m["in_flight"] >= 0
    assert models[MODEL]["requests_last_minute"] >= 1 and models[MODEL]["p50_ms"] is not None
    assert doc["router"]["running"] >= 1
    assert doc["spend"]["month_requests"] >= 0 and "pending_charges" in doc["ledger"]
    # `hfi serve` runs a node drainer beside the replicas: each serving process leaves delivery to it
    deadline = time.monotonic() + 30
    while doc["ledger"]["node_drainer_processes"] < doc["processes"] and time.monotonic() < deadline:
        time.sleep(0.5)
        doc = httpx.get(f"{hfi_service.url}/admin/status", headers=h(token), timeout=120).json()
    assert doc["ledger"]["node_drainer_processes"] == doc["processes"], doc["ledger"]
