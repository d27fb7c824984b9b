import numpy as np
import pytest
import torch

from metaflowlib.data.preprocess import ImageFormat
from metaflowlib.errors import PayloadError
from metaflowlib.methods import ProtoNet, build_method
from metaflowlib.serving.contract import TentOptions, image_format_of, predict_task, validate_payload

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
    ({"support_labels": np.array([0.0, 0, 1, 1, 2, 2])}, "must be integers 0..N-1 or class names"),
    ({"support_labels": np.array([True, False] * 3)}, "must be integers 0..N-1 or class names .* got bool"),
    ({"support_labels": np.array(["a", "a", "b", "b", "", "c"])}, "support_labels has an empty class name at index 4"),
    ({"support_labels": np.array(["cat"] * 6)}, r"support_labels must name at least 2 classes, got only \['cat'\]"),
    ({"support_images": np.zeros((6, 28, 28, 4), np.uint8)}, r"support_images has 4 channels \(\[6, 28, 28, 4\]\): send grayscale"),
    ({"query_images": np.zeros((6, 28, 28, 1), np.uint8)}, r"query_images has 1 channels"),
    ({"query_images": np.zeros((6, 28, 28, 3), np.uint8)},
     r"support_images are grayscale \[6, 28, 28\] but query_images are RGB \[6, 28, 28, 3\]: send both in one layout"),
    ({"query_images": [np.zeros((28, 28), np.uint8), np.zeros((28, 28, 3), np.uint8)]}, "query_images is not a rectangular array"),
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
    out = predict_task(method, payload(), fmt=28, device=torch.device("cpu"))
    assert out["labels"].shape == (6,) and out["probabilities"].shape == (6, 3)
    assert np.allclose(out["probabilities"].sum(1), 1, atol=1e-5)
    assert (out["labels"] == np.repeat(np.arange(3), 2)).mean() >= 5 / 6  # separable classes, even untrained


def test_any_image_size_is_resized_by_the_model():
    big = payload()
    big = {k: (np.kron(v, np.ones((1, 2, 2), np.uint8)) if k.endswith("images") else v) for k, v in big.items()}
    out = predict_task(ProtoNet(hidden=8).eval(), big, fmt=28, device=torch.device("cpu"))
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
        predict_task(method, payload(), fmt=28, device=torch.device("cpu"))


RGB = ImageFormat(channels=3, image_size=28, ink_on_paper=False, mean=(0.5,) * 3, std=(0.25,) * 3)
CPU = torch.device("cpu")


def rgb_task(size=(40, 30)) -> dict:
    """payload() as RGB photographs of another size (each class a tint), labelled by class names."""
    task = payload()
    tint = np.array([[1.0, 0.6, 0.3], [0.3, 1.0, 0.6], [0.6, 0.3, 1.0]])
    names = np.array(["zebra", "apple", "mango"])  # not in sorted order: the columns are sorted names

    def colour(images, labels):
        resized = np.stack([np.kron(im, np.ones((2, 2), np.uint8))[: size[0], : size[1]] for im in images])
        return (resized[..., None] * tint[labels][:, None, None, :]).astype(np.uint8)

    labels = task["support_labels"]
    return {"support_images": colour(task["support_images"], labels), "support_labels": names[labels],
            "query_images": colour(task["query_images"], labels)}


def test_rgb_images_of_any_size_and_class_names_in_names_out():
    torch.manual_seed(0)
    method = ProtoNet(in_channels=3, hidden=16).eval()
    out = predict_task(method, rgb_task(), RGB, CPU)
    assert out["classes"].tolist() == ["apple", "mango", "zebra"]  # sorted: the column of each probability
    assert out["probabilities"].shape == (6, 3) and out["labels"].shape == (6,)
    assert out["labels"].tolist() == out["classes"][out["probabilities"].argmax(1)].tolist()
    assert (out["labels"] == np.repeat(["zebra", "apple", "mango"], 2)).mean() >= 5 / 6


def test_grayscale_and_rgb_are_converted_to_the_models_channels():
    torch.manual_seed(0)
    gray_model, rgb_model = ProtoNet(hidden=8).eval(), ProtoNet(in_channels=3, hidden=8).eval()
    task = payload()
    as_rgb = {k: (np.repeat(v[..., None], 3, axis=3) if k.endswith("images") else v) for k, v in task.items()}
    assert np.allclose(predict_task(gray_model, as_rgb, 28, CPU)["probabilities"],  # RGB gray -> luma: the same pixels
                       predict_task(gray_model, task, 28, CPU)["probabilities"], atol=1e-6)
    out = predict_task(rgb_model, task, RGB, CPU)
    assert out["classes"].tolist() == [0, 1, 2] and out["labels"].dtype == np.int64


def test_image_format_of_reads_the_stored_format_else_ink_on_paper():
    assert image_format_of({"extra": {"image_size": 28, "image_format": RGB.to_dict()}}) == RGB
    assert image_format_of({"extra": {"image_size": 84}}) == ImageFormat.ink(84)  # omegas saved before formats were


def test_strategies_adapt_a_copy_so_every_request_starts_from_the_registered_weights():
    torch.manual_seed(0)
    method = ProtoNet(hidden=8).eval()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    task, tent = payload(), TentOptions(steps=3, lr=0.05)
    answers = {s: predict_task(method, task, 28, CPU, s, tent)["probabilities"] for s in ("source", "bn", "tent")}
    assert not np.allclose(answers["source"], answers["bn"]) and not np.allclose(answers["bn"], answers["tent"])
    assert np.array_equal(predict_task(method, task, 28, CPU, "tent", tent)["probabilities"], answers["tent"])
    assert np.array_equal(predict_task(method, task, 28, CPU, "source")["probabilities"], answers["source"])
    assert all(torch.equal(v, before[k]) for k, v in method.state_dict().items())


@pytest.mark.parametrize("strategy,message", [
    ("bn", "strategy 'bn' does not apply to this maml model: it already normalizes with each task's own batch statistics; use 'source'"),
    ("tent", ("strategy 'tent' does not apply to this maml model: its inner loop on the support set is its test-time "
              "adaptation; use 'source'")),
])
def test_the_maml_family_refuses_bn_and_tent(strategy, message):
    method = build_method("maml", ways=3, hidden=4).eval()
    with pytest.raises(PayloadError) as refused:
        predict_task(method, payload(), 28, CPU, strategy)
    assert str(refused.value) == message
    assert predict_task(method, payload(), 28, CPU, "source")["labels"].shape == (6,)


@pytest.mark.parametrize("strategy,changes,message", [
    ("ttt", {}, "unknown strategy 'ttt'; known: source, bn, tent"),
    (None, {}, "unknown strategy None; known: source, bn, tent"),
    ("bn", {"query_images": np.zeros((1, 28, 28), np.uint8)}, "strategy 'bn' adapts to the query batch and needs at least 2"),
])
def test_unknown_strategies_and_a_single_query_to_adapt_on_are_refused(strategy, changes, message):
    with pytest.raises(PayloadError, match=message):
        predict_task(ProtoNet(hidden=8).eval(), payload(**changes), 28, CPU, strategy)
