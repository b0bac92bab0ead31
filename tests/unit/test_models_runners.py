"""The task runners and the executor on the real default models, in process (no Ray)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from models.errors import InvalidInput, TaskNotSupported, UnprocessableRequest
from models.types import TaskRequest

FLUX = "local/tiny-flux"
LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB = "sentence-transformers/all-MiniLM-L6-v2"
CLS = "local/tiny-sentiment"


def run(executors, model, task, inputs, params=None, accept=None):
    return executors[model].run(TaskRequest(task, inputs, params or {}, "t", accept=accept))


# text-to-image


def test_flux_png_same_seed_same_image(executors):
    a = run(executors, FLUX, "text-to-image", "a cat", {"seed": 7}, accept="image/png")
    b = run(executors, FLUX, "text-to-image", "a cat", {"seed": 7}, accept="image/png")
    c = run(executors, FLUX, "text-to-image", "a cat", {"seed": 8}, accept="image/png")
    assert a.output["media_type"] == "image/png"
    assert a.output["content"] == b.output["content"]
    assert a.output["content"] != c.output["content"]
    assert Image.open(io.BytesIO(a.output["content"])).size == (64, 64)
    assert a.timings.compute_ns > 0 and a.timings.batch_size == 1


def test_flux_size_and_jpeg(executors):
    r = run(executors, FLUX, "text-to-image", "a dog", {"width": 96, "height": 32, "seed": 1}, accept="*/*")
    assert r.output["media_type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.output["content"])).size == (96, 32)


def test_flux_scheduler_and_negative_prompt_ignored_where_unsupported(executors):
    r = run(
        executors,
        FLUX,
        "text-to-image",
        "a dog",
        {"scheduler": "FlowMatchEulerDiscreteScheduler", "negative_prompt": "blurry", "seed": 1},
    )
    assert r.output["content"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 63}, "parameters.width"),
        ({"height": "big"}, "parameters.height"),
        ({"num_inference_steps": 500}, "parameters.num_inference_steps"),
        ({"width": 1024, "height": 1024}, "pixels"),
        ({"guidance_scale": "x"}, "parameters.guidance_scale"),
        ({"seed": -1}, "parameters.seed"),
        ({"scheduler": "NoSuchScheduler"}, "parameters.scheduler"),
    ],
)
def test_flux_bad_parameters_name_the_field(executors, params, field):
    with pytest.raises(InvalidInput, match=field.replace(".", r"\.")):
        run(executors, FLUX, "text-to-image", "a cat", params)


@pytest.mark.parametrize("inputs", ["", "   ", None, 5, ["a"]])
def test_flux_bad_inputs(executors, inputs):
    with pytest.raises(InvalidInput, match="inputs"):
        run(executors, FLUX, "text-to-image", inputs)


# generation


def test_chat_answers_with_usage(executors):
    r = run(
        executors,
        LLM,
        "chat-completion",
        [{"role": "user", "content": "What is the capital of France?"}],
        {"max_tokens": 12},
    )
    assert "Paris" in r.output["text"]
    assert r.usage["prompt_tokens"] > 5 and 0 < r.usage["completion_tokens"] <= 12


def test_generation_stop_sequence_and_length(executors):
    r = run(
        executors, LLM, "text-generation", "The capital of France is", {"max_new_tokens": 10, "stop": ["."]}
    )
    assert r.output["finish_reason"] == "stop_sequence" and "." not in r.output["text"]
    r = run(executors, LLM, "text-generation", "1, 2, 3, 4,", {"max_new_tokens": 3})
    assert r.output["finish_reason"] == "length" and r.output["generated_tokens"] == 3


def test_generation_seeded_sampling_is_reproducible(executors):
    p = {"max_new_tokens": 8, "temperature": 1.0, "seed": 42}
    a = run(executors, LLM, "text-generation", "Once upon a time", p)
    b = run(executors, LLM, "text-generation", "Once upon a time", p)
    assert a.output["text"] == b.output["text"] and a.output["seed"] == 42


def test_stream_chunks_join_to_the_final_text(executors):
    from models.types import RunResult, StreamChunk

    items = list(
        executors[LLM].stream(
            TaskRequest("chat-completion", [{"role": "user", "content": "Count to 5"}], {"max_tokens": 12})
        )
    )
    chunks, final = items[:-1], items[-1]
    assert isinstance(final, RunResult) and all(isinstance(c, StreamChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == final.output["text"]
    assert [c.elapsed_ns for c in chunks] == sorted(c.elapsed_ns for c in chunks)
    assert final.timings.compute_ns >= chunks[-1].elapsed_ns


def test_closing_a_stream_stops_generation(executors):
    gen = executors[LLM].stream(
        TaskRequest("text-generation", "Tell me a long story", {"max_new_tokens": 200})
    )
    first = next(gen)
    gen.close()
    assert first.elapsed_ns > 0
    # The executor's lock is free again: the next request runs.
    assert run(executors, LLM, "text-generation", "Hi", {"max_new_tokens": 2}).output["generated_tokens"] == 2


@pytest.mark.parametrize(
    ("task", "inputs", "params", "error", "match"),
    [
        ("text-generation", "hi", {"max_new_tokens": 100000}, InvalidInput, "max_new_tokens"),
        ("text-generation", "hi", {"temperature": -1}, InvalidInput, "temperature"),
        ("text-generation", "hi", {"top_p": 0}, InvalidInput, "top_p"),
        ("text-generation", "hi", {"stop": [1]}, InvalidInput, "stop"),
        ("text-generation", "", {}, InvalidInput, "inputs"),
        ("chat-completion", [], {}, UnprocessableRequest, "messages"),
        ("chat-completion", [{"role": "wizard", "content": "x"}], {}, UnprocessableRequest, "role"),
        ("chat-completion", [{"role": "user", "content": 5}], {}, UnprocessableRequest, "content"),
        ("text-to-image", "hi", {}, TaskNotSupported, "does not support"),
    ],
)
def test_generation_validation(executors, task, inputs, params, error, match):
    with pytest.raises(error, match=match):
        run(executors, LLM, task, inputs, params)


# embeddings and classification


def test_feature_extraction_shapes(executors):
    one = run(executors, EMB, "feature-extraction", "hello").output
    two = run(executors, EMB, "feature-extraction", ["hello", "world"]).output
    assert len(one) == 384 and isinstance(one[0], float)
    assert len(two) == 2 and len(two[0]) == 384
    assert one == pytest.approx(two[0], abs=1e-5)
    assert len(run(executors, EMB, "feature-extraction", "hi", {"dimensions": 8}).output) == 8


def test_sentence_similarity_ranks_the_identical_sentence_first(executors):
    scores = run(
        executors,
        EMB,
        "sentence-similarity",
        {"source_sentence": "a cat sits", "sentences": ["stock market news", "a cat sits"]},
    ).output
    assert scores[1] == pytest.approx(1.0, abs=1e-4) and scores[0] < scores[1]


def test_embedding_batch_matches_single_and_shares_sum(executors):
    ex = executors[EMB]
    reqs = [
        TaskRequest("feature-extraction", "short", {}),
        TaskRequest("feature-extraction", "a much longer sentence " * 5, {}),
        TaskRequest("sentence-similarity", {"source_sentence": "a", "sentences": ["b"]}, {}),
    ]
    results = ex.run_batch(reqs)
    assert results[0].output == pytest.approx(
        run(executors, EMB, "feature-extraction", "short").output, abs=1e-5
    )
    batch_ns = results[0].timings.batch_compute_ns
    assert sum(r.timings.compute_ns for r in results) == batch_ns
    assert {r.timings.batch_id for r in results} == {results[0].timings.batch_id}
    assert results[1].timings.compute_ns > results[0].timings.compute_ns  # longer input, larger share


def test_batch_with_an_invalid_request_fails_only_that_one(executors):
    results = executors[EMB].run_batch(
        [TaskRequest("feature-extraction", "ok", {}), TaskRequest("feature-extraction", "", {})]
    )
    assert isinstance(results[1], InvalidInput)
    assert results[0].timings.batch_size == 1


def test_embedding_validation(executors):
    with pytest.raises(InvalidInput, match="truncate"):
        run(executors, EMB, "feature-extraction", "word " * 1000, {"truncate": False})
    with pytest.raises(InvalidInput, match="prompt_name"):
        run(executors, EMB, "feature-extraction", "x", {"prompt_name": "nope"})
    with pytest.raises(InvalidInput, match="sentences"):
        run(executors, EMB, "sentence-similarity", {"source_sentence": "a"})


def test_text_classification(executors):
    out = run(executors, CLS, "text-classification", "I love it").output
    assert len(out) == 1 and {e["label"] for e in out[0]} == {"NEGATIVE", "POSITIVE"}
    assert sum(e["score"] for e in out[0]) == pytest.approx(1.0)
    assert out[0][0]["score"] >= out[0][1]["score"]
    top1 = run(
        executors, CLS, "text-classification", ["a", "b"], {"top_k": 1, "function_to_apply": "sigmoid"}
    ).output
    assert [len(x) for x in top1] == [1, 1]
    with pytest.raises(InvalidInput, match="function_to_apply"):
        run(executors, CLS, "text-classification", "a", {"function_to_apply": "tanh"})
