"""GradientLogger: a GradientProjector that writes per-example projected gradients to a Zarr store."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gradstore.projection import ProjectionSpec
from gradstore.projection.spec import Init
from gradstore.store import (
    AppendWriter,
    BackgroundWriter,
    CheckpointInfo,
    CheckpointMismatchError,
    ChunkBuffer,
    DuplicateIdError,
    GradientStore,
    Segment,
    file_sha256,
)
from gradstore.store.gradient_store import PASS_SEGMENT, StoreDtype
from gradstore.store.remote import StorePath, as_path
from gradstore.store.writer import chunk_rows_for

from .adam_fold import adam_fold
from .errors import CaptureError, NonFiniteGradientError, TaskError
from .fingerprint import examples_fingerprint
from .projector import GradientProjector, Rank
from .task import Task
from .verify import (
    ExactRows,
    Verification,
    block_errors,
    checked_positions,
    refuse_batch_coupling,
    require_exact,
)

T = TypeVar("T")


@dataclass
class CaptureReference:
    """What the first capture's rows are checked against: exact rows of some examples (``per-example``), or the
    parameters' ``.grad`` before the backward (``batch-sum``: the rows' sum must equal the change)."""

    mode: Literal["per-example", "batch-sum"]
    positions: list[int]
    exact: ExactRows
    rows: torch.Tensor | None = None
    before: list[torch.Tensor | None] | None = None


def _scaled(rows: np.ndarray, scale: float | torch.Tensor) -> np.ndarray:
    scale = float(scale)  # a tensor is read here, on the writer thread
    return rows / np.float32(scale) if scale != 1.0 else rows


def _delta(after: torch.Tensor | None, before: torch.Tensor | None) -> torch.Tensor | None:
    if after is None:
        return None
    return after.detach() - before if before is not None else after.detach()


class GradientLogger(GradientProjector):
    """Computes LoGra-style projected per-example gradients of ``model`` and logs them to a store.

    Args:
        model, task, rank, init, layers, seed, pca_examples, spec: as for :class:`GradientProjector`.
        store: path of the Zarr store to write (created if absent), or None to only :meth:`project`.
        dtype: stored precision, ``float16`` (default) or ``float32``.
        chunk_rows: rows per Zarr chunk (the unit of writing, committing and resuming); default: about 4 MiB of
            rows (:func:`~gradstore.store.writer.chunk_rows_for`), so a partly filled chunk pads little. An existing
            store keeps its own.
        process_rank, world_size: this writer's share of a distributed pass (default: from torch.distributed).
        progress: show progress bars.
        verify: check the first batch of every path (offline pass, ``capture()``) against the exact per-example
            gradient and refuse a block that differs (see :class:`GradientProjector`); recorded in the store.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        store: str | Path | None = None,
        rank: Rank = 8,
        init: Init = "gaussian",
        layers: Sequence[str] = ("*",),
        seed: int = 0,
        dtype: StoreDtype = "float16",
        chunk_rows: int | None = None,
        pca_examples: Sequence | None = None,
        process_rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        spec: ProjectionSpec | None = None,
        verify: bool = True,
    ):
        if spec is None and init == "pca" and store is not None and (as_path(store) / "zarr.json").exists():
            spec = GradientStore.open(store).spec  # PCA bases are data: reuse the ones the store was written with
        super().__init__(
            model,
            task,
            rank=rank,
            init=init,
            layers=layers,
            seed=seed,
            pca_examples=pca_examples,
            spec=spec,
            verify=verify,
        )
        self.progress = progress
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.process_rank = (
            process_rank if process_rank is not None else (torch.distributed.get_rank() if distributed else 0)
        )
        self.world_size = (
            world_size if world_size is not None else (torch.distributed.get_world_size() if distributed else 1)
        )
        self._distributed = distributed and self.world_size > 1
        self.store: GradientStore | None = None
        if store is not None:
            self.store = self._open_store(as_path(store), dtype, chunk_rows)
            if self.process_rank == 0:
                self.store.record_checks(coverage=self.coverage.to_json())
        self._writer = BackgroundWriter()
        self._sinks: dict[str, AppendWriter] = {}
        self._capture_seen: dict[str, set[int]] = {}
        self._capture_done: dict[str, set[int]] = {}
        self._capture_lr: dict[str, float] = {}
        self.skipped_ids: dict[str, set[int]] = {}  # per checkpoint: ids whose step a GradScaler skipped
        self.capture_verification: Verification | None = None  # the first capture's check (training mode)
        if not verify and self.store is not None and self.process_rank == 0:
            self.store.record_checks(verification=Verification("off", "verify=False").to_json(), checkpoint="*")

    # -- setup -----------------------------------------------------------------------------------
    def _rank0_first(self, first: Callable[[], T], others: Callable[[], T]) -> T:
        """Rank 0 runs ``first`` (creates), then every other rank runs ``others`` (opens and validates)."""
        result = first() if self.process_rank == 0 else None
        if self._distributed:
            torch.distributed.barrier()
        return result if self.process_rank == 0 else others()  # type: ignore[return-value]

    def _open_store(self, path: StorePath, dtype: str, chunk_rows: int | None) -> GradientStore:
        if chunk_rows is None:
            chunk_rows = chunk_rows_for(self.spec.dim, dtype)

        def reopen() -> GradientStore:
            store = GradientStore.open(path, mode="a")
            store.check_compatible(self.spec, dtype)
            return store

        return self._rank0_first(
            lambda: GradientStore.open_or_create(path, self.spec, dtype=dtype, chunk_rows=chunk_rows), reopen
        )

    def _barrier(self) -> None:
        if self._distributed:
            torch.distributed.barrier()

    def _require_store(self) -> GradientStore:
        if self.store is None:
            raise TaskError("this logger has no store: pass store=PATH to GradientLogger")
        return self.store

    # -- offline pass ----------------------------------------------------------------------------
    def log_checkpoint(
        self,
        name: str,
        lr: float,
        examples: Sequence | None = None,
        batch_size: int = 64,
        step: int | None = None,
        weights_path: str | Path | None = None,
        optimizer_state: str | Path | Mapping[str, Any] | None = None,
        adam_step: int | None = None,
        adam_eps: float | None = None,
    ) -> int:
        """Log every example's projected gradient at the model's current weights; resumable.

        Rows already committed by an earlier (interrupted) call are skipped. When the examples grew since the
        checkpoint's first pass (its examples first, unchanged, then new ones), only the examples whose ids it
        does not hold yet are logged, into an append segment (named by their ids: an interrupted append resumes).
        With several processes each writes the chunks it owns (chunk ``k`` belongs to rank ``k % world_size``).
        Returns the number of rows this process computed.

        ``optimizer_state``: Adam / Adafactor state (a path, an HF checkpoint folder with ``optimizer.pt``, an
        ``optimizer.state_dict()`` or ``{param name: exp_avg_sq}``) to apply TrackStar's second-moment correction for
        this checkpoint; ``beta2``, ``eps``, ``amsgrad`` and the step come from the state unless ``adam_step`` /
        ``adam_eps`` override them. What was folded (layout, zeroed / floored rows and columns) is recorded in the
        checkpoint's ``adam_summary``.
        """
        store, task = self._require_store(), self._require_task()
        examples = task.train_examples() if examples is None else examples
        ids = self._example_ids(examples, name)
        fold = (
            adam_fold(self.model, self.layers, self.spec, optimizer_state, step=adam_step, eps=adam_eps)
            if optimizer_state is not None
            else None
        )
        factors = (fold.r, fold.c) if fold is not None else None
        info = CheckpointInfo(
            name=name,
            lr=float(lr),
            step=step,
            weights_path=str(weights_path) if weights_path is not None else None,
            weights_sha256=file_sha256(weights_path) if weights_path is not None else None,
            optimizer_path=str(optimizer_state) if isinstance(optimizer_state, (str, Path)) else None,
            adam=factors is not None,
            adam_summary=fold.summary if fold is not None else None,
        )
        examples, ids, segment_name = self._still_to_log(store, name, examples, ids)
        if not len(ids) and segment_name != PASS_SEGMENT:  # every example is logged: check the metadata only
            self._rank0_first(lambda: store.begin_checkpoint(info, factors), lambda: None)
            return 0
        segment = self._begin_pass(store, info, factors, len(ids), segment_name)
        committed, bad_records = segment.commit_records()  # a chunk with a damaged commit record is re-logged
        mine = [k for k in range(segment.n_chunks) if k % self.world_size == self.process_rank]
        damaged = [k for k in mine if k in bad_records or (committed[k] and not segment.chunk_intact(k, committed))]
        if damaged:
            warnings.warn(
                f"checkpoint {name!r}: re-logging damaged chunks {damaged[:20]} of {segment.group.store_path}",
                stacklevel=2,
            )
        resumed = [k for k in mine if committed[k] and k not in damaged]
        self._check_resumed_chunks(segment, resumed, committed, examples, ids, name)
        todo = [k for k in mine if committed[k] == 0 or k in damaged]
        try:
            with self.adam_correction(factors):
                computed = self._log_chunks(segment, todo, examples, ids, batch_size, desc=f"logging {name}")
        finally:
            self._writer.flush()
        self._record_verification(name)
        self._barrier()
        return computed

    def _record_verification(self, checkpoint: str) -> None:
        """Record how this checkpoint's rows were checked (the check itself runs once per logger)."""
        if self.store is not None and self.process_rank == 0 and (self.verification is not None or not self.verify):
            check = self.verification or Verification("off", "verify=False")
            self.store.record_checks(verification=check.to_json(), checkpoint=checkpoint)

    def _example_ids(self, examples: Sequence, checkpoint: str) -> np.ndarray:
        task = self._require_task()
        n = len(examples)
        ids = np.fromiter((task.example_id(examples[i], i) for i in range(n)), dtype=np.int64, count=n)
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise DuplicateIdError(
                f"Task.example_id gives the same id to several examples of checkpoint {checkpoint!r}: "
                f"{unique[counts > 1][:10].tolist()}"
            )
        return ids

    def _still_to_log(
        self, store: GradientStore, name: str, examples: Sequence, ids: np.ndarray
    ) -> tuple[Sequence, np.ndarray, str]:
        """The examples a pass over ``examples`` still has to log, and the segment they go to: all of them into the
        pass segment (a new checkpoint, or one to resume with the same examples), or, when the examples grew since
        the first pass completed (its examples first, unchanged), those after them whose ids the checkpoint does
        not hold yet, into an append segment."""
        if name not in store.checkpoints:
            return examples, ids, PASS_SEGMENT
        segments = store.segments(name)
        first = next((s for s in segments if s.name == PASS_SEGMENT), None)
        counts = first.commit_records()[0] if first is not None else None  # damaged records: 0, re-logged below
        if first is None or counts is None or first.capacity >= len(ids) or counts.sum() < first.capacity:
            return examples, ids, PASS_SEGMENT  # resume (pass_segment refuses other examples of an unfinished pass)
        # grown: the first pass's examples must come first, unchanged (ids and content, chunk by chunk)
        self._check_resumed_chunks(first, list(range(first.n_chunks)), counts, examples, ids, name)
        self._barrier()  # every rank reads the same committed ids, before any writes this call's rows
        known = store.committed_ids(name)
        positions = first.capacity + np.flatnonzero(~np.isin(ids[first.capacity :], known))
        self._barrier()
        digest = hashlib.blake2b(ids[positions].tobytes(), digest_size=8).hexdigest()
        return [examples[int(p)] for p in positions], ids[positions], f"{PASS_SEGMENT}-append-{digest}"

    def _begin_pass(
        self,
        store: GradientStore,
        info: CheckpointInfo,
        factors: tuple[np.ndarray, np.ndarray] | None,
        n: int,
        segment_name: str = PASS_SEGMENT,
    ) -> Segment:
        """Create (rank 0) or validate (other ranks) the checkpoint and its pre-sized pass (or append) segment."""

        def begin() -> Segment:
            store.begin_checkpoint(info, factors)
            if segment_name == PASS_SEGMENT:
                return store.pass_segment(info.name, n)
            # an append segment is a pass segment over the new examples only (row i = i-th new example)
            return store._create_segment(info.name, segment_name, "pass", n)

        return self._rank0_first(begin, begin)

    def _check_resumed_chunks(
        self,
        segment: Segment,
        chunks: list[int],
        counts: np.ndarray,
        examples: Sequence,
        ids: np.ndarray,
        checkpoint: str,
    ) -> None:
        """Refuse to resume a pass whose committed chunks hold other examples (ids or content) than those given."""
        chunk_rows = segment.chunk_rows
        for chunk in chunks:
            start, stop = chunk * chunk_rows, chunk * chunk_rows + int(counts[chunk])
            same_ids = np.array_equal(segment.chunk_ids(chunk)[: counts[chunk]], ids[start:stop])
            recorded = segment.chunk_fingerprint(chunk)
            chunk_examples = [examples[i] for i in range(start, stop)]
            if not same_ids or (recorded and recorded != examples_fingerprint(self._require_task(), chunk_examples)):
                raise CheckpointMismatchError(
                    f"checkpoint {checkpoint!r}: the examples differ from those of the interrupted run "
                    f"(chunk {chunk}): "
                    f"their {'ids' if not same_ids else 'content'} changed in rows {start}..{stop - 1}; "
                    "resume with the same examples in the same order, or use a new checkpoint name"
                )

    def _log_chunks(
        self, segment: Segment, chunks: list[int], examples: Sequence, ids: np.ndarray, batch_size: int, desc: str
    ) -> int:
        """Project and write whole chunks of the pass segment (row ``i`` = example ``i``); returns rows computed.

        The training thread only computes rows and hands them over: the finiteness checks, the host copy, the cast
        to the store's dtype and the chunk writes run on the background writer (at most a few batches queued). A
        batch that fails there (non-finite rows) stops the pass: no later chunk is committed, and the error is
        raised here, on a later batch or at the end."""
        store, n, chunk_rows = self._require_store(), len(ids), segment.chunk_rows
        bounds = [(k * chunk_rows, min((k + 1) * chunk_rows, n)) for k in chunks]
        positions = np.concatenate([np.arange(lo, hi) for lo, hi in bounds]) if bounds else np.zeros(0, np.int64)
        pending = iter(zip(chunks, bounds))
        buffer: ChunkBuffer | None = None
        free = 0  # rows of ``buffer`` not yet handed to the writer
        failed: list[BaseException] = []  # set by the writer: later batches of this pass are dropped
        with tqdm(
            total=len(positions), desc=desc, unit="ex", disable=not self.progress or self.process_rank != 0
        ) as bar:
            for lo in range(0, len(positions), batch_size):
                batch_positions = positions[lo : lo + batch_size]
                batch_ids = ids[batch_positions]
                staged = self._stage(self.project([examples[int(p)] for p in batch_positions]))
                plan: list[tuple[ChunkBuffer, int, int]] = []  # (chunk buffer, rows lo..hi of this batch)
                taken = 0
                while taken < len(batch_ids):
                    if buffer is None or free == 0:
                        chunk, (start, stop) = next(pending)
                        fingerprint = examples_fingerprint(
                            self._require_task(), [examples[i] for i in range(start, stop)]
                        )
                        buffer = ChunkBuffer(
                            segment, chunk, stop - start, store.dim, store.dtype, self._writer, fingerprint
                        )
                        free = stop - start
                    take = min(free, len(batch_ids) - taken)
                    plan.append((buffer, taken, taken + take))
                    free, taken = free - take, taken + take
                self._writer.submit(functools.partial(self._write_pass_batch, staged, batch_ids, plan, failed))
                bar.update(len(batch_ids))
        return len(positions)

    def _write_pass_batch(
        self,
        staged: Callable[[], np.ndarray],
        ids: np.ndarray,
        plan: list[tuple[ChunkBuffer, int, int]],
        failed: list[BaseException],
    ) -> None:
        """(Writer thread) one batch of an offline pass into its chunk buffers; full chunks are written."""
        if failed:
            return
        try:
            rows = self._to_storage(staged(), ids)
            for buffer, lo, hi in plan:
                buffer.add(ids[lo:hi], rows[lo:hi])
        except BaseException as error:  # a bad row or a failed write: no later chunk of this pass is committed
            failed.append(error)
            raise

    def _stage(self, grads: torch.Tensor, scale: float | torch.Tensor = 1.0) -> Callable[[], np.ndarray]:
        """Hand rows to the writer without waiting for them: returns a function (called on the writer thread) that
        gives the rows as float32 NumPy, divided by ``scale``.

        On a GPU the rows are copied into pinned host memory on the current stream, and the writer waits for that
        copy's event (the training stream is never synchronised); on the CPU the tensor itself is handed over (the
        buffer is the capture's own, never reused). A tensor ``scale`` (a loss normaliser still on the device) travels
        the same way and is read on the writer thread."""
        grads = grads.detach()
        if grads.device.type == "cuda":
            host = torch.empty(grads.shape, dtype=grads.dtype, pin_memory=True)
            host.copy_(grads, non_blocking=True)
            host_scale: float | torch.Tensor = scale
            if isinstance(scale, torch.Tensor) and scale.device.type == "cuda":
                host_scale = torch.empty(scale.shape, dtype=scale.dtype, pin_memory=True)
                host_scale.copy_(scale.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()

            def ready() -> np.ndarray:
                event.synchronize()
                return _scaled(host.numpy(), host_scale)

            return ready
        if grads.device.type != "cpu":
            grads, scale = grads.cpu(), float(scale)
        return lambda: _scaled(grads.numpy(), scale)

    def _to_storage(self, grads: np.ndarray | torch.Tensor, ids: np.ndarray) -> np.ndarray:
        """Check rows are finite (also after rounding to the store's dtype) and convert them to the store's dtype."""
        if isinstance(grads, torch.Tensor):
            grads = grads.detach().cpu().numpy()
        bad = ~np.isfinite(grads).all(axis=1)
        if bad.any():
            bad_ids = ids[bad].tolist()
            raise NonFiniteGradientError(f"non-finite (NaN/Inf) gradients for example ids {bad_ids[:20]}", bad_ids)
        with np.errstate(over="ignore"):  # overflow is reported below with the example ids
            host = grads.astype(self._require_store().dtype, copy=False)
        overflow = ~np.isfinite(host).all(axis=1)
        if overflow.any():
            bad_ids = ids[overflow].tolist()
            raise NonFiniteGradientError(
                f"gradients of example ids {bad_ids[:20]} overflow float16; create the store with dtype='float32'",
                bad_ids,
            )
        return host

    def _write_captured(
        self, sink: AppendWriter, staged: Callable[[], np.ndarray], ids: np.ndarray, keep: np.ndarray | None
    ) -> None:
        """(Writer thread) one capture's rows, ``keep`` of them, appended to the checkpoint's capture segment."""
        rows = staged()
        if keep is not None:
            rows = rows[keep]
        sink.append(ids, self._to_storage(rows, ids))

    # -- in-training capture ---------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(
        self,
        checkpoint: str,
        lr: float,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        step: int | None = None,
        reduction: Literal["mean", "sum"] = "mean",
        scaler: Any | None = None,
        loss_scale: float | torch.Tensor = 1.0,
        weights_path: str | Path | None = None,
        losses: torch.Tensor | CaptureReference | None = None,
    ) -> Iterator[None]:
        """Log the examples of one training step, at the weights of that step, as a by-product of its backward.

        Wrap the ``backward()`` call (the forward may come before). The backward'd loss must be the
        per-example losses reduced by ``reduction`` over this batch (times ``loss_scale``, e.g. ``1/accumulation``);
        a ``torch.amp.GradScaler`` passed as ``scaler`` has its scale removed. Ids already committed for
        ``checkpoint`` by an earlier session are skipped (resume); an id seen twice in this session is an error.
        The checkpoint's ``lr`` is fixed by its first capture.

        ``weights_path``: the weights file this checkpoint's queries use (saved before its first step); read by the
        first capture of the checkpoint in this session, which records the file's sha256 with it, so that changed
        weights are refused when the run is indexed or served.

        ``losses``: the batch's per-example losses ``[B]`` (before the reduction), used by the first capture's
        exactness check: a few rows are compared with ``autograd.grad`` of those examples' losses. Without them
        the first capture compares the sum of its rows with the change of the parameters' ``.grad`` (which cannot
        see a batch dimension that is not dim 0, so pass ``losses`` when you have them).
        """
        if reduction not in ("mean", "sum"):
            raise CaptureError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        batch_ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        sink = self._capture_sink(checkpoint, lr, step, weights_path=weights_path)
        check = self._capture_reference(losses, len(batch_ids)) if self.capture_check_pending else None
        with self._state.armed(len(batch_ids), self.device):
            yield
        if self._state.backward_calls == 0:
            self._state.disarm()
            raise CaptureError(
                f"capture({checkpoint!r}) block ran no backward through the logged layers, so no gradient was seen; "
                "call loss.backward() inside the `with logger.capture(...)` block"
            )
        grads = self._state.disarm()
        factor = loss_scale * (1.0 / len(batch_ids) if reduction == "mean" else 1.0)
        if scaler is not None and scaler.is_enabled():
            factor *= float(scaler.get_scale())
            if not torch.isfinite(grads).all():
                # The scaler skips this optimizer step, so these examples changed nothing at this checkpoint: the
                # index gives them zero rows here (and their rows, if the loop retries them).
                fresh = [int(i) for i in batch_ids if int(i) not in self._capture_done[checkpoint]]
                self._writer.submit(functools.partial(sink.skip, np.asarray(fresh, dtype=np.int64)))
                self.skipped_ids.setdefault(checkpoint, set()).update(fresh)
                return
        if check is not None:  # the first batch: checked here, synchronously (once per logger)
            grads = grads / factor
            self._check_capture(check, grads, factor, checkpoint)
            factor = 1.0
        done = self._capture_done[checkpoint]
        keep = np.array([int(i) not in done for i in batch_ids], dtype=bool) if done else None
        kept = batch_ids if keep is None else batch_ids[keep]
        seen = self._capture_seen[checkpoint]
        new_ids = set(kept.tolist())
        if len(new_ids) != len(kept) or not new_ids.isdisjoint(seen):
            repeated = [int(i) for i in kept if int(i) in seen]
            raise DuplicateIdError(
                f"example ids logged twice for checkpoint {checkpoint!r}: {repeated[:10] or 'within one batch'}"
            )
        if not len(kept):
            return
        seen.update(new_ids)
        # no host synchronisation here: scaling, checks, the host copy and the write happen on the writer thread
        self._writer.submit(functools.partial(self._write_captured, sink, self._stage(grads, factor), kept, keep))

    @property
    def capture_check_pending(self) -> bool:
        """Whether the next :meth:`capture` runs the first-batch exactness check."""
        return self.verify and self.capture_verification is None

    def capture_reference(self, losses: torch.Tensor) -> CaptureReference:
        """The exact rows the first capture's rows are checked against, from the per-example ``losses`` of a forward
        whose backward has not run yet (the callbacks take it right after the forward; ``.grad`` is untouched)."""
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise CaptureError(f"losses must be the batch's per-example losses, a 1-D tensor; got {losses!r:.80}")
        positions = checked_positions(len(losses))
        exact = self.exact_rows()
        return CaptureReference("per-example", positions, exact, exact.of_losses(losses, positions))

    def _capture_reference(self, losses: torch.Tensor | CaptureReference | None, batch_size: int) -> CaptureReference:
        if isinstance(losses, CaptureReference):
            return losses
        if losses is not None:
            if losses.shape != (batch_size,):
                raise CaptureError(
                    f"losses has shape {tuple(losses.shape)}; expected one per example id ({batch_size},)"
                )
            return self.capture_reference(losses)
        # no per-example losses: the batch's summed rows against the change of .grad over this backward
        refuse_batch_coupling(self.model, "capture()")
        exact = self.exact_rows()
        before = [p.grad.detach().clone() if p.grad is not None else None for p in exact.parameters]
        return CaptureReference("batch-sum", [], exact, None, before)

    def _check_capture(
        self, check: CaptureReference, rows: torch.Tensor, factor: float | torch.Tensor, checkpoint: str
    ) -> None:
        """Compare the first capture's rows with the exact ones; record the result in the store, or refuse."""
        exact = check.exact
        if check.mode == "per-example":
            assert check.rows is not None
            compared, reference = rows[check.positions], check.rows
        else:
            if self._distributed:  # DDP averages .grad over ranks: the local sum is not comparable
                return
            after = [p.grad for p in exact.parameters]
            deltas = [_delta(a, b) for a, b in zip(after, check.before or [])]
            compared, reference = rows.sum(dim=0, keepdim=True), (exact.row(deltas) / factor).unsqueeze(0)
        errors = block_errors(compared, reference, self._state.specs)
        self.capture_verification = require_exact(
            errors,
            self._tolerance(exact),
            self.layers,
            check.mode,
            "capture()",
            max(len(check.positions), rows.shape[0]),
        )
        self._release_precision_watch()
        if self.store is not None and self.process_rank == 0:
            self.store.record_checks(verification=self.capture_verification.to_json(), checkpoint=checkpoint)

    def begin_capture(self, info: CheckpointInfo, adam_factors: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Create (or, resuming, validate) capture checkpoint ``info.name`` with its full metadata before its first
        :meth:`capture` (which by itself records only name, lr and step): weights path and sha256, optimizer path,
        and the Adam factors its rows are projected with (enter :meth:`adam_correction` with the same factors).
        A weights path given without its sha256 has it computed here."""
        if info.weights_path is not None and info.weights_sha256 is None:
            info = dataclasses.replace(info, weights_sha256=file_sha256(info.weights_path))
        self._capture_sink(info.name, info.lr, info.step, info=info, adam_factors=adam_factors)

    def _capture_sink(
        self,
        checkpoint: str,
        lr: float,
        step: int | None,
        info: CheckpointInfo | None = None,
        adam_factors: tuple[np.ndarray, np.ndarray] | None = None,
        weights_path: str | Path | None = None,
    ) -> AppendWriter:
        if checkpoint in self._sinks:
            if self._capture_lr[checkpoint] != float(lr):  # cached: reading the store's attributes costs ~1.5 ms
                raise CaptureError(
                    f"checkpoint {checkpoint!r} was started with lr={self._capture_lr[checkpoint]}; a capture passed "
                    f"lr={lr}. Use the checkpoint's nominal learning rate (per-step rates are not stored)"
                )
            return self._sinks[checkpoint]
        store = self._require_store()
        for other in self._sinks.values():
            self._writer.submit(other.flush)  # a new checkpoint: commit the last one's partial chunk
        self._writer.flush()
        if info is None:
            sha256 = file_sha256(weights_path) if weights_path is not None else None
            path = str(Path(weights_path).resolve()) if weights_path is not None else None
            info = CheckpointInfo(name=checkpoint, lr=float(lr), step=step, weights_path=path, weights_sha256=sha256)
        self._rank0_first(
            lambda: store.begin_checkpoint(info, adam_factors), lambda: store.begin_checkpoint(info, adam_factors)
        )
        if self.capture_verification is not None and self.process_rank == 0:  # checked once, holds for every checkpoint
            store.record_checks(verification=self.capture_verification.to_json(), checkpoint=checkpoint)
        self._capture_lr[checkpoint] = info.lr
        self._capture_done[checkpoint] = set(store.committed_ids(checkpoint).tolist())
        self._capture_seen[checkpoint] = set()
        self._sinks[checkpoint] = AppendWriter(store, checkpoint, f"r{self.process_rank}", self._writer)
        return self._sinks[checkpoint]

    # -- lifecycle -------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit everything captured so far (including partly filled chunks) and wait for the writes."""
        for sink in self._sinks.values():
            self._writer.submit(sink.flush)  # after the rows queued before it, on the writer thread
        self._writer.flush()

    def close(self) -> None:
        """Flush, stop the writer thread and remove every hook."""
        try:
            self.flush()
        finally:
            self._writer.close()
            super().close()

    def __enter__(self) -> GradientLogger:
        return self
