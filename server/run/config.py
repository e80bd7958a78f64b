"""The TOML run config (``run.toml``): task, projection, store, checkpoints, index, query, server and logging.

Every table is a pydantic model that refuses unknown keys; a bad value is a :class:`ConfigError` whose
message names it as ``section.field`` (``checkpoints[1].lr: Input should be a valid number, got 'fast'``).
Relative paths are resolved against the config file's folder, and that folder is put on ``sys.path`` so
``[task] object = "mytask:MyTask"`` finds a module next to the config; ``[task] args`` that the Task class lists
in ``config_paths`` (as :class:`~gradstore.logger.hf_task.CausalLMTask` does) are resolved the same way.
Without ``[store]`` the store is ``<config stem>.zarr`` beside the config. ``[index]`` takes the fields of
:class:`~gradstore.store.IndexOptions` (validated by it) plus ``path``. ``[server]`` is
:class:`ServerConfig`, a pydantic-settings model: what ``run.toml`` sets wins, and ``GRADSTORE_<FIELD>``
environment variables (``GRADSTORE_API_KEY``, ``GRADSTORE_PORT``, ...) fill in what it leaves out.

Hugging Face Trainer output: a ``[[checkpoints]] path`` that is a folder (``out/checkpoint-500``) is read as a
Trainer checkpoint: the weights file in it becomes ``path``, and ``name`` (the folder's name), ``step`` and ``lr``
(from ``trainer_state.json``) and ``optimizer`` (its ``optimizer.pt``) default to what the folder says; values
given in the config win, and ``optimizer = false`` leaves the Adam correction off. ``[hf] output = "out/"`` (or
``gradstore <command> --hf-output out/``) lists every ``checkpoint-<step>`` folder of a Trainer run, by step,
instead of ``[[checkpoints]]``. A checkpoint's lr is its TracIn weight: the mean learning rate logged over the
interval of steps that ends at it (see :class:`~gradstore.logger.hf_task.TrainerCheckpoint`).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gradstore.logger import Task
from gradstore.logger.hf_task import HFTaskError, trainer_checkpoint, trainer_checkpoints
from gradstore.projection import Init
from gradstore.store import IndexOptions, StoreDtype
from gradstore.store.remote import RemotePath, StorePath, as_path, is_url

from ..errors import ConfigError, config_field_errors
from .schemas import Residency

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "HFConfig",
    "LoggingConfig",
    "ProjectionConfig",
    "QueryConfig",
    "RunConfig",
    "ServerConfig",
    "StoreConfig",
    "TaskConfig",
]


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base")
    return ((Path(base) / path) if base is not None else path).resolve()


ConfigPath = Annotated[Path, AfterValidator(_resolve)]  # relative to the config's folder


def _resolve_location(value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> StorePath:
    if isinstance(value, (str, RemotePath)) and is_url(value):
        return as_path(value)  # a URL (s3://...) passes unchanged, as a RemotePath
    return _resolve(handler(value), info)


# a ConfigPath, or a store/index URL
LocationPath = Annotated[Path, WrapValidator(_resolve_location), PlainSerializer(str, when_used="json-unless-none")]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Table):
    """``[task]``: the user's Task."""

    object: str = Field(description='the Task class or factory, as "package.module:attribute"')
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments the Task is called with")

    @field_validator("object")
    @classmethod
    def _module_colon_attribute(cls, value: str) -> str:
        module, _, attr = value.partition(":")
        if not module or not attr:
            raise ValueError(f'must look like "package.module:TaskClass", got {value!r}')
        return value


class ProjectionConfig(_Table):
    """``[projection]``: how per-example gradients are projected (fixed once a store is written)."""

    rank: int | tuple[int, int] = Field(default=8, description="(k_in, k_out) per layer, or one int for both")
    init: Init = Field(default="gaussian", description="how the projection matrices are drawn")
    seed: int = Field(default=0, description="projection seed: the same seed and layers give the same projection")
    layers: tuple[str, ...] = Field(default=("*",), description="glob patterns on module names, e.g. blocks.*.mlp.*")


class StoreConfig(_Table):
    """``[store]``: the Zarr gradient store."""

    path: LocationPath = Field(description="the store's directory, or a URL (s3://bucket/run.zarr)")
    dtype: StoreDtype = Field(default="float16", description="dtype of the stored vectors")
    chunk_rows: int | None = Field(
        default=None,
        ge=1,
        description="rows per Zarr chunk (the unit of writing and resuming); default: ~4 MiB of rows",
    )
    eval_path: LocationPath | None = Field(
        default=None, description="store of eval-set gradients for TrackStar's R_eval (default: <store stem>.eval.zarr)"
    )


class CheckpointConfig(_Table):
    """One ``[[checkpoints]]`` entry; ``path`` may be a Hugging Face checkpoint folder (see the module's doc)."""

    name: str = Field(min_length=1, description="the checkpoint's name in the store, index and answers")
    path: ConfigPath = Field(
        description="weights file (a state_dict, or what Task.load_checkpoint reads), or an HF checkpoint folder"
    )
    lr: float = Field(description="learning rate at this checkpoint: its TracIn weight")
    step: int | None = Field(default=None, description="training step, recorded in the store")
    optimizer: ConfigPath | Literal[False] | None = Field(
        default=None,
        description="Adam state (exp_avg_sq by parameter name, or an optimizer state_dict): TrackStar's fold; "
        "false: none, even when an HF checkpoint folder has optimizer.pt",
    )
    adam_step: int | None = Field(
        default=None, description="Adam step for bias correction (default: from the optimizer state)"
    )
    adam_eps: float | None = Field(
        default=None, description="Adam's eps (default: from the optimizer state's param_groups, else 1e-8)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_hf_folder(cls, data: Any, info: ValidationInfo) -> Any:
        """A ``path`` that is a folder: a Trainer checkpoint whose files fill in what the entry leaves out."""
        if not isinstance(data, dict) or not isinstance(data.get("path"), (str, Path)):
            return data
        folder = _resolve(Path(data["path"]), info)
        if not folder.is_dir():
            return data
        try:
            found = trainer_checkpoint(folder)
        except HFTaskError as exc:
            raise ValueError(f"path: {exc}") from None
        filled = {"name": found.name, **data, "path": str(found.weights_path)}
        if found.step is not None:
            filled.setdefault("step", found.step)
        if found.optimizer is not None:
            filled.setdefault("optimizer", str(found.optimizer))
        if "lr" not in filled:
            if found.lr is None:
                raise ValueError(f"lr: give it; {found.lr_problem}")
            filled["lr"] = found.lr
        return filled

    @property
    def optimizer_state(self) -> Path | None:
        """The optimizer state file, if the Adam correction is on."""
        return self.optimizer or None


class HFConfig(_Table):
    """``[hf]``: a Hugging Face Trainer run whose checkpoint folders are the checkpoints."""

    output: ConfigPath = Field(description="the Trainer's output_dir: every checkpoint-<step> folder in it, by step")
    optimizer: bool = Field(
        default=True, description="use each folder's optimizer.pt for TrackStar's Adam correction (false: none)"
    )


class QueryConfig(_Table):
    """``[query]``: how the query engine computes query gradients."""

    residency: Residency = Field(
        default="all", description="all: one model per checkpoint in memory; one: load them in turn"
    )
    device: str | None = Field(default=None, description="device for query gradients (default: cuda when available)")
    batch_size: int = Field(default=32, ge=1, description="queries per forward/backward")


class LoggingConfig(_Table):
    """``[logging]``: the offline pass of ``gradstore index``."""

    batch_size: int = Field(default=64, ge=1, description="examples per forward/backward")


class ServerConfig(BaseSettings):
    """``[server]`` settings; each also reads ``GRADSTORE_<FIELD>`` from the environment when the config leaves
    it out (values given to the constructor, as ``run.toml``'s are, win)."""

    model_config = SettingsConfigDict(env_prefix="GRADSTORE_", extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="interface `gradstore serve` binds to")
    port: int = Field(default=8000, ge=0, le=65535, description="port `gradstore serve` listens on")
    api_key: str | None = Field(
        default=None,
        description="required as X-API-Key or Authorization: Bearer on /v1/* when set (an empty key is refused: "
        "leave it out for no key)",
    )
    cors_origins: tuple[str, ...] = Field(default=(), description="origins allowed to call the API from a browser")
    max_top_k: int = Field(default=100, ge=1, description="largest top_k a request may ask for")
    max_queries: int = Field(default=64, ge=1, description="most queries (or vectors) in one request")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1, description="largest request body, in bytes")
    max_header_bytes: int = Field(
        default=16 * 1024, ge=1024, description="largest request line plus headers, in bytes (else 400)"
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="seconds a client has to send a request's line and headers (else dropped)"
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="seconds a client has to send a request's whole body (else 408)"
    )
    keep_alive_s: float = Field(default=5.0, gt=0, description="seconds an idle keep-alive connection is kept open")
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="most open client connections (also kept below the file-descriptor limit); more are refused "
        "with 503 at once",
    )
    max_connections_per_client: int = Field(
        default=256,
        ge=1,
        description="most open connections from one client IP address (behind a proxy, all clients share its "
        "address: raise it); more are refused with 503 at once",
    )
    drain_s: float = Field(
        default=10.0,
        ge=0,
        description="on SIGTERM, seconds in-flight requests get to finish while new ones get 503 (keep it under "
        "the orchestrator's grace period, e.g. Kubernetes' 30 s)",
    )
    watch_s: float = Field(
        default=1.0,
        ge=0,
        description="seconds between checks of the run's index, store and weights files for changes, which reload "
        "the engine (or make the API answer 503 saying why); 0: no checks",
    )
    batch_window_ms: float = Field(
        default=0.0,
        ge=0,
        description="milliseconds an influence request waits for concurrent ones with the same options, to answer "
        "them with one gradient computation and one search (requests arriving while a batch runs join the next); "
        "0: each request alone",
    )
    batch_merge: bool = Field(
        default=False,
        description="with batch_window_ms: one forward/backward and one search for a batch's queries (faster; scores "
        "then differ from the unbatched ones by float32 rounding, ids and order do not); false: each request of a "
        "batch answered in turn, bitwise as alone",
    )

    engine: Literal["local", "ray"] = Field(
        default="local",
        description="where the index is searched: local (in this process) or ray (one Ray Serve deployment per index "
        "shard, merged and re-scored exactly here; `gradstore serve --ray`, needs gradstore[ray])",
    )
    ray_shard_cpus: float = Field(default=1.0, ge=0, description="with engine = ray: CPUs of each shard replica")
    ray_shard_gpus: float = Field(
        default=0.0, ge=0, description="with engine = ray: GPUs of each shard replica (a fraction: shards share a GPU)"
    )
    ray_gradients: Literal["auto", "replica", "here"] = Field(
        default="auto",
        description="with engine = ray: where query gradients are computed: auto (a Ray Serve replica on a GPU when "
        "the cluster has one, else here), replica (always a replica: on a GPU when the cluster has one), here (in "
        "this process)",
    )
    ray_gradient_gpus: float = Field(
        default=1.0, ge=0, description="with engine = ray: GPUs of the gradient replica (where the cluster has GPUs)"
    )
    ray_gradient_cpus: float = Field(default=1.0, ge=0, description="with engine = ray: CPUs of the gradient replica")

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError(
                "the API key is empty, which would be no key at all: set a key, or leave api_key out (and unset "
                "GRADSTORE_API_KEY) to serve without one"
            )
        return key


def _step_order(entry: dict[str, Any]) -> tuple[int, int]:
    step = entry.get("step")
    if step is None and "name" not in entry:  # a folder entry: its step is in its name (checkpoint-<step>)
        step = int(Path(entry["path"]).name.rpartition("-")[2] or 0)
    return (0, int(step)) if step is not None else (1, 0)


def _stored_checkpoints(path: StorePath) -> dict[str, dict[str, Any]]:
    """``[[checkpoints]]`` entries for the checkpoints an existing store captured during training, by name: a run
    over a store written by ``capture()`` or the callbacks needs no entries of its own. Empty without a store."""
    from gradstore.projection.errors import GradstoreError
    from gradstore.store import GradientStore

    if not (as_path(path) / "zarr.json").exists():
        return {}
    try:
        store = GradientStore.open(path)
        infos = {name: store.checkpoint_info(name) for name in store.checkpoints if store.logged_by_capture(name)}
    except GradstoreError:
        return {}  # a damaged store is reported by the command that opens it, with its own advice
    entries = {}
    for name, ckpt in infos.items():
        if ckpt.weights_path is None:
            raise ValueError(
                f"checkpoint {name!r} of store {path} records no weights file; add a [[checkpoints]] entry for it "
                "with name, path (the weights its interval started from) and lr"
            )
        optimizer = ckpt.optimizer_path if ckpt.adam and ckpt.optimizer_path else False
        entries[name] = {"name": name, "path": ckpt.weights_path, "lr": ckpt.lr, "step": ckpt.step}
        entries[name]["optimizer"] = optimizer
    return entries


def _index_table() -> type[BaseModel]:
    """``[index]`` as a model built from :class:`IndexOptions`' fields (types, defaults, help), plus ``path``."""
    hints = typing.get_type_hints(IndexOptions)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(IndexOptions):
        help_text = f.metadata.get("help", f"IndexOptions.{f.name}")
        if f.default is dataclasses.MISSING:
            factory = typing.cast("Callable[[], Any]", f.default_factory)
            fields[f.name] = (hints[f.name], Field(default_factory=factory, description=help_text))
        else:
            fields[f.name] = (hints[f.name], Field(default=f.default, description=help_text))
    path_help = "index directory (default: <store stem>.index beside the store)"
    fields["path"] = (LocationPath | None, Field(default=None, description=path_help))
    return create_model("IndexConfig", __base__=_Table, **fields)


IndexConfig = _index_table()


def _index_options(value: Any) -> IndexOptions:
    """IndexOptions from an ``[index]`` table: its types and keys checked by :data:`IndexConfig`, then by
    ``IndexOptions`` itself, whose refusal is reported at the field whose removal makes it pass (``index.nlist``),
    else at ``index``."""
    if isinstance(value, IndexOptions):
        return value
    given = IndexConfig.model_validate(value).model_dump(exclude_unset=True, exclude={"path"})
    try:
        return IndexOptions(**given)
    except (TypeError, ValueError) as exc:
        blamed = [name for name in given if _valid_index_options({k: v for k, v in given.items() if k != name})]
        why = PydanticCustomError("index_options", "{why}", {"why": str(exc)})
        errors = [InitErrorDetails(type=why, loc=(name,), input=given[name]) for name in blamed]
        raise ValidationError.from_exception_data(
            "IndexConfig", errors or [InitErrorDetails(type=why, loc=(), input=given)]
        ) from exc


def _valid_index_options(options: dict[str, Any]) -> bool:
    try:
        IndexOptions(**options)
    except (TypeError, ValueError):
        return False
    return True


class RunConfig(_Table):
    """A whole ``run.toml``. Load with :meth:`load`; ``path`` is the file, ``index`` the :class:`IndexOptions`."""

    task: TaskConfig = Field(description="[task]: the Task")
    projection: ProjectionConfig = Field(default=ProjectionConfig(), description="[projection]")
    store: StoreConfig = Field(description="[store] (default: <config stem>.zarr beside the config)")
    hf: HFConfig | None = Field(default=None, description="[hf]: a Trainer output_dir instead of [[checkpoints]]")
    checkpoints: tuple[CheckpointConfig, ...] = Field(
        default=(), validate_default=True, description="[[checkpoints]]: at least one"
    )
    index: Annotated[IndexOptions, PlainValidator(_index_options)] = Field(
        default_factory=IndexOptions, description="[index]: IndexOptions fields"
    )
    index_path: LocationPath | None = Field(
        default=None, description="[index] path: the index directory (default: beside the store)"
    )
    query: QueryConfig = Field(default=QueryConfig(), description="[query]")
    server: ServerConfig = Field(default={}, validate_default=True, description="[server] (and GRADSTORE_* variables)")
    logging: LoggingConfig = Field(default=LoggingConfig(), description="[logging]")
    _path: Path = PrivateAttr(default_factory=lambda: Path("run.toml").resolve())

    @model_validator(mode="before")
    @classmethod
    def _split_index_path(cls, data: Any, info: ValidationInfo) -> Any:
        """``[index] path`` is where the index lives, not an IndexOptions field; ``[store]`` has a default."""
        if isinstance(data, dict) and isinstance(data.get("index"), dict) and "path" in data["index"]:
            if "index_path" in data:
                raise ValueError("give the index directory as [index] path only")
            index = dict(data["index"])
            data = {**data, "index": index, "index_path": index.pop("path")}
        stem = (info.context or {}).get("stem")
        if isinstance(data, dict) and "store" not in data and stem is not None:
            data = {**data, "store": {"path": f"{stem}.zarr"}}
        return data

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _from_hf_output_or_store(cls, checkpoints: Any, info: ValidationInfo) -> Any:
        """``[hf] output``: its checkpoint folders, as ``[[checkpoints]]`` entries (``hf`` is validated first); none
        given: those of the store. A checkpoint captured during training is described by the store in both cases
        (the callbacks record the weights its interval started from, its mean lr and its step)."""
        hf = info.data.get("hf")
        store = info.data.get("store")
        if checkpoints and hf is None:
            return checkpoints
        captured = _stored_checkpoints(store.path) if store is not None else {}
        if hf is None:
            return list(captured.values())
        if checkpoints:
            raise ValueError("give either [[checkpoints]] or [hf] output (--hf-output), not both")
        try:
            found = trainer_checkpoints(hf.output)
        except HFTaskError as exc:
            raise ValueError(f"from [hf] output: {exc}") from None
        entries: list[dict[str, Any]] = [{"path": str(c.folder)} for c in found]
        if not hf.optimizer:
            entries = [{**e, "optimizer": False} for e in entries]
        merged = {c.folder.name: captured.get(c.folder.name, entry) for c, entry in zip(found, entries)}
        merged.update(captured)  # an interval ending at an epoch end has no folder: its rows are in the store
        return sorted(merged.values(), key=_step_order)

    @field_validator("checkpoints")
    @classmethod
    def _some_with_unique_names(
        cls, checkpoints: tuple[CheckpointConfig, ...], info: ValidationInfo
    ) -> tuple[CheckpointConfig, ...]:
        if not checkpoints and "hf" not in info.data:
            return checkpoints  # [hf] was refused: its error says why there are none
        if not checkpoints:
            store = info.data.get("store")
            where = f" (no store with checkpoints at {store.path} to take them from)" if store is not None else ""
            raise ValueError(f"needs at least one [[checkpoints]] entry with name, path and lr{where}")
        names = [c.name for c in checkpoints]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"checkpoint names must be unique; {twice} appear more than once")
        return checkpoints

    # -- what the rest of gradstore reads -----------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The config file (relative paths in it are resolved against its folder)."""
        return self._path

    @property
    def task_object(self) -> str:
        return self.task.object

    @property
    def task_args(self) -> dict[str, Any]:
        return self.task.args

    @property
    def batch_size(self) -> int:
        """Examples per forward/backward in ``gradstore index`` (``[logging] batch_size``)."""
        return self.logging.batch_size

    # -- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, hf_output: str | Path | None = None) -> RunConfig:
        """Read and validate a ``run.toml``; any problem is a :class:`ConfigError` naming ``section.field``.

        ``hf_output`` (``--hf-output``; relative to the working directory) sets ``[hf] output``.
        """
        path = Path(path).resolve()
        if not path.exists():
            raise ConfigError(f"run config {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from exc
        if hf_output is not None:
            hf = data.get("hf")
            data["hf"] = {**(hf if isinstance(hf, dict) else {}), "output": str(Path(hf_output).resolve())}
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str | Path) -> RunConfig:
        """Validate parsed TOML as if it were the file ``path`` (whose folder relative paths are resolved against)."""
        path = Path(path).resolve()
        try:
            config = cls.model_validate(data, context={"base": path.parent, "stem": path.stem})
        except ValidationError as exc:
            raise ConfigError("\n".join(config_field_errors(exc, _known_keys(exc)))) from None
        config._path = path
        return config

    def make_task(self) -> Task:
        """Import ``[task] object`` and call it with ``[task] args`` (those it lists in ``config_paths`` resolved
        against the config's folder); args the Task does not take are a :class:`ConfigError`."""
        module_name, _, attr = self.task.object.partition(":")
        if str(self.path.parent) not in sys.path:
            sys.path.insert(0, str(self.path.parent))
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"task.object: cannot import {self.task.object!r}: {exc}") from exc
        args = dict(self.task.args)
        for name in getattr(factory, "config_paths", ()):
            if isinstance(args.get(name), str):
                args[name] = str(self.path.parent / Path(args[name]).expanduser())
        try:
            inspect.signature(factory).bind(**args)
        except TypeError as exc:
            raise ConfigError(f"task.args: {self.task.object} does not take them: {exc}") from None
        except ValueError:  # no signature to check (a builtin): the call says
            pass
        task = factory(**args)
        if not isinstance(task, Task):
            got = type(task).__name__
            raise ConfigError(f"task.object: {self.task.object} returned {got}, not a gradstore.logger.Task")
        return task


def _table_at(model: Any, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model of the table at ``loc`` in ``model`` (``("checkpoints", 1)`` -> CheckpointConfig), if any."""
    for part in loc:
        if isinstance(part, int):
            continue
        if model is RunConfig and part == "index":
            model = IndexConfig
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside ``X``, ``X | None`` or ``tuple[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _known_keys(error: ValidationError) -> dict[tuple[int | str, ...], list[str]]:
    """For each table with an unknown key, the keys it takes."""
    known = {}
    for e in error.errors(include_url=False):
        if e["type"] == "extra_forbidden":
            table = _table_at(RunConfig, tuple(e["loc"][:-1]))
            if table is not None:
                known[tuple(e["loc"][:-1])] = [name for name in table.model_fields if name != "index_path"]
    return known
