"""GradientProjector: hooks a model and computes Kronecker-projected per-example gradients, without any I/O.

The query engine projects query examples with it; :class:`~gradstore.logger.GradientLogger` extends it with
writing to a store (offline passes and in-training capture).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from gradstore.projection import ProjectionMismatchError, ProjectionSpec, build_matrices, fold_denominator, matrices_checksum
from gradstore.projection.spec import Init

from .errors import TaskError
from .hooks import CaptureState, LayerHook, frozen_parameters
from .layers import SelectedLayer, select_layers
from .optimizer_state import split_factors
from .pca import pca_bases
from .task import Task, move_to_device

Rank = int | tuple[int, int]


class GradientProjector:
    """Per-example gradients of ``model``'s selected layers, projected LoGra-style inside forward/backward hooks.

    Args:
        model: the model to hook (its selected modules get forward hooks until :meth:`close`).
        task: the user's :class:`Task` (collate, per-example loss); needed by :meth:`project`.
        rank: ``k`` for both sides, or ``(k_in, k_out)``; clipped to each layer's dimensions.
        init: ``gaussian`` | ``rademacher`` | ``orthonormal`` | ``pca``.
        layers: glob patterns on module names (``named_modules``); each must match a supported module.
        seed: projection seed; with the same arguments two projectors project into the same space.
        pca_examples: examples for the ``init="pca"`` statistics pass (default: the first 1024 training examples).
        spec: reuse an existing projection (e.g. ``store.spec``, to project queries exactly as a store was
            logged); ``rank``, ``init``, ``layers`` and ``seed`` are then ignored.
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
    ):
        self.model, self.task = model, task
        self.device = next(model.parameters()).device
        if spec is not None:
            layers = [layer.name for layer in spec.layers]
        self.layers: list[SelectedLayer] = select_layers(model, list(layers))
        _warn_on_shared_weights(self.layers)
        if spec is not None:
            _check_layers_match(self.layers, spec)
        else:
            bases = self._pca_bases(rank, pca_examples) if init == "pca" else None
            spec = ProjectionSpec.build([layer.dims() for layer in self.layers], rank, init=init, seed=seed, pca_bases=bases)
        self.base_matrices = build_matrices(spec, device=self.device, verify=spec.matrix_sha256 is not None)
        self.spec = spec if spec.matrix_sha256 else spec.with_checksum(matrices_checksum(self.base_matrices))
        self._state = CaptureState(dict(self.base_matrices), self.spec.dim)
        self._hooks = [LayerHook(layer, layer_spec, self._state) for layer, layer_spec in zip(self.layers, self.spec.layers)]

    def _pca_bases(self, rank: Rank, examples: Sequence | None) -> dict:
        task = self._require_task()
        if examples is None:
            train = task.train_examples()
            examples = [train[i] for i in range(min(len(train), 1024))]
        k = (rank, rank) if isinstance(rank, int) else (rank[0], rank[1])
        return pca_bases(self.model, task, self.layers, examples, k, device=self.device)

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
        """Projected gradients ``[B, D]`` (float32, on the model's device) of a batch of examples at the current weights.

        Uses the per-example loss, or the Task's measurement when ``measurement`` is true. The model is
        put in eval mode for the call and parameters' ``.grad`` are left untouched.
        """
        task = self._require_task()
        batch = move_to_device(task.collate(list(examples)), self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            with frozen_parameters(self.model, self._state), self._state.armed(len(examples), self.device):
                values = (task.measurement if measurement else task.loss)(self.model, batch)
                check_losses(values, len(examples))
                if values.requires_grad:
                    values.sum().backward()
                return self._state.disarm()
        finally:
            self.model.train(was_training)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block do no projection work (e.g. steps you will not capture)."""
        self._state.paused = True
        try:
            yield
        finally:
            self._state.paused = False

    def close(self) -> None:
        """Remove every hook."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> "GradientProjector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _warn_on_shared_weights(layers: list[SelectedLayer]) -> None:
    seen: dict[int, str] = {}
    for layer in layers:
        key = id(layer.module.weight)
        if key in seen:
            warnings.warn(
                f"layers {seen[key]!r} and {layer.name!r} share a weight; each is projected separately, so their "
                "cross terms are not in the inner product. Select only one of them for exact TracIn.",
                stacklevel=4,
            )
        seen[key] = layer.name
