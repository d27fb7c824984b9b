"""Custom data of any size and mode (issue #19 part 2): converted to 1 or 3 channels, resized with the aspect kept,
stored as PNGs with class names, standardized by the train split; Omniglot's storage unchanged."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from metaflowlib.config.common import DataParams
from metaflowlib.data.prepare import Split, custom_format, custom_splits, load_image_dataset, save_splits
from metaflowlib.data.preprocess import ImageFormat, resize_uint8, to_model_input
from metaflowlib.data.store import load_class_names, load_format, load_info, load_pool, load_split
from metaflowlib.errors import DataError

from conftest import ROOT

SIZES = [(20, 30), (40, 40), (33, 17), (25, 25)]  # PIL (width, height)
MODES = ["RGB", "RGBA", "L", "P"]


def shapes_folder(root, classes: int = 6, colour: bool = True):
    """`<root>/shape<c>/<i>.png`: a filled ellipse per class on white, one size and mode per image index."""
    for c in range(classes):
        folder = root / f"shape{c}"
        folder.mkdir(parents=True)
        for i, ((width, height), mode) in enumerate(zip(SIZES, MODES)):
            image = Image.new("RGB", (width, height), (255, 255, 255))
            fill = (40 * c, 200 - 30 * i, 90) if colour else (40 * c,) * 3
            ImageDraw.Draw(image).ellipse([2, 2, width - 3, height - 3], fill=fill)
            image.convert(mode if colour or mode != "P" else "L").save(folder / f"{i}.png")
    return root


def test_mixed_sizes_and_modes_become_rgb_png_splits_with_train_statistics(tmp_path):
    loaded = load_image_dataset(str(shapes_folder(tmp_path / "imgs")), 28)
    assert loaded.images.shape == (24, 28, 28, 3) and loaded.images.dtype == np.uint8
    assert loaded.conversions == {"converted_mode": 18, "resized": 24}  # RGBA, L and P images; none was 28x28
    splits = custom_splits(loaded.images, loaded.labels, loaded.class_names, 28, (0.5, 0.25, 0.25), seed=0)
    fmt = custom_format(splits["train"])
    info = save_splits(splits, tmp_path / "prepared", {"format": fmt.to_dict()}, as_png=True)
    assert info == load_info(tmp_path / "prepared")
    assert load_format(tmp_path / "prepared") == fmt and fmt.channels == 3 and not fmt.ink_on_paper
    for name, split in splits.items():
        images, labels = load_split(tmp_path / "prepared", name)
        assert images.shape == (len(split.labels), 28, 28, 3) and np.array_equal(images, split.images)
        assert np.array_equal(labels, split.labels)
        assert load_class_names(tmp_path / "prepared", name) == split.class_names
    features = json.loads((tmp_path / "prepared" / "train" / "dataset_info.json").read_text())["features"]
    assert features["image"]["_type"] == "Image" and features["label"]["names"] == splits["train"].class_names

    train = to_model_input(load_split(tmp_path / "prepared", "train")[0], fmt)
    assert train.shape[1:] == (3, 28, 28)
    assert torch.allclose(train.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(train.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4)
    pool = load_pool(tmp_path / "prepared", "test", "cpu")  # in the format info.json records
    assert torch.equal(pool.examples, to_model_input(splits["test"].images, fmt))


def test_transparency_is_composited_over_white(tmp_path):
    shapes_folder(tmp_path / "imgs", classes=3)
    for path in (tmp_path / "imgs").rglob("*.png"):
        Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(path)  # fully transparent red: white paper
    loaded = load_image_dataset(str(tmp_path / "imgs"), 10, channels=3)
    assert (loaded.images == 255).all()


def test_channels_follow_the_data_or_the_params(tmp_path):
    gray = shapes_folder(tmp_path / "gray", colour=False)  # RGB and RGBA files, but no pixel with colour
    loaded = load_image_dataset(str(gray), 16)
    assert loaded.images.shape == (24, 16, 16) and loaded.conversions["converted_mode"] == 12
    assert np.array_equal(loaded.images, load_image_dataset(str(gray), 16, channels=1).images)
    assert load_image_dataset(str(gray), 16, channels=3).images.shape == (24, 16, 16, 3)
    assert load_image_dataset(str(shapes_folder(tmp_path / "colour")), 16, channels=1).images.shape == (24, 16, 16)
    assert DataParams(dataset="custom", custom_source="x").channels is None
    with pytest.raises(ValueError, match="Omniglot is grayscale"):
        DataParams(channels=3)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    for c in range(3):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 257 * (100 + c), np.uint16)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    loaded = load_image_dataset(str(tmp_path / "imgs"), 8)
    assert loaded.images.shape == (6, 8, 8) and sorted(set(loaded.images.ravel().tolist())) == [100, 101, 102]


def test_garbage_image_is_refused_by_name(tmp_path):
    folder = shapes_folder(tmp_path / "imgs")
    (folder / "shape2" / "x.png").write_bytes(b"\x00garbage, not a PNG")
    with pytest.raises(DataError, match=r"shape2/x.png is not a readable image"):
        load_image_dataset(str(folder), 28)


def test_resize_keeps_the_aspect_and_crops_the_centre():
    image = np.zeros((1, 20, 40), np.uint8)  # [N, H, W]: left half black, right half white
    image[:, :, 20:] = 255
    out = resize_uint8(image, 20)
    assert out.shape == (1, 20, 20) and (out[0, :, :10] == 0).all() and (out[0, :, 10:] == 255).all()
    rgb = resize_uint8(np.repeat(image[..., None], 3, axis=3), 10)  # shrinking: halves stay halves
    assert rgb.shape == (1, 10, 10, 3) and (rgb[0, :, :5] == 0).all() and (rgb[0, :, 5:] == 255).all()


def test_omniglot_storage_and_format_are_unchanged(tmp_path):
    """Array2D uint8 + int32 label + class_name, as before RGB: Omniglot's Arrow files (DVC outs) do not change."""
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    split = Split(images, np.array([0, 0, 1, 1, 2, 2]), ["a/rot000", "a/rot090", "b/rot000"])
    save_splits({"train": split}, tmp_path / "prepared", {"image_size": 28})
    features = json.loads((tmp_path / "prepared" / "train" / "dataset_info.json").read_text())["features"]
    assert features == {
        "image": {"shape": [28, 28], "dtype": "uint8", "_type": "Array2D"},
        "label": {"dtype": "int32", "_type": "Value"},
        "class_name": {"dtype": "string", "_type": "Value"},
    }
    x, y = load_split(tmp_path / "prepared", "train")
    assert np.array_equal(x, images) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert load_class_names(tmp_path / "prepared", "train") == split.class_names
    assert load_format(tmp_path / "prepared") == ImageFormat.ink(28)  # info.json of an older prepare
    assert torch.equal(load_pool(tmp_path / "prepared", "train", "cpu").examples, 1.0 - torch.from_numpy(images).float()[:, None] / 255.0)


def test_prepare_stage_on_a_mixed_folder(tmp_path):
    """The real stage script: info.json records the format and the conversions, and so does its summary line."""
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="custom", custom_source=str(shapes_folder(tmp_path / "imgs")), image_size=20,
                          split_fractions=[0.5, 0.25, 0.25])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's library, not an install's
    result = subprocess.run([sys.executable, "pipelines/prepare.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "3 channel(s), converted_mode 18, resized 24)" in result.stdout
    info = load_info(tmp_path / "data" / "prepared")
    assert info["conversions"] == {"converted_mode": 18, "resized": 24} and info["format"]["channels"] == 3
    train, _ = load_split(tmp_path / "data" / "prepared", "train")
    assert tuple(info["format"]["mean"]) == pytest.approx(custom_format(Split(train, np.zeros(len(train)), [])).mean)
