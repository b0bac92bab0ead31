"""The spool's disk fails under a serving process (the real ingress and tiny classifier in process, tokens mode,
over HTTP, driven by the real `huggingface_hub.InferenceClient`): the request whose charge the disk refused is
answered and its charge held; the next ones get 503 with Retry-After and run nothing; /health says why; once the
disk takes writes again, the held charge reaches the ledger and requests run again. Every answered request is
charged once, and no refused one is."""

from __future__ import annotations

import time

import httpx
import pytest
from fixtures.full_disk import bad_disk
from fixtures.inprocess import tokens_mode_sentiment
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from typer.testing import CliRunner

import metering.service as service_module
from metering.ledger import Ledger
from serving.cli import app

MODEL = "local/tiny-sentiment"


def ledger_ids(core) -> set[str]:
    ledger = Ledger(core.metering.settings.resolved_database_url())
    try:
        return {c.request_id for c in ledger.charges()}
    finally:
        ledger.close()


def wait_for(check, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_failing_spool_disk_holds_the_charge_and_refuses_until_it_is_back(
    model_store, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "UNSPOOLED_RETRY_S", 0.2)
    with tokens_mode_sentiment(model_store, tmp_path) as (base, core):
        accounts = core.billing.accounts
        accounts.create_user("ann", "pro")
        accounts.create_user("root", "pro", is_admin=True)
        token, root = accounts.issue_token("ann").token, accounts.issue_token("root").token
        url = f"{base}/models/{MODEL}"
        headers = {"authorization": f"Bearer {token}"}
        client = InferenceClient(base_url=url, api_key=token)

        def post() -> httpx.Response:
            return httpx.post(url, json={"inputs": "I love it"}, headers=headers, timeout=30)

        answered = [post()]
        assert answered[0].status_code == 200
        with bad_disk(monkeypatch, core.metering.settings.resolved_spool_dir(), "failing") as disk:
            held = post()  # it ran: answered, its charge held in memory
            assert held.status_code == 200 and float(held.headers["x-hfi-cost-usd"]) > 0
            answered.append(held)
            assert core.metering.unspooled_charges == 1
            with pytest.raises(HfHubHTTPError) as refused:
                client.text_classification("I love it")
            response = refused.value.response
            assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
            assert "cannot record charges" in response.json()["error"]
            health = httpx.get(f"{base}/health", timeout=10).json()
            assert health["status"] == "degraded" and health["admission"] == "unavailable"
            assert health["unspooled_charges"] == 1
            # the model's own health, as its replica answers it (it meters its own requests)
            model_health = httpx.get(f"{url}/health", headers=headers, timeout=10).json()
            assert model_health == {"status": "degraded", "model": MODEL, "unspooled_charges": 1}
            status = httpx.get(
                f"{base}/admin/status", headers={"authorization": f"Bearer {root}"}, timeout=60
            )
            assert status.json()["ledger"]["unspooled_charges"] == 1
            shown = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["status", "--url", base, "--token", root])
            assert shown.exit_code == 0 and "NOT ON DISK" in shown.output, shown.output
            assert [post().status_code for _ in range(3)] == [503, 503, 503]
            assert disk.refused >= 2  # the held charge was offered to the disk again
            disk.heal()
            assert wait_for(lambda: core.metering.unspooled_charges == 0)
        assert httpx.get(f"{base}/health", timeout=10).json()["admission"] == "ok"
        out = client.text_classification("I love it")  # serving again
        assert out and out[0].label
        answered.append(post())
        assert answered[-1].status_code == 200
        ids = {r.headers["inference-id"] for r in answered}
        assert core.metering.flush(20)
        in_ledger = ledger_ids(core)
        assert ids <= in_ledger and len(in_ledger) == len(ids) + 1  # + the client's last call: no refused one
