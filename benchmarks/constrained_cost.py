"""What constrained decoding (response_format, forced tool calls) costs per generated token.

Runs greedy generation of the same number of tokens with and without a JSON-schema mask, interleaved, on a
causal LM directory (default: the test model store's SmolLM2-135M-Instruct), and times the mask itself inside
generation. Prints one JSON line.

    .venv/bin/python benchmarks/constrained_cost.py [MODEL_DIR] [--tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "hfi" / "test-models" / "smollm2-135m-instruct"
# Never finishes within the budget, so both runs generate exactly --tokens tokens.
SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", nargs="?", default=str(DEFAULT_DIR))
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from models.tasks import constrained

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    eos = {tok.eos_token_id}
    messages = [{"role": "user", "content": "List some numbers as a JSON array."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    constraint = constrained.response_format_constraint({"type": "json_object", "value": SCHEMA})
    constrained.check(tok, eos, constraint)  # builds the llguidance tokenizer once, as a replica does

    class Timed:
        def __init__(self) -> None:
            self.inner = constrained.GrammarLogitsProcessor(tok, eos, constraint, ids.shape[1])
            self.ns = 0
            self.calls = 0

        def __call__(self, input_ids, scores):
            t = time.perf_counter_ns()
            out = self.inner(input_ids, scores)
            self.ns += time.perf_counter_ns() - t
            self.calls += 1
            return out

    def run(processor) -> float:
        kwargs = {"logits_processor": LogitsProcessorList([processor])} if processor else {}
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.tokens,
                min_new_tokens=args.tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
                **kwargs,
            )
        assert out.shape[1] - ids.shape[1] == args.tokens
        return (time.perf_counter() - t) * 1000 / args.tokens

    run(None)  # warm-up
    plain, masked, mask_ms = [], [], []
    for _ in range(args.rounds):
        plain.append(run(None))
        timed = Timed()
        masked.append(run(timed))
        mask_ms.append(timed.ns / 1e6 / timed.calls)
    result = {
        "model_dir": args.model_dir,
        "vocab": len(tok),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "plain_ms_per_token_median": round(statistics.median(plain), 2),
        "constrained_ms_per_token_median": round(statistics.median(masked), 2),
        "mask_ms_per_token_median": round(statistics.median(mask_ms), 3),
        "mask_share_of_step": round(statistics.median(mask_ms) / statistics.median(masked), 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
