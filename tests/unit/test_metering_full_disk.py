"""A spool whose disk is full or failing: the charge of a request that ran is held in memory and written once the
disk takes it again, and meanwhile the process refuses new requests (503), so that no compute is given away
unrecorded."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fixtures.full_disk import bad_disk

import metering.service as service_module
from hardware_profiles import load_profiles
from metering import metrics
from metering.drain import wait_until
from metering.errors import ChargesNotRecorded
from metering.ledger import Ledger
from metering.service import MeteringService
from tests.unit.test_metering_service import make_settings, usage


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "UNSPOOLED_RETRY_S", 0.05)


def in_ledger(svc: MeteringService, request_ids: list[str]) -> dict[str, int]:
    ledger = Ledger(svc.settings.resolved_database_url())
    try:
        return ledger.costs(request_ids)
    finally:
        ledger.close()


def gauge() -> float:
    return metrics.UNSPOOLED_CHARGES._value.get()


def spool_errors() -> float:
    return metrics.METERING_ERRORS.labels("spool")._value.get()


@pytest.mark.parametrize("way", ["record", "record_async"])
def test_a_charge_the_failing_disk_refused_is_held_then_spooled_once_it_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, way: str
) -> None:
    svc = MeteringService(make_settings(tmp_path), load_profiles())
    try:
        svc.record(usage(0))  # the spool writes
        svc.check_recording()
        errors_before = spool_errors()
        with bad_disk(monkeypatch, svc.settings.resolved_spool_dir(), "failing") as disk:
            if way == "record":
                charges = [svc.record(usage(i)) for i in (1, 2)]
            else:

                async def both():
                    return await asyncio.gather(svc.record_async(usage(1)), svc.record_async(usage(2)))

                charges = asyncio.run(both())
            assert disk.refused >= 1
            assert [c.cost_nanousd > 0 for c in charges] == [True, True]  # the requests are answered, priced
            assert svc.unspooled_charges == 2 and gauge() == 2
            assert spool_errors() == errors_before + 2
            assert "could not spool charge (OSError" in caplog.text
            assert charges[0].request_id in caplog.text  # the log keeps each one whole, to recover it from
            with pytest.raises(ChargesNotRecorded) as refused:
                svc.check_recording()
            assert refused.value.status_code == 503 and refused.value.extra["retry_after_s"] > 0
            assert svc.backlog()["unspooled_charges"] == 2
            tried = disk.refused
            assert wait_until(lambda: disk.refused >= tried + 2, 5)  # it keeps trying the disk meanwhile
            assert svc.unspooled_charges == 2
            disk.heal()
            assert wait_until(lambda: svc.unspooled_charges == 0, 5)
        svc.check_recording()  # serving again
        assert gauge() == 0
        ids = [usage(i).request_id for i in range(3)]
        assert svc.flush(10)
        found = in_ledger(svc, ids)
        assert sorted(found) == sorted(ids)  # each once (the ledger's key), the held ones with their cost
        assert [found[c.request_id] for c in charges] == [c.cost_nanousd for c in charges]
    finally:
        svc.close()


def test_a_full_disk_fills_the_preallocated_space_then_holds_charges_until_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """What a full filesystem does: the spool writes on into its file's preallocated zeros (it cannot start a new
    file: the active one stays, and no charge written is reported lost), then holds what needs new space."""
    svc = MeteringService(make_settings(tmp_path, spool_rotate_bytes=4096), load_profiles())
    spool_dir = svc.settings.resolved_spool_dir()
    try:
        with bad_disk(monkeypatch, spool_dir, "full") as disk:
            n = 0
            while svc.unspooled_charges == 0 and n < 5000:
                n += 1
                svc.record(usage(n))
            assert svc.unspooled_charges == 1 and n > 100, n  # a megabyte of zeros went first
            assert "no new file" in caplog.text and "stays in use" in caplog.text
            with pytest.raises(ChargesNotRecorded):
                svc.check_recording()
            assert not list(spool_dir.glob("*.creating"))  # no half-made file left behind
            disk.heal()
            assert wait_until(lambda: svc.unspooled_charges == 0, 5)
        svc.check_recording()
        ids = [usage(i).request_id for i in range(1, n + 1)]
        assert svc.flush(20)
        assert len(in_ledger(svc, ids)) == n  # every charge once: none lost, none doubled
        assert wait_until(lambda: len(list(spool_dir.glob("*.jsonl"))) >= 1, 5)
    finally:
        svc.close()


def test_refusal_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = MeteringService(make_settings(tmp_path, refuse_when_unspooled=False), load_profiles())
    try:
        with bad_disk(monkeypatch, svc.settings.resolved_spool_dir(), "failing") as disk:
            svc.record(usage(1))
            assert svc.unspooled_charges == 1
            svc.check_recording()  # held, but requests run
            disk.heal()
            assert wait_until(lambda: svc.unspooled_charges == 0, 5)
        assert svc.flush(10) and usage(1).request_id in in_ledger(svc, [usage(1).request_id])
    finally:
        svc.close()


def test_charges_held_at_close_are_written_if_the_disk_takes_them_and_replayed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "UNSPOOLED_RETRY_S", 3600)  # only close() tries again
    (tmp_path / "nowhere").write_text("a file where the ledger's directory should be: nothing is delivered")
    settings = make_settings(
        tmp_path, database_url=f"sqlite:///{tmp_path}/nowhere/x/ledger.db", close_timeout_s=0.2
    )
    svc = MeteringService(settings, load_profiles())
    with bad_disk(monkeypatch, settings.resolved_spool_dir(), "failing") as disk:
        svc.record(usage(1))
        assert svc.unspooled_charges == 1
        disk.heal()
    svc.close()  # the last try: on disk now, not in the (unreachable) ledger
    again = MeteringService(make_settings(tmp_path), load_profiles())  # replays the spool
    try:
        assert again.flush(10)
        assert usage(1).request_id in in_ledger(again, [usage(1).request_id])
    finally:
        again.close()


def test_a_disk_still_failing_at_close_leaves_each_charge_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    svc = MeteringService(make_settings(tmp_path, close_timeout_s=0.2), load_profiles())
    with bad_disk(monkeypatch, svc.settings.resolved_spool_dir(), "failing"):
        charge = svc.record(usage(1))
        with caplog.at_level(logging.ERROR):
            svc.close()
    assert "closing with 1 charges the spool could not write" in caplog.text
    assert charge.request_id in caplog.text


def test_a_failure_during_a_retry_keeps_the_later_charges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Charges refused after a retry wrote the earlier ones are held and written in turn: none dropped or
    doubled."""
    svc = MeteringService(make_settings(tmp_path), load_profiles())
    try:
        with bad_disk(monkeypatch, svc.settings.resolved_spool_dir(), "failing") as disk:
            for i in range(1, 4):
                svc.record(usage(i))
            disk.heal()
            assert wait_until(lambda: svc.unspooled_charges == 0, 5)
            disk.mode = "failing"
            svc.record(usage(4))
            assert svc.unspooled_charges == 1
            disk.heal()
            assert wait_until(lambda: svc.unspooled_charges == 0, 5)
        ids = [usage(i).request_id for i in range(1, 5)]
        assert svc.flush(10) and sorted(in_ledger(svc, ids)) == sorted(ids)
    finally:
        svc.close()


def test_a_charge_left_only_in_the_log_is_recovered_from_its_line_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The process stopped (or died) before the disk took the charge: its logged line, put in a `.jsonl` file of
    the spool directory as docs/metering.md says, is delivered by the next start, cost and all, once."""
    settings = make_settings(tmp_path, close_timeout_s=0.2)
    svc = MeteringService(settings, load_profiles())
    with bad_disk(monkeypatch, settings.resolved_spool_dir(), "failing"):
        charge = svc.record(usage(7))
        svc.close()
    marker = "recover it from this line: "
    lines = [r.getMessage().split(marker, 1)[1] for r in caplog.records if marker in r.getMessage()]
    assert len(lines) == 1
    (settings.resolved_spool_dir() / "recovered.jsonl").write_text(lines[0] + "\n")
    again = MeteringService(settings, load_profiles())
    try:
        assert again.flush(10)
        assert in_ledger(again, [charge.request_id]) == {charge.request_id: charge.cost_nanousd}
    finally:
        again.close()


def test_past_the_cap_a_charge_is_only_in_the_log_and_counted_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With refusal off, the memory held is bounded (MAX_UNSPOOLED): a charge past it is logged whole and counted
    (`spool-lost`), never silently dropped."""
    monkeypatch.setattr(service_module, "MAX_UNSPOOLED", 2)
    lost_before = metrics.METERING_ERRORS.labels("spool-lost")._value.get()
    svc = MeteringService(make_settings(tmp_path, refuse_when_unspooled=False), load_profiles())
    try:
        with bad_disk(monkeypatch, svc.settings.resolved_spool_dir(), "failing"):
            charges = [svc.record(usage(i)) for i in range(1, 4)]
            assert svc.unspooled_charges == 2
            assert metrics.METERING_ERRORS.labels("spool-lost")._value.get() == lost_before + 1
            assert "2 charges held already: this one is only in the log" in caplog.text
            assert charges[2].request_id in caplog.text
    finally:
        svc.close()
