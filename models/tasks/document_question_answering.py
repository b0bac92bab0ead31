"""document-question-answering with a transformers document QA model (LayoutLM, Donut): a document image and a
question -> [{answer, score, start, end}].

LayoutLM-style models read the document's words and boxes: from `parameters.word_boxes` when the client sends
them, else from Tesseract OCR (pytesseract and the tesseract binary) when installed; without either the request
gets a 400 that says so. OCR-free models (Donut) need neither."""

from __future__ import annotations

from typing import Any

from models.base import param_bool, param_int, param_str
from models.errors import InvalidInput
from models.tasks.image_classification import load_pipeline
from models.tasks.media_runner import MediaRunner, image_of_question, question_of, top_k
from models.types import DOCUMENT_QUESTION_ANSWERING, TaskRequest

_INTS = ("doc_stride", "max_answer_len", "max_question_len", "max_seq_len")


def _ocr_available() -> bool:
    import shutil

    try:
        import pytesseract  # noqa: F401
    except ImportError:
        return False
    return shutil.which("tesseract") is not None


def word_boxes(params: dict[str, Any]) -> list[tuple[str, list[int]]] | None:
    """`parameters.word_boxes`: [[word, [x0, y0, x1, y1]], ...] (boxes on a 0-1000 scale), validated."""
    value = params.get("word_boxes")
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise InvalidInput("parameters.word_boxes must be a non-empty list of [word, [x0, y0, x1, y1]]")
    out = []
    for i, item in enumerate(value):
        ok = (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], (list, tuple))
            and len(item[1]) == 4
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1000 for x in item[1]
            )
            # a box's width and height are embedded too: a negative one is no box
            and item[1][0] <= item[1][2]
            and item[1][1] <= item[1][3]
        )
        if not ok:
            raise InvalidInput(
                f"parameters.word_boxes[{i}] must be [word, [x0, y0, x1, y1]] with coordinates in 0..1000,"
                " x0 <= x1 and y0 <= y1"
            )
        out.append((item[0], [int(x) for x in item[1]]))
    return out


class DocumentQuestionAnsweringRunner(MediaRunner):
    tasks = (DOCUMENT_QUESTION_ANSWERING,)

    def media_value(self, request: TaskRequest) -> tuple[Any, str]:
        return image_of_question(request)

    def load(self) -> None:
        self.pipe = load_pipeline("document-question-answering", self)
        self.needs_words = self.pipe.model_type != "vision_encoder_decoder"
        self.ocr = _ocr_available()

    def validate(self, request: TaskRequest) -> None:
        super().validate(request)
        p = request.parameters
        self.texts(question_of(request), allow_list=False, field="inputs.question")
        for name in _INTS:
            param_int(p, name, lo=1, hi=4096)
        top_k(p, 100)
        param_bool(p, "handle_impossible_answer")
        param_str(p, "lang")
        boxes = word_boxes(p)
        if boxes is None and self.needs_words and not self.ocr:
            raise InvalidInput(
                "parameters.word_boxes is required for this model: the server has no OCR engine (Tesseract) to "
                "read the document's words"
            )
        self.image(request)

    def run(self, request: TaskRequest) -> tuple[Any, dict[str, int]]:
        p = request.parameters
        kwargs: dict[str, Any] = {
            k: p[k] for k in (*_INTS, "top_k", "handle_impossible_answer") if p.get(k) is not None
        }
        boxes = word_boxes(p)
        if boxes is not None:
            kwargs["word_boxes"] = boxes
        if p.get("lang"):
            kwargs["lang"] = p["lang"]
        out = self.pipe(image=self.image(request), question=question_of(request), **kwargs)
        usage = self.media_usage(request)
        self.forget(request)
        if isinstance(out, dict):
            out = [out]
        answers = []
        for o in out:
            answer: dict[str, Any] = {"answer": o.get("answer") or ""}
            for key in ("score", "start", "end"):
                if o.get(key) is not None:
                    answer[key] = float(o[key]) if key == "score" else int(o[key])
            answers.append(answer)
        return answers, usage
