"""A run: its config and everything opened from it.

:class:`Run` owns the run's paths (store, eval store, index), the rule for when the eval store is used, and the
construction of what serves it (index, :class:`~gradstore.server.run.engine.QueryEngine`); the CLI, the HTTP
service, the evaluations and the demos all open a run through it::

    run = Run.load("run.toml")
    run.index()                      # the offline job: log what the store lacks, build or update the index
    engine = run.open_engine()       # Task, store, index and checkpoint models, ready to answer queries
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch

from gradstore.projection import GradstoreError, kind_traits
from gradstore.store import GradientIndex, GradientStore, IndexMismatchError, StoreNotFoundError, UpdateSummary
from gradstore.store.blas import one_blas_thread
from gradstore.store.index import default_index_path
from gradstore.store.remote import StorePath, as_path

from .checks import check_config, run_problems
from .config import RunConfig
from .engine import QueryEngine, run_info
from .index_job import index_job
from .schemas import RunInfo

__all__ = ["Run", "describe_run", "index_run", "open_engine", "open_index"]


@dataclass(frozen=True)
class Run:
    """A run config and what it opens (paths, stores, index, query engine)."""

    config: RunConfig

    @classmethod
    def load(cls, path: str | Path, hf_output: str | Path | None = None) -> Run:
        """The run described by a ``run.toml`` (:meth:`RunConfig.load`)."""
        return cls(RunConfig.load(path, hf_output=hf_output))

    @property
    def store_path(self) -> StorePath:
        return self.config.store.path

    @property
    def eval_store_path(self) -> Path:
        """``[store] eval_path``, else ``<store stem>.eval.zarr`` beside the store."""
        store = self.config.store.path
        return self.config.store.eval_path or store.with_name(store.stem + ".eval" + (store.suffix or ".zarr"))

    @property
    def index_path(self) -> StorePath:
        """``[index] path``, else the index folder beside the store."""
        given = self.config.index_path
        return as_path(given) if given is not None else default_index_path(self.store_path)

    def wants_eval_store(self, preconditioner: str | None = None) -> bool:
        """The eval-store rule: an index with this preconditioner (default: the config's) mixes the eval store's
        statistics into its curvature (TrackStar's lambda: kfac, block, ekfac), so the index job logs the Task's
        ``eval_examples`` into it and the index reads it when it is on disk."""
        return kind_traits(preconditioner or self.config.index.preconditioner).eval_mix

    @property
    def query_device(self) -> str:
        """Where query gradients are computed: ``[query] device``, else cuda when available, else cpu."""
        return str(torch.device(self.config.query.device or ("cuda" if torch.cuda.is_available() else "cpu")))

    def open_store(self) -> GradientStore:
        return GradientStore.open(self.store_path)

    def open_eval_store(self, preconditioner: str | None = None) -> GradientStore | None:
        """The eval store for an index with this preconditioner (default: the config's), when the rule
        (:meth:`wants_eval_store`) wants one and it is on disk; else None."""
        wanted = self.wants_eval_store(preconditioner) and (self.eval_store_path / "zarr.json").exists()
        return GradientStore.open(self.eval_store_path) if wanted else None

    @overload
    def index(
        self, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, load: Literal[True] = True
    ) -> GradientIndex | None: ...
    @overload
    def index(
        self, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, *, load: Literal[False]
    ) -> UpdateSummary | None: ...
    def index(
        self, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False, load: bool = True
    ) -> GradientIndex | UpdateSummary | None:
        """The offline indexing job (:func:`~gradstore.server.run.index_job.index_job`): log every training example
        at every checkpoint the store lacks, then update the index (or build it when there is none, or ``rebuild``).
        Returns the index on rank 0 (its ``changes`` say what was logged and done), None on other ranks; with
        ``load=False`` only what was done (:class:`~gradstore.store.UpdateSummary`), the index not loaded."""
        return index_job(self, progress=progress, wait_s=wait_s, rebuild=rebuild, load=load)

    def open_index(
        self, store: GradientStore | None = None, device: str | None = None, loader: Any = None
    ) -> GradientIndex:
        """The run's index, checked against its store and the config's index options and checkpoints (``loader``:
        :meth:`GradientIndex.open`'s, e.g. the Ray Serve shards of ``ray_backend.py``)."""
        store = store or self.open_store()
        check_config(self.config, store)
        index = GradientIndex.open(
            self.config.index_path,
            store,
            options=self.config.index,
            eval_store=self.open_eval_store(),
            device=device,
            loader=loader,
        )
        configured = [c.name for c in self.config.checkpoints]
        if index.checkpoints != configured:
            raise IndexMismatchError(
                f"index {index.path} covers checkpoints {index.checkpoints}, the config lists {configured}; "
                "run `gradstore index --config ...` to rebuild it"
            )
        return index

    def open_engine(self, device: str | None = None, loader: Any = None) -> QueryEngine:
        """Task, store, index and checkpoint models of the run, ready to answer queries (``loader``: see
        :meth:`open_index`)."""
        store = self.open_store()
        device = device or self.config.query.device
        return QueryEngine(
            self.config.make_task(),
            store,
            self.open_index(store, device=device, loader=loader),
            {c.name: c.path for c in self.config.checkpoints},
            residency=self.config.query.residency,
            device=device,
            batch_size=self.config.query.batch_size,
        )

    def open_serving_engine(self) -> QueryEngine:
        """The engine as ``gradstore serve`` runs it (also when the server reloads the run): with
        ``[server] engine = "ray"`` the index is searched by one Ray Serve deployment per shard (deployed, or reused
        when already serving this build: :class:`~gradstore.server.run.ray_backend.RayShards`) and query gradients
        are computed by a replica where ``[server] ray_gradients`` asks for one (a GPU one when the cluster has a
        GPU); else all in process."""
        if self.config.server.engine != "ray":
            return self.open_engine()
        from .ray_backend import GradientHandle, RayShards, deploy_gradients, weights_digest

        engine = self.open_engine(loader=RayShards.deploy(self.config))
        digest = weights_digest(engine)
        handle = deploy_gradients(self.config, digest)
        if handle is not None:
            engine.gradient_service = GradientHandle(handle, digest)
        return engine

    def describe(self) -> RunInfo:
        """The run's :class:`RunInfo`, as ``GET /v1/run`` serves it, also when the store is missing or the index is
        unusable (``store_status`` or ``index.reason`` then says why); opens no models. A damaged store raises."""
        try:
            store = self.open_store()
        except StoreNotFoundError as exc:  # a damaged store is an error, not a status
            return RunInfo(store=str(self.store_path), store_status=str(exc))
        try:
            index, error = self.open_index(store, device="cpu"), None
        except GradstoreError as exc:
            index, error = None, exc
        return run_info(
            store, index, index_error=error, residency=self.config.query.residency, device=self.query_device
        )

    def verify(self) -> list[str]:
        """One line per damaged or unusable part of the run (:func:`~gradstore.server.run.checks.run_problems`):
        its stores' chunks and records, weights files, config, and index files; empty when all is intact."""
        return run_problems(self)

    def serving_threads(self) -> int:
        """Torch intra-op threads for a process that serves queries: 1 when they run on CPU, unless
        ``OMP_NUM_THREADS`` says otherwise. Returns the setting now in force (it is process-wide).

        A query's work is many small ops (a few examples' gradients, one scan of the index); an OpenMP team per
        op buys nothing there, and its threads spin after every op, competing for the cores with the event
        loop and with the other requests being served (each worker thread would start its own team).
        """
        if torch.device(self.query_device).type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(1)
            one_blas_thread()  # numpy's BLAS (the CPU scan's products) likewise
        return torch.get_num_threads()


# Shortcuts over a config, for scripts that hold a RunConfig rather than a Run.


def index_run(
    config: RunConfig, progress: bool = True, wait_s: float = 0.0, rebuild: bool = False
) -> GradientIndex | None:
    """``Run(config).index(...)``."""
    return Run(config).index(progress=progress, wait_s=wait_s, rebuild=rebuild)


def open_index(config: RunConfig, store: GradientStore | None = None, device: str | None = None) -> GradientIndex:
    """``Run(config).open_index(...)``."""
    return Run(config).open_index(store, device=device)


def open_engine(config: RunConfig, device: str | None = None) -> QueryEngine:
    """``Run(config).open_engine(...)``."""
    return Run(config).open_engine(device=device)


def describe_run(config: RunConfig) -> RunInfo:
    """``Run(config).describe()``."""
    return Run(config).describe()
