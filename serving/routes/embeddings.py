"""feature-extraction (parameters at the root) and sentence-similarity (`inputs.source_sentence`)."""

from __future__ import annotations

from typing import Any

from models.catalog import ModelSpec
from models.types import FEATURE_EXTRACTION, SENTENCE_SIMILARITY, TaskRequest
from serving.routes.base import (
    Parsed,
    RequestContext,
    TaskAdapter,
    parameters_of,
    require_dict,
    require_inputs,
)

_FE_PARAMS = ("normalize", "truncate", "prompt_name", "truncation_direction", "dimensions")


class FeatureExtractionAdapter(TaskAdapter):
    task = FEATURE_EXTRACTION

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        # The clients put these at the root; accept them under `parameters` too.
        merged = {**parameters_of(body), **{k: body[k] for k in _FE_PARAMS if k in body}}
        params = {k: merged[k] for k in _FE_PARAMS if merged.get(k) is not None}
        return Parsed(TaskRequest(FEATURE_EXTRACTION, require_inputs(body), params, ctx.request_id))


class SentenceSimilarityAdapter(TaskAdapter):
    task = SENTENCE_SIMILARITY

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        inputs = body.get("inputs")
        if inputs is None and "source_sentence" in body:  # the older form, at the root
            inputs = {"source_sentence": body.get("source_sentence"), "sentences": body.get("sentences")}
        if inputs is None:
            require_inputs(body)
        params = {k: v for k, v in parameters_of(body).items() if k in ("prompt_name",)}
        return Parsed(TaskRequest(SENTENCE_SIMILARITY, inputs, params, ctx.request_id))
