"""fill-mask with transformers' fill-mask pipeline: `[{score, token, token_str, sequence}]` per input (a list of
them per mask when an input has several masks, as transformers answers)."""

from __future__ import annotations

from typing import Any

from models.base import param_int
from models.errors import InvalidInput
from models.tasks.text_common import TransformersRunner, plain, string_list
from models.types import FILL_MASK, TaskRequest


class FillMaskRunner(TransformersRunner):
    tasks = (FILL_MASK,)
    model_class = "AutoModelForMaskedLM"
    pipeline_task = "fill-mask"
    batchable = True

    def _texts(self, request: TaskRequest) -> list[str]:
        texts = self.texts(request.inputs)
        mask = self.tokenizer.mask_token
        for i, text in enumerate(texts):
            where = f"inputs[{i}]" if isinstance(request.inputs, list) else "inputs"
            if mask not in text:
                raise InvalidInput(f"{where} must contain the mask token {mask}")
            if text.count(mask) > 8:
                raise InvalidInput(f"{where} has {text.count(mask)} mask tokens, more than the limit of 8")
        return texts

    def _targets(self, request: TaskRequest) -> list[str] | None:
        targets = string_list(request.parameters, "targets")
        if targets:
            vocab = self.tokenizer.get_vocab()
            for t in targets:
                ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
                if t not in vocab and not ids:
                    raise InvalidInput(f"parameters.targets: {t!r} is not a token of this model")
        return targets

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self._texts(request)
        param_int(request.parameters, "top_k", lo=1, hi=min(100, len(self.tokenizer)))
        self._targets(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        return self.run_batch([request])[0]

    def run_batch(self, requests: list[TaskRequest]) -> list[tuple[Any, dict[str, int]]]:
        results = []
        for request in requests:  # the pipeline batches within a request; parameters differ between them
            texts = self._texts(request)
            kwargs: dict[str, Any] = {"top_k": request.parameters.get("top_k") or 5}
            targets = self._targets(request)
            if targets:
                kwargs["targets"] = targets
            outputs = [plain(self.pipe(text, **kwargs)) for text in texts]
            results.append(
                (outputs if isinstance(request.inputs, list) else outputs[0], {"inputs": len(texts)})
            )
        return results
