"""Data-parallel meta-training: 2 real processes (gloo, CPU) against one process on the union of their tasks.

Exact (float64): MAML, FOMAML, Reptile, iMAML, and ProtoNet whose BatchNorm uses running
statistics: no forward mixes tasks, every meta-loss is a mean over tasks, so the mean of the
ranks' gradients is the gradient of the global meta-batch. ProtoNet in training mode embeds
all tasks of a rank in one forward, so its BatchNorm statistics span T/W tasks instead of T: it
equals one process accumulating the ranks' shares, not one process on the union.

Run as a script under torchrun, this file is the worker of the training-loop test.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from conftest import ROOT, class_images, load_stage

import metaflowlib.distributed as distributed_module
from metaflowlib.distributed import (
    init_from_env,
    launched,
    shard_tasks,
    shutdown,
    torchrun_command,
)
from metaflowlib.episodes import Episode, EpisodeSampler, TaskPool
from metaflowlib.errors import ConfigError
from metaflowlib.methods import MetaLearner, build_method

WORLD = 2
SEED = 3


@dataclass(frozen=True)
class Case:
    kind: str
    config: dict = field(default_factory=dict)
    training: bool = True  # False: BatchNorm normalizes with running statistics, per example
    rtol: float = 1e-10  # ProtoNet's adapt/predict run in fp32 even on a float64 embedding


CASES = {
    "maml": Case("maml", {"ways": 3, "hidden": 8, "inner_steps": 2, "vectorize": "loop"}),
    "fomaml": Case("fomaml", {"ways": 3, "hidden": 8, "vectorize": "loop"}),
    "reptile": Case("reptile", {"ways": 3, "hidden": 8, "inner_steps": 2, "vectorize": "loop"}),
    "imaml": Case("imaml", {"ways": 3, "hidden": 8, "inner_steps": 2, "cg_steps": 2, "vectorize": "loop"}),
    "protonet_running_stats": Case("protonet", {"hidden": 8}, training=False, rtol=1e-5),
    "protonet": Case("protonet", {"hidden": 8}, rtol=1e-5),
}
SHAPE = {"ways": 3, "shots": 1, "queries": 2, "tasks": 2}  # per rank: the global meta-batch is 4 tasks


def tiny_pool(dtype: torch.dtype = torch.float32) -> TaskPool:
    from metaflowlib.data.preprocess import to_model_input

    images, labels = class_images(12, 10)
    return TaskPool(to_model_input(images, 28).to(dtype), torch.from_numpy(labels), name="tiny")


def rank_episode(rank: int) -> Episode:
    """Rank r's share of the meta-batch, from its own seed stream (seed + rank)."""
    return next(EpisodeSampler(tiny_pool(torch.float64), seed=SEED + rank, **SHAPE))


def union(episodes: list[Episode]) -> Episode:
    """The global meta-batch: every rank's tasks in one episode."""
    fields = ("support_x", "support_y", "query_x", "query_y")
    return Episode(*(torch.cat([getattr(e, name) for e in episodes]) for name in fields), ways=episodes[0].ways)


def build(case: Case) -> MetaLearner:
    torch.manual_seed(0)
    return build_method(case.kind, **case.config).double().train(case.training)


def step(case: Case, episode: Episode) -> tuple[MetaLearner, dict[str, torch.Tensor], float]:
    """One process's meta-gradient (and the method, whose buffers the forward moved)."""
    method = build(case)
    stats = method.meta_gradient(episode)
    return method, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}, stats.loss


def gradient_worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    group = init_from_env(torch.device("cpu"))
    results = {}
    for name, case in CASES.items():
        method = build(case)
        stats = method.meta_gradient(rank_episode(rank))
        loss, _ = group.average_gradients(method, (stats.loss, stats.accuracy))
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        results[name] = {"grads": grads, "loss": loss, "buffers": {n: b.clone() for n, b in method.named_buffers()}}
    torch.save(results, out / f"rank{rank}.pt")
    shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gradients")
    mp.spawn(gradient_worker, args=(free_port(), out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_grads_close(actual: dict, expected: dict, rtol: float) -> None:
    """Close relative to the largest gradient entry: a conv bias before BatchNorm has a zero gradient up to rounding."""
    assert actual.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=rtol * scale, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", [n for n in CASES if n != "protonet"])
def test_two_ranks_give_the_gradient_of_the_global_meta_batch(ranks, name, one_thread):
    case = CASES[name]
    _, expected, loss = step(case, union([rank_episode(r) for r in range(WORLD)]))
    for result in ranks:
        assert_grads_close(result[name]["grads"], expected, case.rtol)
        assert result[name]["loss"] == pytest.approx(loss, rel=case.rtol)
    for grad_name, grad in ranks[0][name]["grads"].items():  # one all_reduce: the same bits everywhere
        assert torch.equal(grad, ranks[1][name]["grads"][grad_name]), grad_name


def test_protonet_in_training_mode_equals_accumulating_the_ranks_shares(ranks, one_thread):
    """BatchNorm's batch statistics span one rank's tasks: exact against gradient accumulation over
    the shares, not against one forward over the union (whose statistics span all tasks)."""
    case = CASES["protonet"]
    shares = [step(case, rank_episode(r)) for r in range(WORLD)]
    accumulated = {n: sum(grads[n] for _, grads, _ in shares) / WORLD for n in shares[0][1]}
    for result in ranks:
        assert_grads_close(result["protonet"]["grads"], accumulated, case.rtol)
    _, on_union, _ = step(case, union([rank_episode(r) for r in range(WORLD)]))
    gap = max(float((ranks[0]["protonet"]["grads"][n] - on_union[n]).abs().max() / on_union[n].abs().max()) for n in on_union)
    assert gap > 1e-3, "per-rank BatchNorm statistics should differ from the union's"
    running_mean = "embedding.blocks.1.running_mean"  # averaged over ranks: the mean of the shares' updates
    expected = sum(dict(method.named_buffers())[running_mean] for method, _, _ in shares) / WORLD
    for result in ranks:
        torch.testing.assert_close(result["protonet"]["buffers"][running_mean], expected, rtol=1e-12, atol=1e-14)


def test_tasks_per_step_must_divide_by_the_processes():
    assert shard_tasks(32, 4) == 8
    with pytest.raises(ConfigError, match=r"methods\.maml\.tasks_per_step = 6 .* divide by the 4 training processes"):
        shard_tasks(6, 4, "methods.maml.tasks_per_step")


def test_outside_torchrun_there_is_no_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not launched() and init_from_env(torch.device("cpu")) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() and init_from_env(torch.device("cpu")) is None  # one process: the single-process loop


def launcher_params(tasks_per_step: int, kind: str = "torchrun"):
    from metaflowlib.config import parse_params

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["train"]["launcher"] = {"kind": kind, "nproc_per_node": 2}
    data["methods"]["maml"]["tasks_per_step"] = tasks_per_step
    return parse_params(data)


def test_shipped_params_train_in_one_process():
    from metaflowlib.config import load_params

    assert load_params(ROOT / "params.yaml").train.launcher.kind == "none"
    with pytest.raises(ConfigError, match="train.launcher.kind"):
        launcher_params(32, kind="mpi")


def test_train_stage_reexecutes_itself_under_torchrun(monkeypatch):
    stage = load_stage("train")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def execv(path: str, argv: list[str]) -> None:
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(distributed_module.os, "execv", execv)  # distributed.relaunch becomes torchrun
    monkeypatch.setattr(stage, "method_key", lambda: "maml")
    monkeypatch.setattr(stage, "params", lambda: launcher_params(3))
    with pytest.raises(ConfigError, match=r"methods\.maml\.tasks_per_step = 3"):
        stage.main()
    assert calls == []
    monkeypatch.setattr(stage, "params", lambda: launcher_params(32))
    with pytest.raises(SystemExit):
        stage.main()
    assert calls == [torchrun_command(ROOT / "pipelines" / "train.py", ["maml"], 2)]
    assert calls[0][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


class SignalAfter:
    """A sampler that sends this process SIGTERM after `draws` task batches (a signal on one rank only)."""

    def __init__(self, sampler: EpisodeSampler, draws: int) -> None:
        self.sampler, self.draws = sampler, draws

    def __next__(self) -> Episode:
        self.draws -= 1
        if self.draws == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.sampler)

    def state(self) -> torch.Tensor:
        return self.sampler.state()

    def load_state(self, state: torch.Tensor) -> None:
        self.sampler.load_state(state)


def loop_worker(out: Path) -> None:
    """Under torchrun: a straight run, a run that rank 1 alone is signalled to stop, and its resumption."""
    import metaflowlib.loop
    import metaflowlib.train as loop
    from metaflowlib.errors import Interrupted
    from metaflowlib.methods import ProtoNet

    torch.set_num_threads(1)
    group = init_from_env(torch.device("cpu"))
    calls = {"save": 0, "validate": 0, "log": 0}
    save = metaflowlib.loop.save_checkpoint

    def counted_save(state: dict, directory: Path) -> None:
        calls["save"] += 1
        save(state, directory)

    metaflowlib.loop.save_checkpoint = counted_save

    def validate(method: MetaLearner) -> float:
        calls["validate"] += 1
        return float(-sum(p.detach().abs().sum() for p in method.parameters()))

    def trainer(directory: Path, init_seed: int, stop_after: int | None = None) -> loop.MetaTrainer:
        torch.manual_seed(init_seed + group.rank)  # ranks start apart: rank 0's omega must reach every rank
        method = ProtoNet(hidden=8)
        optimizer, scheduler = loop.build_meta_optimizer(method, "adam", 1e-2, 3, 0.5)
        sampler = EpisodeSampler(tiny_pool(), 5, 1, 2, tasks=group.shard(4), seed=group.rank)
        if stop_after is not None and group.rank == 1:
            sampler = SignalAfter(sampler, stop_after)
        return loop.MetaTrainer(method, sampler, optimizer, scheduler, validate=validate, val_every=2, max_episodes=6,
                                max_seconds=None, checkpoint_dir=directory, checkpoint_every=2, log_every=1,
                                log=lambda metrics, step: calls.__setitem__("log", calls["log"] + 1), progress="off",
                                distributed=group)

    straight = trainer(out / "straight", 0)
    straight.run()
    try:
        trainer(out / "resumed", 0, stop_after=3).run()
        interrupted = ""
    except Interrupted as error:
        interrupted = str(error)
    resumed = trainer(out / "resumed", 100)
    resumed.run()
    torch.save({"omega": straight.method.state_dict(), "history": straight.history, "calls": calls,
                "interrupted": interrupted, "resumed_omega": copy.deepcopy(resumed.method.state_dict()),
                "resumed_history": resumed.history}, out / f"rank{group.rank}.pt")
    shutdown()


def test_torchrun_training_keeps_one_omega_and_one_writer(tmp_path, one_thread):
    from metaflowlib.artifacts import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(torchrun_command(Path(__file__), [str(tmp_path)], WORLD), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for name, value in r0["omega"].items():
        assert torch.equal(value, r1["omega"][name]), name
        assert torch.equal(value, r0["resumed_omega"][name]) and torch.equal(value, r1["resumed_omega"][name]), name
    assert r0["history"] == r1["history"] == r0["resumed_history"] and len(r0["history"]) == 6
    assert r0["interrupted"] == r1["interrupted"] and "interrupted at episode 3 by SIGTERM" in r0["interrupted"]
    assert r0["calls"]["save"] > 0 and r0["calls"]["validate"] > 0 and r0["calls"]["log"] > 0
    assert r1["calls"] == {"save": 0, "validate": 0, "log": 0}
    checkpoint = load_checkpoint(tmp_path / "straight")
    sampler = checkpoint["state"]["sampler"]
    assert checkpoint["processes"] == WORLD and checkpoint["step"] == 6
    assert sampler.shape[0] == WORLD and not torch.equal(sampler[0], sampler[1])


if __name__ == "__main__":
    loop_worker(Path(sys.argv[1]))
