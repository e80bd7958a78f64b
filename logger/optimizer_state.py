"""Reading Adam's second moment (``exp_avg_sq``) for the TrackStar correction."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradstore.projection import ProjectionSpec, rank1_denominator

from .errors import TaskError
from .layers import SelectedLayer


def load_exp_avg_sq(model: nn.Module, state: str | Path | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], int | None]:
    """``({param_name: exp_avg_sq}, step)`` from a saved file, an ``optimizer.state_dict()``, or a name mapping.

    A whole ``optimizer.state_dict()`` is matched to ``model.named_parameters()`` by order, which holds
    when the optimizer was built from ``model.parameters()``.
    """
    if isinstance(state, (str, Path)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TaskError(f"optimizer state must be a mapping, got {type(state).__name__}")
    if "state" in state and "param_groups" in state:
        names = [name for name, _ in model.named_parameters()]
        indices = [i for group in state["param_groups"] for i in group["params"]]
        if len(indices) != len(names):
            raise TaskError(
                f"the optimizer state covers {len(indices)} parameters but the model has {len(names)}; "
                "save {name: exp_avg_sq} for the parameters instead"
            )
        by_name, steps = {}, set()
        for position, index in enumerate(indices):
            entry = state["state"].get(index)
            if entry and "exp_avg_sq" in entry:
                by_name[names[position]] = entry["exp_avg_sq"]
                if "step" in entry:
                    steps.add(int(torch.as_tensor(entry["step"]).item()))
        return by_name, (max(steps) if steps else None)
    by_name = {k: (v["exp_avg_sq"] if isinstance(v, Mapping) else v) for k, v in state.items() if k != "step"}
    step = state.get("step")
    return by_name, (int(step) if step is not None else None)


def adam_factors(
    model: nn.Module,
    layers: list[SelectedLayer],
    spec: ProjectionSpec,
    state: str | Path | Mapping[str, Any],
    step: int | None = None,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank-1 factors of every layer's Adam denominator, concatenated in spec order: ``(r [sum d_out], c [sum in_dim])``."""
    exp_avg_sq, state_step = load_exp_avg_sq(model, state)
    step = step if step is not None else state_step
    param_names = {id(p): n for n, p in model.named_parameters()}
    rs, cs = [], []
    for layer, layer_spec in zip(layers, spec.layers):
        tensors = {}
        for key in ("weight", "bias"):
            param = getattr(layer.module, key, None)
            if isinstance(param, torch.Tensor):
                name = param_names[id(param)]
                if name not in exp_avg_sq:
                    raise TaskError(f"the optimizer state has no exp_avg_sq for parameter {name!r}")
                tensors[key] = exp_avg_sq[name].to(torch.float64)
        v = layer.adapter.canonical(layer.module, tensors["weight"], tensors.get("bias"))
        if v.shape != (layer_spec.d_out, layer_spec.in_dim):
            raise TaskError(f"exp_avg_sq of layer {layer.name!r} has shape {tuple(v.shape)}, expected the layer's")
        r, c = rank1_denominator(v, step=step, beta2=beta2, eps=eps)
        rs.append(r.numpy())
        cs.append(c.numpy())
    return np.concatenate(rs), np.concatenate(cs)


def split_factors(spec: ProjectionSpec, factors: tuple[np.ndarray, np.ndarray]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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
