"""How each supported module maps its parameters and activations to a block's canonical gradient matrix.

A *block* (one ``SelectedLayer``, one ``LayerSpec``) is one distinct set of parameters whose
per-example gradient is a ``[d_out, in_dim]`` matrix:

- ``linear`` / ``conv1d`` / ``conv2d`` / ``embedding``: ``y_t = W x_t + b`` over positions t (tokens,
  pixels after im2col; an embedding's input is one-hot), gradient ``sum_t g_t x~_t^T``, ``x~ = [x; 1]``.
- ``mha``: ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias`` (``[3E, E+1]``); its
  ``out_proj`` is an ordinary ``linear`` block.
- ``norm``: the affine parameters of LayerNorm / RMSNorm / GroupNorm / BatchNorm (eval):
  ``[sum_t g_t * x^_t, sum_t g_t]`` as a ``[d, 1 + bias]`` matrix (``d_in = 1``: the normalised input).
- ``bias``: the own bias of a module whose weight is tied to another block (``[d_out, 1]``).

Which modules become blocks, and how tied weights are shared between them, is :mod:`.selection`'s job.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class LayerAdapter:
    """How one module type's parameters and activations map to a block's canonical matrix."""

    kind: str = ""
    transposed = False  # the canonical weight matrix is ``weight^T`` (decides a tie's orientation)
    tieable = False  # a 2-D ``weight`` another Linear/Embedding/Conv1D may share
    onehot = False  # the input is indices (P_in x is a column gather)
    attributes: ClassVar[dict[str, str]] = {"weight": "weight", "bias": "bias"}  # role -> module attribute

    def weight(self, module: Any) -> torch.Tensor | None:
        return getattr(module, self.attributes["weight"], None)

    def bias(self, module: Any) -> torch.Tensor | None:
        return getattr(module, self.attributes["bias"], None)

    def parameters(self, module: Any) -> dict[str, torch.Tensor]:
        """``{"weight": ..., "bias": ...}`` (bias only when present): the tensors the block's gradient covers."""
        out = {"weight": self.weight(module), "bias": self.bias(module)}
        return {k: v for k, v in out.items() if v is not None}

    def dims(self, module: Any) -> tuple[int, int, bool]:
        """``(d_in, d_out, has_bias)``."""
        raise NotImplementedError

    def problem(self, module: Any) -> str | None:
        """Why this module cannot be logged exactly (checked when it is selected), or None."""
        return None

    def canonical(self, module: Any, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """Map tensors shaped like (weight, bias), with optional leading batch dims, to ``[..., d_out, in_dim]``."""
        assert weight is not None
        matrix = self._weight_matrix(module, weight)
        if bias is None:
            return matrix
        return torch.cat([matrix, bias.unsqueeze(-1)], dim=-1)

    def _weight_matrix(self, module: Any, weight: torch.Tensor) -> torch.Tensor:
        return weight

    # -- activations (used by the hooks) --------------------------------------------------------
    def input_rows(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """Per-position inputs ``[B, T, d_in]`` (indices ``[B, T]`` for one-hot inputs)."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_grad(self, module: Any, grad: torch.Tensor) -> torch.Tensor:
        """``[B, T, d_out]``."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])


class LinearAdapter(LayerAdapter):
    kind = "linear"
    tieable = True

    def dims(self, module: nn.Linear) -> tuple[int, int, bool]:
        return module.in_features, module.out_features, module.bias is not None


class Conv1DAdapter(LayerAdapter):
    """Hugging Face GPT-2 style ``Conv1D``: ``y = x @ W + b`` with ``W: [d_in, d_out]``."""

    kind = "conv1d"
    transposed = True
    tieable = True

    def dims(self, module) -> tuple[int, int, bool]:
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None

    def _weight_matrix(self, module, weight):
        return weight.transpose(-1, -2)


class EmbeddingAdapter(LayerAdapter):
    """``y_t = W^T e_{i_t}``: the input is one-hot, so ``P_in x_t`` is a column gather."""

    kind = "embedding"
    transposed = True
    tieable = True
    onehot = True

    def dims(self, module: nn.Embedding) -> tuple[int, int, bool]:
        return module.num_embeddings, module.embedding_dim, False

    def problem(self, module: nn.Embedding) -> str | None:
        if module.scale_grad_by_freq:
            return (
                "scale_grad_by_freq=True scales gradients by the batch's token counts, "
                "so no example has its own gradient"
            )
        if module.max_norm is not None:
            return "max_norm renormalises the weight inside the forward pass"
        return None

    def input_rows(self, module, x):
        return x.reshape(x.shape[0], -1)

    def _weight_matrix(self, module, weight):
        return weight.transpose(-1, -2)


class Conv2dAdapter(LayerAdapter):
    """Convolution as a linear map over im2col patches: positions are output pixels."""

    kind = "conv2d"

    def dims(self, module: nn.Conv2d) -> tuple[int, int, bool]:
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels, module.bias is not None

    def problem(self, module: nn.Conv2d) -> str | None:
        if module.groups != 1:
            return f"grouped convolutions (groups={module.groups}) are not supported"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        if module.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size)):
            return "padding='same' with an even effective kernel is not supported"
        return None

    @staticmethod
    def _padding(module: nn.Conv2d) -> tuple[int, int]:
        if module.padding == "valid":
            return (0, 0)
        if module.padding == "same":
            pads = tuple(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
            return pads  # type: ignore[return-value]
        return module.padding  # type: ignore[return-value]

    def input_rows(self, module, x):
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=self._padding(module), stride=module.stride
        )
        return patches.transpose(1, 2)

    def output_grad(self, module, grad):
        return grad.flatten(2).transpose(1, 2)

    def _weight_matrix(self, module, weight):
        return weight.flatten(-3)


class MultiheadAttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention``'s packed in-projection: ``[q; k; v] = W_in x + b_in``, ``W_in: [3E, E]``.

    The hooks run the attention through hookable pieces (see ``attention.AttentionHook``), so this block and
    the ``out_proj`` Linear both see their inputs and output gradients.
    """

    kind = "mha"
    attributes: ClassVar[dict[str, str]] = {"weight": "in_proj_weight", "bias": "in_proj_bias"}

    def weight(self, module: nn.MultiheadAttention) -> torch.Tensor | None:
        return module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight

    def dims(self, module: nn.MultiheadAttention) -> tuple[int, int, bool]:
        return module.embed_dim, 3 * module.embed_dim, module.in_proj_bias is not None

    def problem(self, module: nn.MultiheadAttention) -> str | None:
        if not module._qkv_same_embed_dim:
            return "kdim/vdim different from embed_dim (separate q/k/v projection weights) are not supported"
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv=True is not supported"
        return None


class NormAdapter(LayerAdapter):
    """Affine parameters of a normalisation: ``y = gamma * x^ + beta`` per feature.

    The canonical gradient is ``[sum_t g_t * x^_t, sum_t g_t]`` (``[d, 1 + bias]``): ``d_in = 1``, the
    normalised input, plus the bias column. Subclasses compute ``x^`` in float32 from the module's input.
    """

    kind = "norm"
    channel_dim: int | None = None  # BatchNorm / GroupNorm: features along dim 1 (else the trailing dims)

    def dims(self, module: Any) -> tuple[int, int, bool]:
        return 1, self.weight(module).numel(), self.bias(module) is not None  # type: ignore[union-attr]

    def canonical(self, module, weight, bias):
        assert weight is not None
        n = self.weight(module).dim()  # type: ignore[union-attr]
        columns = [weight.flatten(-n) if n > 1 else weight]
        if bias is not None:
            columns.append(bias.flatten(-n) if n > 1 else bias)
        return torch.stack(columns, dim=-1)

    def normalized(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """``x^`` laid out like :meth:`output_grad`: ``[B, T, d]`` float32."""
        return self._layout(module, self._normalize(module, x))

    def _normalize(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def runtime_problem(self, module: Any) -> str | None:
        """Why this call's gradient has no per-example meaning (e.g. BatchNorm with batch statistics), or None."""
        return None

    def _layout(self, module: Any, t: torch.Tensor) -> torch.Tensor:
        d = self.weight(module).numel()  # type: ignore[union-attr]
        if self.channel_dim is not None:
            t = t.movedim(1, -1)
        return t.reshape(t.shape[0], -1, d)

    def input_rows(self, module, x):
        raise TypeError("normalisation layers have no input rows; use normalized()")

    def output_grad(self, module, grad):
        return self._layout(module, grad)


class LayerNormAdapter(NormAdapter):
    def _normalize(self, module: nn.LayerNorm, x):
        return F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)


class TorchRMSNormAdapter(NormAdapter):
    def _normalize(self, module: nn.RMSNorm, x):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return F.rms_norm(x.float(), module.normalized_shape, eps=eps)


class GroupNormAdapter(NormAdapter):
    channel_dim = 1

    def _normalize(self, module: nn.GroupNorm, x):
        return F.group_norm(x.float(), module.num_groups, eps=module.eps)


class BatchNormAdapter(NormAdapter):
    """BatchNorm with running statistics (eval mode): ``x^ = (x - mean) / sqrt(var + eps)`` per channel."""

    channel_dim = 1

    def problem(self, module) -> str | None:
        if module.running_mean is None:
            return "track_running_stats=False normalises with batch statistics, so no example has its own gradient"
        return None

    def runtime_problem(self, module) -> str | None:
        if module.training:
            return (
                "BatchNorm in training mode normalises with batch statistics, so no example has its own gradient; "
                "log with the model in eval mode (log_checkpoint / project do), or leave BatchNorm out of `layers`"
            )
        return None

    def _normalize(self, module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = module.running_mean.float().view(shape), module.running_var.float().view(shape)
        return (x.float() - mean) * torch.rsqrt(var + module.eps)


class RMSNormLikeAdapter(NormAdapter):
    """Hugging Face style RMSNorm (Llama, Mistral, Qwen, T5, Gemma's ``1 + weight``), detected by duck typing.

    ``x^ = x / sqrt(mean(x^2) + eps)`` in float32, cast back to the input dtype as those modules do; the hooks
    check on the first call that the module's output is ``weight * x^`` (or ``(1 + weight) * x^``) and refuse
    the module otherwise.
    """

    @staticmethod
    def eps(module: nn.Module) -> float:
        value = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        return float(value)  # type: ignore[arg-type]

    def _normalize(self, module, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps(module))
        return h.to(x.dtype).float()

    def verify(self, module: Any, x: torch.Tensor, output: torch.Tensor) -> bool:
        """True when ``output`` is ``weight * x^`` or ``(1 + weight) * x^`` to the input's precision."""
        normalized = self._normalize(module, x.detach())
        weight = module.weight.detach().float()
        out = output.detach().float()
        tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 2e-2
        scale = out.abs().max().clamp_min(1e-12)
        return any(float((out - w * normalized).abs().max() / scale) <= tol for w in (weight, 1 + weight))


_RMS_NAME = re.compile(r"(rms_?norm|t5layernorm)$", re.IGNORECASE)


def _is_rmsnorm_like(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return (
        bool(_RMS_NAME.search(type(module).__name__))
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 1
        and isinstance(eps, (int, float))
        and getattr(module, "bias", None) is None
    )


class BiasAdapter(LayerAdapter):
    """The own bias of a module whose weight belongs to another block (a tied LM head with a bias).

    Canonical gradient ``[d_out, 1] = sum_t g_t``: a linear map of the constant input 1.
    """

    kind = "bias"

    def __init__(self, inner: LayerAdapter):
        self.inner = inner

    def weight(self, module):
        return None

    def bias(self, module):
        return self.inner.bias(module)

    def dims(self, module) -> tuple[int, int, bool]:
        return 1, self.inner.dims(module)[1], False

    def canonical(self, module, weight, bias):
        assert bias is not None, "a bias block's canonical gradient is made from its bias"
        return bias.unsqueeze(-1)

    def output_grad(self, module, grad):
        return self.inner.output_grad(module, grad)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a supported module type, or None."""
    if isinstance(module, nn.Linear):
        return LinearAdapter()
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapter()
    if isinstance(module, nn.Conv2d):
        return Conv2dAdapter()
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttentionAdapter()
    if (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    ):
        return Conv1DAdapter()  # transformers' Conv1D, detected without importing transformers
    if isinstance(module, nn.LayerNorm):
        return LayerNormAdapter()
    if isinstance(module, nn.RMSNorm):
        return TorchRMSNormAdapter()
    if isinstance(module, nn.GroupNorm):
        return GroupNormAdapter()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return BatchNormAdapter()
    if _is_rmsnorm_like(module):
        return RMSNormLikeAdapter()
    return None
