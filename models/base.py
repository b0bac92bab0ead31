"""The task runner interface: load once, validate a request, run it (or a batch of them), maybe stream."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from models.catalog import ModelSpec
from models.errors import InvalidInput, TaskNotSupported
from models.types import StreamChunk, TaskRequest


class TaskRunner(ABC):
    """Runs one model for the operations in `tasks`.

    A runner is constructed with a resolved local directory, loads its weights in `load()`, and is then called
    from one thread at a time by the executor, which does the timing.
    """

    tasks: ClassVar[tuple[str, ...]] = ()
    batchable: ClassVar[bool] = False
    streams: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec, directory: Path, device: str, dtype: Any) -> None:
        self.spec = spec
        self.directory = directory
        self.device = device
        self.dtype = dtype

    @classmethod
    def download(
        cls, repo_id: str, revision: str, token: str | None, cache_dir: str | None, local_files_only: bool
    ) -> Path:
        """Fetch (or find in the cache) the files this runner needs from the Hub; return the snapshot dir."""
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                ignore_patterns=[
                    "*.bin",
                    "*.pt",
                    "*.pth",
                    "*.h5",
                    "*.msgpack",
                    "*.onnx",
                    "*.gguf",
                    "*.ot",
                    "onnx/*",
                    "openvino/*",
                    "coreml/*",
                ],
            )
        )

    @abstractmethod
    def load(self) -> None:
        """Load the weights onto the device."""

    def supported_tasks(self) -> tuple[str, ...]:
        return self.tasks

    def validate(self, request: TaskRequest) -> None:
        """Raise InvalidInput (naming the field) for a request this model cannot run."""
        if request.task not in self.supported_tasks():
            raise TaskNotSupported(
                f"model {self.spec.id} does not support task {request.task!r}"
                f" (it serves: {', '.join(self.supported_tasks())})"
            )

    @abstractmethod
    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        """Run one validated request; return its output and usage counts (tokens)."""

    # True for a runner whose run_steps reports each step and can stop early (a long request: images, generation).
    stoppable: bool = False

    def run_steps(
        self, request: TaskRequest, on_step: Callable[[], None], should_stop: Callable[[], bool]
    ) -> tuple[Any, dict[str, int]]:
        """`run`, calling `on_step()` after each step and raising StopRun once `should_stop()` says so (the
        client went away). A runner without steps just runs."""
        return self.run(request)

    # True for a runner that batches concurrent requests itself (continuous batching of generation): the executor
    # then calls it without its lock, from many threads at once, and takes each request's compute from the runner
    # (its shares of the engine's steps) instead of a stopwatch around the call.
    concurrent: bool = False

    def run_metered(
        self, request: TaskRequest, should_stop: Callable[[], bool], on_step: Callable[[int], None]
    ) -> tuple[Any, dict[str, int], Any]:
        """A concurrent runner's `run`: (output, usage, Timings), calling `on_step(compute_ns so far)` as it goes and
        raising Interrupted(compute_ns) once `should_stop()` stopped it. Its `stream` stamps each chunk's
        `elapsed_ns` and ends with {"output", "usage", "timings"}."""
        raise NotImplementedError(f"{type(self).__name__} is not a concurrent runner")

    def run_batch(self, requests: list[TaskRequest]) -> list[tuple[Any, dict[str, int]]]:
        """Run several requests in one forward pass where the runner can; the default runs them in turn."""
        return [self.run(r) for r in requests]

    def stream(self, request: TaskRequest, should_stop: Any) -> Iterator[StreamChunk | dict[str, Any]]:
        """Yield chunks, then one final dict: {"output": ..., "usage": {...}}. `should_stop()` aborts early."""
        raise TaskNotSupported(f"model {self.spec.id} cannot stream task {request.task!r}")

    def texts(self, inputs: Any, *, allow_list: bool = True, field: str = "inputs") -> list[str]:
        """Validated text input(s) within this model's limits (count and characters)."""
        limits = self.spec.limits
        max_items = limits.max_batch_inputs if allow_list else 1
        return text_inputs(
            inputs, allow_list=allow_list, max_items=max_items, max_chars=limits.max_input_chars, field=field
        )

    def work_units(self, request: TaskRequest) -> int:
        """This request's share of the work in a batch (tokens, characters, pixels x steps)."""
        return max(1, request.input_characters())

    def device_sync(self) -> None:
        """Wait for the device to finish queued work, so the clock covers asynchronous kernels."""
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()


# Parameter helpers shared by the runners: each raises InvalidInput that names the field.


def param_int(
    params: dict[str, Any],
    name: str,
    default: int | None = None,
    *,
    lo: int | None = None,
    hi: int | None = None,
    hi_reason: str = "",
) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise InvalidInput(f"parameters.{name} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise InvalidInput(f"parameters.{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidInput(f"parameters.{name} must be <= {hi}{hi_reason}, got {value}")
    return value


def param_float(
    params: dict[str, Any],
    name: str,
    default: float | None = None,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float | None:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"parameters.{name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidInput(f"parameters.{name} must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidInput(f"parameters.{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidInput(f"parameters.{name} must be <= {hi}, got {value}")
    return value


def param_bool(params: dict[str, Any], name: str, default: bool | None = None) -> bool | None:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"parameters.{name} must be true or false, got {value!r}")
    return value


def param_str(
    params: dict[str, Any], name: str, default: str | None = None, choices: tuple[str, ...] | None = None
) -> str | None:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"parameters.{name} must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise InvalidInput(f"parameters.{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def text_inputs(
    inputs: Any, *, allow_list: bool, max_items: int, max_chars: int, field: str = "inputs"
) -> list[str]:
    """Validate text input(s): a non-empty string, or (where allowed) a non-empty list of them."""
    items = inputs if (allow_list and isinstance(inputs, list)) else [inputs]
    if not items:
        raise InvalidInput(f"{field} must not be an empty list")
    if len(items) > max_items:
        raise InvalidInput(f"{field} has {len(items)} items, more than this model's limit of {max_items}")
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if items is inputs else field
        if not isinstance(item, str):
            kind = "a string or a list of strings" if allow_list else "a string"
            raise InvalidInput(f"{where} must be {kind}, got {type(item).__name__}")
        if not item.strip():
            raise InvalidInput(f"{where} must not be empty")
    total = sum(len(s) for s in items)
    if total > max_chars:
        raise InvalidInput(f"{field} has {total} characters, more than this model's limit of {max_chars}")
    return items
