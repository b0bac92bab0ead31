"""OpenAI fields on the default chat model (SmolLM2-135M-Instruct) through the service on real Ray Serve, with the
unmodified openai SDK and huggingface_hub InferenceClient: logprobs, response_format, penalties, refusals.

SmolLM2's chat template has no tool support, so `tools` is a 400 here; tool calls themselves are tested on a
model whose template has it (tests/integration/test_openai_tools.py)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import BadRequestError as HfBadRequest
from openai import BadRequestError, OpenAI

LLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Describe a cat named Tom as JSON with his name and age."}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def oai(hfi_service) -> OpenAI:
    return OpenAI(base_url=f"{hfi_service.url}/v1", api_key="sk-test")


@pytest.fixture(scope="module")
def hf(hfi_service) -> InferenceClient:
    return InferenceClient(base_url=f"{hfi_service.url}/models/{LLM}", api_key="hf_test_token")


def test_logprobs_and_top_logprobs(oai):
    out = oai.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, logprobs=True, top_logprobs=2
    )
    content = out.choices[0].logprobs.content
    assert 0 < len(content) <= 5
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest
    chunks = list(
        oai.chat.completions.create(
            model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, logprobs=True, stream=True
        )
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_response_format_json_object_and_schema(oai, hf):
    question = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    free = oai.chat.completions.create(
        model=LLM, messages=question, max_tokens=40, response_format={"type": "json_object"}
    )
    assert free.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(free.choices[0].message.content), dict)
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA, "strict": True}}
    chunks = list(
        oai.chat.completions.create(model=LLM, messages=ASK, max_tokens=40, response_format=fmt, stream=True)
    )
    value = json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    # huggingface_hub sends json_schema as {"type": "json_object", "value": schema}
    out = hf.chat_completion(messages=ASK, max_tokens=40, response_format=fmt)
    assert set(json.loads(out.choices[0].message.content)) == {"name", "age"}


def test_penalties_and_logit_bias_are_honoured(oai, hfi_service):
    from transformers import AutoTokenizer

    kwargs = {"model": LLM, "messages": [{"role": "user", "content": "Say: 1, 1, 1, 1, 1"}], "max_tokens": 8}
    plain = oai.chat.completions.create(**kwargs).choices[0].message.content
    penalised = oai.chat.completions.create(**kwargs, frequency_penalty=2, presence_penalty=2)
    assert penalised.choices[0].message.content != plain
    tokenizer = AutoTokenizer.from_pretrained(str(hfi_service.model_store / "smollm2-135m-instruct"))
    first = tokenizer(plain)["input_ids"][0]
    biased = oai.chat.completions.create(**kwargs, logit_bias={str(first): -100})
    assert tokenizer(biased.choices[0].message.content)["input_ids"][0] != first


def test_tgi_details_top_tokens_and_grammar(hf):
    out = hf.text_generation("The capital of France is", max_new_tokens=4, details=True, top_n_tokens=3)
    assert len(out.details.top_tokens) == len(out.details.tokens) == out.details.generated_tokens
    for chosen, top in zip(out.details.tokens, out.details.top_tokens, strict=True):
        # huggingface_hub leaves this list of lists as plain dicts
        assert len(top) == 3 and top[0]["id"] == chosen.id
        assert top[0]["logprob"] == pytest.approx(chosen.logprob) and top[0]["logprob"] >= top[1]["logprob"]
    events = list(
        hf.text_generation("Once upon", max_new_tokens=3, stream=True, details=True, top_n_tokens=2)
    )
    assert all(len(e.top_tokens) == 2 for e in events)
    text = hf.text_generation(
        "A cat as JSON:", max_new_tokens=40, grammar={"type": "json", "value": SCHEMA}, seed=0
    )
    assert set(json.loads(text)) == {"name", "age"}


def test_refusals_name_the_field(oai, hf):
    with pytest.raises(BadRequestError) as err:
        oai.chat.completions.create(model=LLM, messages=ASK, max_tokens=2, tools=[TOOL])
    assert "tools: this model's chat template has no tool support" in str(err.value.body)
    with pytest.raises(HfBadRequest, match="tools"):
        hf.chat_completion(messages=ASK, max_tokens=2, tools=[TOOL])
    with pytest.raises(BadRequestError) as err:
        oai.chat.completions.create(model=LLM, messages=ASK, max_tokens=2, extra_body={"guided_json": SCHEMA})
    assert "Unrecognized request argument supplied: guided_json" in str(err.value.body)
    with pytest.raises(BadRequestError) as err:
        oai.chat.completions.create(model=LLM, messages=ASK, max_tokens=2, n=2)
    assert "n: only one choice" in str(err.value.body)
    from huggingface_hub.errors import ValidationError  # text_generation's name for a 400

    with pytest.raises(ValidationError, match=r"parameters\.watermark: not supported"):
        hf.text_generation("Hi", max_new_tokens=2, watermark=True)
    # ... and the client still streams from this model afterwards (a transformers-style "model_kwargs are not
    # used" refusal would have made it treat the model as not served by TGI, and refuse to stream).
    assert "".join(hf.text_generation("Hi", max_new_tokens=2, stream=True))
