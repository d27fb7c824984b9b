import numpy as np
import pytest
import torch

from metaflowlib.errors import PayloadError
from metaflowlib.methods import ProtoNet
from metaflowlib.serving.contract import predict_task, validate_payload

from conftest import class_images


def payload(**changes):
    images, labels = class_images(3, 4)
    support = np.concatenate([images[labels == c][:2] for c in range(3)])
    query = np.concatenate([images[labels == c][2:] for c in range(3)])
    data = {"support_images": support, "support_labels": np.repeat(np.arange(3), 2), "query_images": query}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes,message", [
    ({"support_images": np.zeros((6, 28, 28), np.float32)}, "support_images must be uint8"),
    ({"query_images": np.zeros((6, 28), np.uint8)}, r"query_images must have shape \[count, height, width\]"),
    ({"support_images": np.zeros((0, 28, 28), np.uint8)}, "no empty axis"),
    ({"support_labels": np.arange(7) % 3}, r"support_labels must have shape \[6\]"),
    ({"support_labels": np.array([0, 0, 1, 1, 3, 3])}, "every class 0..N-1"),
    ({"support_labels": np.zeros(6, int)}, "N >= 2"),
    ({"support_labels": np.array([0.0, 0, 1, 1, 2, 2])}, "must be integers"),
    ({"query_images": np.zeros((20001, 2, 2), np.uint8)}, "too large"),
    ({"extra": 1}, "unknown keys"),
    ({"support_images": np.full((6, 28, 28), np.nan)}, "support_images must be uint8"),  # NaN can only come as floats
    ({"query_images": np.full((6, 28, 28), np.inf)}, "query_images must be uint8"),
    ({"query_images": np.ones((6, 28, 28), bool)}, "query_images must be uint8"),
    ({"support_labels": np.array([0, 0, 1, 1, 2, np.nan])}, "support_labels must be integers"),
    ({"query_images": [[[0, 255]], [[0]]]}, "query_images is not a rectangular array"),  # ragged JSON rows
    ({"support_labels": [[0, 0], [1]]}, "support_labels is not a rectangular array"),
    ({"support_labels": np.arange(5) % 3}, r"support_labels must have shape \[6\]"),  # fewer labels than images
    ({"support_labels": np.array([-1, -1, 0, 0, 1, 1])}, "every class 0..N-1"),
    ({"query_images": np.zeros((0, 28, 28), np.uint8)}, "query_images must have shape .* no empty axis"),
    ({"support_images": np.broadcast_to(np.uint8(255), (6, 1025, 28))}, r"support_images too large: \[6, 1025, 28\]"),
    ({"query_images": np.broadcast_to(np.uint8(255), (20000, 120, 120))}, "payload too large: 288004704 pixels"),
    ({"support_images": np.full((6, 28, 28), -1)}, r"support_images must be uint8 .* got int64 values in \[-1, -1\]"),
    ({"query_images": np.full((6, 28, 28), 256, np.int16)}, r"got int16 values in \[256, 256\]"),
    ({"support_images": []}, r"support_images must have shape .* got \[0\]"),  # an empty JSON list is float64 to numpy
    ({"support_labels": []}, r"support_labels must have shape \[6\]"),
])
def test_malformed_payloads_get_one_clear_error(changes, message):
    with pytest.raises(PayloadError, match=message):
        validate_payload(payload(**changes))


def test_missing_keys_and_non_dict():
    with pytest.raises(PayloadError, match="missing"):
        validate_payload({"support_images": np.zeros((1, 2, 2), np.uint8)})
    with pytest.raises(PayloadError, match="must be a dict"):
        validate_payload([1, 2])


def test_predict_task_labels_new_classes_from_the_support_set():
    torch.manual_seed(0)
    method = ProtoNet(hidden=16).eval()
    out = predict_task(method, payload(), image_size=28, device=torch.device("cpu"))
    assert out["labels"].shape == (6,) and out["probabilities"].shape == (6, 3)
    assert np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)
    assert (out["labels"] == np.repeat(np.arange(3), 2)).mean() >= 5 / 6  # separable classes, even untrained


def test_any_image_size_is_resized_by_the_model():
    big = payload()
    big = {k: (np.kron(v, np.ones((1, 2, 2), np.uint8)) if k.endswith("images") else v) for k, v in big.items()}
    out = predict_task(ProtoNet(hidden=8).eval(), big, image_size=28, device=torch.device("cpu"))
    assert out["labels"].shape == (6,)


def test_integer_images_within_0_255_are_pixels():
    """JSON has no uint8: the server hands the model int64 images, which must answer as their uint8 selves."""
    method, cpu = ProtoNet(hidden=8).eval(), torch.device("cpu")
    wide = {k: v.astype(np.int64) for k, v in payload().items()}
    out, expected = predict_task(method, wide, 28, cpu), predict_task(method, payload(), 28, cpu)
    assert np.array_equal(out["probabilities"], expected["probabilities"])


def test_fixed_head_model_refuses_other_numbers_of_classes():
    from metaflowlib.methods import build_method

    method = build_method("maml", ways=5, hidden=4).eval()
    with pytest.raises(PayloadError, match="classifies 5 classes per task; the support set has 3"):
        predict_task(method, payload(), image_size=28, device=torch.device("cpu"))
