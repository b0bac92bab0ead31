"""question-answering: extractive, with a transformers question-answering model (start and end logits).

transformers 5 has no question-answering pipeline, so the span search is here: the context is split into
overlapping windows (`max_seq_len`, `doc_stride`), each window's best spans (at most `max_answer_len` tokens) are
scored as p(start) x p(end), and the best `top_k` are mapped back to character offsets. Answers the hosted shape:
one `{answer, score, start, end}` object, or a list of them when `top_k` > 1.
"""

from __future__ import annotations

from typing import Any

from models.base import param_bool, param_int
from models.errors import InvalidInput
from models.tasks.text_common import TransformersRunner
from models.types import QUESTION_ANSWERING, TaskRequest


class QuestionAnsweringRunner(TransformersRunner):
    tasks = (QUESTION_ANSWERING,)
    model_class = "AutoModelForQuestionAnswering"

    def _pair(self, request: TaskRequest) -> tuple[str, str]:
        inputs = request.inputs
        if not isinstance(inputs, dict):
            raise InvalidInput("inputs must be an object with question and context")
        question = self.texts(inputs.get("question"), allow_list=False, field="inputs.question")[0]
        context = self.texts(inputs.get("context"), allow_list=False, field="inputs.context")[0]
        if len(question) + len(context) > self.spec.limits.max_input_chars:
            raise InvalidInput(
                f"inputs has {len(question) + len(context)} characters, more than this model's limit of "
                f"{self.spec.limits.max_input_chars}"
            )
        return question, context

    def _options(self, params: dict[str, Any]) -> dict[str, Any]:
        max_len = int(getattr(self.tokenizer, "model_max_length", 512) or 512)
        max_len = min(max_len, 4096)
        seq = param_int(params, "max_seq_len", min(384, max_len), lo=16, hi=max_len)
        stride = param_int(params, "doc_stride", min(128, seq // 4), lo=0)
        if stride >= seq // 2:
            raise InvalidInput(f"parameters.doc_stride must be less than half of max_seq_len ({seq // 2})")
        return {
            "top_k": param_int(params, "top_k", 1, lo=1, hi=20),
            "max_answer_len": param_int(params, "max_answer_len", 15, lo=1, hi=512),
            "max_question_len": param_int(params, "max_question_len", 64, lo=1, hi=seq // 2),
            "max_seq_len": seq,
            "doc_stride": stride,
            "handle_impossible_answer": param_bool(params, "handle_impossible_answer", False),
            "align_to_words": param_bool(params, "align_to_words", True),
        }

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self._pair(request)
        self._options(request.parameters)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        import torch

        question, context = self._pair(request)
        opts = self._options(request.parameters)
        question_ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        if len(question_ids) > opts["max_question_len"]:
            raise InvalidInput(
                f"inputs.question is {len(question_ids)} tokens, more than max_question_len "
                f"({opts['max_question_len']})"
            )
        enc = self.tokenizer(
            question,
            context,
            truncation="only_second",
            max_length=opts["max_seq_len"],
            stride=opts["doc_stride"],
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            padding=True,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping").tolist()
        windows = [enc.sequence_ids(i) for i in range(len(offsets))]
        enc.pop("overflow_to_sample_mapping", None)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in enc.items()})
        starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
        candidates: list[tuple[float, int, int]] = []
        null_score = 0.0
        for w, seq_ids in enumerate(windows):
            null, spans = self._window_spans(starts[w], ends[w], seq_ids, offsets[w], opts)
            null_score = max(null_score, null)
            candidates.extend(spans)
        answers = self._answers(candidates, context, opts)
        if opts["handle_impossible_answer"]:
            answers.append({"answer": "", "score": null_score, "start": 0, "end": 0})
            answers.sort(key=lambda a: -a["score"])
            answers = answers[: opts["top_k"]]
        usage = {"input_tokens": int(enc["input_ids"].numel())}
        return (answers[0] if opts["top_k"] == 1 else answers), usage

    @staticmethod
    def _window_spans(
        start_logits: Any, end_logits: Any, seq_ids: list[int | None], offsets: list, opts: dict[str, Any]
    ) -> tuple[float, list[tuple[float, int, int]]]:
        """(null score, [(score, char start, char end)]) of one window's best spans inside the context."""
        import torch

        context = torch.tensor([s == 1 for s in seq_ids])
        keep = context.clone()
        keep[0] = True  # the [CLS] position scores "no answer"
        start_p = torch.softmax(start_logits.masked_fill(~keep, -1e4), dim=-1)
        end_p = torch.softmax(end_logits.masked_fill(~keep, -1e4), dim=-1)
        null = float(start_p[0] * end_p[0])
        start_p, end_p = start_p * context, end_p * context
        scores = torch.triu(start_p[:, None] * end_p[None, :])
        scores = torch.tril(scores, diagonal=opts["max_answer_len"] - 1)
        flat = scores.flatten()
        k = min(opts["top_k"] * 2, int((flat > 0).sum()))
        spans = []
        if k > 0:
            values, idx = torch.topk(flat, k)
            n = scores.shape[1]
            for value, i in zip(values.tolist(), idx.tolist(), strict=True):
                s, e = divmod(i, n)
                spans.append((value, offsets[s][0], offsets[e][1]))
        return null, spans

    @staticmethod
    def _answers(candidates: list[tuple[float, int, int]], context: str, opts: dict[str, Any]) -> list[dict]:
        seen: set[tuple[int, int]] = set()
        answers = []
        for score, start, end in sorted(candidates, key=lambda c: -c[0]):
            if opts["align_to_words"]:
                while start > 0 and context[start - 1].isalnum():
                    start -= 1
                while end < len(context) and context[end].isalnum():
                    end += 1
            if (start, end) in seen or end <= start:
                continue
            seen.add((start, end))
            answers.append({"answer": context[start:end], "score": score, "start": start, "end": end})
            if len(answers) == opts["top_k"]:
                break
        if not answers:
            answers.append({"answer": "", "score": 0.0, "start": 0, "end": 0})
        return answers
