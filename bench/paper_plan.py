"""Write `bench/paper_runs/plan.json`: every paper run (method x setting at its paper's budget), resolved from
params.yaml, in the order GPU windows should run them, with the GPU minutes each is expected to take.

    python bench/paper_plan.py                 # after changing params.yaml or the table below; commit the plan

The plan is what `bench/paper_run.py` reads on a bare GPU machine: plain JSON of constructor arguments and
training settings, so that machine needs neither pydantic nor YAML. Each method block of params.yaml (its `full`
budget) is the 5-way 1-shot run; the table below holds only what the papers change for the other settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metaflowlib.config import load_params  # noqa: E402
from metaflowlib.config.base import settings_of  # noqa: E402
from metaflowlib.config.methods import method_spec  # noqa: E402
from metaflowlib.io import write_json  # noqa: E402

PLAN = ROOT / "bench" / "paper_runs" / "plan.json"
IMAGE_SIZE, CHANNELS = 28, 1  # Omniglot, Vinyals split

# (run name, method key, block changes, settings scored, published accuracy %, source of the settings)
RUNS: list[tuple[str, str, dict[str, Any], tuple[str, ...], tuple[float, ...], str]] = [
    ("protonet-1shot", "protonet", {"shots": 1}, ("5w1s", "20w1s"), (98.8, 96.0),
     "Snell et al. 2017 sec. 3.1: 60-way episodes, 5 queries, shots as tested; Table 1"),
    ("protonet-5shot", "protonet", {"shots": 5}, ("5w5s", "20w5s"), (99.7, 98.9), "Snell et al. 2017, Table 1"),
    ("maml-5w1s", "maml", {}, ("5w1s",), (98.7,), "cbfinn/maml README: meta_batch 32, update_lr 0.4, 1 step; Finn et al. Table 1"),
    ("maml-5w5s", "maml", {"shots": 5}, ("5w5s",), (99.9,), "cbfinn/maml README (5-shot: --update_batch_size=5)"),
    ("maml-20w1s", "maml", {"ways": 20, "tasks_per_step": 16, "inner_lr": 0.1, "inner_steps": 5, "inner_steps_eval": 5},
     ("20w1s",), (95.8,), "cbfinn/maml README 20-way: meta_batch 16, update_lr 0.1, 5 steps"),
    ("maml-20w5s", "maml", {"ways": 20, "shots": 5, "tasks_per_step": 16, "inner_lr": 0.1, "inner_steps": 5,
                            "inner_steps_eval": 5}, ("20w5s",), (98.9,), "cbfinn/maml README 20-way"),
    ("fomaml-5w1s", "fomaml", {}, ("5w1s",), (98.3,), "Finn et al. sec. 5.2, MAML's settings"),
    ("fomaml-5w5s", "fomaml", {"shots": 5}, ("5w5s",), (99.2,), "Finn et al. sec. 5.2"),
    ("fomaml-20w1s", "fomaml", {"ways": 20, "tasks_per_step": 16, "inner_lr": 0.1, "inner_steps": 5, "inner_steps_eval": 5},
     ("20w1s",), (89.4,), "Nichol et al. Table 1 (first-order MAML), MAML's 20-way settings"),
    ("fomaml-20w5s", "fomaml", {"ways": 20, "shots": 5, "tasks_per_step": 16, "inner_lr": 0.1, "inner_steps": 5,
                                "inner_steps_eval": 5}, ("20w5s",), (97.9,), "Nichol et al. Table 1"),
    ("reptile-5w", "reptile", {"inner_steps_eval": 50}, ("5w1s", "5w5s"), (97.68, 99.48),
     "openai/supervised-reptile README, 5-way: one training (--train-shots 10) scored 1- and 5-shot with --eval-iters 50, transductive"),
    ("reptile-20w", "reptile", {"ways": 20, "inner_batch": 20, "inner_steps": 10, "inner_lr": 0.0005, "inner_steps_eval": 50,
                                "budget": {"full": {"episodes": 200000}}}, ("20w1s", "20w5s"), (89.43, 97.12),
     "supervised-reptile README 20-way: inner-batch 20, inner-iters 10, lr 5e-4, 200000 meta-iters, one training"),
    ("imaml-5w1s", "imaml", {}, ("5w1s",), (99.16,), "aravindr93/imaml_dev README, Omniglot 5-way 1-shot"),
    ("imaml-5w5s", "imaml", {"shots": 5}, ("5w5s",), (99.67,), "imaml_dev 5-way settings, 5 shots"),
    ("imaml-20w1s", "imaml", {"ways": 20}, ("20w1s",), (94.46,),
     "imaml_dev gives only the 5-way command: its settings with 20 ways (unconfirmed)"),
    ("imaml-20w5s", "imaml", {"ways": 20, "shots": 5}, ("20w5s",), (98.69,), "as imaml-20w1s (unconfirmed)"),
]

FIRST = 3  # ProtoNet's two models, then MAML 5w1s (the order); the rest cheapest first

# Seconds per meta-step on one H100 (torch 2.11), 5-way 1-shot, as bench/results measured them: ProtoNet 60w5s5q at
# 117 episodes/s (peers_h100), the MAML family at meta-batch 32 per inner-step count (maml_memory_h100).
MEASURED_H100 = "bench/results/peers_h100/results.json, bench/results/maml_memory_h100/results.json"


def seconds_per_step(kind: str, spec: dict[str, Any]) -> float:
    """A measured 5-way step time, scaled linearly by images per meta-step where the run's shape differs: an upper
    bound on a GPU, where small steps are bound by kernel launches rather than by images."""
    memory = json.loads((ROOT / "bench/results/maml_memory_h100/results.json").read_text())["runs"]
    if kind == "protonet":
        return (1 / 117) * (spec["shots"] + 5) / 10  # 60 ways either way: images per episode scale with shots + 5 queries
    steps = spec["model"]["inner_steps"]
    times = {r["inner_steps"]: r["seconds_per_step"] for r in memory if r["method"] == kind}
    nearest = min(times, key=lambda s: abs(s - steps))
    base = times[nearest] * steps / nearest
    images = spec["ways"] * (spec["shots"] + spec["queries"]) * spec["tasks_per_step"]
    return base * images / (5 * (1 + 15) * 32)


def plan(params_path: Path) -> dict[str, Any]:
    runs = []
    for name, key, changes, settings, published, source in RUNS:
        p = load_params(params_path)
        block = p.methods[key].model_dump(mode="json", exclude_unset=True) | p.methods[key].options
        block |= {**changes, "budget": {**block.get("budget", {}), **changes.get("budget", {})}}
        p.methods[key] = type(p.methods[key]).model_validate(block)
        spec = method_spec(p, key)
        entry = {
            "name": name, "method_key": key, "kind": spec.kind,
            "model": spec.model_config_dict(IMAGE_SIZE, CHANNELS),
            "ways": spec.ways, "shots": spec.shots, "queries": spec.queries, "tasks_per_step": spec.tasks_per_step,
            "meta_optimizer": spec.meta_optimizer.model_dump(mode="json"), "episodes": spec.budget_in("full").episodes,
            "val_every": spec.val_every or p.train.val_every,
            "validation": p.train.validation.model_dump(mode="json") | dict(zip(("ways", "shots"), settings_of(settings[0]))),
            "evaluate": {"settings": {s: list(settings_of(s)) for s in settings},
                         "tasks": p.evaluate.tasks, "queries": p.evaluate.queries, "seed": p.evaluate.seed,
                         "batch_tasks": p.evaluate.batch_tasks, "timing_tasks": p.evaluate.timing_tasks},
            "seed": p.seed, "published": dict(zip(settings, published)), "source": source,
        }
        entry["estimate_minutes_h100"] = round(entry["episodes"] * seconds_per_step(spec.kind, entry) / 60, 1)
        runs.append(entry)
    runs[FIRST:] = sorted(runs[FIRST:], key=lambda r: r["estimate_minutes_h100"])
    total = sum(r["estimate_minutes_h100"] for r in runs)
    return {"data": "omniglot-vinyals", "image_size": IMAGE_SIZE, "estimates_from": MEASURED_H100,
            "estimate_minutes_h100_total": round(total, 1), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--out", type=Path, default=PLAN)
    args = parser.parse_args()
    result = plan(args.params)
    write_json(args.out, result)
    for run in result["runs"]:
        print(f"{run['name']:<15} {run['episodes']:>7} meta-steps  ~{run['estimate_minutes_h100']:>6.1f} H100 minutes")
    print(f"total ~{result['estimate_minutes_h100_total']:.0f} H100 minutes -> {args.out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
