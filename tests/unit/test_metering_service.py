"""The metering facade on a SQLite ledger: record, flush, reports, cost look-up, price changes, failures."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import uuid
from pathlib import Path

import pytest

from hardware_profiles import load_profiles
from metering.config import MeteringSettings
from metering.errors import InvalidLookup, InvalidUsage
from metering.records import UsageRecord
from metering.service import MeteringService

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def usage(i: int, **kw) -> UsageRecord:
    base = dict(
        request_id=str(uuid.UUID(int=i + 1)),
        started_at=T0,
        model_id="org/m",
        revision="abc",
        task="feature-extraction",
        hardware_profile="nvidia-h100",
        compute_ns=100_000_000 + i * 1_000_000,
    )
    base.update(kw)
    return UsageRecord(**base)


def make_settings(tmp_path: Path, **kw) -> MeteringSettings:
    values = dict(
        database_url=f"sqlite:///{tmp_path}/db/ledger.db",
        spool_dir=str(tmp_path / "spool"),
        drain_interval_s=0.02,
        retry_initial_s=0.01,
        retry_max_s=0.05,
    )
    return MeteringSettings(**{**values, **kw})


@pytest.fixture
def service(tmp_path: Path):
    svc = MeteringService(make_settings(tmp_path), load_profiles())
    yield svc
    svc.close()


def test_record_spools_before_returning_and_drains_to_the_ledger(service: MeteringService) -> None:
    charge = service.record(usage(0))
    assert charge.cost_nanousd == 125_000  # 100 ms at 1/800 $/s
    spooled = service.spool.active_path.read_bytes().decode()  # type: ignore[union-attr]
    assert charge.request_id in spooled
    assert service.flush(10)
    [row] = service.charges()
    assert row == charge


def test_concurrent_records_give_exactly_one_charge_each(service: MeteringService) -> None:
    n_threads, per_thread = 8, 40

    def work(t: int) -> None:
        for k in range(per_thread):
            service.record(usage(t * 1000 + k))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert service.flush(20)
    assert service.ledger.count() == n_threads * per_thread


def test_recording_the_same_request_twice_is_one_charge(service: MeteringService) -> None:
    service.record(usage(7))
    service.record(usage(7))
    assert service.flush(10)
    assert service.ledger.count() == 1


def test_report_totals_are_exact_and_grouped(service: MeteringService) -> None:
    service.record(usage(1, billed_account="acme"))
    service.record(usage(2, billed_account="acme", hardware_profile="cpu-basic"))
    service.record(usage(3, billed_account="acme", started_at=T0 + dt.timedelta(days=1)))
    service.record(usage(4, billed_account="bob"))
    assert service.flush(10)
    report = service.usage_report(dt.date(2026, 3, 1), dt.date(2026, 4, 1), account="acme")
    assert [(r.day.isoformat(), r.hardware_profile, r.requests) for r in report.rows] == [
        ("2026-03-01", "cpu-basic", 1),
        ("2026-03-01", "nvidia-h100", 1),
        ("2026-03-02", "nvidia-h100", 1),
    ]
    charges = service.charges(dt.date(2026, 3, 1), dt.date(2026, 4, 1), account="acme")
    assert report.totals.cost_nanousd == sum(c.cost_nanousd for c in charges)
    assert report.totals.requests == 3
    everyone = service.usage_report()
    assert {r.account for r in everyone.rows} == {"acme", "bob"}
    # the interval is half-open: [since, until)
    assert service.charges(T0, T0 + dt.timedelta(days=1), account="acme")[-1].usage.started_at == T0


def test_price_change_keeps_old_charges_at_their_old_price(tmp_path: Path) -> None:
    profiles = load_profiles(
        extra=[
            {
                "name": "gpu-repriced",
                "prices": [
                    {"effective_from": "2025-01-01", "usd_per_hour": "3.60"},
                    {"effective_from": "2026-03-02", "usd_per_hour": "7.20"},
                ],
            }
        ]
    )
    svc = MeteringService(make_settings(tmp_path), profiles)
    try:
        old = svc.record(usage(1, hardware_profile="gpu-repriced", compute_ns=10**9))
        new = svc.record(
            usage(2, hardware_profile="gpu-repriced", compute_ns=10**9, started_at=T0 + dt.timedelta(days=1))
        )
        assert svc.flush(10)
        stored = {c.request_id: c for c in svc.charges()}
    finally:
        svc.close()
    assert (stored[old.request_id].cost_nanousd, stored[old.request_id].price_usd_per_hour) == (
        1_000_000,
        "3.60",
    )
    assert (stored[new.request_id].cost_nanousd, stored[new.request_id].price_usd_per_hour) == (
        2_000_000,
        "7.20",
    )
    assert stored[new.request_id].price_effective_from == dt.date(2026, 3, 2)


def test_cost_lookup_answers_integers_and_omits_unknown_ids(service: MeteringService) -> None:
    a, b = service.record(usage(1)), service.record(usage(2))
    assert service.flush(10)
    unknown = str(uuid.uuid4())
    answer = service.cost_lookup([b.request_id, unknown, a.request_id, b.request_id])
    assert answer == [
        {"requestId": b.request_id, "costNanoUsd": b.cost_nanousd},
        {"requestId": a.request_id, "costNanoUsd": a.cost_nanousd},
    ]
    assert all(type(x["costNanoUsd"]) is int for x in answer)
    assert service.cost_lookup([]) == []


def test_cost_lookup_sees_charges_not_yet_drained(tmp_path: Path) -> None:
    svc = MeteringService(make_settings(tmp_path, drain_interval_s=60, close_timeout_s=0), load_profiles())
    try:
        svc.consumers[0].stop()  # nothing reaches the ledger
        c = svc.record(usage(9))
        assert svc.cost_lookup([c.request_id]) == [{"requestId": c.request_id, "costNanoUsd": c.cost_nanousd}]
    finally:
        svc.close()


@pytest.mark.parametrize("body", ["abc", [1, 2], None, ["x"] * 1001])
def test_cost_lookup_rejects_bad_bodies_with_400(service: MeteringService, body) -> None:
    with pytest.raises(InvalidLookup) as info:
        service.cost_lookup(body)
    assert info.value.status_code == 400


def test_provider_secret_check(tmp_path: Path) -> None:
    svc = MeteringService(make_settings(tmp_path, provider_secret="s3cret"), load_profiles())
    try:
        assert svc.check_provider_secret("s3cret")
        assert not svc.check_provider_secret("nope")
        assert not svc.check_provider_secret(None)
    finally:
        svc.close()
    open_svc = MeteringService(make_settings(tmp_path, enabled=False), load_profiles())
    assert not open_svc.check_provider_secret("anything")  # no secret configured: the endpoint is off


def test_a_spool_failure_never_fails_the_request(service: MeteringService, monkeypatch, caplog) -> None:
    def broken(_record: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service.spool, "append", broken)
    charge = service.record(usage(5))
    assert charge.cost_nanousd > 0
    assert "could not spool charge" in caplog.text
    assert charge.request_id in caplog.text  # the whole charge is in the log to recover it


def test_invalid_usage_raises_a_typed_error(service: MeteringService) -> None:
    with pytest.raises(InvalidUsage):
        service.record(usage(1, hardware_profile="no-such-profile"))


def test_disabled_metering_prices_but_stores_nothing(tmp_path: Path) -> None:
    svc = MeteringService(make_settings(tmp_path, enabled=False), load_profiles())
    charge = svc.record(usage(0))
    assert charge.compute_time_header == "0.100"
    assert svc.flush(1)
    svc.close()
    assert not (tmp_path / "spool").exists()


def test_record_async_runs_off_the_event_loop(service: MeteringService) -> None:
    async def main() -> list[str]:
        charges = await asyncio.gather(*(service.record_async(usage(i)) for i in range(10)))
        return [c.request_id for c in charges]

    ids = asyncio.run(main())
    assert service.flush(10)
    assert sorted(c.request_id for c in service.charges()) == sorted(ids)


@pytest.mark.parametrize(
    "settings, how",
    [
        ({"spool_inline_sync_below_s": 10.0}, "inline"),  # any disk is quick enough: the loop syncs
        ({"spool_inline_sync_below_s": 0}, "process"),
        ({"spool_inline_sync_below_s": 0, "spool_sync_process": False}, "thread"),
    ],
)
def test_record_async_is_synced_as_configured(tmp_path: Path, settings, how) -> None:
    svc = MeteringService(make_settings(tmp_path, **settings), load_profiles())

    async def main() -> list[str]:
        charges = await asyncio.gather(*(svc.record_async(usage(i)) for i in range(10)))
        return [c.request_id for c in charges]

    ids = asyncio.run(main())
    assert (svc.spool._syncer is not None) == (how == "process")
    assert (svc.spool.inline_syncs == 1) == (how == "inline")  # one sync for the ten, on the loop
    assert svc.flush(10)
    assert sorted(c.request_id for c in svc.charges()) == sorted(ids)
    svc.close()


def test_construction_is_cheap_and_opens_no_database(tmp_path: Path) -> None:
    svc = MeteringService(
        make_settings(tmp_path, database_url="postgresql+psycopg://u@127.0.0.1:1/none"), load_profiles()
    )
    try:
        charge = svc.record(usage(0))  # the database is unreachable: recording still works
        assert charge.cost_nanousd == 125_000
        assert not svc.flush(0.2)
    finally:
        svc.settings = svc.settings.model_copy(update={"close_timeout_s": 0})
        svc.close()
    assert len(list((tmp_path / "spool").glob("*.jsonl"))) == 1  # kept for the next start to replay


def test_default_sqlite_url_expands_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    url = MeteringSettings().resolved_database_url()
    assert url == f"sqlite:///{tmp_path}/.local/share/hfi/ledger.db"
    assert MeteringSettings().resolved_spool_dir() == tmp_path / ".local/share/hfi/spool"
