"""Opt-in GPU check of the continuous batching engine (tests/gpu runs only where CUDA is present): a tiny Llama
in bf16 on the device, several requests batched, each step timed after torch.cuda.synchronize and split exactly;
greedy tokens compared with generate() alone, a difference allowed only where bf16 rounding can flip a near tie."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_TIE_MARGIN = 0.1  # bf16 logits carry ~3 significant digits


def test_batched_generation_bf16_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.timing import split_batch_ns
    from models.tasks.llm_engine import BatchingEngine, EngineConfig, EngineRequest, FinishEvent
    from models.tasks.llm_sampling import SamplingParams

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randrange(4, 40))] for _ in range(8)]
    engine = BatchingEngine(model, "cuda", EngineConfig(max_batch_size=8, prefill_max_wait_steps=0))
    try:
        reqs = [EngineRequest(str(i), p, SamplingParams(max_new_tokens=12)) for i, p in enumerate(prompts)]
        for r in reqs:
            engine.submit(r)
        outs = []
        for r in reqs:
            tokens = []
            while not isinstance(event := r.events.get(timeout=120), FinishEvent):
                tokens.append(event.choice.token_id)
            assert event.reason == "length"
            outs.append(tokens)
        assert sum(r.compute_ns for r in reqs) == engine.busy_ns
        assert all(
            sum(s.shares_ns) == s.step_ns == sum(split_batch_ns(s.step_ns, s.tokens)) for s in engine.steps
        )
        assert max(len(s.request_ids) for s in engine.steps) > 1
        for prompt, got in zip(prompts, outs, strict=True):
            ids = torch.tensor([prompt], device="cuda")
            with torch.inference_mode():
                ref = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=12,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                    output_scores=True,
                    return_dict_in_generate=True,
                )
            want = ref.sequences[0, len(prompt) :].tolist()
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
                top2 = torch.topk(ref.scores[first][0].float(), 2).values
                assert float(top2[0] - top2[1]) < BF16_TIE_MARGIN, (first, got, want)
    finally:
        engine.close()
