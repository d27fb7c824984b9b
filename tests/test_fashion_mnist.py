"""Fashion-MNIST IDX reading, checksums and source resolution on tiny synthetic files (no download)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import SHARED_DATA

from metaflowlib.data import fashion_mnist
from metaflowlib.data.fashion_mnist import (
    FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    load_fashion_mnist,
)
from metaflowlib.errors import DataError


def write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_dataset(directory, seed: int = 0, sizes=(("train", 12), ("test", 5))) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four official file names holding random images; returns what was written."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in sizes:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(directory / FILES[(split, "images")], images, IMAGES_MAGIC)
        write_idx(directory / FILES[(split, "labels")], labels, LABELS_MAGIC)
        written[split] = (images, labels)
    return written


def test_reads_idx_into_uint8_images_and_int64_labels(tmp_path):
    written = write_dataset(tmp_path / "fm")
    data = load_fashion_mnist(str(tmp_path / "fm"), tmp_path, verify=False)
    for split, (images, labels) in written.items():
        assert data[split].images.dtype == np.uint8 and data[split].images.shape == images.shape
        assert data[split].labels.dtype == np.int64
        np.testing.assert_array_equal(data[split].images, images)
        np.testing.assert_array_equal(data[split].labels, labels)


def test_checksum_mismatch_is_refused_naming_the_file(tmp_path):
    write_dataset(tmp_path / "fm")
    with pytest.raises(DataError, match=r"checksum mismatch for .*fm/t10k-images-idx3-ubyte\.gz: expected sha256 cc1d090a"):
        load_fashion_mnist(str(tmp_path / "fm"), tmp_path, splits=("test",))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: write_idx(p, np.zeros(5), IMAGES_MAGIC), r"t10k-labels-idx1-ubyte\.gz is not an IDX file of 1-d unsigned bytes: magic 00000803"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00")), r"t10k-labels-idx1-ubyte\.gz is not an IDX file .*magic nothing"),
        (lambda p: p.write_bytes(b"not gzip at all"), r"cannot read .*t10k-labels-idx1-ubyte\.gz as gzip"),
        (lambda p: p.write_bytes(gzip.compress(LABELS_MAGIC.to_bytes(4, "big") + (9).to_bytes(4, "big") + b"\x01" * 3)),
         r"t10k-labels-idx1-ubyte\.gz: header says \(9,\) \(9 bytes\) but 3 bytes follow it"),
        (lambda p: write_idx(p, np.zeros(4), LABELS_MAGIC), r"holds 5 images but .*t10k-labels-idx1-ubyte\.gz 4 labels"),
        (lambda p: write_idx(p, np.full(5, 10), LABELS_MAGIC), r"t10k-labels-idx1-ubyte\.gz: label 10 outside 0\.\.9"),
        (lambda p: p.unlink(), r"missing Fashion-MNIST file .*t10k-labels-idx1-ubyte\.gz"),
    ],
)
def test_a_defective_file_is_one_error_naming_it(tmp_path, corrupt, message):
    write_dataset(tmp_path)
    corrupt(tmp_path / FILES[("test", "labels")])
    with pytest.raises(DataError, match=message):
        load_fashion_mnist(str(tmp_path), tmp_path, splits=("test",), verify=False)


def test_source_order_explicit_then_environment_then_shared_then_download(tmp_path, monkeypatch):
    explicit, env_root, project = tmp_path / "explicit", tmp_path / "env", tmp_path / "work" / "project"
    marks = {}
    for seed, directory in enumerate((explicit, env_root / "fashion-mnist", tmp_path / "work" / "shared" / "data" / "fashion-mnist")):
        marks[directory] = write_dataset(directory, seed)["test"][0]
    project.mkdir(parents=True)

    def loaded(source):
        return load_fashion_mnist(source, project, splits=("test",), verify=False)["test"].images

    monkeypatch.setenv("METAFLOWLIB_DATA", str(env_root))
    np.testing.assert_array_equal(loaded(str(explicit)), marks[explicit])
    np.testing.assert_array_equal(loaded(None), marks[env_root / "fashion-mnist"])  # a root holding fashion-mnist/
    monkeypatch.delenv("METAFLOWLIB_DATA")
    np.testing.assert_array_equal(loaded(None), marks[tmp_path / "work" / "shared" / "data" / "fashion-mnist"])
    with pytest.raises(DataError, match="data.source points at .*nowhere, which does not exist"):
        loaded(str(tmp_path / "nowhere"))

    fetched = []

    def fake_download(url, target):  # no network in tests: record the request, write a file in its place
        fetched.append((url, target))
        write_dataset(target.parent, 7)

    monkeypatch.setattr(fashion_mnist, "download", fake_download)
    alone = tmp_path / "alone" / "project"
    alone.mkdir(parents=True)
    load_fashion_mnist(None, alone, splits=("test",), verify=False)
    assert fetched[0] == (fashion_mnist.DOWNLOAD_URL.format(file="train-images-idx3-ubyte.gz"),
                          alone / "data" / "downloads" / "fashion-mnist" / "train-images-idx3-ubyte.gz")
    assert fashion_mnist.DOWNLOAD_URL.startswith("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")


def test_checksums_are_those_of_the_shared_mirror():
    listed = dict(line.split()[::-1] for line in (SHARED_DATA / "SHA256SUMS").read_text().splitlines()
                  if "fashion-mnist/" in line) if (SHARED_DATA / "SHA256SUMS").exists() else None
    if listed is None:
        pytest.skip("../shared/data/SHA256SUMS not found")
    assert {f"fashion-mnist/{name}": digest for name, digest in fashion_mnist.FILE_SHA256.items()} == listed


def test_real_files_verify_and_parse():
    if not (SHARED_DATA / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("real Fashion-MNIST not found at ../shared/data")
    data = load_fashion_mnist(str(SHARED_DATA), SHARED_DATA)
    assert data["train"].images.shape == (60000, 28, 28) and data["test"].images.shape == (10000, 28, 28)
    assert np.bincount(data["test"].labels).tolist() == [1000] * 10
    assert data["train"].labels[:5].tolist() == [9, 0, 0, 3, 0]
