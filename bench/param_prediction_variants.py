"""Which parameter-prediction variant gives the numbers: each one on the same frozen feature map and test tasks.

    python bench/param_prediction_variants.py --out bench/results/param_prediction_variants_cpu.json

Reads the feature map that `dvc repro pretrain@param_prediction` produced
(pretrained/param_prediction) and the prepared splits, then compares, on the
evaluation protocol's fixed test tasks:
  - nearest centroid: the pre-trained map alone, cosine prototypes (no predictor);
  - Qiao et al.: a linear predictor w_k = phi(a_k);
  - an MLP predictor w_k = phi(a_k);
  - Gidaris & Komodakis-style: an MLP plus the prototype term, w_k = phi_avg * a_k + phi(a_k) (the default).
Every predictor is meta-trained for the same number of episodes from the same seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.artifacts import load_meta_knowledge  # noqa: E402
from metaflowlib.data.store import load_pool  # noqa: E402
from metaflowlib.episodes import EpisodeSampler  # noqa: E402
from metaflowlib.evaluate import embed_pool, evaluate_setting  # noqa: E402
from metaflowlib.methods import ParameterPredictor  # noqa: E402
from metaflowlib.runtime import device_name, resolve_device, seed_everything  # noqa: E402
from metaflowlib.train import MetaTrainer, build_meta_optimizer  # noqa: E402

VARIANTS = {
    "qiao_linear": {"predictor_hidden": 0, "combine_prototypes": False},
    "mlp": {"predictor_hidden": 256, "combine_prototypes": False},
    "mlp_plus_prototype": {"predictor_hidden": 256, "combine_prototypes": True},
}
SETTINGS = {"5w1s": (5, 1), "5w5s": (5, 5), "20w1s": (20, 1), "20w5s": (20, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=3000, help="meta-training episodes per variant")
    parser.add_argument("--test-tasks", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = resolve_device(args.device)
    prepared = ROOT / "data" / "prepared"
    embedding, config = load_meta_knowledge(ROOT / "pretrained" / "param_prediction", device)
    size = config["extra"]["image_size"]
    seed_everything(0)
    base = ParameterPredictor(hidden=embedding.config()["hidden"], image_size=size).to(device)
    base.embedding.load_state_dict(embedding.embedding.state_dict())
    train = embed_pool(base.eval(), load_pool(prepared, "train", device), None)
    test = embed_pool(base, load_pool(prepared, "test", device), None)

    def scores(method) -> dict[str, float]:
        return {name: round(100 * evaluate_setting(method.eval(), test, test, ways, shots, 15, args.test_tasks, 2017, 50, None).accuracy, 2)
                for name, (ways, shots) in SETTINGS.items()}

    results = {"nearest_centroid": {"accuracy": scores(embedding), "meta_train_seconds": 0.0}}
    for name, options in VARIANTS.items():
        seed_everything(0)
        method = ParameterPredictor(hidden=base.config()["hidden"], image_size=size, **options).to(device)
        method.embedding.load_state_dict(base.embedding.state_dict())
        optimizer, scheduler = build_meta_optimizer(method, "adam", 1e-3, 2000, 0.5)
        start = time.perf_counter()
        MetaTrainer(method, EpisodeSampler(train, 20, 5, 15, 4, seed=0), optimizer, scheduler, validate=lambda m: 0.0,
                    val_every=args.episodes, max_episodes=args.episodes, max_seconds=None, progress="off").run()
        seconds = time.perf_counter() - start
        results[name] = {"accuracy": scores(method), "meta_train_seconds": round(seconds, 1), **options}
        print(name, results[name], flush=True)
    report = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
              "feature_map": str(ROOT / "pretrained" / "param_prediction"), "episodes": args.episodes,
              "train_task": "20-way 5-shot 15-query, 4 tasks per step, Adam 1e-3", "test_tasks_per_setting": args.test_tasks,
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
