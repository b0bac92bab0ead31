"""Continuous batching for causal LMs: one engine thread per replica runs every in-flight generation together.

Requests join and leave the running batch between any two steps. A step is either one chunk of one newcomer's
prompt (a prefill, on its own KV cache, so the running sequences are never recomputed) or one decode token for
every running sequence (one batched forward over a left-padded KV cache). A finished prefill merges its cache into
the batch; a sequence that ends (EOS, length, a stop string, its client gone) leaves it at the next step.

Metering by step: each step is timed on the engine thread's monotonic clock (device-synchronised on CUDA), from
the end of the previous step (or the wake-up from idle) to its own end, so the steps tile the engine's busy time.
The step's time is split across the sequences in it by the tokens each processed (prompt tokens of a prefill
chunk, 1 for a decode) with largest remainder (`core.timing.split_batch_ns`): the shares add up to the step
exactly, and a request's compute is the sum of its shares. So the compute billed to all requests adds up to
`busy_ns`, the time the engine was working.

The engine knows nothing of tokenizers or protocols: a request's `on_token` callback (run on the engine thread,
inside the step, so it is billed) turns each token into whatever its caller streams and may end the sequence.
`GenerationEngine` is the interface the text-generation runner uses; another engine (vLLM, SGLang, transformers'
own continuous batching manager) can stand behind it.

One request's failure is its own. What is per row fails only its row: its logits hooks (a grammar), its
sampling, its token callback. A forward pass that fails is retried without the culprit: a group prefill runs each
of its prompts alone, at once, and a decode step first runs each row alone on a copy of its cache (the batch's
cache is cut back to before the step), then the batch goes on without the rows that failed alone. Only the
requests that fail on their own end with an error; the time of the failed attempt and of the retries that found
them is split across them (a "failed" step), so the steps still add up to the engine's busy time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.timing import split_batch_ns
from models.tasks.llm_sampling import RowSampler, SamplingParams, TokenChoice, choose_tokens

log = logging.getLogger(__name__)

# on_token(choice) -> (payload to stream with this token, finish reason or None to go on)
OnToken = Callable[[TokenChoice], tuple[Any, str | None]]

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass
class TokenEvent:
    """One generated token of one request, with its payload and the request's compute so far."""

    choice: TokenChoice
    payload: Any
    compute_ns: int


@dataclass
class FinishEvent:
    """The last event of a request: why it ended and what it consumed."""

    reason: str
    compute_ns: int
    queue_ns: int
    steps: int
    peak_batch: int
    error: BaseException | None = None


class EngineRequest:
    """One generation in an engine: its prompt and settings in, its events out (a thread-safe queue).

    `should_stop()` is polled before every step (a client that went away); `cancel()` does the same from any
    thread. Both end the request at the next step with a FinishEvent("cancelled")."""

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_token: OnToken | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("a generation needs at least one prompt token")
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_token = on_token
        self.should_stop = should_stop
        self.events: queue.Queue[TokenEvent | FinishEvent] = queue.Queue()
        self._cancelled = threading.Event()
        # Owned by the engine thread once submitted:
        self.generated: list[int] = []
        self.compute_ns = 0
        self.steps = 0
        self.peak_batch = 0
        self.submitted_ns = 0
        self.started_ns: int | None = None
        self.prefilled = 0  # prompt tokens already in this request's own cache (chunked prefill)
        self.prefill_cache: Any = None
        self.sampler: RowSampler | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.error: BaseException | None = None  # why it failed, when it did (FINISH_ERROR)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        if self._cancelled.is_set():
            return True
        if self.should_stop is not None and self.should_stop():
            self._cancelled.set()
            return True
        return False

    @property
    def history(self) -> list[int]:
        return self.prompt_ids + self.generated


@dataclass
class StepRecord:
    """What one engine step did (kept for the last `history` steps: tests and diagnostics)."""

    # "prefill" | "decode" | "failed": a failed forward and its retries, split across the requests that failed
    # on their own (or across a group whose prompts each ran alone once the group's prefill failed)
    kind: str
    step_ns: int
    request_ids: list[str]
    tokens: list[int]
    shares_ns: list[int]


class GenerationEngine(ABC):
    """What the text-generation runner needs from an engine: take requests from any thread, run them
    concurrently, and deliver each one's events to its own queue, with its metered compute."""

    max_batch_size: int = 1

    @abstractmethod
    def submit(self, request: EngineRequest) -> None:
        """Queue a request; its events arrive on `request.events`, the last one a FinishEvent."""

    @abstractmethod
    def close(self) -> None:
        """Fail what is in flight and stop the engine."""

    @property
    @abstractmethod
    def busy_ns(self) -> int:
        """Total time the engine spent in steps: the sum of every request's compute."""

    @abstractmethod
    def occupancy(self) -> tuple[int, int]:
        """(sequences generating now, sequences waiting for their first step): what `hfi status` shows as the
        model's work in progress and its queue."""


@dataclass
class EngineConfig:
    """The batching engine's knobs (a catalog entry's `options.engine`)."""

    max_batch_size: int = 16  # sequences decoding together
    # Prompt tokens per prefill step: newcomers whose prompts fit together share one step; a longer prompt is
    # prefilled in chunks of this size, so it stalls the running sequences one chunk at a time.
    prefill_chunk_tokens: int = 256
    # While sequences are decoding, newcomers are prefilled together rather than one per step: a prefill step
    # waits until this many are queued (or as many as there are free rows), or until the oldest has waited this
    # many decode steps. A prefill has a large fixed cost (on this CPU one 30-token prompt costs as much as a
    # 16-row decode step, eight of them together about four), so this trades a little time to first token for
    # throughput. An idle engine prefills at once.
    prefill_group_min: int = 4
    prefill_max_wait_steps: int = 8
    history: int = 4096  # step records kept for diagnostics

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> EngineConfig:
        from models.errors import InvalidInput

        options = dict(options or {})
        cfg = cls()
        minimum = {"prefill_max_wait_steps": 0}
        for name in ("max_batch_size", "prefill_chunk_tokens", "prefill_group_min", "prefill_max_wait_steps"):
            if name in options:
                value = options.pop(name)
                lo = minimum.get(name, 1)
                if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                    raise InvalidInput(f"options.engine.{name} must be an integer >= {lo}, got {value!r}")
                setattr(cfg, name, value)
        if options:
            raise InvalidInput(f"options.engine: unknown setting(s) {', '.join(sorted(options))}")
        return cfg


class BatchingEngine(GenerationEngine):
    """Continuous batching over a transformers causal LM with a left-padded dynamic KV cache (see module doc)."""

    def __init__(self, model: Any, device: str, config: EngineConfig | None = None) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model = model
        self.device = device
        self.config = config or EngineConfig()
        self.model_config = model.config
        import inspect

        # transformers 5.3x renames the forward's `past_key_values` to `cache` (the old name warns until 5.40)
        self._cache_kwarg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        # Rows can be merged and dropped only in a cache of plain full-attention layers; anything else (sliding
        # windows, linear attention) runs one sequence at a time through the same loop.
        probe = DynamicCache(config=model.config)
        self.batchable = bool(probe.layers) and all(type(layer) is DynamicLayer for layer in probe.layers)
        self.max_batch_size = self.config.max_batch_size if self.batchable else 1
        self._cv = threading.Condition()
        self._inbox: list[EngineRequest] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        # Engine-thread state
        self.waiting: deque[EngineRequest] = deque()
        self.rows: list[EngineRequest] = []
        self.cache: Any = None
        self.mask: Any = None  # [rows, kv length] 1 where a row has a real token
        self.positions: list[int] = []
        self.next_tokens: list[int] = []
        self._last_prefill = False
        self._decodes_waited = 0  # decode steps since the queue's head arrived with nothing prefilled
        self._busy_ns = 0
        self.steps: deque[StepRecord] = deque(maxlen=self.config.history)

    # Any thread

    def submit(self, request: EngineRequest) -> None:
        request.submitted_ns = time.perf_counter_ns()
        with self._cv:
            if self._closing:
                raise RuntimeError("the generation engine is closed")
            self._inbox.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
                self._thread.start()
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def busy_ns(self) -> int:
        return self._busy_ns

    def occupancy(self) -> tuple[int, int]:
        """Read from any thread: the batch's rows (and a long prompt being prefilled in chunks) are generating;
        the rest of the queue, and what was submitted since the engine last looked, wait."""
        with self._cv:
            inbox = len(self._inbox)
        waiting = [r for r in list(self.waiting) if not r.finished]
        chunking = 1 if waiting and waiting[0].prefilled else 0
        running = sum(1 for r in list(self.rows) if not r.finished)  # a finished row leaves at the step's end
        return running + chunking, len(waiting) - chunking + inbox

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    # The engine thread

    def _loop(self) -> None:
        import torch

        step_start = time.perf_counter_ns()
        while True:
            with self._cv:
                idle = not self._inbox and not self.waiting and not self.rows
                while not self._inbox and not self.waiting and not self.rows and not self._closing:
                    self._cv.wait()
                if self._closing:
                    break
                self.waiting.extend(self._inbox)
                self._inbox.clear()
            if idle:  # the clock of a step starts when there is work, never across an idle wait
                step_start = time.perf_counter_ns()
            try:
                with torch.inference_mode():
                    step_start = self._step(step_start)
            except Exception as err:  # the engine's own fault (a request's own is isolated in its step)
                log.exception("generation step failed")
                self._fail_all(err)
                step_start = time.perf_counter_ns()
        self._fail_all(RuntimeError("the generation engine stopped"))
        with self._cv:
            for req in self._inbox:
                self._finish(req, FINISH_ERROR, RuntimeError("the generation engine stopped"))
            self._inbox.clear()

    def _step(self, step_start: int) -> int:
        """Run one step (a prefill chunk or a decode) if there is one; return when the next step starts."""
        self._drop_cancelled()
        if self._want_prefill():
            self._last_prefill = True
            self._decodes_waited = 0
            return self._prefill_step(step_start)
        self._last_prefill = False
        if self.rows:
            if self.waiting:
                self._decodes_waited += 1
            return self._decode_step(step_start)
        return step_start

    def _want_prefill(self) -> bool:
        free = self.max_batch_size - len(self.rows)
        if not self.waiting or free <= 0:
            return False
        if not self.rows:
            return True
        if self._last_prefill:  # never two prefills in a row while sequences wait for their next token
            return False
        cfg = self.config
        return (
            len(self.waiting) >= min(free, cfg.prefill_group_min)
            or self._decodes_waited >= cfg.prefill_max_wait_steps
            or self.waiting[0].prefilled > 0  # a chunked prefill under way goes on
        )

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, FINISH_CANCELLED)
        gone = [i for i, r in enumerate(self.rows) if r.cancelled]
        if gone:
            for i in gone:
                self._finish(self.rows[i], FINISH_CANCELLED)
            self._drop_rows(set(gone))

    def _prefill_step(self, step_start: int) -> int:
        """Prefill the newcomers at the head of the queue that fit the step's token budget together (one padded
        forward), or the next chunk of a prompt longer than the budget (alone, on its own cache)."""
        head = self.waiting[0]
        budget = self.config.prefill_chunk_tokens
        if head.prefilled or len(head.prompt_ids) > budget:
            return self._prefill_chunk(head, step_start)
        room = self.max_batch_size - len(self.rows)
        group: list[EngineRequest] = []
        used = 0
        for req in self.waiting:
            if len(group) >= room or req.prefilled or used + len(req.prompt_ids) > budget:
                break
            group.append(req)
            used += len(req.prompt_ids)
        return self._prefill_group(group, step_start)

    def _start(self, req: EngineRequest, step_start: int) -> None:
        if req.started_ns is None:
            req.started_ns = step_start
            req.sampler = RowSampler(req.params, self.device)

    def _prefill_group(self, group: list[EngineRequest], step_start: int) -> int:
        for req in list(group):
            try:
                self._start(req, step_start)
            except Exception as err:  # its own settings (a seed the generator refuses): nothing ran for it
                group.remove(req)
                self.waiting.remove(req)
                self._finish(req, FINISH_ERROR, err)
        if not group:
            return step_start
        try:
            out, cache, mask = self._prefill_forward(group)
        except Exception as err:
            return self._prefill_failed(group, step_start, err)
        return self._prefill_done(group, out, cache, mask, step_start)

    def _prefill_forward(self, group: list[EngineRequest]) -> tuple[Any, Any, Any]:
        """One left-padded forward over the group's prompts, on a cache of its own: (output, cache, mask)."""
        import torch
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in group]
        longest = max(lengths)
        ids = torch.tensor([[0] * (longest - n) + r.prompt_ids for r, n in zip(group, lengths, strict=True)])
        mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lengths])
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model_config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        if len(group) > 1 and longest > min(lengths):  # padded positions' keys and values: zeros, never NaN
            keep = mask[:, None, :, None].to(torch.bool)
            for layer in cache.layers:
                layer.keys = layer.keys.masked_fill(~keep, 0)
                layer.values = layer.values.masked_fill(~keep, 0)
        return out, cache, mask

    def _prefill_done(
        self, group: list[EngineRequest], out: Any, cache: Any, mask: Any, step_start: int
    ) -> int:
        """A group's prefill ran: each newcomer's first token, and the group joins the batch."""
        lengths = [len(r.prompt_ids) for r in group]
        errors: dict[int, BaseException] = {}
        choices = choose_tokens(
            out.logits[:, -1, :].float(),
            [r.sampler for r in group],  # type: ignore[misc]
            [r.history for r in group],
            lengths,
            errors,
        )
        for req in group:  # only now: they leave the queue once their prefill ran
            self.waiting.remove(req)
        self._join(group, cache, mask)
        payloads = self._take(group, choices, errors)
        end = self._end_step(step_start, "prefill", group, lengths)
        self._deliver(group, choices, payloads)
        return end

    def _prefill_failed(self, group: list[EngineRequest], step_start: int, err: BaseException) -> int:
        """A group's prefill failed: run each prompt alone, now, each a step of its own. Those that fail alone end
        with their error and pay the failed attempts (the group's and their own); the others join the batch."""
        self.sync()
        now = time.perf_counter_ns()
        lost_ns = now - step_start
        failed: list[tuple[EngineRequest, BaseException]] = []
        if len(group) == 1:
            failed.append((group[0], err))
        else:
            log.warning("a prefill of %d prompts failed (%r): retrying each alone", len(group), err)
            for req in group:
                try:
                    out, cache, mask = self._prefill_forward([req])
                except Exception as own:
                    self.sync()
                    end = time.perf_counter_ns()
                    lost_ns, now = lost_ns + end - now, end
                    failed.append((req, own))
                    continue
                now = self._prefill_done([req], out, cache, mask, now)
            if not failed:  # each ran alone, only the group failed: its time goes to the group, which goes on
                self._account("failed", lost_ns, group, [len(r.prompt_ids) for r in group])
                return now
        for req, _ in failed:
            self.waiting.remove(req)
        self._fail(failed, lost_ns, [len(r.prompt_ids) for r, _ in failed])
        return now

    def _prefill_chunk(self, req: EngineRequest, step_start: int) -> int:
        import torch
        from transformers import DynamicCache

        self._start(req, step_start)
        if req.prefill_cache is None:
            req.prefill_cache = DynamicCache(config=self.model_config)
        start = req.prefilled
        chunk = req.prompt_ids[start : start + self.config.prefill_chunk_tokens]
        try:
            out = self.model(
                input_ids=torch.tensor([chunk], device=self.device),
                attention_mask=torch.ones((1, start + len(chunk)), dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, start + len(chunk), device=self.device).unsqueeze(0),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kwarg: req.prefill_cache},
            )
        except Exception as err:  # alone in its step: it fails, nobody else
            self.sync()
            end = time.perf_counter_ns()
            self.waiting.remove(req)
            req.prefill_cache = None
            self._fail([(req, err)], end - step_start, [len(chunk)])
            return end
        req.prefilled += len(chunk)
        if req.prefilled < len(req.prompt_ids):
            return self._end_step(step_start, "prefill", [req], [len(chunk)])
        assert req.sampler is not None
        logits = out.logits[:, -1, :].float()
        errors: dict[int, BaseException] = {}
        choice = choose_tokens(logits, [req.sampler], [req.history], [len(req.prompt_ids)], errors)[0]
        self.waiting.remove(req)
        cache, req.prefill_cache = req.prefill_cache, None
        self._join([req], cache, torch.ones((1, req.prefilled), dtype=torch.long, device=self.device))
        payloads = self._take([req], [choice], errors)
        end = self._end_step(step_start, "prefill", [req], [len(chunk)])
        self._deliver([req], [choice], payloads)
        return end

    def _decode_step(self, step_start: int) -> int:
        import torch

        rows = list(self.rows)
        length = self.mask.shape[1]
        ones = torch.ones((len(rows), 1), dtype=self.mask.dtype, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)
        try:
            out = self._decode_forward(self.cache, mask, self.next_tokens, self.positions)
        except Exception as err:
            return self._decode_failed(rows, mask, length, step_start, err)
        self.mask = mask
        self.positions = [p + 1 for p in self.positions]
        samplers = [r.sampler for r in rows]
        errors: dict[int, BaseException] = {}
        choices = choose_tokens(
            out.logits[:, -1, :].float(),
            samplers,  # type: ignore[arg-type]
            [r.history for r in rows],
            [len(r.prompt_ids) for r in rows],
            errors,
        )
        payloads = self._take(rows, choices, errors)
        end = self._end_step(step_start, "decode", rows, [1] * len(rows))
        self._deliver(rows, choices, payloads)
        return end

    def _decode_forward(self, cache: Any, mask: Any, tokens: list[int], positions: list[int]) -> Any:
        import torch

        return self.model(
            input_ids=torch.tensor(tokens, device=self.device).unsqueeze(1),
            attention_mask=mask,
            position_ids=torch.tensor(positions, device=self.device).unsqueeze(1),
            **{self._cache_kwarg: cache},
            use_cache=True,
        )

    def _decode_failed(
        self, rows: list[EngineRequest], mask: Any, length: int, step_start: int, err: BaseException
    ) -> int:
        """A decode step failed: cut the batch's cache back to before it, run each row alone on a copy of its
        cache to find the rows that fail on their own, and drop those (they end with their error and pay this
        step). The others decode again at the next step. If none fails alone, the batch as a whole cannot run:
        its rows fail together."""
        for layer in self.cache.layers:  # the layers the failed forward already extended
            if layer.keys is not None and layer.keys.shape[-2] > length:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        failed: list[tuple[EngineRequest, BaseException]] = []
        if len(rows) > 1:
            log.warning("a decode step of %d rows failed (%r): trying each row alone", len(rows), err)
            for i, req in enumerate(rows):
                try:
                    self._decode_forward(
                        self._row_cache(i), mask[i : i + 1], [self.next_tokens[i]], [self.positions[i]]
                    )
                except Exception as own:
                    failed.append((req, own))
        if not failed:
            failed = [(req, err) for req in rows]
        self.sync()
        end = time.perf_counter_ns()
        self._fail(failed, end - step_start, [1] * len(failed))
        self._drop_rows({self.rows.index(req) for req, _ in failed})
        return end

    def _row_cache(self, i: int) -> Any:
        """A cache of its own for row i of the batch (a copy of its keys and values, padding included)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model_config)
        for layer, src in zip(cache.layers, self.cache.layers, strict=True):
            layer.update(src.keys[i : i + 1], src.values[i : i + 1])
        return cache

    def _take(
        self, rows: list[EngineRequest], choices: list[TokenChoice], errors: dict[int, BaseException]
    ) -> list[Any]:
        """Record each row's new token (its callback runs here, inside the step) and mark the rows that end: a row
        whose token choice (`errors`, by index) or callback failed ends with its error, alone."""
        payloads = []
        for i, (req, choice) in enumerate(zip(rows, choices, strict=True)):
            if i in errors:
                self._fail_row(req, errors[i])
                payloads.append(None)
                continue
            req.generated.append(choice.token_id)
            try:
                payload, reason = req.on_token(choice) if req.on_token is not None else (None, None)
            except Exception as err:
                self._fail_row(req, err)
                payloads.append(None)
                continue
            payloads.append(payload)
            if reason is None and choice.token_id in req.params.stop_token_ids:
                reason = FINISH_EOS
            if reason is None and len(req.generated) >= req.params.max_new_tokens:
                reason = FINISH_LENGTH
            if reason is not None:
                req.finished = True
                req.finish_reason = reason
        index = {id(r): i for i, r in enumerate(self.rows)}
        for req, choice in zip(rows, choices, strict=True):
            self.next_tokens[index[id(req)]] = choice.token_id
        return payloads

    def _end_step(self, step_start: int, kind: str, rows: list[EngineRequest], tokens: list[int]) -> int:
        """Stop the step's clock and split its time across its rows by the tokens each processed."""
        self.sync()
        end = time.perf_counter_ns()
        self._account(kind, end - step_start, rows, tokens)
        return end

    def _account(self, kind: str, step_ns: int, rows: list[EngineRequest], tokens: list[int]) -> None:
        shares = split_batch_ns(step_ns, tokens)
        for req, share in zip(rows, shares, strict=True):
            req.compute_ns += share
            req.steps += 1
            req.peak_batch = max(req.peak_batch, len(rows))
        self._busy_ns += step_ns
        self.steps.append(StepRecord(kind, step_ns, [r.request_id for r in rows], list(tokens), shares))

    def _fail(
        self, failed: list[tuple[EngineRequest, BaseException]], step_ns: int, tokens: list[int]
    ) -> None:
        """End the requests that failed on their own; the failed attempts' time is theirs (a "failed" step)."""
        self._account("failed", step_ns, [req for req, _ in failed], tokens)
        for req, err in failed:
            self._fail_row(req, err)
            self._finish(req, FINISH_ERROR, err)

    def _fail_row(self, req: EngineRequest, err: BaseException) -> None:
        log.warning("generation %s failed on its own, the others go on: %r", req.request_id, err)
        req.error = err
        req.finished = True
        req.finish_reason = FINISH_ERROR

    def _deliver(self, rows: list[EngineRequest], choices: list[TokenChoice], payloads: list[Any]) -> None:
        done = set()
        for req, choice, payload in zip(rows, choices, payloads, strict=True):
            if req.error is None:
                req.events.put(TokenEvent(choice, payload, req.compute_ns))
            if req.finished:
                self._finish(req, req.finish_reason or FINISH_LENGTH, req.error)
                if req in self.rows:
                    done.add(self.rows.index(req))
        if done:
            self._drop_rows(done)

    def _finish(self, req: EngineRequest, reason: str, error: BaseException | None = None) -> None:
        req.finished = True
        req.finish_reason = reason
        req.prefill_cache = None
        started = req.started_ns if req.started_ns is not None else time.perf_counter_ns()
        queue_ns = max(0, started - req.submitted_ns)
        req.events.put(FinishEvent(reason, req.compute_ns, queue_ns, req.steps, req.peak_batch, error))

    # The batch's KV cache

    def _join(self, group: list[EngineRequest], cache: Any, mask: Any) -> None:
        """Merge prefilled rows (their cache and mask) into the batch, left-padding the shorter side."""
        import torch

        if not self.rows:
            self.cache, self.mask = cache, mask
        else:
            length, new_len = self.mask.shape[1], mask.shape[1]
            target = max(length, new_len)
            for layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
                layer.keys = torch.cat(
                    [_left_pad(layer.keys, target - length), _left_pad(new_layer.keys, target - new_len)]
                )
                layer.values = torch.cat(
                    [_left_pad(layer.values, target - length), _left_pad(new_layer.values, target - new_len)]
                )
            self.mask = torch.cat(
                [_left_pad_mask(self.mask, target - length), _left_pad_mask(mask, target - new_len)]
            )
        for req in group:
            self.rows.append(req)
            self.positions.append(len(req.prompt_ids))
            self.next_tokens.append(0)  # set by _take from the prefill's token

    def _drop_rows(self, indices: set[int]) -> None:
        """Remove rows from the batch, and the leading columns no remaining row uses."""
        import torch

        keep = [i for i in range(len(self.rows)) if i not in indices]
        self.rows = [self.rows[i] for i in keep]
        self.positions = [self.positions[i] for i in keep]
        self.next_tokens = [self.next_tokens[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        used = mask.sum(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        self.mask = mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:, :]
            layer.values = layer.values.index_select(0, index)[:, :, first:, :]

    def _fail_all(self, err: BaseException) -> None:
        for req in list(self.rows) + list(self.waiting):
            if not req.finished:
                self._finish(req, FINISH_ERROR, err)
        self.rows, self.positions, self.next_tokens = [], [], []
        self.waiting.clear()
        self.cache = self.mask = None
        self._last_prefill = False


def _left_pad(t: Any, n: int) -> Any:
    """Pad a [batch, heads, length, dim] cache tensor with n zero positions on the left."""
    if n == 0:
        return t
    import torch

    pad = torch.zeros((t.shape[0], t.shape[1], n, t.shape[3]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=2)


def _left_pad_mask(mask: Any, n: int) -> Any:
    if n == 0:
        return mask
    import torch

    return torch.cat([torch.zeros((mask.shape[0], n), dtype=mask.dtype, device=mask.device), mask], dim=1)
