"""Hooks on the torch functions a module's forward calls, for what a module hook cannot see.

Two uses, each a ``TorchFunctionMode`` pushed while one module's forward runs (only when gradients are recorded):

- :class:`OpIntercept`: a supported module whose class overrides ``forward`` (Gemma's scaled embedding, OPT's and
  BART's offset positions) is hooked on the functional op its forward calls with ``self.weight`` (``F.embedding``,
  ``F.linear``): the op's own input and output go to the module's :class:`~.hooks.ModuleHook`, so whatever the
  forward does around the op (a scale, an offset, a cast) is handled by autograd. Any other use of the weight, or
  no such op, is refused after the forward.
- :class:`ParameterHook`: a bare parameter (a cls token, a position table, a scalar) is followed through the ops its
  holder's forward applies to it. Ops on it alone (slicing, ``exp``, reshapes) give tensors still derived from it
  without a batch dimension; the op where such a tensor ``u`` meets the batch (``x + u``, ``x * u``, ``x / u``,
  ``u.expand(B, ...)``) gives each example ``b`` its cotangent for ``u`` from the output gradient's row ``b``
  (the broadcast dimensions summed), and ``torch.autograd.grad(u, p, ..., is_grads_batched=True)`` carries those
  back to the parameter. Any other op meeting the batch is refused, naming the parameter and the op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from .audit import METADATA as AUDIT_METADATA
from .errors import BatchLayoutError, UnsupportedLayerError
from .hooks import CaptureState, ModuleHook
from .selection import SelectedLayer

# the audit's metadata calls, less attribute reads: here reading the weight's ``.T`` or ``.dtype`` is looked at per op
_METADATA = AUDIT_METADATA - {"__get__"}


def _recording(state: CaptureState) -> bool:
    return not state.paused and (torch.is_grad_enabled() or state.probing is not None)


class _ScopedMode:
    """Pushes ``make()`` while ``module``'s forward runs (when recording); ``finish(output)`` runs after it."""

    def __init__(self, module: nn.Module, state: CaptureState):
        self.module, self.state = module, state
        self._stack: list[TorchFunctionMode | None] = []
        self._handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._exit, always_call=True),
        ]

    def make(self) -> TorchFunctionMode:
        raise NotImplementedError

    def finish(self, mode: TorchFunctionMode, failed: bool) -> None:
        pass

    def _enter(self, module: nn.Module, args: tuple) -> None:
        mode = self.make() if _recording(self.state) else None
        if mode is not None:
            mode.__enter__()
        self._stack.append(mode)

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        mode = self._stack.pop()
        if mode is not None:
            mode.__exit__(None, None, None)
            self.finish(mode, output is None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# -- supported modules whose class overrides forward -------------------------------------------------


class _InterceptMode(TorchFunctionMode):
    def __init__(self, owner: OpIntercept):
        super().__init__()
        self.owner = owner
        self.found = 0
        self.other: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.owner
        module = owner.hook.module
        if func in owner.hook.adapter.ops:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if weight is module.weight:
                problem = owner.call_problem(func, args, kwargs)
                if problem is not None:
                    raise UnsupportedLayerError(f"layer {owner.hook.name!r} ({type(module).__name__}): {problem}")
                out = func(*args, **kwargs)
                self.found += 1
                x = args[0] if args else kwargs.get("input")
                replaced = owner.hook.observe(module, x, out)
                return out if replaced is None else replaced
        name = getattr(func, "__name__", repr(func))
        out = func(*args, **kwargs)
        if name in _METADATA or (name == "__get__" and not isinstance(out, torch.Tensor)):  # .dtype, .device
            return out
        params = owner.hook.adapter.parameters(module).values()
        if any(leaf is p for leaf in tree_leaves((args, kwargs)) for p in params):
            self.other.append(name)
        return out


class OpIntercept(_ScopedMode):
    """Hooks a supported module whose class overrides ``forward`` on the functional op called with its weight."""

    def __init__(self, hook: ModuleHook, state: CaptureState):
        self.hook = hook
        super().__init__(hook.module, state)

    def make(self) -> TorchFunctionMode:
        return _InterceptMode(self)

    def call_problem(self, func, args: tuple, kwargs: dict) -> str | None:
        """Why this op call does not compute what the adapter assumes, or None."""
        module = self.hook.module
        if func is F.linear:
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if bias is not module.bias:
                return "its forward calls F.linear with a bias other than self.bias"
        if func is F.embedding:
            names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
            call = dict(zip(names, args)) | kwargs
            padding = call.get("padding_idx")
            if padding is not None and padding < 0:
                padding += module.num_embeddings
            if padding != module.padding_idx or call.get("max_norm") is not None or call.get("scale_grad_by_freq"):
                return "its forward calls F.embedding with padding_idx, max_norm or scale_grad_by_freq of its own"
        return None

    def finish(self, mode: TorchFunctionMode, failed: bool) -> None:
        assert isinstance(mode, _InterceptMode)
        if failed or self.state.probing is not None:
            return
        module, name = self.hook.module, self.hook.name
        ops = " / ".join(f"F.{op.__name__}" for op in self.hook.adapter.ops)
        if mode.other:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) overrides forward and uses its parameters in "
                f"{sorted(set(mode.other))} besides {ops}(..., self.weight), which gradstore cannot hook exactly; "
                f"leave it out with layers=[..., '!{name}']"
            )
        if not mode.found:
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(module).__name__}) overrides forward without calling {ops}(..., self.weight), "
                f"so gradstore cannot find the computation to hook; leave it out with layers=[..., '!{name}']"
            )


# -- bare parameters --------------------------------------------------------------------------------

_ADD = {"add", "__add__", "__radd__", "__iadd__", "add_"}
_SUB = {"sub", "subtract", "__sub__", "__isub__", "sub_"}
_MUL = {"mul", "multiply", "__mul__", "__rmul__", "__imul__", "mul_"}
_DIV = {"div", "divide", "true_divide", "__truediv__", "__itruediv__", "div_"}
_EXPAND = {"expand", "expand_as", "broadcast_to"}


class _Use:
    """One tensor derived from bare parameters (no batch dimension): the aliases it came from, by block."""

    def __init__(self, roots: dict[str, torch.Tensor]):
        self.roots = roots


class _ParameterMode(TorchFunctionMode):
    def __init__(self, owner: ParameterHook):
        super().__init__()
        self.owner = owner
        self.derived: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _METADATA:
            return func(*args, **kwargs)
        owner = self.owner
        args, kwargs = tree_map(self._alias, (args, kwargs))
        leaves = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        uses = [leaf for leaf in leaves if leaf in self.derived]
        if not uses:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        roots: dict[str, torch.Tensor] = {}
        for u in uses:
            roots.update(self.derived[u].roots)
        batched = [leaf for leaf in leaves if leaf not in self.derived and not owner.is_static(leaf)]
        if not batched and not (name in _EXPAND and _creates_batch(uses[0], out)):
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.derived[o] = _Use(roots)
            return out
        owner.boundary(func, name, args, kwargs, out, uses, roots)
        return out

    def _alias(self, leaf: Any) -> Any:
        block = self.owner.blocks.get(id(leaf)) if isinstance(leaf, nn.Parameter) else None
        if block is None:
            return leaf
        # a per-forward stand-in with a graph of its own: autograd.grad(u, alias) works even when p is frozen
        alias = leaf.view_as(leaf) if leaf.requires_grad else leaf.detach().requires_grad_(True)
        self.derived[alias] = _Use({block: alias})
        return alias


def _creates_batch(u: torch.Tensor, out: torch.Tensor) -> bool:
    return out.dim() > u.dim() or (out.dim() == u.dim() and u.dim() > 0 and u.shape[0] == 1)


class ParameterHook(_ScopedMode):
    """Per-example gradients of the bare parameters one module holds, from the ops where their uses meet the batch."""

    def __init__(self, module: nn.Module, layers: Sequence[SelectedLayer], state: CaptureState, static: set[int]):
        self.layers = {layer.name: layer for layer in layers}
        self.blocks = {id(layer.parameters()["weight"]): layer.name for layer in layers}
        self.static = static  # ids of the model's parameters and buffers: no batch dimension
        super().__init__(module, state)

    def make(self) -> TorchFunctionMode:
        return _ParameterMode(self)

    def is_static(self, t: torch.Tensor) -> bool:
        return id(t) in self.static or not (t.is_floating_point() or t.is_complex())

    def boundary(self, func, name: str, args, kwargs, out, uses: list[torch.Tensor], roots: dict) -> None:
        """Register the per-example backward of one op where a parameter-derived ``u`` meets the batch."""
        if self.state.probing is not None:
            return
        blocks = sorted(roots)
        if len(uses) != 1 or not isinstance(out, torch.Tensor) or not _known(name):
            self._refuse(blocks, name, "is used by {op}, whose per-example gradient gradstore cannot compute")
        u = uses[0]
        if not u.requires_grad or not out.requires_grad:
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        other = next((a for a in tensors if a is not u), None)
        first = len(args) > 0 and args[0] is u
        factor: torch.Tensor | float = 1.0
        if name in _ADD | _SUB:  # torch.add(a, b, alpha=s) is a + s * b
            factor = (-1.0 if name in _SUB and not first else 1.0) * (1.0 if first else float(kwargs.get("alpha", 1)))
        elif name == "__rsub__":  # u.__rsub__(x) is x - u
            factor = -1.0 if first else 1.0
        elif name in _MUL:
            factor = other.detach() if other is not None else _scalar(args, u)
        elif name in _DIV:
            if not first:
                self._refuse(blocks, name, "is the divisor in {op}, which gradstore cannot log exactly")
            factor = 1.0 / (other.detach() if other is not None else _scalar(args, u))
        if u.dim() > out.dim() or (u.dim() == out.dim() and u.dim() > 0 and u.shape[0] != 1):
            self._refuse(blocks, name, "meets the batch in {op} along its own first dimension")
        out.register_hook(lambda grad: self._backward(grad, factor, u, roots))

    def _refuse(self, blocks: list[str], name: str, what: str) -> None:
        listed = ", ".join(repr(b) for b in blocks)
        raise UnsupportedLayerError(
            f"parameter {listed} ({type(self.module).__name__}) {what.format(op=name)}; gradstore logs a bare "
            "parameter exactly where it meets the batch through +, -, *, / or expand. Leave it out with "
            f"layers=[..., '!{blocks[0]}']"
        )

    def _backward(self, grad: torch.Tensor, factor, u: torch.Tensor, roots: dict[str, torch.Tensor]) -> None:
        state = self.state
        buffer = state.buffer
        if buffer is None:
            return
        if grad.shape[0] != buffer.shape[0]:
            raise BatchLayoutError(
                f"parameter {sorted(roots)} meets a tensor with first dimension {grad.shape[0]} but {buffer.shape[0]} "
                "example ids were given; the batch must be dim 0 where a bare parameter meets it"
            )
        with torch.autocast(grad.device.type, enabled=False):
            cotangent = _reduce_to(grad * factor, u.shape)
            names = list(roots)
            per_example: list[torch.Tensor | None]
            if len(names) == 1 and roots[names[0]] is u:
                per_example = [cotangent]
            else:
                per_example = _batched_vjp(u, [roots[n] for n in names], cotangent)
            for block, g in zip(names, per_example):
                if g is None:
                    continue
                layer = self.layers.get(block)
                if layer is None:
                    continue
                self._add(block, layer, g)
        state.backward_calls += 1

    def _add(self, block: str, layer: SelectedLayer, g: torch.Tensor) -> None:
        state = self.state
        matrix = layer.canonical({"weight": g.float()})  # [B, d_out, in_dim]
        if state.statistics is not None:
            state.statistics[block].add_matrices(matrix)
            return
        m = state.matrices[block]
        rows = torch.einsum("od,bdi,ki->bok", m.p_out, matrix, m.p_in).flatten(1)
        spec = state.specs[block]
        state.buffer[:, spec.slice] += rows  # type: ignore[index]
        if state.positions is not None:
            state.positions.rest[spec.slice] += rows[0]


def _known(name: str) -> bool:
    return name in _ADD | _SUB | _MUL | _DIV | _EXPAND | {"__rsub__"}


def _scalar(args: tuple, u: torch.Tensor) -> float:
    return next(float(a) for a in args if isinstance(a, (int, float)) and a is not u)


def _reduce_to(cotangent: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per example, sum ``[B, *out]`` over the dimensions ``u`` (``shape``, no batch) was broadcast along."""
    b = cotangent.shape[0]
    rest = cotangent.shape[1:]
    if len(shape) == len(rest) + 1:  # u already spans dim 0, size 1: broadcast along the batch
        shape_rest = shape[1:]
    else:
        shape_rest = shape
    extra = len(rest) - len(shape_rest)
    if extra:
        cotangent = cotangent.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(1 + i for i, s in enumerate(shape_rest) if s == 1 and cotangent.shape[1 + i] != 1)
    if dims:
        cotangent = cotangent.sum(dim=dims, keepdim=True)
    return cotangent.reshape(b, *shape)


def _batched_vjp(u: torch.Tensor, roots: list[torch.Tensor], cotangent: torch.Tensor) -> list[torch.Tensor | None]:
    """``[B, *root.shape]`` per root: vector-Jacobian products of ``u`` with each example's row of ``cotangent``."""
    try:
        return list(
            torch.autograd.grad(u, roots, cotangent, retain_graph=True, allow_unused=True, is_grads_batched=True)
        )
    except RuntimeError:  # an op without a batching rule: one example at a time
        rows = [torch.autograd.grad(u, roots, c, retain_graph=True, allow_unused=True) for c in cotangent]
        return [None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(roots))]


def bare_parameter_hooks(model: nn.Module, layers: Sequence[SelectedLayer], state: CaptureState) -> list[ParameterHook]:
    """One :class:`ParameterHook` per module holding logged bare parameters."""
    static = {id(t) for t in (*model.parameters(), *model.buffers())}
    by_module: dict[int, tuple[nn.Module, list[SelectedLayer]]] = {}
    for layer in layers:
        if layer.kind == "parameter":
            by_module.setdefault(id(layer.module), (layer.module, []))[1].append(layer)
    return [ParameterHook(module, group, state, static) for module, group in by_module.values()]
