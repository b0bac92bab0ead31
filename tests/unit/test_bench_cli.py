"""`hfi bench` through typer's CliRunner (both forms) and once through the installed `hfi` console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.cli import app

CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, ["bench", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_url_form_saves_json_csv_png(bench_standin, tmp_path) -> None:
    bench_standin.reset()
    out = tmp_path / "run.json"
    res = invoke(
        bench_standin.url,
        "--model",
        "local/tiny-flux",
        "--task",
        "text-to-image",
        "-n",
        "6",
        "-c",
        "2",
        "--width",
        "16",
        "--height",
        "16",
        "--warmup",
        "1",
        "-o",
        str(out),
    )
    assert res.exit_code == 0, res.output
    assert "local/tiny-flux (text-to-image)" in res.output and "from header" in res.output
    doc = json.loads(out.read_text())
    assert doc["points"][0]["summary"]["ok"] == 6
    assert out.with_suffix(".csv").exists() and out.with_suffix(".png").stat().st_size > 0
    assert bench_standin.state.requests_seen == 7


def test_run_subcommand_open_loop_sweep_and_compare(bench_standin, tmp_path) -> None:
    bench_standin.reset(compute_s=0.001)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    common = ["--model", CHAT_MODEL, "--task", "chat", "--max-tokens", "3", "--warmup", "0", "-q"]
    res = invoke(
        "run",
        bench_standin.url,
        *common,
        "--rate",
        "50",
        "-n",
        "5",
        "--sweep",
        "20,40",
        "-o",
        str(a),
        "--no-plot",
    )
    assert res.exit_code == 0, res.output
    assert "open loop" in res.output and "ttft p50" in res.output
    assert not a.with_suffix(".png").exists()
    res = invoke(bench_standin.url, *common, "--rate", "40", "-n", "5", "-o", str(b), "--no-plot")
    assert res.exit_code == 0, res.output
    res = invoke("compare", str(a), str(b))
    assert res.exit_code == 0, res.output
    assert "B/A" in res.output and "TTFT p50 (s)" in res.output
    assert "\n40 " in res.output  # the level both runs measured
    assert "\n20 " not in res.output


def test_ledger_reconciliation_exit_code(bench_standin, tmp_path) -> None:
    from metering.ledger import Ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    try:
        ledger.ensure_schema()
        args = [
            bench_standin.url,
            "--model",
            "local/tiny-sentiment",
            "--task",
            "text-classification",
            "-n",
            "8",
            "--warmup",
            "0",
            "--ledger",
            url,
            "--ledger-wait",
            "0",
            "-o",
            str(tmp_path / "r.json"),
            "--no-plot",
        ]
        bench_standin.reset(ledger=ledger)
        ok = invoke(*args)
        assert ok.exit_code == 0, ok.output
        assert "reconciliation against sqlite:///" in ok.output and ": OK" in ok.output
        bench_standin.reset(ledger=ledger, skip_charge_for={2})
        bad = invoke(*args)
    finally:
        ledger.close()
    assert bad.exit_code == 1, bad.output
    assert "1 difference(s)" in bad.output and "missing: " in bad.output
    rec = json.loads((tmp_path / "r.json").read_text())["reconciliation"]
    assert rec["difference_counts"] == {"missing": 1} and rec["charges_found"] == 7


def test_streams_take_cost_from_the_ledger(bench_standin, tmp_path) -> None:
    from metering.ledger import Ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    try:
        ledger.ensure_schema()
        bench_standin.reset(ledger=ledger)
        res = invoke(
            bench_standin.url,
            "--model",
            CHAT_MODEL,
            "--task",
            "chat",
            "-n",
            "3",
            "--warmup",
            "0",
            "--max-tokens",
            "2",
            "--ledger",
            url,
            "-o",
            str(tmp_path / "s.json"),
            "--no-plot",
        )
    finally:
        ledger.close()
    assert res.exit_code == 0, res.output
    cost = json.loads((tmp_path / "s.json").read_text())["points"][0]["summary"]["cost"]
    assert cost["cost_source"] == "ledger" and cost["requests_priced"] == 3
    assert "taken from the ledger" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "painting"], "unknown task"),
        (["--task", "chat", "--sweep", "1,x"], "comma-separated"),
        (["--task", "chat", "--price-per-second", "cheap"], "exact decimal"),
        (["--task", "chat", "--ledger", "nodb://x"], "bad ledger URL"),
        (["--task", "chat", "--ledger", "sqlite:///{tmp}/l.db", "--ledger-table", "t"], "no table 't'"),
        (["--task", "chat", "--workload", "{tmp}/missing.jsonl"], "cannot read workload file"),
    ],
)
def test_bad_options_exit_2_before_any_load(bench_standin, tmp_path, args, message) -> None:
    bench_standin.reset()
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = invoke(bench_standin.url, "--model", "m/x", *args)
    assert res.exit_code == 2
    assert message in res.output.replace("\n", " ").replace("│", "")
    assert bench_standin.state.requests_seen == 0


def test_help_lists_both_forms() -> None:
    res = invoke("--help")
    assert res.exit_code == 0 and "run" in res.output and "compare" in res.output


def test_console_script(bench_standin, tmp_path) -> None:
    hfi = shutil.which("hfi", path=str(Path(sys.executable).parent)) or shutil.which("hfi")
    assert hfi, "the hfi console script is not installed (pip install -e .)"
    bench_standin.reset()
    out = tmp_path / "run.json"
    env = {**os.environ, "HF_TOKEN": ""}
    proc = subprocess.run(
        [
            hfi,
            "bench",
            bench_standin.url,
            "--model",
            "sentence-transformers/all-MiniLM-L6-v2",
            "--task",
            "feature-extraction",
            "-n",
            "4",
            "--warmup",
            "0",
            "-o",
            str(out),
            "--no-plot",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "req/s" in proc.stdout
    assert "\x1b[" not in proc.stderr  # no progress bar when stderr is not a terminal
    assert json.loads(out.read_text())["points"][0]["summary"]["ok"] == 4
