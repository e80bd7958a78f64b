"""``nn.MultiheadAttention`` support: its forward run through pieces the module hooks can see.

PyTorch's MHA calls ``F.multi_head_attention_forward`` with its weights, so ``out_proj.forward`` never runs
and ``in_proj_weight`` is never seen by a module hook. :class:`AttentionHook` swaps the instance's ``forward``
for :func:`attention_forward`, PyTorch's non-fused path with the in-projection as hooked ``F.linear`` calls
on [q; k; v] (the ``mha`` block) and ``out_proj`` called as a module, so its own hook fires.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError
from .hooks import CaptureState, ModuleHook, WeightPart
from .layers import LayerAdapter


class AttentionHook:
    """Runs ``nn.MultiheadAttention`` through hookable pieces while installed (restored by ``remove()``).

    PyTorch's MHA calls ``F.multi_head_attention_forward`` with its weights, so ``out_proj.forward`` never
    runs and ``in_proj_weight`` is never seen by a module hook. While hooked, and only when gradients are
    being recorded, the instance's ``forward`` computes the same attention as PyTorch's reference path:
    in-projection as ``F.linear`` on [q; k; v] (hooked as the ``mha`` block), scaled dot-product attention
    with the same mask semantics, and ``out_proj`` called as a module so its own hook fires. Otherwise
    (inference, probes) the original forward runs.
    """

    def __init__(self, name: str, module: nn.MultiheadAttention, adapter: LayerAdapter | None, state: CaptureState):
        self.module, self.state = module, state
        self.block = name if adapter is not None else None
        self.observer = ModuleHook(name, module, adapter or LayerAdapter(), [], state, register=False)
        self._parts: dict[tuple[int, int], WeightPart] = {}
        module.forward = self._forward  # type: ignore[method-assign]
        # any hook inside an nn.TransformerEncoderLayer keeps it off its fused fast path
        self._handle = module.register_forward_pre_hook(_keep_off_fast_path)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") == self._forward:
            del self.module.forward
        self._handle.remove()

    def _forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        state, mha = self.state, self.module
        if state.probing is not None or state.paused or not torch.is_grad_enabled():
            return type(mha).forward(
                mha, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        return attention_forward(
            mha,
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
            self._linear,
        )

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        if self.block is None:
            return out
        key = (rows.start, rows.stop)
        if key not in self._parts:
            self._parts[key] = WeightPart(self.block, self.observer.adapter, bias is not None, bias is not None, rows)
        replaced = self.observer.observe(self.module, x, out, [self._parts[key]])
        return out if replaced is None else replaced


def _keep_off_fast_path(module: nn.Module, args: tuple) -> None:
    return None


def attention_forward(
    mha: nn.MultiheadAttention,
    query,
    key,
    value,
    key_padding_mask,
    need_weights,
    attn_mask,
    average_attn_weights,
    is_causal,
    linear: Callable,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` (PyTorch's non-fused path) with a hookable in-projection and ``out_proj``."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise UnsupportedLayerError("gradstore cannot log nn.MultiheadAttention on nested tensors; pass padded tensors")
    batched = query.dim() == 3
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    attn_mask = F._canonical_mask(
        mask=attn_mask,
        mask_name="attn_mask",
        other_type=None,
        other_name="",
        target_type=query.dtype,
        check_other=False,
    )
    if not batched:
        to_batch_first: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.unsqueeze(0)  # noqa: E731
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        to_batch_first = lambda t: t  # noqa: E731
    else:
        to_batch_first = lambda t: t.transpose(0, 1)  # noqa: E731
    q_in = to_batch_first(query)
    k_in = q_in if key is query else to_batch_first(key)
    v_in = k_in if value is key else q_in if value is query else to_batch_first(value)
    n, tgt, e = q_in.shape
    heads = mha.num_heads
    head_dim = e // heads
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    elif key_padding_mask is not None:
        is_causal = False

    w, b = mha.in_proj_weight, mha.in_proj_bias

    def project(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        rows = slice(start * e, stop * e)
        return linear(x, w[rows], None if b is None else b[rows], rows)

    if k_in is q_in and v_in is q_in:
        q, k, v = project(q_in, 0, 3).chunk(3, dim=-1)
    elif v_in is k_in:
        q = project(q_in, 0, 1)
        k, v = project(k_in, 1, 3).chunk(2, dim=-1)
    else:
        q, k, v = project(q_in, 0, 1), project(k_in, 1, 2), project(v_in, 2, 3)
    q, k, v = (t.reshape(n, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if mha.add_zero_attn:
        zeros = k.new_zeros(n, heads, 1, head_dim)
        k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src = k.shape[2]
    mask = None
    if attn_mask is not None:
        mask = attn_mask.view(1, 1, tgt, src) if attn_mask.dim() == 2 else attn_mask.view(n, heads, tgt, src)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(n, 1, 1, src)
        mask = padding if mask is None else mask + padding
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    dropout_p = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p)
        out = probs @ v
        weights = probs.mean(dim=1) if average_attn_weights else probs
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal=is_causal)
    out = mha.out_proj(out.transpose(1, 2).reshape(n, tgt, e))
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if mha.batch_first else out.transpose(0, 1)), weights
