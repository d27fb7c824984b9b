"""One few-shot task in, labels out: validation of the predict payload and the forward pass.

Payload (a dict of arrays):
- support_images: uint8 [S, H, W]  (0 = black ink, 255 = white paper; any H, W)
- support_labels: int   [S]        (every class 0..N-1 present)
- query_images:   uint8 [Q, H', W']
Returns {"labels": int64 [Q], "probabilities": float32 [Q, N]}.
JSON has no uint8: images of another integer dtype are taken when every value is in 0..255.
MLflow checks nothing before these: the served model has no input schema (serving.fewshot.signature).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from metaflowlib.data.preprocess import to_model_input
from metaflowlib.errors import PayloadError
from metaflowlib.methods import MetaLearner

FIELDS = ("support_images", "support_labels", "query_images")
MAX_IMAGES = 20_000  # per request: a larger payload is refused rather than exhausting memory
MAX_SIDE = 1024
MAX_PIXELS = 2**28  # support + query: preprocessing holds them as float32 (1 GiB at this cap)


def _array(payload: Mapping[str, Any], name: str) -> np.ndarray:
    """The field as an array; ragged nested lists (a JSON request with rows of different lengths) are refused."""
    try:
        return np.asarray(payload[name])
    except (ValueError, TypeError) as error:
        raise PayloadError(f"{name} is not a rectangular array: {error}") from None


def _images(payload: Mapping[str, Any], name: str) -> np.ndarray:
    """The field as uint8; shape first, so an empty JSON list (float64 to numpy) is named as empty."""
    array = _array(payload, name)
    if array.ndim != 3 or 0 in array.shape:
        raise PayloadError(f"{name} must have shape [count, height, width] with no empty axis, got {list(array.shape)}")
    if array.shape[0] > MAX_IMAGES or max(array.shape[1:]) > MAX_SIDE:
        raise PayloadError(f"{name} too large: {list(array.shape)} (at most {MAX_IMAGES} images of side <= {MAX_SIDE})")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iu":  # floats are refused, never rounded: [0, 1] images would become black
        raise PayloadError(f"{name} must be uint8 (0 = ink, 255 = paper), got {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise PayloadError(f"{name} must be uint8 (0 = ink, 255 = paper), got {array.dtype} values in [{low}, {high}]")
    return array.astype(np.uint8)


def validate_payload(payload: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(support images, support labels int64, query images, ways) or one PayloadError naming the problem."""
    if not isinstance(payload, Mapping):
        raise PayloadError(f"payload must be a dict with keys {list(FIELDS)}, got {type(payload).__name__}")
    missing = [f for f in FIELDS if f not in payload]
    if missing:
        raise PayloadError(f"payload is missing {missing}; expected keys {list(FIELDS)}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise PayloadError(f"payload has unknown keys {unknown}; expected keys {list(FIELDS)}")
    support, query = _images(payload, "support_images"), _images(payload, "query_images")
    if support.size + query.size > MAX_PIXELS:
        raise PayloadError(f"payload too large: {support.size + query.size} pixels in support_images + query_images (at most {MAX_PIXELS})")
    labels = _array(payload, "support_labels")
    if labels.ndim != 1 or labels.shape[0] != support.shape[0]:
        raise PayloadError(f"support_labels must have shape [{support.shape[0]}] (one per support image), got {list(labels.shape)}")
    if labels.dtype.kind not in "iu":  # floats are refused, never truncated
        raise PayloadError(f"support_labels must be integers, got {labels.dtype}")
    classes = np.unique(labels)
    if classes.size < 2 or not np.array_equal(classes, np.arange(classes.size)):
        raise PayloadError(f"support_labels must use every class 0..N-1 with N >= 2, got classes {classes.tolist()[:20]}")
    return support, labels.astype(np.int64), query, int(classes.size)


@torch.no_grad()
def predict_task(method: MetaLearner, payload: Mapping[str, Any], image_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Adapt omega to the support set (theta_i), then classify the queries."""
    support, labels, query, ways = validate_payload(payload)
    if method.fixed_ways is not None and ways != method.fixed_ways:
        raise PayloadError(f"this {method.kind} model classifies {method.fixed_ways} classes per task; the support set has {ways}")
    support_x = to_model_input(support, image_size).to(device)
    query_x = to_model_input(query, image_size).to(device)
    support_y = torch.from_numpy(labels).to(device)
    if method.per_example_features:
        support_x, query_x = method.features(support_x), method.features(query_x)
    theta = method.adapt(support_x[None], support_y[None], ways)
    logits = method.predict(theta, query_x[None])[0].float()
    return {"labels": logits.argmax(-1).cpu().numpy(), "probabilities": logits.softmax(-1).cpu().numpy()}
