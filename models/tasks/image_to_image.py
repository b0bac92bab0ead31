"""image-to-image with a diffusers image-to-image pipeline (FLUX, Stable Diffusion, ...): an image and an
optional prompt -> image bytes, PNG or JPEG by the client's Accept (as text-to-image)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.base import param_float, param_int, param_str
from models.errors import InvalidInput
from models.media import encode_image
from models.tasks.media_runner import MediaRunner
from models.tasks.text_to_image import TextToImageRunner, image_format, step_callback
from models.types import IMAGE_TO_IMAGE, TaskRequest


class ImageToImageRunner(MediaRunner):
    tasks = (IMAGE_TO_IMAGE,)
    stoppable = True

    @classmethod
    def download(
        cls, repo_id: str, revision: str, token: str | None, cache_dir: str | None, local_files_only: bool
    ) -> Path:
        return TextToImageRunner.download(repo_id, revision, token, cache_dir, local_files_only)

    def load(self) -> None:
        from diffusers import AutoPipelineForImage2Image

        self.pipe = AutoPipelineForImage2Image.from_pretrained(str(self.directory), dtype=self.dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._call_params = set(inspect.signature(self.pipe.__call__).parameters)
        vae_scale = int(getattr(self.pipe, "vae_scale_factor", 8) or 8)
        self.size_multiple = vae_scale * 2 if "Flux" in type(self.pipe).__name__ else vae_scale

    def _target_size(self, request: TaskRequest) -> tuple[int, int]:
        """The output (width, height): parameters.target_size, else the input's size; a multiple the pipeline
        accepts, within this model's pixel limit."""
        size = request.parameters.get("target_size")
        if size is not None:
            if not isinstance(size, dict):
                raise InvalidInput("parameters.target_size must be an object {width, height}")
            width = param_int(size, "width", lo=self.size_multiple)
            height = param_int(size, "height", lo=self.size_multiple)
            if width is None or height is None:
                raise InvalidInput("parameters.target_size needs both width and height")
            for name, value in (("width", width), ("height", height)):
                if value % self.size_multiple:
                    raise InvalidInput(
                        f"parameters.target_size.{name} must be a multiple of {self.size_multiple}, got {value}"
                    )
        else:
            width, height = self.image(request).size
            width = max(self.size_multiple, width // self.size_multiple * self.size_multiple)
            height = max(self.size_multiple, height // self.size_multiple * self.size_multiple)
        limit = self.spec.limits.max_pixels
        if width * height > limit:
            where = "parameters.target_size" if size is not None else "inputs (the image's size)"
            raise InvalidInput(
                f"{where}: {width}x{height} = {width * height} output pixels, more than this model's limit of "
                f"{limit}; send a smaller image or a target_size"
            )
        return width, height

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        p = request.parameters
        if p.get("prompt") is not None:
            self.texts(p["prompt"], allow_list=False, field="parameters.prompt")
        param_str(p, "negative_prompt")
        param_int(
            p, "num_inference_steps", lo=1, hi=self.spec.limits.max_steps, hi_reason=" (this model's limit)"
        )
        param_float(p, "guidance_scale", lo=0, hi=100)
        param_float(p, "strength", lo=0, hi=1, lo_open=True)
        param_int(p, "seed", lo=0, hi=2**63 - 1)
        self.image(request)
        self._target_size(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        return self._generate(request, None)

    def run_steps(
        self, request: TaskRequest, on_step: Callable[[], None], should_stop: Callable[[], bool]
    ) -> tuple[Any, dict[str, int]]:
        if "callback_on_step_end" not in self._call_params:
            return self._generate(request, None)
        return self._generate(request, step_callback(on_step, should_stop))

    def _generate(
        self, request: TaskRequest, step_end: Callable[..., Any] | None
    ) -> tuple[Any, dict[str, int]]:
        import torch

        p, d = request.parameters, self.spec.defaults
        width, height = self._target_size(request)
        image = self.image(request).resize((width, height))
        kwargs: dict[str, Any] = {
            "prompt": p.get("prompt") or "",
            "image": image,
            "num_inference_steps": p.get("num_inference_steps") or d.get("num_inference_steps", 28),
            "strength": float(p.get("strength") or d.get("strength", 0.8)),
        }
        if "height" in self._call_params:
            kwargs["height"], kwargs["width"] = height, width
        guidance = p.get("guidance_scale", d.get("guidance_scale"))
        if guidance is not None and "guidance_scale" in self._call_params:
            kwargs["guidance_scale"] = float(guidance)
        if p.get("negative_prompt") and "negative_prompt" in self._call_params:
            kwargs["negative_prompt"] = p["negative_prompt"]
        if p.get("seed") is not None:
            kwargs["generator"] = torch.Generator(device="cpu").manual_seed(int(p["seed"]))
        if step_end is not None:
            kwargs["callback_on_step_end"] = step_end
        try:
            with torch.inference_mode():
                out = self.pipe(**kwargs).images[0]
        finally:
            usage = self.media_usage(request)
            self.forget(request)
        fmt = image_format(request.accept)
        return {"content": encode_image(out.convert("RGB"), fmt), "media_type": f"image/{fmt}"}, usage

    def work_units(self, request: TaskRequest) -> int:
        steps = int(
            request.parameters.get("num_inference_steps") or self.spec.defaults.get("num_inference_steps", 28)
        )
        return super().work_units(request) * steps
