"""Tool calls, response_format, logprobs and refused fields through the whole ingress over HTTP, with the unmodified
openai SDK and huggingface_hub InferenceClient, on a tiny model whose chat template supports tools (no Ray)."""

from __future__ import annotations

import json

import httpx
import pytest
from fixtures.tool_chat_model import CALL, MODEL_ID, TIME_TOOL, WEATHER_TOOL, spec
from huggingface_hub import InferenceClient
from openai import BadRequestError, OpenAI

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["batching", "generate"])
def url(request, tool_chat_model_dir, model_store, tmp_path_factory):
    """The service over HTTP, once per generation engine: continuous batching, and generate() one at a time."""
    from fixtures.net import serve_in_thread

    from serving.config import Settings
    from serving.http import create_app
    from serving.ingress import IngressCore
    from serving.inprocess import InProcessBackend

    work = tmp_path_factory.mktemp("tools-http")
    settings = Settings.load(
        {
            "model_store": str(model_store),
            "offline": True,
            "models": [spec(tool_chat_model_dir, request.param)],
            "metering": {"database_url": f"sqlite:///{work / 'ledger.db'}", "spool_dir": str(work / "spool")},
        },
        env={},
    )
    catalog, _ = settings.validated()
    backend = InProcessBackend(catalog, settings.load_options(), torch_threads=1)
    assert backend.executors[MODEL_ID].runner.concurrent == (request.param == "batching")
    core = IngressCore(settings, backend)
    try:
        with serve_in_thread(create_app(core)) as base:
            yield base
    finally:
        core.metering.close()


@pytest.fixture(scope="module")
def oai(url) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="sk-test")


def test_tool_call_parsed_from_the_template_format(oai):
    out = oai.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER_TOOL])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_tool_call_streamed_in_the_openai_delta_shape(oai, url):
    stream = oai.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER_TOOL], stream=True)
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""  # no tags leak
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the same stream read by huggingface_hub
    hf = InferenceClient(base_url=f"{url}/models/{MODEL_ID}", api_key="hf_test")
    hf_chunks = list(hf.chat_completion(messages=ASK, tools=[WEATHER_TOOL], stream=True))
    hf_calls = [tc for c in hf_chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in hf_calls] == ["get_weather"]
    assert hf_chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_with_huggingface_hub(url):
    hf = InferenceClient(base_url=f"{url}/models/{MODEL_ID}", api_key="hf_test")
    out = hf.chat_completion(messages=ASK, tools=[WEATHER_TOOL], tool_choice="auto")
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert out.choices[0].finish_reason == "tool_calls"


def test_earlier_tool_calls_and_results_render_through_the_template(oai):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = oai.chat.completions.create(model=MODEL_ID, messages=history, tools=[WEATHER_TOOL])
    assert out.choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_is_forced_by_constrained_decoding(oai):
    """The model would call get_weather; naming get_time forces that function, with schema-valid arguments."""
    out = oai.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    assert json.loads(call.function.arguments) in ({"zone": "UTC"}, {"zone": "CET"})
    assert out.choices[0].finish_reason == "tool_calls"


def test_required_tool_choice_without_parallel_calls_gives_exactly_one_call(oai):
    stream = oai.chat.completions.create(
        model=MODEL_ID,
        messages=ASK,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(calls[0].function.arguments), dict)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_leaves_the_text_alone(oai):
    out = oai.chat.completions.create(model=MODEL_ID, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert CALL in out.choices[0].message.content  # this model writes its call regardless: not parsed


def test_response_format_json_schema_is_enforced(oai, url):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}
    out = oai.chat.completions.create(model=MODEL_ID, messages=ASK, response_format=fmt, max_tokens=40)
    value = json.loads(out.choices[0].message.content)
    assert set(value) == {"city", "sunny"} and value["city"] in ("Paris", "Rome")
    assert out.choices[0].finish_reason == "stop"
    # huggingface_hub rewrites json_schema to {"type": "json_object", "value": schema}
    hf = InferenceClient(base_url=f"{url}/models/{MODEL_ID}", api_key="hf_test")
    hf_out = hf.chat_completion(messages=ASK, response_format=fmt, max_tokens=40)
    assert set(json.loads(hf_out.choices[0].message.content)) == {"city", "sunny"}


def test_logprobs_in_the_openai_shape(oai):
    out = oai.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none", logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == ["<tool_call>", CALL, "</tool_call>"]
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        # greedy: the chosen token is the top one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    stream = list(
        oai.chat.completions.create(
            model=MODEL_ID, messages=ASK, tools=[WEATHER_TOOL], tool_choice="none", logprobs=True, stream=True
        )
    )
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [c.token for c in content]
    assert [e.logprob for e in streamed] == pytest.approx([c.logprob for c in content])
    assert all(e.top_logprobs == [] for e in streamed)


@pytest.fixture(scope="module")
def tokenizer(tool_chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tool_chat_model_dir))


def test_logit_bias_and_penalties_change_the_answer(oai, tokenizer):
    base = oai.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=4)
    assert base.choices[0].message.content.startswith("<tool_call>")
    # -100 on the token the model wants first: it writes something else
    ban = {str(tokenizer.convert_tokens_to_ids("<tool_call>")): -100}
    biased = oai.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=4, logit_bias=ban)
    assert not biased.choices[0].message.content.startswith("<tool_call>")
    # the penalties' arithmetic is unit-tested (tests/unit/test_openai_fields.py); here: accepted and run
    penalised = oai.chat.completions.create(
        model=MODEL_ID, messages=ASK, max_tokens=3, presence_penalty=2, frequency_penalty=-2
    )
    assert penalised.choices[0].message.content.startswith("<tool_call>")  # a margin no penalty of ±2 flips


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"n": 2}, "n"),
        ({"audio": {"voice": "alloy"}}, "audio"),
        ({"store": True}, "store"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_prompt": "use tools"}, "tool_prompt"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]}, "response_format"),
        ({"logit_bias": {"99999999": 5}}, "logit_bias"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
        ),
    ],
)
def test_refused_fields_are_a_400_naming_them(url, extra, field):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": MODEL_ID, "messages": ASK, "max_tokens": 2, **extra},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


def test_openai_sdk_raises_bad_request_naming_the_field(oai):
    with pytest.raises(BadRequestError) as err:
        oai.chat.completions.create(model=MODEL_ID, messages=ASK, n=2)
    assert err.value.status_code == 400 and "n: only one choice" in str(err.value.body)


def test_no_op_fields_are_accepted(url):
    body = {
        "model": MODEL_ID,
        "messages": ASK,
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "stream_options": None,
        "n": 1,
        "modalities": ["text"],
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
