"""`hfi catalog`, `hfi prepare` through the real command line app."""

from __future__ import annotations

from typer.testing import CliRunner

from serving.cli import app


def test_catalog_lists_the_defaults():
    result = CliRunner().invoke(app, ["catalog"])
    assert result.exit_code == 0, result.output
    assert "local/tiny-flux" in result.output and "cpu-basic" in result.output


def test_a_bad_catalog_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "catalog.yaml"
    bad.write_text("models:\n  - {id: org/m, task: text-classification, source: {path: m}, replicas: -2}\n")
    result = CliRunner().invoke(app, ["catalog", "--catalog", str(bad)])
    assert result.exit_code == 2
    assert "models[org/m].replicas" in result.output


def test_prepare_builds_a_local_model_once(tmp_path, monkeypatch):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "models:\n  - {id: local/s, task: text-classification, source: {path: s, prepare: tiny-sentiment}}\n"
    )
    monkeypatch.setenv("HFI_MODEL_STORE", str(tmp_path / "store"))
    first = CliRunner().invoke(app, ["prepare", "--catalog", str(catalog)])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "store" / "s" / "config.json").exists()
    again = CliRunner().invoke(app, ["prepare", "--catalog", str(catalog)])
    line = (
        "local/s: " + first.output.strip().splitlines()[-1].split("local/s: ")[-1]
    )  # after any progress bar
    assert str(tmp_path / "store" / "s") in line
    assert again.output.strip() == line  # same directory, same revision, nothing rebuilt (no build output)


def test_serve_refuses_a_spool_or_ledger_directory_it_cannot_write_before_starting_anything(
    tmp_path, monkeypatch
):
    from serving import local

    started = []

    def start(*args, **kwargs):  # Ray and Serve: must not be reached
        started.append(args)
        raise RuntimeError("Ray would start here")

    monkeypatch.setattr(local, "start", start)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("HFI_SPOOL_DIR", str(blocker / "spool"))
    monkeypatch.setenv("HFI_DATABASE_URL", f"sqlite:///{blocker}/ledger/ledger.db")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert f"error: metering.spool_dir: {blocker / 'spool'} cannot be written" in result.output
    assert f"error: metering.database_url: {blocker / 'ledger'} cannot be written" in result.output
    assert started == []


def test_the_write_check_passes_on_writable_directories_and_leaves_nothing(tmp_path, monkeypatch):
    from serving.commands import unwritable_directories
    from serving.config import Settings

    settings = Settings.load(
        {"metering": {"spool_dir": str(tmp_path / "s"), "database_url": f"sqlite:///{tmp_path}/db/l.db"}},
        env={},
    )
    assert unwritable_directories(settings) == []
    assert list((tmp_path / "s").iterdir()) == [] and list((tmp_path / "db").iterdir()) == []
    postgres = Settings.load(
        {"metering": {"spool_dir": str(tmp_path / "s"), "database_url": "postgresql+psycopg://u@h/d"}}, env={}
    )
    assert unwritable_directories(postgres) == []
