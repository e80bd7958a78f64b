"""Serving on Ray Serve (``gradstore serve --ray``, ``[server] engine = "ray"``): the index searched by one Ray Serve
deployment per shard, merged and re-scored exactly in the serving process.

The FastAPI app stays the front door (routes, auth, limits, OpenAPI). Query gradients are computed by one more
deployment, ``gradstore-gradients`` (:class:`GradientWorker`: the run's Task and checkpoint models, on a GPU replica
when the cluster has a GPU; ``[server] ray_gradients``), or, on a cluster without GPUs, by the front door's own
engine as in the local mode (the same code either way: the gradients agree to float32 rounding, a replica's thread
count or a GPU changing their last bits). The index's backend differs: :class:`RayShards` is the loader
:meth:`GradientIndex.open` takes in place of :class:`~gradstore.store.shards.ShardedBackend`, and loads a
:class:`RayShardedBackend`, a ``ShardedBackend`` whose shards are :class:`ShardHandle` s: each shard's
``candidates`` (its own top / bottom ``k``, or a FAISS kind's ``k * rerank``) and ``exact_vectors`` are asked of the
shard's deployment (:class:`ShardSearch`, which loads only that shard's backend, from ``IndexManifest.shard_view``).
The union of candidates is then re-scored by :meth:`GradientIndex.search_prepared`, the very code of the local mode:
for the same query gradients, ids and scores are those of the local engine, bit for bit.

Failures: a shard call that raises or times out is retried once, then answered 503 naming the shard
(:class:`ShardUnavailableError`), never with the other shards' rows alone. Every answer carries the digest of the
shard's manifest view the replica loaded; one other than the serving process's (a replica restarted after the index
was rebuilt) is a 503 too. Serve restarts a dead replica; ``/readyz`` asks every shard (:meth:`RayShardedBackend
.readiness`).

Deployments are named ``gradstore-shard-<s>`` (one Serve application each, no HTTP route): :func:`deploy_shards`
runs them from the serving process, or a KubeRay ``RayService`` declares them (``shard_app``, deploy/k8s/) and
the serving process only attaches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from gradstore.store.errors import RemoteStoreError
from gradstore.store.manifest import IndexManifest
from gradstore.store.remote import fetch_index
from gradstore.store.search import BACKENDS, Candidates
from gradstore.store.shards import ShardedBackend

from .config import RunConfig
from .engine import QueryEngine

__all__ = [
    "APP_PREFIX",
    "GRADIENTS_APP",
    "GradientHandle",
    "GradientWorker",
    "RayShardedBackend",
    "RayShards",
    "ShardHandle",
    "ShardSearch",
    "ShardUnavailableError",
    "deploy_gradients",
    "deploy_shards",
    "shard_app",
    "shard_digest",
    "weights_digest",
]

APP_PREFIX = "gradstore-shard-"
GRADIENTS_APP = "gradstore-gradients"
TIMEOUT_S = 30.0  # a shard call slower than this is retried once, then a 503


class ShardUnavailableError(RemoteStoreError):
    """A Ray Serve deployment of the run (an index shard, or the query-gradient replica) did not answer (after one
    retry) or answered from another build: a 503 naming it."""


def _shards(manifest: IndexManifest) -> list[tuple[int, int]]:
    """``(start, stop)`` of each shard; an unsharded index is one shard of every row."""
    return [(int(e["rows"][0]), int(e["rows"][1])) for e in manifest.shards] or [(0, manifest.num_rows)]


def shard_view(manifest: IndexManifest, shard: int) -> IndexManifest:
    """The manifest shard ``shard`` loads with (searched with ``manifest``'s options)."""
    return replace(manifest.shard_view(shard), options=manifest.options) if manifest.shards else manifest


def shard_digest(manifest: IndexManifest, shard: int) -> str:
    """What identifies the build and search options of one shard: its files' hashes, rows and options."""
    view = shard_view(manifest, shard)
    text = json.dumps(
        {"files": view.files, "rows": list(_shards(manifest)[shard]), "options": asdict(view.options)},
        sort_keys=True,
        default=str,
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _searched_manifest(config: RunConfig) -> tuple[Any, IndexManifest]:
    from .run import Run

    index_path = fetch_index(Run(config).index_path)
    return index_path, IndexManifest.read(index_path).with_search_options(index_path, config.index)


class ShardSearch:
    """One shard's backend in a Ray Serve replica: loaded from the run config's index, ``shard_view(shard)``."""

    def __init__(self, config: str, shard: int, device: str | None = None, build: str | None = None):
        # build: the digest the deploying server expects; an argument so that a rebuilt index redeploys
        run_config = RunConfig.load(config)
        index_path, manifest = _searched_manifest(run_config)
        if not 0 <= shard < len(_shards(manifest)):
            raise ValueError(f"index {index_path} has {len(_shards(manifest))} shard(s), no shard {shard}")
        self.shard, self.rows = shard, list(_shards(manifest)[shard])
        self.digest = shard_digest(manifest, shard)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        entry = manifest.shards[shard] if manifest.shards else {"dir": ""}
        folder = index_path / entry["dir"] if entry["dir"] else index_path
        view = shard_view(manifest, shard)
        self.backend = BACKENDS[manifest.options.kind].load(
            folder, view.options, torch.device(device), manifest=view, label=folder
        )

    def describe(self) -> dict[str, Any]:
        """The shard, its rows and digest, and where this replica runs: its Ray ``node`` id and process ``pid``."""
        import ray

        where = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        return {"shard": self.shard, "rows": self.rows, "digest": self.digest, **where}

    def candidates(self, queries: Any, k: int) -> tuple[str, Candidates]:
        return self.digest, self.backend.candidates(queries, k)

    def exact_vectors(self, rows: np.ndarray) -> tuple[str, np.ndarray | None]:
        return self.digest, self.backend.exact_vectors(rows)


def _app_name(shard: int) -> str:
    return f"{APP_PREFIX}{shard}"


def shard_app(args: dict[str, Any]) -> Any:
    """The Serve application of one shard (an application builder: ``import_path:
    gradstore.server.run.ray_backend:shard_app`` with args ``config``, ``shard``, optional ``num_cpus``,
    ``num_gpus``, ``max_ongoing_requests``, and ``build``: the shard's digest, which only makes Serve replace
    replicas when the index was rebuilt)."""
    from ray import serve

    gpus = float(args.get("num_gpus", 0.0))
    deployment = serve.deployment(ShardSearch).options(  # type: ignore[attr-defined]
        name=f"shard-{int(args['shard'])}",
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1.0)), "num_gpus": gpus},
        max_ongoing_requests=int(args.get("max_ongoing_requests", 8)),
    )
    device = "cuda" if gpus > 0 else "cpu"
    return deployment.bind(str(args["config"]), int(args["shard"]), device, args.get("build"))


def deploy_shards(config: RunConfig) -> list[Any]:
    """Connect to Ray (``RAY_ADDRESS``, else a local one) and return a handle per shard of the run's index: a running
    shard application that serves this build of the index is attached as it is (one a RayService declares, or one an
    earlier server ran); any other is (re)deployed with ``[server] ray_shard_cpus`` / ``ray_shard_gpus`` and the
    build's digest among its arguments, so a rebuilt index gets new replicas. Applications of shards the index no
    longer has are removed."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")  # no Serve HTTP: the FastAPI app is the front door
    _, manifest = _searched_manifest(config)
    n = len(_shards(manifest))
    running = serve.status().applications
    for name in running:
        if name.startswith(APP_PREFIX) and int(name[len(APP_PREFIX) :]) >= n:
            serve.delete(name)
    settings = config.server
    handles = []
    for s in range(n):
        digest = shard_digest(manifest, s)
        if _app_name(s) in running and _serves(serve.get_app_handle(_app_name(s)), digest):
            handles.append(serve.get_app_handle(_app_name(s)))
            continue
        args = {"config": str(config.path), "shard": s, "build": digest}
        args |= {"num_cpus": settings.ray_shard_cpus, "num_gpus": settings.ray_shard_gpus}
        handles.append(serve.run(shard_app(args), name=_app_name(s), route_prefix=None))
    return handles


def _serves(handle: Any, digest: str) -> bool:
    try:
        return handle.describe.remote().result(timeout_s=TIMEOUT_S)["digest"] == digest
    except Exception:  # not running, or not answering: deploy it again
        return False


def _cause(exc: BaseException) -> str:
    line = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {line[-1] if line else ''}"[:300]


class _ReplicaCall:
    """Calls of one Serve application's replicas: each retried once, then :class:`ShardUnavailableError`; every
    answer is ``(digest, value)`` and a digest other than the expected one (a replica of another build) is refused."""

    handle: Any
    digest: str
    timeout_s: float

    def _name(self) -> str:
        raise NotImplementedError

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        last: BaseException | None = None
        for _ in range(2):
            try:
                digest, out = getattr(self.handle, method).remote(*args).result(timeout_s=timeout)
            except Exception as exc:  # a dead replica, a timeout, an error raised in the replica
                last = exc
                continue
            if digest != self.digest:
                raise ShardUnavailableError(
                    f"{self._name()} serves another build of the run than this server loaded (a replica restarted "
                    "after the index or weights changed): restart `gradstore serve --ray` to serve the new one"
                )
            return out
        raise ShardUnavailableError(
            f"{self._name()} did not answer (tried twice, {timeout:g} s each): {_cause(last)}; retry later"  # type: ignore[arg-type]
        )


class ShardHandle(_ReplicaCall):
    """A shard's search, asked of its deployment: each call retried once, then :class:`ShardUnavailableError`."""

    def __init__(self, handle: Any, shard: int, rows: Sequence[int], digest: str, timeout_s: float):
        self.handle, self.shard, self.rows, self.digest, self.timeout_s = handle, shard, list(rows), digest, timeout_s

    def _name(self) -> str:
        return f"index shard {self.shard} (rows {self.rows[0]}..{self.rows[1] - 1}, Serve app {_app_name(self.shard)})"

    def candidates(self, queries: Any, k: int) -> Candidates:
        return self.call("candidates", queries, k)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        return self.call("exact_vectors", np.asarray(rows, dtype=np.int64))

    def status(self, timeout_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {"shard": self.shard, "rows": self.rows}
        try:
            described = self.handle.describe.remote().result(timeout_s=timeout_s)
        except Exception as exc:
            return {**out, "status": "unavailable", "reason": f"{self._name()} did not answer: {_cause(exc)}"}
        if described["digest"] != self.digest:
            return {**out, "status": "unavailable", "reason": f"{self._name()} serves another build of the index"}
        return {**out, "status": "ready"}


class RayShardedBackend(ShardedBackend):
    """:class:`ShardedBackend` over :class:`ShardHandle` s: the same fan-out (a thread per shard) and merge."""

    def readiness(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """One entry per shard: ``status`` ready, or unavailable with a ``reason``."""
        return self._map(lambda shard: shard[2].status(timeout_s))

    def close(self) -> None:
        """The deployments outlive this process's index (a reload reuses them)."""


def weights_digest(engine: QueryEngine) -> str:
    """What identifies the query gradients an engine computes: its checkpoints and their weights files' sha256."""
    text = json.dumps({name: file.sha256 for name, file in engine.weights_files.items()}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class _NoVectors:
    """A backend loader that loads no index vectors: a gradient replica needs the run's checkpoints, not its rows."""

    verified_on_load = staticmethod(lambda manifest: RayShards.verified_on_load(manifest))

    @staticmethod
    def load(directory: Any, options: Any, device: Any, manifest: IndexManifest, label: Any = None) -> Any:
        return _NoSearch()


class _NoSearch:
    def candidates(self, queries: Any, k: int) -> Candidates:
        raise RuntimeError("the query-gradient replica does not search the index")

    def exact_vectors(self, rows: np.ndarray) -> None:
        return None

    def close(self) -> None:
        pass


class GradientWorker:
    """Query gradients in a Ray Serve replica (on a GPU where it was given one): the run's Task and checkpoint
    models, opened as the front door opens them (weights checked against the store), and no index vectors."""

    def __init__(self, config: str, device: str | None = None, build: str | None = None):
        from .run import Run

        # build: the digest the deploying server expects; an argument so that new weights redeploy
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Run(RunConfig.load(config)).open_engine(device=device, loader=_NoVectors)
        self.digest = weights_digest(self.engine)

    def describe(self) -> dict[str, Any]:
        """The build digest, the device gradients are computed on, and the replica's Ray ``node`` id and ``pid``."""
        import ray

        where = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        return {"digest": self.digest, "device": str(self.engine.device), **where}

    def query_gradients(self, examples: Sequence, weights: np.ndarray, measurement: str) -> tuple[str, np.ndarray]:
        return self.digest, self.engine.local_query_gradients(examples, weights, measurement)  # type: ignore[arg-type]


def gradient_app(args: dict[str, Any]) -> Any:
    """The Serve application of the query-gradient replica (args ``config``, optional ``num_cpus``, ``num_gpus``,
    ``build``)."""
    from ray import serve

    gpus = float(args.get("num_gpus", 0.0))
    deployment = serve.deployment(GradientWorker).options(  # type: ignore[attr-defined]
        name="gradients",
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1.0)), "num_gpus": gpus},
    )
    return deployment.bind(str(args["config"]), "cuda" if gpus > 0 else "cpu", args.get("build"))


def deploy_gradients(config: RunConfig, digest: str) -> Any | None:
    """The handle of the query-gradient replica the run's ``[server] ray_gradients`` asks for (attached when one
    serving ``digest`` runs, else deployed: on ``ray_gradient_gpus`` GPUs where the cluster has GPUs), or None:
    gradients are computed in this process (``here``, or ``auto`` on a cluster without a GPU). Call after
    :func:`deploy_shards` (which connects to Ray)."""
    import ray
    from ray import serve

    settings = config.server
    has_gpu = ray.cluster_resources().get("GPU", 0) >= max(settings.ray_gradient_gpus, 1e-9)
    if settings.ray_gradients == "here" or (settings.ray_gradients == "auto" and not has_gpu):
        if GRADIENTS_APP in serve.status().applications:
            serve.delete(GRADIENTS_APP)
        return None
    if GRADIENTS_APP in serve.status().applications and _serves(serve.get_app_handle(GRADIENTS_APP), digest):
        return serve.get_app_handle(GRADIENTS_APP)
    args = {"config": str(config.path), "build": digest, "num_cpus": settings.ray_gradient_cpus}
    args["num_gpus"] = settings.ray_gradient_gpus if has_gpu else 0.0
    return serve.run(gradient_app(args), name=GRADIENTS_APP, route_prefix=None)


class GradientHandle(_ReplicaCall):
    """The front door's :attr:`QueryEngine.gradient_service`: query gradients asked of the gradient replica."""

    def __init__(self, handle: Any, digest: str, timeout_s: float = TIMEOUT_S):
        self.handle, self.digest, self.timeout_s = handle, digest, timeout_s

    def _name(self) -> str:
        return f"the query-gradient replica (Serve app {GRADIENTS_APP})"

    def __call__(self, examples: Sequence, weights: np.ndarray, measurement: str) -> np.ndarray:
        return self.call("query_gradients", list(examples), np.asarray(weights), measurement)

    def status(self, timeout_s: float) -> dict[str, Any]:
        try:
            described = self.handle.describe.remote().result(timeout_s=timeout_s)
        except Exception as exc:
            reason = f"{self._name()} did not answer: {_cause(exc)}"
            return {"app": GRADIENTS_APP, "status": "unavailable", "reason": reason}
        if described["digest"] != self.digest:
            reason = f"{self._name()} serves other checkpoint weights"
            return {"app": GRADIENTS_APP, "status": "unavailable", "reason": reason}
        return {"app": GRADIENTS_APP, "status": "ready", "device": described["device"]}


class RayShards:
    """The backend loader :meth:`GradientIndex.open` takes to search each shard in its Ray Serve deployment."""

    def __init__(self, handles: Sequence[Any], timeout_s: float = TIMEOUT_S):
        self.handles, self.timeout_s = list(handles), timeout_s

    @classmethod
    def deploy(cls, config: RunConfig, timeout_s: float = TIMEOUT_S) -> RayShards:
        return cls(deploy_shards(config), timeout_s)

    @staticmethod
    def verified_on_load(manifest: IndexManifest) -> set[str]:
        """The files the shards' replicas verify as they load them (as the local backends do)."""
        if manifest.shards:
            return ShardedBackend.verified_on_load(manifest)
        return BACKENDS[manifest.options.kind].verified_on_load(manifest)

    def load(
        self, directory: Any, options: Any, device: Any, manifest: IndexManifest, label: Any = None
    ) -> RayShardedBackend:
        ranges = _shards(manifest)
        if len(ranges) != len(self.handles):
            raise ShardUnavailableError(
                f"index {label or directory} has {len(ranges)} shard(s), Ray Serve runs {len(self.handles)}: "
                "restart `gradstore serve --ray` to deploy them"
            )
        shards = [
            (start, stop, ShardHandle(h, s, (start, stop), shard_digest(manifest, s), self.timeout_s))
            for s, ((start, stop), h) in enumerate(zip(ranges, self.handles, strict=True))
        ]
        return RayShardedBackend(shards, workers=len(shards))  # type: ignore[arg-type]
