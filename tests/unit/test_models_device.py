"""Device and dtype choice: bf16 on a GPU, fp32 on the CPU, an explicit catalog dtype always wins."""

from __future__ import annotations

import pytest
import torch

from models.catalog import ModelSpec
from models.executor import resolve_device, resolve_dtype

SPEC = {"id": "org/m", "task": "text-to-image", "source": {"repo_id": "org/m"}}


@pytest.mark.parametrize(
    ("dtype", "device", "expected"),
    [
        ("auto", "cuda", torch.bfloat16),
        ("auto", "cuda:1", torch.bfloat16),
        ("auto", "cpu", torch.float32),
        ("float16", "cuda", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
    ],
)
def test_dtype(dtype, device, expected):
    assert resolve_dtype(ModelSpec(**SPEC, dtype=dtype), device) is expected


def test_device_auto_follows_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(ModelSpec(**SPEC)) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(ModelSpec(**SPEC)) == "cpu"
    assert resolve_device(ModelSpec(**SPEC, device="cpu")) == "cpu"


def test_the_clock_waits_for_the_device(monkeypatch):
    """On CUDA the runner synchronises before each clock reading, so asynchronous kernels are billed."""
    from models.tasks.text_classification import TextClassificationRunner

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: calls.append("sync"))
    runner = TextClassificationRunner(
        ModelSpec(**{**SPEC, "task": "text-classification"}), None, "cuda", None
    )
    runner.device_sync()
    cpu = TextClassificationRunner(ModelSpec(**{**SPEC, "task": "text-classification"}), None, "cpu", None)
    cpu.device_sync()
    assert calls == ["sync"]
