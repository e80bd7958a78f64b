"""PCA projection bases: top eigenvectors of a layer's input and output-gradient covariances."""

from __future__ import annotations

import numpy as np
import torch


def top_eigenvectors(covariance: torch.Tensor, k: int) -> np.ndarray:
    """Rows are the ``k`` leading eigenvectors of a symmetric matrix, signs fixed for determinism."""
    evals, evecs = torch.linalg.eigh(covariance.detach().to(torch.float64).cpu())
    order = torch.argsort(evals, descending=True)[:k]
    basis = evecs[:, order].T
    signs = torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True)))
    return (basis * signs).numpy().astype(np.float32)


def top_frequency_basis(counts: torch.Tensor, k: int) -> np.ndarray:
    """PCA of one-hot inputs: the covariance is ``diag(counts)``, so the basis is the ``k`` most frequent indicators."""
    order = torch.argsort(counts.detach().cpu().to(torch.float64), descending=True, stable=True)[:k]
    basis = np.zeros((k, counts.numel()), dtype=np.float32)
    basis[np.arange(k), order.numpy()] = 1.0
    return basis
