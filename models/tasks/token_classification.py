"""token-classification (NER) with transformers' token-classification pipeline.

Answers `[{entity_group, score, word, start, end}]` per input with the hosted default aggregation (`simple`); with
`aggregation_strategy: none` each token's `entity` is also given as `entity_group`, which the JS client requires.
"""

from __future__ import annotations

from typing import Any

from models.base import param_int, param_str
from models.errors import InvalidInput
from models.tasks.text_common import TransformersRunner, plain, string_list
from models.types import TOKEN_CLASSIFICATION, TaskRequest

STRATEGIES = ("none", "simple", "first", "average", "max")


class TokenClassificationRunner(TransformersRunner):
    tasks = (TOKEN_CLASSIFICATION,)
    model_class = "AutoModelForTokenClassification"
    pipeline_task = "token-classification"

    def _options(self, request: TaskRequest) -> dict[str, Any]:
        p = request.parameters
        strategy = param_str(p, "aggregation_strategy", "simple", choices=STRATEGIES)
        stride = param_int(p, "stride", lo=0)
        max_len = int(getattr(self.tokenizer, "model_max_length", 512) or 512)
        if stride is not None and stride >= max_len:
            raise InvalidInput(f"parameters.stride must be less than the model's {max_len} tokens")
        if stride and strategy == "none":
            raise InvalidInput("parameters.stride needs an aggregation_strategy other than none")
        options: dict[str, Any] = {"aggregation_strategy": strategy}
        ignore = p.get("ignore_labels")
        if ignore is not None:
            options["ignore_labels"] = [] if ignore == [] else string_list(p, "ignore_labels")
        if stride:
            options["stride"] = stride
        return options

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self.texts(request.inputs)
        self._options(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        texts = self.texts(request.inputs)
        options = self._options(request)
        outputs = [self._entities(plain(self.pipe(text, **options))) for text in texts]
        return (outputs if isinstance(request.inputs, list) else outputs[0]), {"inputs": len(texts)}

    @staticmethod
    def _entities(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in items:
            if "entity_group" not in item and "entity" in item:
                item["entity_group"] = item["entity"]
        return items
