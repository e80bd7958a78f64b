"""Micro-batching of concurrent influence requests (issue 13, "Load and soak"): requests merged into one gradient
computation and one search get the answers they get alone, and one bad request does not fail the others."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import httpx
import numpy as np
import pytest

from gradstore.server.errors import QueryError
from gradstore.server.http.app import create_app
from gradstore.server.http.batching import InfluenceBatcher
from gradstore.server.run import open_engine
from gradstore.server.run.config import RunConfig, ServerConfig
from gradstore.server.run.engine import QueryEngine
from gradstore.server.run.schemas import InfluenceRequest
from tests.helpers.serving import serve_in_thread

_SCORES = ("score", "mean_abs_score", "max_abs_score")


@pytest.fixture(scope="module")
def engine(demo_config) -> QueryEngine:
    return open_engine(RunConfig.load(demo_config))


def _requests(engine: QueryEngine) -> list[InfluenceRequest]:
    """Payloads and vectors with different top_k and one refused payload (one option group), the zero query (every
    score tied), and requests with other options (each its own group)."""
    ones = np.ones(len(engine.checkpoints))
    raw = engine.query_gradients(engine.examples_from_payloads([{"test_index": 7}]), ones)
    zero = np.zeros_like(raw)
    first, last = engine.checkpoints[0], engine.checkpoints[-1]
    return [
        *(InfluenceRequest(queries=[{"test_index": i}], top_k=k) for i, k in zip(range(6), [1, 3, 10, 25, 100, 2])),
        InfluenceRequest(queries=[{"test_index": 11}, {"test_index": 12}, {"test_index": 11}], top_k=5),
        InfluenceRequest(vectors=raw.tolist(), top_k=7),
        InfluenceRequest(vectors=zero.tolist(), top_k=3),  # all 0: ties broken by id, as alone
        InfluenceRequest(queries=[{"test_index": 10**6}]),  # refused: its error, the others their answers
        InfluenceRequest(queries=[{"test_index": 3}], lr_weighting="uniform", checkpoints=[last, first], top_k=4),
        InfluenceRequest(queries=[{"test_index": 3}, {"test_index": 4}], lr_weighting="uniform", top_k=6),
        InfluenceRequest(queries=[{"test_index": 5}], measurement="measurement", top_k=8),
        InfluenceRequest(queries=[{"test_index": 6}], measurement="measurement", top_k=2),
    ]


def _plain(answer: Any) -> Any:
    if isinstance(answer, BaseException):
        return f"{type(answer).__name__}: {answer}"
    data = answer if isinstance(answer, dict) else answer.model_dump()
    return {k: v for k, v in data.items() if k not in ("took_ms", "timings_ms")}


def _floats(data: Any) -> list[float]:
    if isinstance(data, dict):
        return [x for v in data.values() for x in _floats(v)]
    if isinstance(data, list):
        return [x for v in data for x in _floats(v)]
    return [data] if isinstance(data, float) else []


def _assert_close(got: Any, want: Any, scale: float | None = None, where: str = "") -> None:
    """Ids, order, roles, options, errors equal; every number within 1e-5 of the answer's largest one (float32
    rounding of the query gradient: a forward/backward over a larger batch is not bitwise the same per example)."""
    if scale is None:
        scale = max((abs(x) for x in _floats(want)), default=0.0)
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], scale, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_close(a, b, scale, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5 * scale), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _alone(engine: QueryEngine, requests: list[InfluenceRequest]) -> list[Any]:
    answers: list[Any] = []
    for request in requests:
        try:
            answers.append(_plain(engine.answer_influence(request)))
        except QueryError as exc:
            answers.append(_plain(exc))
    return answers


def _batched(batcher: InfluenceBatcher, engine: QueryEngine, requests: list[InfluenceRequest]) -> list[Any]:
    async def main() -> list[Any]:
        return await asyncio.gather(*(batcher.answer(engine, r) for r in requests), return_exceptions=True)

    return [_plain(a) for a in asyncio.run(main())]


def test_batched_answers_are_bitwise_the_answers_alone(engine):
    requests = _requests(engine)
    want = _alone(engine, requests)
    batcher = InfluenceBatcher(window_s=0.05, max_queries=64)
    got = _batched(batcher, engine, requests)
    # groups: the first 10 (default options), [10], [11] (uniform, other checkpoints), [12, 13] (measurement)
    assert batcher.batches == 2
    assert want[9].startswith("QueryError: query 0 rejected by DigitsTask")
    assert got == want


def test_merged_answers_equal_answers_alone(engine):
    requests = _requests(engine)
    want = _alone(engine, requests)
    batcher = InfluenceBatcher(window_s=0.05, max_queries=64, merge=True)
    got = _batched(batcher, engine, requests)
    assert batcher.batches == 2  # one forward/backward and one search for the 9 good requests of the first group
    assert got[9] == want[9] and want[9].startswith("QueryError: query 0 rejected by DigitsTask")
    for i, (a, b) in enumerate(zip(got, want)):
        _assert_close(a, b, where=f"request {i}")
    assert [len(r["proponents"]) for r in got[0]["results"] + got[4]["results"]] == [1, 100]
    twice = [[p["id"] for p in got[6]["results"][n]["proponents"]] for n in (0, 2)]  # one query at two positions
    assert len(got[6]["results"]) == 3 and twice[0] == twice[1]
    for a, b in zip(got[7]["results"], want[7]["results"]):  # vectors: no gradient, so the ranked scores are exact
        assert (a["proponents"], a["opponents"]) == (b["proponents"], b["opponents"])
    zero = got[8]["results"][0]
    assert [p["id"] for p in zero["proponents"]] == [0, 1, 2] and {p["score"] for p in zero["proponents"]} == {0.0}
    assert got[10] == want[10] and got[11] == want[11]  # alone in their groups: bitwise the unbatched answer


def test_a_client_error_of_the_merged_call_answers_each_alone(engine, monkeypatch):
    requests = _requests(engine)[:4]
    want = _alone(engine, requests)

    def refuse(requests):
        raise QueryError("queries [2] have non-finite (NaN/Inf) gradients")

    monkeypatch.setattr(engine, "answer_influence_many", refuse)
    batcher = InfluenceBatcher(window_s=0.05, max_queries=64, merge=True)
    got = _batched(batcher, engine, requests)
    assert batcher.batches == 0 and got == want  # answered alone: bitwise the unbatched answers


def test_batches_are_capped_at_max_queries(engine):
    requests = [InfluenceRequest(queries=[{"test_index": i}, {"test_index": i + 1}], top_k=3) for i in range(5)]
    want = _alone(engine, requests)
    batcher = InfluenceBatcher(window_s=0.05, max_queries=4, merge=True)
    got = _batched(batcher, engine, requests)
    assert batcher.batches == 2  # 2 + 2 queries, 2 + 2, then the last request alone
    for i, (a, b) in enumerate(zip(got, want)):
        _assert_close(a, b, where=f"request {i}")


def test_concurrent_http_requests_with_batching_on(engine):
    """Over HTTP, exact batching (the default when batch_window_ms is set): each answer is bitwise the
    unbatched one, errors included."""
    requests = _requests(engine)
    want = _alone(engine, requests)
    app = create_app(engine=engine, settings=ServerConfig(batch_window_ms=50, watch_s=0))
    got: list[Any] = [None] * len(requests)
    with serve_in_thread(app) as url:
        barrier = threading.Barrier(len(requests))

        def post(i: int) -> None:
            body = requests[i].model_dump(exclude_none=True)
            barrier.wait()
            response = httpx.post(f"{url}/v1/influence", json=body, timeout=60)
            got[i] = (response.status_code, response.json())

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert app.state.batcher.batches >= 1
    for i, ((status, body), expected) in enumerate(zip(got, want)):
        if isinstance(expected, str):
            assert status == 422 and expected.endswith(body["detail"]), i
            continue
        assert status == 200, (i, body)
        assert set(body["timings_ms"]) == {"gradient", "search", "assemble", "queue"}
        assert _plain(body) == expected, i
