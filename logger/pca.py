"""The statistics pass behind ``init="pca"``: input and output-gradient covariances per layer."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from gradstore.projection.pca import top_eigenvectors, top_frequency_basis

from .layers import EmbeddingAdapter, SelectedLayer
from .task import Task, move_to_device


class _CovarianceHook:
    def __init__(self, layer: SelectedLayer, device: torch.device):
        self.layer = layer
        d_in, d_out, bias = layer.adapter.dims(layer.module)
        self.bias = bias
        self.embedding = isinstance(layer.adapter, EmbeddingAdapter)
        in_dim = d_in + int(bias)
        self.inputs = torch.zeros(d_in if self.embedding else (in_dim, in_dim), dtype=torch.float64, device=device)
        self.grads = torch.zeros(d_out, d_out, dtype=torch.float64, device=device)
        self.handle = layer.module.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach()
        if self.embedding:
            self.inputs += torch.bincount(x.flatten(), minlength=self.inputs.numel()).to(torch.float64)
        else:
            # the adapter's projection with P_in = I yields the homogeneous per-position inputs x~_t
            identity = torch.eye(self.inputs.shape[0], device=x.device)
            rows = self.layer.adapter.project_input(module, x, identity).reshape(-1, identity.shape[0]).to(torch.float64)
            self.inputs += rows.T @ rows
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        g = self.layer.adapter.output_grad(self.layer.module, grad.detach())
        g = g.reshape(-1, self.grads.shape[0]).to(torch.float64)
        self.grads += g.T @ g


def pca_bases(
    model: nn.Module,
    task: Task,
    layers: list[SelectedLayer],
    examples: Sequence,
    rank: tuple[int, int],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Top-``k`` eigenvectors of ``E[x~ x~^T]`` and ``E[g g^T]`` for every layer, as ``(p_in, p_out)``."""
    hooks = [_CovarianceHook(layer, torch.device(device)) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = move_to_device(task.collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))]), device)
            task.loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
    finally:
        for hook in hooks:
            hook.handle.remove()
        model.train(was_training)
    bases = {}
    for hook in hooks:
        d_in, d_out, bias = hook.layer.adapter.dims(hook.layer.module)
        k_in, k_out = min(rank[0], d_in + int(bias)), min(rank[1], d_out)
        p_in = top_frequency_basis(hook.inputs, k_in) if hook.embedding else top_eigenvectors(hook.inputs, k_in)
        bases[hook.layer.name] = (p_in, top_eigenvectors(hook.grads, k_out))
    return bases
