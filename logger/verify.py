"""The first-batch exactness check: logged rows against the exact per-example gradient.

The hooks compute a block's row from what they assume its module computes (``y = W x + b``, a lookup, a
normalisation). A model can break that assumption in ways no list of special cases closes: a subclass that
overrides ``forward``, a batch dimension that is not dim 0, a functional use of a weight, a compiled block, a
layer that couples the examples of a batch. So the first batch of every path that produces rows is checked
against autograd itself: for a few examples ``i``, ``torch.autograd.grad(loss[i], parameters)`` within the
batched forward, projected with the same matrices (``P_out G P_in^T`` of the block's canonical gradient),
must equal row ``i`` block by block. A block that does not is refused with :class:`ExactnessError`.

When the per-example losses of a training step are not at hand (a ``capture()`` without ``losses=``), the
check compares the sum of the batch's rows with the projected change of the parameters' ``.grad`` instead:
that catches wrong scales, missed uses, wrong rows and compiled blocks, but not a batch dimension that is
not dim 0 nor batch coupling (see :func:`batch_coupled_modules`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gradstore.projection import LayerMatrices, LayerSpec

from .errors import ExactnessError, UnsupportedLayerError
from .selection import SelectedLayer, covered_parameters

CheckMode = Literal["per-example", "batch-sum", "off"]

EXAMPLES_CHECKED = 3
"""At most this many examples of the first batch are checked (the first, the middle and the last)."""

FLOAT32_TOLERANCE = 1e-3
"""Relative error allowed per block in float32. Real mismatches are O(1e-2..1); float32 rounding ~1e-6."""

HALF_TOLERANCE = 5e-2
"""Relative error allowed when parameters or the forward are half precision (bf16 rounds at ~4e-3)."""

FLOOR = 1e-3
"""A block's error is relative to max(its norm, FLOOR * the whole row's norm): blocks with (almost) no gradient
are compared at the scale of the example's gradient, not at the scale of rounding noise."""


@dataclass(frozen=True)
class Verification:
    """What the first-batch check found, as recorded in the store and shown by ``gradstore info`` / ``/v1/run``.

    ``mode``: ``per-example`` (rows against ``autograd.grad`` of each checked example's loss), ``batch-sum``
    (the sum of the batch's rows against the parameters' gradient) or ``off`` (``verify=False``).
    ``errors``: the worst relative error of each block; ``max_error``: the worst over blocks.
    """

    mode: CheckMode
    path: str
    tolerance: float = 0.0
    examples: int = 0
    max_error: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.mode != "off"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["errors"] = {k: float(f"{v:.3g}") for k, v in self.errors.items()}
        out["max_error"] = float(f"{self.max_error:.3g}")
        return out


class PrecisionWatch:
    """Notes whether any logged module returns a half-precision output (autocast inside a Task's loss, a bf16
    model), which sets the check's tolerance; forward hooks kept only until the checks have run."""

    def __init__(self, layers: Sequence[SelectedLayer]):
        self.half = False
        modules = {id(layer.module): layer.module for layer in layers}
        self._handles = [m.register_forward_hook(self._record) for m in modules.values()]

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dtype in (torch.float16, torch.bfloat16):
            self.half = True

    def tolerance(self, parameters: Sequence[torch.Tensor], device: torch.device) -> float:
        """The per-block tolerance: half precision anywhere (parameters, outputs, autocast) loosens it."""
        half = self.half or any(p.dtype in (torch.float16, torch.bfloat16) for p in parameters)
        if half or torch.is_autocast_enabled(device.type):
            return HALF_TOLERANCE
        return FLOAT32_TOLERANCE

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def checked_positions(batch_size: int) -> list[int]:
    """Which examples of a batch are checked: the first, the middle and the last (distinct)."""
    return sorted({0, batch_size // 2, batch_size - 1})[:EXAMPLES_CHECKED]


def project_canonical(gradient: torch.Tensor, matrices: LayerMatrices) -> torch.Tensor:
    """``vec_row(P_out G P_in^T)`` for one canonical gradient ``G`` ``[d_out, in_dim]``, in float32 (float64 for a
    float64 model): its rounding (~1e-6) is far below the check's tolerance, and a large embedding's ``G`` is not
    copied to float64."""
    dtype = torch.float64 if gradient.dtype == torch.float64 else torch.float32
    if gradient.is_sparse:  # nn.Embedding(sparse=True)
        gradient = gradient.to_dense()
    p_out, p_in = matrices.p_out.to(dtype), matrices.p_in.to(dtype)
    return (p_out @ gradient.to(device=p_out.device, dtype=dtype) @ p_in.T).flatten().double()


class ExactRows:
    """Exact projected rows ``[k, D]`` (float64) of examples ``positions`` of a batch, from parameter gradients."""

    def __init__(
        self,
        layers: Sequence[SelectedLayer],
        specs: Mapping[str, LayerSpec],
        matrices: Mapping[str, LayerMatrices],
        model: nn.Module,
    ):
        self.layers, self.specs, self.matrices, self.model = list(layers), specs, matrices, model
        self.parameters = covered_parameters(self.layers)
        self.dim = sum(spec.dim for spec in specs.values())

    def row(self, gradients: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """One projected row from gradients aligned with :attr:`parameters` (None: unused, i.e. zero)."""
        by_id = {id(p): g if g is not None else torch.zeros_like(p) for p, g in zip(self.parameters, gradients)}
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.parameters[0].device)
        for layer in self.layers:
            grads = {role: by_id[id(p)] for role, p in layer.parameters().items()}
            canonical = layer.canonical({k: _dense(v.detach()) for k, v in grads.items()})
            out[self.specs[layer.name].slice] = project_canonical(canonical, self.matrices[layer.name]).to(out.device)
        return out

    def of_losses(self, losses: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """``[len(positions), D]``: row ``j`` from ``autograd.grad(losses[positions[j]])``; ``.grad`` untouched."""
        rows = []
        for i in positions:
            grads: Sequence[torch.Tensor | None] | None
            try:
                grads = torch.autograd.grad(losses[i], self.parameters, retain_graph=True, allow_unused=True)
            except RuntimeError as exc:
                if "use_reentrant" not in str(exc):
                    raise
                grads = None  # reentrant checkpointing refuses autograd.grad
            if grads is None or any(g is None for g in grads):
                # A parameter autograd.grad calls unused may sit behind a reentrant checkpoint, whose inner graph only
                # a real backward() reaches: ask that, with every .grad of the model put back afterwards.
                grads = self._by_backward(losses[i])
            rows.append(self.row(grads))
        return torch.stack(rows)

    def _by_backward(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """``loss``'s parameter gradients through ``backward()``, with every ``.grad`` restored afterwards."""
        everything = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in everything]
        try:
            for p in everything:
                p.grad = None
            loss.backward(retain_graph=True)
            return [p.grad for p in self.parameters]
        finally:
            for p, grad in zip(everything, saved):
                p.grad = grad


def _dense(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.to_dense() if gradient.is_sparse else gradient


def block_errors(rows: torch.Tensor, exact: torch.Tensor, specs: Mapping[str, LayerSpec]) -> dict[str, float]:
    """Worst relative error of each block over the compared rows (``[k, D]`` each)."""
    rows, exact = rows.double().to(exact.device), exact.double()
    scale = exact.norm(dim=1) * FLOOR
    out: dict[str, float] = {}
    for name, spec in specs.items():
        a, b = rows[:, spec.slice], exact[:, spec.slice]
        denominator = torch.maximum(torch.maximum(a.norm(dim=1), b.norm(dim=1)), scale).clamp_min(1e-30)
        error = ((a - b).norm(dim=1) / denominator).max()
        out[name] = float(error) if torch.isfinite(error) else math.inf
    return out


def require_exact(
    errors: Mapping[str, float],
    tolerance: float,
    layers: Sequence[SelectedLayer],
    mode: CheckMode,
    path: str,
    examples: int,
) -> Verification:
    """The :class:`Verification` of these errors, or :class:`ExactnessError` naming the worst failing block."""
    failing = {name: e for name, e in errors.items() if not e <= tolerance}
    if failing:
        name = max(failing, key=lambda n: failing[n])
        error = failing[name]
        module = next((type(layer.module).__name__ for layer in layers if layer.name == name), "?")
        others = sorted(set(failing) - {name})
        also = f" (also failing: {', '.join(others[:8])}{' ...' if len(others) > 8 else ''})" if others else ""
        raise ExactnessError(
            f"layer {name!r} ({module}): its logged rows differ from the exact per-example gradient on the first "
            f"batch (relative error {error:.3g} > tolerance {tolerance:g}, {mode} check in {path}){also}. "
            f"gradstore's hooks assume what {module} computes, and this model breaks that assumption (a subclass "
            "that overrides forward, a batch dimension that is not dim 0, a use of the weight outside the module, "
            "a compiled block, or a layer that mixes the examples of a batch). Leave the layer out with "
            f"layers=[..., '!{name}'], or report the model; verify=False turns the check off (rows may then be wrong)",
            layer=name,
            relative_error=error,
            tolerance=tolerance,
        )
    return Verification(mode, path, tolerance, examples, max(errors.values(), default=0.0), dict(errors))


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Modules in training mode that mix the examples of a batch (BatchNorm with batch statistics)."""
    return [
        name or type(module).__name__
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]


def refuse_batch_coupling(model: nn.Module, path: str) -> None:
    """Refuse training-mode batch statistics when rows are taken from a training backward."""
    coupled = batch_coupled_modules(model)
    if coupled:
        raise UnsupportedLayerError(
            f"{', '.join(coupled[:5])} (BatchNorm in training mode) normalise with the batch's statistics, so every "
            f"example's gradient depends on the others and no row of {path} is that example's own gradient. Log "
            "with an offline pass (log_checkpoint / gradstore index run the model in eval mode), or use GroupNorm / "
            "LayerNorm"
        )


def warn_unverified(path: str) -> None:
    warnings.warn(
        f"{path}: verify=False, the first-batch exactness check is off; rows are not checked against the exact "
        "per-example gradient and may be silently wrong for models gradstore's hooks misread",
        stacklevel=3,
    )
