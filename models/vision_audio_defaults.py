"""Builders of tiny vision and audio models: random weights from small configs, saved the way a Hub repository
is laid out (config, weights, processor files), so that the ordinary loading code reads them. For plumbing, not
for sense: each builds in about a second and weighs well under 5 MB."""

from __future__ import annotations

from pathlib import Path

from models.defaults import _CORPUS, _seed

IMAGE_LABELS = ["cat", "dog", "bird", "car", "tree"]
SEGMENT_LABELS = ["background", "cat", "dog"]
AUDIO_LABELS = ["speech", "music", "noise"]
VQA_ANSWERS = ["yes", "no", "two", "red", "cat"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz'")


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _vit_processor(size: int = 32):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size})


def _wordpiece_tokenizer(max_length: int = 64):
    """A BERT-style fast tokenizer trained in memory on the small corpus."""
    from models.defaults_text import wordpiece_tokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return wordpiece_tokenizer(_CORPUS, vocab_size=300, specials=specials, max_length=max_length)


def build_tiny_vit_classifier(directory: Path) -> None:
    """image-classification: a ViT with five labels, 32x32 input."""
    from transformers import ViTConfig, ViTForImageClassification

    _seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        **_labels(IMAGE_LABELS),
    )
    ViTForImageClassification(config).save_pretrained(str(directory))
    _vit_processor().save_pretrained(str(directory))


def build_tiny_yolos(directory: Path) -> None:
    """object-detection: a YOLOS (ViT with detection tokens) with three labels and ten detection tokens."""
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    _seed(0)
    config = YolosConfig(
        image_size=[32, 32],
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_detection_tokens=10,
        **_labels(IMAGE_LABELS[:3]),
    )
    model = YolosForObjectDetection(config)
    import torch

    with torch.no_grad():  # confident "cat" boxes, so that the default threshold (0.5) keeps some
        model.class_labels_classifier.layers[-1].bias[0] = 4.0
    model.save_pretrained(str(directory))
    YolosImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}).save_pretrained(str(directory))


def build_tiny_segformer(directory: Path) -> None:
    """image-segmentation (semantic): a SegFormer with three labels, 32x32 input."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    _seed(0)
    config = SegformerConfig(
        num_channels=3,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        **_labels(SEGMENT_LABELS),
    )
    SegformerForSemanticSegmentation(config).save_pretrained(str(directory))
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(directory))


def build_tiny_captioner(directory: Path) -> None:
    """image-to-text: a VisionEncoderDecoder (ViT encoder, GPT-2 decoder) over a WordPiece vocabulary trained
    here, so that even random captions read as words."""
    from transformers import GPT2Config, GPT2LMHeadModel, VisionEncoderDecoderModel, ViTConfig, ViTModel

    _seed(0)
    tokenizer = _wordpiece_tokenizer(max_length=64)
    start_id, end_id, pad_id = (tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    encoder = ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
    )
    decoder = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            add_cross_attention=True,
            bos_token_id=start_id,
            eos_token_id=end_id,
            pad_token_id=pad_id,
        )
    )
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start_id, end_id, pad_id
    model.generation_config.max_new_tokens = 16
    model.generation_config.min_new_tokens = 3  # a random decoder may end at once: say something
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    _vit_processor().save_pretrained(str(directory))


def build_tiny_clip(directory: Path) -> None:
    """zero-shot-image-classification: a CLIP with a CLIP tokenizer trained here, 32x32 input."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    _seed(0)
    tokenizer = CLIPTokenizer().train_new_from_iterator(_CORPUS, vocab_size=300)
    tokenizer.model_max_length = 77
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=2,
        num_hidden_layers=1,
    )
    model = CLIPModel(
        CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    )
    model.save_pretrained(str(directory))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(str(directory))


def build_tiny_vilt(directory: Path) -> None:
    """visual-question-answering: a ViLT answering from five answers, with a WordPiece tokenizer trained here."""
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessor, ViltProcessor

    _seed(0)
    tokenizer = _wordpiece_tokenizer(max_length=40)
    config = ViltConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=40,
        image_size=32,
        patch_size=8,
        max_image_length=-1,
        num_images=-1,
        **_labels(VQA_ANSWERS),
    )
    ViltForQuestionAnswering(config).save_pretrained(str(directory))
    processor = ViltProcessor(
        image_processor=ViltImageProcessor(size={"shortest_edge": 32}, size_divisor=8), tokenizer=tokenizer
    )
    processor.save_pretrained(str(directory))


def build_tiny_layoutlm_qa(directory: Path) -> None:
    """document-question-answering: a LayoutLM span extractor over word boxes, with a tokenizer trained here."""
    from transformers import LayoutLMConfig, LayoutLMForQuestionAnswering

    _seed(0)
    tokenizer = _wordpiece_tokenizer(max_length=128)
    config = LayoutLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        max_2d_position_embeddings=1024,
    )
    LayoutLMForQuestionAnswering(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def _char_ctc_tokenizer(directory: Path):
    import json

    from transformers import Wav2Vec2CTCTokenizer

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    for c in _CHARS:
        vocab[c] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    return Wav2Vec2CTCTokenizer(str(directory / "vocab.json"), word_delimiter_token="|")


def _wav2vec2_config(**extra):
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        **extra,
    )


def build_tiny_wav2vec2_ctc(directory: Path) -> None:
    """automatic-speech-recognition: a Wav2Vec2 CTC model over letters, 16 kHz input."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    _seed(0)
    tokenizer = _char_ctc_tokenizer(directory)
    model = Wav2Vec2ForCTC(_wav2vec2_config(vocab_size=len(tokenizer), pad_token_id=0))
    model.save_pretrained(str(directory))
    features = Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(str(directory))


def build_tiny_wav2vec2_classifier(directory: Path) -> None:
    """audio-classification: a Wav2Vec2 sequence classifier with three labels, 16 kHz input."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    _seed(0)
    model = Wav2Vec2ForSequenceClassification(
        _wav2vec2_config(classifier_proj_size=16, **_labels(AUDIO_LABELS))
    )
    model.save_pretrained(str(directory))
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(str(directory))


def build_tiny_vits(directory: Path) -> None:
    """text-to-speech / text-to-audio: a VITS (text to waveform) over letters, 16 kHz output."""
    import json

    from transformers import VitsConfig, VitsModel, VitsTokenizer

    _seed(0)
    vocab = {"<pad>": 0, " ": 1, "<unk>": 2}
    for c in _CHARS:
        vocab[c] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(directory / "vocab.json"), add_blank=True, phonemize=False)
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        flow_size=8,
        spectrogram_bins=17,
        upsample_initial_channel=16,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        duration_predictor_filter_channels=16,
        duration_predictor_num_flows=1,
        posterior_encoder_num_wavenet_layers=1,
        sampling_rate=16000,
    )
    VitsModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def build_tiny_speecht5_vc(directory: Path) -> None:
    """audio-to-audio: a SpeechT5 speech-to-speech model (voice conversion) with its HiFi-GAN vocoder in
    `vocoder/` and a speaker embedding (`speaker_embeddings.npy`), 16 kHz in and out."""
    import numpy as np
    from transformers import (
        SpeechT5Config,
        SpeechT5FeatureExtractor,
        SpeechT5ForSpeechToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    _seed(0)
    config = SpeechT5Config(
        vocab_size=81,
        hidden_size=24,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 8, 8),  # 320 samples a frame, as the real model
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_mel_bins=20,
        speech_decoder_prenet_units=32,
        speech_decoder_postnet_units=32,
        speech_decoder_postnet_layers=1,
        speaker_embedding_dim=16,
        reduction_factor=2,
        max_speech_positions=4000,
        max_text_positions=100,
    )
    SpeechT5ForSpeechToSpeech(config).save_pretrained(str(directory))
    SpeechT5FeatureExtractor(feature_size=1, sampling_rate=16000, num_mel_bins=20).save_pretrained(
        str(directory)
    )
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=20,
            upsample_initial_channel=16,
            upsample_rates=[8, 8, 4],  # 256 samples a mel frame, as the real vocoder
            upsample_kernel_sizes=[16, 16, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            sampling_rate=16000,
        )
    )
    vocoder.save_pretrained(str(directory / "vocoder"))
    np.save(directory / "speaker_embeddings.npy", np.random.RandomState(0).randn(16).astype("float32") * 0.1)
