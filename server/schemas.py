"""Result and request schemas shared by the query engine, the CLI's ``--json`` output and the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LrWeighting = Literal["schedule", "uniform", "normalized"]
Measurement = Literal["loss", "measurement"]


class Influence(BaseModel):
    """One training example's influence on a query (or on itself)."""

    id: int = Field(description="the training example's id")
    score: float = Field(description="learning-rate-weighted sum over checkpoints of the (preconditioned) inner products")
    contributions: dict[str, float] = Field(description="per-checkpoint terms of the score; they sum to it")
    example: dict[str, Any] = Field(description="the Task's description of the example")


class QueryResult(BaseModel):
    """Proponents (largest scores, descending) and opponents (most negative, ascending) of one query."""

    query: dict[str, Any] | None = Field(None, description="the Task's description of the query example (not for vectors)")
    proponents: list[Influence]
    opponents: list[Influence]
    mean_abs_score: float | None = Field(None, description="mean |score| over every indexed example (flat index only)")
    max_abs_score: float | None = Field(None, description="max |score| over every indexed example (flat index only)")


class InfluenceResponse(BaseModel):
    results: list[QueryResult]
    checkpoints: list[str] = Field(description="checkpoints that entered the scores")
    weights: dict[str, float] = Field(description="weight of each checkpoint (from the lr weighting)")
    lr_weighting: LrWeighting
    measurement: Measurement
    took_ms: float | None = None
    timings_ms: dict[str, float] | None = Field(None, description="gradient and search time of this call")


class SelfInfluenceResponse(BaseModel):
    results: list[Influence] = Field(description="examples with the largest self-influence, descending")
    checkpoints: list[str]
    weights: dict[str, float]
    lr_weighting: LrWeighting
    took_ms: float | None = None


class ErrorResponse(BaseModel):
    """Body of every 4xx answer: what is wrong, as a message or as FastAPI's list of field errors."""

    detail: str | list[dict[str, Any]] = Field(
        description="a message saying what is wrong, or (for a body that fails validation) one entry per bad field with its `loc`"
    )


class InfluenceRequest(BaseModel):
    """Body of ``POST /v1/influence``: query payloads (for the Task) or precomputed projected gradients."""

    model_config = ConfigDict(extra="forbid")

    queries: list[dict[str, Any]] | None = Field(None, description="JSON payloads the Task turns into examples")
    vectors: list[list[list[float]]] | None = Field(
        None, description="precomputed projected query gradients, [B][checkpoints][D] in the order of `checkpoints`"
    )
    top_k: int = Field(10, ge=1, description="proponents and opponents per query")
    lr_weighting: LrWeighting = "schedule"
    checkpoints: list[str] | None = Field(None, description="subset of checkpoints (default: all indexed)")
    measurement: Measurement = "loss"
    normalize: bool | None = Field(None, description="must match the index's normalisation if given")


class SelfInfluenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1)
    lr_weighting: LrWeighting = "schedule"
    checkpoints: list[str] | None = None
