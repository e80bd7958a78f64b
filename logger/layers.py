"""Per-module-type views of a layer as ``y_t = W x_t + b`` over positions t.

Each adapter knows a module's dimensions, how to turn its input into per-position vectors projected by
``P_in``, how to lay out the gradient of its output as ``[B, T, d_out]``, and how its parameters map to
the canonical ``[d_out, in_dim]`` gradient matrix (used for the Adam correction and the dense reference).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradstore.projection import project_inputs, project_onehot_inputs

from .errors import UnknownLayerError, UnsupportedLayerError


class LayerAdapter:
    kind: str = ""

    def dims(self, module: nn.Module) -> tuple[int, int, bool]:
        """``(d_in, d_out, has_bias)``."""
        raise NotImplementedError

    def project_input(self, module: nn.Module, x: torch.Tensor, p_in: torch.Tensor) -> torch.Tensor:
        """``[B, T, k_in]`` float32."""
        raise NotImplementedError

    def output_grad(self, module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        """``[B, T, d_out]``."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    def canonical(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Map tensors shaped like (weight, bias), with optional leading batch dims, to ``[..., d_out, in_dim]``."""
        matrix = self._weight_matrix(module, weight)
        if bias is None:
            return matrix
        return torch.cat([matrix, bias.unsqueeze(-1)], dim=-1)

    def _weight_matrix(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight


class LinearAdapter(LayerAdapter):
    kind = "linear"

    def dims(self, module: nn.Linear) -> tuple[int, int, bool]:
        return module.in_features, module.out_features, module.bias is not None

    def project_input(self, module, x, p_in):
        return project_inputs(x.reshape(x.shape[0], -1, x.shape[-1]), p_in, module.bias is not None)


class Conv1DAdapter(LayerAdapter):
    """Hugging Face GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W: [d_in, d_out]``."""

    kind = "conv1d"

    def dims(self, module) -> tuple[int, int, bool]:
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None

    def project_input(self, module, x, p_in):
        return project_inputs(x.reshape(x.shape[0], -1, x.shape[-1]), p_in, module.bias is not None)

    def _weight_matrix(self, module, weight):
        return weight.transpose(-1, -2)


class EmbeddingAdapter(LayerAdapter):
    """``y_t = W^T e_{i_t}``: the input is one-hot, so ``P_in x_t`` is a column gather."""

    kind = "embedding"

    def dims(self, module: nn.Embedding) -> tuple[int, int, bool]:
        return module.num_embeddings, module.embedding_dim, False

    def project_input(self, module, x, p_in):
        return project_onehot_inputs(x.reshape(x.shape[0], -1), p_in, module.padding_idx)

    def _weight_matrix(self, module, weight):
        return weight.transpose(-1, -2)


class Conv2dAdapter(LayerAdapter):
    """Convolution as a linear map over im2col patches: positions are output pixels."""

    kind = "conv2d"

    def dims(self, module: nn.Conv2d) -> tuple[int, int, bool]:
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels, module.bias is not None

    def check(self, name: str, module: nn.Conv2d) -> None:
        if module.groups != 1:
            raise UnsupportedLayerError(f"{name}: grouped convolutions (groups={module.groups}) are not supported")
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(f"{name}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')")
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            raise UnsupportedLayerError(f"{name}: padding='same' with an even effective kernel is not supported")

    @staticmethod
    def _padding(module: nn.Conv2d) -> tuple[int, int]:
        if module.padding == "valid":
            return (0, 0)
        if module.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))  # type: ignore[return-value]
        return module.padding  # type: ignore[return-value]

    def project_input(self, module, x, p_in):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=self._padding(module), stride=module.stride)
        return project_inputs(patches.transpose(1, 2), p_in, module.bias is not None)

    def output_grad(self, module, grad):
        return grad.flatten(2).transpose(1, 2)

    def _weight_matrix(self, module, weight):
        return weight.flatten(-3)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a supported module type, or None."""
    if isinstance(module, nn.Linear):
        return LinearAdapter()
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapter()
    if isinstance(module, nn.Conv2d):
        return Conv2dAdapter()
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor):
        return Conv1DAdapter()  # transformers' Conv1D, detected without importing transformers
    return None


@dataclass(frozen=True)
class SelectedLayer:
    name: str
    module: nn.Module
    adapter: LayerAdapter

    def dims(self) -> tuple[str, str, int, int, bool]:
        d_in, d_out, bias = self.adapter.dims(self.module)
        return self.name, self.adapter.kind, d_in, d_out, bias


def select_layers(model: nn.Module, patterns: Sequence[str]) -> list[SelectedLayer]:
    """Supported, trainable modules whose names match any glob pattern, in ``named_modules`` order.

    Every pattern must match at least one supported module; otherwise the error lists what exists.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    candidates = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is not None and name and module.weight.requires_grad:
            candidates.append(SelectedLayer(name, module, adapter))
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in candidates)]
    if unmatched:
        available = ", ".join(c.name for c in candidates[:40]) or "none"
        raise UnknownLayerError(
            f"layer patterns {unmatched} match no supported trainable module "
            f"(Linear, Embedding, Conv2d, HF Conv1D); available: {available}"
        )
    selected = [c for c in candidates if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    for layer in selected:
        if isinstance(layer.adapter, Conv2dAdapter):
            layer.adapter.check(layer.name, layer.module)  # type: ignore[arg-type]
    return selected


def canonical_gradient(layer: SelectedLayer, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Canonical ``[..., d_out, in_dim]`` gradient of a layer from ``{"weight": ..., "bias": ...}`` tensors."""
    return layer.adapter.canonical(layer.module, grads["weight"], grads.get("bias"))
