"""Forward/backward hooks that accumulate Kronecker-projected per-example gradients.

The forward hook projects the layer's input (``a_t = P_in x~_t``, float32, small) and registers a
hook on that call's output tensor; when the output's gradient ``g`` arrives, the backward hook adds
``sum_t (P_out g_t) a_t^T`` per example into a shared ``[B, D]`` buffer. Pairing each output with its
own input this way makes weight sharing (a module called twice) sum correctly, and makes activation
checkpointing safe: a recomputed forward registers hooks on tensors that are never back-propagated.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

from gradstore.projection import LayerMatrices, LayerSpec, per_example_gradient, project_outputs

from .errors import BatchLayoutError
from .layers import SelectedLayer


class CaptureState:
    """What all hooks of one logger share: the current matrices and the buffer being filled."""

    def __init__(self, matrices: dict[str, LayerMatrices], dim: int):
        self.matrices = matrices
        self.dim = dim
        self.buffer: torch.Tensor | None = None
        self.force_output_grad = False  # set while parameters are frozen for a gradient-only pass
        self.paused = False
        self.backward_calls = 0  # layer gradients added since the buffer was armed

    def arm(self, batch_size: int, device: torch.device) -> None:
        self.buffer = torch.zeros(batch_size, self.dim, dtype=torch.float32, device=device)
        self.backward_calls = 0

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


class LayerHook:
    """Hooks of one module; ``remove()`` takes them off."""

    def __init__(self, layer: SelectedLayer, spec: LayerSpec, state: CaptureState):
        self.layer, self.spec, self.state = layer, spec, state
        self._handle = layer.module.register_forward_hook(self._forward)

    def remove(self) -> None:
        self._handle.remove()

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        state = self.state
        if state.paused or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not output.requires_grad:
            if not (state.force_output_grad and output.grad_fn is None):
                return
            output.requires_grad_()  # parameters are frozen: make the activation path differentiable
        matrices = state.matrices[self.spec.name]
        with torch.autocast(output.device.type, enabled=False):
            projected_x = self.layer.adapter.project_input(module, inputs[0].detach(), matrices.p_in)
        output.register_hook(functools.partial(self._backward, projected_x, matrices.p_out))

    def _backward(self, projected_x: torch.Tensor, p_out: torch.Tensor, grad: torch.Tensor) -> None:
        buffer = self.state.buffer
        if buffer is None:
            return
        if grad.shape[0] != buffer.shape[0]:
            raise BatchLayoutError(
                f"layer {self.spec.name!r} saw batch dimension {grad.shape[0]} but {buffer.shape[0]} example ids were "
                "given; hooked modules must take batch-first inputs. An input shared by the whole batch (e.g. position "
                "ids broadcast over it) has no per-example gradient: expand it to [B, ...] or leave the layer out"
            )
        with torch.autocast(grad.device.type, enabled=False):
            projected_g = project_outputs(self.layer.adapter.output_grad(self.layer.module, grad), p_out)
            buffer[:, self.spec.slice] += per_example_gradient(projected_g, projected_x)
        self.state.backward_calls += 1


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
        for p, flag in flags:
            p.requires_grad_(flag)
