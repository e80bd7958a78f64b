"""The TOML run config: task, projection, store, checkpoints, index, query and server settings.

Relative paths are resolved against the config file's directory, and that directory is put on
``sys.path`` so ``[task] object = "mytask:MyTask"`` finds a module next to the config.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradstore.logger import Task
from gradstore.projection import GradstoreError
from gradstore.store import IndexOptions


class ConfigError(GradstoreError, ValueError):
    """The run config is missing, malformed, or names something that does not exist."""


@dataclass(frozen=True)
class CheckpointConfig:
    name: str
    path: Path
    lr: float
    step: int | None = None
    optimizer: Path | None = None  # Adam state: enables TrackStar's second-moment correction
    adam_step: int | None = None
    adam_eps: float = 1e-8


@dataclass(frozen=True)
class ProjectionConfig:
    rank: int | tuple[int, int] = 8
    init: str = "gaussian"
    seed: int = 0
    layers: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    dtype: str = "float16"
    chunk_rows: int = 1024
    eval_path: Path | None = None  # store of eval-set gradients (R_eval), written when the Task has eval_examples


@dataclass(frozen=True)
class QueryConfig:
    residency: str = "all"  # all | one
    device: str | None = None  # default: cuda when available
    batch_size: int = 32


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also GRADSTORE_API_KEY
    cors_origins: tuple[str, ...] = ()
    max_top_k: int = 100
    max_queries: int = 64
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class RunConfig:
    path: Path
    task_object: str
    task_args: dict[str, Any]
    projection: ProjectionConfig
    store: StoreConfig
    checkpoints: tuple[CheckpointConfig, ...]
    index: IndexOptions
    index_path: Path | None = None
    batch_size: int = 64
    query: QueryConfig = field(default_factory=QueryConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path).resolve()
        if not path.exists():
            raise ConfigError(f"run config {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path) -> "RunConfig":
        base = path.parent

        def resolve(p: str | None) -> Path | None:
            return None if p is None else (base / p).resolve()

        def section(name: str, required: bool = False) -> dict:
            value = data.get(name, {} if not required else None)
            if value is None:
                raise ConfigError(f"{path}: missing [{name}] section")
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{name}] must be a table")
            return value

        def build(kind, name: str, values: dict, **converted):
            known = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(f"{path}: unknown keys {sorted(unknown)} in [{name}]; allowed: {sorted(known)}")
            try:
                return kind(**{**values, **converted})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: [{name}]: {exc}") from exc

        task = section("task", required=True)
        if "object" not in task:
            raise ConfigError(f'{path}: [task] needs object = "package.module:TaskClass"')
        projection = dict(section("projection"))
        if isinstance(projection.get("rank"), list):
            projection["rank"] = tuple(projection["rank"])
        if "layers" in projection:
            projection["layers"] = tuple(projection["layers"])
        store = dict(section("store", required=True))
        if "path" not in store:
            raise ConfigError(f"{path}: [store] needs path = ...")
        store_cfg = build(
            StoreConfig, "store", store, path=resolve(store["path"]), eval_path=resolve(store.get("eval_path"))
        )
        raw_checkpoints = data.get("checkpoints")
        if not raw_checkpoints or not isinstance(raw_checkpoints, list):
            raise ConfigError(f"{path}: needs at least one [[checkpoints]] entry with name, path and lr")
        checkpoints = []
        for i, entry in enumerate(raw_checkpoints):
            missing = {"name", "path", "lr"} - set(entry)
            if missing:
                raise ConfigError(f"{path}: [[checkpoints]] entry {i} is missing {sorted(missing)}")
            checkpoints.append(
                build(CheckpointConfig, f"checkpoints {i}", entry, path=resolve(entry["path"]), optimizer=resolve(entry.get("optimizer")))
            )
        names = [c.name for c in checkpoints]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: checkpoint names must be unique, got {names}")
        index = dict(section("index"))
        index_path = resolve(index.pop("path", None))
        server = dict(section("server"))
        if "cors_origins" in server:
            server["cors_origins"] = tuple(server["cors_origins"])
        return cls(
            path=path,
            task_object=str(task["object"]),
            task_args=dict(task.get("args", {})),
            projection=build(ProjectionConfig, "projection", projection),
            store=store_cfg,
            checkpoints=tuple(checkpoints),
            index=build(IndexOptions, "index", index),
            index_path=index_path,
            batch_size=int(data.get("logging", {}).get("batch_size", 64)),
            query=build(QueryConfig, "query", section("query")),
            server=build(ServerConfig, "server", server),
        )

    def make_task(self) -> Task:
        """Import ``[task] object`` and call it with ``[task] args``."""
        module_name, _, attr = self.task_object.partition(":")
        if not module_name or not attr:
            raise ConfigError(f'[task] object must look like "package.module:TaskClass", got {self.task_object!r}')
        if str(self.path.parent) not in sys.path:
            sys.path.insert(0, str(self.path.parent))
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"cannot import task {self.task_object!r}: {exc}") from exc
        task = factory(**self.task_args)
        if not isinstance(task, Task):
            raise ConfigError(f"{self.task_object} returned {type(task).__name__}, not a gradstore.logger.Task")
        return task
