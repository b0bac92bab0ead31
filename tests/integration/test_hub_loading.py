"""The Hub loading path (repo id + revision through the Hugging Face cache), offline, on repositories laid out
like the real ones: the same code that loads black-forest-labs/FLUX.1-dev on a GPU host."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from models.catalog import ModelSpec
from models.defaults import build_tiny_flux
from models.executor import ModelExecutor
from models.loading import LoadOptions, ModelSourceError
from models.types import TaskRequest

SHA = "0123456789abcdef0123456789abcdef01234567"


def as_hub_cache(cache: Path, repo_id: str, snapshot: Path, sha: str = SHA) -> None:
    """Lay out `snapshot` in a Hugging Face cache as `repo_id` at `sha`, with refs/main pointing to it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(snapshot, repo / "snapshots" / sha)


@pytest.fixture(scope="module")
def flux_cache(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("flux")
    build_tiny_flux(work / "snapshot", max_shard_size="40KB")  # sharded, like the real repository
    cache = work / "hub"
    as_hub_cache(cache, "black-forest-labs/FLUX.1-dev", work / "snapshot")
    return cache


def test_flux_repository_layout_is_the_real_one(flux_cache):
    snap = flux_cache / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / SHA
    index = json.loads((snap / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((snap / "transformer" / s).exists() for s in shards)
    model_index = json.loads((snap / "model_index.json").read_text())
    assert model_index["_class_name"] == "FluxPipeline"
    assert model_index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert model_index["tokenizer_2"][1] in ("T5TokenizerFast", "T5Tokenizer")
    assert (snap / "text_encoder_2").is_dir() and (snap / "vae").is_dir()


def test_flux_loads_by_repo_id_and_revision_from_the_cache(flux_cache, tmp_path):
    spec = ModelSpec(
        id="black-forest-labs/FLUX.1-dev",
        task="text-to-image",
        source={"repo_id": "black-forest-labs/FLUX.1-dev", "revision": "main"},
        dtype="float32",
        defaults={"width": 64, "height": 64, "num_inference_steps": 2},
    )
    ex = ModelExecutor(
        spec,
        LoadOptions(model_store=tmp_path, hf_cache_dir=str(flux_cache), offline=True, hf_token="hf_unused"),
    )
    assert ex.revision == SHA
    # The tiny VAE has one block (scale 1): sizes must be multiples of 2; the real one (scale 8) needs 16.
    assert type(ex.runner.pipe).__name__ == "FluxPipeline" and ex.runner.size_multiple == 2
    a = ex.run(TaskRequest("text-to-image", "a cat", {"seed": 1}, accept="image/png"))
    b = ex.run(TaskRequest("text-to-image", "a cat", {"seed": 1}, accept="image/png"))
    assert a.output["content"] == b.output["content"] and a.output["content"][:4] == b"\x89PNG"


def test_sentence_transformers_by_repo_id(model_store, tmp_path):
    snapshot = model_store / "all-minilm-l6-v2"
    if not snapshot.exists():
        from models.defaults import build_minilm

        build_minilm(snapshot)
    cache = tmp_path / "hub"
    as_hub_cache(cache, "sentence-transformers/all-MiniLM-L6-v2", snapshot)
    spec = ModelSpec(
        id="sentence-transformers/all-MiniLM-L6-v2",
        task="feature-extraction",
        source={"repo_id": "sentence-transformers/all-MiniLM-L6-v2"},
    )
    ex = ModelExecutor(spec, LoadOptions(model_store=tmp_path, hf_cache_dir=str(cache), offline=True))
    assert ex.revision == SHA
    assert len(ex.run(TaskRequest("feature-extraction", "hello")).output) == 384


def test_a_repository_missing_from_the_cache_fails_clearly_offline(tmp_path):
    spec = ModelSpec(id="org/absent", task="text-classification", source={"repo_id": "org/absent"})
    with pytest.raises(ModelSourceError, match=r"org/absent@main from the Hugging Face cache \(offline\)"):
        ModelExecutor(
            spec, LoadOptions(model_store=tmp_path, hf_cache_dir=str(tmp_path / "hub"), offline=True)
        )
