"""What one request to the served model may ask for, checked before any generation starts.

A request's cost is its number of images times its sampling steps, and its answer is N x H x W x 3 numbers written
as JSON (~4 bytes each: 10,000 images of 256 px are ~2 GB of pixels and ~8 GB of JSON). So every request is bounded:
- `labels`: a 1-D list of integer class labels in [0, num_classes), at most `max_labels_per_request` of them (a
  registration setting recorded with the model, `register.max_labels_per_request`);
- `steps`: in [1, diffusion.max_steps(sampler, diffusion_steps)];
- `cfg_scale`: a finite number >= 0;
- `seed`: an integer in [0, 2**63 - 1];
- `sampler`: one of diffusion.SAMPLERS.
A request outside them raises `RequestError`, whose message is one sentence naming the field, the bound and what
was sent; the pyfunc returns it as HTTP 400.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import ArtifactError
from pipeline.diffusion import SAMPLERS, max_steps

LIMITS_FILE = "serving_limits.json"
# Sample seeds are hashed into 63-bit generator seeds (generate.sample_seed), so any integer would do; the bound is
# MLflow's `long` param type and numpy's and torch's generator seeds (non-negative, 64-bit).
MAX_SEED = 2**63 - 1
SHOWN_CHARS = 60  # how much of a refused value an error message repeats


class RequestError(ValueError):
    """A request outside the served model's bounds; the message is one sentence."""


@dataclass(frozen=True)
class Request:
    labels: np.ndarray  # int64 (N,)
    seed: int
    sampler: str
    steps: int
    cfg_scale: float


def write_limits(path: str | Path, max_labels_per_request: int) -> Path:
    if (
        isinstance(max_labels_per_request, bool)
        or not isinstance(max_labels_per_request, int)
        or max_labels_per_request < 1
    ):
        raise ValueError(f"max_labels_per_request must be a positive integer, got {max_labels_per_request!r}")
    Path(path).write_text(json.dumps({"max_labels_per_request": max_labels_per_request}, indent=2))
    return Path(path)


def read_limits(path: str | Path) -> dict:
    """The limits recorded at registration; a model registered without them is refused at load, not served
    unbounded."""
    if not Path(path).is_file():
        raise ArtifactError(
            f"the registered model has no {LIMITS_FILE} (it predates request limits): register it "
            "again with `dvc repro register`"
        )
    return json.loads(Path(path).read_text())


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def check_labels(model_input: Any, num_classes: int, max_labels: int) -> np.ndarray:
    """int64 (N,) labels from a request's `inputs`: a flat list (or one column) of integers."""
    labels = np.asarray(model_input)
    if labels.ndim == 2 and labels.shape[1] == 1:  # a one-column DataFrame (dataframe_split requests)
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise RequestError(f"inputs must be a flat list of class labels, got an array of shape {labels.shape}.")
    if labels.size > max_labels:
        raise RequestError(
            f"a request may ask for at most {max_labels} images, got {labels.size}: split it into several requests."
        )
    if labels.size and (labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer)):
        kind = {"b": "true/false", "f": "fractional numbers", "U": "text", "S": "text"}.get(
            labels.dtype.kind, labels.dtype.name
        )
        raise RequestError(
            f"inputs must be integer class labels in [0, {num_classes}), got {kind} such as {_shown(labels[0].item())}."
        )
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise RequestError(f"inputs must be class labels in [0, {num_classes}), got {int(bad)}.")
    return labels.astype(np.int64)


def check_request(
    model_input: Any, params: dict | None, defaults: dict, *, num_classes: int, max_labels: int, diffusion_steps: int
) -> Request:
    """The request's labels and settings (`params` over the registered `defaults`), each checked against its
    bound; raises RequestError for the first that is not within it."""
    labels = check_labels(model_input, num_classes, max_labels)
    s = {**defaults, **(params or {})}
    seed, sampler, steps, cfg_scale = s["seed"], s["sampler"], s["steps"], s["cfg_scale"]
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED:
        raise RequestError(f"seed must be an integer in [0, {MAX_SEED}], got {_shown(seed)}.")
    if sampler not in SAMPLERS:
        raise RequestError(f"sampler must be one of {', '.join(SAMPLERS)}, got {_shown(sampler)}.")
    limit = max_steps(sampler, diffusion_steps)
    if isinstance(steps, bool) or not isinstance(steps, Integral) or not 1 <= steps <= limit:
        raise RequestError(
            f"steps must be an integer in [1, {limit}] for {sampler} on this model's "
            f"{diffusion_steps}-step diffusion, got {_shown(steps)}."
        )
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, Real) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise RequestError(f"cfg_scale must be a finite number >= 0, got {_shown(cfg_scale)}.")
    return Request(labels, int(seed), str(sampler), int(steps), float(cfg_scale))
