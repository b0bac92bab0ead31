"""text-to-image: any diffusers text-to-image pipeline (FLUX first), PNG or JPEG by the client's Accept."""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.base import TaskRunner, param_float, param_int, param_str
from models.errors import InvalidInput
from models.types import TEXT_TO_IMAGE, StopRun, TaskRequest


def image_format(accept: str | None) -> str:
    """PNG when the client asks for it (the Python client does), JPEG otherwise (`*/*`, the JS client)."""
    accept = (accept or "").lower()
    if "image/png" in accept:
        return "png"
    if "image/jpeg" in accept or "image/jpg" in accept:
        return "jpeg"
    if "image/webp" in accept:
        return "webp"
    return "jpeg"


def step_callback(
    on_step: Callable[[], None], should_stop: Callable[[], bool]
) -> Callable[..., dict[str, Any]]:
    """A diffusers `callback_on_step_end` that reports each step and stops the run when asked (StopRun: out of
    the denoising loop, no more steps, no decode)."""

    def step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step()
        if should_stop():
            raise StopRun
        return callback_kwargs

    return step_end


class TextToImageRunner(TaskRunner):
    tasks = (TEXT_TO_IMAGE,)

    @classmethod
    def download(
        cls, repo_id: str, revision: str, token: str | None, cache_dir: str | None, local_files_only: bool
    ) -> Path:
        # diffusers knows which files of a pipeline repository it needs (not the single-file checkpoints).
        from diffusers import DiffusionPipeline

        return Path(
            DiffusionPipeline.download(
                repo_id,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )

    def load(self) -> None:
        from diffusers import AutoPipelineForText2Image

        self.pipe = AutoPipelineForText2Image.from_pretrained(str(self.directory), dtype=self.dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._call_params = set(inspect.signature(self.pipe.__call__).parameters)
        vae_scale = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        # FLUX packs 2x2 latent patches, so sizes must be a multiple of twice the VAE factor.
        self.size_multiple = vae_scale * 2 if "Flux" in type(self.pipe).__name__ else vae_scale
        self._default_scheduler = self.pipe.scheduler
        self._schedulers = {c.__name__: c for c in getattr(self.pipe.scheduler, "compatibles", [])}
        self._schedulers[type(self.pipe.scheduler).__name__] = type(self.pipe.scheduler)

    def _size(self, params: dict[str, Any], name: str) -> int:
        default = int(self.spec.defaults.get(name, 1024))
        value = param_int(params, name, default, lo=self.size_multiple)
        assert value is not None
        if value % self.size_multiple:
            raise InvalidInput(
                f"parameters.{name} must be a multiple of {self.size_multiple} for this pipeline, got {value}"
            )
        return value

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        limits = self.spec.limits
        self.texts(request.inputs, allow_list=False)
        p = request.parameters
        width, height = self._size(p, "width"), self._size(p, "height")
        if width * height > limits.max_pixels:
            raise InvalidInput(
                f"parameters.width x parameters.height = {width * height} pixels, more than this model's "
                f"limit of {limits.max_pixels}"
            )
        param_int(p, "num_inference_steps", lo=1, hi=limits.max_steps, hi_reason=" (this model's limit)")
        param_float(p, "guidance_scale", lo=0, hi=100)
        param_int(p, "seed", lo=0, hi=2**63 - 1)
        param_str(p, "negative_prompt")
        scheduler = param_str(p, "scheduler")
        if scheduler is not None and scheduler not in self._schedulers:
            raise InvalidInput(
                f"parameters.scheduler {scheduler!r} is not compatible with this pipeline "
                f"(choose from: {', '.join(sorted(self._schedulers))})"
            )

    stoppable = True

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        return self._generate(request, None)

    def run_steps(
        self, request: TaskRequest, on_step: Callable[[], None], should_stop: Callable[[], bool]
    ) -> tuple[Any, dict[str, int]]:
        if "callback_on_step_end" not in self._call_params:  # a pipeline without step callbacks runs whole
            return self._generate(request, None)
        return self._generate(request, step_callback(on_step, should_stop))

    def _generate(
        self, request: TaskRequest, step_end: Callable[..., Any] | None
    ) -> tuple[Any, dict[str, int]]:
        import torch

        p, d = request.parameters, self.spec.defaults
        kwargs: dict[str, Any] = {
            "prompt": request.inputs,
            "width": self._size(p, "width"),
            "height": self._size(p, "height"),
            "num_inference_steps": p.get("num_inference_steps") or d.get("num_inference_steps", 28),
        }
        guidance = p.get("guidance_scale", d.get("guidance_scale"))
        if guidance is not None and "guidance_scale" in self._call_params:
            kwargs["guidance_scale"] = float(guidance)
        if p.get("negative_prompt") and "negative_prompt" in self._call_params:
            kwargs["negative_prompt"] = p["negative_prompt"]
        seed = p.get("seed")
        if seed is not None:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(seed))
        if step_end is not None:
            kwargs["callback_on_step_end"] = step_end
        scheduler = p.get("scheduler")
        try:
            if scheduler and scheduler != type(self._default_scheduler).__name__:
                self.pipe.scheduler = self._schedulers[scheduler].from_config(self._default_scheduler.config)
            with torch.inference_mode():
                image = self.pipe(**kwargs).images[0]
        finally:
            self.pipe.scheduler = self._default_scheduler
        fmt = image_format(request.accept)
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
        return {"content": buf.getvalue(), "media_type": f"image/{fmt}"}, {"images": 1}

    def work_units(self, request: TaskRequest) -> int:
        p, d = request.parameters, self.spec.defaults
        steps = int(p.get("num_inference_steps") or d.get("num_inference_steps", 28))
        return (
            int(p.get("width") or d.get("width", 1024))
            * int(p.get("height") or d.get("height", 1024))
            * steps
        )
