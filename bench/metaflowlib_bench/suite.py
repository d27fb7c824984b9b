"""The benchmark run: which cases, at which sizes, on this device; ours/peer and ours/minimal-loop ratios; JSON and
a markdown table.

    python -m metaflowlib_bench --out bench/results/cpu            # everything that fits this device
    python -m metaflowlib_bench --out /tmp/b --only maml_training --quick

Every ratio comes from one run (these machines are noisy; absolute times from
different runs are not comparable). On a CPU each case runs in a fresh
subprocess, so its peak RSS is its own; on a GPU the allocator's peak is reset
between cases in one process. Results are rewritten after every case, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from metaflowlib_bench import cases, peers
from metaflowlib.report.render import measured
from metaflowlib.runtime import device_name, resolve_device

Row = dict[str, Any]
SECTIONS = ("maml_gradient_agreement", "protonet_training", "maml_training", "adaptation", "profile", "time_to_accuracy")


def plan(device: torch.device, quick: bool, seconds: dict[str, float], maml_tasks: int = 32) -> list[Row]:
    """The case configurations for this device (smaller step counts on a CPU, tiny ones with --quick)."""
    gpu = device.type == "cuda"
    base = {"device": str(device)}
    scale = (lambda w, s, r: {"warmup": 1, "steps": 1, "repeats": 1}) if quick else (lambda w, s, r: {"warmup": w, "steps": s, "repeats": r})
    configs: list[Row] = []
    minimal = [("minimal", "eager")] + ([("minimal", "compile")] if gpu else [])  # the limit: torch.compile on CUDA only
    for ways, shots, queries in ((5, 1, 15), (60, 5, 5)):
        timing = scale(10, 50, 5) if gpu else (scale(3, 20, 3) if ways == 5 else scale(2, 5, 3))
        for library, variant in [("ours", "fp32"), ("ours", "default"), ("easyfsl", "")] + minimal:
            configs.append({**base, **timing, "case": "protonet_training", "library": library, "variant": variant,
                            "ways": ways, "shots": shots, "queries": queries, "workers": 8 if gpu else 0})
    maml_timing = scale(3, 10, 3) if gpu else scale(1, 2, 3)
    variants = [("ours", "vmap"), ("ours", "chunked"), ("ours", "loop")] if gpu else [("ours", "loop"), ("ours", "vmap")]
    for library, variant in variants + [("higher", ""), ("torchopt", "")] + minimal:
        configs.append({**base, **maml_timing, "case": "maml_training", "library": library, "variant": variant,
                        "ways": 5, "shots": 1, "queries": 15, "tasks": maml_tasks, "inner_steps": 1,
                        "chunk_size": max(1, maml_tasks // 4)})
    for method in ("protonet", "maml"):
        configs.append({**base, **scale(3, 20, 3), "case": "adaptation", "method": method, "ways": 5, "shots": 1, "queries": 15})
        configs.append({**base, "case": "profile", "method": method, "steps": 1 if quick else 5, "tasks": 32 if gpu else 4})
    if seconds.get("protonet"):
        configs.append({**base, "case": "time_to_accuracy", "method": "protonet", "seconds": seconds["protonet"],
                        "train": {"ways": 60, "shots": 1, "queries": 5, "tasks": 4 if gpu else 1},
                        "validation": {"ways": 20, "shots": 1, "queries": 15, "tasks": 200},
                        "val_every": 500 if gpu else 100, "targets": [0.94, 0.96], "halvings": 4,
                        "test_settings": ["5w1s", "5w5s", "20w1s", "20w5s"]})
    if seconds.get("maml"):
        configs.append({**base, "case": "time_to_accuracy", "method": "maml", "seconds": seconds["maml"],
                        "train": {"ways": 5, "shots": 1, "queries": 15, "tasks": 32}, "inner_steps": 1, "inner_lr": 0.4,
                        "inner_steps_eval": 3, "validation": {"ways": 5, "shots": 1, "queries": 15, "tasks": 200},
                        "val_every": 250 if gpu else 20, "targets": [0.95, 0.987], "halvings": 0,
                        "test_settings": ["5w1s", "5w5s"]})
    return configs


def run_isolated(config: Row, pools_path: Path) -> Row:
    """`cases.run_case` in a fresh interpreter: its peak memory and imports are its own."""
    command = [sys.executable, "-m", "metaflowlib_bench", "--worker", json.dumps(config), "--pools", str(pools_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config['case']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _paired(rows: list[Row], others: Callable[[str], bool]) -> list[Row]:
    """ours/other per case, episode shape and variant of each: throughput (higher is better for us), peak memory
    (lower is better)."""
    out = []
    by = {(r["case"], r["episode"], r["library"], r["variant"]): r
          for r in rows if r["case"] in ("protonet_training", "maml_training") and "error" not in r}
    for (case, episode, library, variant), other in by.items():
        if library == "ours" or not others(library):
            continue
        key = "episodes_per_second" if case == "protonet_training" else "tasks_per_second"
        for (c, e, lib, v), mine in by.items():
            if lib != "ours" or c != case or e != episode:
                continue
            out.append({"case": case, "episode": episode, "ours": v, "peer": library, "peer_variant": variant,
                        "speed_ratio": cases.ratio(mine[key], other[key]),
                        "memory_ratio": mine["peak_bytes"] / other["peak_bytes"] if other["peak_bytes"] > 0 else math.nan})
    return out


def ratios(rows: list[Row]) -> list[Row]:
    """ours/peer for each peer library."""
    return _paired(rows, lambda library: library != "minimal")


def limits(rows: list[Row]) -> list[Row]:
    """ours/minimal loop: how far our step is from the limit of this device (the same step with nothing around it)."""
    return _paired(rows, lambda library: library == "minimal")


def markdown(results: Row) -> str:
    """The tables a person reads: throughput and memory per library, ours/peer ratios, latency, time to accuracy."""
    lines = [f"# Benchmarks on {results['device']} (torch {results['torch']}, {results['threads']} CPU threads)", ""]
    rows = results["rows"]
    for case, unit in (("protonet_training", "episodes_per_second"), ("maml_training", "tasks_per_second")):
        chosen = [r for r in rows if r["case"] == case and "error" not in r]
        if not chosen:
            continue
        measure, peaks = measured([f"{r['peak_bytes'] / 2**20:.0f}" for r in chosen], [r["memory_kind"] for r in chosen])
        lines += [f"## {case} ({unit.replace('_', ' ')}, median [min-max]; peak memory over the pre-step state)", "",
                  f"| episode | library | variant | rate | peak MiB, {measure} |", "|---|---|---|---|---|"]
        for r, peak in zip(chosen, peaks):
            rate = r[unit]
            lines.append(f"| {r['episode']} | {r['library']} | {r.get('variant', '')} | {rate['median']:.2f} "
                         f"[{rate['min']:.2f}-{rate['max']:.2f}] | {peak} |")
        lines.append("")
    if results["ratios"]:
        lines += ["## ours / peer (same run)", "", "| case | episode | ours | peer | speed | memory |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['episode']} | {r['ours']} | {r['peer']} | {r['speed_ratio']:.2f}x | {r['memory_ratio']:.2f}x |"
                  for r in results["ratios"]]
        lines.append("")
    if results.get("limits"):
        lines += ["## ours / minimal loop (same run): the distance to the limit", "",
                  "| case | episode | ours | minimal | speed | memory |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['episode']} | {r['ours']} | {r['peer_variant']} | {r['speed_ratio']:.2f}x | {r['memory_ratio']:.2f}x |"
                  for r in results["limits"]]
        lines.append("")
    for r in rows:
        if r["case"] == "adaptation" and "error" not in r:
            lines.append(f"- adaptation, {r['method']} {r['episode']} ({r.get('precision', 'fp32')}): "
                         f"{1e3 * r['adaptation_seconds_per_task']:.2f} ms from one task's raw support images to theta_i, "
                         f"{1e3 * r['adapt_and_predict_seconds_per_task']['median']:.2f} ms to adapt and label its queries; "
                         f"evaluation {r['evaluation_tasks_per_second']['median']:.0f} tasks/s")
        if r["case"] == "protonet_training" and r["library"] in ("ours", "minimal") and "error" not in r:
            lines.append(f"- sampling, {r['library']} {r['variant']} {r['episode']}: {1e3 * r['sampling_seconds']:.3f} ms per episode, "
                         f"{100 * r['sampling_share_of_step']:.1f}% of a meta-step")
        if r["case"] == "protonet_training" and r.get("precision_source") and "error" not in r:
            rates = ", ".join(f"{k} {v:.3g}" for k, v in r["precision_rates"].items())
            lines.append(f"- precision, ours {r['variant']} {r['episode']}: {r['precision']}"
                         f"{' + channels_last' if r['channels_last'] else ''} ({r['precision_source']}{': ' + rates + ' steps/s' if rates else ''})")
        if r["case"] == "time_to_accuracy" and "error" not in r:
            test = ", ".join(f"{k[4:]} {100 * v['accuracy']:.2f} ± {100 * v['ci95']:.2f}" for k, v in r["test"].items())
            lines.append(f"- time to accuracy, {r['method']} trained {r['train_episode']} x{r['tasks_per_step']} for "
                         f"{r['training_seconds']:.0f} s ({r['meta_steps']} meta-steps): test {test}; validation "
                         f"{r['validation']['ways']}w{r['validation']['shots']}s reached {r['seconds_to_val_target']} s")
        if r["case"] == "maml_gradient_agreement":
            diffs = {k: v for k, v in r.items() if k.endswith("relative_difference")}
            lines.append(f"- float64 MAML meta-gradient, relative difference to ours-loop: {diffs}")
    if results["notes"]:
        lines += ["", "## Workarounds applied to the peers", ""] + [f"- {n}" for n in results["notes"]]
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "## Failed cases", ""] + [f"- {r['case']} {r.get('library', '')}: {r['error'].splitlines()[-1]}" for r in failed]
    return "\n".join(lines) + "\n"


def write(results: Row, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2) + "\n"), ("summary.md", markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    for r in results["rows"]:
        if r["case"] == "profile" and "table" in r:
            (out / f"profile_{r['method']}_{r['device']}.txt").write_text(r["table"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metaflowlib_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="results folder (results.json, summary.md, profile_*.txt)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", help="data root holding omniglot/ (default: $METAFLOWLIB_DATA, ../shared/data)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these cases")
    parser.add_argument("--quick", action="store_true", help="one step per measurement: checks that every case runs")
    parser.add_argument("--protonet-seconds", type=float, help="time-to-accuracy budget (default 60 on a GPU, off on a CPU)")
    parser.add_argument("--maml-seconds", type=float, help="time-to-accuracy budget (default 100 on a GPU, off on a CPU)")
    parser.add_argument("--maml-tasks", type=int, default=32, help="meta-batch of the MAML throughput cases (default 32)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto", help="auto: subprocess per case on a CPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--pools", help="a prepared pools .npz (cases.write_pools) instead of --data")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(cases.run_case(json.loads(args.worker), args.pools)))
        return
    if args.out is None:
        parser.error("--out is required")
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    seconds = {"protonet": args.protonet_seconds if args.protonet_seconds is not None else (60.0 if gpu else 0.0),
               "maml": args.maml_seconds if args.maml_seconds is not None else (100.0 if gpu else 0.0)}
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not gpu)
    started = time.perf_counter()
    pools_path = Path(args.pools) if args.pools else cases.pools_file(args.data)
    results: Row = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "isolated_processes": isolate,
        "command": " ".join(sys.argv), "rows": [], "ratios": [], "limits": [], "notes": [],
    }
    wanted = set(args.only or SECTIONS)
    configs = [c for c in plan(device, args.quick, seconds, args.maml_tasks) if c["case"] in wanted]
    if "maml_gradient_agreement" in wanted:
        row = cases.maml_gradient_agreement()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if isolate:  # each worker then reads the precision choice instead of timing it (its peak memory stays its own)
        cases.choose_ahead(configs, pools_path)
    for i, config in enumerate(configs, 1):
        label = f"[{i}/{len(configs)}] {config['case']} {config.get('library', config.get('method', ''))} {config.get('variant', '')}"
        print(f"{label} ({time.perf_counter() - started:.0f} s)", flush=True)
        try:
            row = run_isolated(config, pools_path) if isolate else cases.run_case(config, pools_path)
        except Exception as error:  # noqa: BLE001 - one failed case is reported in its row; the others still run
            detail = "".join(traceback.format_exception(error)[-3:]) if not isinstance(error, peers.PeerUnavailable) else str(error)
            row = {"case": config["case"], "library": config.get("library", "ours"), "variant": config.get("variant", ""),
                   "episode": cases.episode_name(config["ways"], config["shots"], config["queries"]) if "ways" in config else None,
                   "error": detail}
            print(f"{label} failed: {detail}", flush=True)
        if gpu:
            torch.cuda.empty_cache()
        results["rows"].append(row)
        results["notes"] = sorted(set(results["notes"]) | set(row.get("notes", [])))
        results["ratios"], results["limits"] = ratios(results["rows"]), limits(results["rows"])
        results["seconds"] = time.perf_counter() - started
        write(results, args.out)
        print(json.dumps({k: v for k, v in row.items() if k not in ("table", "curve")}), flush=True)
    print(markdown(results))
