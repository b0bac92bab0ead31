"""text-generation and chat: any transformers causal LM, with a chat template, streaming, stop sequences.

One generation core serves three operations: TGI-style text-generation, OpenAI chat completions and OpenAI
completions. The serving layer shapes the output for each protocol.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from models.base import TaskRunner, param_bool, param_float, param_int
from models.errors import InvalidInput, UnprocessableRequest
from models.tasks import generation_extras
from models.types import CHAT_COMPLETION, COMPLETION, TEXT_GENERATION, StopRun, StreamChunk, TaskRequest

_ROLES = ("system", "user", "assistant", "tool", "developer")


class _Generation:
    """Incremental decoding state: turns generated token ids into text deltas, watching for stop strings."""

    def __init__(self, tokenizer: Any, stops: list[str], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""  # decoded text of self.ids, cut at a stop string when one is found
        self.emitted = 0  # characters of self.text already handed out
        self.finish_reason: str | None = None
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.logprobs: list[float | None] = []
        self.tops: list[list[dict[str, Any]]] = []

    def add(self, token_id: int, logprob: float | None, top: Any = None) -> StreamChunk | None:
        """Take one generated token; return the text it makes safe to emit (or None)."""
        self.ids.append(token_id)
        self.logprobs.append(logprob)
        chunk = StreamChunk(text="", token_id=token_id, logprob=logprob)
        if top is not None:  # alternatives asked for (top_logprobs / top_n_tokens)
            chunk.token_text = self.tokenizer.decode([token_id])
            chunk.top_logprobs = [
                {"id": i, "text": self.tokenizer.decode([i]), "logprob": lp, "special": i in self.eos_ids}
                for i, lp in top
            ]
            self.tops.append(chunk.top_logprobs)
        special = token_id in self.eos_ids
        if special:
            self.finish_reason = "eos_token"
            chunk.special = True
            return chunk
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return chunk  # an incomplete UTF-8 sequence
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop_sequence"
            text = text[:cut]
            safe = len(text)
        else:
            safe = max(self.emitted, len(text) - self.holdback)
        self.text = text
        chunk.text = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return chunk

    def flush(self) -> str:
        """Text still held back (a possible stop-string prefix) once generation ended without a stop."""
        rest = self.text[self.emitted :]
        self.emitted = len(self.text)
        return rest


class TextGenerationRunner(TaskRunner):
    tasks = (TEXT_GENERATION, CHAT_COMPLETION, COMPLETION)
    streams = True

    def load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.directory), dtype=self.dtype)
        self.model.to(self.device)
        self.model.eval()
        gen_eos = self.model.generation_config.eos_token_id
        eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        from models.tasks.text_generation_engine import make_engine

        self.engine = make_engine(self)  # continuous batching (None: generate(), one request at a time)

    @property
    def concurrent(self) -> bool:  # type: ignore[override]
        """Whether the batching engine runs this model's requests: the executor then takes no lock and bills
        each request its shares of the engine's steps (models/tasks/llm_engine.py)."""
        return getattr(self, "engine", None) is not None

    def run_metered(
        self, request: TaskRequest, should_stop: Callable[[], bool], on_step: Callable[[int], None]
    ) -> tuple[Any, dict[str, int], Any]:
        from models.tasks.text_generation_engine import engine_stream

        final: dict[str, Any] = {}
        for item in engine_stream(self, request, should_stop):
            if isinstance(item, StreamChunk):
                on_step(item.elapsed_ns)
            else:
                final = item
        return generation_extras.finish_output(request, final["output"]), final["usage"], final["timings"]

    def supported_tasks(self) -> tuple[str, ...]:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tasks
        return (TEXT_GENERATION, COMPLETION)

    # Validation and preparation

    def _messages(self, messages: Any) -> list[dict[str, Any]]:
        if not isinstance(messages, list) or not messages:
            raise UnprocessableRequest("messages must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise UnprocessableRequest(f"messages[{i}].role must be one of {', '.join(_ROLES)}")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                texts = [
                    p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
                ]
                if len(texts) != len(content):
                    raise UnprocessableRequest(f"messages[{i}].content: only text parts are supported")
                content = "".join(texts)
            if content is None and m.get("tool_calls"):
                content = ""
            if not isinstance(content, str):
                raise UnprocessableRequest(f"messages[{i}].content must be a string or a list of text parts")
            out.append({**m, "content": content})
        return out

    def _prompt_ids(self, request: TaskRequest) -> list[int]:
        if request.task == CHAT_COMPLETION:
            messages = self._messages(request.inputs)
            messages, kwargs = generation_extras.template_inputs(request, messages)
            enc = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, **kwargs
            )
            ids = enc["input_ids"] if hasattr(enc, "keys") else enc
            return list(ids[0] if ids and isinstance(ids[0], list) else ids)
        return list(self.tokenizer(request.inputs)["input_ids"])

    def _max_new_tokens(self, request: TaskRequest) -> int:
        p = request.parameters
        name = "max_new_tokens" if request.task == TEXT_GENERATION else "max_tokens"
        limit = self.spec.limits.max_new_tokens
        default = min(int(self.spec.defaults.get("max_new_tokens", 256)), limit)
        value = param_int(p, name, default, lo=1, hi=limit, hi_reason=" (this model's limit)")
        assert value is not None
        return value

    def _stops(self, request: TaskRequest) -> list[str]:
        p = request.parameters
        stop = (
            p.get("stop") if request.task != TEXT_GENERATION else (p.get("stop") or p.get("stop_sequences"))
        )
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise InvalidInput("parameters.stop must be a string or a list of non-empty strings")
        if len(stops) > 16:
            raise InvalidInput("parameters.stop has more than 16 sequences")
        return stops

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        if request.task != CHAT_COMPLETION:
            self.texts(request.inputs, allow_list=False)
        p = request.parameters
        param_float(p, "temperature", lo=0, hi=100)
        param_float(p, "top_p", lo=0, hi=1, lo_open=True)
        param_int(p, "top_k", lo=1)
        param_float(p, "repetition_penalty", lo=0, lo_open=True)
        param_int(p, "seed", lo=0, hi=2**63 - 1)
        param_bool(p, "do_sample")
        param_bool(p, "return_full_text")
        param_bool(p, "details")
        max_new = self._max_new_tokens(request)
        self._stops(request)
        generation_extras.validate(self, request)
        prompt_len = len(self._prompt_ids(request))
        if prompt_len + max_new > self.max_context:
            raise InvalidInput(
                f"inputs: {prompt_len} prompt tokens + {max_new} new tokens is more than the model's "
                f"context of {self.max_context} tokens"
            )

    def _generate_kwargs(self, request: TaskRequest) -> tuple[dict[str, Any], int | None]:
        import torch

        p = request.parameters
        temperature = p.get("temperature")
        sample = bool(p.get("do_sample")) or (temperature is not None and float(temperature) > 0)
        sample = (
            sample or p.get("top_k") is not None or (p.get("top_p") is not None and float(p["top_p"]) < 1)
        )
        kwargs: dict[str, Any] = {"max_new_tokens": self._max_new_tokens(request), "do_sample": sample}
        seed = p.get("seed")
        if sample:
            seed = int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
            torch.manual_seed(seed)
            if temperature is not None and float(temperature) > 0:
                kwargs["temperature"] = float(temperature)
            for name in ("top_p", "top_k"):
                if p.get(name) is not None:
                    kwargs[name] = p[name]
        if p.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = float(p["repetition_penalty"])
        return kwargs, seed if sample else None

    # Running

    def _run_generation(
        self, request: TaskRequest, on_chunk: Callable[[StreamChunk], None], should_stop: Callable[[], bool]
    ) -> dict[str, Any]:
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        prompt_ids = self._prompt_ids(request)
        stops = self._stops(request)
        gen = _Generation(self.tokenizer, stops, self.eos_ids)
        kwargs, seed = self._generate_kwargs(request)
        last_logprobs: list[Any] = [None]
        last_top: list[Any] = [None]
        top_n = generation_extras.top_n(request)

        class RecordLogprobs(LogitsProcessor):
            def __call__(self, input_ids, scores):
                last_logprobs[0] = torch.log_softmax(scores.float(), dim=-1)[0].clamp(min=-9999.0)
                if top_n is not None:  # per-token logprobs asked for, with top_n alternatives
                    values, indices = torch.topk(last_logprobs[0], top_n)
                    last_top[0] = list(zip(indices.tolist(), values.tolist(), strict=True))
                return scores

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                token_id = int(value.reshape(-1)[0])
                lp = last_logprobs[0]
                chunk = gen.add(token_id, float(lp[token_id]) if lp is not None else None, last_top[0])
                if chunk is not None:
                    on_chunk(chunk)

            def end(self):
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                done = gen.finish_reason is not None or should_stop()
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        ids = torch.tensor([prompt_ids], device=self.device)
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                streamer=Streamer(),
                stopping_criteria=StoppingCriteriaList([Stop()]),
                logits_processor=LogitsProcessorList(
                    [RecordLogprobs(), *generation_extras.logits_processors(self, request, len(prompt_ids))]
                ),
                pad_token_id=self.tokenizer.pad_token_id or next(iter(self.eos_ids), 0),
                **kwargs,
            )
        rest = gen.flush()
        if rest:
            on_chunk(StreamChunk(text=rest))
        finish = gen.finish_reason or ("length" if len(gen.ids) >= kwargs["max_new_tokens"] else "eos_token")
        prompt_text = request.inputs if isinstance(request.inputs, str) else ""
        output = {
            "text": gen.text,
            "prompt": prompt_text,
            "finish_reason": finish,
            "generated_tokens": len(gen.ids),
            "seed": seed,
            "tokens": [
                {"id": i, "text": self.tokenizer.decode([i]), "logprob": lp, "special": i in self.eos_ids}
                for i, lp in zip(gen.ids, gen.logprobs, strict=True)
            ],
        }
        if top_n is not None:
            output["top_tokens"] = gen.tops
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(gen.ids)}
        return {"output": output, "usage": usage}

    stoppable = True

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        if self.concurrent:
            output, usage, _ = self.run_metered(request, lambda: False, lambda elapsed_ns: None)
            return output, usage
        result = self._run_generation(request, lambda chunk: None, lambda: False)
        return generation_extras.finish_output(request, result["output"]), result["usage"]

    def run_steps(
        self, request: TaskRequest, on_step: Callable[[], None], should_stop: Callable[[], bool]
    ) -> tuple[Any, dict[str, int]]:
        result = self._run_generation(request, lambda chunk: on_step(), should_stop)
        if should_stop():  # generation ended because the client went away: nobody wants the text
            raise StopRun
        return generation_extras.finish_output(request, result["output"]), result["usage"]

    def stream(
        self, request: TaskRequest, should_stop: Callable[[], bool]
    ) -> Iterator[StreamChunk | dict[str, Any]]:
        return generation_extras.finish_stream(request, self._stream(request, should_stop))

    def _stream(
        self, request: TaskRequest, should_stop: Callable[[], bool]
    ) -> Iterator[StreamChunk | dict[str, Any]]:
        if self.concurrent:
            from models.tasks.text_generation_engine import engine_stream

            yield from engine_stream(self, request, should_stop)
            return
        chunks: queue.Queue[Any] = queue.Queue()
        cancelled = threading.Event()
        done = object()

        def work() -> None:
            try:
                final = self._run_generation(request, chunks.put, lambda: cancelled.is_set() or should_stop())
                chunks.put(final)
            except BaseException as err:  # handed to the consumer thread, raised there
                chunks.put(err)
            finally:
                chunks.put(done)

        thread = threading.Thread(target=work, name=f"generate-{request.request_id}", daemon=True)
        thread.start()
        try:
            while (item := chunks.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            thread.join()
