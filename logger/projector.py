"""GradientProjector: hooks a model and computes Kronecker-projected per-example gradients, without any I/O.

The query engine projects query examples with it; :class:`~gradstore.logger.GradientLogger` extends it with
writing to a store (offline passes and in-training capture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from gradstore.projection import (
    ProjectionMismatchError,
    ProjectionSpec,
    build_matrices,
    fold_denominator,
    matrices_checksum,
)
from gradstore.projection.spec import Init

from .adam_fold import split_factors
from .audit import audit_parameter_uses
from .coverage import Coverage, coverage_of, warn_partial_coverage
from .errors import TaskError, UnsupportedLayerError
from .hooks import CaptureState, InstalledHooks, PositionBuffers, frozen_parameters
from .pca import BlockStatistics
from .selection import SelectedLayer, select_layers
from .task import Task, move_to_device
from .verify import (
    ExactRows,
    PrecisionWatch,
    Verification,
    block_errors,
    checked_positions,
    require_exact,
    warn_unverified,
)

Rank = int | tuple[int, int]


class PositionGradients(NamedTuple):
    """One example's projected gradient split by position: ``per_position.sum(0) + rest`` is its ``project`` row.

    ``per_position`` ``[T, D]``: row ``t`` holds the terms ``(P_out g_t)(P_in x~_t)^T`` of every module call with T
    positions (for a text model, input position ``t``: token ``t``'s embedding and the computation at ``t``,
    which in a causal LM predicts token ``t + 1``); ``rest`` ``[D]``: the terms of calls with another number of
    positions (a pooled classifier head, convolution pixels). Float32, on the model's device.
    """

    per_position: torch.Tensor
    rest: torch.Tensor


class GradientProjector:
    """Per-example gradients of ``model``'s selected layers, projected LoGra-style inside forward/backward hooks.

    Args:
        model: the model to hook (its selected modules get forward hooks until :meth:`close`).
        task: the user's :class:`Task` (collate, per-example loss); needed by :meth:`project`.
        rank: ``k`` for both sides, or ``(k_in, k_out)``; clipped to each layer's dimensions.
        init: ``gaussian`` | ``rademacher`` | ``orthonormal`` | ``pca``.
        layers: glob patterns on module names (``named_modules``); each must match a supported module, ``!pattern``
            excludes. ``"*"`` logs every trainable parameter of the supported modules (Linear, Embedding, Conv2d, HF
            Conv1D, MultiheadAttention, and the affine parameters of LayerNorm / RMSNorm / GroupNorm / BatchNorm);
            a tied weight is one block. A selected module that cannot be logged exactly is refused.
        seed: projection seed; with the same arguments two projectors project into the same space.
        pca_examples: examples for the ``init="pca"`` statistics pass (default: the first 1024 training examples).
        spec: reuse an existing projection (e.g. ``store.spec``, to project queries exactly as a store was
            logged); ``rank``, ``init``, ``layers`` and ``seed`` are then ignored.
        verify: check the first batch's rows against the exact per-example gradient (``autograd.grad`` of each
            checked example's loss, projected with the same matrices) and refuse a block that differs
            (:class:`~gradstore.logger.ExactnessError`); ``False`` skips the check with a warning.

    Attributes:
        coverage: which trainable parameters the blocks cover (:class:`~gradstore.logger.coverage.Coverage`).
        verification: what the first-batch check found, once it ran (None before).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task | None = None,
        rank: Rank = 8,
        init: Init = "gaussian",
        layers: Sequence[str] = ("*",),
        seed: int = 0,
        pca_examples: Sequence | None = None,
        spec: ProjectionSpec | None = None,
        verify: bool = True,
    ):
        self.model, self.task = model, task
        self.device = next(model.parameters()).device
        _refuse_second_projector(model)
        if spec is not None:
            layers = [layer.name for layer in spec.layers]
        self.layers: list[SelectedLayer] = select_layers(model, list(layers))
        self.coverage: Coverage = coverage_of(model, self.layers)
        if spec is None and "*" in layers:
            warn_partial_coverage(self.coverage)
        self.verify = verify
        self.verification: Verification | None = None
        self._precision: PrecisionWatch | None = PrecisionWatch(self.layers) if verify else None
        if not verify:
            warn_unverified(type(self).__name__)
        if spec is not None:
            _check_layers_match(self.layers, spec)
        self._state = CaptureState()
        self._installed: InstalledHooks | None = InstalledHooks(model, self.layers, self._state)
        self._audited = False
        try:
            if spec is None:
                bases = self._pca_bases(rank, pca_examples) if init == "pca" else None
                dims = [layer.dims() for layer in self.layers]
                spec = ProjectionSpec.build(dims, rank, init=init, seed=seed, pca_bases=bases)
            self.base_matrices = build_matrices(spec, device=self.device, verify=spec.matrix_sha256 is not None)
        except BaseException:
            self._remove_hooks()
            raise
        self.spec = spec if spec.matrix_sha256 else spec.with_checksum(matrices_checksum(self.base_matrices))
        self._state.configure(self.spec.layers, self.base_matrices)

    def _pca_bases(self, rank: Rank, examples: Sequence | None) -> dict:
        """Top-``k`` eigenvectors of every block's input and output-side covariances (``init="pca"``)."""
        task = self._require_task()
        if examples is None:
            train = task.train_examples()
            examples = [train[i] for i in range(min(len(train), 1024))]
        k_in, k_out = (rank, rank) if isinstance(rank, int) else (rank[0], rank[1])
        stats = {layer.name: BlockStatistics(layer, self.device) for layer in self.layers}
        self._state.statistics = stats
        try:
            for start in range(0, len(examples), 32):
                self._gradient_pass([examples[i] for i in range(start, min(start + 32, len(examples)))], task.loss)
        finally:
            self._state.statistics = None
        return {name: s.bases(k_in, k_out) for name, s in stats.items()}

    def _require_task(self) -> Task:
        if self.task is None:
            raise TaskError(f"this operation needs a Task: {type(self).__name__}(model, task, ...)")
        return self.task

    @contextlib.contextmanager
    def adam_correction(self, factors: tuple[np.ndarray, np.ndarray] | None) -> Iterator[None]:
        """Use projections with Adam's denominator folded in (``None``: the plain ones) inside the block."""
        if factors is None:
            yield
            return
        previous = self._state.matrices
        per_layer = split_factors(self.spec, factors)
        self._state.matrices = {
            name: fold_denominator(matrices, *per_layer[name]) for name, matrices in self.base_matrices.items()
        }
        try:
            yield
        finally:
            self._state.matrices = previous

    def project(self, examples: Sequence, measurement: bool = False) -> torch.Tensor:
        """Projected gradients ``[B, D]`` (float32, on the model's device) of a batch at the current weights.

        Uses the per-example loss, or the Task's measurement when ``measurement`` is true (negated when the Task
        says ``higher_is_better``, so that proponents keep positive scores). The model is
        put in eval mode for the call and parameters' ``.grad`` are left untouched.
        """
        return self._gradient_pass(list(examples), self._objective(measurement))

    def project_positions(
        self, example: Any, measurement: bool = False, positions: int | None = None
    ) -> PositionGradients:
        """One example's projected gradient split into per-position terms and a rest (see :class:`PositionGradients`).

        Exact: ``per_position.sum(0) + rest`` equals ``project([example])[0]`` to float32 rounding, since the
        projected gradient of every block is a sum over its positions. ``positions``: the ``T`` whose calls are
        split (default: the position count of the first hooked module call, e.g. the token embedding's).
        """
        if positions is not None and (isinstance(positions, bool) or not isinstance(positions, int) or positions < 1):
            raise ValueError(f"positions must be a positive integer or None, got {positions!r}")
        buffers = PositionBuffers(self._state.dim, self.device, positions)
        self._state.positions = buffers
        try:
            self._gradient_pass([example], self._objective(measurement))
        finally:
            self._state.positions = None
        per_position = buffers.per_position
        if per_position is None:  # no hooked call carried a gradient
            per_position = torch.zeros(0, self._state.dim, dtype=torch.float32, device=self.device)
        return PositionGradients(per_position, buffers.rest)

    def _objective(self, measurement: bool) -> Callable[[nn.Module, Any], torch.Tensor]:
        """The per-example loss, or the measurement with lower meaning "more of the output"."""
        task = self._require_task()
        if not measurement:
            return task.loss
        if task.higher_is_better:  # score = <grad m_q, grad loss_i> needs m where lower means "more of the output"
            return lambda model, batch: -task.measurement(model, batch)
        return task.measurement

    def _gradient_pass(self, examples: list, fn: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
        """Forward and backward one batch in eval mode with frozen parameters; returns the filled buffer.

        The first batch's rows are checked against the exact per-example gradient (see :mod:`.verify`).
        """
        task = self._require_task()
        batch = move_to_device(task.collate(examples), self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            rows = self._frozen_pass(examples, batch, fn)
            if self.check_pending and self._state.statistics is None:
                self._check_rows(rows, batch, fn)
            return rows
        finally:
            self.model.train(was_training)

    def _frozen_pass(self, examples: list, batch: Any, fn: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
        with frozen_parameters(self.model, self._state):
            for attempt in range(2):
                with self._state.armed(len(examples), self.device):
                    with self._audit():
                        values = fn(self.model, batch)
                    check_losses(values, len(examples))
                    if self._state.undecided and attempt == 0:
                        self._resolve_layouts(examples, fn)  # then run the batch again, expanded where needed
                        self._state.disarm()
                        continue
                    if values.requires_grad:
                        values.sum().backward()
                    return self._state.disarm()
            raise AssertionError("unreachable")

    @property
    def check_pending(self) -> bool:
        """Whether the next batch's rows are checked (``verify`` is on and no batch has been checked yet)."""
        return self.verify and self.verification is None

    def exact_rows(self) -> ExactRows:
        """Exact projected rows from parameter gradients, with the matrices in use now (Adam fold included)."""
        return ExactRows(self.layers, self._state.specs, self._state.matrices, self.model)

    def _check_rows(self, rows: torch.Tensor, batch: Any, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        """Compare some rows of this batch with ``autograd.grad`` of those examples' losses in one unhooked forward
        (same batch, same mode), and refuse a block that differs."""
        exact = self.exact_rows()
        positions = checked_positions(rows.shape[0])
        flags = [(p, p.requires_grad) for p in exact.parameters]
        self._state.paused = True
        try:
            for p, _ in flags:
                p.requires_grad_(True)
            with torch.enable_grad():
                values = fn(self.model, batch)
                if values.requires_grad:
                    reference = exact.of_losses(values, positions)
                else:  # the objective does not depend on the logged parameters: their exact rows are zero
                    reference = torch.zeros(len(positions), exact.dim, dtype=torch.float64, device=self.device)
        finally:
            self._state.paused = False
            for p, flag in flags:
                p.requires_grad_(flag)
        errors = block_errors(rows[positions], reference, self._state.specs)
        self.verification = require_exact(
            errors, self._tolerance(exact), self.layers, "per-example", "project", len(positions)
        )
        self._release_precision_watch()

    @property
    def capture_check_pending(self) -> bool:
        """Whether a training-time capture still has its first-batch check to run (none for a projector)."""
        return False

    def _tolerance(self, exact: ExactRows) -> float:
        assert self._precision is not None
        return self._precision.tolerance(exact.parameters, self.device)

    def _release_precision_watch(self) -> None:
        """Take the precision hooks off once no check is pending."""
        if self._precision is not None and not self.check_pending and not self.capture_check_pending:
            self._precision.remove()

    def _audit(self) -> contextlib.AbstractContextManager:
        """The first forward pass checks that no logged parameter is used outside its hooked modules."""
        if self._audited:
            return contextlib.nullcontext()
        self._audited = True
        return audit_parameter_uses(self.model, self.layers)

    def _resolve_layouts(self, examples: list, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        """Decide, with one-example forward passes, whether ambiguous 1-D index inputs are per example or shared.

        A 1-D input of length B could be one index per example or positions ``arange(T)`` with ``T == B``. Alone,
        an example's per-example input has length 1, while shared positions keep their length T > 1 for some
        example. The answer is remembered by the layer's hook.
        """
        task = self._require_task()
        undecided = set(self._state.undecided)
        for example in examples:
            observed: dict = {}
            self._state.probing = observed
            try:
                with torch.no_grad():
                    fn(self.model, move_to_device(task.collate([example]), self.device))
            finally:
                self._state.probing = None
            for hook in list(undecided):
                if any(len(shape) == 1 and shape[0] != 1 for shape in observed.get(hook, [])):
                    hook.layout_1d = "shared"
                    undecided.discard(hook)
            if not undecided:
                break
        for hook in undecided:
            hook.layout_1d = "batch"

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block do no projection work (e.g. steps you will not capture)."""
        self._state.paused = True
        try:
            yield
        finally:
            self._state.paused = False

    def close(self) -> None:
        """Remove every hook and restore every patched module."""
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        if getattr(self, "_precision", None) is not None:
            self._precision.remove()  # type: ignore[union-attr]
        if self._installed is not None:
            self._installed.remove()
            self._installed = None

    def __enter__(self) -> GradientProjector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _refuse_second_projector(model: nn.Module) -> None:
    """Two projectors on one model would both patch its forward (positions expanded twice, outputs changed)."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, InstalledHooks):
            raise UnsupportedLayerError(
                f"{type(model).__name__} already has a gradstore GradientProjector/GradientLogger attached; two on one "
                "model would change its outputs. close() the first one (or use it as a context manager) before "
                "attaching another"
            )


def check_losses(values: torch.Tensor, batch_size: int) -> None:
    """Refuse a Task loss/measurement that is not one value per example."""
    if not isinstance(values, torch.Tensor) or values.shape != (batch_size,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise TaskError(
            f"Task.loss/measurement must return one value per example, shape ({batch_size},); got {shape}. "
            "Use reduction='none' and sum over each example's tokens"
        )


def _check_layers_match(layers: list[SelectedLayer], spec: ProjectionSpec) -> None:
    found = [layer.dims() for layer in layers]
    expected = [(layer.name, layer.kind, layer.d_in, layer.d_out, layer.bias) for layer in spec.layers]
    if found != expected:
        raise ProjectionMismatchError(f"the model's layers {found} do not match the projection spec's {expected}")
