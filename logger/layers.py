"""How each supported module maps its parameters and activations to a block's canonical gradient matrix.

A *block* (one ``SelectedLayer``, one ``LayerSpec``) is one distinct set of parameters whose
per-example gradient is a ``[d_out, in_dim]`` matrix. Kinds, all exact (float rounding) against ``torch.func``:

- ``linear`` / ``conv1d`` (HF GPT-2 ``Conv1D``) / ``embedding``: ``y_t = W x_t + b`` over positions t (tokens; an
  embedding's input is one-hot), gradient ``sum_t g_t x~_t^T``, ``x~ = [x; 1]``.
- ``conv2d`` (``nn.Conv2d``) / ``conv`` (``nn.Conv1d``, ``nn.Conv3d``): im2col, positions are output pixels; any
  stride, dilation, padding (``'same'`` with even kernels, ``reflect`` / ``replicate`` / ``circular``), and groups
  (depthwise included): ``[C_out, C_in/G * prod(K) + 1]``, block-diagonal over groups.
- ``conv_transpose`` (``nn.ConvTranspose1d/2d/3d``, any groups, ``output_padding`` / ``output_size``): per input pixel,
  input channels (rows) times the output gradient's patch (columns), ``[C_in, C_out/G * prod(K)]``; its bias is a
  separate ``bias`` block.
- ``embedding_bag`` (``nn.EmbeddingBag``, ``sum`` / ``mean``, ``offsets``, ``per_sample_weights``, ``padding_idx``):
  one position per bag (= example), input the bag's weighted multi-hot vector.
- ``mha``: ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias`` (``[3E, E+1]``); its
  ``out_proj`` is an ordinary ``linear`` block.
- ``norm``: the affine parameters of LayerNorm / RMSNorm / GroupNorm / BatchNorm (eval) / InstanceNorm:
  ``[sum_t g_t * x^_t, sum_t g_t]`` as a ``[d, 1 + bias]`` matrix (``d_in = 1``: the normalised input).
- ``bias``: a bias alone, ``[d_out, 1] = sum_t g_t``: the own bias of a module whose weight is tied to another block,
  a transposed convolution's bias, or a trainable bias next to a frozen weight.
- ``parameter``: a bare ``nn.Parameter`` no module block covers (a cls token, a position table, a layer or logit
  scale), reshaped to ``[d0, rest]``; hooked where its uses meet the batch (see :mod:`.functional`).

An ``nn.Linear`` / ``nn.Embedding`` subclass that overrides ``forward`` is hooked on the ``F.linear`` / ``F.embedding``
call its forward makes with ``self.weight`` (see :mod:`.functional`). Refused, naming the layer: RNN / LSTM / GRU
(left out by ``"*"``), ``EmbeddingBag(mode='max')``, ``max_norm`` / ``scale_grad_by_freq``, convolution subclasses
overriding ``forward``, MHA with separate k/v dims or ``add_bias_kv``, and bare parameters used by other ops than
``+ - * /`` and ``expand`` where they meet the batch (fused MoE expert weights used through ``bmm`` or indexing).

Which modules become blocks, and how tied weights are shared between them, is :mod:`.selection`'s job.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
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
    separate_bias = False  # the bias is its own ``bias`` block (``<name>.bias``), not a column of this one
    base: type | None = None  # the class whose ``forward`` the hooks assume (a subclass overriding it is hooked
    ops: tuple = ()  # ... on these functional ops called with ``self.weight`` inside its forward instead)
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

    def call_input(self, module: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """``(x, extra)`` of one call: the input the block's gradient is made from, and anything else it needs."""
        return (args[0] if args else next(iter(kwargs.values()), None)), None

    def overrides_forward(self, module: Any) -> bool:
        """The module's class replaces the ``forward`` the hooks assume (hooked on its functional op instead)."""
        return self.base is not None and type(module).forward is not self.base.forward  # type: ignore[attr-defined]

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
    base = nn.Linear
    ops = (F.linear,)

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
    base = nn.Embedding
    ops = (F.embedding,)

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


class EmbeddingBagAdapter(LayerAdapter):
    """``nn.EmbeddingBag`` (mode ``sum`` / ``mean``, ``per_sample_weights``, ``offsets``, ``padding_idx``).

    Bag ``b`` (one example) outputs ``W^T x_b`` with ``x_b = sum_i w_i e_{idx_i}`` (``w_i`` the per-sample weight, or
    ``1 / |bag|`` for ``mean``; padding entries left out): one position per example whose input is a weighted
    multi-hot vector, so ``P_in x_b = sum_i w_i P_in[:, idx_i]`` is a weighted column gather.
    """

    kind = "embedding_bag"
    transposed = True
    onehot = True

    def dims(self, module: nn.EmbeddingBag) -> tuple[int, int, bool]:
        return module.num_embeddings, module.embedding_dim, False

    def problem(self, module: nn.EmbeddingBag) -> str | None:
        if type(module).forward is not nn.EmbeddingBag.forward:
            return "its class overrides nn.EmbeddingBag.forward"
        if module.mode == "max":
            return "mode='max' sends each feature's gradient to a different row of the bag (no rank-1 structure)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales gradients by the batch's counts, so no example has its own gradient"
        if module.max_norm is not None:
            return "max_norm renormalises the weight inside the forward pass"
        return None

    def _weight_matrix(self, module, weight):
        return weight.transpose(-1, -2)

    def call_input(self, module, args, kwargs):
        names = ("input", "offsets", "per_sample_weights")
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        return bound.get("input"), (bound.get("offsets"), bound.get("per_sample_weights"))

    def bags(
        self, module: nn.EmbeddingBag, x: torch.Tensor, offsets: torch.Tensor | None, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and their weights in ``x_b``, padded per bag: ``[B, L]`` each (padding entries weigh 0)."""
        if weights is None:
            weights = torch.ones(x.shape, dtype=torch.float32, device=x.device)
        if x.dim() == 1:
            x, weights = self._pad_bags(module, x, offsets, weights)  # type: ignore[arg-type]
        weights = weights.float()
        if module.padding_idx is not None:
            weights = weights * (x != module.padding_idx)
        if module.mode == "mean":
            weights = weights / (weights != 0).sum(dim=1, keepdim=True).clamp_min(1)
        return x, weights

    @staticmethod
    def _pad_bags(module, x: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor):
        starts = offsets[:-1] if module.include_last_offset else offsets
        ends = torch.cat([starts[1:], starts.new_tensor([x.numel()])])
        bag = torch.bucketize(torch.arange(x.numel(), device=x.device), starts, right=True) - 1
        slot = torch.arange(x.numel(), device=x.device) - starts[bag]
        width = int((ends - starts).max()) if len(starts) else 0
        indices = x.new_zeros(len(starts), max(width, 1))
        padded = weights.new_zeros(len(starts), max(width, 1))
        indices[bag, slot], padded[bag, slot] = x, weights
        return indices, padded

    def output_grad(self, module, grad):
        return grad.reshape(grad.shape[0], 1, grad.shape[-1])


def patches(
    x: torch.Tensor,
    kernel: Sequence[int],
    dilation: Sequence[int],
    stride: Sequence[int],
    pad: Sequence[int],
    mode: str,
) -> torch.Tensor:
    """im2col for any number of spatial dims: ``[B, C, *S] -> [B, C, *O, *K]`` (windows, then kernel offsets).

    ``pad`` is in ``F.pad`` order (last dim first, left then right), ``mode`` ``F.pad``'s (``constant`` = zeros).
    """
    if any(pad):
        x = F.pad(x, list(pad), mode=mode)
    for i, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    return x


def _grouped(t: torch.Tensor, groups: int, spatial: int) -> torch.Tensor:
    """``[B, C, *O, *K] -> [B, T, G, C/G * prod(K)]`` (``T = prod(O)``, ``spatial = len(O)``; ``K`` may be empty)."""
    b, c = t.shape[:2]
    t = t.reshape(b, groups, c // groups, *t.shape[2:])
    t = t.permute(0, *range(3, 3 + spatial), 1, 2, *range(3 + spatial, t.dim()))
    return t.reshape(b, math.prod(t.shape[1 : 1 + spatial]), groups, -1)


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d/2d/3d`` as a linear map over im2col patches: positions are output pixels.

    Any padding (``'same'`` with even kernels, non-zero ``padding_mode``: the input is padded as the module
    does), stride and dilation. With ``groups > 1`` the weight ``[C_out, C_in/G, *K]`` is block-diagonal:
    output channel ``o`` of group ``j`` sees only group ``j``'s patch, so the canonical gradient
    ``[C_out, C_in/G * prod(K) + bias]`` is ``sum_{t,j} E_j g_{t,j} x~_{t,j}^T`` (``E_j`` places group ``j``'s rows):
    the hooks treat (pixel, group) pairs as positions and project ``g_{t,j}`` with ``P_out``'s group-``j`` columns.
    """

    rows_from_input = False  # the row side (``P_out``) comes from the output gradient

    def __init__(self, kind: str = "conv"):
        self.kind = kind

    def dims(self, module) -> tuple[int, int, bool]:
        per_group = module.in_channels // module.groups * math.prod(module.kernel_size)
        return per_group, module.out_channels, module.bias is not None

    def _weight_matrix(self, module, weight):
        return weight.flatten(-1 - len(module.kernel_size))

    def problem(self, module) -> str | None:
        base = next(c for c in _CONVS if isinstance(module, c))
        if type(module).forward is not base.forward:  # type: ignore[attr-defined]
            return (
                f"its class overrides {base.__name__}.forward, and gradstore hooks a convolution through the "
                "module's own stride, padding, dilation and groups"
            )
        return None

    @staticmethod
    def _pad_mode(module) -> str:
        return "constant" if module.padding_mode == "zeros" else module.padding_mode

    def forward_side(self, module, x: torch.Tensor) -> torch.Tensor:
        """Column side per position and group, ``[B, T, G, C_in/G * prod(K)]``: the input patches."""
        pad = module._reversed_padding_repeated_twice
        cols = patches(x, module.kernel_size, module.dilation, module.stride, pad, self._pad_mode(module))
        return _grouped(cols, module.groups, len(module.kernel_size))

    def backward_side(self, module, grad: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Row side ``[B, T, G, C_out/G]``: the output gradient's channels of each group (``size``: the input's
        spatial shape, unused here)."""
        return _grouped(grad, module.groups, grad.dim() - 2)

    def input_rows(self, module, x):
        if module.groups != 1:
            raise TypeError("grouped convolutions have per-group rows; use forward_side()")
        return self.forward_side(module, x)[:, :, 0]

    def output_grad(self, module, grad):
        return grad.flatten(2).transpose(1, 2)


class ConvTransposeAdapter(ConvAdapter):
    """``nn.ConvTranspose1d/2d/3d``: ``y[:, o*] += W[c]^T x_p[c]`` scattered around input pixel ``p``.

    Its weight gradient is a correlation: ``dW[c, (o, k)] = sum_p x_p[c] g[o, p*s - pad + k*d]``, i.e. per input
    pixel ``p`` the outer product of the input channels ``x_p`` (rows, ``d_out = C_in``) with the output
    gradient's im2col patch at ``p`` (columns, ``d_in = C_out/G * prod(K)``), the layout of ``weight.flatten(1)``.
    Groups are block-diagonal in the rows as for :class:`ConvAdapter`. The bias (one value per output channel,
    not per patch) is a separate ``bias`` block (``<name>.bias``).
    """

    rows_from_input = True
    separate_bias = True

    def __init__(self, kind: str = "conv_transpose"):
        self.kind = kind

    def dims(self, module) -> tuple[int, int, bool]:
        per_group = module.out_channels // module.groups * math.prod(module.kernel_size)
        return per_group, module.in_channels, False

    def parameters(self, module) -> dict[str, torch.Tensor]:
        return {"weight": module.weight}

    def problem(self, module) -> str | None:
        return super().problem(module) or (
            f"padding_mode={module.padding_mode!r} is not supported" if module.padding_mode != "zeros" else None
        )

    def canonical(self, module, weight, bias):
        assert weight is not None
        return self._weight_matrix(module, weight)

    def forward_side(self, module, x):
        """Row side ``[B, T, G, C_in/G]``: the input pixels' channels."""
        return _grouped(x, module.groups, x.dim() - 2)

    def backward_side(self, module, grad, size):
        """Column side ``[B, T, G, C_out/G * prod(K)]``: the output gradient's patch at each input pixel.

        With ``output_padding`` (or ``output_size``) there can be more windows than input pixels (``size``); the
        extra ones see no input and are cut.
        """
        n = len(module.kernel_size)
        pad = [p for p in reversed(module.padding) for _ in (0, 1)]
        cols = patches(grad, module.kernel_size, module.dilation, module.stride, pad, "constant")
        cols = cols[(slice(None), slice(None), *(slice(0, s) for s in size))]
        return _grouped(cols, module.groups, n)

    def output_grad(self, module, grad):
        """The plain output gradient ``[B, T_out, C_out]`` (for the bias block)."""
        return grad.flatten(2).transpose(1, 2)


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

    def normalized(self, module: Any, x: torch.Tensor, saved: Any = None) -> torch.Tensor:
        """``x^`` laid out like :meth:`output_grad`: ``[B, T, d]`` float32, a fresh tensor or ``x`` itself.

        ``saved``: what :meth:`saved_statistics` took from this call's forward (then ``x^`` is not normalised again)."""
        return self._layout(module, self._normalize(module, x) if saved is None else self._from_saved(x, saved))

    def saved_statistics(self, module: Any, x: torch.Tensor, output: torch.Tensor) -> Any:
        """Statistics of this call that its autograd node saved anyway (LayerNorm: mean and 1/std), or None."""
        return None

    def _from_saved(self, x: torch.Tensor, saved: Any) -> torch.Tensor:
        raise NotImplementedError

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

    def saved_statistics(self, module, x, output):
        """``(mean, rstd)`` float32 as ``native_layer_norm`` saved them for its backward: ``x^ = (x - mean) * rstd``
        costs two elementwise passes instead of a second layer norm (about 40% of the norm path's time on a CPU)."""
        node = output.grad_fn
        if node is None or type(node).__name__ != "NativeLayerNormBackward0":
            return None
        try:
            mean, rstd = node._saved_result1, node._saved_result2
        except (AttributeError, RuntimeError):
            return None
        n = len(module.normalized_shape)
        shape = (*x.shape[: x.dim() - n], *(1,) * n)
        if any(
            not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape for t in (mean, rstd)
        ):
            return None
        return mean, rstd

    def _from_saved(self, x, saved):
        mean, rstd = saved
        return torch.sub(x.float(), mean).mul_(rstd)


class TorchRMSNormAdapter(NormAdapter):
    def _normalize(self, module: nn.RMSNorm, x):
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return F.rms_norm(x.float(), module.normalized_shape, eps=eps)


class GroupNormAdapter(NormAdapter):
    channel_dim = 1

    def _normalize(self, module: nn.GroupNorm, x):
        return F.group_norm(x.float(), module.num_groups, eps=module.eps)


class InstanceNormAdapter(NormAdapter):
    """InstanceNorm with ``affine=True``: statistics per example and channel (running ones in eval when tracked)."""

    channel_dim = 1

    def _normalize(self, module, x):
        running = module.running_mean is not None and not module.training
        mean, var = (module.running_mean.float(), module.running_var.float()) if running else (None, None)
        return F.instance_norm(x.float(), mean, var, use_input_stats=not running, eps=module.eps)


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
        return 1, self.bias(module).numel(), False

    def canonical(self, module, weight, bias):
        assert bias is not None, "a bias block's canonical gradient is made from its bias"
        return bias.unsqueeze(-1)

    def output_grad(self, module, grad):
        return self.inner.output_grad(module, grad)


class ParameterAdapter(LayerAdapter):
    """A bare ``nn.Parameter`` (a cls token, a position table, a scalar) used by the forward of the module holding it.

    Canonical gradient: the parameter reshaped to ``[d0, rest]`` after dropping size-1 dims (``[numel, 1]`` for
    vectors, ``[1, 1]`` for scalars). Per-example gradients come from the ops where a tensor derived from it meets
    the batch (see :mod:`.functional`).
    """

    kind = "parameter"

    def __init__(self, attribute: str, shape: Sequence[int]):
        self.attributes = {"weight": attribute}  # type: ignore[misc]  # per instance: the parameter's own name
        self.shape = tuple(shape)

    def dims(self, module) -> tuple[int, int, bool]:
        sizes = [s for s in self.shape if s != 1]
        if len(sizes) <= 1:
            return 1, math.prod(sizes), False
        return math.prod(sizes[1:]), sizes[0], False

    def parameters(self, module) -> dict[str, torch.Tensor]:
        return {"weight": self.weight(module)}  # type: ignore[dict-item]

    def canonical(self, module, weight, bias):
        assert weight is not None
        d_in, d_out, _ = self.dims(module)
        lead = weight.shape[: weight.dim() - len(self.shape)]
        return weight.reshape(*lead, d_out, d_in)


class RecurrentAdapter(LayerAdapter):
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` and their cells: not logged (weights reused across time steps).

    Under ``"*"`` they are left out (and not covered); naming one in ``layers`` is refused.
    """

    kind = "recurrent"

    def weight(self, module):
        return next((p for p in module.parameters() if p.requires_grad), None)

    def parameters(self, module) -> dict[str, torch.Tensor]:
        return dict(module.named_parameters())

    def problem(self, module) -> str | None:
        return (
            f"{type(module).__name__} runs its weights through a fused recurrent kernel, so gradstore cannot hook "
            "per-step inputs and gradients; recurrent layers are not supported"
        )


_CONVS: tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for a supported module type, or None."""
    if isinstance(module, nn.Linear):
        return LinearAdapter()
    if isinstance(module, nn.Embedding):
        return EmbeddingAdapter()
    if isinstance(module, nn.EmbeddingBag):
        return EmbeddingBagAdapter()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return ConvTransposeAdapter()
    if isinstance(module, nn.Conv2d):
        return ConvAdapter("conv2d")  # kept from before N-d convolutions, for existing stores
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return ConvAdapter("conv")
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
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.affine:
        return InstanceNormAdapter()
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return RecurrentAdapter()
    if _is_rmsnorm_like(module):
        return RMSNormLikeAdapter()
    return None
