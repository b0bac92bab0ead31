"""The fault suite through the shared service (Ray Serve, the default models, real HTTP clients, SQLite ledger) at
CI counts: exact charges under load, a model replica and the router killed mid-load, an over-long request id, a
poison record in the spool, clients leaving at random points.

Every check reads the ledger and the provider cost look-up (`POST /billing/requests`), never the response headers
alone. The scenarios are benchmarks/fault_suite.py's, which runs them at larger counts (see benchmarks/README.md);
each returns its reconciliation and the list of what went wrong, and a test fails on any item of that list.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from core.money import usd_str
from metering.records import STATUS_CLIENT_DISCONNECTED

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "fault_suite.py"
_spec = importlib.util.spec_from_file_location("fault_suite", _PATH)
fs = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("fault_suite", fs)  # its dataclasses look their module up
_spec.loader.exec_module(fs)

CLIENTS = 64
EXACT_REQUESTS = 1000
KILL_REQUESTS = 400
KILL_CLIENTS = 32
LEAVE_REQUESTS = 40
LEAVE_CLIENTS = 8
SEED = 11


def assert_clean(result) -> None:
    assert not result.problems, f"{result.name}:\n" + "\n".join(result.problems[:40])


@pytest.fixture(scope="module")
def service(hfi_service):
    return fs.Target(
        hfi_service.url,
        hfi_service.database_url,
        hfi_service.provider_secret,
        spool_dir=hfi_service.spool_dir,
    )


def test_n_requests_at_c_clients_give_exactly_n_charges_and_exact_sums(service) -> None:
    result = fs.exact_counts(service, EXACT_REQUESTS, CLIENTS)
    assert_clean(result)
    rec = result.recs["service"]
    assert rec.sent == rec.answered == rec.charges == EXACT_REQUESTS
    assert rec.charged_by_status == {"ok": EXACT_REQUESTS}
    # Three sums of the same charges, to the nano-dollar: the look-up's, the ledger's, the headers'.
    assert rec.lookup_total_nanousd == rec.ledger_total_nanousd >= EXACT_REQUESTS  # at least 1 nano-USD each
    assert Decimal(rec.headers_total_usd) == Decimal(usd_str(rec.ledger_total_nanousd))


@pytest.fixture(scope="module")
def model_killed(service):
    """A poison record left in the spool directory by an orphan, then a model replica SIGKILLed mid-load: its
    successor adopts the dead replica's spool and the orphan at start-up."""
    prefix = fs.new_prefix("poison")
    records = fs.poison_records(prefix)
    orphan = fs.inject_orphan_spool(service.spool_dir, records)
    app = fs.model_app(fs.CLS_ID)
    killed = fs.kill_scenario(service, app, app, KILL_REQUESTS, KILL_CLIENTS, router_dies=False)
    return killed, fs.poison_outcome(service, prefix, records, orphan)


@pytest.fixture(scope="module")
def router_killed(service):
    """The router (ingress) replica SIGKILLed mid-load; Serve starts another, which adopts the dead one's spool."""
    from serving.app import INGRESS_APP

    return fs.kill_scenario(
        service,
        INGRESS_APP,
        "ingress",
        KILL_REQUESTS,
        KILL_CLIENTS,
        router_dies=True,
    )


def test_a_model_replica_killed_mid_load_loses_and_doubles_no_charge(model_killed) -> None:
    """Every answered request has its one charge; a routed request whose replica died was retried (200) or is a
    503 with Retry-After; only the model's own route (its process held the connection) may see it cut or get
    hfi-haproxy's 503 (see test_no_500_when_a_replica_dies_under_a_request)."""
    killed, _ = model_killed
    assert_clean(killed)
    rec = killed.recs["service"]
    assert rec.answered >= KILL_REQUESTS // 2, rec.outcomes
    assert killed.notes["answered_after_kill"] > 0 and killed.notes["new_pid"] != killed.notes["killed_pid"]
    assert killed.notes["spool_adopted"]


def test_a_poison_record_in_the_spool_is_dead_lettered_and_the_drain_goes_on(model_killed) -> None:
    """The orphaned file's good records, before and after the poison, are charged; the poison is kept in
    metering_dead_letters; and every charge the kill scenario made after it arrived (checked above)."""
    _, poison = model_killed
    assert_clean(poison)
    assert poison.notes["charged"] == 2 and len(poison.notes["dead_letters"]) == 1


def test_the_router_killed_mid_load_its_successor_adopts_the_spool(router_killed) -> None:
    """SIGKILL the router (ingress) replica mid-load: routed requests in flight may lose their connection, the
    model's own routes are untouched, every answered request is charged once (the charges in the dead router's
    spool arrive through its successor)."""
    assert_clean(router_killed)
    rec = router_killed.recs["service"]
    assert rec.answered >= KILL_REQUESTS // 2, rec.outcomes
    assert router_killed.notes["spool_adopted"] and router_killed.notes["answered_after_kill"] > 0


def test_no_500_when_a_replica_dies_under_a_request(model_killed, router_killed) -> None:
    """A request in flight when its process dies ends as a 503 with Retry-After (hfi-haproxy answers for HAProxy
    and for Serve's proxy: serving/haproxy_launcher.py) or a lost connection, never a 500."""
    killed, _ = model_killed
    assert (killed.notes["proxy_500"], router_killed.notes["proxy_500"]) == (0, 0)


def test_a_plain_request_left_on_its_own_route_stops_and_is_charged_what_ran(service) -> None:
    """One hop (HAProxy to the model's own replica): nobody but the replica sees the client leave. A long image
    request (50 steps at 256x256) whose client closes its socket after a second stops at its next step and is
    charged `client_disconnected`, not run to the end and charged as answered."""
    import socket
    import time
    from urllib.parse import urlsplit

    tag = fs.new_prefix("left-plain") + "0"
    body = json.dumps(
        {"inputs": "a long one", "parameters": {"width": 256, "height": 256, "num_inference_steps": 50}}
    ).encode()
    url = urlsplit(service.url)
    head = (
        f"POST {service.model(fs.FLUX_ID)} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"X-Request-Id: {tag}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(1.0)
    view = fs.LedgerView(service.database_url)
    try:
        deadline = time.monotonic() + 180
        while not (found := view.charges(tag)) and time.monotonic() < deadline:
            time.sleep(0.25)
    finally:
        view.close()
    assert len(found) == 1, found
    assert found[0].usage.status == STATUS_CLIENT_DISCONNECTED, found[0]
    assert found[0].usage.compute_ns > 0 and found[0].cost_nanousd > 0, found[0]


def test_an_over_long_request_id_is_a_400_and_charges_nothing(service) -> None:
    result = fs.long_request_id(service)
    assert_clean(result)
    assert result.recs["service"].outcomes == {"400": 2, "200": 1}


def test_clients_that_leave_at_random_points_are_charged_once_for_what_ran(service) -> None:
    """Images, chat (streamed or not, routed or on the model's own route) and classification, each client leaving
    at a random point: charged at most once, as ok or client_disconnected; a stream left after a token always;
    a request refused before compute never."""
    result = fs.disconnect_scenario(service, LEAVE_REQUESTS, LEAVE_CLIENTS, SEED)
    assert_clean(result)
    rec = result.recs["service"]
    assert result.notes["streams_left_after_a_token"] >= 1
    assert rec.charged_by_status.get(STATUS_CLIENT_DISCONNECTED, 0) >= 1, rec.charged_by_status
    assert rec.outcomes.get("left", 0) >= LEAVE_REQUESTS // 2, rec.outcomes
