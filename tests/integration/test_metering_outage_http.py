"""The database outage through the HTTP layer: the ingress's own code path (IngressCore + the FastAPI app) over
the default models in process, its ledger on a real PostgreSQL server that is stopped mid-run and started again.

Requests keep succeeding with their charge in the headers while the database is down (the charges wait in the
spool); once it is back, every charge arrives in the ledger exactly once, with the cost its response showed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures.postgres import PostgresServer

from core.money import usd_str
from metering.ledger import Ledger
from metering.records import STATUS_OK
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore

EMB = "/models/sentence-transformers/all-MiniLM-L6-v2"
CLS = "/models/local/tiny-sentiment"
SECRET = "outage-provider-secret"
AUTH = {"authorization": f"Bearer {SECRET}"}


@pytest.fixture
def pg_core(
    postgres_db_url: str, model_store: Path, inprocess_backend, tmp_path: Path
) -> Iterator[IngressCore]:
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "metering": {
                "database_url": postgres_db_url,
                "spool_dir": str(tmp_path / "spool"),
                "provider_secret": SECRET,
                "drain_interval_s": 0.05,
                "retry_initial_s": 0.05,
                "retry_max_s": 0.5,
            },
        },
        env={},
    )
    core = IngressCore(settings, inprocess_backend)  # billing migrates on the same database here
    yield core
    core.close()


def request(client: TestClient, i: int) -> tuple[str, dict[str, str]]:
    """One small request (classification or embedding, alternating); its inference id and headers."""
    if i % 2:
        r = client.post(EMB, json={"inputs": f"sentence number {i}"})
    else:
        r = client.post(CLS, json={"inputs": f"I like number {i}"})
    assert r.status_code == 200, r.text
    assert r.headers["x-compute-type"] == "cpu-basic"
    assert r.headers["x-compute-time"] and r.headers["x-hfi-cost-usd"]
    return r.headers["inference-id"], dict(r.headers)


def test_database_outage_mid_run_requests_succeed_and_every_charge_arrives_once(
    pg_core: IngressCore, postgres_server: PostgresServer, postgres_db_url: str
) -> None:
    sent: dict[str, dict[str, str]] = {}
    with TestClient(create_app(pg_core), raise_server_exceptions=False) as client:
        sent.update(request(client, i) for i in range(6))
        assert pg_core.metering.flush(15), "the ledger took the first charges"

        postgres_server.stop()
        try:
            during = dict(request(client, i) for i in range(6, 18))  # the database is down: no request fails
            body = {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "stream": True,
            }
            stream = client.post("/v1/chat/completions", json=body)
            assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
            during[stream.headers["inference-id"]] = {}  # a stream shows no charge in its headers
            sent.update(during)
            assert not pg_core.metering.flush(0.5), "the charges wait in the spool while the database is down"
            # Reading the ledger is what fails, plainly: 503 with a JSON error, never a wrong answer.
            lookup = client.post("/billing/requests", json={"requestIds": list(during)}, headers=AUTH)
            assert lookup.status_code == 503 and "ledger" in lookup.json()["error"]
            usage = client.get("/billing/usage")  # the usage API (GET /usage redirects here)
            assert usage.status_code == 503, usage.text
        finally:
            postgres_server.start()

        sent.update(request(client, i) for i in range(18, 22))
        assert pg_core.metering.flush(30), (
            "every spooled charge reached the ledger once the database was back"
        )
        lookup = client.post("/billing/requests", json={"requestIds": list(sent)}, headers=AUTH)
        assert lookup.status_code == 200, lookup.text
        looked_up = {a["requestId"]: a["costNanoUsd"] for a in lookup.json()["requests"]}

    ledger = Ledger(postgres_db_url)
    try:
        stored = ledger.charges()
        assert ledger.count() == len(stored)
    finally:
        ledger.close()
    assert len(sent) == 23
    assert sorted(c.request_id for c in stored) == sorted(sent), "each charge exactly once, none lost"
    for charge in stored:
        assert charge.usage.status == STATUS_OK
        headers = sent[charge.request_id]
        if headers:  # not the stream
            assert headers["x-compute-time"] == charge.compute_time_header
            assert headers["x-hfi-cost-usd"] == usd_str(charge.cost_nanousd)
    assert looked_up == {c.request_id: c.cost_nanousd for c in stored}
