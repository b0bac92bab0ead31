"""feature-extraction and sentence-similarity with sentence-transformers; batches many requests in one encode."""

from __future__ import annotations

from typing import Any

from models.base import TaskRunner, param_bool, param_int, param_str
from models.errors import InvalidInput
from models.types import FEATURE_EXTRACTION, SENTENCE_SIMILARITY, TaskRequest


class SentenceEmbeddingRunner(TaskRunner):
    tasks = (FEATURE_EXTRACTION, SENTENCE_SIMILARITY)
    batchable = True

    def load(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(
            str(self.directory), device=self.device, model_kwargs={"dtype": self.dtype}, local_files_only=True
        )
        self.model.eval()
        self.dimensions = self.model.get_embedding_dimension()
        self.max_seq_length = self.model.max_seq_length
        self.prompts = dict(getattr(self.model, "prompts", {}) or {})

    def _sentences(self, request: TaskRequest) -> list[str]:
        if request.task == SENTENCE_SIMILARITY:
            inputs = request.inputs
            if not isinstance(inputs, dict):
                raise InvalidInput("inputs must be an object with source_sentence and sentences")
            source = self.texts(
                inputs.get("source_sentence"), allow_list=False, field="inputs.source_sentence"
            )
            others = inputs.get("sentences")
            if not isinstance(others, list):
                raise InvalidInput("inputs.sentences must be a list of strings")
            return source + self.texts(others, field="inputs.sentences")
        return self.texts(request.inputs)

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        sentences = self._sentences(request)
        p = request.parameters
        param_bool(p, "normalize")
        truncate = param_bool(p, "truncate", True)
        param_int(p, "dimensions", lo=1, hi=self.dimensions)
        name = param_str(p, "prompt_name")
        if name is not None and name not in self.prompts:
            known = ", ".join(sorted(self.prompts)) or "none"
            raise InvalidInput(
                f"parameters.prompt_name {name!r} is not one of this model's prompts ({known})"
            )
        param_str(p, "truncation_direction", choices=("left", "right", "Left", "Right"))
        if not truncate:
            lengths = [len(ids) for ids in self.model.tokenizer(sentences)["input_ids"]]
            if max(lengths) > self.max_seq_length:
                raise InvalidInput(
                    f"inputs: {max(lengths)} tokens is longer than this model's {self.max_seq_length}; "
                    "send truncate=true to truncate"
                )

    def _encode(self, sentences: list[str], prompt_name: str | None, normalize: bool) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.encode(
                sentences,
                prompt_name=prompt_name,
                convert_to_tensor=True,
                normalize_embeddings=normalize,
                batch_size=64,
                show_progress_bar=False,
            )

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        return self.run_batch([request])[0]

    def run_batch(self, requests: list[TaskRequest]) -> list[tuple[Any, dict[str, int]]]:
        """Encode every sentence of every request in one call per (prompt, normalize) group."""
        groups: dict[tuple[str | None, bool], list[int]] = {}
        for i, r in enumerate(requests):
            p = r.parameters
            normalize = bool(p.get("normalize")) or r.task == SENTENCE_SIMILARITY
            groups.setdefault((p.get("prompt_name"), normalize), []).append(i)
        results: list[Any] = [None] * len(requests)
        for (prompt_name, normalize), members in groups.items():
            sentences = [self._sentences(requests[i]) for i in members]
            flat = [s for group in sentences for s in group]
            embeddings = self._encode(flat, prompt_name, normalize)
            start = 0
            for i, group in zip(members, sentences, strict=True):
                vectors = embeddings[start : start + len(group)]
                start += len(group)
                results[i] = (self._postprocess(requests[i], vectors), {"inputs": len(group)})
        return results

    def _postprocess(self, request: TaskRequest, vectors: Any) -> Any:
        if request.task == SENTENCE_SIMILARITY:
            source, others = vectors[0], vectors[1:]
            return (others @ source).float().cpu().tolist()  # normalised: the dot product is the cosine
        dims = request.parameters.get("dimensions")
        if dims:
            vectors = vectors[:, : int(dims)]
        values = vectors.float().cpu().tolist()
        return values[0] if isinstance(request.inputs, str) else values
