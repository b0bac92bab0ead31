"""summarization and translation with an encoder-decoder (transformers' AutoModelForSeq2SeqLM and `generate`).

transformers 5 dropped the summarization and translation pipelines; the work is the same: tokenize (truncating
as asked), generate within the model's `max_new_tokens` limit, decode. `[{summary_text}]` / `[{translation_text}]`,
one per input. Translation takes `src_lang`/`tgt_lang` for multilingual tokenizers (NLLB, M2M100, mBART) and
ignores them for a one-pair model, as the hosted service did. Work units: input tokens (usage also counts the
generated ones).
"""

from __future__ import annotations

from typing import Any, ClassVar

from models.base import param_bool, param_float, param_int, param_str
from models.errors import InvalidInput
from models.tasks.text_common import TransformersRunner
from models.types import SUMMARIZATION, TRANSLATION, TaskRequest

TRUNCATION = ("do_not_truncate", "longest_first", "only_first", "only_second")

# generate_parameters a client may set, and their checks
_INT_PARAMS = ("max_new_tokens", "max_length", "min_length", "min_new_tokens", "num_beams", "top_k",
               "no_repeat_ngram_size")  # fmt: skip
_FLOAT_PARAMS = ("temperature", "top_p", "repetition_penalty", "length_penalty")
_BOOL_PARAMS = ("do_sample", "early_stopping")


class Seq2SeqRunner(TransformersRunner):
    model_class = "AutoModelForSeq2SeqLM"
    output_key: ClassVar[str] = "summary_text"

    def _generate_kwargs(self, request: TaskRequest) -> dict[str, Any]:
        gp = request.parameters.get("generate_parameters") or {}
        if not isinstance(gp, dict):
            raise InvalidInput("parameters.generate_parameters must be a JSON object")
        limit = self.spec.limits.max_new_tokens
        kwargs: dict[str, Any] = {}
        for name in gp:
            if name not in _INT_PARAMS + _FLOAT_PARAMS + _BOOL_PARAMS:
                known = ", ".join(_INT_PARAMS + _FLOAT_PARAMS + _BOOL_PARAMS)
                raise InvalidInput(f"parameters.generate_parameters.{name} is not supported (known: {known})")
        for name in _INT_PARAMS:
            hi = 8 if name == "num_beams" else limit
            value = param_int(
                {f"generate_parameters.{name}": gp.get(name)},
                f"generate_parameters.{name}",
                lo=0 if name != "num_beams" else 1,
                hi=hi,
                hi_reason=" (this model's limit)",
            )
            if value is not None:
                kwargs[name] = value
        for name in _FLOAT_PARAMS:
            key = f"generate_parameters.{name}"
            value = param_float({key: gp.get(name)}, key, lo=0.0, lo_open=name == "temperature")
            if value is not None:
                kwargs[name] = value
        for name in _BOOL_PARAMS:
            value = param_bool({f"generate_parameters.{name}": gp.get(name)}, f"generate_parameters.{name}")
            if value is not None:
                kwargs[name] = value
        if "max_length" in kwargs:  # counted in generated tokens here, as for an encoder-decoder
            kwargs.setdefault("max_new_tokens", kwargs.pop("max_length"))
        default = int(
            self.spec.defaults.get("max_new_tokens")
            or getattr(self.model.generation_config, "max_new_tokens", None)
            or 64
        )
        kwargs.setdefault("max_new_tokens", min(default, limit))
        floor = getattr(self.model.generation_config, "min_new_tokens", None) or 0
        if floor > kwargs["max_new_tokens"]:  # the model's own floor never passes the asked maximum
            kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])
        return kwargs

    def _options(self, request: TaskRequest) -> dict[str, Any]:
        p = request.parameters
        return {
            "truncation": param_str(p, "truncation", "longest_first", choices=TRUNCATION),
            "clean_up": param_bool(p, "clean_up_tokenization_spaces", False),
            "generate": self._generate_kwargs(request),
        }

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        self.texts(request.inputs)
        self._options(request)

    def _prepare(self, request: TaskRequest, texts: list[str]) -> dict[str, Any]:
        """Extra generate() arguments for this request (translation: the target language)."""
        return {}

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        import torch

        texts = self.texts(request.inputs)
        opts = self._options(request)
        extra = self._prepare(request, texts)
        truncation = opts["truncation"]
        max_len = min(int(getattr(self.tokenizer, "model_max_length", 1024) or 1024), 4096)
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=False if truncation == "do_not_truncate" else truncation,
            max_length=max_len,
            return_tensors="pt",
        )
        if enc["input_ids"].shape[1] > max_len:
            raise InvalidInput(
                f"inputs: {enc['input_ids'].shape[1]} tokens, more than this model's {max_len}; "
                "send parameters.truncation to truncate"
            )
        with torch.inference_mode():
            out = self.model.generate(**enc.to(self.device), **opts["generate"], **extra)
        decoded = self.tokenizer.batch_decode(
            out, skip_special_tokens=True, clean_up_tokenization_spaces=opts["clean_up"]
        )
        # the generated tokens: after the decoder's start token, padding of the shorter outputs left out
        generated = int((out[:, 1:] != (self.tokenizer.pad_token_id or 0)).sum())
        usage = {"prompt_tokens": int(enc["attention_mask"].sum()), "completion_tokens": generated}
        return [{self.output_key: text} for text in decoded], usage


class SummarizationRunner(Seq2SeqRunner):
    tasks = (SUMMARIZATION,)
    output_key = "summary_text"


class TranslationRunner(Seq2SeqRunner):
    tasks = (TRANSLATION,)
    output_key = "translation_text"

    def _languages(self, request: TaskRequest) -> tuple[str | None, str | None]:
        src = param_str(request.parameters, "src_lang")
        tgt = param_str(request.parameters, "tgt_lang")
        if (src is None) != (tgt is None):
            raise InvalidInput(
                "parameters.src_lang and parameters.tgt_lang go together: give both or neither"
            )
        return src, tgt

    def _multilingual(self) -> bool:
        return hasattr(self.tokenizer, "src_lang")

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        src, tgt = self._languages(request)
        if tgt is not None and self._multilingual():
            for name, code in (("src_lang", src), ("tgt_lang", tgt)):
                if self.tokenizer.convert_tokens_to_ids(code) in (None, self.tokenizer.unk_token_id):
                    raise InvalidInput(f"parameters.{name}: {code!r} is not a language code of this model")

    def _prepare(self, request: TaskRequest, texts: list[str]) -> dict[str, Any]:
        src, tgt = self._languages(request)
        if tgt is None or not self._multilingual():
            return {}
        self.tokenizer.src_lang = src  # one request at a time on a replica (the executor's lock)
        return {"forced_bos_token_id": self.tokenizer.convert_tokens_to_ids(tgt)}
