"""all-MiniLM-L6-v2 behind LitServe, batched: the peer that benchmarks/peers.py measures this backend against.

Runs in the peers' own venv (.venv-peers: litserve, sentence-transformers, torch; nothing of this project):

    .venv-peers/bin/python benchmarks/peer_apps/litserve_minilm.py --model-dir DIR --port 8100

It answers `POST /models/sentence-transformers/all-MiniLM-L6-v2` with `{"inputs": "a sentence"}`, as this backend
does, with the sentence's 384 floats as a JSON list. The model code is the backend's: the same
`SentenceTransformer.encode` call on the same directory, in fp32 on the CPU, with the same number of torch threads
as the backend's replicas (the hardware profile's `torch_threads`, passed by the harness).
"""

from __future__ import annotations

import argparse

import litserve as ls

ROUTE = "/models/sentence-transformers/all-MiniLM-L6-v2"


class MiniLMAPI(ls.LitAPI):
    """One sentence per request; LitServe gathers up to `max_batch_size` of them for one encode."""

    def __init__(self, model_dir: str, torch_threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.torch_threads = torch_threads

    def setup(self, device: str) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self.torch_threads)
        self.model = SentenceTransformer(self.model_dir, device="cpu", local_files_only=True)
        self.model.eval()

    def decode_request(self, request: dict) -> str:
        return request["inputs"]

    def batch(self, inputs: list[str]) -> list[str]:
        return list(inputs)

    def predict(self, sentences: list[str]):
        import torch

        with torch.inference_mode():
            return self.model.encode(
                sentences, convert_to_tensor=True, batch_size=64, show_progress_bar=False
            )

    def unbatch(self, output) -> list:
        return list(output)

    def encode_response(self, output) -> list[float]:
        return output.float().cpu().tolist()


def main() -> None:
    """Serve until killed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-timeout-s", type=float, default=0.01)
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()
    api = MiniLMAPI(
        args.model_dir,
        args.torch_threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_s,
        api_path=ROUTE,
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
