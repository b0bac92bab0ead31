"""Opt-in GPU checks (tests/gpu runs only where CUDA is present): tiny FLUX in bf16 on the device, timed with
device synchronisation, through the same executor as every other path."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_tiny_flux_bf16_on_cuda(tmp_path):
    from models.catalog import ModelSpec
    from models.executor import ModelExecutor
    from models.loading import LoadOptions
    from models.types import TaskRequest

    spec = ModelSpec(
        id="local/tiny-flux",
        task="text-to-image",
        source={"path": "flux", "prepare": "tiny-flux"},
        dtype="auto",
        defaults={"width": 64, "height": 64, "num_inference_steps": 4},
    )
    ex = ModelExecutor(spec, LoadOptions(model_store=tmp_path))
    assert ex.device == "cuda" and ex.runner.pipe.transformer.dtype == torch.bfloat16
    a = ex.run(TaskRequest("text-to-image", "a cat", {"seed": 1}, accept="image/png"))
    b = ex.run(TaskRequest("text-to-image", "a cat", {"seed": 1}, accept="image/png"))
    assert a.output["content"] == b.output["content"]
    assert a.timings.compute_ns > 0
