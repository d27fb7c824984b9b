"""One few-shot task in, labels out: validation of the predict payload, test-time adaptation, the forward pass.

Payload (a dict of arrays, contract v2):
- support_images: uint8 [S, H, W] (grayscale) or [S, H, W, 3] (RGB), any H, W
- support_labels: [S] integers using every class 0..N-1, or strings (class names; N = distinct names)
- query_images:   uint8 [Q, H', W'] or [Q, H', W', 3], in the support images' layout
Images are fitted to the model's `ImageFormat` (aspect kept, centre crop; grayscale <-> RGB converted).
Returns {"labels": [Q], "probabilities": float32 [Q, N], "classes": [N]}: the class of each probability column,
in sorted order (0..N-1 for integers, names sorted as Python sorts strings); labels are of the same kind.
JSON has no uint8: images of another integer dtype are taken when every value is in 0..255.
MLflow checks nothing before these: the served model has no input schema (serving.fewshot.signature).

Inference param `strategy` (STRATEGIES): `source` uses the registered weights as they are; for a per-example
method (ProtoNet, parameter prediction) `bn` normalizes with the statistics of the task's support + query
images and `tent` also takes entropy-minimizing steps on its BatchNorm affine parameters (metaflowlib.tta);
each request adapts a copy, so every request starts from the registered weights.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metaflowlib.data.preprocess import ImageFormat, fit_images, to_model_input
from metaflowlib.errors import PayloadError
from metaflowlib.methods import MetaLearner

FIELDS = ("support_images", "support_labels", "query_images")
STRATEGIES = ("source", "bn", "tent")
MAX_IMAGES = 20_000  # per request: a larger payload is refused rather than exhausting memory
MAX_SIDE = 1024
MAX_PIXELS = 2**28  # support + query: preprocessing holds them as float32 (1 GiB at this cap)
SHAPES = "[count, height, width] or [count, height, width, 3]"


@dataclass(frozen=True)
class TentOptions:
    """TENT inside one task; the defaults are params.yaml's serving.tent_fewshot, for versions logged before it was recorded."""

    steps: int = 3
    lr: float = 0.01

    def adapter_options(self) -> dict[str, Any]:
        """The keyword options of `metaflowlib.tta.strategies.TentAdapter`: Adam on the BatchNorm affine parameters."""
        return {"steps": self.steps, "optimizer": functools.partial(torch.optim.Adam, lr=self.lr)}


@dataclass(frozen=True)
class Task:
    """A validated payload: images as sent (uint8), labels as column indices int64 [S], the class of each column."""

    support: np.ndarray
    labels: np.ndarray
    query: np.ndarray
    classes: np.ndarray  # int64 0..N-1, or the sorted class names

    @property
    def ways(self) -> int:
        return len(self.classes)


def image_format_of(config: Mapping[str, Any]) -> ImageFormat:
    """The input format stored with an omega (its config.json); omegas saved before formats were stored are
    Omniglot's ink on paper at their `image_size`."""
    extra = config.get("extra") or {}
    if "image_format" in extra:
        return ImageFormat.from_dict(extra["image_format"])
    return ImageFormat.ink(int(extra["image_size"]))


def _array(payload: Mapping[str, Any], name: str) -> np.ndarray:
    """The field as an array; ragged nested lists (a JSON request with rows of different lengths) are refused."""
    try:
        return np.asarray(payload[name])
    except (ValueError, TypeError) as error:
        raise PayloadError(f"{name} is not a rectangular array: {error}") from None


def _images(payload: Mapping[str, Any], name: str) -> np.ndarray:
    """The field as uint8; shape first, so an empty JSON list (float64 to numpy) is named as empty."""
    array = _array(payload, name)
    if array.ndim not in (3, 4) or 0 in array.shape:
        raise PayloadError(f"{name} must have shape {SHAPES} with no empty axis, got {list(array.shape)}")
    if array.ndim == 4 and array.shape[3] != 3:
        raise PayloadError(f"{name} has {array.shape[3]} channels ({list(array.shape)}): send grayscale "
                           "[count, height, width] or RGB [count, height, width, 3] (RGBA composited over white first)")
    if array.shape[0] > MAX_IMAGES or max(array.shape[1:3]) > MAX_SIDE:
        raise PayloadError(f"{name} too large: {list(array.shape)} (at most {MAX_IMAGES} images of side <= {MAX_SIDE})")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iu":  # floats are refused, never rounded: [0, 1] images would become black
        raise PayloadError(f"{name} must be uint8 (0 = ink, 255 = paper), got {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise PayloadError(f"{name} must be uint8 (0 = ink, 255 = paper), got {array.dtype} values in [{low}, {high}]")
    return array.astype(np.uint8)


def _labels(payload: Mapping[str, Any], count: int) -> tuple[np.ndarray, np.ndarray]:
    """(column index of each support image int64 [S], the class of each column [N]) from integer or name labels."""
    labels = _array(payload, "support_labels")
    if labels.ndim != 1 or labels.shape[0] != count:
        raise PayloadError(f"support_labels must have shape [{count}] (one per support image), got {list(labels.shape)}")
    if labels.dtype.kind == "O" and all(isinstance(v, str) for v in labels):
        labels = labels.astype(str)
    if labels.dtype.kind in "US":
        empty = np.flatnonzero(np.char.str_len(labels) == 0)
        if empty.size:
            raise PayloadError(f"support_labels has an empty class name at index {int(empty[0])}")
        classes, indices = np.unique(labels, return_inverse=True)  # sorted names: the column order
        if classes.size < 2:
            raise PayloadError(f"support_labels must name at least 2 classes, got only {classes.tolist()}")
        return indices.astype(np.int64), classes
    if labels.dtype.kind not in "iu":  # floats are refused, never truncated
        raise PayloadError(f"support_labels must be integers 0..N-1 or class names (strings), got {labels.dtype}")
    classes = np.unique(labels)
    if classes.size < 2 or not np.array_equal(classes, np.arange(classes.size)):
        raise PayloadError(f"support_labels must use every class 0..N-1 with N >= 2, got classes {classes.tolist()[:20]}")
    return labels.astype(np.int64), classes.astype(np.int64)


def validate_payload(payload: Mapping[str, Any]) -> Task:
    """The task the payload describes, or one PayloadError naming the problem."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"payload must be a dict with keys {list(FIELDS)}, got {type(payload).__name__}")
    missing = [f for f in FIELDS if f not in payload]
    if missing:
        raise PayloadError(f"payload is missing {missing}; expected keys {list(FIELDS)}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise PayloadError(f"payload has unknown keys {unknown}; expected keys {list(FIELDS)}")
    support, query = _images(payload, "support_images"), _images(payload, "query_images")
    if support.ndim != query.ndim:
        kind = {3: "grayscale", 4: "RGB"}
        raise PayloadError(f"support_images are {kind[support.ndim]} {list(support.shape)} but query_images are "
                           f"{kind[query.ndim]} {list(query.shape)}: send both in one layout")
    if support.size + query.size > MAX_PIXELS:
        raise PayloadError(f"payload too large: {support.size + query.size} pixels in support_images + query_images (at most {MAX_PIXELS})")
    labels, classes = _labels(payload, support.shape[0])
    return Task(support, labels, query, classes)


def check_strategy(method: MetaLearner, strategy: Any, queries: int) -> str:
    """The strategy, if it applies to `method` and a task of `queries` query images; else one PayloadError."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise PayloadError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if strategy != "source" and not method.per_example_features:
        why = {"bn": "it already normalizes with each task's own batch statistics",
               "tent": "its inner loop on the support set is its test-time adaptation"}[strategy]
        raise PayloadError(f"strategy {strategy!r} does not apply to this {method.kind} model: {why}; use 'source'")
    if strategy != "source" and queries < 2:
        raise PayloadError(f"strategy {strategy!r} adapts to the query batch and needs at least 2 query_images, got {queries}")
    return strategy


def model_inputs(images: np.ndarray, fmt: ImageFormat, device: torch.device) -> torch.Tensor:
    """uint8 images as sent -> the model's float [N, C, S, S]: fitted to the format first unless they already are."""
    stored = (fmt.image_size, fmt.image_size) + (() if fmt.channels == 1 else (3,))
    fitted = images if images.shape[1:] == stored else fit_images(images, fmt)
    return to_model_input(fitted, fmt).to(device)


@torch.no_grad()
def predict_task(method: MetaLearner, payload: Mapping[str, Any], fmt: ImageFormat | int, device: torch.device,
                 strategy: str = "source", tent: TentOptions = TentOptions()) -> dict[str, np.ndarray]:
    """Adapt omega to the support set (theta_i), under `strategy`, then classify the queries."""
    fmt = ImageFormat.ink(fmt) if isinstance(fmt, int) else fmt
    task = validate_payload(payload)
    strategy = check_strategy(method, strategy, task.query.shape[0])
    if method.fixed_ways is not None and task.ways != method.fixed_ways:
        raise PayloadError(f"this {method.kind} model classifies {method.fixed_ways} classes per task; the support set has {task.ways}")
    support_x, query_x = model_inputs(task.support, fmt, device), model_inputs(task.query, fmt, device)
    support_y = torch.from_numpy(task.labels).to(device)
    if strategy == "source":
        if method.per_example_features:
            support_x, query_x = method.features(support_x), method.features(query_x)
        theta = method.adapt(support_x[None], support_y[None], task.ways)
        logits = method.predict(theta, query_x[None])[0].float()
    else:
        # imported by name, as serving.model imports the wrappers: the stages that log a few-shot model never adapt
        # one, so their DVC deps (tests/test_dvc_deps.py) leave the test-time adaptation code out
        task_module = importlib.import_module("metaflowlib.tta.fewshot").TaskModule(method, support_x, support_y, task.ways)
        build_adapter = importlib.import_module("metaflowlib.tta.strategies").build_adapter
        options = tent.adapter_options() if strategy == "tent" else {}
        logits = build_adapter(strategy, task_module, **options).predict(query_x).float()  # adapts a copy
    columns = logits.argmax(-1).cpu().numpy()
    return {"labels": task.classes[columns], "probabilities": logits.softmax(-1).cpu().numpy(), "classes": task.classes}
