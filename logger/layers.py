"""Which parameters gradstore logs, and how each module maps them to a canonical gradient matrix.

A *block* (one :class:`SelectedLayer`, one ``LayerSpec``) is one distinct set of parameters whose
per-example gradient is a ``[d_out, in_dim]`` matrix:

- ``linear`` / ``conv1d`` / ``conv2d`` / ``embedding``: ``y_t = W x_t + b`` over positions t (tokens,
  pixels after im2col; an embedding's input is one-hot), gradient ``sum_t g_t x~_t^T``, ``x~ = [x; 1]``.
- ``mha``: ``nn.MultiheadAttention``'s ``in_proj_weight`` / ``in_proj_bias`` (``[3E, E+1]``); its
  ``out_proj`` is an ordinary ``linear`` block.
- ``norm``: the affine parameters of LayerNorm / RMSNorm / GroupNorm / BatchNorm (eval):
  ``[sum_t g_t * x^_t, sum_t g_t]`` as a ``[d, 1 + bias]`` matrix (``d_in = 1``: the normalised input).
- ``bias``: the own bias of a module whose weight is tied to another block (``[d_out, 1]``).

A weight shared by several modules (tied embeddings and LM head) is one block: its first user in
``named_modules`` order owns it, the others are :class:`TiedUse` contributions that add into the same
slice (transposed when their canonical layout is the transpose of the owner's).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnknownLayerError, UnsupportedLayerError


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

    The hooks run the attention through hookable pieces (see ``hooks.AttentionHook``), so this block and
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


@dataclass(frozen=True)
class TiedUse:
    """Another module using a block's weight; its contribution adds into the block's slice.

    ``transposed``: its canonical gradient is the transpose of the block's (an LM head tied to an embedding),
    so the roles of ``P_in`` and ``P_out`` swap. ``bias_column``: its bias is the block's bias too.
    """

    name: str
    module: nn.Module
    adapter: LayerAdapter
    transposed: bool
    bias_column: bool


@dataclass(frozen=True)
class SelectedLayer:
    """One logged block: its name (the owning module's, or ``<module>.bias``), owning module and adapter."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    tied: tuple[TiedUse, ...] = ()
    module_names: tuple[str, ...] = field(default=(), compare=False)  # modules contributing (for layer patterns)

    @property
    def kind(self) -> str:
        return self.adapter.kind

    def dims(self) -> tuple[str, str, int, int, bool]:
        d_in, d_out, bias = self.adapter.dims(self.module)
        return self.name, self.adapter.kind, d_in, d_out, bias

    def parameters(self) -> dict[str, torch.Tensor]:
        """The block's parameters by role, ``{"weight": p, "bias": p}`` (a ``bias`` block has only ``"bias"``)."""
        return self.adapter.parameters(self.module)

    def parameter_names(self) -> dict[str, str]:
        """Their names in ``model.named_parameters()`` (a tied weight under its owner's, i.e. its first, name)."""
        owner = self.module_names[0] if self.module_names else self.name
        return {role: f"{owner}.{self.adapter.attributes[role]}" for role in self.parameters()}

    def canonical(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tensors keyed like :meth:`parameters` (optional leading batch dims) -> ``[..., d_out, in_dim]``."""
        return self.adapter.canonical(self.module, tensors.get("weight"), tensors.get("bias"))


@dataclass
class _Candidate:
    layer: SelectedLayer
    problem: str | None


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module, attr))
    return owners


def _candidates(model: nn.Module) -> list[_Candidate]:
    """Every loggable block of the model in ``named_modules`` order, with what (if anything) prevents logging it."""
    owners = _owners(model)
    attention = {
        id(m.out_proj): f"it is the out_proj of {name!r} (MultiheadAttention), whose {issue}"
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention) and (issue := MultiheadAttentionAdapter().problem(m))
    }
    out: list[_Candidate] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None or not name:
            continue
        weight = adapter.weight(module)
        if weight is None or not weight.requires_grad or id(weight) in claimed:
            continue  # frozen, without affine parameters, or a tied use of an earlier block
        claimed.add(id(weight))
        problem = adapter.problem(module) or attention.get(id(module))
        if problem is None and not isinstance(weight, nn.Parameter):
            problem = "its weight is not a Parameter (computed by a parametrization or weight norm)"
        tied: list[TiedUse] = []
        extra: list[_Candidate] = []
        for other_name, other, attr in owners.get(id(weight), []):
            if other is module:
                continue
            use, issue, bias_block = _tie(module, adapter, other_name, other, attr, owners)
            problem = problem or issue
            if use is not None:
                tied.append(use)
            if bias_block is not None:
                extra.append(bias_block)
                claimed.add(id(bias_block.layer.adapter.bias(other)))
        bias = adapter.bias(module)
        if problem is None and bias is not None:
            users = {n for n, m, _ in owners.get(id(bias), []) if m is not module}
            if users - {use.name for use in tied if use.bias_column}:
                problem = f"its bias is also used by {sorted(users)}, which gradstore cannot log as part of this block"
        names = (name, *(use.name for use in tied))
        out.append(_Candidate(SelectedLayer(name, module, adapter, tuple(tied), names), problem))
        out.extend(extra)
    return out


def _tie(
    module: nn.Module, adapter: LayerAdapter, other_name: str, other: nn.Module, attr: str, owners: dict
) -> tuple[TiedUse | None, str | None, _Candidate | None]:
    """How ``other`` (holding ``module``'s weight as ``attr``) contributes: its use, a problem, a block for its bias."""
    other_adapter = adapter_for(other)
    if not (adapter.tieable and other_adapter is not None and other_adapter.tieable and attr == "weight"):
        kind = type(other).__name__
        issue = f"its weight is also {other_name}.{attr} ({kind}), which gradstore cannot log in the same block"
        return None, issue, None
    problem: str | None = other_adapter.problem(other)
    transposed = adapter.transposed != other_adapter.transposed
    other_bias, own_bias = other_adapter.bias(other), adapter.bias(module)
    bias_column = other_bias is not None and other_bias is own_bias and not transposed
    use = TiedUse(other_name, other, other_adapter, transposed, bias_column)
    bias_block = None
    if other_bias is not None and not bias_column:
        if other_bias is own_bias:
            problem = problem or f"{other_name} shares both weight and bias with it, transposed"
        else:
            sharing = [n for n, m, _ in owners.get(id(other_bias), []) if m is not other]
            bias_problem = f"its bias is also used by {sharing}" if sharing else None
            layer = SelectedLayer(f"{other_name}.bias", other, BiasAdapter(other_adapter), (), (other_name,))
            bias_block = _Candidate(layer, bias_problem)
    return use, problem, bias_block


def _matches(layer: SelectedLayer, patterns: Iterable[str]) -> bool:
    names = (layer.name, *layer.module_names)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def select_layers(model: nn.Module, patterns: Sequence[str]) -> list[SelectedLayer]:
    """Blocks of trainable supported modules that the glob patterns select, in ``named_modules`` order.

    A pattern matches a block's name or the name of any module contributing to it (a tied LM head selects
    the embedding block it shares). Patterns starting with ``!`` exclude. Every pattern must match
    something. A selected block that cannot be logged exactly raises :class:`UnsupportedLayerError`.
    Normalisation layers' affine parameters are blocks like any other (``"*"`` includes them; leave them
    out with e.g. ``"!*norm*"``).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    candidates = _candidates(model)
    unmatched = [p for p in include + exclude if not any(_matches(c.layer, [p]) for c in candidates)]
    if unmatched:
        available = ", ".join(c.layer.name for c in candidates[:40]) or "none"
        raise UnknownLayerError(
            f"layer patterns {unmatched} match no supported trainable module (Linear, Embedding, Conv2d, HF Conv1D, "
            f"MultiheadAttention, LayerNorm/RMSNorm/GroupNorm/BatchNorm); available: {available}"
        )
    selected = [c for c in candidates if _matches(c.layer, include) and not _matches(c.layer, exclude)]
    for c in selected:
        if c.problem is not None:
            module = type(c.layer.module).__name__
            raise UnsupportedLayerError(
                f"layer {c.layer.name!r} ({module}) cannot be logged exactly: {c.problem}. "
                f"Leave it out with layers=[..., '!{c.layer.name}']"
            )
    return [c.layer for c in selected]


def canonical_gradient(layer: SelectedLayer, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Canonical ``[..., d_out, in_dim]`` gradient of a block from tensors keyed like ``layer.parameters()``."""
    return layer.canonical(grads)


def covered_parameters(layers: Sequence[SelectedLayer]) -> list[torch.Tensor]:
    """The distinct parameters the blocks' gradients cover (a tied weight once)."""
    seen: dict[int, torch.Tensor] = {}
    for layer in layers:
        for param in layer.parameters().values():
            seen.setdefault(id(param), param)
    return list(seen.values())


def parameter_coverage(model: nn.Module, layers: Sequence[SelectedLayer]) -> float:
    """Fraction of the model's trainable parameters (elements, tied ones once) that the blocks cover."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    covered = sum(p.numel() for p in covered_parameters(layers))
    return covered / total if total else math.nan
