"""zero-shot-classification with an NLI model and transformers' zero-shot pipeline.

The runner answers the pipeline's `{sequence, labels, scores}`; the route renders it as the list of `{label,
score}` that current clients expect, or as is for clients that want the older shape (serving/routes/text_tasks.py).
Work units: tokens x candidate labels (one NLI pass per label).
"""

from __future__ import annotations

from typing import Any

from models.base import param_bool, param_str
from models.errors import InvalidInput
from models.tasks.text_common import TransformersRunner, plain, string_list
from models.types import ZERO_SHOT_CLASSIFICATION, TaskRequest

MAX_LABELS = 32


class ZeroShotClassificationRunner(TransformersRunner):
    tasks = (ZERO_SHOT_CLASSIFICATION,)
    model_class = "AutoModelForSequenceClassification"
    pipeline_task = "zero-shot-classification"

    def load(self) -> None:
        labels = {k.lower() for k in self._config_labels()}
        if not any(label.startswith("entail") for label in labels):
            raise ValueError(f"model {self.spec.id}: an NLI model needs an 'entailment' label for zero-shot")
        super().load()

    def _config_labels(self) -> list[str]:
        import json

        config = json.loads((self.directory / "config.json").read_text())
        return list((config.get("label2id") or {}).keys())

    def _options(self, request: TaskRequest) -> dict[str, Any]:
        p = request.parameters
        labels = string_list(p, "candidate_labels", max_items=MAX_LABELS)
        if labels is None:
            raise InvalidInput("parameters.candidate_labels is required (a list of labels)")
        template = param_str(p, "hypothesis_template", "This example is {}.")
        if "{}" not in template:
            raise InvalidInput("parameters.hypothesis_template must contain {} (where the label goes)")
        return {
            "candidate_labels": labels,
            "hypothesis_template": template,
            "multi_label": bool(param_bool(p, "multi_label", False)),
        }

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self.texts(request.inputs)
        self._options(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        texts = self.texts(request.inputs)
        options = self._options(request)
        outputs = [plain(self.pipe(text, **options)) for text in texts]
        return (outputs if isinstance(request.inputs, list) else outputs[0]), {"inputs": len(texts)}

    def work_units(self, request: TaskRequest) -> int:
        labels = request.parameters.get("candidate_labels")
        n = len(labels) if isinstance(labels, list) else 1
        return super().work_units(request) * max(1, n)
