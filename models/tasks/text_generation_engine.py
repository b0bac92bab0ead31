"""The text-generation runner's side of the batching engine: one request in, its chunks and metered result out.

The runner validates and tokenizes; this module turns the request into an `EngineRequest` (prompt ids, its
`SamplingParams`, a token callback that detokenizes and watches stop strings on the engine thread), submits it, and
turns the engine's events back into what every runner streams: StreamChunks stamped with the request's compute so
far, then the final `{"output", "usage", "timings"}`. The timings are the request's shares of the engine's steps
(see models/tasks/llm_engine.py), which the executor passes on to metering unchanged.

Catalog options (`options.engine` of a text-generation model):
  kind: batching (default) | generate   generate: transformers' generate(), one request at a time (the executor's lock)
  max_batch_size: 16                     sequences decoding together
  prefill_chunk_tokens: 256              prompt tokens per prefill step
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from core.timing import Timings
from models.errors import GenerationError, InvalidInput
from models.tasks import generation_extras
from models.tasks.llm_engine import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    BatchingEngine,
    EngineConfig,
    EngineRequest,
    GenerationEngine,
    TokenEvent,
)
from models.tasks.llm_sampling import TokenChoice, sampling_params
from models.types import Interrupted, StreamChunk, TaskRequest

log = logging.getLogger(__name__)

ENGINE_KINDS = ("batching", "generate")


def make_engine(runner: Any) -> GenerationEngine | None:
    """The engine a text-generation runner uses, from its catalog options (None: generate(), one at a time)."""
    options = dict(runner.spec.options.get("engine") or {})
    kind = options.pop("kind", "batching")
    if kind not in ENGINE_KINDS:
        raise InvalidInput(f"options.engine.kind must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    if kind == "generate":
        return None
    return BatchingEngine(runner.model, runner.device, EngineConfig.from_options(options))


def engine_stream(
    runner: Any, request: TaskRequest, should_stop: Callable[[], bool]
) -> Iterator[StreamChunk | dict[str, Any]]:
    """Run one validated request on the runner's engine: its chunks, then {"output", "usage", "timings"}.

    A request stopped by `should_stop` (or by closing this generator) raises Interrupted with its compute."""
    from models.tasks.text_generation import _Generation

    prompt_ids = runner._prompt_ids(request)
    top_n = generation_extras.top_n(request)
    params = sampling_params(request.parameters, runner._max_new_tokens(request), runner.eos_ids)
    params.top_logprobs = top_n or 0
    params.logits_hooks = generation_extras.logits_hooks(runner, request, len(prompt_ids))
    gen = _Generation(runner.tokenizer, runner._stops(request), runner.eos_ids)

    def on_token(choice: TokenChoice) -> tuple[Any, str | None]:
        top = (choice.top_logprobs or []) if top_n is not None else None
        chunk = gen.add(choice.token_id, choice.logprob, top)
        return chunk, "stop_sequence" if gen.finish_reason == "stop_sequence" else None

    req = EngineRequest(request.request_id or "", prompt_ids, params, on_token, should_stop)
    runner.engine.submit(req)
    try:
        while True:
            event = req.events.get()
            if not isinstance(event, TokenEvent):
                break
            chunk = event.payload
            if chunk is not None:
                chunk.elapsed_ns = event.compute_ns
                yield chunk
    finally:
        req.cancel()  # a consumer that went away (no-op once the request has finished)
    if event.reason == FINISH_CANCELLED:
        raise Interrupted(event.compute_ns)
    if event.reason == FINISH_ERROR:
        log.error("generation of %s failed: %r", request.request_id, event.error)
        raise GenerationError("generation failed")
    rest = gen.flush()
    if rest:
        yield StreamChunk(text=rest, elapsed_ns=event.compute_ns)
    output = {
        "text": gen.text,
        "prompt": request.inputs if isinstance(request.inputs, str) else "",
        "finish_reason": gen.finish_reason or event.reason,
        "generated_tokens": len(gen.ids),
        "seed": params.seed if params.do_sample else None,
        "tokens": [
            {"id": i, "text": runner.tokenizer.decode([i]), "logprob": lp, "special": i in runner.eos_ids}
            for i, lp in zip(gen.ids, gen.logprobs, strict=True)
        ],
    }
    if top_n is not None:
        output["top_tokens"] = gen.tops
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(gen.ids)}
    timings = Timings(
        compute_ns=event.compute_ns,
        queue_ns=event.queue_ns,
        batch_size=max(1, event.peak_batch),
        work_units=len(prompt_ids) + len(gen.ids),
        extra={"engine_steps": event.steps},
    )
    yield {"output": output, "usage": usage, "timings": timings}
