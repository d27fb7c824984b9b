"""The MAML family compared task by task: each trained omega on the same 1000 fixed 5-way 1-shot test tasks.

    python bench/maml_family_paired.py --out bench/results/maml_family_paired_cpu.json

Loads `models/<key>` (written by `train@<key>`) for each key, scores every model on the evaluation
protocol's fixed tasks (`evaluate.seed`, `evaluate.tasks`), and compares each with the reference
key (MAML) on the same tasks: the mean paired difference with its 95% CI and a two-sided sign test.
"Not significantly below" means the paired CI's upper end is >= 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.artifacts import load_meta_knowledge  # noqa: E402
from metaflowlib.config import load_params  # noqa: E402
from metaflowlib.data.store import load_pool  # noqa: E402
from metaflowlib.episodes import fixed_episodes  # noqa: E402
from metaflowlib.evaluate import confidence_interval, task_accuracies  # noqa: E402
from metaflowlib.io import write_json  # noqa: E402
from metaflowlib.runtime import device_name  # noqa: E402


def sign_test(differences: torch.Tensor) -> float:
    """Two-sided p-value of the sign test on the non-zero paired differences."""
    wins, losses = int((differences > 0).sum()), int((differences < 0).sum())
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keys", nargs="+", default=["maml", "fomaml", "reptile", "imaml"])
    parser.add_argument("--reference", default="maml")
    args = parser.parse_args()
    torch.set_num_threads(2)
    p = load_params(ROOT / "params.yaml")
    pool = load_pool(ROOT / "data" / "prepared", "test", torch.device("cpu"))
    indices = fixed_episodes(pool, p.evaluate.tasks, 5, 1, p.evaluate.queries, p.evaluate.seed)
    accuracies, rows = {}, {}
    for key in args.keys:
        method, _ = load_meta_knowledge(ROOT / "models" / key)
        accuracies[key] = task_accuracies(method, pool, indices, p.evaluate.batch_tasks, None)
        mean, ci = confidence_interval(accuracies[key])
        rows[key] = {"accuracy_5w1s": mean, "ci95": ci}
    for key in args.keys:
        if key == args.reference:
            continue
        difference = accuracies[key] - accuracies[args.reference]
        mean, ci = confidence_interval(difference)
        rows[key][f"minus_{args.reference}"] = {"mean": mean, "ci95": ci, "sign_test_p": sign_test(difference),
                                                 "significantly_below": mean + ci < 0}
    result = {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
              "tasks": f"{p.evaluate.tasks} x 5-way 1-shot {p.evaluate.queries}-query, test split",
              "episodes_digest": indices.digest(), "methods": rows}
    write_json(args.out, result)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
