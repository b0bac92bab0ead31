"""A settlement lost on the real ingress path (serving's IngressCore, a real tiny model in process, uvicorn on
127.0.0.1, SQLite ledger) is settled from the metering ledger by billing's sweep.

The ingress reserves with the request's Inference-Id, so the reservation can be matched with its charge even
when settle() never happens (here it raises, as when the client is cut off at that moment).
"""

from __future__ import annotations

import datetime as dt
import time
from decimal import Decimal

import httpx
import pytest
from fixtures.inprocess import tokens_mode_sentiment
from sqlalchemy import select

MODEL = "local/tiny-sentiment"


@pytest.fixture(scope="module")
def service(model_store, tmp_path_factory):
    with tokens_mode_sentiment(model_store, tmp_path_factory.mktemp("billing-lost-settlement")) as served:
        yield served


def _in_ledger(core, request_id: str) -> bool:
    from metering.ledger import Ledger

    deadline = time.monotonic() + 20  # the spool drains in the background
    ledger = Ledger(core.billing.database_url)
    try:
        while time.monotonic() < deadline:
            if ledger.costs([request_id]):
                return True
            time.sleep(0.05)
        return False
    finally:
        ledger.close()


def test_a_lost_settlement_is_settled_from_the_ledger(service, monkeypatch):
    from billing.db import read_session
    from billing.schema import Reservation

    base, core = service
    billing = core.billing
    billing.accounts.create_user("lou", "pro")
    token = billing.accounts.issue_token("lou").token

    def lost(*args, **kwargs):
        raise ConnectionError("the settlement never arrives")

    monkeypatch.setattr(billing, "settle", lost)
    r = httpx.post(
        f"{base}/models/{MODEL}",
        json={"inputs": "I love it"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    monkeypatch.undo()
    assert r.status_code == 200, r.text
    request_id = r.headers["inference-id"]
    cost_nanousd = int(Decimal(r.headers["x-hfi-cost-usd"]) * 10**9)
    assert _in_ledger(core, request_id)

    def reservation():
        with read_session(billing.engine) as s:
            r = Reservation
            columns = (r.state, r.request_id, r.month, r.estimate_nanousd, r.cost_nanousd)
            return s.execute(select(*columns).where(r.account == "lou")).one()

    # Admitted from memory, its row is written when its budget is given back (at most billing.lease_ttl_s later;
    # here, now): open, since its settlement never came.
    billing.spend.return_leases()
    held = reservation()
    assert held.state == "open" and held.request_id == request_id  # the Inference-Id, stored at admission
    month = held.month
    assert billing.spend.committed_nanousd("lou", month) == held.estimate_nanousd
    assert not billing.reconcile(month).ok  # charged in the ledger, not (yet) in billing

    later = billing.now() + dt.timedelta(seconds=billing.settings.settle_grace_s + 1)
    assert billing.spend.sweep(later).settled_from_ledger == 1
    settled = reservation()
    assert settled.state == "settled" and settled.cost_nanousd == cost_nanousd
    assert billing.spend.committed_nanousd("lou", month) == cost_nanousd
    assert billing.reconcile(month).ok
