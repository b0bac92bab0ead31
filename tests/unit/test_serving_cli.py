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
