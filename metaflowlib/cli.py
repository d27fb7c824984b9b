"""`metaflowlib`: check params, browse the registry, predict from folders, promote behind the gate, roll back.

Expected failures (bad params, missing data, registry refusals) print one
line `error: ...` and exit 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os

from metaflowlib.entry import run_guarded
from metaflowlib.errors import MetaflowError


def _configure(args: argparse.Namespace):
    """Load params (for the tracking URI and gate metric) and open the MLflow store: --tracking-uri, else
    $MLFLOW_TRACKING_URI, else params. A store MLflow cannot open is one error naming the URI."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from metaflowlib import tracking
    from metaflowlib.config import load_params

    params = load_params(args.params)
    if args.tracking_uri:  # tracking.configure lets the environment win over its argument; the flag must win over both
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    uri = tracking.configure(params.mlflow.tracking_uri)
    try:
        MlflowClient()
    except (MlflowException, ImportError) as error:  # e.g. a bare path (the retired file store), a missing DB driver
        raise MetaflowError(f"cannot open the MLflow store {uri!r}: {str(error).splitlines()[0]}") from None
    return params


def cmd_check(args: argparse.Namespace) -> None:
    """Every section and every method block, checked against the classes they name."""
    from metaflowlib.config import read_params
    from metaflowlib.config.check import check_params

    params, specs = check_params(read_params(args.params), str(args.params))
    methods = ", ".join(f"{k} ({m.kind})" for k, m in specs.items())
    print(f"{args.params}: valid; profile {params.profile}, dataset {params.data.name}, methods: {methods}")


def cmd_models_list(args: argparse.Namespace) -> None:
    from metaflowlib import registry

    params = _configure(args)
    models = registry.list_models()
    if not models:
        print("no registered models yet: run `dvc repro`")
    for model in models:
        print(model["name"])
        for v in model["versions"]:
            aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
            print(f"  v{v.version}{aliases}  {_headline(v, params.registry.gate_metric)}  run {v.run_id}")


def _headline(version, gate_metric: str) -> str:
    """'<metric> <value>', marked when the number is not one the gate compares."""
    from metaflowlib import registry

    found = registry.headline(version, gate_metric)
    if found is None:
        return "not evaluated"
    metric, value = found
    gated = metric == registry.gate_metric_of(version, gate_metric)
    return f"{metric} {value:.4f}" + ("" if gated else " (no gate metric)")


def _version(name: str, version: str | None):
    """A version by number or @alias, default production: `models show` and `predict` alike."""
    from metaflowlib import registry

    info = registry.get_version(name, version) if version else registry.get_alias(name)
    if info is None:
        raise MetaflowError(f"{name} has no production version; pass a version number")
    return info


def cmd_models_show(args: argparse.Namespace) -> None:
    from metaflowlib import registry

    params = _configure(args)
    info = _version(args.name, args.version)
    print(f"{info.name} v{info.version} aliases={info.aliases} run={info.run_id}")
    print(info.description)
    print(f"evaluation: {_headline(info, params.registry.gate_metric)}")
    print("tags:")
    for key in sorted(info.tags):
        print(f"  {key}: {info.tags[key]}")
    found = registry.evaluations(info)
    print("evaluated by: " + ("no other run" if not found else f"{len(found)} run(s), the latest of each stage"))
    for evaluation in found:
        print(f"  {evaluation.run_name} (run {evaluation.run_id})")
        for key, value in evaluation.metrics.items():
            print(f"    {key}: {value:.4f}")


def cmd_predict(args: argparse.Namespace) -> None:
    """One few-shot task from folders: a line per query image (path, class, probability), or JSON."""
    import mlflow

    from metaflowlib import api

    _configure(args)
    info = _version(args.name, args.version)
    learner = api.load_version(info.name, info.version, tracking_uri=mlflow.get_tracking_uri())
    answers = learner.predict_folders(args.support, args.query, strategy=args.strategy)
    if args.json:
        print(json.dumps(answers, indent=2))
        return
    for answer in answers:
        print(f"{answer['file']}\t{answer['class']}\t{answer['probability']:.4f}")


def cmd_promote(args: argparse.Namespace) -> None:
    from metaflowlib import registry

    params = _configure(args)
    print(registry.promote(args.name, args.version, args.metric or params.registry.gate_metric, force=args.force,
                           confidence=params.registry.confidence))


def cmd_rollback(args: argparse.Namespace) -> None:
    from metaflowlib import registry

    _configure(args)
    print(registry.rollback(args.name))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="metaflowlib", description=__doc__.splitlines()[0])
    top.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    top.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or params mlflow.tracking_uri)")
    commands = top.add_subparsers(dest="command", required=True)

    commands.add_parser("check", help="validate params.yaml").set_defaults(func=cmd_check)

    models = commands.add_parser("models", help="browse registered models").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="every model with versions, aliases and gate metric").set_defaults(func=cmd_models_list)
    show = models.add_parser("show", help="one version (default: production) with its tags")
    show.add_argument("name")
    show.add_argument("version", nargs="?", help="a version number or @alias")
    show.set_defaults(func=cmd_models_show)

    predict = commands.add_parser("predict", help="label query images with a few-shot task read from folders")
    predict.add_argument("name")
    predict.add_argument("version", nargs="?", help="a version number or @alias (default: production)")
    predict.add_argument("--support", required=True, help="one subfolder per class (its name), images inside")
    predict.add_argument("--query", required=True, help="the images to label (at any depth)")
    predict.add_argument("--strategy", default="source", help="test-time adaptation: source (default), bn or tent")
    predict.add_argument("--json", action="store_true", help="a JSON list of {file, class, probability, probabilities}")
    predict.set_defaults(func=cmd_predict)

    promote = commands.add_parser("promote", help="move 'production' to a version that beats the current one")
    promote.add_argument("name")
    promote.add_argument("version", help="a version number or @alias")
    promote.add_argument("--force", action="store_true", help="promote even if it does not beat production")
    promote.add_argument("--metric", help="gate metric (default: params registry.gate_metric)")
    promote.set_defaults(func=cmd_promote)

    rollback = commands.add_parser("rollback", help="point 'production' back at the version it replaced")
    rollback.add_argument("name")
    rollback.set_defaults(func=cmd_rollback)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    main()
