"""The ``gradstore score`` job (issue 19 part 5): many query payloads against every row of a run's index, exactly.

The run's engine turns the payloads into raw per-checkpoint query gradients (in blocks of ``block_queries``, each
block cached in ``output/_gradients/`` under a digest of its payloads, the measurement, the checkpoints read and the
index, so a rerun computes no gradient twice), the index prepares them with explicit checkpoint weights, and
:func:`gradstore.store.batch_scoring.score_batch` (or, with ``ray=True``, its Ray Data twin
:func:`gradstore.store.ray_scoring.score_batch_ray`, bit for bit the same files) streams every row past them and
writes one file per block. A rerun with the same queries and options skips the blocks already written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import QueryError
from .schemas import InfluenceOptions, Measurement

if TYPE_CHECKING:
    from gradstore.store.batch_scoring import BatchScoringSummary, OutputFormat

    from .config import RunConfig
    from .engine import QueryEngine
    from .run import Run

__all__ = ["read_payloads", "score_queries"]

GRADIENTS = "_gradients"


def open_run_index(config: RunConfig) -> Any:
    """The run's index, opened where it is called (a Ray worker opens its own copy)."""
    from .run import Run

    return Run(config).open_index(device="cpu")


def read_payloads(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (blank lines skipped), as ``gradstore query --query-file`` reads them."""
    payloads: list[dict[str, Any]] = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise QueryError(f"cannot read --queries {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QueryError(f"{path} line {number}: query payloads must be JSON objects ({exc})") from None
        if not isinstance(payload, dict):
            raise QueryError(f"{path} line {number}: each query payload must be a JSON object")
        payloads.append(payload)
    if not payloads:
        raise QueryError(f"{path} holds no query payloads")
    return payloads


def _gradient_key(
    engine: QueryEngine, payloads: Sequence[Mapping[str, Any]], mask: np.ndarray, measurement: str
) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([list(payloads), measurement, mask.tolist(), engine.checkpoints], sort_keys=True).encode())
    h.update(json.dumps(engine.index.manifest.files, sort_keys=True, default=str).encode())
    return h.hexdigest()


def query_gradients(
    engine: QueryEngine,
    payloads: Sequence[Mapping[str, Any]],
    weights: np.ndarray,
    measurement: Measurement,
    block_queries: int,
    cache: Path | None,
    progress: bool = True,
) -> np.ndarray:
    """Raw ``[M, C, D]`` query gradients of ``payloads`` at the checkpoints the index reads for ``weights``, computed
    a block at a time (each block cached in ``cache`` when given, and read back from it on a rerun).

    A block is a whole number of the engine's batches, so every forward/backward sees the batch
    ``engine.query_gradients`` gives it for all payloads at once: the gradients (and answers) of ``gradstore
    query`` for the same file, bit for bit."""
    mask = engine.index.query_checkpoints(weights).astype(np.float64)
    block_queries = engine.batch_size * -(-block_queries // engine.batch_size)
    out = np.zeros((len(payloads), len(engine.checkpoints), engine.store.dim), dtype=np.float32)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(payloads), desc="gradients", unit="query", disable=not progress) as bar:
        for lo in range(0, len(payloads), block_queries):
            block = payloads[lo : lo + block_queries]
            path = None if cache is None else cache / f"{_gradient_key(engine, block, mask, measurement)}.npy"
            if path is not None and path.is_file():
                out[lo : lo + len(block)] = np.load(path)
            else:
                examples = []
                for i, payload in enumerate(block):
                    try:
                        examples += engine.examples_from_payloads([payload])
                    except QueryError as exc:
                        raise QueryError(f"payload {lo + i} (from 0, blank lines skipped): {exc}") from exc
                grads = engine.query_gradients(examples, mask, measurement)
                if path is not None:
                    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npy")
                    np.save(tmp, grads)
                    os.replace(tmp, path)
                out[lo : lo + len(block)] = grads
            bar.update(len(block))
    return out


def score_queries(
    run: Run,
    payloads: Sequence[Mapping[str, Any]],
    output: str | Path,
    *,
    options: InfluenceOptions,
    block_queries: int = 256,
    workers: int | None = None,
    output_format: OutputFormat = "auto",
    device: str | None = None,
    ray: bool = False,
    progress: bool = True,
) -> BatchScoringSummary:
    """Every payload's exact top-``options.top_k`` proponents and opponents over the run's whole index, written to
    ``output`` (see :func:`~gradstore.store.batch_scoring.score_batch`); query ids are the payloads' positions."""
    engine = run.open_engine(device=device)
    engine._check_normalize(options.normalize)
    weights = engine.checkpoint_weights(options.checkpoints, options.lr_weighting)
    out = Path(output)
    raw = query_gradients(engine, payloads, weights, options.measurement, block_queries, out / GRADIENTS, progress)
    prepared = engine.index.prepare(raw, weights)
    kwargs: dict[str, Any] = {
        "block_queries": block_queries,
        "workers": workers,
        "output_format": output_format,
        "progress": progress,
    }
    if ray:
        from gradstore.store.ray_scoring import score_batch_ray

        opener = partial(open_run_index, run.config)  # each Ray worker opens the run's index as this process did
        return score_batch_ray(engine.index, prepared, out, options.top_k, opener=opener, **kwargs)
    from gradstore.store.batch_scoring import score_batch

    return score_batch(engine.index, prepared, out, options.top_k, **kwargs)
