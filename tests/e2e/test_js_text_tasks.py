"""The unmodified JS client (@huggingface/inference) on the text and tabular tasks, through the all-tasks pool: it
checks each answer's shape itself (its hf-inference provider helpers throw on a malformed one), and so do we."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def js_dir() -> Path:
    """The client installed once into a cache directory (as tests/e2e/test_js_client.py does), with our script."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the JS client tests")
    target = Path(os.environ.get("HFI_JS_CACHE", Path.home() / ".cache" / "hfi" / "js-client"))
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(JS / "package.json", target / "package.json")
    shutil.copy(JS / "text_tasks.mjs", target / "text_tasks.mjs")
    if not (target / "node_modules" / "@huggingface" / "inference").exists():
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=target, check=True, timeout=300
        )
    return target


@pytest.fixture(scope="module")
def js_out(hfi_tasks_service, js_dir) -> dict:
    done = subprocess.run(
        ["node", "text_tasks.mjs"],
        cwd=js_dir,
        env={**os.environ, "BASE": hfi_tasks_service.url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ok(js_out: dict, task: str):
    assert "ok" in js_out[task], js_out[task]
    return js_out[task]["ok"]


def test_question_answering(js_out):
    out = ok(js_out, "questionAnswering")
    assert isinstance(out["answer"], str) and isinstance(out["score"], float)
    assert out["answer"] == "Paris is the capital of France."[out["start"] : out["end"]]


def test_fill_mask(js_out):
    out = ok(js_out, "fillMask")
    assert len(out) == 5 and all(isinstance(e["token"], int) and isinstance(e["token_str"], str) for e in out)


def test_token_classification(js_out):
    out = ok(js_out, "tokenClassification")
    assert out and all(
        e["entity_group"] in {"PER", "ORG", "LOC", "MISC"} and e["end"] > e["start"] for e in out
    )


def test_zero_shot_classification(js_out):
    out = ok(js_out, "zeroShotClassification")
    assert sorted(e["label"] for e in out) == ["negative", "positive"]
    assert sum(e["score"] for e in out) == pytest.approx(1.0, abs=1e-4)


def test_summarization_and_translation(js_out):
    assert isinstance(ok(js_out, "summarization")["summary_text"], str)
    assert isinstance(ok(js_out, "translation")["translation_text"], str)  # one input: one object


def test_table_question_answering(js_out):
    out = ok(js_out, "tableQuestionAnswering")
    assert isinstance(out["answer"], str) and out["aggregator"] in ("NONE", "SUM", "AVERAGE", "COUNT")
    assert all(isinstance(c, str) for c in out["cells"])


def test_tabular(js_out):
    assert [v in (5, 6, 7) for v in ok(js_out, "tabularClassification")] == [True] * 3
    regression = ok(js_out, "tabularRegression")
    assert len(regression) == 2 and all(isinstance(v, (int, float)) for v in regression)


def test_errors_reach_the_js_client_as_the_servers_message(js_out):
    assert "inputs must contain the mask token [MASK]" in js_out["badFillMask"]["error"]
    assert "inputs.data must not be empty" in js_out["badTable"]["error"]
