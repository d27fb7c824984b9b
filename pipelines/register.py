"""Stages `register@<method>` and `register_import@<paper run>`: a new registry version of omega, tagged with its
evaluation.

The tags show the accuracies; `evaluation_run_id` names the evaluation run the
promotion gate reads them (and the per-task accuracies) from.

Output: registry/<key>.json (name, version, run id, whether it was promoted).
The first version is promoted to `production` when none exists and
`registry.promote_first` is set; later promotions are a person's call
(`metaflowlib promote`).
"""

from __future__ import annotations

from _stage import ROOT, declared, method_key, params, run_guarded

from metaflowlib import gate, registry, tracking
from metaflowlib.config.methods import method_spec
from metaflowlib.io import read_json, write_json


def main() -> None:
    p, key = params(), method_key()
    train, metrics, evaluation = (read_json(ROOT / declared("register", pattern, key=key))
                                  for pattern in ("runs/*/train.json", "metrics/*/eval.json", "runs/*/evaluate.json"))
    name = p.registered_name(key)
    scores = {k: v for k, v in metrics.items() if k.startswith(("acc_", "ci95_"))}
    shown = ", ".join(f"{k[4:]} {100 * v:.2f}%" for k, v in scores.items() if k.startswith("acc_"))
    if key in p.paper_runs:  # trained on a GPU by bench/paper_run.py, at its paper's budget
        kind, profile, model_description = train["method"], train["profile"], ""
        tags = {"paper_run": train["paper_run"], "cards": ", ".join(train["cards"]), "segments": str(train["segments"])}
    else:
        mp = method_spec(p, key)
        kind, profile, model_description, tags = mp.kind, p.profile, mp.description, {}
    tags |= {**scores, "protocol": p.data.name, "method": kind, "method_key": key, "profile": profile,
             "adaptation_ms_per_task": metrics["adaptation_ms_per_task"], "meta_train_seconds": metrics["meta_train_seconds"],
             "git_commit": tracking.git_commit(), gate.EVALUATION_RUN_TAG: evaluation["run_id"]}
    if "feature_map" in train:  # omega is read through a frozen feature map registered of its own
        tags |= {"feature_map_model": train["feature_map"]["registered_name"],
                 "feature_map_version": train["feature_map"]["registered_version"]}
    description = (f"{kind} meta-knowledge (omega) trained on {p.data.name} train classes, profile '{profile}', "
                   f"{train['meta_train_episodes']} episodes"
                   + (f" on {', '.join(train['cards'])} ({train['segments']} segments)" if "cards" in train else "")
                   + f". Test ({metrics['tasks']} tasks): {shown}.")
    model_description = model_description or f"{kind} on {p.data.name}: predict(support_images, support_labels, query_images) -> labels"

    tracking.configure(p.mlflow.tracking_uri)
    version, promoted = registry.register_stage_version(train["model_uri"], name, tags, description, model_description,
                                                        p.registry.gate_metric, p.registry.promote_first)
    write_json(ROOT / declared("register", "registry/*", key=key), {"name": name, "version": version.version, "run_id": train["run_id"],
                                                  "model_uri": train["model_uri"], "promoted": promoted is not None})
    print(f"register@{key}: {name} version {version.version}" + (f"; {promoted}" if promoted else
          f"; promote with `metaflowlib promote {name} {version.version}`"))


if __name__ == "__main__":
    run_guarded(main)
