"""The text tasks' routes: question-answering, fill-mask, token-classification, zero-shot-classification,
summarization, translation, table-question-answering. Each adapter keeps the parameters its task defines (unknown
ones are ignored, as the hosted API does), and documents its body and answer (serving/routes/text_schemas.py)."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Response

from models.catalog import ModelSpec
from models.types import (
    FILL_MASK,
    QUESTION_ANSWERING,
    SUMMARIZATION,
    TABLE_QUESTION_ANSWERING,
    TOKEN_CLASSIFICATION,
    TRANSLATION,
    ZERO_SHOT_CLASSIFICATION,
    RunResult,
    TaskRequest,
)
from serving.routes.base import (
    Parsed,
    RequestContext,
    TaskAdapter,
    json_response,
    parameters_of,
    require_dict,
    require_inputs,
)
from serving.routes.text_schemas import OPENAPI


class SimpleTextAdapter(TaskAdapter):
    """`{"inputs": ..., "parameters": {...}}` -> the runner's output as JSON; `params` are the kept parameters."""

    params: tuple[str, ...] = ()

    def inputs(self, body: dict[str, Any]) -> Any:
        return require_inputs(body)

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        params = {k: v for k, v in parameters_of(body).items() if k in self.params and v is not None}
        return Parsed(TaskRequest(self.task, self.inputs(body), params, ctx.request_id))

    @property
    def openapi(self) -> dict[str, Any]:
        return OPENAPI[self.task]


class QuestionAnsweringAdapter(SimpleTextAdapter):
    task = QUESTION_ANSWERING
    params = (
        "top_k",
        "doc_stride",
        "max_answer_len",
        "max_seq_len",
        "max_question_len",
        "handle_impossible_answer",
        "align_to_words",
    )

    def inputs(self, body: dict[str, Any]) -> Any:
        if body.get("inputs") is None and "question" in body:  # the older form, at the root
            return {"question": body.get("question"), "context": body.get("context")}
        return require_inputs(body)


class FillMaskAdapter(SimpleTextAdapter):
    task = FILL_MASK
    params = ("top_k", "targets")


class TokenClassificationAdapter(SimpleTextAdapter):
    task = TOKEN_CLASSIFICATION
    params = ("aggregation_strategy", "ignore_labels", "stride")


# huggingface_hub before 1.2 read zero-shot answers as {sequence, labels, scores}; later ones, the JS client and
# the hosted service use [{label, score}].
_HUB_UA = re.compile(r"huggingface_hub/(\d+)\.(\d+)")


def wants_legacy_zero_shot(user_agent: str) -> bool:
    match = _HUB_UA.search(user_agent or "")
    return match is not None and (int(match.group(1)), int(match.group(2))) < (1, 2)


class ZeroShotClassificationAdapter(SimpleTextAdapter):
    task = ZERO_SHOT_CLASSIFICATION
    params = ("candidate_labels", "multi_label", "hypothesis_template")

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        legacy = wants_legacy_zero_shot(ctx.user_agent)
        outputs = result.output if isinstance(result.output, list) else [result.output]
        shaped = [o if legacy else self.pairs(o) for o in outputs]
        return json_response(shaped if isinstance(result.output, list) else shaped[0])

    @staticmethod
    def pairs(output: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"label": lb, "score": s} for lb, s in zip(output["labels"], output["scores"], strict=True)]


class SummarizationAdapter(SimpleTextAdapter):
    task = SUMMARIZATION
    params = ("clean_up_tokenization_spaces", "truncation", "generate_parameters")


class TranslationAdapter(SimpleTextAdapter):
    task = TRANSLATION
    params = ("src_lang", "tgt_lang", "clean_up_tokenization_spaces", "truncation", "generate_parameters")


class TableQuestionAnsweringAdapter(SimpleTextAdapter):
    task = TABLE_QUESTION_ANSWERING
    params = ("padding", "sequential", "truncation")

    def inputs(self, body: dict[str, Any]) -> Any:
        if body.get("inputs") is None and "query" in body:  # the older form, at the root
            return {"query": body.get("query"), "table": body.get("table")}
        return require_inputs(body)


TEXT_ADAPTERS: tuple[TaskAdapter, ...] = (
    QuestionAnsweringAdapter(),
    FillMaskAdapter(),
    TokenClassificationAdapter(),
    ZeroShotClassificationAdapter(),
    SummarizationAdapter(),
    TranslationAdapter(),
    TableQuestionAnsweringAdapter(),
)
