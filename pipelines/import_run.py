"""Stage `import@<key>`: a paper run trained on a GPU (bench/paper_run.py) becomes a training run of this pipeline.

`paper_runs.<key>.run` names a finished run's directory. Its omega, training curve and evaluation are logged as
train@ and evaluate@ log theirs (a training run with its pyfunc model, then `<key>-evaluate` with per-task
accuracies), tagged with the cards it ran on and its number of segments, and written to the same files
(models/<key>/, runs/<key>/train.json, metrics/<key>/), so `register_import@<key>`, the report and promotion treat it
like a method trained here. Refused: an unfinished run, one scored on other tasks than this pipeline's test tasks
(the evaluation's task digests must match the prepared test split's), and one trained on images of another format.
"""

from __future__ import annotations

import csv
import sys

from _stage import PREPARED, ROOT, declared, params, run_guarded
from evaluate import record_evaluation

from metaflowlib import tracking
from metaflowlib.artifacts import load_meta_knowledge, save_meta_knowledge
from metaflowlib.config import Params
from metaflowlib.data.store import info_digest, load_format, load_pool
from metaflowlib.episodes import fixed_episodes
from metaflowlib.errors import ConfigError, DataError
from metaflowlib.io import read_json, write_csv, write_json
from metaflowlib.serving.fewshot import log_pyfunc_model

def main() -> None:
    p = params()
    key = sys.argv[1] if len(sys.argv) == 2 else None
    if key not in p.paper_runs:
        raise ConfigError(f"usage: python pipelines/import_run.py <key of paper_runs> (have: {', '.join(p.paper_runs) or 'none'})")
    run_dir = ROOT / p.paper_runs[key].run
    record_path = run_dir / "run.json"
    if not record_path.is_file():
        raise DataError(f"paper_runs.{key}.run: {p.paper_runs[key].run} holds no run.json (a bench/paper_run.py run directory)")
    record = read_json(record_path)
    if record["status"] != "finished":
        segments = record["segments"]
        done = segments[-1]["episodes_to"] if segments else 0
        raise DataError(f"paper_runs.{key}: {record['name']} is {record['status']} at episode {done}/{record['plan']['episodes']}: "
                        f"continue it with bench/paper_run.sh on a GPU, then import it")
    report = read_json(run_dir / "evaluation.json")
    check_same_tasks(p, key, report)
    method, saved = load_meta_knowledge(run_dir / "omega")
    ours = load_format(PREPARED).to_dict()
    if saved["extra"]["image_format"] != ours:
        raise DataError(f"paper_runs.{key}: {record['name']} was trained on images in format {saved['extra']['image_format']}, "
                        f"this pipeline's data are {ours} (data.*)")
    train = log_training(p, key, record, method, saved["extra"], run_dir)
    record_evaluation(p, key, f"import@{key}", {k: report[k] for k in EVALUATION}, train, method.fixed_ways, None, None)


EVALUATION = ("settings", "task_accuracies", "skipped_settings", "shots_curve", "adaptation_seconds_per_task")


def check_same_tasks(p: Params, key: str, report: dict) -> None:
    """The run was scored on the fixed tasks `evaluate@` scores here: same split, classes, order, seed and count."""
    pool = load_pool(PREPARED, "test", "cpu")
    e, min_count = p.evaluate, int(pool.counts.min())
    for name, scored in report["settings"].items():
        queries = min(e.queries, min_count - scored["shots"])
        ours = fixed_episodes(pool, e.tasks, scored["ways"], scored["shots"], queries, e.seed).digest()
        if ours != scored["digest"]:
            raise DataError(f"paper_runs.{key}: its {name} evaluation was scored on other tasks than this pipeline's "
                            f"({scored['episodes']} tasks, digest {scored['digest'][:12]} vs {ours[:12]} here): the run and "
                            f"this pipeline must share data (data.*) and the evaluate section's tasks, queries and seed")


def log_training(p: Params, key: str, record: dict, method, extra: dict, run_dir) -> dict:
    """The training run: the plan as params, the curve as metrics by episode, the costs, omega and its pyfunc."""
    import mlflow

    plan, segments = record["plan"], record["segments"]
    with (run_dir / "curve.csv").open() as handle:
        reader = csv.DictReader(handle)
        curve, columns = list(reader), list(reader.fieldnames or [])
    tags = {"method": method.kind, "method_key": key, "profile": "full", "dataset": p.data.name, "data_digest": info_digest(PREPARED),
            "paper_run": record["name"], "cards": ", ".join(record["cards"]), "segments": str(len(segments)),
            "mixed_cards": str(record["mixed_cards"]).lower(), "memory_kind": record["memory_kind"]}
    with tracking.stage_run(p, f"import@{key}", key, tags=tags, params={"paper_run": plan}) as run:
        tracking.log_splits(PREPARED, {"train": "training", "val": "validation"})
        logger = tracking.MetricLogger(run.info.run_id)
        for row in curve:
            logger({k: float(v) for k, v in row.items() if k not in ("episode", "seconds") and v != ""}, int(row["episode"]))
        costs = {"meta_train_seconds": record["train_seconds"], "meta_train_episodes": record["episodes"],
                 "episodes_per_second": record["episodes"] / record["train_seconds"], "peak_memory_mb": record["peak_memory_mb"],
                 "best_val_accuracy": record["best_val_accuracy"], "best_episode": record["best_episode"],
                 "meta_parameters": sum(t.numel() for t in method.parameters() if t.requires_grad)}
        mlflow.log_metrics(costs)
        omega = save_meta_knowledge(method, ROOT / declared("import", "models/*", key=key),
                                    extra={**extra, "method_key": key, "dataset": p.data.name, "run_id": run.info.run_id})
        model_uri = log_pyfunc_model(omega, ways=method.fixed_ways or 2, tent=p.serving.tent_fewshot.model_dump())
        write_csv(ROOT / declared("import", "*/train_curve.csv", key=key), curve, columns)
        train = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "model_uri": model_uri, "method": method.kind,
                 "profile": "full", "memory_kind": record["memory_kind"], "budget_capped": False, "paper_run": record["name"],
                 "cards": record["cards"], "segments": len(segments), **costs}
        write_json(ROOT / declared("import", "runs/*/train.json", key=key), train)
    print(f"import@{key}: {record['name']} ({record['episodes']} episodes in {record['train_seconds']:.0f}s on "
          f"{', '.join(record['cards'])}, {len(segments)} segments) -> MLflow run {run.info.run_id}, model {model_uri}")
    return train


if __name__ == "__main__":
    run_guarded(main)
