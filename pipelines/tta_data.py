"""Stage `tta_data`: the shifted test set (Fashion-MNIST-C): seeded test images under every corruption x severity.

Output: data/tta/fashion-mnist-c/ (images.safetensors + info.json), a cached
DVC output, identical for identical params.
"""

from __future__ import annotations

from pathlib import Path

from _stage import ROOT, declared, params, run_guarded

from metaflowlib.config import Params
from metaflowlib.config.tta import TTAParams
from metaflowlib.data.fashion_mnist import load_fashion_mnist
from metaflowlib.tta.shifted import build_shifted, save_shifted

SHIFTED = declared("tta_data", "data/*")


def build(p: Params, root: Path) -> dict:
    """Write the set under `root`; returns its info.json."""
    d = p.tta.data
    test = load_fashion_mnist(d.source, root, splits=("test",), verify=d.verify_checksums)["test"]
    shifted = build_shifted(test.images, test.labels, d.images, d.corruptions, d.severities, p.tta.seed)
    save_shifted(shifted, root / SHIFTED, extra={"dataset": "fashion-mnist", "verified": d.verify_checksums})
    return shifted.info


def main() -> None:
    info = build(params(tta=TTAParams), ROOT)
    print(f"tta_data: wrote {SHIFTED} ({info['images']} test images x {len(info['corruptions'])} corruptions x "
          f"severities {info['severities']}, digest {info['digest']})")


if __name__ == "__main__":
    run_guarded(main)
