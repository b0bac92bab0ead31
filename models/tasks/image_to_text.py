"""image-to-text (captioning) with a transformers vision-to-text generator (VisionEncoderDecoder, BLIP, GIT):
one image -> [{generated_text}] (the route answers the JS client with the bare object)."""

from __future__ import annotations

from typing import Any

from models.base import param_bool, param_float, param_int
from models.errors import InvalidInput
from models.tasks.media_runner import MediaRunner
from models.types import IMAGE_TO_TEXT, TaskRequest

# generate() options a request may set (the task spec's `generation_parameters`, or at the top of `parameters`).
_GENERATION_INTS = ("max_new_tokens", "min_new_tokens", "num_beams", "top_k", "no_repeat_ngram_size")
_GENERATION_FLOATS = ("temperature", "top_p", "repetition_penalty")


def generation_kwargs(params: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Validated generate() keyword arguments from `parameters` and `parameters.generation_parameters`."""
    nested = params.get("generation_parameters")
    if nested is not None and not isinstance(nested, dict):
        raise InvalidInput("parameters.generation_parameters must be a JSON object")
    merged = {**(nested or {}), **{k: v for k, v in params.items() if k != "generation_parameters"}}
    kwargs: dict[str, Any] = {}
    for name in _GENERATION_INTS:
        hi = max_new_tokens if name.endswith("new_tokens") else (16 if name == "num_beams" else None)
        value = param_int(
            merged, name, lo=0 if name == "top_k" else 1, hi=hi, hi_reason=" (this model's limit)"
        )
        if value is not None:
            kwargs[name] = value
    for name in _GENERATION_FLOATS:
        value = param_float(merged, name, lo=0, lo_open=name == "temperature")
        if value is not None:
            kwargs[name] = value
    do_sample = param_bool(merged, "do_sample")
    if do_sample is not None:
        kwargs["do_sample"] = do_sample
    return kwargs


class ImageToTextRunner(MediaRunner):
    tasks = (IMAGE_TO_TEXT,)

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        d = str(self.directory)
        processor = None
        try:
            processor = AutoProcessor.from_pretrained(d)
        except (OSError, ValueError, KeyError):
            processor = None
        if processor is not None and hasattr(processor, "image_processor"):
            self.image_processor, self.tokenizer = processor, processor.tokenizer
        else:  # a VisionEncoderDecoder repository: an image processor and a tokenizer side by side
            self.image_processor, self.tokenizer = (
                AutoImageProcessor.from_pretrained(d),
                AutoTokenizer.from_pretrained(d),
            )
        self.model = AutoModelForImageTextToText.from_pretrained(d, dtype=self.dtype).to(self.device).eval()

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        generation_kwargs(request.parameters, self.spec.limits.max_new_tokens)
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        import torch

        kwargs = generation_kwargs(request.parameters, self.spec.limits.max_new_tokens)
        kwargs.setdefault("max_new_tokens", int(self.spec.defaults.get("max_new_tokens", 32)))
        seed = request.parameters.get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):
            torch.manual_seed(seed)
        enc = self.image_processor(images=self.image(request), return_tensors="pt").to(self.device)
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**enc, **kwargs)
        prompt_len = enc["input_ids"].shape[1] if "input_ids" in enc else 0
        if prompt_len and not self.model.config.is_encoder_decoder:
            ids = ids[:, prompt_len:]
        text = self.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
        usage = {**self.media_usage(request), "generated_tokens": int(ids.shape[1])}
        self.forget(request)
        return [{"generated_text": text}], usage
