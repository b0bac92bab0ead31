"""Per-request generation parameters and the token choice of one sequence: the one place where a request's
sampling settings are read and applied.

`SamplingParams` is what a generation engine needs to know about a request besides its prompt. `choose_tokens`
picks the next token of every sequence of a batch from the step's logits, each with its own settings: greedy rows
are one vectorised argmax, sampled rows (or rows with penalties or logits hooks) are handled one by one with the
request's own seeded generator, so one request's seed never depends on who else is in the batch.

New per-request behaviour (penalties, constrained decoding, logprobs) is added here: a field on
`SamplingParams` and its application in `_process_row`; a `LogitsHook` covers anything stateful (a grammar).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A per-request logits hook: (token ids so far: prompt + generated, logits of the next token [vocab]) -> logits.
# It runs on the engine thread, on this request's row only. A grammar (response_format) or a bias is one.
LogitsHook = Callable[[list[int], Any], Any]


@dataclass
class SamplingParams:
    """How one request chooses its tokens and when it ends."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # the seed in use for a sampled request (drawn when the client sent none)
    # transformers' multiplicative repetition penalty, over prompt + generated ids
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x count, over generated ids
    presence_penalty: float = 0.0  # OpenAI's: minus penalty once per generated id
    top_logprobs: int = 0  # how many alternatives to report per token (the chosen token's logprob always is)
    stop_token_ids: frozenset[int] = frozenset()  # end the sequence after emitting one of these (EOS)
    logits_hooks: list[LogitsHook] = field(default_factory=list)

    @property
    def needs_row_processing(self) -> bool:
        """Whether this row cannot take the batch's plain argmax."""
        return bool(
            self.do_sample
            or self.repetition_penalty not in (None, 1.0)
            or self.frequency_penalty
            or self.presence_penalty
            or self.logits_hooks
        )


def sampling_params(
    parameters: dict[str, Any], max_new_tokens: int, stop_token_ids: set[int] | frozenset[int]
) -> SamplingParams:
    """SamplingParams from a validated request's parameters (see TextGenerationRunner.validate for the checks).

    Sampling is on when asked for (`do_sample`), or implied by a positive temperature, a `top_k`, or a `top_p`
    below 1; temperature 0 means greedy. A sampled request without a seed gets a random one, reported back."""
    import random

    p = parameters
    temperature = p.get("temperature")
    sample = bool(p.get("do_sample")) or (temperature is not None and float(temperature) > 0)
    sample = sample or p.get("top_k") is not None or (p.get("top_p") is not None and float(p["top_p"]) < 1)
    if temperature is not None and float(temperature) == 0:
        sample = False
    params = SamplingParams(
        max_new_tokens=max_new_tokens, do_sample=sample, stop_token_ids=frozenset(stop_token_ids)
    )
    if sample:
        seed = p.get("seed")
        params.seed = int(seed) if seed is not None else random.randrange(0, 2**31 - 1)
        if temperature is not None and float(temperature) > 0:
            params.temperature = float(temperature)
        if p.get("top_k") is not None:
            params.top_k = int(p["top_k"])
        if p.get("top_p") is not None and float(p["top_p"]) < 1:
            params.top_p = float(p["top_p"])
    if p.get("repetition_penalty") is not None:
        params.repetition_penalty = float(p["repetition_penalty"])
    for name in ("frequency_penalty", "presence_penalty"):  # validated by generation_extras (OpenAI's -2..2)
        if p.get(name) is not None:
            setattr(params, name, float(p[name]))
    return params


@dataclass
class TokenChoice:
    """The token chosen for one row, with its log-probability under the model (before any processing)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None


class RowSampler:
    """One request's sampling state across steps: its seeded generator and its token counts."""

    def __init__(self, params: SamplingParams, device: Any) -> None:
        import torch

        self.params = params
        self.generator: Any = None
        if params.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(params.seed or 0))


def choose_tokens(
    logits: Any,
    samplers: list[RowSampler],
    histories: list[list[int]],
    prompt_lens: list[int],
    errors: dict[int, BaseException] | None = None,
) -> list[TokenChoice]:
    """The next token of each row of `logits` [rows, vocab] (float32), each row with its own settings.

    `histories[i]` is row i's prompt + generated ids (the first `prompt_lens[i]` are the prompt). With `errors`,
    a row whose own processing fails (a logits hook, a grammar, its sampling) is recorded there by its index and
    the other rows are chosen as usual (that row's choice is then meaningless); without it, the error is raised."""
    import torch

    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = torch.argmax(logits, dim=-1)
    vocab = logits.shape[-1]
    for i, sampler in enumerate(samplers):
        if sampler.params.needs_row_processing:
            try:
                token = _process_row(logits[i], sampler, histories[i], prompt_lens[i])
                if not 0 <= token < vocab:
                    raise ValueError(f"the token chosen, {token}, is outside the vocabulary (0..{vocab - 1})")
            except Exception as err:
                if errors is None:
                    raise
                errors[i] = err
                continue
            chosen[i] = token
    chosen_list = chosen.tolist()
    picked = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    choices = [TokenChoice(int(t), float(lp)) for t, lp in zip(chosen_list, picked, strict=True)]
    wanted = max((s.params.top_logprobs for s in samplers), default=0)
    if wanted:
        values, indices = torch.topk(logprobs, k=min(wanted, logprobs.shape[-1]), dim=-1)
        for i, sampler in enumerate(samplers):
            k = sampler.params.top_logprobs
            if k:
                choices[i].top_logprobs = list(
                    zip(indices[i, :k].tolist(), values[i, :k].tolist(), strict=True)
                )
    return choices


def _process_row(row: Any, sampler: RowSampler, history: list[int], prompt_len: int) -> int:
    """Penalties, hooks, temperature, top-k, top-p, then a draw from this request's generator (or argmax)."""
    import torch

    p = sampler.params
    scores = row.clone()
    if p.repetition_penalty not in (None, 1.0) and history:
        ids = torch.tensor(sorted(set(history)), device=scores.device)
        picked = scores[ids]
        scores[ids] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and len(history) > prompt_len:
        ids, counts = torch.tensor(history[prompt_len:], device=scores.device).unique(return_counts=True)
        scores[ids] -= p.frequency_penalty * counts.to(scores.dtype) + p.presence_penalty
    for hook in p.logits_hooks:
        scores = hook(history, scores)
    if not p.do_sample:
        return int(torch.argmax(scores))
    scores = scores / max(p.temperature, 1e-5)
    if p.top_k is not None and p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cumulative > p.top_p
        drop[1:] = drop[:-1].clone()  # keep the token that crosses top_p
        drop[0] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=sampler.generator))
