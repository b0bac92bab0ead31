"""Registries keyed by name: task runners by Hub pipeline tag, default-model builders by name.

Entries are import strings so that a process imports only the heavy libraries it uses.
"""

from __future__ import annotations

import importlib
from typing import Any

from models.errors import TaskNotSupported

TASK_RUNNERS: dict[str, str] = {
    "text-to-image": "models.tasks.text_to_image:TextToImageRunner",
    "text-generation": "models.tasks.text_generation:TextGenerationRunner",
    "feature-extraction": "models.tasks.embeddings:SentenceEmbeddingRunner",
    "sentence-similarity": "models.tasks.embeddings:SentenceEmbeddingRunner",
    "text-classification": "models.tasks.text_classification:TextClassificationRunner",
    "question-answering": "models.tasks.question_answering:QuestionAnsweringRunner",
    "fill-mask": "models.tasks.fill_mask:FillMaskRunner",
    "token-classification": "models.tasks.token_classification:TokenClassificationRunner",
    "zero-shot-classification": "models.tasks.zero_shot_classification:ZeroShotClassificationRunner",
    "summarization": "models.tasks.seq2seq:SummarizationRunner",
    "translation": "models.tasks.seq2seq:TranslationRunner",
    "table-question-answering": "models.tasks.table_question_answering:TableQuestionAnsweringRunner",
    "tabular-classification": "models.tasks.tabular:TabularClassificationRunner",
    "tabular-regression": "models.tasks.tabular:TabularRegressionRunner",
    "image-classification": "models.tasks.image_classification:ImageClassificationRunner",
    "object-detection": "models.tasks.object_detection:ObjectDetectionRunner",
    "image-segmentation": "models.tasks.image_segmentation:ImageSegmentationRunner",
    "image-to-text": "models.tasks.image_to_text:ImageToTextRunner",
    "zero-shot-image-classification": "models.tasks.zero_shot_image_classification:ZeroShotImageClassificationRunner",
    "image-to-image": "models.tasks.image_to_image:ImageToImageRunner",
    "document-question-answering": "models.tasks.document_question_answering:DocumentQuestionAnsweringRunner",
    "visual-question-answering": "models.tasks.visual_question_answering:VisualQuestionAnsweringRunner",
    "automatic-speech-recognition": "models.tasks.automatic_speech_recognition:AutomaticSpeechRecognitionRunner",
    "audio-classification": "models.tasks.audio_classification:AudioClassificationRunner",
    "text-to-speech": "models.tasks.text_to_speech:TextToSpeechRunner",
    "text-to-audio": "models.tasks.text_to_speech:TextToSpeechRunner",
    "audio-to-audio": "models.tasks.audio_to_audio:AudioToAudioRunner",
}

BUILDERS: dict[str, str] = {
    "tiny-flux": "models.defaults:build_tiny_flux",
    "tiny-sentiment": "models.defaults:build_tiny_sentiment",
    "smollm2-135m-instruct": "models.defaults:build_smollm2",
    "all-minilm-l6-v2": "models.defaults:build_minilm",
    "tiny-qa": "models.defaults_text:build_tiny_qa",
    "tiny-fill-mask": "models.defaults_text:build_tiny_fill_mask",
    "tiny-ner": "models.defaults_text:build_tiny_ner",
    "tiny-nli": "models.defaults_text:build_tiny_nli",
    "tiny-summarizer": "models.defaults_text:build_tiny_summarizer",
    "tiny-translator": "models.defaults_text:build_tiny_translator",
    "tiny-tapas": "models.defaults_text:build_tiny_tapas",
    "tiny-wine-quality": "models.defaults_text:build_tiny_wine_quality",
    "tiny-fish-weight": "models.defaults_text:build_tiny_fish_weight",
    "tiny-vit-classifier": "models.vision_audio_defaults:build_tiny_vit_classifier",
    "tiny-yolos": "models.vision_audio_defaults:build_tiny_yolos",
    "tiny-segformer": "models.vision_audio_defaults:build_tiny_segformer",
    "tiny-captioner": "models.vision_audio_defaults:build_tiny_captioner",
    "tiny-clip": "models.vision_audio_defaults:build_tiny_clip",
    "tiny-vilt": "models.vision_audio_defaults:build_tiny_vilt",
    "tiny-layoutlm-qa": "models.vision_audio_defaults:build_tiny_layoutlm_qa",
    "tiny-wav2vec2-ctc": "models.vision_audio_defaults:build_tiny_wav2vec2_ctc",
    "tiny-wav2vec2-classifier": "models.vision_audio_defaults:build_tiny_wav2vec2_classifier",
    "tiny-vits": "models.vision_audio_defaults:build_tiny_vits",
    "tiny-speecht5-vc": "models.vision_audio_defaults:build_tiny_speecht5_vc",
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def runner_class(task: str) -> type:
    try:
        return _load(TASK_RUNNERS[task])
    except KeyError:
        raise TaskNotSupported(
            f"no runner for task {task!r} (supported: {', '.join(sorted(TASK_RUNNERS))})"
        ) from None


def builder(name: str) -> Any:
    try:
        return _load(BUILDERS[name])
    except KeyError:
        raise KeyError(f"unknown builder {name!r} (known: {', '.join(sorted(BUILDERS))})") from None
