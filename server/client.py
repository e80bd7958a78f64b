"""Python client SDK for the gradstore HTTP API (sync and async, on httpx), returning typed results.

    from gradstore.server.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.influence([{"test_index": 3}], top_k=5).results[0]
        print([p.id for p in result.proponents])
"""

from __future__ import annotations

from typing import Any, Sequence

import httpx

from gradstore.projection import GradstoreError

from .schemas import InfluenceResponse, LrWeighting, Measurement, SelfInfluenceResponse


class GradstoreAPIError(GradstoreError, RuntimeError):
    """The server refused a request; ``status_code`` and the server's ``message`` say why."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code, self.message = status_code, message


def _influence_body(queries, vectors, top_k, lr_weighting, checkpoints, measurement, normalize) -> dict[str, Any]:
    if (queries is None) == (vectors is None):
        raise ValueError("give exactly one of queries (payloads) or vectors (precomputed gradients)")
    body: dict[str, Any] = {"top_k": top_k, "lr_weighting": lr_weighting, "measurement": measurement}
    if queries is not None:
        body["queries"] = list(queries)
    else:
        body["vectors"] = vectors.tolist() if hasattr(vectors, "tolist") else vectors
    if checkpoints is not None:
        body["checkpoints"] = list(checkpoints)
    if normalize is not None:
        body["normalize"] = normalize
    return body


def _self_influence_body(top_k, lr_weighting, checkpoints) -> dict[str, Any]:
    return {"top_k": top_k, "lr_weighting": lr_weighting, "checkpoints": list(checkpoints) if checkpoints else None}


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
    """Synchronous client. ``retries`` re-attempts failed connections; ``timeout`` is in seconds."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0, retries: int = 3):
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=httpx.HTTPTransport(retries=retries)
        )

    def influence(
        self,
        queries: Sequence[dict] | None = None,
        *,
        vectors: Any = None,
        top_k: int = 10,
        lr_weighting: LrWeighting = "schedule",
        checkpoints: Sequence[str] | None = None,
        measurement: Measurement = "loss",
        normalize: bool | None = None,
    ) -> InfluenceResponse:
        """Top proponents and opponents of each query payload (or precomputed ``[B, C, D]`` vectors)."""
        body = _influence_body(queries, vectors, top_k, lr_weighting, checkpoints, measurement, normalize)
        return InfluenceResponse.model_validate(self._post("/v1/influence", body))

    def self_influence(self, top_k: int = 20, lr_weighting: LrWeighting = "schedule", checkpoints: Sequence[str] | None = None) -> SelfInfluenceResponse:
        return SelfInfluenceResponse.model_validate(self._post("/v1/self-influence", _self_influence_body(top_k, lr_weighting, checkpoints)))

    def example(self, example_id: int) -> dict:
        """The Task's description of a training example."""
        return self._get(f"/v1/examples/{int(example_id)}")["example"]

    def run(self) -> dict:
        """Run metadata: checkpoints, lrs, projection, index kind, N, D."""
        return self._get("/v1/run")

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

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of :class:`Client`."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0, retries: int = 3):
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=httpx.AsyncHTTPTransport(retries=retries)
        )

    async def influence(
        self,
        queries: Sequence[dict] | None = None,
        *,
        vectors: Any = None,
        top_k: int = 10,
        lr_weighting: LrWeighting = "schedule",
        checkpoints: Sequence[str] | None = None,
        measurement: Measurement = "loss",
        normalize: bool | None = None,
    ) -> InfluenceResponse:
        body = _influence_body(queries, vectors, top_k, lr_weighting, checkpoints, measurement, normalize)
        return InfluenceResponse.model_validate(await self._post("/v1/influence", body))

    async def self_influence(self, top_k: int = 20, lr_weighting: LrWeighting = "schedule", checkpoints: Sequence[str] | None = None) -> SelfInfluenceResponse:
        body = _self_influence_body(top_k, lr_weighting, checkpoints)
        return SelfInfluenceResponse.model_validate(await self._post("/v1/self-influence", body))

    async def example(self, example_id: int) -> dict:
        return (await self._get(f"/v1/examples/{int(example_id)}"))["example"]

    async def run(self) -> dict:
        return await self._get("/v1/run")

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

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
