"""The fault suite's PostgreSQL scenarios at CI counts: the database stopped mid-load, and clients leaving in
tokens mode, with the reservations checked against the ledger.

The shared service's ledger is SQLite and a session has one Ray instance, so these run on two router
applications deployed beside it on the same Ray and Serve (`/fault-open`, open mode; `/fault-tokens`, tokens
mode), each with its own PostgreSQL database and spool directory. They are the router the service itself runs
(`serving.app:build_ingress_app`), calling the service's model replicas by handle: real HTTP, Serve, Ray handles
and models, only the ledger's database differs. The scenarios are benchmarks/fault_suite.py's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from fixtures.postgres import create_database, drop_database

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_suite.py"
_spec = importlib.util.spec_from_file_location("fault_suite", _PATH)
fs = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fault_suite", fs)  # its dataclasses look their module up
_spec.loader.exec_module(fs)

OUTAGE_S = 6
OUTAGE_REQUESTS = 150
CLIENTS = 32
LEAVE_REQUESTS = 32
LEAVE_CLIENTS = 8
SEED = 12
SECRET = "fault-suite-secret"


def assert_clean(result) -> None:
    assert not result.problems, f"{result.name}:\n" + "\n".join(result.problems[:40])


@pytest.fixture(scope="module")
def routers(hfi_service, postgres_server, tmp_path_factory):
    """The two router applications, each on a fresh PostgreSQL database; deleted (spools drained) after."""
    work = tmp_path_factory.mktemp("fault-routers")
    apps, targets = {}, {}
    for name, mode in (("fault-open", "open"), ("fault-tokens", "tokens")):
        db = create_database(postgres_server.url)
        apps[name] = (f"/{name}", fs.router_args(hfi_service.args, db, work / name, SECRET, mode))
        targets[name] = fs.Target(
            hfi_service.url, db, SECRET, prefix=f"/{name}", spool_dir=work / name, name=name
        )
    fs.deploy_routers(hfi_service.args, apps)
    try:
        yield targets
    finally:
        fs.delete_apps(apps)
        if not postgres_server.is_running():
            postgres_server.start()
        for target in targets.values():
            drop_database(target.database_url)


def test_the_database_down_mid_load_loses_nothing(routers, postgres_server) -> None:
    """Open mode answers every request through the outage (the charges wait in the spool; the cost look-up is a
    503 with Retry-After meanwhile); tokens mode answers 503 with Retry-After. Once the database is back every
    answered request has exactly one charge, and every reservation is settled at its charge's cost or released."""
    open_t, tokens_t = routers["fault-open"], routers["fault-tokens"]
    tokens_t.token = fs.create_account(tokens_t.database_url, "fault-outage")
    result = fs.outage_scenario(
        open_t, tokens_t, "fault-outage", postgres_server, OUTAGE_S, OUTAGE_REQUESTS, CLIENTS
    )
    assert_clean(result)
    served, refused = result.recs["fault-open"], result.recs["fault-tokens"]
    assert served.sent == served.answered == served.charges > OUTAGE_REQUESTS // 2
    assert served.ledger_total_nanousd == served.lookup_total_nanousd
    assert refused.outcomes.get("503", 0) >= 1 and refused.answered == refused.charges >= 1, refused.outcomes
    assert result.notes["tokens"]["states"].get("open", 0) == 0
    assert result.notes["answered_after_outage"] > 0


def test_clients_that_leave_in_tokens_mode_leave_no_reservation_open(routers) -> None:
    """Clients leave at random points through the tokens router: charged at most once, and once they are gone no
    reservation is open, the sweep has nothing to repair, settled costs equal the ledger's and the gate."""
    tokens_t = routers["fault-tokens"]
    tokens_t.token = fs.create_account(tokens_t.database_url, "fault-leave")
    result = fs.tokens_disconnect_scenario(tokens_t, "fault-leave", LEAVE_REQUESTS, LEAVE_CLIENTS, SEED)
    assert_clean(result)
    tokens = result.notes["tokens"]
    assert result.notes["still_open"] == 0 and result.notes["sweep"] == {
        "settled_from_ledger": 0,
        "expired": 0,
    }
    assert tokens["states"].get("settled", 0) == result.recs["fault-tokens"].charges >= 1
