"""OpenAPI request and response schemas of the text and tabular tasks (after the Hugging Face task specs,
huggingface.co/tasks, and what the clients send and read).

Each entry: `summary`, `request` (media type -> schema) and `responses` (media type -> schema), the shape the
vision and audio tasks use too (serving/routes/media_schemas.py), to describe
`POST /models/{org}/{name}/pipeline/{task}`.
"""

from __future__ import annotations

from typing import Any

_TEXT = {"type": "string", "minLength": 1}
_TEXTS = {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}]}
_SCORE = {"type": "number"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STRINGS = {"type": "array", "items": _TEXT, "minItems": 1}
_GENERATE = {
    "type": "object",
    "description": "generate() options (unknown ones are refused, naming the field)",
    "properties": {
        "max_new_tokens": {"type": "integer", "minimum": 0},
        "max_length": {"type": "integer", "minimum": 0},
        "min_length": {"type": "integer", "minimum": 0},
        "min_new_tokens": {"type": "integer", "minimum": 0},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": 8},
        "do_sample": _BOOL,
        "early_stopping": _BOOL,
        "temperature": {"type": "number", "exclusiveMinimum": 0},
        "top_k": {"type": "integer", "minimum": 0},
        "top_p": {"type": "number", "minimum": 0},
        "repetition_penalty": {"type": "number", "minimum": 0},
        "length_penalty": {"type": "number", "minimum": 0},
        "no_repeat_ngram_size": {"type": "integer", "minimum": 0},
    },
}
_TRUNCATION = {"type": "string", "enum": ["do_not_truncate", "longest_first", "only_first", "only_second"]}
_TABLE = {
    "type": "object",
    "description": "columns: {column name: [cell, ...]}, every column as long as the others",
    "minProperties": 1,
    "additionalProperties": {
        "type": "array",
        "minItems": 1,
        "items": {"oneOf": [{"type": "string"}, {"type": "number"}]},
    },
}


def _body(inputs: dict[str, Any], parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"inputs": inputs}
    if parameters is not None:
        props["parameters"] = {"type": "object", "properties": parameters}
    return {"application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": props}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _object(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _one_or_many(item: dict[str, Any]) -> dict[str, Any]:
    """One input's answer, or a list of answers for a list of inputs."""
    return {"oneOf": [item, {"type": "array", "items": item}]}


_QA_ANSWER = _object(
    ["answer", "score", "start", "end"], answer={"type": "string"}, score=_SCORE, start=_INT, end=_INT
)
_FILL = _object(
    ["score", "token", "token_str", "sequence"],
    score=_SCORE,
    token=_INT,
    token_str={"type": "string"},
    sequence={"type": "string"},
)
_ENTITY = _object(
    ["entity_group", "score", "word", "start", "end"],
    entity_group={"type": "string"},
    entity={"type": "string", "description": "with aggregation_strategy none"},
    score=_SCORE,
    word={"type": "string"},
    start=_INT,
    end=_INT,
)
_LABEL_SCORES = {
    "type": "array",
    "items": _object(["label", "score"], label={"type": "string"}, score=_SCORE),
}
_TABULAR_REQUEST = {
    "application/json": {
        "schema": {
            "type": "object",
            "description": "the table as {inputs: {data}} (JS client, hosted API) or {table} (Python client)",
            "properties": {
                "inputs": _object(["data"], data=_TABLE),
                "table": _TABLE,
            },
        }
    }
}

OPENAPI: dict[str, dict[str, Any]] = {
    "question-answering": {
        "summary": "Extract the answer to a question from a context",
        "request": _body(
            _object(["question", "context"], question=_TEXT, context=_TEXT),
            {
                "top_k": {"type": "integer", "minimum": 1, "maximum": 20},
                "doc_stride": {"type": "integer", "minimum": 0},
                "max_answer_len": {"type": "integer", "minimum": 1},
                "max_seq_len": {"type": "integer", "minimum": 16},
                "max_question_len": {"type": "integer", "minimum": 1},
                "handle_impossible_answer": _BOOL,
                "align_to_words": _BOOL,
            },
        ),
        "responses": _json({"oneOf": [_QA_ANSWER, {"type": "array", "items": _QA_ANSWER}]}),
    },
    "fill-mask": {
        "summary": "Fill the mask token of a text",
        "request": _body(_TEXTS, {"top_k": {"type": "integer", "minimum": 1}, "targets": _STRINGS}),
        "responses": _json(
            {
                "oneOf": [
                    {"type": "array", "items": _FILL},
                    {"type": "array", "items": {"type": "array", "items": _FILL}},
                ]
            }
        ),
    },
    "token-classification": {
        "summary": "Tag the entities of a text (NER)",
        "request": _body(
            _TEXTS,
            {
                "aggregation_strategy": {
                    "type": "string",
                    "enum": ["none", "simple", "first", "average", "max"],
                },
                "ignore_labels": {"type": "array", "items": _TEXT},
                "stride": {"type": "integer", "minimum": 0},
            },
        ),
        "responses": _json(
            {
                "oneOf": [
                    {"type": "array", "items": _ENTITY},
                    {"type": "array", "items": {"type": "array", "items": _ENTITY}},
                ]
            }
        ),
    },
    "zero-shot-classification": {
        "summary": "Classify a text into labels given at request time",
        "request": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs", "parameters"],
                    "properties": {
                        "inputs": _TEXTS,
                        "parameters": _object(
                            ["candidate_labels"],
                            candidate_labels={**_STRINGS, "maxItems": 32},
                            multi_label=_BOOL,
                            hypothesis_template={"type": "string", "pattern": r".*\{\}.*"},
                        ),
                    },
                }
            }
        },
        "responses": _json(
            {
                "description": "[{label, score}] by score; huggingface_hub before 1.2 gets {sequence, labels, scores}",
                **_LABEL_SCORES,
            }
        ),
    },
    "summarization": {
        "summary": "Summarize a text",
        "request": _body(
            _TEXTS,
            {
                "clean_up_tokenization_spaces": _BOOL,
                "truncation": _TRUNCATION,
                "generate_parameters": _GENERATE,
            },
        ),
        "responses": _json(
            {"type": "array", "items": _object(["summary_text"], summary_text={"type": "string"})}
        ),
    },
    "translation": {
        "summary": "Translate a text",
        "request": _body(
            _TEXTS,
            {
                "src_lang": {"type": "string", "description": "multilingual models; with tgt_lang"},
                "tgt_lang": {"type": "string", "description": "multilingual models; with src_lang"},
                "clean_up_tokenization_spaces": _BOOL,
                "truncation": _TRUNCATION,
                "generate_parameters": _GENERATE,
            },
        ),
        "responses": _json(
            {"type": "array", "items": _object(["translation_text"], translation_text={"type": "string"})}
        ),
    },
    "table-question-answering": {
        "summary": "Answer a question about a table",
        "request": _body(
            _object(["query", "table"], query=_TEXT, table=_TABLE),
            {
                "padding": {"type": "string", "enum": ["do_not_pad", "longest", "max_length"]},
                "sequential": _BOOL,
                "truncation": _BOOL,
            },
        ),
        "responses": _json(
            _object(
                ["answer", "coordinates", "cells", "aggregator"],
                answer={"type": "string"},
                coordinates={"type": "array", "items": {"type": "array", "items": _INT}},
                cells={"type": "array", "items": {"type": "string"}},
                aggregator={"type": "string", "description": "NONE, SUM, AVERAGE, COUNT"},
            )
        ),
    },
    "tabular-classification": {
        "summary": "Predict a class for each row of a table",
        "request": _TABULAR_REQUEST,
        "responses": _json(
            {
                "type": "array",
                "items": {"oneOf": [{"type": "number"}, {"type": "string"}]},
                "description": "per row",
            }
        ),
    },
    "tabular-regression": {
        "summary": "Predict a value for each row of a table",
        "request": _TABULAR_REQUEST,
        "responses": _json({"type": "array", "items": {"type": "number"}, "description": "per row"}),
    },
}
