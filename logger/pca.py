"""The statistics behind ``init="pca"``: per block, covariances of the canonical gradient's two sides.

For a linear-like block these are LoGra's ``E[x~ x~^T]`` and ``E[g g^T]`` over positions; a one-hot input
side (an embedding) keeps token counts, whose PCA basis is the most frequent tokens. A normalisation
block uses its per-example ``[d, 1 + bias]`` gradient ``M``: ``sum M^T M`` and ``sum M M^T``. The hooks
(``hooks.py``) feed these accumulators during a gradient pass, so every module kind, tie and shared
input is handled exactly as when projecting.
"""

from __future__ import annotations

import numpy as np
import torch

from gradstore.projection.pca import top_eigenvectors, top_frequency_basis

from .selection import SelectedLayer


class BlockStatistics:
    """Accumulated second moments of one block's input side (``in_dim``) and output side (``d_out``)."""

    def __init__(self, layer: SelectedLayer, device: torch.device):
        d_in, d_out, bias = layer.adapter.dims(layer.module)
        self.onehot = layer.adapter.onehot
        self.in_dim = d_in + int(bias)
        shape = (self.in_dim,) if self.onehot else (self.in_dim, self.in_dim)
        self.inputs = torch.zeros(shape, dtype=torch.float64, device=device)
        self.grads = torch.zeros(d_out, d_out, dtype=torch.float64, device=device)

    def add_inputs(self, rows: torch.Tensor, with_one: bool) -> None:
        """Dense input rows ``[..., c]`` (a homogeneous 1 appended when ``with_one``) into the first columns."""
        if self.onehot:
            return  # a one-hot side keeps a frequency basis; dense contributions (a tied head's g) are left out
        rows = rows.reshape(-1, rows.shape[-1]).to(torch.float64)
        if with_one:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], dim=1)
        c = rows.shape[1]
        self.inputs[:c, :c] += rows.T @ rows

    def add_constant(self, count: int) -> None:
        """``count`` positions of the homogeneous input 1 (the last column)."""
        self.inputs[-1, -1] += count

    def add_input_counts(self, indices: torch.Tensor, padding_idx: int | None) -> None:
        counts = torch.bincount(indices.flatten(), minlength=self.in_dim).to(torch.float64)
        if padding_idx is not None:
            counts[padding_idx] = 0
        if self.onehot:
            self.inputs += counts
        else:
            self.inputs.diagonal().add_(counts)

    def add_grads(self, g: torch.Tensor, rows: slice | None = None) -> None:
        """Output-side vectors ``[..., r]`` into the block rows ``rows`` (all when None)."""
        g = g.reshape(-1, g.shape[-1]).to(torch.float64)
        block = self.grads if rows is None else self.grads[rows, rows]
        block += g.T @ g

    def add_grad_counts(self, indices: torch.Tensor, padding_idx: int | None) -> None:
        counts = torch.bincount(indices.flatten(), minlength=self.grads.shape[0]).to(torch.float64)
        if padding_idx is not None:
            counts[padding_idx] = 0
        self.grads.diagonal().add_(counts)

    def add_matrices(self, matrices: torch.Tensor) -> None:
        """Per-example canonical gradients ``[B, d_out, in_dim]`` (normalisation blocks)."""
        m = matrices.to(torch.float64)
        self.inputs += torch.einsum("bdi,bdj->ij", m, m)
        self.grads += torch.einsum("bdi,bei->de", m, m)

    def bases(self, k_in: int, k_out: int) -> tuple[np.ndarray, np.ndarray]:
        k_in, k_out = min(k_in, self.in_dim), min(k_out, self.grads.shape[0])
        p_in = top_frequency_basis(self.inputs, k_in) if self.onehot else top_eigenvectors(self.inputs, k_in)
        return p_in, top_eigenvectors(self.grads, k_out)
