"""all-MiniLM-L6-v2 behind plain Ray Serve with `@serve.batch`: the peer that shows what Serve alone costs.

`build(model_dir, torch_threads)` is the application benchmarks/peers.py deploys (at `/peer/serve`) beside this
backend's. It is what a Serve user would write from the docs: one deployment, `@serve.batch(max_batch_size=16,
batch_wait_timeout_s=0.01)`, `max_ongoing_requests` raised so that a batch can fill (the default of 5 would cap
it at 5), and the same `SentenceTransformer.encode` call on the same directory as the backend and LitServe. A
POST of `{"inputs": "a sentence"}` answers the sentence's 384 floats as a JSON list.
"""

from __future__ import annotations

from typing import Any

from ray import serve

MAX_BATCH_SIZE = 16
BATCH_WAIT_TIMEOUT_S = 0.01
MAX_ONGOING_REQUESTS = 64


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS, ray_actor_options={"num_cpus": 1})
class MiniLM:
    """One replica: the model, loaded once; requests gathered by `@serve.batch` into one encode."""

    def __init__(self, model_dir: str, torch_threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(torch_threads)
        self.model = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
        self.model.eval()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def embed(self, sentences: list[str]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            vectors = self.model.encode(
                sentences, convert_to_tensor=True, batch_size=64, show_progress_bar=False
            )
        return vectors.float().cpu().tolist()

    async def __call__(self, request: Any) -> list[float]:
        body = await request.json()
        return await self.embed(body["inputs"])


def build(model_dir: str, torch_threads: int) -> Any:
    """The bound application."""
    return MiniLM.bind(model_dir, torch_threads)
