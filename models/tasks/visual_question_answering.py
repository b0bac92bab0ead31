"""visual-question-answering with a transformers VQA classifier (ViLT): an image and a question ->
[{answer, score}], best first."""

from __future__ import annotations

from typing import Any

from models.tasks.media_runner import MediaRunner, image_of_question, question_of, top_k
from models.types import VISUAL_QUESTION_ANSWERING, TaskRequest


class VisualQuestionAnsweringRunner(MediaRunner):
    tasks = (VISUAL_QUESTION_ANSWERING,)

    def media_value(self, request: TaskRequest) -> tuple[Any, str]:
        return image_of_question(request)

    def load(self) -> None:
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        d = str(self.directory)
        self.processor = AutoProcessor.from_pretrained(d)
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(d, dtype=self.dtype)
        self.model.to(self.device).eval()
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        question = question_of(request)
        self.texts(question, allow_list=False, field="inputs.question")
        top_k(request.parameters, 10_000)
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        import torch

        enc = self.processor(
            images=self.image(request), text=question_of(request), return_tensors="pt", truncation=True
        ).to(self.device)
        with torch.inference_mode():
            logits = self.model(**enc).logits[0].float()
        scores = torch.sigmoid(logits)  # ViLT is trained with a multi-label (binary cross-entropy) head
        k = min(int(request.parameters.get("top_k") or 5), len(self.labels))
        best = torch.topk(scores, k)
        usage = self.media_usage(request)
        self.forget(request)
        return [
            {"answer": str(self.labels[i]), "score": float(s)}
            for s, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        ], usage
