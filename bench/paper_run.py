"""Continue the paper runs of `bench/paper_runs/plan.json` for one time allowance, resumably.

    python bench/paper_run.py --allowance-minutes 9          # on a lent GPU: bash bench/paper_run.sh

Takes the first unfinished run of the plan (method x setting at its paper's budget), resumes it from its last
checkpoint, trains until the run's budget or the allowance is spent, and goes on to the next run while time is left.
A run whose training ends is scored with the pipeline's own protocol (the Vinyals test split, the evaluation's
fixed tasks and seed) and its omega saved; `dvc repro import@<key>` brings it into the pipeline (README "Paper
runs"). Everything a window writes is under `--runs-dir/<run>/`, small enough to commit: `run.json` (status, the
card, torch and seconds of every segment, validation seconds), `checkpoint/` while training (omega, optimizer,
sampler and RNG states: safetensors + JSON), then `omega/`, `curve.csv` and `evaluation.json`.

Resume is bitwise on CPU; on CUDA the run is in deterministic mode (nondeterministic operations a segment met are
listed in its record). Needs torch and numpy only (plus the harness in bench/ for the Omniglot pools).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from metaflowlib.artifacts import save_meta_knowledge
from metaflowlib.data.preprocess import ImageFormat
from metaflowlib.episodes import EpisodeSampler, TaskPool
from metaflowlib.errors import DataError, Interrupted
from metaflowlib.evaluate import evaluate_protocol
from metaflowlib.io import load_checkpoint, read_json, write_csv, write_json
from metaflowlib.methods import build_method
from metaflowlib.runtime import device_name, resolve_device, resolve_precision, seed_everything
from metaflowlib.train import MetaTrainer, build_meta_optimizer, validation_accuracy

ROOT = Path(__file__).resolve().parent.parent
CURVE = ["episode", "seconds", "train_loss", "train_accuracy", "val_accuracy", "lr"]


def deterministic(device: torch.device) -> None:
    """CUDA's deterministic mode: cuBLAS workspace, no cuDNN autotuning, deterministic kernels where torch has them
    (a warning, recorded in the segment, where it has none)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


def load_pools(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, TaskPool], str]:
    """The Vinyals splits: from `--pools` (an npz in the harness's layout) or built from the Omniglot files."""
    from metaflowlib_bench.cases import load_pools as load_npz
    from metaflowlib_bench.cases import pools_file

    from metaflowlib.data.omniglot import find_source

    if args.pools is None:
        if find_source(args.data, ROOT) is None:
            raise DataError("no Omniglot files found (--data, $METAFLOWLIB_DATA, ../shared/data): a paper run never "
                            "trains on synthetic images; pass --data or --pools")
        args.pools = pools_file(args.data)
    return load_npz(args.pools, device)


class PaperRun:
    """One (method, setting) of the plan: its directory, its record, and the training that continues it."""

    def __init__(self, spec: dict[str, Any], runs_dir: Path) -> None:
        self.spec, self.dir = spec, runs_dir / spec["name"]
        self.record_path = self.dir / "run.json"
        self.record = read_json(self.record_path) if self.record_path.is_file() else {
            "name": spec["name"], "status": "training", "plan": spec, "segments": [], "validation_seconds": {}}
        if self.record["plan"] != spec:
            raise DataError(f"{self.dir} was started from another plan entry for {spec['name']}: delete it to start "
                            f"afresh, or restore the plan it was started from")

    @property
    def status(self) -> str:
        return self.record["status"]

    def save(self) -> None:
        cards = sorted({segment["card"] for segment in self.record["segments"]})
        self.record |= {"cards": cards, "mixed_cards": len(cards) > 1}
        write_json(self.record_path, self.record)

    def build(self, device: torch.device, pools: dict[str, TaskPool], dtype: torch.dtype | None, until: float,
              segment_episodes: int | None) -> None:
        s = self.spec
        seed_everything(s["seed"])
        method = build_method(s["kind"], **s["model"]).to(device).to(memory_format=torch.channels_last)
        dtype = method.precision(dtype)
        optimizer, scheduler = build_meta_optimizer(method, total_steps=s["episodes"],
                                                    **{k: v for k, v in s["meta_optimizer"].items() if k != "grad_clip"})
        v = s["validation"]
        trainer = MetaTrainer(
            method, EpisodeSampler(pools["train"], s["ways"], s["shots"], s["queries"], s["tasks_per_step"], seed=s["seed"]),
            optimizer, scheduler, max_episodes=s["episodes"], max_seconds=None, precision=dtype,
            validate=validation_accuracy(pools["val"], ways=v["ways"], shots=v["shots"], queries=v["queries"], tasks=v["tasks"],
                                         seed=s["seed"] + 1, batch_tasks=s["evaluate"]["batch_tasks"], dtype=dtype),
            val_every=s["val_every"], checkpoint_dir=self.dir / "checkpoint", checkpoint_every=s.get("checkpoint_every", 2000),
            grad_clip=s["meta_optimizer"]["grad_clip"], progress="log", log=self._seconds_of_validations,
            stop_when=lambda: time.monotonic() >= until or (
                segment_episodes is not None and trainer.episode >= self.start + segment_episodes))
        self.trainer, self.start = trainer, self._checkpointed_episodes()

    def _checkpointed_episodes(self) -> int:
        state = load_checkpoint(self.dir / "checkpoint")
        return 0 if state is None else state["step"]

    def _seconds_of_validations(self, metrics: dict[str, float], episode: int) -> None:
        if "val_accuracy" in metrics:  # training seconds (summed over segments) when each validation happened
            self.record["validation_seconds"][str(episode)] = self.trainer.seconds

    def train_segment(self, device: torch.device, pools: dict[str, TaskPool], dtype: torch.dtype | None, until: float,
                      segment_episodes: int | None) -> bool:
        """Resume and train until the budget, `until` (time.monotonic) or `segment_episodes`; True when the budget is spent."""
        self.build(device, pools, dtype, until, segment_episodes)
        began = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = self.trainer.run()
                finished = True
            except Interrupted as stop:
                if stop.exit_code != 0:
                    self._record_segment(device, self.trainer.precision, began, caught)
                    raise
                finished = False
        self._record_segment(device, self.trainer.precision, began, caught)
        if finished:
            self.record |= {"status": "trained", "episodes": result.episodes, "train_seconds": result.seconds,
                            "best_val_accuracy": result.best_val_accuracy, "best_episode": result.best_episode,
                            "peak_memory_mb": result.peak_memory_mb, "memory_kind": result.memory_kind}
            self._write_curve(result.history)
            save_meta_knowledge(self.trainer.method, self.dir / "omega", extra={
                "image_size": self.spec["model"]["image_size"], "image_format": ImageFormat.ink(self.spec["model"]["image_size"]).to_dict(),
                "method_key": self.spec["method_key"], "dataset": "omniglot-vinyals", "paper_run": self.spec["name"]})
            shutil.rmtree(self.dir / "checkpoint")
        print(f"{self.spec['name']}: episode {self.trainer.episode}/{self.spec['episodes']}, "
              f"{self.trainer.seconds:.0f}s of training in all"
              + (", budget spent" if finished else ", checkpointed"), flush=True)
        self.save()
        return finished

    def _record_segment(self, device: torch.device, dtype: torch.dtype | None, began: float, caught: list) -> None:
        self.record["segments"].append({
            "card": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "python": platform.python_version(), "precision": "bf16" if dtype is not None else "fp32",
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "episodes_from": self.start, "episodes_to": self.trainer.episode, "wall_seconds": time.perf_counter() - began,
            "deterministic": device.type != "cuda" or torch.are_deterministic_algorithms_enabled(),
            "nondeterministic_ops": sorted({str(w.message).split(" does not have a deterministic")[0]
                                            for w in caught if "deterministic" in str(w.message)}),
        })

    def _write_curve(self, history: list[dict[str, float]]) -> None:
        seconds = self.record["validation_seconds"]
        rows = [{**row, "seconds": seconds.get(str(int(row["episode"])), "")} for row in history]
        write_csv(self.dir / "curve.csv", rows, CURVE)

    def _seconds_to_published(self) -> dict[str, float | None]:
        """Training seconds until validation (its fixed tasks, of the setting's shape) first reached the published
        test figure: the wall time users compare; None when it never did or the setting is not the validation's."""
        v = self.spec["validation"]
        with (self.dir / "curve.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        out = {}
        for name, (ways, shots) in self.spec["evaluate"]["settings"].items():
            if (ways, shots) == (v["ways"], v["shots"]):
                hit = next((r for r in rows if r["val_accuracy"] and 100 * float(r["val_accuracy"]) >= self.spec["published"][name]), None)
                out[name] = float(hit["seconds"]) if hit and hit["seconds"] else None
        return out

    def evaluate(self, device: torch.device, pools: dict[str, TaskPool], dtype: torch.dtype | None) -> None:
        """The pipeline's protocol (`evaluate@`): each setting's fixed test tasks, their per-task accuracies."""
        from metaflowlib.artifacts import load_meta_knowledge

        method, _ = load_meta_knowledge(self.dir / "omega", device)
        e = self.spec["evaluate"]
        began = time.perf_counter()
        report = evaluate_protocol(method.to(memory_format=torch.channels_last), pools["test"],
                                   {k: tuple(v) for k, v in e["settings"].items()}, episodes=e["tasks"], queries=e["queries"],
                                   seed=e["seed"], batch_tasks=e["batch_tasks"], dtype=method.precision(dtype),
                                   timing_tasks=e["timing_tasks"])
        report |= {"card": device_name(device), "seconds": time.perf_counter() - began, "published": self.spec["published"],
                   "reached_published": {k: 100 * (r["accuracy"] + r["ci95"]) >= self.spec["published"][k]
                                         for k, r in report["settings"].items()},
                   "seconds_to_published_on_validation": self._seconds_to_published()}
        write_json(self.dir / "evaluation.json", report)
        self.record["status"] = "finished"
        self.save()
        shown = "  ".join(f"{k} {100 * r['accuracy']:.2f}±{100 * r['ci95']:.2f} (paper {self.spec['published'][k]})"
                          for k, r in report["settings"].items())
        print(f"{self.spec['name']}: {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, default=ROOT / "bench" / "paper_runs" / "plan.json")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "bench" / "results" / "paper_runs")
    parser.add_argument("--data", help="Omniglot root (default: $METAFLOWLIB_DATA, then ../shared/data)")
    parser.add_argument("--pools", type=Path, help="an npz of the Vinyals splits in the harness's layout instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--allowance-minutes", type=float, default=9.0, help="wall time for this window")
    parser.add_argument("--evaluate-reserve", type=float, default=60.0,
                        help="seconds a finished run's evaluation may take; with less left it waits for the next window")
    parser.add_argument("--segment-episodes", type=int, help="at most this many meta-steps per run in this window")
    parser.add_argument("--only", nargs="+", help="run names of the plan to work on (default: all, in order)")
    args = parser.parse_args()
    until = time.monotonic() + 60 * args.allowance_minutes
    device = resolve_device(args.device)
    deterministic(device)
    dtype = resolve_precision(args.precision, device)
    plan = read_json(args.plan)["runs"]
    unknown = set(args.only or ()) - {spec["name"] for spec in plan}
    if unknown:
        raise SystemExit(f"--only: no run {sorted(unknown)} in {args.plan}")
    pools, data = load_pools(args, device)
    print(f"paper runs on {device_name(device)} ({data}), {args.allowance_minutes:g} minutes", flush=True)
    for spec in plan:
        if args.only and spec["name"] not in args.only:
            continue
        run = PaperRun(spec, args.runs_dir)
        if run.status == "training":
            if time.monotonic() >= until or not run.train_segment(device, pools, dtype, until, args.segment_episodes):
                break
        if run.status == "trained":
            if until - time.monotonic() < args.evaluate_reserve:
                print(f"{spec['name']}: trained; its evaluation waits for the next window", flush=True)
                break
            run.evaluate(device, pools, dtype)
    left = [spec["name"] for spec in plan if PaperRun(spec, args.runs_dir).status != "finished"]
    print(f"left: {', '.join(left) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
