"""Caps that follow the hardware: an image request whose estimated compute is past its model's compute limit
(`limits.max_compute_s`, models/deadline.py) on the hardware it runs on is refused when it is parsed, before any
compute, so it is never charged: without this it would run until the deadline stopped it, and be charged for an
unfinished image.

The estimate is `steps x seconds per step at the output's size`. The seconds per step come from what a replica of
the model measured when it started (serving/warmup.py `calibrate`: a few timed denoising steps at the model's
default size and at larger sizes, reported in the model's `info` as `image_compute`), or from the operator's
`limits.image_megapixel_steps_per_s`, which wins when set. With neither, only the static caps (`max_pixels`,
`max_steps`) apply.

A denoising step does not cost the same per pixel at every size: a transformer's attention over image tokens
grows with the square of the pixels, so step time is measured at several sizes and interpolated between them
(log-log). Past the largest size measured it grows as `c + a*mp + b*mp^2` (fixed, per-pixel and attention costs,
each >= 0) fitted to the points, which is between linear and quadratic growth; below the smallest it shrinks
linearly. An operator's figure is applied linearly.

Safety margin: a request is refused only when its estimate is more than ESTIMATE_MARGIN (2x) the compute limit,
so a measurement taken on a busy machine (replicas starting side by side), or one a little off, does not refuse a
request that would fit. Between 1x and 2x a request runs, and the deadline stops it if it does not finish. The
answer says what would fit by the estimate itself, without the margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from models.base import param_float, param_int
from models.catalog import ModelSpec
from models.deadline import max_compute_s
from models.errors import InvalidInput
from models.media import image_size
from models.types import IMAGE_TO_IMAGE, TEXT_TO_IMAGE, TaskRequest

IMAGE_TASKS = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE)
ESTIMATE_MARGIN = 2.0  # refuse only an estimate past this many times the compute limit (module docstring)
DEFAULT_SIZE_MULTIPLE = 16  # sizes suggested when the model did not say (a multiple for FLUX, 16, and SD, 8)
MEASURED = "measured on this replica"
KEPT = "measured on this hardware by an earlier replica"  # serving.warmup.CalibrationCache
OVERRIDE = "limits.image_megapixel_steps_per_s"


@dataclass(frozen=True)
class StepCost:
    """Seconds per denoising step as a function of the output's megapixels.

    `points` are (megapixels, seconds per step), ascending in megapixels; `source` says where they come from."""

    points: tuple[tuple[float, float], ...]
    source: str = MEASURED

    def __post_init__(self) -> None:
        if not self.points or any(mp <= 0 or s <= 0 for mp, s in self.points):
            raise ValueError("a step cost needs points with positive megapixels and seconds")
        points = sorted(self.points)
        # A larger image cannot take less time a step than a smaller one: a smaller one measured slower was noise,
        # so it gets the larger one's time (the lower figure, which refuses less).
        for i in range(len(points) - 2, -1, -1):
            if points[i][1] > points[i + 1][1]:
                points[i] = (points[i][0], points[i + 1][1])
        object.__setattr__(self, "points", tuple(points))

    @classmethod
    def linear(cls, megapixel_steps_per_s: float, source: str = OVERRIDE) -> StepCost:
        return cls(((1.0, 1.0 / megapixel_steps_per_s),), source)

    def step_seconds(self, megapixels: float) -> float:
        points = self.points
        first_mp, first_s = points[0]
        if megapixels <= first_mp:
            return first_s * megapixels / first_mp  # linear below the smallest size measured
        for (mp0, s0), (mp1, s1) in pairwise(points):
            if megapixels <= mp1:
                return s0 * (megapixels / mp0) ** (math.log(s1 / s0) / math.log(mp1 / mp0))
        last_mp, last_s = points[-1]
        return last_s * self.growth(megapixels / last_mp)

    def growth(self, ratio: float) -> float:
        """How much a step's time grows past the largest size measured, `ratio` times its megapixels: the fitted
        `c + a*x + b*x^2` (x in units of the largest size) at `ratio` over its value at 1, within [ratio, ratio^2]."""
        c, a, b = fit_step_cost(self.points)
        grown = (c + a * ratio + b * ratio * ratio) / (c + a + b) if c + a + b > 0 else ratio
        return min(ratio * ratio, max(ratio, grown))

    def megapixel_steps_per_s(self, megapixels: float | None = None) -> float:
        """The rate at `megapixels` (default: the smallest size measured, the model's default size)."""
        mp = self.points[0][0] if megapixels is None else megapixels
        return mp / self.step_seconds(mp)

    def to_info(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "megapixel_steps_per_s": self.megapixel_steps_per_s(),
            "points": [
                {"megapixels": mp, "seconds_per_step": s, "megapixel_steps_per_s": mp / s}
                for mp, s in self.points
            ],
        }

    @classmethod
    def from_info(cls, info: Any) -> StepCost | None:
        """The step cost a replica reported (`info["image_compute"]["step_cost"]`), None when absent or unusable."""
        try:
            points = tuple((float(p["megapixels"]), float(p["seconds_per_step"])) for p in info["points"])
            return cls(points, str(info.get("source", MEASURED)))
        except (KeyError, TypeError, ValueError):
            return None


def fit_step_cost(points: tuple[tuple[float, float], ...]) -> tuple[float, float, float]:
    """(c, a, b), each >= 0, of `seconds = c + a*x + b*x^2` with x = megapixels / the largest measured, fitted to
    the points by least squares on relative error (every size counts alike): the best of the fits on each subset
    of the three terms whose coefficients come out non-negative (one point: linear)."""
    top = points[-1][0]
    rows = [((1.0 / s, mp / top / s, (mp / top) ** 2 / s), 1.0) for mp, s in points]
    best: tuple[float, tuple[float, float, float]] | None = None
    for terms in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (1,), (2,), (0,)):
        if len(terms) > len(points):
            continue
        coef = _least_squares([[row[t] for t in terms] for row, _ in rows], [y for _, y in rows])
        if coef is None or any(v < 0 for v in coef):
            continue
        full = [0.0, 0.0, 0.0]
        for t, v in zip(terms, coef, strict=True):
            full[t] = v
        error = sum((sum(r * v for r, v in zip(row, full, strict=True)) - y) ** 2 for row, y in rows)
        if best is None or error < best[0] - 1e-12:
            best = (error, (full[0], full[1], full[2]))
    return best[1] if best is not None else (0.0, 1.0, 0.0)


def _least_squares(matrix: list[list[float]], target: list[float]) -> list[float] | None:
    """The least-squares solution of matrix @ x = target (normal equations, Gaussian elimination); None when
    singular."""
    n = len(matrix[0])
    normal = [[sum(row[i] * row[j] for row in matrix) for j in range(n)] for i in range(n)]
    rhs = [sum(row[i] * y for row, y in zip(matrix, target, strict=True)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(normal[r][col]))
        if abs(normal[pivot][col]) < 1e-12:
            return None
        normal[col], normal[pivot] = normal[pivot], normal[col]
        rhs[col], rhs[pivot] = rhs[pivot], rhs[col]
        for r in range(n):
            if r != col:
                factor = normal[r][col] / normal[col][col]
                normal[r] = [x - factor * y for x, y in zip(normal[r], normal[col], strict=True)]
                rhs[r] -= factor * rhs[col]
    return [rhs[i] / normal[i][i] for i in range(n)]


def image_compute_info(executor: Any) -> dict[str, Any] | None:
    """What a replica tells the ingress about an image model's compute (`info["image_compute"]`): the size
    multiple its pipeline takes and the step cost it measured (None before a measurement); None for other models."""
    if executor.spec.task not in IMAGE_TASKS:
        return None
    cost: StepCost | None = getattr(executor, "step_cost", None)
    return {
        "size_multiple": getattr(executor.runner, "size_multiple", None),
        "step_cost": cost.to_info() if cost is not None else None,
    }


def step_cost_of(spec: ModelSpec, info: dict[str, Any]) -> StepCost | None:
    """The operator's figure when set, else what the replica measured, else None (static caps only)."""
    if spec.limits.image_megapixel_steps_per_s is not None:
        return StepCost.linear(spec.limits.image_megapixel_steps_per_s)
    compute = info.get("image_compute")
    if not isinstance(compute, dict) or compute.get("step_cost") is None:
        return None
    return StepCost.from_info(compute["step_cost"])


@dataclass(frozen=True)
class ImageWork:
    """An image request's work: the output's size and the denoising steps asked for and run."""

    width: int
    height: int
    steps: int  # num_inference_steps, as asked
    strength: float = 1.0  # image-to-image: the share of the steps that run

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    def steps_run(self, steps: int | None = None) -> int:
        """Steps that run: image-to-image denoises only `strength` of its schedule (floored: the fewer)."""
        asked = self.steps if steps is None else steps
        return asked if self.strength >= 1 else math.floor(asked * self.strength)


def image_work(request: TaskRequest, spec: ModelSpec, size_multiple: int | None) -> ImageWork | None:
    """The work an image request asks for, read as the runner reads it (defaults included); None when a value is
    malformed or past a static cap, which the runner's validation then refuses with its own message."""
    p, d, limits = request.parameters, spec.defaults, spec.limits
    try:
        steps = param_int(p, "num_inference_steps", lo=1, hi=limits.max_steps)
        steps = steps or int(d.get("num_inference_steps", 28))
        if request.task == TEXT_TO_IMAGE:
            width = param_int(p, "width", int(d.get("width", 1024)), lo=1)
            height = param_int(p, "height", int(d.get("height", 1024)), lo=1)
            strength = 1.0
        else:
            strength = param_float(p, "strength", lo=0, hi=1, lo_open=True) or float(d.get("strength", 0.8))
            size = _image_to_image_size(request, size_multiple)
            if size is None:
                return None
            width, height = size
    except (InvalidInput, TypeError, ValueError):
        return None
    if width is None or height is None or width * height > limits.max_pixels or steps > limits.max_steps:
        return None
    return ImageWork(width, height, steps, strength)


def _image_to_image_size(request: TaskRequest, size_multiple: int | None) -> tuple[int, int] | None:
    """parameters.target_size, else the input image's size (from its header) rounded down as the runner does;
    None when neither is known here (an image by URL is fetched by the runner)."""
    target = request.parameters.get("target_size")
    if target is not None:
        if not isinstance(target, dict):
            return None
        width, height = param_int(target, "width", lo=1), param_int(target, "height", lo=1)
        return None if width is None or height is None else (width, height)
    if not isinstance(request.inputs, (bytes, bytearray)):
        return None
    size = image_size(bytes(request.inputs))
    if size is None:
        return None
    m = size_multiple or 1
    return max(m, size[0] // m * m), max(m, size[1] // m * m)


def check_compute_estimate(request: TaskRequest, spec: ModelSpec, info: dict[str, Any]) -> None:
    """Refuse (400, naming the limit, the estimate and what would fit) an image request whose estimated compute
    on this model's hardware is past ESTIMATE_MARGIN x its compute limit. Nothing happens for other tasks, for a
    model with no step cost (measured or set), or for a request the runner's validation will refuse anyway."""
    if request.task not in IMAGE_TASKS or spec.task not in IMAGE_TASKS:
        return
    cost = step_cost_of(spec, info)
    if cost is None:
        return
    compute = info.get("image_compute")
    multiple = compute.get("size_multiple") if isinstance(compute, dict) else None
    multiple = multiple if isinstance(multiple, int) and multiple > 0 else None
    work = image_work(request, spec, multiple)
    if work is None:
        return
    limit_s = max_compute_s(spec)
    step_s = cost.step_seconds(work.megapixels)
    estimate_s = work.steps_run() * step_s
    if estimate_s <= ESTIMATE_MARGIN * limit_s:
        return
    raise InvalidInput(refusal(spec, work, cost, limit_s, multiple or DEFAULT_SIZE_MULTIPLE))


def refusal(spec: ModelSpec, work: ImageWork, cost: StepCost, limit_s: float, multiple: int) -> str:
    step_s = cost.step_seconds(work.megapixels)
    estimate_s = work.steps_run() * step_s
    size = f"{work.width}x{work.height}"
    what = f"{size} at {work.steps} steps"
    if work.strength < 1:
        what += f" (strength {work.strength:g}: {work.steps_run()} steps run)"
    message = (
        f"parameters: {what} is estimated at {estimate_s:.0f} s of compute on {spec.hardware_profile} "
        f"({cost.megapixel_steps_per_s(work.megapixels):.3g} megapixel-steps/s at that size, {cost.source}), "
        f"more than this model's compute limit of {limit_s:g} s (limits.max_compute_s)"
    )
    fits: list[str] = []
    steps = max_steps_within(work, step_s, limit_s)
    if steps >= 1:
        fits.append(f"at most {steps} step{'s' if steps > 1 else ''} at {size}")
    smaller = largest_size_within(work, cost, limit_s, multiple)
    if smaller is not None:
        fits.append(f"{work.steps} steps at up to {smaller[0]}x{smaller[1]}")
    if fits:
        message += f"; what fits on {spec.hardware_profile}: " + ", or ".join(fits)
    return message


def max_steps_within(work: ImageWork, step_s: float, limit_s: float) -> int:
    """The most steps (as asked: num_inference_steps) whose estimate is within `limit_s` at the request's size."""
    run = math.floor(limit_s / step_s)  # steps that may run
    if work.strength >= 1:
        return min(run, work.steps)
    # the most asked steps with floor(steps * strength) <= run
    steps = math.ceil((run + 1) / work.strength) - 1
    while steps > 0 and work.steps_run(steps) > run:
        steps -= 1
    return max(0, min(steps, work.steps))


def largest_size_within(
    work: ImageWork, cost: StepCost, limit_s: float, multiple: int
) -> tuple[int, int] | None:
    """The largest size, the request's shape scaled down in multiples of `multiple`, whose estimate at the
    request's steps is within `limit_s`; None when none is."""
    width = work.width // multiple * multiple
    while width >= multiple:
        height = max(multiple, round(work.height * width / work.width / multiple) * multiple)
        if work.steps_run() * cost.step_seconds(width * height / 1e6) <= limit_s:
            return width, height
        width -= multiple
    return None
