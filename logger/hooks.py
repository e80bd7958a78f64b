"""Forward/backward hooks that accumulate Kronecker-projected per-example gradients.

The forward hook of a module projects its input (``a_t = P_in x~_t``, float32, small) and registers a
hook on that call's output tensor; when the output's gradient ``g`` arrives, the backward hook adds
``sum_t (P_out g_t) a_t^T`` per example into a shared ``[B, D]`` buffer. Pairing each output with its
own input this way makes weight sharing (a module called twice) sum correctly, and makes activation
checkpointing safe: a recomputed forward registers hooks on tensors that are never back-propagated.

One module call may add to several blocks (a tied LM head: the embedding's block, transposed, and its
own bias block); each such share is a ``_Part``. Every part also has a per-position form
(:meth:`_Part.positions`, the terms ``(P_out g_t)(P_in x~_t)^T`` before the sum over t), which the
per-position mode (:class:`PositionBuffers`, one example) sorts into positions and a ``rest``.
Special cases handled here:

- an Embedding whose indices are shared by the batch (``[1, T]`` or ``[T]`` position ids) gets its output
  expanded to ``[B, T, d]``, so each example's gradient ``sum_t g_{b,t} e_{pos_t}^T`` arrives separately;
- ``nn.MultiheadAttention`` (which never calls ``out_proj.forward``) is run through hookable pieces
  (:mod:`.attention`);
- a leaf output (first hooked layer, parameters frozen) is made a non-leaf, so in-place ops may follow.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradstore.projection import (
    LayerMatrices,
    LayerSpec,
    per_example_gradient,
    project_inputs,
    project_onehot_inputs,
    project_outputs,
)
from gradstore.projection.kronecker import project_rows, transposed

from .errors import BatchLayoutError, UnsupportedLayerError
from .layers import ConvAdapter, EmbeddingBagAdapter, LayerAdapter, NormAdapter, RMSNormLikeAdapter
from .selection import SelectedLayer

if TYPE_CHECKING:
    from .pca import BlockStatistics


class CaptureState:
    """What all hooks of one projector share: the current matrices and the buffer being filled."""

    def __init__(self, matrices: Mapping[str, LayerMatrices] | None = None, dim: int = 0):
        self.matrices: dict[str, LayerMatrices] = dict(matrices or {})
        self.specs: dict[str, LayerSpec] = {}
        self.dim = dim
        self.buffer: torch.Tensor | None = None
        self.force_output_grad = False  # set while parameters are frozen for a gradient-only pass
        self.paused = False
        self.backward_calls = 0  # module gradients added since the buffer was armed
        self.statistics: dict[str, BlockStatistics] | None = None  # PCA pass: accumulate covariances instead
        self.probing: dict[ModuleHook, list[tuple[int, ...]]] | None = None  # layout probe: record input shapes
        self.undecided: set[ModuleHook] = set()  # 1-D inputs of length B whose layout is not known yet
        self.root_depth = 0  # > 0 while the hooked model's own forward runs
        self.forward_batch: int | None = None  # batch size seen by the first hooked module of that forward
        self.positions: PositionBuffers | None = None  # per-position mode (one example): terms kept per position
        self._zeros: dict[torch.device, torch.Tensor] = {}

    def configure(self, specs: Sequence[LayerSpec], matrices: Mapping[str, LayerMatrices]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.matrices = dict(matrices)
        self.dim = sum(spec.dim for spec in specs)

    def arm(self, batch_size: int, device: torch.device) -> None:
        self.buffer = torch.zeros(batch_size, self.dim, dtype=torch.float32, device=device)
        self.backward_calls = 0
        self.undecided = set()
        if self.positions is not None:
            if batch_size != 1:
                raise RuntimeError("the per-position mode projects one example at a time")
            self.positions.reset()

    def disarm(self) -> torch.Tensor:
        buffer, self.buffer = self.buffer, None
        if buffer is None:
            raise RuntimeError("disarm() without arm(): the gradient buffer was never set up")
        return buffer

    @contextlib.contextmanager
    def armed(self, batch_size: int, device: torch.device) -> Iterator[None]:
        self.arm(batch_size, device)
        try:
            yield
        except BaseException:
            self.buffer = None
            raise

    def batch_size(self) -> int | None:
        """The number of examples, when known at forward time (armed, or seen earlier in this forward)."""
        if self.buffer is not None:
            return self.buffer.shape[0]
        return self.forward_batch if self.root_depth else None

    def zero(self, device: torch.device) -> torch.Tensor:
        """A scalar 0 that requires grad: ``output + zero`` is a differentiable non-leaf copy of ``output``."""
        if device not in self._zeros:
            self._zeros[device] = torch.zeros((), device=device, requires_grad=True)
        return self._zeros[device]

    def release(self) -> None:
        self._zeros = {}


class PositionBuffers:
    """Per-position mode for one example: ``per_position [T, D]`` and ``rest [D]`` (float32).

    A module call whose per-example position count (tokens, pixels: the ``T`` of its ``[B, T, d]`` rows) equals
    ``count`` adds its term for position ``t`` to row ``t``; the terms of every other call (a pooled head with
    ``T = 1``, a convolution's pixels) are summed into ``rest``. ``count`` is given, or taken from the first
    hooked call of the forward pass (the token embedding of a text model). ``per_position.sum(0) + rest`` is the
    example's projected gradient.
    """

    def __init__(self, dim: int, device: torch.device, count: int | None = None):
        self.dim, self.device, self.given = dim, device, count
        self.reset()

    def reset(self) -> None:
        self.count = self.given
        self.per_position: torch.Tensor | None = None
        if self.count is not None:
            self.per_position = torch.zeros(self.count, self.dim, dtype=torch.float32, device=self.device)
        self.rest = torch.zeros(self.dim, dtype=torch.float32, device=self.device)

    def observe(self, count: int) -> None:
        """A hooked call's position count (forward order): the first one fixes ``count`` when it was not given."""
        if self.count is None:
            self.count = count
            self.per_position = torch.zeros(count, self.dim, dtype=torch.float32, device=self.device)

    def add(self, block: slice, terms: torch.Tensor) -> None:
        """One call's per-position terms ``[T, dim of the block]`` of the one example."""
        if self.per_position is not None and terms.shape[0] == self.count:
            self.per_position[:, block] += terms
        else:
            self.rest[block] += terms.sum(dim=0)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for the hook's own arithmetic (float32); no context to enter when it is off already."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def outer_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a_t b_t^T`` per position, flattened row-major: ``[B, T, k_out], [B, T, k_in] -> [B, T, k_out * k_in]``
    (summed over T it is :func:`per_example_gradient`)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(2)


PADDED_WIDTH = 16


def padded(p_t: torch.Tensor) -> torch.Tensor:
    """A prepared ``P^T`` ``[d, k]`` (or bias ``[k]``) for :func:`project_rows` on a CPU: with ``k < 16`` its columns
    are zero-padded to 16, and the caller keeps the first ``k`` columns of the product (:func:`_project`).

    torch's CPU float32 GEMM (MKL) on the hooks' shapes (``[B*T, d] @ [d, k]``) runs 2.5-3.5x slower with ``k`` = 4-8
    columns than with 16 (1024 x 256: 0.35 ms against 0.13 ms on one thread, AMD EPYC, torch 2.13), so the padded
    product is the cheaper one; the extra columns are zeros and the kept ones are the same dot products. Elsewhere
    ``p_t`` is returned as it is."""
    k = p_t.shape[-1]
    if p_t.device.type != "cpu" or k >= PADDED_WIDTH:
        return p_t
    return torch.nn.functional.pad(p_t, (0, PADDED_WIDTH - k)).contiguous()


def _project(x: torch.Tensor, p_t: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`project_rows` with a :func:`padded` ``p_t``: the first ``k`` columns (a view when padded)."""
    out = project_rows(x, p_t, bias)
    return out if out.shape[-1] == k else out[..., :k]


# -- parts: one module call's share of one block -------------------------------------------------------


class _Part:
    """Computes one module's contribution to one block, in that block's canonical layout."""

    def __init__(self, block: str, adapter: LayerAdapter):
        self.block, self.adapter = block, adapter

    def forward(self, module: nn.Module, x: torch.Tensor, m: LayerMatrices | None, extra: Any = None) -> Any:
        """What the backward needs, kept until the output's gradient arrives (``m`` is None in the PCA pass).

        ``extra``: the call's other inputs, when the adapter needs them (``LayerAdapter.call_input``)."""
        return None

    def backward(self, module: nn.Module, feats: Any, grad: torch.Tensor, m: LayerMatrices) -> torch.Tensor:
        """``[B, k_out * k_in]`` to add into the block's slice."""
        raise NotImplementedError

    def accumulate(
        self, module: nn.Module, feats: Any, grad: torch.Tensor, m: LayerMatrices, out: torch.Tensor
    ) -> None:
        """Add :meth:`backward` into ``out`` (the block's ``[B, k_out * k_in]`` slice of the buffer, a strided view).

        Parts override it to write their last product straight into ``out`` (one kernel, no temporary)."""
        out += self.backward(module, feats, grad, m)

    def positions(self, module: nn.Module, feats: Any, grad: torch.Tensor, m: LayerMatrices) -> torch.Tensor:
        """``[B, T, k_out * k_in]``: the terms of :meth:`backward` per position ``t`` (they sum to it over T)."""
        raise NotImplementedError

    def statistics(self, module: nn.Module, feats: Any, grad: torch.Tensor, stats: BlockStatistics) -> None:
        raise NotImplementedError

    def _inputs(self, module: nn.Module, x: torch.Tensor, p: torch.Tensor | None, bias: bool) -> torch.Tensor:
        rows = self.adapter.input_rows(module, x)
        if p is None:
            return rows
        if self.adapter.onehot:
            return project_onehot_inputs(rows, p, getattr(module, "padding_idx", None))
        return project_inputs(rows, p, bias)


class WeightPart(_Part):
    """``sum_t (P_out g_t)(P_in x~_t)^T``: the module's own block, a same-orientation tie, or an MHA q/k/v chunk.

    ``with_one``: the module's bias is the block's bias (homogeneous input); ``rows``: the block rows the
    output covers (MHA chunks).
    """

    def __init__(self, block: str, adapter: LayerAdapter, with_one: bool, block_bias: bool, rows: slice | None = None):
        super().__init__(block, adapter)
        self.with_one, self.drop_bias_column, self.rows = with_one, block_bias and not with_one, rows
        self._prepared: tuple[LayerMatrices, torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None

    def _prepare(self, m: LayerMatrices) -> tuple[LayerMatrices, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(m, P_in^T, P_in's bias column, P_out^T)`` laid out for :func:`project_rows` (:func:`padded`, except a
        one-hot input's ``P_in^T``, which is gathered from), built once per ``m``."""
        if self._prepared is None or self._prepared[0] is not m:
            p_in = m.p_in[:, :-1] if self.drop_bias_column else m.p_in
            bias = None
            if self.with_one and not self.adapter.onehot:
                p_in, bias = p_in[:, :-1], padded(p_in[:, -1].contiguous())
            p_in_t = transposed(p_in) if self.adapter.onehot else padded(transposed(p_in))
            p_out = m.p_out if self.rows is None else m.p_out[:, self.rows]
            self._prepared = (m, p_in_t, bias, padded(transposed(p_out)))
        return self._prepared

    def forward(self, module, x, m, extra=None):
        if m is None:
            return self.adapter.input_rows(module, x)
        _, p_in_t, bias, _ = self._prepare(m)
        rows = self.adapter.input_rows(module, x)
        if self.adapter.onehot:  # P_in e_i: a row gather of P_in^T
            projected = p_in_t[rows]
            padding_idx = getattr(module, "padding_idx", None)
            return projected if padding_idx is None else projected * (rows != padding_idx).unsqueeze(-1)
        return _project(rows, p_in_t, m.p_in.shape[0], bias)

    def backward(self, module, feats, grad, m):
        return per_example_gradient(self._projected_grad(module, grad, m), feats)

    def accumulate(self, module, feats, grad, m, out):
        # bmm into a fresh [B, k_out, k_in], then one add into the strided slice (baddbmm_ into the strided slice
        # itself takes a slow path)
        out.add_(torch.bmm(self._projected_grad(module, grad, m).transpose(1, 2), feats).view(out.shape))

    def positions(self, module, feats, grad, m):
        return outer_rows(self._projected_grad(module, grad, m), feats)

    def _projected_grad(self, module, grad, m):
        return _project(self.adapter.output_grad(module, grad), self._prepare(m)[3], m.p_out.shape[0])

    def statistics(self, module, feats, grad, stats):
        stats.add_grads(self.adapter.output_grad(module, grad), self.rows)
        if self.adapter.onehot:
            stats.add_input_counts(feats, getattr(module, "padding_idx", None))
        else:
            stats.add_inputs(feats, with_one=self.with_one)


class TransposedPart(_Part):
    """A tie whose canonical gradient is the block's transpose: ``sum_t (P_out x_t)(P_in g_t)^T``."""

    def __init__(self, block: str, adapter: LayerAdapter, block_bias: bool):
        super().__init__(block, adapter)
        self.block_bias = block_bias
        self._prepared: tuple[LayerMatrices, torch.Tensor, torch.Tensor] | None = None

    def _prepare(self, m: LayerMatrices) -> tuple[LayerMatrices, torch.Tensor, torch.Tensor]:
        """``(m, P_out^T, P_in^T without the bias column)`` (:func:`padded`), built once per ``m``."""
        if self._prepared is None or self._prepared[0] is not m:
            p_in = m.p_in[:, :-1] if self.block_bias else m.p_in
            self._prepared = (m, padded(transposed(m.p_out)), padded(transposed(p_in)))
        return self._prepared

    def forward(self, module, x, m, extra=None):
        if m is None or self.adapter.onehot:
            return self._inputs(module, x, None if m is None else m.p_out, False)
        return _project(self.adapter.input_rows(module, x), self._prepare(m)[1], m.p_out.shape[0])

    def backward(self, module, feats, grad, m):
        return per_example_gradient(feats, self._projected_grad(module, grad, m))

    def accumulate(self, module, feats, grad, m, out):
        out.add_(torch.bmm(feats.transpose(1, 2), self._projected_grad(module, grad, m)).view(out.shape))

    def positions(self, module, feats, grad, m):
        return outer_rows(feats, self._projected_grad(module, grad, m))

    def _projected_grad(self, module, grad, m):
        return _project(self.adapter.output_grad(module, grad), self._prepare(m)[2], m.p_in.shape[0])

    def statistics(self, module, feats, grad, stats):
        if self.adapter.onehot:
            stats.add_grad_counts(feats, getattr(module, "padding_idx", None))
        else:
            stats.add_grads(feats.reshape(feats.shape[0], -1, feats.shape[-1]))
        stats.add_inputs(self.adapter.output_grad(module, grad), with_one=False)


class BiasPart(_Part):
    """A tied module's own bias: ``(sum_t P_out g_t) P_in[:, 0]`` (the input is the constant 1)."""

    def backward(self, module, feats, grad, m):
        summed = project_outputs(self.adapter.output_grad(module, grad), m.p_out).sum(dim=1)
        return (summed[:, :, None] * m.p_in[:, 0]).flatten(1)

    def positions(self, module, feats, grad, m):
        projected = project_outputs(self.adapter.output_grad(module, grad), m.p_out)
        return (projected.unsqueeze(-1) * m.p_in[:, 0]).flatten(2)

    def statistics(self, module, feats, grad, stats):
        g = self.adapter.output_grad(module, grad)
        stats.add_grads(g)
        stats.add_constant(g.shape[0] * g.shape[1])


class NormPart(_Part):
    """Affine normalisation: ``P_out [sum_t g_t * x^_t, sum_t g_t] P_in^T`` from the input kept by reference.

    The backward needs ``x^`` once (one fused normalisation of the kept input, no affine), one product with the
    output gradient and two sums over positions; the projection of both columns is a single ``[d, k_out * k_in]``
    matrix per column (``P_out^T`` times a column of ``P_in``, built once per set of matrices), added into the
    block's slice of the buffer with ``addmm_``: a handful of kernels per call, whatever the width.
    """

    def __init__(self, block: str, adapter: NormAdapter, bias: bool):
        super().__init__(block, adapter)
        self.norm, self.bias = adapter, bias
        self._folded: tuple[LayerMatrices, list[torch.Tensor]] | None = None

    def forward(self, module, x, m, extra=None):
        """``extra``: the call's output (:class:`ModuleHook` passes it to norm parts), whose autograd node may hold
        the normalisation's statistics (:meth:`NormAdapter.saved_statistics`)."""
        saved = self.norm.saved_statistics(module, x, extra) if isinstance(extra, torch.Tensor) else None
        return x.detach(), x._version, saved

    def _input(self, feats: tuple[torch.Tensor, int, Any]) -> torch.Tensor:
        x, version, _ = feats
        if x._version != version:
            raise RuntimeError(
                f"the input of normalisation layer {self.block!r} was modified in place after its forward; "
                "gradstore recomputes x^ from it in the backward pass. Avoid the in-place op or leave the layer out"
            )
        return x

    def _normalized(self, module: nn.Module, feats: tuple[torch.Tensor, int, Any]) -> torch.Tensor:
        return self.norm.normalized(module, self._input(feats), feats[2])

    def _columns(
        self, module: nn.Module, feats: tuple[torch.Tensor, int, Any], grad: torch.Tensor
    ) -> list[torch.Tensor]:
        """``[sum_t g_t * x^_t, sum_t g_t]`` (the bias column only with a bias), each ``[B, d]`` float32."""
        x = self._input(feats)
        g = self.norm.output_grad(module, grad)
        if g.dtype != torch.float32:
            g = g.float()
        normalized = self.norm.normalized(module, x, feats[2])
        if normalized.data_ptr() != x.data_ptr() and normalized.is_contiguous():
            product = normalized.mul_(g)  # a fresh tensor: multiply in place
        else:
            product = normalized * g
        columns = [product.sum(dim=1)]
        if self.bias:
            columns.append(g.sum(dim=1))
        return columns

    def _matrix(self, module: nn.Module, feats: tuple[torch.Tensor, int, Any], grad: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._columns(module, feats, grad), dim=-1)  # [B, d, 1 + bias]

    def _fold(self, m: LayerMatrices) -> list[torch.Tensor]:
        """Per column ``i``: ``W_i [d, k_out * k_in]``, ``W_i[d, (o, k)] = P_out[o, d] P_in[k, i]``."""
        if self._folded is None or self._folded[0] is not m:
            self._folded = (m, [(m.p_out.T[:, :, None] * m.p_in[:, i]).flatten(1) for i in range(m.p_in.shape[1])])
        return self._folded[1]

    def backward(self, module, feats, grad, m):
        columns, folded = self._columns(module, feats, grad), self._fold(m)
        out = columns[0] @ folded[0]
        for column, w in zip(columns[1:], folded[1:]):
            out.addmm_(column, w)
        return out

    def accumulate(self, module, feats, grad, m, out):
        for column, w in zip(self._columns(module, feats, grad), self._fold(m)):
            out.addmm_(column, w)

    def positions(self, module, feats, grad, m):
        g = self.norm.output_grad(module, grad).float()
        columns = [g * self._normalized(module, feats)]
        if self.bias:
            columns.append(g)
        per_position = torch.stack(columns, dim=-1)  # [B, T, d, 1 + bias]
        return torch.einsum("od,btdi,ki->btok", m.p_out, per_position, m.p_in).flatten(2)

    def statistics(self, module, feats, grad, stats):
        stats.add_matrices(self._matrix(module, feats, grad))


class ConvPart(_Part):
    """A convolution's or transposed convolution's own block, block-diagonal over groups.

    Per position ``t`` (pixel) and group ``j`` the adapter gives a row-side vector (group ``j``'s slice of the
    block's rows) and a column-side vector; rows are projected with the matching columns of ``P_out``, columns
    with ``P_in``, and the (t, j) pairs are summed like positions. Which side comes from the forward input and which
    from the output gradient is the adapter's ``rows_from_input``.
    """

    def __init__(self, block: str, adapter: ConvAdapter, bias: bool):
        super().__init__(block, adapter)
        self.conv, self.bias = adapter, bias

    def forward(self, module, x, m, extra=None):
        side = self.conv.forward_side(module, x)
        if m is not None:
            side = self._project(side, m, self.conv.rows_from_input)
        return side, tuple(x.shape[2:])

    def _project(self, side: torch.Tensor, m: LayerMatrices, rows: bool) -> torch.Tensor:
        if rows:
            p_out = m.p_out.view(m.p_out.shape[0], side.shape[2], -1)
            return torch.einsum("btgc,kgc->btgk", side.float(), p_out)
        return project_inputs(side, m.p_in, self.bias)

    def _sides(self, module, feats, grad, m) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, columns)``, each ``[B, T, G, k]`` (raw, unprojected, when ``m`` is None)."""
        forward, size = feats
        backward = self.conv.backward_side(module, grad, size)
        if m is not None:
            backward = self._project(backward, m, not self.conv.rows_from_input)
        return (forward, backward) if self.conv.rows_from_input else (backward, forward)

    def backward(self, module, feats, grad, m):
        rows, cols = self._sides(module, feats, grad, m)
        return per_example_gradient(rows.flatten(1, 2), cols.flatten(1, 2))

    def positions(self, module, feats, grad, m):
        rows, cols = self._sides(module, feats, grad, m)
        return (rows.unsqueeze(-1) * cols.unsqueeze(-2)).sum(dim=2).flatten(2)

    def statistics(self, module, feats, grad, stats):
        rows, cols = self._sides(module, feats, grad, None)
        stats.add_inputs(cols, with_one=self.bias)
        width = rows.shape[-1]
        for j in range(rows.shape[2]):
            stats.add_grads(rows[:, :, j], slice(j * width, (j + 1) * width))


class EmbeddingBagPart(_Part):
    """``nn.EmbeddingBag``: one position per bag, its input the bag's weighted multi-hot ``x_b`` (see the adapter)."""

    def __init__(self, block: str, adapter: EmbeddingBagAdapter):
        super().__init__(block, adapter)
        self.bag = adapter

    def forward(self, module, x, m, extra=None):
        indices, weights = self.bag.bags(module, x, *(extra or (None, None)))
        if m is None:
            return indices, weights
        return torch.einsum("bl,blk->bk", weights.float(), m.p_in.T[indices]).unsqueeze(1)  # [B, 1, k_in]

    def _projected_grad(self, module, grad, m):
        return project_outputs(self.adapter.output_grad(module, grad), m.p_out)

    def backward(self, module, feats, grad, m):
        return per_example_gradient(self._projected_grad(module, grad, m), feats)

    def positions(self, module, feats, grad, m):
        return outer_rows(self._projected_grad(module, grad, m), feats)

    def statistics(self, module, feats, grad, stats):
        indices, weights = feats
        stats.add_grads(self.adapter.output_grad(module, grad))
        stats.inputs.index_add_(0, indices.flatten(), weights.flatten().to(stats.inputs.dtype))


def parts_of(layer: SelectedLayer) -> list[tuple[nn.Module, LayerAdapter, _Part]]:
    """Every (module, that module's adapter, part) through which a block receives its gradient."""
    has_bias = layer.adapter.dims(layer.module)[2]
    if isinstance(layer.adapter, NormAdapter):
        return [(layer.module, layer.adapter, NormPart(layer.name, layer.adapter, has_bias))]
    if layer.kind == "bias":
        inner = layer.adapter.inner  # type: ignore[attr-defined]
        return [(layer.module, inner, BiasPart(layer.name, inner))]
    if layer.kind == "parameter":
        return []  # hooked on its uses (functional.ParameterHook)
    if isinstance(layer.adapter, ConvAdapter):
        return [(layer.module, layer.adapter, ConvPart(layer.name, layer.adapter, has_bias))]
    if isinstance(layer.adapter, EmbeddingBagAdapter):
        return [(layer.module, layer.adapter, EmbeddingBagPart(layer.name, layer.adapter))]
    out: list[tuple[nn.Module, LayerAdapter, _Part]] = []
    if layer.kind != "mha":  # the attention hook feeds the in-projection itself
        out.append((layer.module, layer.adapter, WeightPart(layer.name, layer.adapter, has_bias, has_bias)))
    for use in layer.tied:
        part: _Part
        if use.transposed:
            part = TransposedPart(layer.name, use.adapter, has_bias)
        else:
            part = WeightPart(layer.name, use.adapter, use.bias_column, has_bias)
        out.append((use.module, use.adapter, part))
    return out


# -- module hooks ------------------------------------------------------------------------------------


class ModuleHook:
    """The forward hook of one module (all its parts); ``remove()`` takes it off."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        adapter: LayerAdapter,
        parts: list[_Part],
        state: CaptureState,
        register: bool = True,
        batch_dim: int = 0,
    ):
        self.name, self.module, self.adapter, self.parts, self.state = name, module, adapter, parts, state
        self.batch_dim = batch_dim  # 1 inside a sequence-first nn.Transformer* layer
        self.layout_1d: str | None = None  # "shared" | "batch" once known for 1-D index inputs
        self._verified = not isinstance(adapter, RMSNormLikeAdapter)
        self._handle = module.register_forward_hook(self._forward, with_kwargs=True) if register else None

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
        x, extra = self.adapter.call_input(module, args, kwargs)
        return self.observe(module, x, output, extra=extra)

    def observe(
        self, module: nn.Module, x: Any, output: Any, parts: list[_Part] | None = None, extra: Any = None
    ) -> torch.Tensor | None:
        """Start this call's contribution; returns a replacement for ``output`` when one is needed.

        ``x``: the input of the hooked computation; ``extra``: its other inputs (``LayerAdapter.call_input``)."""
        state = self.state
        if state.paused or not (torch.is_grad_enabled() or state.probing is not None):
            return None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise UnsupportedLayerError(
                f"layer {self.name!r} ({type(module).__name__}) was called with {type(x).__name__} and returned "
                f"{type(output).__name__}; gradstore logs modules that map a tensor to a tensor. "
                f"Leave it out with layers=[..., '!{self.name}']"
            )
        if state.probing is not None:
            state.probing.setdefault(self, []).append(tuple(x.shape))
            return None
        replaced = None
        if not output.requires_grad:
            if not (state.force_output_grad and output.grad_fn is None):
                return None
            # parameters are frozen: a non-leaf copy makes the activation path differentiable and, unlike
            # requires_grad_() on the output itself, lets in-place ops (ReLU(inplace=True)) follow
            output = replaced = output + state.zero(output.device)
        if not self._verified:
            self._verify(module, x, output)
        if self.batch_dim:
            x = x.transpose(0, self.batch_dim)
        layout = self._layout(x)
        if layout == "shared":
            if x.dim() == 1:
                x, output = x.unsqueeze(0), output.unsqueeze(0)
            output = replaced = output.expand(state.batch_size(), *output.shape[1:])
        elif layout == "batch" and state.root_depth and state.forward_batch is None and x.dim() >= 2:
            state.forward_batch = x.shape[0]
        if state.positions is not None:
            rows = output.transpose(0, self.batch_dim) if self.batch_dim else output
            state.positions.observe(self.adapter.output_grad(module, rows).shape[1])
        problem = None
        if isinstance(self.adapter, NormAdapter):
            problem = self.adapter.runtime_problem(module)
            extra = None if self.batch_dim else output  # its autograd node may hold x^'s statistics (NormPart)
        parts = self.parts if parts is None else parts
        stats = state.statistics is not None
        matrices = [None if stats else state.matrices[part.block] for part in parts]
        with _no_autocast(output.device.type):
            feats = [part.forward(module, x.detach(), m, extra) for part, m in zip(parts, matrices)]
        if layout == "shared":
            feats = [f.expand(output.shape[0], *f.shape[1:]) for f in feats]
        output.register_hook(functools.partial(self._backward, parts, feats, matrices, layout, problem))
        return replaced

    def _verify(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        if not self.adapter.verify(module, x, output):  # type: ignore[attr-defined]
            raise UnsupportedLayerError(
                f"layer {self.name!r} ({type(module).__name__}) looks like an RMSNorm but its output is not "
                "weight * x / sqrt(mean(x^2) + eps), so gradstore cannot log it exactly; "
                f"leave it out with layers=[..., '!{self.name}']"
            )
        self._verified = True

    def _layout(self, x: torch.Tensor) -> str:
        """``batch`` (one row per example), ``shared`` (indices shared by the batch), or ``undecided``."""
        if not self.adapter.onehot or isinstance(self.adapter, EmbeddingBagAdapter):
            return "batch"  # an EmbeddingBag's 1-D input with offsets is one bag per example
        b = self.state.batch_size()
        if x.dim() >= 2:
            return "shared" if b is not None and b > 1 and x.shape[0] == 1 else "batch"
        if b is None:
            return "batch" if self.layout_1d == "batch" else "undecided"
        if x.shape[0] != b:
            self.layout_1d = "shared"
        elif b == 1:
            return "batch"  # one example: its gradient is exact either way
        if self.layout_1d is None:
            self.state.undecided.add(self)
            return "undecided"
        return self.layout_1d

    def _backward(
        self, parts: list[_Part], feats: list, matrices: list, layout: str, problem: str | None, grad: torch.Tensor
    ) -> None:
        state = self.state
        buffer = state.buffer
        if buffer is None:
            return
        if self.batch_dim:
            grad = grad.transpose(0, self.batch_dim)
        if layout == "undecided":
            raise BatchLayoutError(
                f"layer {self.name!r} got 1-D indices of length {grad.shape[0]}, equal to the batch size, so gradstore "
                "cannot tell one index per example from positions shared by the batch (an arange(T)). project() "
                "decides this once with one-example probes: call it (or log_checkpoint) before capture(), or pass "
                "position ids as [1, T] or [B, T]"
            )
        if problem is not None:
            raise UnsupportedLayerError(f"layer {self.name!r}: {problem}")
        if grad.shape[0] != buffer.shape[0]:
            raise BatchLayoutError(
                f"layer {self.name!r} saw batch dimension {grad.shape[0]} but {buffer.shape[0]} example ids were "
                "given; hooked modules must take batch-first inputs. Embedding indices shared by the batch ([1, T] "
                "or [T] position ids) are expanded when the batch size is known at forward time: run the forward "
                "inside capture()/project(). Otherwise leave the layer out with '!name'"
            )
        with _no_autocast(grad.device.type):
            for part, f, m in zip(parts, feats, matrices):
                if state.statistics is not None:
                    part.statistics(self.module, f, grad, state.statistics[part.block])
                    continue
                block = state.specs[part.block].slice
                if state.positions is not None:
                    terms = part.positions(self.module, f, grad, m)  # [1, T, dim]
                    state.positions.add(block, terms[0])
                    buffer[:, block] += terms.sum(dim=1)
                else:
                    part.accumulate(self.module, f, grad, m, buffer[:, block])
        state.backward_calls += 1


# -- installing and removing -------------------------------------------------------------------------


class InstalledHooks:
    """Every hook, patched forward and flag one projector put on a model; ``remove()`` undoes all of it."""

    def __init__(self, model: nn.Module, layers: Sequence[SelectedLayer], state: CaptureState):
        from .attention import AttentionHook  # not at the top: these import ModuleHook from here
        from .functional import OpIntercept, bare_parameter_hooks

        self.state = state
        per_module: dict[int, tuple[str, nn.Module, LayerAdapter, list[_Part]]] = {}
        names = {id(m): n for n, m in model.named_modules()}
        for layer in layers:
            for module, adapter, part in parts_of(layer):
                entry = per_module.setdefault(id(module), (names.get(id(module), layer.name), module, adapter, []))
                entry[3].append(part)
        seq_first = _sequence_first_modules(model)
        self.modules = [
            ModuleHook(n, m, a, parts, state, register=not a.overrides_forward(m), batch_dim=int(id(m) in seq_first))
            for n, m, a, parts in per_module.values()
        ]
        self.scoped: list[Any] = [
            OpIntercept(hook, state) for hook in self.modules if hook.adapter.overrides_forward(hook.module)
        ]
        self.scoped += bare_parameter_hooks(model, layers, state)
        in_proj = {id(layer.module): layer for layer in layers if layer.kind == "mha"}
        self.attention = [
            AttentionHook(name, module, in_proj[id(module)].adapter if id(module) in in_proj else None, state)
            for name, module in model.named_modules()
            if isinstance(module, nn.MultiheadAttention)
            and (id(module) in in_proj or id(module.out_proj) in per_module)
        ]
        hooked = set(per_module) | set(in_proj)
        self._nested: list[tuple[nn.TransformerEncoder, bool]] = []
        for module in model.modules():
            if isinstance(module, nn.TransformerEncoder) and any(id(m) in hooked for m in module.modules()):
                # the nested-tensor conversion (eval mode, inputs not requiring grad) would bypass the hooks
                self._nested.append((module, module.use_nested_tensor))
                module.use_nested_tensor = False
        self._root = [
            model.register_forward_pre_hook(self._root_enter),
            model.register_forward_hook(self._root_exit, always_call=True),
        ]

    def _root_enter(self, module: nn.Module, args: tuple) -> None:
        if self.state.root_depth == 0:
            self.state.forward_batch = None
        self.state.root_depth += 1

    def _root_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.state.root_depth -= 1
        if self.state.root_depth == 0:
            self.state.forward_batch = None

    def remove(self) -> None:
        for hook in self.modules:
            hook.remove()
        for scoped in self.scoped:
            scoped.remove()
        for attention in self.attention:
            attention.remove()
        for encoder, flag in self._nested:
            encoder.use_nested_tensor = flag
        for handle in self._root:
            handle.remove()
        self.modules, self.scoped, self.attention, self._nested, self._root = [], [], [], [], []


def _sequence_first_modules(model: nn.Module) -> set[int]:
    """Modules that PyTorch's ``nn.Transformer*`` layers call on ``[T, B, d]`` (``batch_first=False``).

    The attention's ``out_proj`` is excluded: the attention hook calls it batch-first.
    """
    out: set[int] = set()
    for module in model.modules():
        inner: list[nn.Module]
        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            first = module.self_attn.batch_first
            inner = [module]
        elif isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and module.norm is not None:
            first = module.layers[0].self_attn.batch_first
            inner = [module.norm]
        else:
            continue
        if not first:
            attention = {
                id(m) for r in inner for a in r.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()
            }
            out |= {id(m) for r in inner for m in r.modules() if id(m) not in attention}
    return out


@contextlib.contextmanager
def frozen_parameters(model: nn.Module, state: CaptureState) -> Iterator[None]:
    """Skip weight-gradient work: parameters stop requiring grad, hooked outputs are made to require it.

    Back-propagating then computes only the activation gradients the hooks need, which is less work
    than a training step's backward.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    state.force_output_grad = True
    try:
        yield
    finally:
        state.force_output_grad = False
        state.release()
        for p, flag in flags:
            p.requires_grad_(flag)
