"""`hfi usage` and `hfi profiles` through typer's runner, against a SQLite ledger in a temp dir."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from hardware_profiles import load_profiles
from metering.cli import month_start, parse_when, register
from metering.ledger import Ledger
from metering.pricing import price_in_catalog
from metering.records import UsageRecord

UTC = dt.timezone.utc
runner = CliRunner()


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/ledger.db"
    catalog = load_profiles()
    ledger = Ledger(url)
    rows = [
        ("a1", "acme", "nvidia-h100", dt.datetime(2026, 3, 1, 10, tzinfo=UTC), 1_000_000_000),
        ("a2", "acme", "nvidia-h100", dt.datetime(2026, 3, 1, 11, tzinfo=UTC), 333_333_333),
        ("a3", "acme", "cpu-basic", dt.datetime(2026, 3, 2, 9, tzinfo=UTC), 77_000_000),
        ("b1", "bob", "nvidia-l4", dt.datetime(2026, 3, 2, 9, tzinfo=UTC), 2_000_000_000),
    ]
    ledger.insert(
        [
            price_in_catalog(
                UsageRecord(rid, when, "org/m", "r", "feature-extraction", prof, ns, billed_account=acc),
                catalog,
            )
            for rid, acc, prof, when, ns in rows
        ]
    )
    ledger.close()
    return url


def test_usage_json_totals_are_exact(app: typer.Typer, ledger_url: str) -> None:
    args = [
        "usage",
        "--database-url",
        ledger_url,
        "--since",
        "2026-03-01",
        "--until",
        "2026-03-31",
        "--format",
        "json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(r["day"], r["account"], r["hardware_profile"], r["requests"]) for r in data["rows"]] == [
        ("2026-03-01", "acme", "nvidia-h100", 2),
        ("2026-03-02", "acme", "cpu-basic", 1),
        ("2026-03-02", "bob", "nvidia-l4", 1),
    ]
    assert data["totals"]["requests"] == 4
    assert data["totals"]["cost_nanousd"] == sum(r["cost_nanousd"] for r in data["rows"])
    # 1 s at 4.50 $/h = 1250000 nano-USD, 0.333333333 s = 416667, 77 ms at 0.033 $/h = 706, 2 s at 0.80 $/h = 444444
    assert data["totals"]["cost_usd"] == "0.002111817"


def test_usage_for_one_account_as_csv(app: typer.Typer, ledger_url: str) -> None:
    args = [
        "usage",
        "--database-url",
        ledger_url,
        "--since",
        "2026-03-01",
        "--account",
        "acme",
        "--format",
        "csv",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    *rows, total = list(csv.DictReader(io.StringIO(result.output)))
    assert {r["account"] for r in rows} == {"acme"}
    assert Decimal(total["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in rows)


def test_usage_raw_charges_for_an_interval(app: typer.Typer, ledger_url: str) -> None:
    args = [
        "usage",
        "--database-url",
        ledger_url,
        "--since",
        "2026-03-02",
        "--until",
        "2026-03-02",
        "--charges",
    ]
    args += ["--format", "json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(c["request_id"] for c in json.loads(result.output)) == ["a3", "b1"]


def test_usage_table_reads_database_url_from_the_environment(app: typer.Typer, ledger_url: str) -> None:
    result = runner.invoke(app, ["usage", "--since", "2026-01-01"], env={"HFI_DATABASE_URL": ledger_url})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].split() == ["TOTAL", "4", "3.410", "0.002111817"]


def test_usage_rejects_a_bad_format_and_date(app: typer.Typer, ledger_url: str) -> None:
    assert runner.invoke(app, ["usage", "--database-url", ledger_url, "--format", "xml"]).exit_code == 2
    assert runner.invoke(app, ["usage", "--database-url", ledger_url, "--since", "March"]).exit_code == 2


def test_profiles_lists_accelerator_and_price_in_force(app: typer.Typer, tmp_path: Path) -> None:
    (tmp_path / "gpu.yaml").write_text(
        "name: gpu-test\naccelerator: {type: H100, count: 0.5, memory_gb: 80}\ncpus: 4\n"
        "prices:\n  - {effective_from: 2025-01-01, usd_per_hour: '2.25'}\n"
        "  - {effective_from: 2999-01-01, usd_per_hour: '9.00'}\n"
    )
    result = runner.invoke(app, ["profiles", "--profiles-dir", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["accelerator"] == "0.5x H100"
    assert (row["usd_per_hour"], row["price_since"], row["next_price_change"]) == (
        "2.25",
        "2025-01-01",
        "2999-01-01",
    )
    table = runner.invoke(app, ["profiles"])
    assert table.exit_code == 0
    assert any(
        line.split()[:2] == ["nvidia-h100", "1x"] and "4.50" in line for line in table.output.splitlines()
    )


def test_profiles_reports_an_invalid_catalog(app: typer.Typer, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\nprices: []\n")
    result = runner.invoke(app, ["profiles", "--profiles-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "prices" in result.output


def test_date_parsing() -> None:
    assert parse_when("2026-03-02") == dt.datetime(2026, 3, 2, tzinfo=UTC)
    assert parse_when("2026-03-02", end=True) == dt.datetime(2026, 3, 3, tzinfo=UTC)
    assert parse_when("2026-03-02T10:00:00+02:00") == dt.datetime(2026, 3, 2, 8, tzinfo=UTC)
    assert month_start(dt.datetime(2026, 3, 17, 5, tzinfo=UTC)) == dt.datetime(2026, 3, 1, tzinfo=UTC)


def test_cli_module_imports_no_typer_at_import_time() -> None:
    import subprocess
    import sys

    code = "import sys, metering.cli; print('typer' in sys.modules, 'sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
