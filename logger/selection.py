"""Which parameters gradstore logs: the blocks of a model that layer patterns select.

Every trainable supported module (see :mod:`.layers`) is a candidate block, and so is every trainable parameter
no module block covers (a ``parameter`` block, named like the parameter). Recurrent modules are candidates that
glob patterns leave out and an exact name refuses. A weight shared by several
modules (tied embeddings and LM head) is one block: its first user in ``named_modules`` order owns it, the
others are :class:`TiedUse` contributions that add into the same slice (transposed when their canonical
layout is the transpose of the owner's); a tied user's own bias becomes a separate ``bias`` block.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UnknownLayerError, UnsupportedLayerError
from .layers import (
    BiasAdapter,
    LayerAdapter,
    MultiheadAttentionAdapter,
    ParameterAdapter,
    RecurrentAdapter,
    adapter_for,
)


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
    owner: str | None = field(default=None, compare=False)  # the holding module's name when not module_names[0]

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
        owner = self.owner if self.owner is not None else self.module_names[0] if self.module_names else self.name
        prefix = f"{owner}." if owner else ""
        return {role: f"{prefix}{self.adapter.attributes[role]}" for role in self.parameters()}

    def canonical(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tensors keyed like :meth:`parameters` (optional leading batch dims) -> ``[..., d_out, in_dim]``."""
        return self.adapter.canonical(self.module, tensors.get("weight"), tensors.get("bias"))


@dataclass
class _Candidate:
    layer: SelectedLayer
    problem: str | None
    skippable: bool = False  # an unsupported module type: left out by glob patterns, refused when named exactly


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
        if weight is not None and not weight.requires_grad and id(weight) not in claimed:
            out.extend(_bias_only(name, module, adapter, claimed))
            continue
        if weight is None or id(weight) in claimed:
            continue  # without affine parameters, or a tied use of an earlier block
        claimed.add(id(weight))
        if isinstance(adapter, RecurrentAdapter):
            claimed.update(id(p) for p in module.parameters())
            out.append(_Candidate(SelectedLayer(name, module, adapter, (), (name,)), adapter.problem(module), True))
            continue
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
        if adapter.separate_bias and bias is not None and bias.requires_grad:
            claimed.add(id(bias))
            layer = SelectedLayer(f"{name}.bias", module, BiasAdapter(adapter), (), (name,))
            out.append(_Candidate(layer, problem))
        out.extend(extra)
    claimed.update(id(p) for c in out for p in c.layer.parameters().values())
    return out + _bare_parameters(model, claimed, owners)


def _bias_only(name: str, module: nn.Module, adapter: LayerAdapter, claimed: set[int]) -> list[_Candidate]:
    """A frozen weight with a trainable bias (BitFit): the bias alone, as a ``bias`` block."""
    bias = adapter.bias(module)
    claimed.update(id(p) for p in adapter.parameters(module).values())
    if bias is None or not bias.requires_grad:
        return []
    layer = SelectedLayer(f"{name}.bias", module, BiasAdapter(adapter), (), (name,))
    problem = "a trainable in_proj_bias with a frozen in_proj_weight" if adapter.kind == "mha" else None
    return [_Candidate(layer, problem or adapter.problem(module))]


def _bare_parameters(model: nn.Module, claimed: set[int], owners: dict) -> list[_Candidate]:
    """A ``parameter`` block for every trainable parameter no module block covers (cls tokens, position tables)."""
    out: list[_Candidate] = []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in claimed:
            continue
        claimed.add(id(param))
        module_name, module, attr = owners[id(param)][0]
        layer = SelectedLayer(name, module, ParameterAdapter(attr, param.shape), (), (name,), module_name)
        out.append(_Candidate(layer, None))
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
            f"layer patterns {unmatched} match no trainable block (supported modules: Linear, Embedding, EmbeddingBag, "
            "Conv1d/2d/3d, ConvTranspose1d/2d/3d, HF Conv1D, MultiheadAttention, LayerNorm/RMSNorm/GroupNorm/"
            f"BatchNorm/InstanceNorm; or a bare parameter's name); available: {available}"
        )
    selected = [c for c in candidates if _matches(c.layer, include) and not _matches(c.layer, exclude)]
    named = {p for p in include if not any(ch in p for ch in "*?[")}
    selected = [c for c in selected if not c.skippable or set(c.layer.module_names) & named]
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
