"""Folding a matched optimizer state into the rank-1 denominator of the TrackStar correction.

Adam/AdamW (``exp_avg_sq``, ``max_exp_avg_sq`` with ``amsgrad``) and Hugging Face's Adafactor (factored
``exp_avg_sq_row``/``exp_avg_sq_col``, or ``exp_avg_sq``) are read with the hyperparameters of each parameter's
group (``betas``, ``eps``, ``amsgrad``) and its own step; each logged layer's denominator, laid out like its
canonical gradient, is fitted by rank-1 factors ``r c^T``. The layout used to match the state (see
:mod:`.optimizer_state`), and per layer the hyperparameters and how many rows/columns were zeroed or floored,
are returned in :attr:`AdamFold.summary` for the checkpoint's record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradstore.projection import ProjectionSpec
from gradstore.projection.adam import adafactor_denominator, adam_denominator, rank1_fit

from .errors import OptimizerStateError, TaskError
from .optimizer_state import _Entry, _tensor, match_optimizer_state
from .selection import SelectedLayer

DEFAULT_FLOOR = 1e-3
"""Factors below this fraction of their layer's median are raised to it (see :func:`rank1_fit`)."""

PYTORCH_DEFAULTS = {"beta2": 0.999, "eps": 1e-8}  # for name mappings that carry no hyperparameters


@dataclass(frozen=True)
class AdamFold:
    """The folded denominator of every logged layer, concatenated in spec order, and what was done.

    ``r``: ``[sum d_out]``, ``c``: ``[sum in_dim]`` float32 (``inf`` marks a zeroed row/column); ``summary`` is
    JSON-serialisable: ``{"layout", "floor", "layers": {name: {"optimizer", "beta2" (Adam), "eps", "step",
    "zeroed_rows", "zeroed_cols", "floored_rows", "floored_cols"}}}``; a field whose value differs between the
    layer's weight and bias is a ``{"weight": ..., "bias": ...}`` mapping.
    """

    r: np.ndarray
    c: np.ndarray
    summary: dict[str, Any]

    @property
    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(r, c)`` as the store keeps them."""
        return self.r, self.c


def _step_of(entry: _Entry) -> int | None:
    step = entry.state.get("step")
    if step is None:
        return None
    return round(float(torch.as_tensor(step).item()))


def _denominator(
    name: str, entry: _Entry, step: int | None, beta2: float | None, eps: float | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(D, dead, info)`` in the parameter's shape: the update's denominator, and where no gradient ever was."""
    state, group = entry.state, entry.group
    row, col = _tensor(state, "exp_avg_sq_row"), _tensor(state, "exp_avg_sq_col")
    adafactor = row is not None or ("decay_rate" in group and "betas" not in group)
    if adafactor:
        floor_eps = group.get("eps", (1e-30, 1e-3))
        eps1 = float(floor_eps[0] if isinstance(floor_eps, Sequence) else floor_eps)
        info = {"optimizer": "adafactor", "eps": eps1, "step": _step_of(entry)}
        if row is not None and col is not None:
            d = adafactor_denominator(row, col)
            dead = (row <= 2 * eps1).unsqueeze(-1) | (col <= 2 * eps1).unsqueeze(-2)  # mean grad^2 below eps[0]
            return d, dead.expand(d.shape), info
        v = _tensor(state, "exp_avg_sq")
        if v is None:
            raise OptimizerStateError(f"the Adafactor state of {name!r} has neither exp_avg_sq_row/col nor exp_avg_sq")
        v = v.detach().to(torch.float64)
        return v.clamp_min(0).sqrt(), v <= 2 * eps1, info
    amsgrad = bool(group.get("amsgrad", False))
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    v = _tensor(state, key)
    if v is None:
        keys = sorted(k for k in state if isinstance(state[k], torch.Tensor))
        hint = " (8-bit optimizers keep quantised states: save full-precision exp_avg_sq)" if "state2" in state else ""
        raise OptimizerStateError(
            f"the optimizer state of {name!r} has no {key} (it has {keys}){hint}: the Adam correction needs Adam/AdamW "
            "(exp_avg_sq) or Adafactor (exp_avg_sq_row/col); log without optimizer_state for other optimizers"
        )
    betas = group.get("betas")
    b2 = beta2 if beta2 is not None else float(betas[1]) if betas is not None else PYTORCH_DEFAULTS["beta2"]
    e = eps if eps is not None else float(group["eps"]) if "eps" in group else PYTORCH_DEFAULTS["eps"]
    s = step if step is not None else _step_of(entry)
    info = {"optimizer": "adam (amsgrad)" if amsgrad else "adam", "beta2": b2, "eps": e, "step": s}
    return adam_denominator(v, step=s, beta2=b2, eps=e), v == 0, info


def _layer_parameters(layer: SelectedLayer) -> dict[str, torch.Tensor]:
    """The block's parameters by role (``{"weight": p, "bias": p}``)."""
    if callable(getattr(layer, "parameters", None)):
        return dict(layer.parameters())
    return {k: p for k in ("weight", "bias") if isinstance(p := getattr(layer.module, k, None), torch.Tensor)}


def _canonical(layer: SelectedLayer, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Tensors shaped like the block's parameters -> its canonical ``[d_out, in_dim]`` layout."""
    if callable(getattr(layer, "canonical", None)):
        return layer.canonical(tensors)
    return layer.adapter.canonical(layer.module, tensors["weight"], tensors.get("bias"))


def _merge(infos: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One value per field when the layer's parameters agree, else ``{parameter: value}``."""
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for info in infos.values() for k in info):
        values = {p: info.get(key) for p, info in infos.items()}
        distinct = set(map(repr, values.values()))
        merged[key] = next(iter(values.values())) if len(distinct) == 1 else values
    return merged


def adam_fold(
    model: nn.Module,
    layers: list[SelectedLayer],
    spec: ProjectionSpec,
    state: str | Path | Mapping[str, Any],
    step: int | None = None,
    eps: float | None = None,
    beta2: float | None = None,
    floor: float = DEFAULT_FLOOR,
) -> AdamFold:
    """Rank-1 factors of every logged layer's optimizer denominator, matched by parameter identity.

    ``step``, ``eps``, ``beta2``: override the state's values for every parameter (None: each parameter's
    own step and its group's ``betas``/``eps``; PyTorch's defaults for a name mapping that has none).
    Rows/columns whose second moment is exactly zero are zeroed (``inf`` factor); factors below
    ``floor`` times their layer's median are raised to it.
    """
    if floor < 0 or not math.isfinite(floor):
        raise ValueError(f"floor must be a finite number >= 0, got {floor}")
    names = {id(p): n for n, p in model.named_parameters()}
    layer_params = {layer.name: {k: names[id(p)] for k, p in _layer_parameters(layer).items()} for layer in layers}
    needed = list(dict.fromkeys(n for ps in layer_params.values() for n in ps.values()))
    entries, layout = match_optimizer_state(model, state, needed)
    rs, cs, per_layer = [], [], {}
    for layer, layer_spec in zip(layers, spec.layers):
        denominators, deads, infos = {}, {}, {}
        for key, name in layer_params[layer.name].items():
            denominators[key], deads[key], infos[key] = _denominator(name, entries[name], step, beta2, eps)
        d, dead = _canonical(layer, denominators), _canonical(layer, deads)
        if tuple(d.shape) != (layer_spec.d_out, layer_spec.in_dim):
            raise OptimizerStateError(
                f"the second moment of layer {layer.name!r} has shape {tuple(d.shape)}, expected the layer's"
            )
        if bool(dead.all()):
            raise OptimizerStateError(
                f"the optimizer's second moment of layer {layer.name!r} is zero everywhere: training never gave it a "
                "gradient (frozen or unused); leave it out of `layers`, or log without optimizer_state"
            )
        fit = rank1_fit(d, dead, floor=floor)
        rs.append(fit.r.numpy())
        cs.append(fit.c.numpy())
        per_layer[layer.name] = {
            **_merge(infos),
            "zeroed_rows": fit.zeroed_rows,
            "zeroed_cols": fit.zeroed_cols,
            "floored_rows": fit.floored_rows,
            "floored_cols": fit.floored_cols,
        }
    summary = {"layout": layout, "floor": floor, "layers": per_layer}
    return AdamFold(np.concatenate(rs), np.concatenate(cs), summary)


def adam_factors(
    model: nn.Module,
    layers: list[SelectedLayer],
    spec: ProjectionSpec,
    state: str | Path | Mapping[str, Any],
    step: int | None = None,
    eps: float | None = None,
    beta2: float | None = None,
    floor: float = DEFAULT_FLOOR,
) -> tuple[np.ndarray, np.ndarray]:
    """``(r [sum d_out], c [sum in_dim])`` of :func:`adam_fold` (without its summary)."""
    return adam_fold(model, layers, spec, state, step=step, eps=eps, beta2=beta2, floor=floor).factors


def split_factors(
    spec: ProjectionSpec, factors: tuple[np.ndarray, np.ndarray]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Undo the concatenation of :func:`adam_factors`: ``{layer: (r, c)}``."""
    r_all, c_all = factors
    out, r_at, c_at = {}, 0, 0
    for layer in spec.layers:
        out[layer.name] = (
            torch.from_numpy(np.asarray(r_all[r_at : r_at + layer.d_out], dtype=np.float32)),
            torch.from_numpy(np.asarray(c_all[c_at : c_at + layer.in_dim], dtype=np.float32)),
        )
        r_at, c_at = r_at + layer.d_out, c_at + layer.in_dim
    if r_at != len(r_all) or c_at != len(c_all):
        raise TaskError("stored Adam factors do not match the projection's layers")
    return out
