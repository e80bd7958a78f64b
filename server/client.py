"""Python client SDK for the gradstore HTTP API (sync and async, on httpx), returning typed results.

    from gradstore.server.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.influence([{"test_index": 3}], top_k=5).results[0]
        print([p.id for p in result.proponents])

Requests are built with the server's own request models (``schemas.InfluenceRequest``, ...), which hold the
defaults and rules, and sent as their ``model_dump(exclude_none=True, mode="json")``. A request those models
refuse raises :class:`InvalidRequestError` before anything is sent: a :class:`GradstoreAPIError` (status 422,
the server's ``body.<field>: <why>`` wording) that is also a ``ValueError``; the pydantic error is its cause.
Any refusal by the server raises :class:`GradstoreAPIError` with its ``status_code`` and ``message``.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from .errors import GradstoreAPIError, InvalidRequestError
from .run.schemas import (
    ExampleResponse,
    ExplainRequest,
    ExplainResponse,
    InfluenceRequest,
    InfluenceResponse,
    RunInfo,
    SelfInfluenceRequest,
    SelfInfluenceResponse,
)

__all__ = ["AsyncClient", "Client", "GradstoreAPIError", "InvalidRequestError"]

Request = TypeVar("Request", bound=BaseModel)


def _body(model: type[Request], **fields: Any) -> dict[str, Any]:
    """The JSON body of a request, built and checked by the request model the server validates with (its
    defaults and rules); a refusal raises :class:`InvalidRequestError` without sending anything."""
    try:
        request = model(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise InvalidRequestError(exc) from exc
    return request.model_dump(exclude_none=True, mode="json")


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # FastAPI validation errors: name the fields
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    raise GradstoreAPIError(response.status_code, str(detail))


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


class Client:
    """Synchronous client. ``retries`` re-attempts failed connections; ``timeout`` is in seconds; ``transport``
    replaces httpx's (e.g. ``httpx.MockTransport`` in tests, or an ASGI transport to an in-process app)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ):
        self._http = httpx.Client(
            base_url=base_url,
            headers=_headers(api_key),
            timeout=timeout,
            transport=transport or httpx.HTTPTransport(retries=retries),
        )

    def influence(self, queries: Any = None, *, vectors: Any = None, **options: Any) -> InfluenceResponse:
        """Top proponents and opponents of each query payload (or precomputed ``[B, C, D]`` vectors, a nested list
        or an array). ``options`` are the :class:`~gradstore.server.run.schemas.InfluenceOptions` fields (``top_k``,
        ``lr_weighting``, ``checkpoints``, ``measurement``, ``normalize``), with its defaults."""
        body = _body(InfluenceRequest, queries=queries, vectors=vectors, **options)
        return InfluenceResponse.model_validate(self._post("/v1/influence", body))

    def explain(self, query: dict, example_id: int, **options: Any) -> ExplainResponse:
        """Each token's share of training example ``example_id``'s score for the query payload (they sum to the
        score); ``options`` are the :class:`~gradstore.server.run.schemas.ScoringOptions` fields (``lr_weighting``,
        ``checkpoints``, ``measurement``, ``normalize``)."""
        body = _body(ExplainRequest, query=query, example_id=example_id, **options)
        return ExplainResponse.model_validate(self._post("/v1/explain", body))

    def self_influence(self, **options: Any) -> SelfInfluenceResponse:
        """Training examples with the largest self-influence; ``options`` are the SelfInfluenceRequest fields."""
        body = _body(SelfInfluenceRequest, **options)
        return SelfInfluenceResponse.model_validate(self._post("/v1/self-influence", body))

    def example(self, example_id: int) -> dict:
        """The Task's description of a training example."""
        return ExampleResponse.model_validate(self._get(f"/v1/examples/{int(example_id)}")).example

    def run(self) -> RunInfo:
        """Run metadata: store, checkpoints, projection, index, N, D."""
        return RunInfo.model_validate(self._get("/v1/run"))

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _post(self, path: str, body: dict) -> Any:
        response = self._http.post(path, json=body)
        _raise_for_status(response)
        return response.json()

    def _get(self, path: str) -> Any:
        response = self._http.get(path)
        _raise_for_status(response)
        return response.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=_headers(api_key),
            timeout=timeout,
            transport=transport or httpx.AsyncHTTPTransport(retries=retries),
        )

    async def influence(self, queries: Any = None, *, vectors: Any = None, **options: Any) -> InfluenceResponse:
        body = _body(InfluenceRequest, queries=queries, vectors=vectors, **options)
        return InfluenceResponse.model_validate(await self._post("/v1/influence", body))

    async def explain(self, query: dict, example_id: int, **options: Any) -> ExplainResponse:
        body = _body(ExplainRequest, query=query, example_id=example_id, **options)
        return ExplainResponse.model_validate(await self._post("/v1/explain", body))

    async def self_influence(self, **options: Any) -> SelfInfluenceResponse:
        body = _body(SelfInfluenceRequest, **options)
        return SelfInfluenceResponse.model_validate(await self._post("/v1/self-influence", body))

    async def example(self, example_id: int) -> dict:
        return ExampleResponse.model_validate(await self._get(f"/v1/examples/{int(example_id)}")).example

    async def run(self) -> RunInfo:
        return RunInfo.model_validate(await self._get("/v1/run"))

    async def _post(self, path: str, body: dict) -> Any:
        response = await self._http.post(path, json=body)
        _raise_for_status(response)
        return response.json()

    async def _get(self, path: str) -> Any:
        response = await self._http.get(path)
        _raise_for_status(response)
        return response.json()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
