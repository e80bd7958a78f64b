"""Retrained models for the retraining evaluations, cached as files: one per (examples kept, seed).

A file is named by the sha256 of the kept example ids and the seed (``<sha16>-seed<k>.pt``), so the same subset
is never trained twice, whichever evaluation asked for it (LDS subsets, brittleness removals). Each file holds
``{"model": state_dict, "seed": k, "kept": ids}``, written to a temporary name and renamed, so an interrupted job
leaves no half file and a rerun trains only what is missing (resumable).

Parallel: ``workers`` processes (spawned, one torch thread each) share the missing jobs; under ``torchrun`` (or any
launcher that sets ``RANK`` / ``WORLD_SIZE``) rank ``r`` trains the jobs ``j`` with ``j % WORLD_SIZE == r``, the
ranks meet at a barrier (gloo; when ``MASTER_ADDR`` is set), and rank 0 trains whatever is still missing and reports.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from gradstore.logger import Task
from gradstore.logger.task import implements
from gradstore.server.errors import EvaluationError

TaskFactory = Callable[[], Task]


def require(task: Task, method: str, evaluation: str) -> None:
    """Refuse (clearly) an evaluation whose Task lacks the optional method it needs."""
    if not implements(task, method):
        signature = {"train": "train(examples, seed) -> model", "correct": "correct(model, batch) -> bool [B]"}[method]
        raise EvaluationError(
            f"`gradstore evaluate {evaluation}` needs {type(task).__name__}.{signature} "
            f"(see gradstore.logger.Task.{method}); add it to the Task, or use an evaluation without retraining "
            "(tail-patch, recall)" + (", or give --retrain-results computed elsewhere" if evaluation == "lds" else "")
        )


@dataclass(frozen=True)
class Job:
    """Train on the examples at ``positions`` (of the Task's training examples) with ``seed``."""

    positions: np.ndarray
    seed: int


@dataclass
class RetrainStats:
    """What :func:`train_missing` did: files already cached, trained here, seconds spent training."""

    jobs: int = 0
    cached: int = 0
    trained: int = 0
    seconds: float = 0.0
    rank: int = 0
    world: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "cached": self.cached,
            "trained": self.trained,
            "seconds": round(self.seconds, 3),
            "rank": self.rank,
            "world": self.world,
        }


class RetrainCache:
    """Retrained models of one Task under ``directory``; ``ids`` are the training examples' ids, in Task order."""

    def __init__(self, directory: Path, task: Task, ids: np.ndarray):
        self.directory, self.task, self.ids = Path(directory), task, np.asarray(ids, dtype=np.int64)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._examples: Sequence | None = None

    @property
    def examples(self) -> Sequence:
        if self._examples is None:
            self._examples = self.task.train_examples()
        return self._examples

    def path(self, job: Job) -> Path:
        kept = np.sort(self.ids[job.positions]).astype("<i8")
        digest = hashlib.sha256(kept.tobytes()).hexdigest()[:16]
        return self.directory / f"{digest}-seed{job.seed}.pt"

    def has(self, job: Job) -> bool:
        return self.path(job).exists()

    def train(self, job: Job) -> Path:
        """Train the job's model and save it (atomically); returns the file."""
        model = self.task.train([self.examples[int(i)] for i in job.positions], job.seed)
        if not isinstance(model, torch.nn.Module):
            raise EvaluationError(
                f"{type(self.task).__name__}.train must return the trained torch.nn.Module, got {type(model).__name__}"
            )
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = self.path(job)
        kept = torch.as_tensor(np.sort(self.ids[job.positions]))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"model": state, "seed": job.seed, "kept": kept}, tmp)
        os.replace(tmp, path)
        return path

    def load(self, job: Job, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The job's retrained model (``Task.build_model`` + ``Task.load_checkpoint`` of its file), in eval mode."""
        path = self.path(job)
        if not path.exists():
            raise EvaluationError(f"retrained model {path} is missing; run the evaluation again (it resumes)")
        model = self.task.build_model()
        self.task.load_checkpoint(model, path)
        return model.to(device).eval()


def distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` from ``RANK`` / ``WORLD_SIZE`` (torchrun sets them); (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if not 0 <= rank < max(world, 1):
        raise EvaluationError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, max(world, 1)


def _barrier(world: int) -> None:
    """Wait for every rank (when a rendezvous is set up: torchrun's MASTER_ADDR); otherwise rank 0 trains the rest."""
    if world <= 1 or "MASTER_ADDR" not in os.environ or not torch.distributed.is_available():
        return
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()


_WORKER: dict[str, Any] = {}  # the task of a spawned worker process, built once by _init_worker


def _init_worker(factory: TaskFactory, directory: str, ids: np.ndarray) -> None:
    torch.set_num_threads(1)
    _WORKER["cache"] = RetrainCache(Path(directory), factory(), ids)


def _train_in_worker(job: Job) -> str:
    cache = _WORKER["cache"]
    return str(cache.path(job) if cache.has(job) else cache.train(job))


def train_missing(
    cache: RetrainCache,
    jobs: Sequence[Job],
    workers: int = 1,
    task_factory: TaskFactory | None = None,
    progress: bool = False,
    split: bool = True,
) -> RetrainStats:
    """Train every job not cached yet (this rank's share under torchrun; rank 0 then the rest; every rank all of
    them with ``split=False``, for the few models each rank needs at once).

    ``workers > 1`` trains in that many spawned processes, each building its Task with ``task_factory`` (a picklable
    callable, e.g. one that loads the run config); without one, training runs in this process."""
    rank, world = distributed_rank() if split else (0, 1)
    stats = RetrainStats(jobs=len(jobs), rank=rank, world=world)
    unique = list({cache.path(j): j for j in jobs}.values())
    mine = [j for i, j in enumerate(unique) if i % world == rank]
    _run(cache, mine, workers, task_factory, progress, stats)
    _barrier(world)
    if rank == 0 and world > 1:
        _run(cache, unique, workers, task_factory, progress, stats)  # what other ranks left undone
    stats.cached = len(unique) - stats.trained if rank == 0 else len(mine) - stats.trained
    return stats


def _run(
    cache: RetrainCache,
    jobs: Sequence[Job],
    workers: int,
    task_factory: TaskFactory | None,
    progress: bool,
    stats: RetrainStats,
) -> None:
    todo = [j for j in jobs if not cache.has(j)]
    if not todo:
        return
    if workers > 1 and task_factory is None:
        raise EvaluationError("parallel retraining (workers > 1) needs a task factory the worker processes can call")
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="retraining", unit="model", disable=not progress)
    if workers <= 1:
        for job in todo:
            cache.train(job)
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        initargs = (task_factory, str(cache.directory), cache.ids)
        with context.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=initargs) as pool:
            for _ in pool.imap_unordered(_train_in_worker, todo):
                bar.update(1)
    bar.close()
    stats.trained += len(todo)
    stats.seconds += time.perf_counter() - start


def task_from_config(config_path: str, hf_output: str | None = None) -> Task:
    """The Task of a run config (a picklable task factory for worker processes: ``functools.partial`` of this)."""
    from gradstore.server.run.config import RunConfig

    return RunConfig.load(config_path, hf_output=hf_output).make_task()
