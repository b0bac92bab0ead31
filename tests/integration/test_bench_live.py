"""`hfi bench` against the real local backend (Ray Serve with the default models): a few dozen requests in all.

Each test drives one default model through the CLI, saves the run, and reconciles it against the service's real
metering ledger: one charge per successful request, costs equal to the `x-hfi-cost-usd` headers.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from typer.testing import CliRunner

from bench.output import read_run
from serving.cli import app

runner = CliRunner()
CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LEDGER_WAIT_S = "30"  # the spool drains to the ledger in the background


def bench(service, tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    result = runner.invoke(
        app,
        [
            "bench",
            service.url,
            *args,
            "--ledger",
            service.database_url,
            "--ledger-wait",
            LEDGER_WAIT_S,
            "--timeout",
            "120",
            "-q",
            "-o",
            str(out),
        ],
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return read_run(out)


def assert_reconciled(doc: dict, expected_ok: int, *, cost_headers: bool = True) -> None:
    rec = doc["reconciliation"]
    assert rec["ok"], rec["differences"]
    assert rec["successful_requests"] == rec["charges_found"] == expected_ok
    assert Decimal(rec["ledger_total_usd"]) > 0
    if cost_headers:
        assert rec["requests_with_cost_header"] == expected_ok
        assert Decimal(rec["header_total_usd"]) == Decimal(rec["ledger_total_usd"])
    else:  # streams: the headers left before the cost was known
        assert rec["requests_with_cost_header"] == 0


def test_classification_closed_loop_reconciles(hfi_service, tmp_path) -> None:
    doc = bench(
        hfi_service,
        tmp_path,
        "cls",
        "--model",
        "local/tiny-sentiment",
        "--task",
        "text-classification",
        "-c",
        "4",
        "-n",
        "12",
        "--warmup",
        "2",
    )
    s = doc["points"][0]["summary"]
    assert s["ok"] == 12, s["errors_by_status"]
    cost = s["cost"]
    assert cost["cost_source"] == "header" and cost["requests_priced"] == 12
    assert cost["compute_types"] == {"cpu-basic": 12}
    assert Decimal(cost["billed_compute_seconds"]) > 0 and cost["utilisation"] > 0
    assert_reconciled(doc, 12)


def test_embeddings_open_loop(hfi_service, tmp_path) -> None:
    doc = bench(
        hfi_service,
        tmp_path,
        "emb",
        "--model",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--task",
        "feature-extraction",
        "--rate",
        "8",
        "-n",
        "10",
        "--seed",
        "1",
        "--warmup",
        "1",
    )
    s = doc["points"][0]["summary"]
    assert s["ok"] == 10 and s["offered_rate_rps"] == 8.0
    assert_reconciled(doc, 10)


def test_chat_stream_ttft_and_ledger_cost(hfi_service, tmp_path) -> None:
    doc = bench(
        hfi_service,
        tmp_path,
        "chat",
        "--model",
        CHAT_MODEL,
        "--task",
        "chat",
        "-n",
        "3",
        "-c",
        "1",
        "--max-tokens",
        "6",
        "--warmup",
        "1",
    )
    s = doc["points"][0]["summary"]
    assert s["ok"] == 3
    assert s["ttft_seconds"]["count"] == 3 and s["tokens"] > 0
    assert s["inter_token_latency_seconds"] is not None
    # streams carry no cost header: the cost comes from the ledger
    assert s["cost"]["cost_source"] == "ledger" and s["cost"]["requests_priced"] == 3
    assert_reconciled(doc, 3, cost_headers=False)


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_text_generation(hfi_service, tmp_path, stream) -> None:
    doc = bench(
        hfi_service,
        tmp_path,
        "gen",
        "--model",
        CHAT_MODEL,
        "--task",
        "text-generation",
        "-n",
        "2",
        "--max-tokens",
        "4",
        "--warmup",
        "0",
        stream,
    )
    s = doc["points"][0]["summary"]
    assert s["ok"] == 2 and s["tokens"] > 0
    assert (s["ttft_seconds"] is not None) == (stream == "--stream")
    assert_reconciled(doc, 2, cost_headers=stream == "--no-stream")


def test_text_to_image_sweep_writes_png(hfi_service, tmp_path) -> None:
    doc = bench(
        hfi_service,
        tmp_path,
        "img",
        "--model",
        "local/tiny-flux",
        "--task",
        "text-to-image",
        "-n",
        "3",
        "--sweep",
        "1,2",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--warmup",
        "1",
    )
    assert [p["summary"]["ok"] for p in doc["points"]] == [3, 3]
    assert_reconciled(doc, 6)
    png = (tmp_path / "img.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    rows = (tmp_path / "img.csv").read_text().splitlines()
    assert len(rows) == 1 + 6
    assert json.loads((tmp_path / "img.json").read_text())["target"]["task"] == "text-to-image"
