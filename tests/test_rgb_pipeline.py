"""A folder of photos to a registered few-shot model and predictions from folders (issue 19), through the real stage
scripts: an imagefolder of coloured shapes in mixed sizes and modes -> prepare -> train@, evaluate@, register@ for
ProtoNet and MAML over Conv-4 (3 channels) and ResNet-12 -> `metaflowlib predict --support DIR --query DIR`, and
`mlflow models serve` answering an RGB request with class names and test-time adaptation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from conftest import ROOT
from test_serving_http import as_json, post, serve

CLASSES = 20
SIZES = [(20, 30), (40, 40), (33, 17), (25, 25), (48, 36), (18, 18)]
MODES = ["RGB", "RGBA", "P", "RGB", "RGB", "RGBA"]
NARROW = {"kind": "resnet12", "widths": [4, 6, 8, 8]}
SHAPE = {"ways": 3, "shots": 1, "queries": 2, "tasks_per_step": 2, "budget": {"default": {"episodes": 4}}}
METHODS = {
    "protonet_conv4": {"kind": "protonet", "hidden": 8, **SHAPE},
    "protonet_resnet12": {"kind": "protonet", "backbone": NARROW, **SHAPE},
    "maml_conv4": {"kind": "maml", "hidden": 8, **SHAPE},
    "maml_resnet12": {"kind": "maml", "backbone": NARROW, "inner_lr": 0.1, **SHAPE},
}


def colour(k: int) -> tuple[int, int, int]:
    """Distinct colours: the class is its colour and shape, whatever the image's size."""
    hue = np.array([k * 97 % 256, k * 57 % 256, k * 151 % 256])
    return tuple(int(v) for v in 40 + hue * 200 // 256)


def draw(k: int, size: tuple[int, int], mode: str, jitter: int) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, (250, 250, 250))
    box = [width // 5 + jitter % 3, height // 5, width - width // 5, height - height // 5 - jitter % 2]
    (ImageDraw.Draw(image).ellipse if k % 2 else ImageDraw.Draw(image).rectangle)(box, fill=colour(k))
    return image.convert(mode) if mode != "RGBA" else image.convert("RGBA")


def write_folder(root: Path, classes: range, per_class: int) -> Path:
    for k in classes:
        (root / f"class_{k:02d}").mkdir(parents=True)
        for i in range(per_class):
            draw(k, SIZES[i % len(SIZES)], MODES[i % len(MODES)], i).save(root / f"class_{k:02d}" / f"{i}.png")
    return root


def make_project(root: Path, photos: Path) -> Path:
    shutil.copytree(ROOT / "pipelines", root / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="custom", custom_source=str(photos), image_size=16, split_fractions=[0.5, 0.25, 0.25])
    params["methods"] = METHODS
    params["train"].update(val_every=2, checkpoint_every=100, progress="log", validation={"ways": 3, "shots": 1, "queries": 2, "tasks": 4})
    params["evaluate"].update(tasks=6, queries=2, settings=["3w1s"], shots_curve=[1], timing_tasks=2, batch_tasks=3)
    params["registry"]["gate_metric"] = "acc_3w1s"
    params["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    params["shift"]["methods"] = []
    params["optimizer"]["finetune"]["methods"] = []
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


DRIVER = """
import runpy, sys
sys.path.insert(0, "pipelines")
for stage in sys.argv[1:]:
    script, *args = stage.split()
    sys.argv = [f"pipelines/{script}.py", *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
"""


@pytest.mark.usefixtures("one_thread")
def test_a_folder_of_photos_becomes_registered_models_that_predict_from_folders(tmp_path) -> None:
    photos = write_folder(tmp_path / "photos", range(CLASSES), 6)
    root = make_project(tmp_path / "project", photos)
    stages = ["prepare"] + [f"{stage} {key}" for key in METHODS for stage in ("train", "evaluate", "register")]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")} | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # this checkout's library
    done = subprocess.run([sys.executable, "-c", DRIVER, *stages], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    info = json.loads((root / "data" / "prepared" / "info.json").read_text())
    assert info["format"]["channels"] == 3 and info["format"]["ink_on_paper"] is False
    assert info["conversions"] == {"converted_mode": CLASSES * 3, "resized": CLASSES * 6}  # RGBA and P; no image is 16x16
    for key, block in METHODS.items():
        config = json.loads((root / "models" / key / "config.json").read_text())
        assert config["config"]["in_channels"] == 3
        assert config["config"]["backbone"]["kind"] == block.get("backbone", {"kind": "conv4"})["kind"]
        assert config["extra"]["image_format"] == info["format"]
        assert json.loads((root / "registry" / f"{key}.json").read_text())["promoted"]

    support, query = tmp_path / "support", tmp_path / "query"
    test_classes = sorted(p.name for p in photos.iterdir())[:3]
    for name in test_classes:
        k = int(name.split("_")[1])
        (support / name).mkdir(parents=True)
        draw(k, (30, 30), "RGB", 0).save(support / name / "a.png")
        (query / name).mkdir(parents=True)
        draw(k, (50, 34), "RGBA", 1).save(query / name / "q.png")
    for key in METHODS:
        answer = subprocess.run(
            [sys.executable, "-m", "metaflowlib.cli", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "predict",
             f"custom-{key}", "--support", str(support), "--query", str(query), "--json"],
            cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert answer.returncode == 0, answer.stderr[-2000:]
        rows = json.loads(answer.stdout)
        assert [Path(r["file"]).parent.name for r in rows] == test_classes
        assert all(r["class"] in test_classes and set(r["probabilities"]) == set(test_classes) for r in rows)
        assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)

    served_env = env | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with serve("models:/custom-protonet_resnet12@production", served_env, root, tmp_path / "server.log") as url:
        task = {"support_images": np.stack([np.asarray(draw(k, (40, 28), "RGB", 0)) for k in (1, 2, 3)]),
                "support_labels": np.array(["disc", "square", "ring"]),
                "query_images": np.stack([np.asarray(draw(k, (40, 28), "RGB", 2)) for k in (3, 1, 2, 1)])}
        for strategy in ("source", "tent"):
            status, answer = post(url, {"inputs": as_json(task), "params": {"strategy": strategy}})
            assert status == 200, answer
            predictions = answer["predictions"]
            assert predictions["classes"] == ["disc", "ring", "square"]
            assert len(predictions["labels"]) == 4 and set(predictions["labels"]) <= {"disc", "ring", "square"}
            assert np.allclose(np.sum(predictions["probabilities"], axis=1), 1, atol=1e-5)
