"""OpenAPI request and response schemas of the vision and audio tasks (after the Hugging Face task specs).

Each entry: `summary`, `request` (media type -> schema) and `responses` (media type -> schema), read by
serving/openapi.py to describe `POST /models/{org}/{name}/pipeline/{task}`.
"""

from __future__ import annotations

from typing import Any

_B64 = {
    "type": "string",
    "description": "the file's bytes, base64 (or a data: URL)",
    "contentEncoding": "base64",
}
_IMAGE_BODY = {"type": "string", "format": "binary", "description": "the image file itself"}
_AUDIO_BODY = {
    "type": "string",
    "format": "binary",
    "description": "the audio file itself (WAV, FLAC, OGG, MP3)",
}
_RAW_IMAGE = {f"image/{t}": {"schema": _IMAGE_BODY} for t in ("png", "jpeg", "webp", "gif", "bmp", "tiff")}
_RAW_AUDIO = {f"audio/{t}": {"schema": _AUDIO_BODY} for t in ("wav", "flac", "ogg", "mpeg")}
_OCTET = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
_TOP_K = {"type": "integer", "minimum": 1}
_FUNCTION = {"type": "string", "enum": ["sigmoid", "softmax", "none"]}
_UNIT = {"type": "number", "minimum": 0, "maximum": 1}
_GENERATION = {
    "type": "object",
    "description": "generate() options",
    "properties": {
        "max_new_tokens": {"type": "integer", "minimum": 1},
        "min_new_tokens": {"type": "integer", "minimum": 1},
        "do_sample": {"type": "boolean"},
        "temperature": {"type": "number", "exclusiveMinimum": 0},
        "top_k": {"type": "integer", "minimum": 0},
        "top_p": {"type": "number", "minimum": 0},
        "num_beams": {"type": "integer", "minimum": 1, "maximum": 16},
    },
}
_LABEL_SCORES = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["label", "score"],
        "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
    },
}


def _json_body(inputs: dict[str, Any], parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    props: dict[str, Any] = {"inputs": inputs}
    if parameters is not None:
        props["parameters"] = {"type": "object", "properties": parameters}
    return {"application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": props}}}


def _file_task(raw: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    return {**raw, **_OCTET, **_json_body(_B64, parameters)}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_QUESTION = {
    "type": "object",
    "required": ["image", "question"],
    "properties": {"image": _B64, "question": {"type": "string", "minLength": 1}},
}
_AUDIO_OUT = {t: {"schema": {"type": "string", "format": "binary"}} for t in ("audio/flac", "audio/x-wav")}
_IMAGE_OUT = {t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png")}
_TEXT_TO_AUDIO_REQUEST = _json_body(
    {"type": "string", "minLength": 1}, {"seed": {"type": "integer"}, **_GENERATION["properties"]}
)

OPENAPI: dict[str, dict[str, Any]] = {
    "image-classification": {
        "summary": "Classify an image",
        "request": _file_task(_RAW_IMAGE, {"top_k": _TOP_K, "function_to_apply": _FUNCTION}),
        "responses": _json(_LABEL_SCORES),
    },
    "object-detection": {
        "summary": "Detect objects in an image (boxes in pixels of the input)",
        "request": _file_task(_RAW_IMAGE, {"threshold": _UNIT}),
        "responses": _json(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["label", "score", "box"],
                    "properties": {
                        "label": {"type": "string"},
                        "score": {"type": "number"},
                        "box": {
                            "type": "object",
                            "required": ["xmin", "ymin", "xmax", "ymax"],
                            "properties": {k: {"type": "integer"} for k in ("xmin", "ymin", "xmax", "ymax")},
                        },
                    },
                },
            }
        ),
    },
    "image-segmentation": {
        "summary": "Segment an image; each mask is a base64 PNG of the input's size",
        "request": _file_task(
            _RAW_IMAGE,
            {
                "threshold": _UNIT,
                "mask_threshold": _UNIT,
                "overlap_mask_area_threshold": _UNIT,
                "subtask": {"type": "string", "enum": ["semantic", "instance", "panoptic"]},
            },
        ),
        "responses": _json(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["label", "mask"],
                    "properties": {
                        "label": {"type": "string"},
                        "score": {"type": "number", "description": "absent for semantic segmentation"},
                        "mask": {
                            "type": "string",
                            "contentEncoding": "base64",
                            "contentMediaType": "image/png",
                        },
                    },
                },
            }
        ),
    },
    "image-to-text": {
        "summary": "Caption an image: [{generated_text}] ({generated_text} for the JS client, by User-Agent)",
        "request": _file_task(
            _RAW_IMAGE,
            {"max_new_tokens": {"type": "integer", "minimum": 1}, "generation_parameters": _GENERATION},
        ),
        "responses": _json(
            {
                "oneOf": [
                    {
                        "type": "array",
                        "items": {"type": "object", "properties": {"generated_text": {"type": "string"}}},
                    },
                    {"type": "object", "properties": {"generated_text": {"type": "string"}}},
                ]
            }
        ),
    },
    "zero-shot-image-classification": {
        "summary": "Classify an image into candidate labels",
        "request": _json_body(
            {"oneOf": [_B64, {"type": "object", "required": ["image"], "properties": {"image": _B64}}]},
            {
                "candidate_labels": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                },
                "hypothesis_template": {"type": "string", "description": "contains {}"},
            },
        ),
        "responses": _json(_LABEL_SCORES),
    },
    "visual-question-answering": {
        "summary": "Answer a question about an image",
        "request": _json_body(_QUESTION, {"top_k": _TOP_K}),
        "responses": _json(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["answer", "score"],
                    "properties": {"answer": {"type": "string"}, "score": {"type": "number"}},
                },
            }
        ),
    },
    "document-question-answering": {
        "summary": "Answer a question about a document image (word_boxes needed without an OCR engine)",
        "request": _json_body(
            _QUESTION,
            {
                "top_k": _TOP_K,
                "doc_stride": {"type": "integer", "minimum": 1},
                "max_answer_len": {"type": "integer", "minimum": 1},
                "max_question_len": {"type": "integer", "minimum": 1},
                "max_seq_len": {"type": "integer", "minimum": 1},
                "handle_impossible_answer": {"type": "boolean"},
                "lang": {"type": "string"},
                "word_boxes": {
                    "type": "array",
                    "items": {
                        "type": "array",
                        "prefixItems": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {"type": "number", "minimum": 0, "maximum": 1000},
                                "minItems": 4,
                                "maxItems": 4,
                            },
                        ],
                    },
                },
            },
        ),
        "responses": _json(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["answer"],
                    "properties": {
                        "answer": {"type": "string"},
                        "score": {"type": "number"},
                        "start": {"type": "integer"},
                        "end": {"type": "integer"},
                    },
                },
            }
        ),
    },
    "image-to-image": {
        "summary": "Transform an image (with an optional prompt); answered with image bytes",
        "request": _file_task(
            _RAW_IMAGE,
            {
                "prompt": {"type": "string"},
                "negative_prompt": {"type": "string"},
                "target_size": {
                    "type": "object",
                    "properties": {"width": {"type": "integer"}, "height": {"type": "integer"}},
                },
                "num_inference_steps": {"type": "integer", "minimum": 1},
                "guidance_scale": {"type": "number", "minimum": 0},
                "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "seed": {"type": "integer", "minimum": 0},
            },
        ),
        "responses": _IMAGE_OUT,
    },
    "automatic-speech-recognition": {
        "summary": "Transcribe speech",
        "request": _file_task(
            _RAW_AUDIO,
            {
                "return_timestamps": {
                    "oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["word", "char"]}]
                },
                "generation_parameters": _GENERATION,
            },
        ),
        "responses": _json(
            {
                "type": "object",
                "required": ["text"],
                "properties": {
                    "text": {"type": "string"},
                    "chunks": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "text": {"type": "string"},
                                "timestamp": {"type": "array", "items": {"type": "number"}},
                            },
                        },
                    },
                },
            }
        ),
    },
    "audio-classification": {
        "summary": "Classify audio",
        "request": _file_task(_RAW_AUDIO, {"top_k": _TOP_K, "function_to_apply": _FUNCTION}),
        "responses": _json(_LABEL_SCORES),
    },
    "audio-to-audio": {
        "summary": "Transform audio (speech enhancement, separation, voice conversion)",
        "request": _file_task(_RAW_AUDIO, {"seed": {"type": "integer", "minimum": 0}}),
        "responses": _json(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["label", "content-type", "blob"],
                    "properties": {
                        "label": {"type": "string"},
                        "content-type": {"type": "string"},
                        "blob": {"type": "string", "contentEncoding": "base64"},
                    },
                },
            }
        ),
    },
    "text-to-speech": {
        "summary": "Speak a text; answered with audio bytes (FLAC unless Accept asks for audio/wav)",
        "request": _TEXT_TO_AUDIO_REQUEST,
        "responses": _AUDIO_OUT,
    },
    "text-to-audio": {
        "summary": "Generate audio from a text; answered with audio bytes (FLAC unless Accept asks for audio/wav)",
        "request": _TEXT_TO_AUDIO_REQUEST,
        "responses": _AUDIO_OUT,
    },
}
