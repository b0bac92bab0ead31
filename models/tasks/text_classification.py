"""text-classification with a transformers sequence classifier; batches many requests in one forward pass."""

from __future__ import annotations

from typing import Any

from models.base import TaskRunner, param_int, param_str
from models.types import TEXT_CLASSIFICATION, TaskRequest

_FUNCTIONS = ("sigmoid", "softmax", "none")


class TextClassificationRunner(TaskRunner):
    tasks = (TEXT_CLASSIFICATION,)
    batchable = True

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(self.directory), dtype=self.dtype)
        self.model.to(self.device)
        self.model.eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        problem = getattr(self.model.config, "problem_type", None)
        one_logit = self.model.config.num_labels == 1
        self.default_function = (
            "sigmoid" if problem == "multi_label_classification" or one_logit else "softmax"
        )

    def _texts(self, request: TaskRequest) -> list[str]:
        return self.texts(request.inputs)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self._texts(request)
        param_int(request.parameters, "top_k", lo=1)
        param_str(request.parameters, "function_to_apply", choices=_FUNCTIONS)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        return self.run_batch([request])[0]

    def run_batch(self, requests: list[TaskRequest]) -> list[tuple[Any, dict[str, int]]]:
        import torch

        texts = [self._texts(r) for r in requests]
        flat = [t for group in texts for t in group]
        enc = self.tokenizer(flat, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits.float()
        results, start = [], 0
        for request, group in zip(requests, texts, strict=True):
            rows = logits[start : start + len(group)]
            start += len(group)
            results.append(([self._scores(request, row) for row in rows], {"inputs": len(group)}))
        return results

    def _scores(self, request: TaskRequest, logits: Any) -> list[dict[str, Any]]:
        import torch

        function = request.parameters.get("function_to_apply") or self.default_function
        if function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        ranked = sorted(zip(self.labels, scores.tolist(), strict=True), key=lambda x: -x[1])
        top_k = request.parameters.get("top_k")
        if top_k:
            ranked = ranked[: int(top_k)]
        return [{"label": label, "score": score} for label, score in ranked]
