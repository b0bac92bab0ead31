"""The unmodified clients (huggingface_hub.InferenceClient, openai) against the service on real Ray Serve."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import BadRequestError, HfHubHTTPError
from openai import OpenAI
from PIL import Image

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMB = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def url(hfi_service) -> str:
    return hfi_service.url


def client(url: str, model: str) -> InferenceClient:
    return InferenceClient(base_url=f"{url}/models/{model}", api_key="hf_test_token")


def test_text_to_image_same_seed_same_image(url):
    c = client(url, "local/tiny-flux")
    a = c.text_to_image("a cat", seed=1)
    b = c.text_to_image("a cat", seed=1)
    d = c.text_to_image("a cat", seed=2, width=96, height=32, num_inference_steps=2, guidance_scale=2.0)
    assert isinstance(a, Image.Image) and a.size == (64, 64)
    assert a.tobytes() == b.tobytes()
    assert d.size == (96, 32)


def test_chat_completion(url):
    out = client(url, LLM).chat_completion(
        messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, seed=0
    )
    assert "Paris" in out.choices[0].message.content
    assert out.usage.completion_tokens > 0 and out.usage.total_tokens > out.usage.completion_tokens


def test_chat_completion_stream(url):
    c = client(url, LLM)  # keep a reference: a collected client closes its session under the stream
    chunks = list(
        c.chat_completion(messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_with_v1_base_url_and_model_in_body(url):
    c = InferenceClient(base_url=f"{url}/v1", api_key="hf_test_token")
    out = c.chat_completion(model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert out.choices[0].message.content


def test_openai_sdk_chat_stream_and_completions(url):
    o = OpenAI(base_url=f"{url}/v1", api_key="sk-test")
    out = o.chat.completions.create(model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=6)
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens > 0
    stream = o.chat.completions.create(
        model=LLM,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    comp = o.completions.create(model=LLM, prompt="1, 2, 3,", max_tokens=4)
    assert comp.choices[0].text and comp.usage.completion_tokens <= 4
    comp_stream = list(o.completions.create(model=LLM, prompt="a, b, c,", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in comp_stream if c.choices)


def test_text_generation_details_and_stream(url):
    c = client(url, LLM)
    out = c.text_generation("The capital of France is", max_new_tokens=6, details=True)
    assert out.details.generated_tokens == len(out.details.tokens) <= 6
    assert out.details.finish_reason in ("length", "eos_token", "stop_sequence")
    events = list(c.text_generation("Once upon a time", max_new_tokens=5, stream=True, details=True))
    assert events[-1].generated_text == "".join(e.token.text for e in events)
    assert events[-1].details.generated_tokens == 5
    plain = list(c.text_generation("Once upon a time", max_new_tokens=3, stream=True))
    assert all(isinstance(t, str) for t in plain)
    stopped = c.text_generation("The capital of France is", max_new_tokens=12, stop=["."])
    assert "." not in stopped


def test_feature_extraction_and_sentence_similarity(url):
    c = client(url, EMB)
    one = c.feature_extraction("hello")
    assert one.shape == (384,)
    many = c.feature_extraction(["hello", "world"])
    assert many.shape == (2, 384)
    scores = c.sentence_similarity("a cat", other_sentences=["a cat", "the stock market"])
    assert scores[0] == pytest.approx(1.0, abs=1e-3) and scores[1] < scores[0]
    per_call = InferenceClient(api_key="x").feature_extraction(
        "hi", model=f"{url}/models/{EMB}/pipeline/feature-extraction"
    )
    assert per_call.shape == (384,)


def test_text_classification(url):
    out = client(url, "local/tiny-sentiment").text_classification("I love it")
    assert {e.label for e in out} == {"NEGATIVE", "POSITIVE"}
    top = client(url, "local/tiny-sentiment").text_classification("I love it", top_k=1)
    assert len(top) == 1


def test_concurrent_embeddings_are_batched(url):
    c = client(url, EMB)
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: c.feature_extraction(f"sentence number {i}"), range(32)))
    assert all(r.shape == (384,) for r in results)


# Errors: the client raises with the server's message, with the right status.


def test_bad_parameter_is_400_naming_the_field(url):
    with pytest.raises(BadRequestError, match=r"parameters\.width"):
        client(url, "local/tiny-flux").text_to_image("a cat", width=65)
    with pytest.raises(BadRequestError, match="num_inference_steps"):
        client(url, "local/tiny-flux").text_to_image("a cat", num_inference_steps=1000)


def test_unknown_model_is_404(url):
    with pytest.raises(HfHubHTTPError, match="does not exist") as err:
        client(url, "no/such-model").text_classification("x")
    assert err.value.response.status_code == 404


def test_openai_validation_is_422(url):
    o = OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
    import openai

    with pytest.raises(openai.UnprocessableEntityError):
        o.chat.completions.create(model=LLM, messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        o.chat.completions.create(model="no/model", messages=[{"role": "user", "content": "x"}])


def test_headers_over_real_serve(url):
    r = httpx.post(f"{url}/models/{EMB}", json={"inputs": "hello"}, headers={"x-request-id": "abc-123"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"  # one value: Serve's proxy and the app agree
    assert r.headers["x-compute-type"] == "cpu-basic" and r.headers["inference-id"]
    assert float(r.headers["x-compute-time"]) > 0 and r.headers["x-sha"]
    r = httpx.post(f"{url}/models/no/model", json={"inputs": "x"})
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
