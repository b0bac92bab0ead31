"""Start-up and serving with the database down: the ingress (IngressCore + the FastAPI app, the default models in
process, no Ray) on a PostgreSQL URL whose port is closed, in open mode and in tokens mode.

The service constructs without touching the database; /health answers 200 and says the database is unavailable;
open mode serves and spools the charges; tokens mode answers admission with 503 and Retry-After. The lazy
migrations' back-off and the health probe's cache are checked with a hand-moved clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event
from sqlalchemy.exc import OperationalError

from billing.db import DatabaseDown, LazyMigrations
from metering.service import LEDGER
from serving.config import Settings
from serving.errors import DEFAULT_RETRY_AFTER_S, error_response
from serving.health import OK, UNAVAILABLE, DatabaseProbe
from serving.http import create_app
from serving.ingress import IngressCore

# Nothing listens on port 1: every connection is refused at once (connect_timeout bounds it anyway).
DOWN_URL = "postgresql+psycopg://x@127.0.0.1:1/x?connect_timeout=2"
CLS = "/models/local/tiny-sentiment"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def count_connects(engine) -> list[int]:
    """A one-item list counting the engine's attempts to open a database connection."""
    attempts = [0]

    @event.listens_for(engine, "do_connect")
    def _attempt(*_args) -> None:
        attempts[0] += 1

    return attempts


def down_core(model_store: Path, backend, tmp_path: Path, mode: str) -> IngressCore:
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "metering": {"database_url": DOWN_URL, "spool_dir": str(tmp_path / "spool")},
            "billing": {"mode": mode},
        },
        env={},
    )
    return IngressCore(settings, backend)  # must not raise: nothing connects at construction


@pytest.fixture
def open_core(model_store, inprocess_backend, tmp_path) -> Iterator[IngressCore]:
    core = down_core(model_store, inprocess_backend, tmp_path, "open")
    yield core
    core.metering.settings.close_timeout_s = 0.1  # the charges cannot drain: do not wait for them
    core.close()


@pytest.fixture
def tokens_core(model_store, inprocess_backend, tmp_path) -> Iterator[IngressCore]:
    core = down_core(model_store, inprocess_backend, tmp_path, "tokens")
    yield core
    core.metering.settings.close_timeout_s = 0.1
    core.close()


def test_open_mode_starts_serves_and_spools_while_the_database_is_down(open_core):
    connects = count_connects(open_core.billing.engine)
    with TestClient(create_app(open_core), raise_server_exceptions=False) as client:
        health = client.get("/health")
        assert health.status_code == 200, health.text
        body = health.json()
        assert (body["status"], body["database"], body["admission"]) == ("degraded", UNAVAILABLE, OK)
        assert body["billing_mode"] == "open" and "local/tiny-sentiment" in body["models"]

        ids = []
        for i in range(3):
            r = client.post(CLS, json={"inputs": f"I like it {i}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-hfi-cost-usd"] and r.headers["x-compute-type"] == "cpu-basic"
            ids.append(r.headers["inference-id"])

        probes = client.app.state.health_probe.probes
        assert connects[0] == probes, "nothing but the health probe tried to reach the database"
        assert not open_core.billing.migrations.done
        pending = open_core.metering.spool.pending(LEDGER)
        assert pending > 0 and client.get("/health").json()["spool_pending_bytes"] >= pending
        spooled = b"".join(p.read_bytes() for p in open_core.metering.spool.files())
        assert all(rid.encode() in spooled for rid in ids), "every charge waits in the spool"

        # Reading the ledger is what fails, and says so: 503 with Retry-After, never a 500.
        usage = client.get("/billing/usage")  # the usage API (GET /usage redirects here)
        assert usage.status_code == 503 and usage.headers["retry-after"].isdigit(), usage.text


def test_tokens_mode_starts_and_admission_answers_503_with_retry_after(tokens_core):
    connects = count_connects(tokens_core.billing.engine)
    with TestClient(create_app(tokens_core), raise_server_exceptions=False) as client:
        body = client.get("/health").json()
        assert (body["status"], body["database"], body["admission"]) == ("degraded", UNAVAILABLE, UNAVAILABLE)
        assert body["billing_mode"] == "tokens"

        # No token: refused before any database work.
        assert client.post(CLS, json={"inputs": "hi"}).status_code == 401
        before = connects[0]
        r = client.post(CLS, json={"inputs": "hi"}, headers={"authorization": "Bearer hfi_someone"})
        assert r.status_code == 503, r.text
        assert r.json()["error_type"] == "overloaded" and "cannot be reached" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        assert "inference-id" not in r.headers, "a refused request is not run"
        assert connects[0] > before, "admission tried to migrate"
        assert tokens_core.metering.spool.pending(LEDGER) == 0, "nothing ran, nothing is charged"

        # The account API says the same (the lazy migrations raise, or are backing off).
        usage = client.get("/billing/usage", headers={"authorization": "Bearer hfi_someone"})
        assert usage.status_code == 503 and int(usage.headers["retry-after"]) >= 1, usage.text
        assert not tokens_core.billing.migrations.done


def test_lazy_migrations_back_off_and_retry_without_hammering(tmp_path):
    """A failed attempt is retried only after the back-off (doubling, capped); then it succeeds once."""
    clock = Clock()
    engine = create_engine(DOWN_URL)
    connects = count_connects(engine)
    lazy = LazyMigrations(engine, backoff_initial_s=0.5, backoff_max_s=2.0, clock_s=clock)
    with pytest.raises(DatabaseDown) as first:
        lazy.ensure()
    assert first.value.retry_after_s == 0.5 and connects[0] >= 1
    attempts = connects[0]
    clock.now_s += 0.4
    with pytest.raises(DatabaseDown) as early:
        lazy.ensure()
    assert early.value.retry_after_s == pytest.approx(0.1) and connects[0] == attempts, "no connection tried"
    waits = []
    for _ in range(4):
        clock.now_s += 5
        with pytest.raises(DatabaseDown) as err:
            lazy.ensure()
        waits.append(err.value.retry_after_s)
    assert waits == [1.0, 2.0, 2.0, 2.0] and connects[0] > attempts
    engine.dispose()

    # The database is back (here: a SQLite file): the next attempt after the back-off migrates, once.
    clock.now_s += 5
    lazy.engine = create_engine(f"sqlite:///{tmp_path / 'back.db'}")
    migrated = count_connects(lazy.engine)
    lazy.ensure()
    assert lazy.done and migrated[0] == 1
    lazy.ensure()
    assert migrated[0] == 1, "done: never again"
    lazy.engine.dispose()


def test_health_probe_is_cached_and_shared():
    asyncio.run(_health_probe_is_cached())


async def _health_probe_is_cached() -> None:
    clock = Clock()
    calls = [0]
    up = [False]

    def check() -> None:
        calls[0] += 1
        if not up[0]:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError())

    probe = DatabaseProbe(check, ttl_s=5.0, clock_s=clock)
    assert [await probe.state() for _ in range(5)] == [UNAVAILABLE] * 5
    assert calls[0] == 1 == probe.probes, "one round trip per ttl, however many health calls"
    up[0] = True
    clock.now_s += 4.9
    assert await probe.state() == UNAVAILABLE and calls[0] == 1  # still cached
    clock.now_s += 0.2
    assert await probe.state() == OK and calls[0] == 2


def test_an_unreachable_database_is_a_503_with_retry_after_not_a_500():
    err = OperationalError("SELECT 1", {}, ConnectionRefusedError("127.0.0.1:5432 secret-host"))
    r = error_response(err)
    assert r.status_code == 503 and r.headers["retry-after"] == str(DEFAULT_RETRY_AFTER_S)
    assert b"secret-host" not in r.body and b"cannot be reached" in r.body


def test_hfi_serve_first_start_in_tokens_mode_with_the_database_down_warns_and_goes_on(capsys, tmp_path):
    from serving.commands import _first_start_tokens

    settings = Settings.load(
        {"metering": {"database_url": DOWN_URL, "spool_dir": str(tmp_path)}, "billing": {"mode": "tokens"}},
        env={},
    )
    _first_start_tokens(settings)  # does not raise: `hfi serve` goes on to start the service
    err = capsys.readouterr().err
    assert "database cannot be reached" in err and "issue-token" in err
