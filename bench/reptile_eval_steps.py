"""Reptile's test-time steps: the pipeline's 10 against Nichol et al.'s 50 (`--eval-iters 50`), same tasks.

    python bench/reptile_eval_steps.py --out bench/results/reptile_eval_steps_cpu.json

Loads the trained omega (`models/reptile`, written by `train@reptile`) and scores it on the same
fixed 5-way 1-shot test tasks with each number of Adam steps, paired per task. 50 steps cost 5x the
evaluation time, which is why the default profile adapts with 10 (docs/maml_family.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.artifacts import load_meta_knowledge  # noqa: E402
from metaflowlib.data.store import load_pool  # noqa: E402
from metaflowlib.episodes import fixed_episodes  # noqa: E402
from metaflowlib.evaluate import confidence_interval, task_accuracies  # noqa: E402
from metaflowlib.io import write_json  # noqa: E402
from metaflowlib.runtime import device_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "reptile")
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seed", type=int, default=2017)
    args = parser.parse_args()
    torch.set_num_threads(2)
    method, _ = load_meta_knowledge(args.model)
    pool = load_pool(ROOT / "data" / "prepared", "test", torch.device("cpu"))
    indices = fixed_episodes(pool, args.tasks, 5, 1, 15, args.seed)
    per_steps, rows = {}, {}
    for steps in args.steps:
        method.inner_steps_eval = steps
        start = time.perf_counter()
        per_steps[steps] = task_accuracies(method, pool, indices, 50, None)
        mean, ci = confidence_interval(per_steps[steps])
        rows[str(steps)] = {"accuracy": mean, "ci95": ci, "seconds_per_task": (time.perf_counter() - start) / args.tasks}
    first, last = args.steps[0], args.steps[-1]
    diff_mean, diff_ci = confidence_interval(per_steps[last] - per_steps[first])
    result = {"device": device_name(torch.device("cpu")), "torch": torch.__version__, "tasks": f"{args.tasks} x 5-way 1-shot 15-query, test split",
              "episodes_digest": indices.digest(), "steps": rows,
              f"paired_difference_{last}_minus_{first}": {"mean": diff_mean, "ci95": diff_ci}}
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
