"""Starting with the database down, then getting it back, on a real PostgreSQL server: the ingress's own code
path (IngressCore + the FastAPI app, the default models in process, no Ray).

The service starts while the server is stopped; open mode serves and spools the charges; tokens mode answers
admission with 503 and Retry-After. Once the server is started again, with no restart of the service, admission
works, billing's tables are migrated by the first request that needs them, and every spooled charge reaches the
ledger exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures.postgres import PostgresServer

from billing.config import BillingSettings
from billing.service import BillingService
from metering.drain import wait_until
from metering.ledger import Ledger
from serving.config import Settings
from serving.http import create_app
from serving.ingress import IngressCore

CLS = "/models/local/tiny-sentiment"


@pytest.fixture
def down_server(postgres_server: PostgresServer, postgres_db_url: str) -> Iterator[PostgresServer]:
    """The session's server, stopped for the test (its fresh database made first); started again after."""
    postgres_server.stop()
    try:
        yield postgres_server
    finally:
        if not postgres_server.is_running():
            postgres_server.start()


def make_core(url: str, model_store: Path, backend, spool_dir: Path, mode: str) -> IngressCore:
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "metering": {
                "database_url": url,
                "spool_dir": str(spool_dir),
                "drain_interval_s": 0.05,
                "retry_initial_s": 0.05,
                "retry_max_s": 0.5,
            },
            "billing": {"mode": mode, "estimate_compute_s": 1},
        },
        env={},
    )
    return IngressCore(settings, backend)


def ledger_ids(url: str) -> list[str]:
    ledger = Ledger(url)
    try:
        return sorted(c.request_id for c in ledger.charges())
    finally:
        ledger.close()


def test_open_mode_starts_with_the_database_down_and_the_spool_drains_when_it_is_back(
    down_server, postgres_db_url, model_store, inprocess_backend, tmp_path
):
    core = make_core(postgres_db_url, model_store, inprocess_backend, tmp_path / "spool", "open")
    try:
        with TestClient(create_app(core), raise_server_exceptions=False) as client:
            assert client.get("/health").json()["database"] == "unavailable"
            sent = []
            for i in range(4):
                r = client.post(CLS, json={"inputs": f"while down {i}"})
                assert r.status_code == 200, r.text
                sent.append(r.headers["inference-id"])
            assert not core.metering.flush(0.3), "the charges wait in the spool"

            down_server.start()
            r = client.post(CLS, json={"inputs": "after"})
            assert r.status_code == 200, r.text
            sent.append(r.headers["inference-id"])
            assert core.metering.flush(30), "every spooled charge reached the ledger"
        assert ledger_ids(postgres_db_url) == sorted(sent), "each charge once, none lost"
        assert not core.billing.migrations.done, "open mode never needed billing's tables"
    finally:
        core.close()


def test_tokens_mode_answers_503_while_down_and_admits_once_the_database_is_back(
    down_server, postgres_db_url, model_store, inprocess_backend, tmp_path
):
    core = make_core(postgres_db_url, model_store, inprocess_backend, tmp_path / "spool", "tokens")
    try:
        with TestClient(create_app(core), raise_server_exceptions=False) as client:
            health = client.get("/health")
            assert health.status_code == 200 and health.json()["admission"] == "unavailable"
            refused = client.post(CLS, json={"inputs": "hi"}, headers={"authorization": "Bearer hfi_nobody"})
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text

            down_server.start()
            # An operator makes an account meanwhile (its own service migrates the fresh database).
            admin = BillingService(BillingSettings(mode="tokens"), postgres_db_url)
            try:
                admin.accounts.create_user("ann", "pro")
                token = admin.accounts.issue_token("ann").token
            finally:
                admin.close()

            auth = {"authorization": f"Bearer {token}"}
            answers: list[int] = []

            def admitted() -> bool:  # the service retries its migrations after a short back-off
                r = client.post(CLS, json={"inputs": "back"}, headers=auth)
                answers.append(r.status_code)
                if r.status_code == 200:
                    answers.append(r.headers["inference-id"])  # type: ignore[arg-type]
                return r.status_code == 200

            assert wait_until(admitted, timeout_s=30, poll_s=0.2), f"admission works again: {answers}"
            assert set(answers[:-2]) <= {503}, "before that, only 503s"
            assert core.billing.migrations.done
            assert core.metering.flush(30)
            core.billing.spend.flush()  # settlements are written behind the response, in batches: now
        assert ledger_ids(postgres_db_url) == [answers[-1]]
        usage = BillingService(BillingSettings(mode="tokens"), postgres_db_url)
        try:
            caller = usage.authenticate(token)
            assert usage.usage(caller)["total_nanousd"] > 0, "the request was settled on ann's account"
        finally:
            usage.close()
    finally:
        core.close()
