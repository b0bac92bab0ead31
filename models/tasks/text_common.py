"""What the transformers text runners share: load a tokenizer and a model class from the directory, count tokens
(their work units), wrap a transformers pipeline, and turn numpy scalars into plain JSON numbers."""

from __future__ import annotations

from typing import Any, ClassVar

from models.base import TaskRunner
from models.errors import InvalidInput
from models.types import TaskRequest


def strings_in(value: Any) -> list[str]:
    """Every string inside `value` (inputs of any shape), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings_in(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in strings_in(v)]
    return []


def plain(value: Any) -> Any:
    """numpy scalars and arrays (pipeline outputs) as plain Python numbers and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def string_list(params: dict[str, Any], name: str, *, max_items: int = 64) -> list[str] | None:
    """A parameter that is a list of non-empty strings (a comma-separated string is split, as the hosted API did)."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidInput(f"parameters.{name} must be a list of non-empty strings")
    if not value:
        raise InvalidInput(f"parameters.{name} must not be empty")
    if len(value) > max_items:
        raise InvalidInput(f"parameters.{name} has {len(value)} items, more than the limit of {max_items}")
    return value


class TransformersRunner(TaskRunner):
    """A runner on one transformers model class and its tokenizer; `pipeline_task` wraps them in a pipeline."""

    model_class: ClassVar[str] = "AutoModel"
    pipeline_task: ClassVar[str | None] = None

    def load(self) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.directory))
        cls = getattr(transformers, self.model_class)
        self.model = cls.from_pretrained(str(self.directory), dtype=self.dtype)
        self.model.to(self.device)
        self.model.eval()
        self.pipe = None
        if self.pipeline_task is not None:
            self.pipe = transformers.pipeline(
                self.pipeline_task, model=self.model, tokenizer=self.tokenizer, device=self.device
            )

    def count_tokens(self, texts: list[str]) -> int:
        if not texts:
            return 0
        return sum(len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def work_units(self, request: TaskRequest) -> int:
        """Tokens of text input: a batch's compute is split by them."""
        return max(1, self.count_tokens(strings_in(request.inputs)))

    def memory_bytes(self) -> int:
        """The loaded weights' size (the pool's memory bound)."""
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
