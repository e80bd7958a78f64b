"""Request and result schemas shared by the query engine, the CLI (``--json``), the HTTP API and the SDK.

The request models are the one place where query options get their defaults and rules: the HTTP app
validates bodies with them, the engine's keyword methods and the SDK build them, and the CLI reads its
defaults, choices and help from their fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, WrapValidator, field_validator, model_validator
from pydantic_core import PydanticCustomError

LrWeighting = Literal["schedule", "uniform", "normalized"]
LR_WEIGHTINGS: tuple[LrWeighting, ...] = get_args(LrWeighting)
Measurement = Literal["loss", "measurement"]
MEASUREMENTS: tuple[Measurement, ...] = get_args(Measurement)
Residency = Literal["all", "one"]
RESIDENCIES: tuple[Residency, ...] = get_args(Residency)


# -- requests ------------------------------------------------------------------------------------------------


def _keep_arrays(value: Any, handler: Any) -> Any:
    """An in-process array (numpy, torch) stays as it is, for the engine to check; JSON lists are validated."""
    if hasattr(value, "__array__") and getattr(value, "ndim", 0) >= 1:
        return value
    return handler(value)


def _as_lists(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


Vectors = Annotated[list[list[list[float]]], WrapValidator(_keep_arrays), PlainSerializer(_as_lists)]

FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max, written out: the SDK imports without numpy


def _first_out_of_range(values: Any, where: tuple[int, ...] = ()) -> tuple[tuple[int, ...], float] | None:
    """The index and value of the first entry of nested lists that is NaN or Inf as float32, or None."""
    if isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            found = _first_out_of_range(value, (*where, i))
            if found is not None:
                return found
        return None
    try:
        number = float(values)
    except (TypeError, ValueError):
        return None  # non-numeric: the engine's shape check names it
    return None if abs(number) <= FLOAT32_MAX else (where, number)  # NaN compares False: caught too


def _check_range(vectors: Any) -> Any:
    """Refuse query vectors holding a value that is NaN or Inf as float32 (NaN, Inf, |v| > FLOAT32_MAX). Ragged
    or non-numeric input is left to the engine's shape check, which names it."""
    if vectors is None:
        return vectors
    if hasattr(vectors, "__array__"):  # an in-process array: numpy is loaded already
        import numpy as np

        try:
            values = np.asarray(vectors, dtype=np.float64)
        except (TypeError, ValueError):
            return vectors
        bad = np.argwhere(~(np.abs(values) <= FLOAT32_MAX))
        found = (tuple(int(i) for i in bad[0]), float(values[tuple(bad[0])])) if len(bad) else None
    else:
        found = _first_out_of_range(vectors)
    if found is not None:
        where, value = found
        raise PydanticCustomError(
            "vectors_range",
            "vectors{where} is {value}: NaN or Inf as float32; query vectors must be finite and within float32's "
            "range (|v| <= 3.4e38)",
            {"where": "".join(f"[{i}]" for i in where), "value": repr(value)},
        )
    return vectors


class ScoringOptions(BaseModel):
    """How scores are computed: the options influence queries and explanations share."""

    model_config = ConfigDict(extra="forbid")

    lr_weighting: LrWeighting | None = Field(
        default=None,
        description="checkpoint weights: the lrs (schedule, TracIn), 1 (uniform) or lr / mean(lr); default: "
        "schedule, or uniform for a source index (its lrs are inside: the only weighting it takes)",
    )
    checkpoints: list[str] | None = Field(default=None, description="subset of checkpoints (default: all indexed)")
    measurement: Measurement = Field(
        default="loss", description="trace the Task's loss, or its `measurement` (e.g. a margin) of the query"
    )
    normalize: bool | None = Field(default=None, description="must match the index's normalisation if given")


class InfluenceOptions(ScoringOptions):
    """How to score and what to return: the options of an influence query, whatever its queries are."""

    top_k: int = Field(default=10, ge=1, description="proponents and opponents per query")


class InfluenceRequest(InfluenceOptions):
    """Body of ``POST /v1/influence``: query payloads (for the Task) or precomputed projected gradients."""

    queries: list[dict[str, Any]] | None = Field(default=None, description="JSON payloads the Task turns into examples")
    vectors: Vectors | None = Field(
        default=None,
        description="precomputed projected query gradients, [B][checkpoints][D] in the order of `checkpoints` "
        "([B][1][D], the final checkpoint's, for a source index)",
    )

    _vectors_in_range = field_validator("vectors")(_check_range)

    @model_validator(mode="after")
    def _one_batch(self) -> InfluenceRequest:
        if (self.queries is None) == (self.vectors is None):
            raise PydanticCustomError(
                "queries_or_vectors", "give exactly one of `queries` (payloads) or `vectors` (precomputed gradients)"
            )
        if self.size == 0:
            raise PydanticCustomError("empty_batch", "`queries` (or `vectors`) must not be empty")
        return self

    @property
    def size(self) -> int:
        """Number of queries in the request."""
        return len(self.queries if self.queries is not None else self.vectors)  # type: ignore[arg-type]


class ExplainRequest(ScoringOptions):
    """Body of ``POST /v1/explain``: which positions (tokens) of one training example carry its score for a query.

    The example is re-run at each chosen checkpoint's weights, with the store's projection and Adam correction and
    the index's preconditioner and normalisation, keeping each position's term of its gradient; the shares sum to
    the example's score exactly."""

    query: dict[str, Any] = Field(description="the query's JSON payload (as one entry of influence's `queries`)")
    example_id: int = Field(description="id of the training example to explain (e.g. one of the query's proponents)")


class SelfInfluenceRequest(BaseModel):
    """Body of ``POST /v1/self-influence``."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(default=20, ge=1, description="training examples to list, largest self-influence first")
    lr_weighting: LrWeighting | None = Field(
        default=None, description="checkpoint weights, as for influence (default: the index's, as there)"
    )
    checkpoints: list[str] | None = Field(default=None, description="subset of checkpoints (default: all indexed)")


# -- results -------------------------------------------------------------------------------------------------


Role = Literal["proponent", "opponent", "neutral"]


class Influence(BaseModel):
    """One training example's influence on a query (or on itself)."""

    id: int = Field(description="the training example's id")
    score: float = Field(description="lr-weighted sum over checkpoints of the (preconditioned) inner products")
    contributions: dict[str, float] = Field(description="per-checkpoint terms of the score; they sum to it")
    example: dict[str, Any] = Field(description="the Task's description of the example")
    role: Role | None = Field(
        default=None,
        description="what the example is for the query, by its score's sign: `proponent` (score > 0), `opponent` "
        "(score < 0) or `neutral` (0). A `proponents` list holds other roles only when fewer than top_k examples "
        "have a positive score (an `opponents` list: a negative one); show those apart, not as proponents "
        "(opponents). None for self-influence.",
    )


class QueryResult(BaseModel):
    """Proponents (largest scores, descending) and opponents (most negative, ascending) of one query.

    Both lists hold top_k examples (fewer only when the index has fewer rows), ranked by score; each item's
    `role` says whether its score has the list's sign."""

    query: dict[str, Any] | None = Field(
        default=None, description="the Task's description of the query example (not for vectors)"
    )
    proponents: list[Influence] = Field(description="the largest scores, descending (check each item's `role`)")
    opponents: list[Influence] = Field(description="the most negative scores, ascending (check each item's `role`)")
    mean_abs_score: float | None = Field(
        default=None, description="mean |score| over every indexed example (flat index only)"
    )
    max_abs_score: float | None = Field(
        default=None, description="max |score| over every indexed example (flat index only)"
    )


class InfluenceResponse(BaseModel):
    results: list[QueryResult]
    checkpoints: list[str] = Field(description="checkpoints that entered the scores")
    weights: dict[str, float] = Field(description="weight of each checkpoint (from the lr weighting)")
    lr_weighting: LrWeighting
    measurement: Measurement
    took_ms: float | None = None
    timings_ms: dict[str, float] | None = Field(default=None, description="gradient and search time of this call")


class SelfInfluenceResponse(BaseModel):
    results: list[Influence] = Field(description="examples with the largest self-influence, descending")
    checkpoints: list[str]
    weights: dict[str, float]
    lr_weighting: LrWeighting
    took_ms: float | None = None


class TokenShare(BaseModel):
    """One position of an explained training example and its share of the score."""

    position: int = Field(description="index along the sequence the model reads (0-based)")
    text: str | None = Field(description="the Task's label of the position (`describe_positions`), if it gives one")
    share: float = Field(description="this position's part of the score (positive: pushes toward the query)")


class ExplainResponse(BaseModel):
    """Answer of ``POST /v1/explain``: ``sum(tokens[].share) + rest == score``.

    A position's share is the score of the terms of the example's gradient computed at that input position (its
    embedding, and in a causal LM the prediction of the next token), summed over the chosen checkpoints with their
    weights, preconditioned and normalised as the index does (the normalisation divides by the norm of the whole
    example's gradient, so shares stay additive). Module calls with another number of positions (a pooled
    classifier head, convolution pixels) go to `rest`."""

    query: dict[str, Any] = Field(description="the Task's description of the query example")
    example_id: int = Field(description="the explained training example's id")
    example: dict[str, Any] = Field(description="the Task's description of the training example")
    score: float = Field(description="the example's score recomputed from its re-run gradient: sum of shares + rest")
    stored_score: float | None = Field(
        default=None,
        description="the index's score for this pair (from the logged vectors), for comparison; equal to `score` up "
        "to the store's precision for rows logged by an offline pass (in-training capture logs gradients at the "
        "training step's weights, not the checkpoint's). None when the example is not in the index",
    )
    contributions: dict[str, float] = Field(description="per-checkpoint terms of `score`; they sum to it")
    positions: int = Field(description="T: the number of input positions the shares are taken over")
    tokens: list[TokenShare] = Field(
        description="one entry per position, in order; labelled positions beyond T (a last token that is only a "
        "target) are listed with share 0"
    )
    rest: float = Field(description="the part of the score from module calls without per-token positions")
    checkpoints: list[str] = Field(description="checkpoints that entered the score")
    weights: dict[str, float] = Field(description="weight of each checkpoint (from the lr weighting)")
    lr_weighting: LrWeighting
    measurement: Measurement
    took_ms: float | None = None


class ExampleResponse(BaseModel):
    """Answer of ``GET /v1/examples/{id}``."""

    id: int = Field(description="the training example's id")
    example: dict[str, Any] = Field(description="the Task's description of the example")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer: what is wrong, as a message or as FastAPI's list of field errors."""

    detail: str | list[dict[str, Any]] = Field(
        description="a message saying what is wrong, or (for a body that fails validation) one entry per bad field "
        "with its `loc`"
    )


def non_finite(answer: BaseModel) -> str | None:
    """Where an answer holds a float that is NaN, Inf or beyond float32 (``results[0].proponents[3].score``),
    else None. Such a score is an overflow or damage, never an answer."""

    def walk(value: Any, where: str) -> str | None:
        if isinstance(value, float):
            return None if abs(value) <= FLOAT32_MAX else where
        if isinstance(value, BaseModel):
            value = {name: getattr(value, name) for name in type(value).model_fields}
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, (float, BaseModel, dict, list)) and key not in ("example", "query"):
                    found = walk(item, f"{where}.{key}" if where else str(key))
                    if found:
                        return found
        elif isinstance(value, list):
            for i, item in enumerate(value):
                found = walk(item, f"{where}[{i}]")
                if found:
                    return found
        return None

    return walk(answer, "")


# -- run metadata (``GET /v1/run``, ``gradstore info --json``) --------------------------------------------------


class RunLayer(BaseModel):
    name: str = Field(description="module name in the model")
    kind: str = Field(description="linear, embedding, conv2d or conv1d")
    k_in: int = Field(description="projected input dimension")
    k_out: int = Field(description="projected output dimension")


class RunProjection(BaseModel):
    init: str = Field(description="how the projection matrices were drawn")
    seed: int
    dim: int = Field(description="D: numbers per example and checkpoint (sum over layers of k_in * k_out)")
    layers: list[RunLayer]


class RunVerification(BaseModel):
    """How a checkpoint's rows were checked against the exact per-example gradient on their first batch."""

    passed: bool = Field(description="whether the check ran and passed (false: logged with verify=False)")
    mode: str = Field(description="per-example (autograd.grad of each checked example), batch-sum, or off")
    path: str = Field(description="which path logged the rows: project (offline pass) or capture()")
    tolerance: float = Field(description="relative error allowed per block")
    max_error: float = Field(description="the worst relative error found over the logged blocks")
    examples: int = Field(description="examples (or, for batch-sum, batch rows) compared")


class RunCoverage(BaseModel):
    """Which of the model's trainable parameters the logged blocks cover."""

    fraction: float = Field(description="fraction of trainable parameter elements logged (a tied one once)")
    logged_elements: int
    total_elements: int
    skipped: list[str] = Field(default_factory=list, description="trainable parameters no block logs")


class RunCheckpoint(BaseModel):
    name: str
    lr: float = Field(description="the checkpoint's learning rate (its TracIn weight under `schedule`)")
    step: int | None = Field(default=None, description="training step, when recorded")
    rows: int = Field(description="examples logged at this checkpoint")
    adam: bool = Field(description="whether gradients were divided by Adam's second moment (TrackStar)")
    verification: RunVerification | None = Field(
        default=None, description="the first-batch exactness check of its rows (absent: logged before checks)"
    )


class RunIndex(BaseModel):
    status: Literal["ready", "unusable"]
    reason: str | None = Field(default=None, description="why the index cannot serve (and what to run), when unusable")
    path: str | None = None
    kind: str | None = Field(default=None, description="flat, ivf, hnsw or ivfpq")
    preconditioner: str | None = Field(default=None, description="identity, kfac, block, ekfac or source")
    normalize: bool | None = Field(default=None, description="unit norm per checkpoint (cosine)")
    rows: int | None = Field(default=None, description="N: indexed examples")
    checkpoints: list[str] | None = Field(default=None, description="the checkpoints the index covers")


class RunInfo(BaseModel):
    """A run's store, checkpoints, projection and index, and how queries are computed. Fields are absent when
    the store cannot be opened (``store_status`` says why); ``index.status`` says whether queries can be served."""

    store: str = Field(description="path of the gradient store")
    store_status: str | None = Field(default=None, description="why the store cannot be opened, when it cannot")
    dtype: str | None = Field(default=None, description="dtype of the stored vectors")
    dim: int | None = Field(default=None, description="D, the projected dimension per checkpoint")
    projection: RunProjection | None = None
    checkpoints: list[RunCheckpoint] = Field(default_factory=list, description="every checkpoint in the store")
    coverage: RunCoverage | None = Field(default=None, description="the parameters the logged blocks cover")
    index: RunIndex | None = None
    residency: Residency | None = Field(
        default=None, description="all: a model per checkpoint in memory; one: loaded in turn"
    )
    device: str | None = Field(default=None, description="where query gradients are computed")
