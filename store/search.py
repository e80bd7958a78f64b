"""Search backends: one per index kind, chosen in one place (:data:`BACKENDS`).

A backend writes its files from streamed index vectors, loads them back, and proposes *candidate* rows for each
query's largest and smallest scores; :class:`~gradstore.store.index.GradientIndex` re-scores every candidate
exactly, so a backend only decides which rows are looked at.

* ``flat``: ``vectors.npy``, scanned exactly (torch matmul on the GPU, NumPy BLAS on the CPU), so its candidates
  are the exact top / bottom ``k``, and it also yields mean / max ``|score|`` over every row.
* ``ivf``, ``hnsw``, ``ivfpq``: ``faiss.index``; ``k * rerank`` approximate candidates per query. ``hnsw`` and (on
  CPU) ``ivf`` hold the exact float32 vectors and hand them to the re-scoring; ``ivfpq`` (and a GPU ``ivf``) does
  not, and the index re-reads the candidates' rows from the store.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar, NamedTuple, Protocol, cast

import faiss
import numpy as np
import torch

from .errors import IndexOptionsError
from .index_options import IndexKind, IndexOptions
from .vectors import VectorSource


class Candidates(NamedTuple):
    """Per query ``[B, m]`` rows to re-score for the largest and the smallest scores (``-1`` pads when fewer were
    found), and the mean / max ``|score|`` over all rows where the backend scored them all."""

    proponent_rows: np.ndarray
    opponent_rows: np.ndarray
    mean_abs_score: np.ndarray | None = None  # [B] float64
    max_abs_score: np.ndarray | None = None


class SearchBackend(Protocol):
    """One index kind: its files built from streamed vectors, loaded back, and searched for candidates."""

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        """Write this kind's files for the examples ``ids`` into ``directory``; return their ``[N, C]`` sqnorms."""
        ...

    @classmethod
    def load(cls, directory: Path, options: IndexOptions, device: torch.device) -> SearchBackend:
        """The backend of the files in ``directory``, with ``options``' search-time knobs."""
        ...

    def candidates(self, queries: np.ndarray, k: int) -> Candidates:
        """Rows to re-score for each of the ``[B, C*D]`` queries' ``k`` largest and ``k`` smallest scores."""
        ...

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        """The exact ``[n, C*D]`` float32 vectors of ``rows`` if this backend holds them, else None."""
        ...


# -- flat ------------------------------------------------------------------------------------------
class _TopK:
    """The ``k`` largest (or smallest) scores of each query over blocks of rows, merged at the end."""

    def __init__(self, largest: bool):
        self.largest = largest
        self.values: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []

    def add(self, scores: torch.Tensor, start: int, k: int) -> None:
        """Keep the block's best ``k`` of ``[n, B]`` scores of rows ``start .. start + n``."""
        best = scores.topk(min(k, len(scores)), dim=0, largest=self.largest)
        self.values.append(best.values)
        self.rows.append(best.indices + start)

    def rows_of_best(self, k: int) -> np.ndarray:
        """``[B, k]`` rows of each query's overall best ``k``."""
        values, rows = torch.cat(self.values), torch.cat(self.rows)
        best = values.topk(k, dim=0, largest=self.largest).indices
        return torch.gather(rows, 0, best).T.cpu().numpy()


class FlatBackend:
    """``flat``: every row's vector in memory (on the GPU when present), scanned exactly."""

    FILE: ClassVar[str] = "vectors.npy"
    SCAN_ROWS: ClassVar[int] = 1 << 18  # rows scored per step of the scan

    def __init__(self, vectors: torch.Tensor):
        self.vectors = vectors  # [N, C*D] float32

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        n = len(ids)
        sqnorms = np.zeros((n, source.num_checkpoints))
        out = np.lib.format.open_memmap(directory / cls.FILE, mode="w+", dtype=np.float32, shape=(n, source.width))
        for block in source.blocks(ids, options.block_rows, "indexing (flat)", progress):
            out[block.start : block.start + len(block.vectors)] = block.vectors
            sqnorms[block.start : block.start + len(block.vectors)] = block.sqnorms
        out.flush()
        del out
        return sqnorms

    @classmethod
    def load(cls, directory: Path, options: IndexOptions, device: torch.device) -> FlatBackend:
        return cls(torch.from_numpy(np.load(directory / cls.FILE)).to(device))

    def candidates(self, queries: np.ndarray, k: int) -> Candidates:
        """The exact top and bottom ``k`` rows of each query, and mean / max ``|score|`` over every row."""
        vectors = self.vectors
        q = torch.from_numpy(queries).to(vectors.device)
        top, bottom = _TopK(largest=True), _TopK(largest=False)
        abs_sum = torch.zeros(len(q), dtype=torch.float64, device=vectors.device)
        abs_max = torch.zeros(len(q), dtype=torch.float32, device=vectors.device)
        on_cpu = vectors.device.type == "cpu"
        for start in range(0, len(vectors), self.SCAN_ROWS):
            block = vectors[start : start + self.SCAN_ROWS]
            # On CPU numpy's BLAS streams the block at about memory bandwidth; torch's CPU matmul measured
            # 1.5x slower for one query (1.2x for 64) on the benchmark machine (benchmarks/search.py).
            scores = torch.from_numpy(block.numpy() @ queries.T) if on_cpu else block @ q.T  # [n, B]
            top.add(scores, start, k)
            bottom.add(scores, start, k)
            abs_scores = scores.abs()
            abs_sum += abs_scores.sum(0, dtype=torch.float64)
            abs_max = torch.maximum(abs_max, abs_scores.max(0).values)
        return Candidates(
            proponent_rows=top.rows_of_best(k),
            opponent_rows=bottom.rows_of_best(k),
            mean_abs_score=(abs_sum / len(vectors)).cpu().numpy(),
            max_abs_score=abs_max.double().cpu().numpy(),
        )

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray:
        # index_select: tensor[index] costs ~20 ms per call on CPU here (torch 2.x), whatever the sizes
        return self.vectors.index_select(0, torch.from_numpy(rows).to(self.vectors.device)).cpu().numpy()


# -- FAISS -----------------------------------------------------------------------------------------
def gpu_available() -> bool:
    """True when the installed FAISS has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def ivf_nlist(options: IndexOptions, n: int) -> int:
    """Inverted lists of an ivf / ivfpq index over ``n`` rows: ``options.nlist``, else about ``4 sqrt(n)``
    (at most ``n / 39``: k-means wants 39 training points per centroid)."""
    return options.nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))


def pq_subquantizers(dim: int, requested: int | None) -> int:
    """``pq_m`` for a ``dim``-wide ivfpq index: ``requested`` if it divides ``dim``, else the largest divisor of
    ``dim`` up to ``dim / 8``."""
    target = requested or max(1, dim // 8)
    if dim % target == 0:
        return target
    if requested:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0]
        nearest = sorted(divisors, key=lambda m: abs(m - requested))[:3]
        raise IndexOptionsError(
            f"pq_m={requested} must divide the index dimension {dim} (checkpoints x D); "
            f"choose a divisor such as {sorted(nearest)}, or leave pq_m unset to pick one"
        )
    return max(m for m in range(1, target + 1) if dim % m == 0)


class FaissBackend:
    """A FAISS index (``faiss.index``) proposing ``k * rerank`` approximate candidates per query.

    Subclasses say how their kind is created, which search-time knobs it takes, whether it may move to the GPU,
    and whether it holds the exact vectors.
    """

    FILE: ClassVar[str] = "faiss.index"
    USES_GPU: ClassVar[bool] = False  # copy to the GPU when faiss-gpu sees one

    def __init__(self, index: faiss.Index, searcher: faiss.Index, exact: faiss.Index | None, rerank: int):
        self.index = index  # the CPU index as loaded
        self.searcher = searcher  # what answers searches: ``index`` or its GPU copy
        self.exact = exact  # a CPU index holding the exact float32 vectors, if any
        self.rerank = rerank

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        raise NotImplementedError

    @staticmethod
    def configure(index: faiss.Index, options: IndexOptions) -> None:
        """Set the search-time knobs."""

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        """``index`` if it can hand back the exact vectors of its rows (on the CPU), else None."""
        return None

    @classmethod
    def build(
        cls, source: VectorSource, ids: np.ndarray, options: IndexOptions, directory: Path, progress: bool
    ) -> np.ndarray:
        n = len(ids)
        sqnorms = np.zeros((n, source.num_checkpoints))
        index = cls.new_index(options, source.width, n)
        if not index.is_trained:
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(ids, size=min(n, options.train_rows), replace=False))
            blocks = source.blocks(sample, options.block_rows, f"training ({options.kind})", progress)
            train = np.concatenate([block.vectors for block in blocks])
            index.train(train)
            del train
        for block in source.blocks(ids, options.block_rows, f"indexing ({options.kind})", progress):
            index.add(block.vectors)
            sqnorms[block.start : block.start + len(block.vectors)] = block.sqnorms
        faiss.write_index(index, str(directory / cls.FILE))
        return sqnorms

    @classmethod
    def load(cls, directory: Path, options: IndexOptions, device: torch.device) -> FaissBackend:
        index = faiss.read_index(str(directory / cls.FILE))
        cls.configure(index, options)
        searcher = index
        if cls.USES_GPU and gpu_available():
            try:
                searcher = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            except RuntimeError as exc:  # e.g. a PQ code size the GPU kernels do not support
                warnings.warn(f"FAISS GPU unavailable for this index ({exc}); searching on CPU", stacklevel=3)
        exact = cls.exact_storage(index) if searcher is index else None
        return cls(index, searcher, exact, options.rerank)

    def candidates(self, queries: np.ndarray, k: int) -> Candidates:
        m = min(self.index.ntotal, k * self.rerank)
        _, proponents = self.searcher.search(queries, m)
        _, opponents = self.searcher.search(-queries, m)
        return Candidates(proponents, opponents)

    def exact_vectors(self, rows: np.ndarray) -> np.ndarray | None:
        if self.exact is None:
            return None
        if not len(rows):
            return np.zeros((0, self.index.d), np.float32)
        return self.exact.reconstruct_batch(rows)


class HnswBackend(FaissBackend):
    """``hnsw``: a graph over the exact float32 vectors (CPU); ``ef_search`` trades latency for recall."""

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = options.ef_construction
        return index

    @staticmethod
    def configure(index: faiss.Index, options: IndexOptions) -> None:
        cast(faiss.IndexHNSW, index).hnsw.efSearch = options.ef_search

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        return index


class IvfBackend(FaissBackend):
    """``ivf``: inverted lists of exact float32 vectors (IVFFlat); ``nprobe`` lists are visited per query."""

    USES_GPU = True

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(dim)
        return faiss.IndexIVFFlat(quantizer, dim, ivf_nlist(options, n), faiss.METRIC_INNER_PRODUCT)

    @staticmethod
    def configure(index: faiss.Index, options: IndexOptions) -> None:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = options.nprobe or max(1, ivf.nlist // 4)

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct rows by id
        return index


class IvfPqBackend(IvfBackend):
    """``ivfpq``: inverted lists of product-quantised codes; the exact vectors are re-read from the store."""

    @staticmethod
    def new_index(options: IndexOptions, dim: int, n: int) -> faiss.Index:
        quantizer = faiss.IndexFlatIP(dim)
        nbits = int(np.clip(np.log2(max(n, 1) / 39), 4, 8))  # k-means wants >= 39 training points per centroid
        m = pq_subquantizers(dim, options.pq_m)
        return faiss.IndexIVFPQ(quantizer, dim, ivf_nlist(options, n), m, nbits, faiss.METRIC_INNER_PRODUCT)

    @staticmethod
    def exact_storage(index: faiss.Index) -> faiss.Index | None:
        return None


# The one place an index kind is mapped to its implementation.
BACKENDS: dict[IndexKind, type[SearchBackend]] = {
    "flat": FlatBackend,
    "ivf": IvfBackend,
    "hnsw": HnswBackend,
    "ivfpq": IvfPqBackend,
}
