"""Micro-batching of concurrent influence requests: one gradient computation and one search for several.

Requests with the same scoring options (:func:`~gradstore.server.run.engine.influence_key`, ``top_k`` may differ) that
arrive within ``window_s`` of the first, or while an earlier batch is running, are answered by one call in a
worker thread; each request gets its own answer (or error).

* ``merge=False`` (exact): the call answers each request in turn with :meth:`QueryEngine.answer_influence`, so
  every answer is bitwise the unbatched one; what is saved is the thread hop and the lock convoy of each request.
* ``merge=True``: one :meth:`QueryEngine.answer_influence_many`: one forward/backward for all the batch's queries
  and one search. Ids and order are the unbatched ones; scores differ by float32 rounding (a larger batch's
  forward/backward is not bitwise the same per example: about 1e-7 of the score's scale).

A batch of one is answered by :meth:`QueryEngine.answer_influence`, as without batching. When the merged call
raises a client error (4xx), each request of the batch is answered alone, so one bad request never fails the
others; a server error (5xx) is every request's answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from gradstore.projection import GradstoreError

from ..errors import http_status
from ..run.engine import QueryEngine, influence_key
from ..run.schemas import InfluenceRequest, InfluenceResponse

__all__ = ["InfluenceBatcher"]


@dataclass
class _Waiting:
    request: InfluenceRequest
    future: asyncio.Future[InfluenceResponse]
    arrived: float = field(default_factory=time.perf_counter)


class InfluenceBatcher:
    """Answers influence requests in merged batches (see the module docstring).

    Args:
        window_s: how long the first request of a batch waits for others.
        max_queries: most queries (payloads or vectors) in one batch; a request larger than that is one batch.
        merge: one forward/backward and one search for the whole batch (else each request in turn, exact).
    """

    def __init__(self, window_s: float, max_queries: int, merge: bool = False):
        self.window_s, self.max_queries, self.merge = window_s, max_queries, merge
        self._pending: dict[tuple, list[_Waiting]] = {}
        self._running: asyncio.Lock | None = None  # made in the serving loop (see _lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self.batches = 0  # calls that answered more than one request (for tests and benchmarks)

    async def answer(self, engine: QueryEngine, request: InfluenceRequest) -> InfluenceResponse:
        """The answer to ``request`` (raises its error), computed with whatever compatible requests join it."""
        key = (id(engine), influence_key(request))
        waiting = _Waiting(request, asyncio.get_running_loop().create_future())
        queue = self._pending.get(key)
        if queue is None:
            self._pending[key] = [waiting]
            self._start(engine, key)
        else:
            queue.append(waiting)
        return await waiting.future

    def _lock(self) -> asyncio.Lock:
        """One batch at a time (the engine computes gradients one call at a time); one lock per event loop, since
        an app may be served by several loops in turn (tests)."""
        loop = asyncio.get_running_loop()
        if self._running is None or self._loop is not loop:
            self._running, self._loop = asyncio.Lock(), loop
        return self._running

    def _start(self, engine: QueryEngine, key: tuple) -> None:
        task = asyncio.create_task(self._flush(engine, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self, engine: QueryEngine, key: tuple) -> None:
        await asyncio.sleep(self.window_s)
        async with self._lock():  # requests arriving meanwhile join this batch
            queue = self._pending.pop(key)
            batch: list[_Waiting] = []
            size = 0
            while queue and (not batch or size + queue[0].request.size <= self.max_queries):
                size += queue[0].request.size
                batch.append(queue.pop(0))
            if queue:  # the rest is the next batch, which waits for this one
                self._pending[key] = queue
                self._start(engine, key)
            batch = [w for w in batch if not w.future.done()]  # a client that went away is not computed for
            if batch:
                await self._answer(engine, batch)

    async def _answer(self, engine: QueryEngine, batch: list[_Waiting]) -> None:
        if len(batch) == 1:
            await self._alone(engine, batch[0])
            return
        answer_many = engine.answer_influence_many if self.merge else _each_alone(engine)
        try:
            answers = await run_in_threadpool(answer_many, [w.request for w in batch])
        except GradstoreError as exc:
            if http_status(exc) >= 500:
                for waiting in batch:
                    _settle(waiting, exc)
                return
            for waiting in batch:  # a client error of the merged call: whose it is, answering alone tells
                await self._alone(engine, waiting)
            return
        except Exception as exc:  # every waiting request gets the failure, as it would alone
            for waiting in batch:
                _settle(waiting, exc)
            return
        self.batches += 1
        for waiting, answer in zip(batch, answers):
            _settle(waiting, answer)

    async def _alone(self, engine: QueryEngine, waiting: _Waiting) -> None:
        try:
            answer: InfluenceResponse | BaseException = await run_in_threadpool(
                engine.answer_influence, waiting.request
            )
        except Exception as exc:  # handed to the request's own handler
            answer = exc
        _settle(waiting, answer)


def _each_alone(engine: QueryEngine) -> Callable[[list[InfluenceRequest]], list]:
    def answer(requests: list[InfluenceRequest]) -> list[InfluenceResponse | BaseException]:
        answers: list[InfluenceResponse | BaseException] = []
        for request in requests:
            try:
                answers.append(engine.answer_influence(request))
            except Exception as exc:  # the request's own error, as alone
                answers.append(exc)
        return answers

    return answer


def _settle(waiting: _Waiting, answer: InfluenceResponse | BaseException) -> None:
    if waiting.future.done():  # the client went away (its handler was cancelled)
        return
    if isinstance(answer, BaseException):
        waiting.future.set_exception(answer)
        return
    queued = answer.took_ms is not None and (time.perf_counter() - waiting.arrived) * 1e3 - answer.took_ms
    if queued is not False and answer.timings_ms is not None:
        answer.timings_ms["queue"] = max(0.0, queued)
    waiting.future.set_result(answer)
