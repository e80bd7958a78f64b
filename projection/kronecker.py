"""The LoGra identity on tensors: ``P_out (sum_t g_t x~_t^T) P_in^T = sum_t (P_out g_t)(P_in x~_t)^T``.

Shapes: ``x`` is ``[B, T, d_in]`` (positions T: tokens, pixels), ``g`` is ``[B, T, d_out]``.
Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch


def project_inputs(x: torch.Tensor, p_in: torch.Tensor, bias: bool) -> torch.Tensor:
    """``P_in x~_t`` for every position: ``[B, T, d_in] -> [B, T, k_in]``; ``x~ = [x; 1]`` when ``bias``."""
    x = x.to(torch.float32)
    if not bias:
        return x @ p_in.T
    return torch.addmm(p_in[:, -1], x.reshape(-1, x.shape[-1]), p_in[:, :-1].T).view(*x.shape[:-1], p_in.shape[0])


def project_onehot_inputs(indices: torch.Tensor, p_in: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """``P_in e_{i_t}`` for one-hot inputs (embeddings) is a column gather: ``[B, T] -> [B, T, k_in]``."""
    projected = p_in.T[indices]
    if padding_idx is not None:
        projected = projected * (indices != padding_idx).unsqueeze(-1)
    return projected


def project_outputs(g: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
    """``P_out g_t`` for every position: ``[B, T, d_out] -> [B, T, k_out]``."""
    return g.to(torch.float32) @ p_out.T


def per_example_gradient(projected_g: torch.Tensor, projected_x: torch.Tensor) -> torch.Tensor:
    """``sum_t b_t a_t^T`` per example, flattened row-major: ``[B, T, k_out], [B, T, k_in] -> [B, k_out * k_in]``."""
    return torch.bmm(projected_g.transpose(1, 2), projected_x).flatten(1)


def transposed(p: torch.Tensor) -> torch.Tensor:
    """``P^T`` as a contiguous ``[d, k]`` matrix: what the hooks multiply rows by (built once per set of matrices)."""
    return p.T.contiguous()


def project_rows(x: torch.Tensor, p_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x P^T (+ bias)`` for rows ``x`` ``[..., d]`` with a prepared ``p_t = P^T`` ``[d, k]``: ``[..., k]`` float32.

    :func:`project_inputs` / :func:`project_outputs` with the transposes and the bias column split off beforehand
    (``bias`` is ``P``'s last column for a homogeneous input): one matrix product, no per-call reshuffling."""
    if x.dtype != torch.float32:
        x = x.float()
    flat = x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, p_t) if bias is None else torch.addmm(bias, flat, p_t)
    return out.view(*x.shape[:-1], p_t.shape[1])
