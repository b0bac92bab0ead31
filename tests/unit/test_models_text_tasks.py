"""The text and tabular runners in process (tiny models built in code, no Ray), and their route adapters: output
shapes, limits, work units, and 400s that name the field."""

from __future__ import annotations

import pytest

from models.catalog import ModelSpec
from models.errors import InvalidInput
from models.executor import ModelExecutor
from models.loading import LoadOptions
from models.types import TaskRequest
from serving.routes.base import RequestContext
from serving.routes.registry import ADAPTERS
from serving.routes.tabular import table_of
from serving.routes.text_tasks import wants_legacy_zero_shot

MODELS = {
    "question-answering": ("tiny-qa", {}),
    "fill-mask": ("tiny-fill-mask", {}),
    "token-classification": ("tiny-ner", {}),
    "zero-shot-classification": ("tiny-nli", {}),
    "summarization": ("tiny-summarizer", {"max_new_tokens": 16}),
    "translation": ("tiny-translator", {"max_new_tokens": 16}),
    "table-question-answering": ("tiny-tapas", {"max_table_cells": 20}),
    "tabular-classification": ("tiny-wine-quality", {"max_table_cells": 50}),
    "tabular-regression": ("tiny-fish-weight", {}),
}
WINE = {
    "fixed_acidity": ["7.4", "7.8"],
    "volatile_acidity": ["0.7", "0.88"],
    "citric_acid": ["0", "0"],
    "residual_sugar": ["1.9", "2.6"],
    "alcohol": ["9.4", "9.8"],
}


@pytest.fixture(scope="module")
def executors(model_store):
    out = {}
    for task, (name, limits) in MODELS.items():
        spec = ModelSpec(
            id=f"local/{name}",
            task=task,
            source={"path": name, "prepare": name},
            dtype="float32",
            limits={"max_input_chars": 200, **limits},
        )
        out[task] = ModelExecutor(spec, LoadOptions(model_store=model_store))
    return out


def run(executors, task, inputs, parameters=None):
    return executors[task].run(TaskRequest(task, inputs, parameters or {}))


def test_question_answering_span_lies_in_the_context(executors):
    context = "Paris is the capital of France."
    one = run(executors, "question-answering", {"question": "capital?", "context": context})
    assert set(one.output) == {"answer", "score", "start", "end"}
    assert one.output["answer"] == context[one.output["start"] : one.output["end"]]
    many = run(executors, "question-answering", {"question": "q", "context": context}, {"top_k": 2})
    assert len(many.output) == 2 and many.output[0]["score"] >= many.output[1]["score"]
    assert one.timings.work_units > 1  # tokens


def test_fill_mask_candidates(executors):
    out = run(executors, "fill-mask", "the cat sat on the [MASK]", {"top_k": 3}).output
    assert len(out) == 3 and {"score", "token", "token_str", "sequence"} <= set(out[0])
    batch = run(executors, "fill-mask", ["a [MASK]", "b [MASK]"], {"top_k": 2}).output
    assert len(batch) == 2 and all(len(candidates) == 2 for candidates in batch)


def test_token_classification_groups(executors):
    out = run(executors, "token-classification", "my name is sarah and i live in london").output
    assert out and all({"entity_group", "score", "word", "start", "end"} <= set(e) for e in out)
    assert all(isinstance(e["score"], float) for e in out)


def test_zero_shot_scores_add_up(executors):
    out = run(executors, "zero-shot-classification", "i love it", {"candidate_labels": ["a", "b", "c"]})
    assert sorted(out.output["labels"]) == ["a", "b", "c"] and sum(out.output["scores"]) == pytest.approx(1)
    # one NLI pass per label: the work is the text's tokens times the labels
    single = run(executors, "zero-shot-classification", "i love it", {"candidate_labels": ["a"]})
    assert out.timings.work_units == 3 * single.timings.work_units


def test_summarization_and_translation_generate_within_the_limit(executors):
    s = run(
        executors, "summarization", "the cat sat on the mat", {"generate_parameters": {"max_new_tokens": 3}}
    )
    assert isinstance(s.output[0]["summary_text"], str) and s.usage["completion_tokens"] <= 3
    t = run(executors, "translation", ["le chat", "bonjour"])
    assert [set(o) for o in t.output] == [{"translation_text"}] * 2


def test_table_question_answering_answer(executors):
    table = {"Repository": ["Transformers", "Datasets"], "Stars": [36542, 4512]}  # numbers become cells
    out = run(executors, "table-question-answering", {"query": "how many stars?", "table": table})
    assert set(out.output) == {"answer", "coordinates", "cells", "aggregator"}
    assert out.timings.work_units == 4  # cells


def test_tabular_predictions_per_row(executors):
    assert run(executors, "tabular-classification", WINE).output in (
        [5, 5],
        [5, 6],
        [6, 6],
        [6, 7],
        [7, 7],
        [5, 7],
    )
    fish = {"Species": ["Bream"], "Length1": [23.2], "Length2": [25.4], "Height": [11.5], "Width": [4.0]}
    out = run(executors, "tabular-regression", fish).output
    assert len(out) == 1 and isinstance(out[0], float)


@pytest.mark.parametrize(
    ("task", "inputs", "parameters", "message"),
    [
        ("question-answering", {"question": "q", "context": ""}, {}, "inputs.context must not be empty"),
        (
            "question-answering",
            {"question": "q", "context": "c"},
            {"top_k": 0},
            "parameters.top_k must be >= 1",
        ),
        (
            "question-answering",
            {"question": "q", "context": "x" * 300},
            {},
            "more than this model's limit of 200",
        ),
        ("fill-mask", "no mask", {}, "inputs must contain the mask token"),
        ("fill-mask", "a [MASK]", {"targets": 3}, "parameters.targets must be a list"),
        ("token-classification", ["ok", 3], {}, r"inputs\[1\] must be a string"),
        ("token-classification", "x", {"stride": 4, "aggregation_strategy": "none"}, "parameters.stride"),
        ("zero-shot-classification", "x", {}, "parameters.candidate_labels is required"),
        ("zero-shot-classification", "x", {"candidate_labels": ["a"] * 33}, "more than the limit of 32"),
        ("summarization", "x", {"truncation": "sideways"}, "parameters.truncation must be one of"),
        ("summarization", "x", {"generate_parameters": {"max_new_tokens": 17}}, "must be <= 16"),
        ("translation", "x", {"tgt_lang": "en"}, "parameters.src_lang and parameters.tgt_lang go together"),
        ("table-question-answering", {"query": "q", "table": {"a": ["1"] * 21}}, {}, "21 cells, more than"),
        ("table-question-answering", {"query": "q", "table": []}, {}, "inputs.table must be an object"),
        ("tabular-classification", {**WINE, "alcohol": ["9"]}, {}, "inputs.data.alcohol has 1 values"),
        (
            "tabular-classification",
            {**WINE, "alcohol": ["high", "low"]},
            {},
            "the model cannot use these values",
        ),
        ("tabular-classification", {"alcohol": ["9", "9"]}, {}, "missing the column"),
        ("tabular-regression", {"Species": []}, {}, "inputs.data has no rows"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(executors, task, inputs, parameters, message):
    with pytest.raises(InvalidInput, match=message):
        run(executors, task, inputs, parameters)


def ctx(user_agent: str = "") -> RequestContext:
    return RequestContext(
        request_id="r", inference_id="i", model_id="m", started_at=None, user_agent=user_agent
    )


def test_both_clients_table_bodies_reach_the_runner_as_the_table():
    table = {"a": ["1"]}
    assert table_of({"inputs": {"data": table}}) == table  # JS client, hosted docs
    assert table_of({"table": table, "parameters": {}}) == table  # Python client
    assert table_of({"inputs": table}) == table
    with pytest.raises(InvalidInput, match=r"inputs\.data is required"):
        table_of({"parameters": {}})


def test_adapters_keep_their_tasks_parameters_only():
    parsed = ADAPTERS["zero-shot-classification"].parse(
        {"inputs": "x", "parameters": {"candidate_labels": ["a"], "unknown": 1, "multi_label": None}},
        None,
        ctx(),
    )
    assert parsed.request.parameters == {"candidate_labels": ["a"]}
    qa = ADAPTERS["question-answering"].parse({"question": "q", "context": "c"}, None, ctx())
    assert qa.request.inputs == {"question": "q", "context": "c"}  # the older form, at the root


@pytest.mark.parametrize(
    ("user_agent", "legacy"),
    [
        ("huggingface_hub/0.28.1; python/3.11; torch/2.13.0", True),
        ("huggingface_hub/1.1.9; python/3.12", True),
        ("huggingface_hub/1.2.0; python/3.12", False),
        ("huggingface_hub/2.4.0; python/3.11", False),
        ("huggingface.js/4.13.30 node/20", False),
        ("curl/8.0", False),
    ],
)
def test_zero_shot_shape_by_user_agent(user_agent, legacy):
    assert wants_legacy_zero_shot(user_agent) is legacy


def test_every_text_task_documents_its_request_and_answer():
    for task in MODELS:
        doc = ADAPTERS[task].openapi
        assert doc["summary"]
        assert doc["request"]["application/json"]["schema"]["type"] == "object"
        assert "schema" in doc["responses"]["application/json"]
