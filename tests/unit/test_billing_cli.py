"""`hfi accounts ...`, bootstrap() and the migrations' match with the models, on a temp SQLite database."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from billing.cli import bootstrap, parse_usd, register
from billing.config import BillingSettings
from billing.service import BillingService


@pytest.fixture
def cli(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/cli.db"
    monkeypatch.setenv("HFI_DATABASE_URL", url)
    monkeypatch.delenv("HFI_CONFIG", raising=False)
    monkeypatch.delenv("HFI_BILLING_MODE", raising=False)
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def invoke(*args: str, ok: bool = True):
        result = runner.invoke(app, list(args))
        if ok:
            assert result.exit_code == 0, result.output
        return result

    return invoke, url


def test_accounts_commands(cli):
    invoke, url = cli
    invoke("accounts", "create-user", "ann", "--tier", "pro")
    invoke("accounts", "create-user", "ben")
    invoke("accounts", "create-org", "acme", "--seats", "3", "--enterprise", "--spending-limit", "1.25")
    invoke("accounts", "add-member", "acme", "ann", "--admin")
    invoke("accounts", "add-member", "acme", "ben")
    invoke("accounts", "remove-member", "acme", "ben")
    invoke("accounts", "set-tier", "ben", "pro")
    invoke("accounts", "disable-model", "acme", "Org/Big")
    invoke("accounts", "enable-model", "acme", "org/big")
    invoke("accounts", "disable-model", "acme", "org/other")
    issued = invoke("accounts", "issue-token", "ben", "--label", "ci")
    token = issued.stdout.strip().splitlines()[-1]
    assert token.startswith("hfi_")
    listing = json.loads(invoke("accounts", "list", "--json").stdout)
    by_name = {a["name"]: a for a in listing}
    assert by_name["acme"]["spending_limit_nanousd"] == 1_250_000_000
    assert by_name["acme"]["members"] == [{"user": "ann", "admin": True}]
    assert by_name["acme"]["disabled_models"] == ["org/other"]
    assert by_name["ben"]["tier_or_plan"] == "pro" and token not in json.dumps(listing)
    token_id = by_name["ben"]["tokens"][0]["id"]

    svc = BillingService(BillingSettings(mode="tokens"), url)
    adm = svc.admit(token, None, "org/m", 5, svc.now())
    svc.settle(adm, 7, hardware_profile="cpu-basic")
    month = adm.month
    svc.close()
    report = json.loads(invoke("accounts", "usage", "ben", "--month", month).stdout)
    assert (
        report["total_nanousd"] == 7 and report["by_hardware_profile"][0]["hardware_profile"] == "cpu-basic"
    )
    csv = invoke("accounts", "usage", "ben", "--month", month, "--format", "csv").stdout
    assert csv.splitlines()[0].startswith("request_id,") and csv.splitlines()[-1] == "TOTAL,,,,,7,0.000000007"

    invoke("accounts", "revoke-token", token_id)
    invoke("accounts", "set-spending-limit", "acme", "none")
    assert json.loads(invoke("accounts", "list", "--json").stdout)[0]["spending_limit_nanousd"] is None
    bad = invoke("accounts", "set-tier", "ben", "gold", ok=False)
    assert bad.exit_code == 1 and "gold" in bad.output
    assert invoke("accounts", "add-member", "acme", "nobody", ok=False).exit_code == 1
    assert invoke("accounts", "set-spending-limit", "acme", "-1", ok=False).exit_code == 2


def test_parse_usd_is_exact():
    assert parse_usd("2.00") == 2_000_000_000
    assert parse_usd("$0.000000001") == 1
    assert parse_usd("0.1") == 100_000_000
    for bad in ("abc", "-1", "0.0000000001", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_usd(bad)


def test_bootstrap_only_on_first_start(tmp_path):
    url = f"sqlite:///{tmp_path}/boot.db"
    first = bootstrap(url)
    assert first is not None
    admin_token, user_token = first
    assert bootstrap(url) is None  # second start: nothing new
    svc = BillingService(BillingSettings(mode="tokens"), url)
    assert svc.authenticate(admin_token).is_admin
    caller = svc.authenticate(user_token)
    assert caller.name == "user" and not caller.is_admin
    svc.admit(user_token, None, "org/m", 1, svc.now())
    svc.close()


def test_migrations_match_the_models(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from billing.schema import MIGRATIONS, Base
    from core.db import BILLING, make_engine
    from core.migrations import upgrade

    engine = make_engine(f"sqlite:///{tmp_path}/m.db", BILLING)
    upgrade(engine, MIGRATIONS)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = [d for d in compare_metadata(ctx, Base.metadata) if "billing_alembic_version" not in repr(d)]
    engine.dispose()
    assert diff == []
