"""text-to-image: `{"inputs": prompt, "parameters": {...}}`, answered with image bytes chosen by Accept."""

from __future__ import annotations

from typing import Any

from fastapi import Response

from models.catalog import ModelSpec
from models.types import TEXT_TO_IMAGE, RunResult, TaskRequest
from serving.routes.base import (
    Parsed,
    RequestContext,
    TaskAdapter,
    parameters_of,
    require_dict,
    require_inputs,
)

_PARAMS = ("negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "scheduler", "seed")


class TextToImageAdapter(TaskAdapter):
    task = TEXT_TO_IMAGE

    def parse(self, body: Any, spec: ModelSpec, ctx: RequestContext) -> Parsed:
        body = require_dict(body)
        params = parameters_of(body)
        # Older clients sent a nested target_size; unknown parameters are ignored, as the hosted API does.
        size = params.get("target_size")
        if isinstance(size, dict):
            params.setdefault("width", size.get("width"))
            params.setdefault("height", size.get("height"))
        kept = {k: params[k] for k in _PARAMS if params.get(k) is not None}
        request = TaskRequest(TEXT_TO_IMAGE, require_inputs(body), kept, ctx.request_id, accept=ctx.accept)
        return Parsed(request)

    def render(self, result: RunResult, parsed: Parsed, ctx: RequestContext) -> Response:
        return Response(result.output["content"], media_type=result.output["media_type"])
