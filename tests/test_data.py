import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

from metaflowlib.data.omniglot import find_source, load_omniglot
from metaflowlib.data.prepare import Split, custom_splits, lake_splits, load_image_dataset, save_splits, vinyals_splits
from metaflowlib.data.preprocess import resize_uint8, to_model_input
from metaflowlib.data.store import load_info, load_split
from metaflowlib.errors import DataError

from conftest import ROOT

ALPHABETS = {"background": [("Alpha", 3), ("Beta", 2), ("Gamma", 2)], "evaluation": [("Delta", 2), ("Eps", 2)]}
DRAWERS = 4


def drawings(n_chars: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n_chars, DRAWERS, 35, 35)) > 0.2  # True = paper


def write_mirror(root):
    """A tiny copy of the ../shared/data layout (wrong checksums on purpose)."""
    (root / "omniglot").mkdir(parents=True)
    rows = ["alphabet\tset\tfirst_index\tn_characters"]
    for s, (name, alphabets) in enumerate(ALPHABETS.items()):
        first = 0
        for alphabet, n in alphabets:
            rows.append(f"{alphabet}\t{name}\t{first}\t{n}")
            first += n
        images = drawings(first, s)
        np.savez(root / "omniglot" / f"images_{name}.npz", images=images, labels=np.zeros(images.shape[:2], int))
    (root / "omniglot" / "alphabets.tsv").write_text("\n".join(rows) + "\n")
    return root


def write_folder(root, name, images):
    k = 0
    for alphabet, n in ALPHABETS[name]:
        for c in range(1, n + 1):
            folder = root / f"images_{name}" / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for d in range(DRAWERS):
                Image.fromarray(images[k, d]).convert("1").save(folder / f"{k:04d}_{d + 1:02d}.png")
            k += 1


def test_npz_mirror_checksums_are_enforced(tmp_path):
    root = write_mirror(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch for .*images_background.npz"):
        load_omniglot(root, tmp_path / "cache")
    sets = load_omniglot(root, tmp_path / "cache", verify=False)
    assert [s.name for s in sets] == ["background", "evaluation"]
    assert sets[0].characters[3].name == "Beta/character01"


def test_truncated_npz_is_a_clear_error(tmp_path):
    root = write_mirror(tmp_path)
    path = root / "omniglot" / "images_background.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="cannot read .*images_background.npz"):
        load_omniglot(root, tmp_path / "cache", verify=False)


def test_official_folder_and_zip_layouts_decode_to_the_same_arrays(tmp_path):
    mirror = load_omniglot(write_mirror(tmp_path / "mirror"), tmp_path / "cache", verify=False)
    folders = tmp_path / "official"
    for s in mirror:
        write_folder(folders, s.name, s.images)
    from_folders = load_omniglot(folders, tmp_path / "cache", verify=False)
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for s in mirror:
        with zipfile.ZipFile(zipped / f"images_{s.name}.zip", "w") as archive:
            for png in sorted((folders / f"images_{s.name}").rglob("*.png")):
                archive.write(png, png.relative_to(folders))
    from_zips = load_omniglot(zipped, tmp_path / "cache", verify=False)
    for a, b, c in zip(mirror, from_folders, from_zips):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.images, c.images)
        assert [x.name for x in a.characters] == [x.name for x in b.characters]
    with pytest.raises(DataError, match="do not match the official data"):
        load_omniglot(folders, tmp_path / "cache", verify=True)


def test_empty_or_unknown_folder_is_a_clear_error(tmp_path):
    (tmp_path / "images_background").mkdir()
    (tmp_path / "images_evaluation").mkdir()
    with pytest.raises(DataError, match="no '<alphabet>/character<k>/<id>_<drawer>.png' files"):
        load_omniglot(tmp_path, tmp_path / "cache", verify=False)
    with pytest.raises(DataError, match="holds no Omniglot data"):
        load_omniglot(tmp_path / "images_background", tmp_path / "cache", verify=False)


def test_source_order(tmp_path, monkeypatch):
    monkeypatch.delenv("METAFLOWLIB_DATA", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    assert find_source(None, project) is None  # nothing local -> official download
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert find_source(None, project) == tmp_path / "shared" / "data"
    monkeypatch.setenv("METAFLOWLIB_DATA", str(tmp_path))
    assert find_source(None, project) == tmp_path
    assert find_source(str(project), project) == project
    with pytest.raises(DataError, match="data.source points at"):
        find_source(str(tmp_path / "missing"), project)


def test_vinyals_protocol_rotations_are_classes(tmp_path):
    sets = load_omniglot(write_mirror(tmp_path), tmp_path / "cache", verify=False)
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    lines = {"train": ["Alpha/character01", "Beta/character02"], "val": ["Gamma/character01"], "test": ["Delta/character02"]}
    for split, chars in lines.items():
        (split_dir / f"{split}.txt").write_text("\n".join(f"{c}/rot{d:03d}" for c in chars for d in (0, 90, 180, 270)))
    splits = vinyals_splits(sets, split_dir, 28)
    train = splits["train"]
    assert len(train.class_names) == 8 and train.images.shape == (8 * DRAWERS, 28, 28)
    base = train.images[train.labels == 0]
    assert np.array_equal(train.images[train.labels == 1], np.rot90(base, 1, axes=(1, 2)))
    (split_dir / "val.txt").write_text("Nope/character01/rot000")
    with pytest.raises(DataError, match="unknown class 'Nope/character01/rot000'"):
        vinyals_splits(sets, split_dir, 28)


def test_lake_protocol_keeps_alphabets_disjoint(tmp_path):
    sets = load_omniglot(write_mirror(tmp_path), tmp_path / "cache", verify=False)
    splits = lake_splits(sets, 28, val_alphabets=1)
    assert splits["val"].class_names == ["Gamma/character01", "Gamma/character02"]
    assert len(splits["train"].class_names) == 5 and len(splits["test"].class_names) == 4
    with pytest.raises(DataError, match="lake_val_alphabets=3"):
        lake_splits(sets, 28, val_alphabets=3)


def imagefolder(root, classes: int = 6, per_class: int = 3, size: int = 20):
    """`<root>/class<c>/<i>.png`: random grayscale images of one size."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_custom_imagefolder_dataset_round_trip(tmp_path):
    images, labels, names, conversions = load_image_dataset(str(imagefolder(tmp_path / "imgs")), 28)
    assert images.shape == (18, 28, 28) and sorted(set(labels.tolist())) == list(range(6))
    assert conversions == {"converted_mode": 0, "resized": 18}
    splits = custom_splits(images, labels, names, 28, (0.5, 0.25, 0.25), seed=0)
    seen = [set(s.class_names) for s in splits.values()]
    assert sum(len(s) for s in seen) == 6 and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    save_splits(splits, tmp_path / "prepared", {"dataset": "custom"})
    x, y = load_split(tmp_path / "prepared", "test")
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28) and len(x) == len(y)
    assert load_info(tmp_path / "prepared")["splits"]["train"]["classes"] == len(seen[0])


def test_failed_save_leaves_no_partial_output(tmp_path):
    good = Split(np.zeros((2, 28, 28), np.uint8), np.array([0, 1]), ["a", "b"])
    bad = Split(np.zeros((2, 28, 28), np.uint8), np.array([0, 5]), ["a", "b"])  # label 5 has no name
    with pytest.raises(IndexError):
        save_splits({"train": good, "test": bad}, tmp_path / "prepared", {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="run the prepare stage"):
        load_split(tmp_path / "prepared", "train")


def test_preprocessing_inverts_and_resizes():
    images = np.full((2, 56, 56), 255, np.uint8)
    images[0, :28] = 0
    x = to_model_input(images, 28)
    assert x.shape == (2, 1, 28, 28) and float(x[0, 0, :14].mean()) == 1.0 and float(x[1].max()) == 0.0
    assert resize_uint8(images, 28).shape == (2, 28, 28)
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(images.astype(np.float32), 28)


def test_official_download_is_verified(tmp_path, monkeypatch):
    """No network in tests: urlopen serves local zips; the decoded content must match the pinned SHA-256."""
    import io
    import urllib.request

    from metaflowlib.data import omniglot

    mirror = load_omniglot(write_mirror(tmp_path / "mirror"), tmp_path / "cache", verify=False)
    folders = tmp_path / "official"
    served = {}
    for s in mirror:
        write_folder(folders, s.name, s.images)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for png in sorted((folders / f"images_{s.name}").rglob("*.png")):
                archive.write(png, png.relative_to(folders))
        served[omniglot.DOWNLOAD_URL.format(set=s.name)] = buffer.getvalue()
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(DataError, match="do not match the official data"):
        load_omniglot(None, tmp_path / "downloads")
    assert requested == [omniglot.DOWNLOAD_URL.format(set="background")]
    assert (tmp_path / "downloads" / "images_background.zip").is_file()  # kept, re-verified next time
    monkeypatch.setattr(omniglot, "IMAGES_SHA256", {s.name: __import__("hashlib").sha256(s.images.tobytes()).hexdigest() for s in mirror})
    sets = load_omniglot(None, tmp_path / "downloads")
    assert [s.images.shape[0] for s in sets] == [7, 4]


@pytest.mark.parametrize("images,message", [
    (np.zeros((7, DRAWERS, 35, 35), np.uint8), r"images must be bool \[7 characters, >= 2 drawings, height, width\] \(True = paper\), got uint8"),
    (np.ones((7, DRAWERS, 35), bool), r"got bool \[7, 4, 35\]"),
    (np.ones((6, DRAWERS, 35, 35), bool), r"got bool \[6, 4, 35, 35\]"),
    (np.ones((7, 0, 35, 35), bool), r"got bool \[7, 0, 35, 35\]"),  # characters without drawings
])
def test_npz_of_the_wrong_shape_or_dtype_is_refused(tmp_path, images, message):
    root = write_mirror(tmp_path)
    np.savez(root / "omniglot" / "images_background.npz", images=images)
    with pytest.raises(DataError, match=message):
        load_omniglot(root, tmp_path / "cache", verify=False)


def test_missing_or_malformed_alphabet_table_is_refused(tmp_path):
    root = write_mirror(tmp_path)
    table = root / "omniglot" / "alphabets.tsv"
    table.write_text(table.read_text().replace("\t0\t3", "\tzero\t3"))
    with pytest.raises(DataError, match=r"alphabets.tsv:2: expected 'alphabet<TAB>set<TAB>first_index<TAB>n_characters', got 'Alpha"):
        load_omniglot(root, tmp_path / "cache", verify=False)
    table.unlink()
    with pytest.raises(DataError, match="missing Omniglot file .*alphabets.tsv"):
        load_omniglot(root, tmp_path / "cache", verify=False)


def test_bad_drawings_in_the_official_folder_layout_are_refused(tmp_path):
    mirror = load_omniglot(write_mirror(tmp_path / "mirror"), tmp_path / "cache", verify=False)
    folders = tmp_path / "official"
    for s in mirror:
        write_folder(folders, s.name, s.images)
    character = folders / "images_background" / "Alpha" / "character02"
    drawing = min(character.glob("*.png"))
    original = drawing.read_bytes()

    drawing.write_bytes(original[: len(original) // 2])  # truncated PNG
    with pytest.raises(DataError, match="Alpha/character02/.*png is not a readable image"):
        load_omniglot(folders, tmp_path / "cache", verify=False)
    Image.new("1", (30, 30), 1).save(drawing)  # another size
    with pytest.raises(DataError, match="Alpha/character02/.*png is 30x30 pixels but .* is 35x35"):
        load_omniglot(folders, tmp_path / "cache", verify=False)
    drawing.unlink()  # one drawing short
    with pytest.raises(DataError, match=r"different numbers of drawings: 4 for most, but Alpha/character02 \(3\)"):
        load_omniglot(folders, tmp_path / "cache", verify=False)
    for png in character.glob("*.png"):  # an empty character
        png.unlink()
    with pytest.raises(DataError, match="character folders without drawings: Alpha/character02"):
        load_omniglot(folders, tmp_path / "cache", verify=False)


def test_bad_custom_imagefolders_are_refused_naming_the_culprit(tmp_path):
    empty = imagefolder(tmp_path / "empty")
    (empty / "class6").mkdir()
    (empty / "class2" / "1.png").unlink()
    (empty / "class2" / "2.png").unlink()
    with pytest.raises(DataError, match=r"every class needs at least 2 images .*: class2 \(1\), class6 \(0\)"):
        load_image_dataset(str(empty), 28)

    broken = imagefolder(tmp_path / "broken")
    (broken / "class1" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="class1/0.png is not a readable image"):
        load_image_dataset(str(broken), 28)


def test_failed_prepare_stage_exits_2_and_keeps_the_previous_output(tmp_path):
    """The real stage script on a bad custom dataset: one error line, exit 2, the last good data/prepared untouched."""
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # the stages find their paths there
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(dataset="custom", custom_source=str(imagefolder(tmp_path / "imgs")))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "imgs" / "class4" / "odd.png").write_bytes(b"not an image")
    previous = Split(np.zeros((2, 28, 28), np.uint8), np.array([0, 1]), ["a", "b"])
    save_splits({"train": previous, "val": previous, "test": previous}, tmp_path / "data" / "prepared", {"dataset": "before"})
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in (tmp_path / "data").rglob("*") if p.is_file())

    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's library, not an install's
    result = subprocess.run([sys.executable, "pipelines/prepare.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "odd.png is not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    after = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert after == before  # no partial or replaced output, no temporary leftovers
