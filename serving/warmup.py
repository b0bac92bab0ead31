"""Warm-up: one internal request that a replica runs on a model it just loaded, before the model takes traffic.

The first forward pass of a model pays for what later ones reuse (allocations, kernel choice, lazy initialisation,
a compile where the runner compiles), so the first user request would be the slowest. A model deployment runs this
in its constructor (Serve sends it nothing until the constructor returns); a pool runs it right after a load.

The request goes through the task's own adapter (the same parse and rendering as a client's request), with the
model's default parameters, and straight to the executor: it is never metered, so never charged, nor counted in the
request metrics.
A warm-up that fails is logged and the replica serves anyway (a real request then gets the real error).

An image model's warm-up then times a few denoising steps at a few sizes (`calibrate`): the seconds a step that
the ingress uses to refuse requests that cannot finish within the compute limit (models/compute_estimate.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import platform
import tempfile
import time
import uuid
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from models.compute_estimate import IMAGE_TASKS, KEPT, StepCost
from models.types import (
    AUDIO_CLASSIFICATION,
    AUDIO_TO_AUDIO,
    AUTOMATIC_SPEECH_RECOGNITION,
    DOCUMENT_QUESTION_ANSWERING,
    FEATURE_EXTRACTION,
    FILL_MASK,
    IMAGE_CLASSIFICATION,
    IMAGE_SEGMENTATION,
    IMAGE_TO_IMAGE,
    IMAGE_TO_TEXT,
    OBJECT_DETECTION,
    QUESTION_ANSWERING,
    SENTENCE_SIMILARITY,
    SUMMARIZATION,
    TABLE_QUESTION_ANSWERING,
    TEXT_CLASSIFICATION,
    TEXT_GENERATION,
    TEXT_TO_AUDIO,
    TEXT_TO_IMAGE,
    TEXT_TO_SPEECH,
    TOKEN_CLASSIFICATION,
    TRANSLATION,
    VISUAL_QUESTION_ANSWERING,
    ZERO_SHOT_CLASSIFICATION,
    ZERO_SHOT_IMAGE_CLASSIFICATION,
    Interrupted,
)

log = logging.getLogger("serving.warmup")

TEXT = "Warm-up: the quick brown fox jumps over the lazy dog."


@cache
def _png() -> str:
    """A small RGB PNG, base64."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 140, 160)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@cache
def _wav() -> str:
    """Half a second of quiet 16 kHz mono WAV, base64."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\x00\x01" * 8000)
    return base64.b64encode(buffer.getvalue()).decode()


def warmup_body(task: str, runner: Any = None) -> dict[str, Any] | None:
    """The JSON body of a warm-up request for `task` (None: the task has none, e.g. a tabular model, whose
    columns only its owner knows)."""
    bodies: dict[str, Any] = {
        TEXT_TO_IMAGE: lambda: {"inputs": TEXT},
        TEXT_GENERATION: lambda: {"inputs": TEXT, "parameters": {"max_new_tokens": 2}},
        FEATURE_EXTRACTION: lambda: {"inputs": TEXT},
        SENTENCE_SIMILARITY: lambda: {"inputs": {"source_sentence": TEXT, "sentences": [TEXT, "A cat."]}},
        TEXT_CLASSIFICATION: lambda: {"inputs": TEXT},
        TOKEN_CLASSIFICATION: lambda: {"inputs": TEXT},
        QUESTION_ANSWERING: lambda: {"inputs": {"question": "What jumps?", "context": TEXT}},
        FILL_MASK: lambda: {"inputs": f"The quick brown fox {_mask(runner)} over the lazy dog."},
        ZERO_SHOT_CLASSIFICATION: lambda: {
            "inputs": TEXT,
            "parameters": {"candidate_labels": ["animals", "cars"]},
        },
        SUMMARIZATION: lambda: {"inputs": TEXT},
        TRANSLATION: lambda: {"inputs": TEXT},
        TABLE_QUESTION_ANSWERING: lambda: {
            "inputs": {"query": "How many foxes?", "table": {"animal": ["fox", "dog"], "count": ["1", "2"]}}
        },
        IMAGE_CLASSIFICATION: lambda: {"inputs": _png()},
        OBJECT_DETECTION: lambda: {"inputs": _png()},
        IMAGE_SEGMENTATION: lambda: {"inputs": _png()},
        IMAGE_TO_TEXT: lambda: {"inputs": _png()},
        IMAGE_TO_IMAGE: lambda: {"inputs": _png(), "parameters": {"prompt": TEXT}},
        ZERO_SHOT_IMAGE_CLASSIFICATION: lambda: {
            "inputs": _png(),
            "parameters": {"candidate_labels": ["a fox", "a dog"]},
        },
        VISUAL_QUESTION_ANSWERING: lambda: {"inputs": {"image": _png(), "question": "What colour is it?"}},
        DOCUMENT_QUESTION_ANSWERING: lambda: {
            "inputs": {"image": _png(), "question": "What is the total?"},
            "parameters": {"word_boxes": [["Total", [0, 0, 400, 100]], ["42", [500, 0, 900, 100]]]},
        },
        AUTOMATIC_SPEECH_RECOGNITION: lambda: {"inputs": _wav()},
        AUDIO_CLASSIFICATION: lambda: {"inputs": _wav()},
        AUDIO_TO_AUDIO: lambda: {"inputs": _wav()},
        TEXT_TO_SPEECH: lambda: {"inputs": TEXT},
        TEXT_TO_AUDIO: lambda: {"inputs": TEXT},
    }
    make = bodies.get(task)
    return None if make is None else make()


def _mask(runner: Any) -> str:
    tokenizer = getattr(runner, "tokenizer", None)
    return str(getattr(tokenizer, "mask_token", None) or "[MASK]")


def internal_context(model_id: str, kind: str) -> Any:
    """The context of a request the replica makes itself (no client, never metered): ids `{kind}-{uuid}`."""
    from serving.routes.base import RequestContext

    request_id = f"{kind}-{uuid.uuid4()}"
    return RequestContext(request_id=request_id, inference_id=request_id, model_id=model_id, started_at=None)


def warm_up(
    executor: Any, *, calibrate_steps: bool = True, calibrations: CalibrationCache | None = None
) -> float | None:
    """Run the warm-up request of `executor`'s model (its catalog task) on it; the seconds it took, or None when
    the task has none or the warm-up failed (logged). `calibrate_steps`: an image model then times its denoising
    steps (False: a further warm-up, of another thread, which has nothing new to measure), or takes them from
    `calibrations` where an earlier replica measured them on the same hardware."""
    from serving.routes.registry import ADAPTERS

    spec = executor.spec
    adapter = ADAPTERS.get(spec.task)
    body = warmup_body(spec.task, executor.runner)
    if adapter is None or body is None:
        log.info("%s: no warm-up for task %s", spec.id, spec.task)
        return None
    ctx = internal_context(spec.id, "warmup")
    started = time.perf_counter()
    try:
        parsed = adapter.parse(body, spec, ctx)
        result = executor.run(parsed.request)
        if not parsed.stream:  # the response's encoding (JSON, PNG, WAV) has first calls too
            adapter.render(result, parsed, ctx)
        if spec.batching is not None and executor.runner.batchable:  # batched requests take their own path
            batch_started = time.perf_counter()
            executor.run_batch([parsed.request, parsed.request], [0, 0])
            executor.warm_batch_s = time.perf_counter() - batch_started
    except Exception as err:
        log.warning("%s: the warm-up request failed (serving anyway): %s", spec.id, err)
        return None
    took = time.perf_counter() - started
    log.info("%s: warmed up in %.2f s", spec.id, took)
    if calibrate_steps and spec.task in IMAGE_TASKS:
        try:
            executor.step_cost = step_cost(executor, calibrations)
        except Exception as err:  # the replica serves anyway, under its static caps only
            log.warning("%s: the calibration failed (static caps only): %s", spec.id, err)
    return took


def warm_up_where_served(
    executor: Any, *, here_too: bool = False, calibrations: CalibrationCache | None = None
) -> float | None:
    """`warm_up` on a thread of the event loop's default thread pool, when called on a running loop's thread (a
    Serve replica's constructor runs on its user-code loop, whose pool runs the model for its requests): the first
    requests then find that thread started and warmed. Part of a model's first-call costs is per thread (torch's
    thread-local state and its intra-op thread team): measured here, the first call on a new thread took 0.5 ms
    more than the next for local/tiny-sentiment and 6 ms more for all-MiniLM-L6-v2, beside about 1 ms to start the
    thread itself. `here_too`: then once more on this thread (a batched model whose short batches run on the loop,
    see serving.batching.LoopOrThread). Without a running loop, `warm_up` on this thread."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return warm_up(executor, calibrations=calibrations)
    # CPython's default executor of the loop: Serve sets its own; else made here, as asyncio would.
    threads = getattr(loop, "_default_executor", None)
    if not isinstance(threads, ThreadPoolExecutor):
        if threads is not None:  # some other executor: leave it alone
            return warm_up(executor, calibrations=calibrations)
        threads = ThreadPoolExecutor(thread_name_prefix="asyncio")
        loop.set_default_executor(threads)
    # Blocking this thread is what the constructor does anyway: Serve sends nothing until it returns.
    took = threads.submit(warm_up, executor, calibrations=calibrations).result()
    if here_too and took is not None:
        warm_up(executor, calibrate_steps=False)
    return took


# Calibration of an image model (models/compute_estimate.py): timed denoising steps at the model's default size, then
# at twice the width and height, and so on while a step took under CALIBRATION_GROW_BELOW_S and the size is within
# limits.max_pixels. Each size runs at least CALIBRATION_MIN_STEPS steps, more (up to CALIBRATION_MAX_STEPS) until
# CALIBRATION_SAMPLE_S of compute, so short steps get more samples; a run stops after its last step (no decode), or
# once it has computed CALIBRATION_RUN_CAP_S. A step's time is the shortest between two step ends (the first step,
# which carries the prompt's encoding, is left out): the lowest figure, which refuses least. On the CPU it is also
# at most the process's CPU time over that step divided by its torch threads: a replica that starts while others
# compete for the same cores waits for them, and that wait is no part of what the model costs.
CALIBRATION_MIN_STEPS = 3
CALIBRATION_MAX_STEPS = 12
CALIBRATION_SAMPLE_S = 0.3
CALIBRATION_GROW_BELOW_S = 0.5
CALIBRATION_RUN_CAP_S = 1.5
CALIBRATION_FIRST_SIDE = 64  # image-to-image, which has no default size: from 64x64 up


def calibration_body(task: str, width: int, height: int, steps: int) -> dict[str, Any]:
    """A timed request at `width` x `height`, `steps` denoising steps that all run (image-to-image: strength 1)."""
    if task == TEXT_TO_IMAGE:
        return {
            "inputs": TEXT,
            "parameters": {"width": width, "height": height, "num_inference_steps": steps},
        }
    return {
        "inputs": _png(),
        "parameters": {
            "prompt": TEXT,
            "target_size": {"width": width, "height": height},
            "num_inference_steps": steps,
            "strength": 1.0,
        },
    }


def calibrate(executor: Any) -> StepCost | None:
    """Measure an image model's seconds per denoising step at a few sizes on this replica; None when it cannot
    (a runner that does not report its steps, or a failed run: logged). Never metered, like the warm-up."""
    spec = executor.spec
    if not executor.stoppable:
        return None
    multiple = int(getattr(executor.runner, "size_multiple", 8) or 8)
    steps = min(CALIBRATION_MAX_STEPS, spec.limits.max_steps)
    if spec.task == TEXT_TO_IMAGE:
        width, height = int(spec.defaults.get("width", 1024)), int(spec.defaults.get("height", 1024))
    else:
        width = height = -(-CALIBRATION_FIRST_SIDE // multiple) * multiple
    threads = _torch_threads() if str(executor.device) == "cpu" else None
    points: list[tuple[float, float]] = []
    started = time.perf_counter()
    while width * height <= spec.limits.max_pixels:
        timed = _timed_steps(executor, width, height, steps)
        if timed is None:
            break
        step_s = step_seconds(*timed, threads)
        if step_s <= 0:
            break
        points.append((width * height / 1e6, step_s))
        if step_s >= CALIBRATION_GROW_BELOW_S:
            break
        width, height = width * 2, height * 2
    if not points:
        return None
    cost = StepCost(tuple(points))
    log.info(
        "%s: calibrated in %.2f s (megapixels, seconds a step): %s",
        spec.id,
        time.perf_counter() - started,
        _points(cost),
    )
    return cost


def step_cost(executor: Any, calibrations: CalibrationCache | None = None) -> StepCost | None:
    """An image model's seconds a step: from `calibrations` where a replica of the same model on the same hardware
    measured them within its age, else measured now (`calibrate`) and kept there."""
    if calibrations is None:
        return calibrate(executor)
    key = calibration_key(executor)  # once: it reads the processor's name and the libraries' versions
    kept = calibrations.get(key, executor.spec.id)
    if kept is not None:
        return kept
    cost = calibrate(executor)
    if cost is not None:
        calibrations.put(key, executor.spec.id, cost)
    return cost


# What makes a calibration valid for another replica: what it ran (the model's revision, dtype, load options, the
# sizes and steps it may time), where (the device's model, the torch threads on the CPU) and with what (the
# libraries' versions, CALIBRATION_VERSION for this code's way of timing).
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class CalibrationCache:
    """Step calibrations kept as files in `directory`, one a model and hardware (named by a digest of
    `calibration_key`), reused for `max_age_s` seconds. A replica that cannot read or write them measures."""

    directory: Path
    max_age_s: float

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def get(self, key: dict[str, Any], model_id: str) -> StepCost | None:
        """The figure kept under `key` (see `calibration_key`) within its age, else None."""
        try:
            kept = json.loads(self._path(key).read_text())
            age = time.time() - float(kept["measured_at"])
            if kept["key"] != key or not -60 <= age <= self.max_age_s:
                return None
            cost = StepCost(tuple((float(mp), float(s)) for mp, s in kept["points"]), KEPT)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable, or written by something else
            log.info("%s: the kept calibration is not usable (measuring): %s", model_id, err)
            return None
        log.info(
            "%s: calibration measured %.1f hours ago on this hardware (megapixels, seconds a step): %s",
            model_id,
            age / 3600,
            _points(cost),
        )
        return cost

    def put(self, key: dict[str, Any], model_id: str, cost: StepCost) -> None:
        """Keep `cost` under `key`; a directory that cannot hold it is logged, and the replica goes on."""
        path = self._path(key)
        kept = {"key": key, "measured_at": time.time(), "points": [list(p) for p in cost.points]}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        except OSError as err:
            log.info("%s: the calibration is not kept (%s): %s", model_id, self.directory, err)
            return
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(kept, out)
            os.replace(temporary, path)  # whole or not at all, whichever replica writes last
        except OSError as err:
            log.info("%s: the calibration is not kept (%s): %s", model_id, path, err)
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def calibration_key(executor: Any) -> dict[str, Any]:
    """What a kept calibration must match to be reused (see CALIBRATION_VERSION)."""
    import torch

    spec, runner = executor.spec, executor.runner
    device = str(executor.device)
    key: dict[str, Any] = {
        "version": CALIBRATION_VERSION,
        "model": spec.id,
        "task": spec.task,
        "revision": executor.revision,
        "dtype": str(getattr(runner, "dtype", spec.dtype)),
        # the runner's load options, as the kept file holds them
        "options": json.loads(json.dumps(spec.options, sort_keys=True, default=str)),
        "device": device,
        "hardware": _device_model(device),
        "torch_threads": torch.get_num_threads() if device == "cpu" else None,
        "size_multiple": int(getattr(runner, "size_multiple", 8) or 8),
        "width": spec.defaults.get("width"),
        "height": spec.defaults.get("height"),
        "max_pixels": spec.limits.max_pixels,
        "max_steps": spec.limits.max_steps,
        "libraries": {name: _version(name) for name in ("torch", "diffusers", "transformers")},
    }
    return key


def _device_model(device: str) -> str:
    """The GPU's name, or on the CPU the processor's model name (Linux) and the cores this process may use."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _points(cost: StepCost) -> str:
    return ", ".join(f"({mp:.4g}, {s:.4g})" for mp, s in cost.points)


def _timed_steps(
    executor: Any, width: int, height: int, steps: int
) -> tuple[list[tuple[int, int]], int] | None:
    """One calibration run: (compute ns, the process's CPU ns) at each step's end, and the CPU ns at its start;
    None when no step ran (logged)."""
    from serving.routes.registry import ADAPTERS

    spec = executor.spec
    ctx = internal_context(spec.id, "calibration")
    marks: list[tuple[int, int]] = []

    def mark(elapsed_ns: int) -> None:
        marks.append((elapsed_ns, time.process_time_ns()))

    def done() -> bool:
        if not marks:
            return False
        elapsed_s = marks[-1][0] / 1e9
        enough = len(marks) >= CALIBRATION_MIN_STEPS and elapsed_s >= CALIBRATION_SAMPLE_S
        return len(marks) >= steps or enough or elapsed_s >= CALIBRATION_RUN_CAP_S

    cpu_started = time.process_time_ns()
    try:
        request = (
            ADAPTERS[spec.task].parse(calibration_body(spec.task, width, height, steps), spec, ctx).request
        )
        executor.run(request, should_stop=done, on_step=mark)
    except Interrupted:
        pass  # stopped after its last step: the decode is not timed
    except Exception as err:
        if not marks:
            log.warning("%s: the calibration at %dx%d failed: %s", spec.id, width, height, err)
    return (marks, cpu_started) if marks else None


def step_seconds(marks: list[tuple[int, int]], cpu_started_ns: int, threads: int | None) -> float:
    """Seconds a step from (compute ns, process CPU ns) at each step's end: the shortest gap between two ends (one
    step only: the first, prompt included); with `threads` (on the CPU), each gap at most its CPU time / threads."""
    starts = [(0, cpu_started_ns), *marks] if len(marks) == 1 else marks
    gaps = []
    for (wall0, cpu0), (wall1, cpu1) in pairwise(starts):
        wall = wall1 - wall0
        gaps.append(min(wall, (cpu1 - cpu0) / threads) if threads else wall)
    return min(gaps) / 1e9


def _torch_threads() -> int:
    import torch

    return max(1, torch.get_num_threads())
