"""text-classification: `{"inputs": str | [str], "parameters": {top_k, function_to_apply}}` -> [[{label, score}]]."""

from __future__ import annotations

from typing import Any

from models.catalog import ModelSpec
from models.types import TEXT_CLASSIFICATION, TaskRequest
from serving.routes.base import (
    Parsed,
    RequestContext,
    TaskAdapter,
    parameters_of,
    require_dict,
    require_inputs,
)


class TextClassificationAdapter(TaskAdapter):
    task = TEXT_CLASSIFICATION

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        params = {k: v for k, v in parameters_of(body).items() if k in ("top_k", "function_to_apply")}
        return Parsed(TaskRequest(TEXT_CLASSIFICATION, require_inputs(body), params, ctx.request_id))
