"""The first-call use audit: a forward pass may use a logged parameter only inside a module that logs it.

The projector wraps its first forward pass in :func:`audit_parameter_uses`, a ``TorchFunctionMode`` that
watches every torch call: a logged parameter passed to an op while none of the modules holding it is running
(``F.linear(h, self.wte.weight)`` in a parent's forward, a module whose ``forward`` is bypassed) adds to its
gradient without passing through a hook, so the logged block would be partial.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import UnsupportedLayerError
from .selection import SelectedLayer

METADATA = frozenset(
    {
        "__get__",
        "size",
        "dim",
        "numel",
        "stride",
        "data_ptr",
        "element_size",
        "is_floating_point",
        "is_complex",
        "storage_offset",
        "is_contiguous",
        "get_device",
        "nelement",
        "ndimension",
        "__len__",
        "untyped_storage",
        "__format__",
        "__repr__",
        "is_shared",
        "is_pinned",
    }
)


class _UseAudit(TorchFunctionMode):
    def __init__(self, watched: dict[int, str], owners: dict[int, tuple[int, ...]], active: dict[int, int]):
        super().__init__()
        self.watched, self.owners, self.active = watched, owners, active
        self.violations: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name not in METADATA:
            for leaf in tree_leaves((args, kwargs)):
                key = id(leaf)
                unowned = key in self.watched and not any(self.active.get(owner) for owner in self.owners[key])
                if unowned and isinstance(leaf, torch.Tensor):
                    self.violations.setdefault(self.watched[key], name or repr(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def audit_parameter_uses(model: nn.Module, layers: Sequence[SelectedLayer]) -> Iterator[None]:
    """Refuse a forward pass that uses a logged parameter outside every module that logs it.

    Such a use (``F.linear(h, self.wte.weight)`` in a parent's forward, a module whose ``forward`` is
    bypassed) adds to the parameter's gradient without passing through a hook, so the logged block would
    be partial. Raises :class:`UnsupportedLayerError` after the forward, naming the parameter and the op.
    """
    names: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), n)
    watched = {id(p): names.get(id(p), role) for layer in layers for role, p in layer.parameters().items()}
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) in watched:
                owners.setdefault(id(param), []).append(module)
    active: dict[int, int] = {}
    handles = []
    for module in {id(m): m for ms in owners.values() for m in ms}.values():
        handles.append(module.register_forward_pre_hook(functools.partial(_enter, active)))
        handles.append(module.register_forward_hook(functools.partial(_exit, active), always_call=True))
    audit = _UseAudit(watched, {k: tuple(id(m) for m in ms) for k, ms in owners.items()}, active)
    try:
        with audit:
            yield
    finally:
        for handle in handles:
            handle.remove()
    if audit.violations:
        listed = "; ".join(f"{param} (by {op})" for param, op in audit.violations.items())
        raise UnsupportedLayerError(
            f"logged parameters are used outside the modules gradstore hooks, so their logged gradients would miss "
            f"those uses: {listed}. Use the module itself (e.g. an nn.Linear holding the tied weight) instead of "
            "its weight, or leave the layer out with layers=[..., '!name']"
        )


def _enter(active: dict[int, int], module: nn.Module, args: tuple) -> None:
    active[id(module)] = active.get(id(module), 0) + 1


def _exit(active: dict[int, int], module: nn.Module, args: tuple, output: Any) -> None:
    active[id(module)] -= 1
