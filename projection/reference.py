"""Dense reference projector, used by tests to check the hooked Kronecker path.

It materialises ``kron(P_out, P_in)`` per layer and multiplies it with the full canonical gradient
``vec_row([dW db])``: ``vec_row(P_out G P_in^T) = (P_out kron P_in) vec_row(G)``.
"""

from __future__ import annotations

import torch

from .matrices import LayerMatrices
from .spec import ProjectionSpec


def dense_layer_projector(matrices: LayerMatrices) -> torch.Tensor:
    """``[k_out * k_in, d_out * in_dim]`` float64 matrix of one layer's projection."""
    return torch.kron(matrices.p_out.double(), matrices.p_in.double())


def project_dense(
    spec: ProjectionSpec, matrices: dict[str, LayerMatrices], canonical_grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Project per-example canonical gradients ``{layer: [B, d_out, in_dim]}`` to ``[B, D]`` (float64)."""
    parts = []
    for layer in spec.layers:
        grads = canonical_grads[layer.name].double().flatten(1)
        parts.append(grads @ dense_layer_projector(matrices[layer.name]).T.to(grads.device))
    return torch.cat(parts, dim=1)
