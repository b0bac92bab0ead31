"""Which OpenAI fields are honoured, accepted or refused; tool-call parsing (whole and streamed); constraints;
penalties and logit bias; logprobs shapes. Plain Python and tiny tensors, no server."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.tool_chat_model import CALL, TIME_TOOL, WEATHER_TOOL

from models.errors import InvalidInput
from models.tasks import chat_tools, constrained, generation_extras
from models.types import CHAT_COMPLETION, TEXT_GENERATION, StreamChunk, TaskRequest
from serving.routes import openai_fields

MSGS = [{"role": "user", "content": "hi"}]


# The field policy


@pytest.mark.parametrize(
    "extra",
    [
        {"user": "u", "metadata": {"a": "b"}, "safety_identifier": "s", "prompt_cache_key": "k"},
        {"store": False, "service_tier": "auto", "modalities": ["text"], "n": 1},
        {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
        {
            "logprobs": True,
            "top_logprobs": 5,
            "frequency_penalty": 1,
            "presence_penalty": -1,
            "logit_bias": {},
        },
        {"tools": [WEATHER_TOOL], "tool_choice": "auto", "parallel_tool_calls": False},
        {"response_format": {"type": "json_object"}, "top_k": 5, "repetition_penalty": 1.1},
        {"store": None, "audio": None},  # null is the default: accepted
    ],
)
def test_chat_fields_that_are_honoured_or_harmless_pass(extra):
    openai_fields.check_chat({"model": "m", "messages": MSGS, **extra})


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"n": 3}, "n:"),
        ({"audio": {"voice": "x"}}, "audio:"),
        ({"modalities": ["text", "audio"]}, "modalities:"),
        ({"store": True}, "store:"),
        ({"service_tier": "flex"}, "service_tier:"),
        ({"prediction": {"type": "content"}}, "prediction:"),
        ({"web_search_options": {}}, "web_search_options:"),
        ({"reasoning_effort": "low"}, "reasoning_effort:"),
        ({"verbosity": "low"}, "verbosity:"),
        ({"function_call": "auto"}, "function_call:"),
        ({"tool_prompt": "x"}, "tool_prompt:"),
        ({"best_of": 2}, "best_of"),  # a completions field: unknown to chat
        ({"stream_options": {"chunk_size": 3}}, "stream_options:"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_refused_chat_fields_name_the_field(extra, named):
    with pytest.raises(InvalidInput) as err:
        openai_fields.check_chat({"model": "m", "messages": MSGS, **extra})
    assert named in err.value.message


def test_an_unknown_field_is_refused_as_openai_does():
    with pytest.raises(InvalidInput, match="Unrecognized request argument supplied: temprature"):
        openai_fields.check_chat({"messages": MSGS, "temprature": 0.5})


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"prompt": "a", "logprobs": 2}, "logprobs:"),
        ({"prompt": "a", "best_of": 2}, "best_of:"),
        ({"prompt": "a", "n": 2}, "n:"),
        ({"prompt": "a", "suffix": "z"}, "suffix:"),
        ({"prompt": "a", "tools": []}, "tools"),
    ],
)
def test_completions_refuse_what_they_cannot_do(body, named):
    with pytest.raises(InvalidInput) as err:
        openai_fields.check_completion(body)
    assert named in err.value.message
    openai_fields.check_completion({"prompt": "a", "echo": True, "logprobs": None, "user": "u", "best_of": 1})


# response_format and grammar


def test_response_formats_map_to_constraints():
    rf = constrained.response_format_constraint
    assert rf(None) is None and rf({"type": "text"}) is None
    assert rf({"type": "json_object"}).value == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert rf({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}).value == schema
    assert rf({"type": "json_object", "value": schema}).value == schema  # huggingface_hub's rewrite
    assert rf({"type": "json", "value": json.dumps(schema)}, "grammar").value == schema  # TGI, as a string
    assert rf({"type": "json_schema", "value": {"name": "n", "schema": schema}}, "grammar").value == schema
    regex = rf({"type": "regex", "value": "[ab]+"}, "grammar")
    assert regex.kind == "regex" and regex.field == "grammar.value"
    for bad in ({"type": "json_schema"}, {"type": "json_object", "value": "not json"}, {"value": 1}, "json"):
        with pytest.raises(InvalidInput, match="response_format"):
            rf(bad)


def test_json_format_and_active_tools_do_not_mix():
    tools = chat_tools.tool_request({"tools": [WEATHER_TOOL]})
    with pytest.raises(InvalidInput, match="response_format"):
        constrained.constraint_of({"response_format": {"type": "json_object"}}, tools)
    none = chat_tools.tool_request({"tools": [WEATHER_TOOL], "tool_choice": "none"})
    assert constrained.constraint_of({"response_format": {"type": "json_object"}}, none) is not None


def test_forced_tool_choices_become_json_schemas():
    named = chat_tools.tool_request(
        {
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        }
    )
    assert constrained.tool_constraint(named).value == TIME_TOOL["function"]["parameters"]
    required = chat_tools.tool_request(
        {"tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "required", "parallel_tool_calls": False}
    )
    schema = constrained.tool_constraint(required).value
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [o["properties"]["name"]["const"] for o in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    assert constrained.tool_constraint(chat_tools.tool_request({"tools": [WEATHER_TOOL]})) is None


# Tools: requests and templates


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"tools": {"x": 1}}, "tools must be a list"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "given twice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "always"}, "tool_choice must be"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [WEATHER_TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tools_are_refused_naming_the_field(params, named):
    with pytest.raises(InvalidInput) as err:
        chat_tools.tool_request(params)
    assert named in err.value.message


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_tool_support_is_read_from_the_template():
    smollm2 = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{% endfor %}"
    )
    assert not chat_tools.template_supports_tools(_Tok(smollm2))
    assert not chat_tools.template_supports_tools(_Tok(None))
    assert chat_tools.template_supports_tools(
        _Tok("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    )
    assert chat_tools.template_supports_tools(_Tok({"default": smollm2, "tool_use": "{{ tools }}"}))
    with pytest.raises(InvalidInput, match="tools: this model's chat template has no tool support"):
        chat_tools.check_supported(_Tok(smollm2), chat_tools.tool_request({"tools": [WEATHER_TOOL]}))
    # tool_choice none sends no tools to the template, so any model takes it
    chat_tools.check_supported(
        _Tok(smollm2), chat_tools.tool_request({"tools": [WEATHER_TOOL], "tool_choice": "none"})
    )


def test_earlier_calls_reach_the_template_with_object_arguments():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    out = chat_tools.template_messages([{"role": "assistant", "content": None, "tool_calls": [call]}, *MSGS])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert call["function"]["arguments"] == '{"a": 1}'  # the request itself is left alone
    assert out[1] == MSGS[0]


# Parsing tool calls


def _calls(text):
    content, calls = chat_tools.parse_tool_calls(text)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_blocks_with_content_before_them():
    text = 'Let me look.<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    assert _calls(text) == ("Let me look.", [("a", {"x": 1}), ("b", {})])


def test_llama_and_mistral_json_calls():
    assert _calls('{"name": "a", "parameters": {"x": 2}}') == (None, [("a", {"x": 2})])
    assert _calls('[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": "z"}}]') == (
        None,
        [("a", {}), ("b", {"y": "z"})],
    )
    assert _calls('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}') == (
        None,
        [("a", {}), ("b", {})],
    )
    assert _calls('{"name": "a", "arguments": "{\\"x\\": 3}"}') == (None, [("a", {"x": 3})])  # stringified


@pytest.mark.parametrize(
    "text",
    ["Paris is sunny.", '{"city": "Paris"}', "<tool_call>{not json}</tool_call>", "[1, 2]", ""],
)
def test_text_that_is_not_a_call_stays_content(text):
    assert chat_tools.parse_tool_calls(text) == (text, [])


def test_finish_output_sets_the_finish_reason_and_ids():
    tools = chat_tools.tool_request({"tools": [WEATHER_TOOL]})
    out = chat_tools.finish_output(
        tools, {"text": f"<tool_call>{CALL}</tool_call>", "finish_reason": "eos_token"}
    )
    assert out["finish_reason"] == "tool_calls" and out["text"] == ""
    (call,) = out["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
    cut = chat_tools.finish_output(tools, {"text": "<tool_call>{", "finish_reason": "length"})
    assert "tool_calls" not in cut and cut["finish_reason"] == "length" and cut["text"] == "<tool_call>{"
    plain = chat_tools.finish_output(
        None, {"text": f"<tool_call>{CALL}</tool_call>", "finish_reason": "eos_token"}
    )
    assert "tool_calls" not in plain


def test_parallel_tool_calls_false_keeps_the_first_call():
    tools = chat_tools.tool_request({"tools": [WEATHER_TOOL], "parallel_tool_calls": False})
    text = f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>"
    assert (
        len(chat_tools.finish_output(tools, {"text": text, "finish_reason": "eos_token"})["tool_calls"]) == 1
    )


def test_forced_calls_read_the_constrained_json():
    named = chat_tools.tool_request(
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    (call,) = chat_tools.forced_calls(named, '{"city": "Rome"}')
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    required = chat_tools.tool_request({"tools": [WEATHER_TOOL], "tool_choice": "required"})
    calls = chat_tools.forced_calls(required, '[{"name": "get_weather", "arguments": {"city": "Paris"}}]')
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert chat_tools.forced_calls(required, '[{"name": "get_weather", "argu') == []  # cut by max_tokens


# Streaming tool calls


def _stream(tools, pieces, finish="eos_token"):
    items = [StreamChunk(text=p, token_id=i) for i, p in enumerate(pieces)]
    final = {"output": {"text": "".join(pieces), "finish_reason": finish}, "usage": {}}
    out = list(chat_tools.stream_with_tools(tools, iter([*items, final])))
    content = "".join(c.text for c in out if isinstance(c, StreamChunk))
    calls = [tc for c in out if isinstance(c, StreamChunk) for tc in (c.tool_calls or [])]
    return content, calls, out[-1]["output"]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_calls_match_whatever_the_split(size):
    """The answer arrives in pieces of any size: the content before the call streams, the tags never leak."""
    tools = chat_tools.tool_request({"tools": [WEATHER_TOOL, TIME_TOOL]})
    text = (
        f"Sure. <tool_call>{CALL}</tool_call>\n<tool_call>"
        + '{"name": "get_time", "arguments": {"zone": "UTC"}}'
    )
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    content, calls, output = _stream(tools, pieces)
    assert content.strip() == "Sure."
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert output["finish_reason"] == "tool_calls" and len(output["tool_calls"]) == 2


def test_streamed_content_passes_through_with_only_a_possible_tag_held():
    tools = chat_tools.tool_request({"tools": [WEATHER_TOOL]})
    parser = chat_tools.ToolStream(tools)
    assert parser.feed("Hello <tool") == ("Hello ", [])  # "<tool" may open a call: held
    assert parser.feed("s are fun") == ("<tools are fun", [])  # it did not
    assert parser.finish() == ("", [])


def test_a_json_answer_is_held_then_read_whole():
    tools = chat_tools.tool_request({"tools": [WEATHER_TOOL]})
    content, calls, output = _stream(tools, ['{"name": "get_weather", ', '"parameters": {"city": "Rome"}}'])
    assert content == "" and calls[0]["function"]["arguments"] == '{"city": "Rome"}'
    content, calls, output = _stream(tools, ['{"weather"', ': "fine"}'])  # JSON, but not a call: content
    assert content == '{"weather": "fine"}' and calls == [] and output["finish_reason"] == "eos_token"


def test_forced_streams_emit_the_call_at_the_end():
    named = chat_tools.tool_request(
        {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    content, calls, output = _stream(named, ['{"city"', ': "Paris"}'])
    assert content == "" and calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    assert output["finish_reason"] == "tool_calls"


# Penalties, bias, top logprobs


def test_penalties_follow_openai_definition():
    scores = torch.zeros(1, 5)
    ids = torch.tensor([[4, 4, 1, 1, 1, 2]])  # prompt [4, 4], then 1 three times and 2 once
    out = generation_extras.Penalties(frequency=0.5, presence=1.0, prompt_len=2)(ids, scores)
    assert out.tolist() == [[0.0, -2.5, -1.5, 0.0, 0.0]]  # the prompt's token 4 is not penalised
    assert generation_extras.Penalties(1, 1, prompt_len=6)(ids, scores).tolist() == [[0.0] * 5]


def test_logit_bias_adds_to_the_named_tokens_in_both_shapes():
    bias = generation_extras.LogitBias({1: -100.0, 3: 2.5})
    assert bias(None, torch.zeros(1, 4)).tolist() == [[0.0, -100.0, 0.0, 2.5]]
    assert bias(None, torch.zeros(4)).tolist() == [0.0, -100.0, 0.0, 2.5]  # the engine's per-row form


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": "x"}, "presence_penalty"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias[1]"),
        ({"logit_bias": {"50": 1}}, "outside the vocabulary"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 1}, "needs logprobs"),
        ({"logprobs": "yes"}, "logprobs must be a boolean"),
    ],
)
def test_sampling_extras_are_checked(params, named):
    class Runner:
        tokenizer = _Tok(None)
        eos_ids = {0}

        class model:
            class config:
                vocab_size = 50

    with pytest.raises(InvalidInput) as err:
        generation_extras.validate(Runner, TaskRequest(CHAT_COMPLETION, MSGS, params))
    assert named in err.value.message


def test_top_n_per_protocol():
    assert generation_extras.top_n(TaskRequest(CHAT_COMPLETION, MSGS, {})) is None
    assert generation_extras.top_n(TaskRequest(CHAT_COMPLETION, MSGS, {"logprobs": True})) == 0
    assert (
        generation_extras.top_n(TaskRequest(CHAT_COMPLETION, MSGS, {"logprobs": True, "top_logprobs": 4}))
        == 4
    )
    assert generation_extras.top_n(TaskRequest(TEXT_GENERATION, "x", {"top_n_tokens": 2})) == 2
    assert generation_extras.top_n(TaskRequest(TEXT_GENERATION, "x", {"details": True})) is None


def test_logprobs_content_leaves_out_the_end_token():
    output = {
        "tokens": [
            {"id": 5, "text": " café", "logprob": -0.5, "special": False},
            {"id": 0, "text": "", "logprob": -0.1, "special": True},
        ],
        "top_tokens": [
            [{"id": 5, "text": " café", "logprob": -0.5}],
            [{"id": 0, "text": "", "logprob": -0.1}],
        ],
    }
    assert openai_fields.logprobs_of(output) == {
        "content": [
            {
                "token": " café",
                "logprob": -0.5,
                "bytes": list(" café".encode()),
                "top_logprobs": [{"token": " café", "logprob": -0.5, "bytes": list(" café".encode())}],
            }
        ],
        "refusal": None,
    }


# The grammar mask on a real tokenizer


def test_grammar_mask_allows_only_what_the_schema_accepts(tool_chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tool_chat_model_dir))
    eos = {tok.eos_token_id}
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    constraint = constrained.response_format_constraint({"type": "json_object", "value": schema})
    proc = constrained.GrammarLogitsProcessor(tok, eos, constraint, prompt_len=1)
    hook = constrained.GrammarLogitsProcessor(tok, eos, constraint, prompt_len=1).hook
    ids, history = [7], [7]
    vocab = len(tok)
    for _ in range(40):  # greedy on random scores: the grammar alone decides what is written
        scores = torch.randn(1, vocab)
        masked = proc(torch.tensor([ids]), scores.clone())
        assert torch.equal(hook(history, scores[0].clone()), masked[0])  # both calling forms agree
        nxt = int(masked.argmax())
        ids.append(nxt)
        history.append(nxt)
        if nxt in eos:
            break
    text = tok.decode(ids[1:], skip_special_tokens=True)
    assert json.loads(text) == {"city": "Paris"} and ids[-1] in eos
    with pytest.raises(InvalidInput, match=r"response_format\.json_schema\.schema"):
        constrained.check(
            tok,
            eos,
            constrained.response_format_constraint(
                {"type": "json_schema", "json_schema": {"schema": {"type": "object", "if": {}}}}
            ),
        )


# The TGI route


def test_tgi_parameters_it_cannot_do_are_refused_with_a_400_naming_them():
    """Named, and never in transformers' "`model_kwargs` are not used" words: on those huggingface_hub's client
    marks the model as not served by TGI for the rest of its process, and then refuses to stream from it."""
    from huggingface_hub.inference._client import MODEL_KWARGS_NOT_USED_REGEX

    from serving.routes.base import RequestContext
    from serving.routes.generation import TextGenerationAdapter

    ctx = RequestContext("r", "i", "m", None)
    body = {"inputs": "x", "parameters": {"watermark": True, "truncate": 10, "best_of": 1, "top_n_tokens": 2}}
    with pytest.raises(InvalidInput) as err:
        TextGenerationAdapter().parse(body, None, ctx)
    # Named, in order, and not in the phrase that makes huggingface_hub treat the model as not served by TGI.
    assert err.value.message.startswith("parameters.truncate, parameters.watermark: not supported")
    assert not MODEL_KWARGS_NOT_USED_REGEX.search(err.value.message)
    defaults = {
        "best_of": 1,
        "decoder_input_details": False,
        "watermark": False,
        "top_n_tokens": 2,
        "grammar": None,
    }
    parsed = TextGenerationAdapter().parse({"inputs": "x", "parameters": defaults}, None, ctx)
    assert parsed.request.parameters == {"top_n_tokens": 2}
