"""The saved run: the JSON schema (validated with jsonschema), the CSV, the PNG, and `compare`."""

from __future__ import annotations

import asyncio
import copy
import csv
import json
import struct
import zlib
from decimal import Decimal

import jsonschema
import pytest

from bench.compare import compare_rows, format_table
from bench.output import (
    CSV_FIELDS,
    SCHEMA_VERSION,
    RunFileError,
    build_run,
    load_schema,
    read_run,
    save_csv,
    save_json,
    save_plot,
    validate_run,
)
from bench.runner import LoadSpec, run_point
from bench.workloads import WorkloadParams, builtin_workload

CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def make_run(url: str, levels=(1.0,), *, task="chat", model=CHAT_MODEL, requests=4):
    workload = builtin_workload(task, model, WorkloadParams(max_tokens=3))
    points = [
        asyncio.run(run_point(url, workload, LoadSpec(concurrency=int(c), requests=requests))) for c in levels
    ]
    return build_run(url=url, workload=workload, points=points, replicas=1)


def check_png(path) -> tuple[int, int]:
    """Walk the PNG's chunks, checking each CRC; return (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    assert any(kind == b"IDAT" for kind, _ in chunks)
    return struct.unpack(">II", chunks[0][1][:8])


def test_a_real_run_validates_against_the_schema(bench_standin, tmp_path) -> None:
    bench_standin.reset()
    doc = make_run(bench_standin.url, levels=(1, 2))
    jsonschema.Draft202012Validator.check_schema(load_schema())
    jsonschema.validate(doc, load_schema(), cls=jsonschema.Draft202012Validator)
    path = save_json(doc, tmp_path / "run.json")
    again = read_run(path)
    assert again["schema_version"] == SCHEMA_VERSION
    assert [p["level"] for p in again["points"]] == [1.0, 2.0]
    s = again["points"][0]["summary"]
    assert s["ttft_seconds"]["count"] == 4 and s["inter_token_latency_seconds"]["count"] == 4 * 2


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d.pop("points"), "points"),
        (lambda d: d["points"][0]["summary"]["cost"].update(total_usd=0.1), "total_usd"),  # money as a float
        (
            lambda d: d["points"][0]["summary"]["cost"].update(total_usd="1e-3"),
            "total_usd",
        ),  # not plain decimal
        (lambda d: d["load"].update(mode="half-open"), "mode"),
        (lambda d: d["points"][0]["requests"][0].update(status="200"), "status"),
        (lambda d: d.update(surprise=1), "surprise"),
    ],
)
def test_schema_rejects_broken_runs(bench_standin, mutate, where) -> None:
    bench_standin.reset()
    doc = make_run(bench_standin.url, task="text-classification", model="local/tiny-sentiment", requests=2)
    validate_run(doc)
    bad = copy.deepcopy(doc)
    mutate(bad)
    with pytest.raises(RunFileError, match=where):
        validate_run(bad)


def test_unknown_versions_and_other_files_are_refused(tmp_path) -> None:
    with pytest.raises(RunFileError, match="schema_version"):
        validate_run({"schema": "hfi-bench-run", "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(RunFileError, match="not an hfi bench run"):
        validate_run({"hello": 1})
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(RunFileError, match="not JSON"):
        read_run(tmp_path / "x.json")


def test_csv_has_one_row_per_request(bench_standin, tmp_path) -> None:
    bench_standin.reset()
    doc = make_run(
        bench_standin.url, levels=(1, 2), task="text-to-image", model="local/tiny-flux", requests=3
    )
    path = save_csv(doc, tmp_path / "run.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0].keys()) == CSV_FIELDS
    assert len(rows) == 6
    assert [r["level"] for r in rows] == ["1.0"] * 3 + ["2.0"] * 3
    ids = {c["request_id"]: c for c in bench_standin.state.charges}
    for r in rows:
        assert r["status"] == "200" and r["ok"] == "True"
        assert (
            Decimal(r["cost_usd"]) * 10**9 == ids[r["inference_id"]]["cost_nanousd"]
        )  # exact decimal string


@pytest.mark.parametrize("levels", [(1,), (1, 2, 4)])
def test_png_is_written(bench_standin, tmp_path, levels) -> None:
    bench_standin.reset()
    doc = make_run(
        bench_standin.url,
        levels=levels,
        task="feature-extraction",
        model="sentence-transformers/all-MiniLM-L6-v2",
        requests=5,
    )
    path = save_plot(doc, tmp_path / "run.png")
    width, height = check_png(path)
    assert path.stat().st_size > 1000
    # a sweep adds the throughput and p99 panels beside the latency distribution
    assert width > (1000 if len(levels) > 1 else 0) and height > 0
    if len(levels) == 1:
        assert width < 1000


def _doc(levels_throughput_p99: list[tuple[float, float, float]], cost_per_1k: str) -> dict:
    points = []
    for level, rps, p99 in levels_throughput_p99:
        dist = {
            "p50": p99 / 2,
            "p90": p99 / 1.5,
            "p99": p99,
            "max": p99,
            "min": 0.0,
            "mean": p99 / 2,
            "count": 10,
        }
        cost = {
            "billed_compute_seconds": "1.5",
            "requests_with_compute": 10,
            "compute_types": {"nvidia-l4": 10},
            "cost_source": "header",
            "requests_priced": 10,
            "total_usd": "0.01",
            "per_request_usd": "0.001",
            "per_1000_requests_usd": cost_per_1k,
            "replicas": 1,
            "utilisation": 0.5,
        }
        summary = {
            "requests": 10,
            "ok": 10,
            "failed": 0,
            "errors_by_status": {},
            "wall_seconds": 1.0,
            "throughput_rps": rps,
            "offered_rate_rps": None,
            "latency_seconds": dist,
            "ttft_seconds": None,
            "inter_token_latency_seconds": None,
            "tokens": 0,
            "tokens_per_second": 0.0,
            "cost": cost,
        }
        points.append(
            {
                "level": level,
                "concurrency": int(level),
                "rate_rps": None,
                "summary": summary,
                "started_at": "2025-01-01T00:00:00.000+00:00",
                "requests": [],
            }
        )
    return {"target": {"model": "m/x", "task": "text-to-image"}, "load": {"mode": "closed"}, "points": points}


def test_compare_gives_ratios_per_level() -> None:
    a = _doc([(1, 10.0, 0.2), (4, 20.0, 0.8)], "1.0")
    b = _doc([(1, 25.0, 0.1), (4, 40.0, 0.4), (8, 50.0, 1.0)], "0.5")
    rows = {(r["level"], r["metric"]): r for r in compare_rows(a, b)}
    assert rows[("1", "throughput (req/s)")]["ratio"] == pytest.approx(2.5)
    assert rows[("1", "throughput (req/s)")]["b_better"] is True
    assert rows[("4", "latency p99 (s)")]["ratio"] == pytest.approx(0.5)
    assert rows[("4", "latency p99 (s)")]["b_better"] is True  # lower latency is better
    assert rows[("4", "cost per 1k requests (USD)")]["ratio"] == pytest.approx(0.5)
    assert rows[("1", "utilisation")]["ratio"] == 1.0 and rows[("1", "utilisation")]["b_better"] is None
    assert not any(level == "8" for level, _ in rows)  # only levels both runs measured
    text = format_table(a, b, name_a="l4.json", name_b="h100.json")
    assert "throughput (req/s)" in text and "2.5" in text and "B better" in text
    assert "compute nvidia-l4" in text


def test_save_json_refuses_an_invalid_document(tmp_path) -> None:
    with pytest.raises(RunFileError):
        save_json({"schema": "hfi-bench-run", "schema_version": SCHEMA_VERSION}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    json.dumps(load_schema())  # the schema itself is plain JSON
