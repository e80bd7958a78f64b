"""The Task protocol: the user's description of model, data and loss (in the spirit of Kronfluence's Task)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate


class Task:
    """Subclass and override what your model needs; defaults cover plain ``state_dict`` checkpoints.

    Contract for :meth:`loss`: one loss per example, shape ``[B]``, summed (not averaged) over the
    example's tokens or positions, so that its gradient is that example's own gradient.

    Sign convention: ``score(q, i) = sum_c lr_c <grad m_q, grad loss_i>``. A gradient step on example ``i``
    changes ``m_q`` by about ``-lr <grad m_q, grad loss_i>``, so a positive score means training on ``i``
    lowered ``m_q``. With the loss (or any measurement where lower means "more of this output") proponents
    have positive scores. A measurement where higher means more of the output (a log-prob, a margin) must set
    ``higher_is_better = True``: gradstore then takes the gradient of ``-m_q``, and proponents stay positive.
    """

    higher_is_better: bool = False  # does a larger measurement() mean "more of the output"? (the loss: no)

    def build_model(self) -> torch.nn.Module:
        """A fresh model in the architecture the checkpoints were saved from."""
        raise NotImplementedError(f"{type(self).__name__}.build_model")

    def load_checkpoint(self, model: torch.nn.Module, path: str | Path) -> None:
        """Load weights saved with ``torch.save(model.state_dict(), path)`` (or ``{"model": state_dict}``), or a
        ``.safetensors`` file (what ``save_pretrained`` and the Trainer callback write; tied weights saved once)."""
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            load_tied_state(model, load_file(str(path)), path)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
            state = state["model"]
        model.load_state_dict(state)

    def train_examples(self) -> Sequence:
        """The training examples, indexable; position ``i`` is passed to :meth:`example_id`."""
        raise NotImplementedError(f"{type(self).__name__}.train_examples")

    def example_id(self, example: Any, index: int) -> int:
        """A stable integer id for an example (default: its position)."""
        return index

    def eval_examples(self) -> Sequence | None:
        """Held-out examples from the query distribution, for TrackStar's ``R_eval`` mix (default: none)."""
        return None

    def collate(self, examples: list) -> Any:
        """Batch a list of examples (default: ``torch.utils.data.default_collate``)."""
        return default_collate(examples)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Per-example losses, shape ``[B]``, summed over each example's tokens."""
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def measurement(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """What a query's gradient is taken of (default: the loss). E.g. a margin or a target span's log-prob;
        set :attr:`higher_is_better` when larger values mean more of the output."""
        return self.loss(model, batch)

    def query_example(self, payload: dict) -> Any:
        """Turn a JSON query payload into an example; raise ``ValueError`` with a clear message if it is bad."""
        raise NotImplementedError(f"{type(self).__name__}.query_example")

    def describe(self, example: Any) -> dict:
        """A JSON-able description of an example, for display next to its score."""
        return {"repr": repr(example)[:500]}

    def describe_positions(self, example: Any) -> list[str] | None:
        """Optional: the display text of each input position of a training example (its token strings, in the
        order the model reads them), to label per-token explanations; ``None`` (default): positions unlabelled.

        Position ``t`` is index ``t`` along the sequence the model's first hooked layer sees (the input ids);
        a list shorter or longer than that sequence is fine (padding, a last token that is only a target)."""
        return None

    # -- optional: evaluation (``gradstore evaluate``) ------------------------------------------------------------
    def train(self, examples: Sequence, seed: int) -> torch.nn.Module:
        """Optional: train a fresh model from scratch on ``examples`` (a subset of :meth:`train_examples`, in their
        order) with randomness from ``seed``, as the run's model was trained; return it (on any device).

        Needed by the retraining evaluations (``gradstore evaluate lds`` and ``brittleness``); they refuse a Task
        without it. The returned model is saved with ``state_dict()`` and read back with :meth:`load_checkpoint`.
        """
        raise NotImplementedError(f"{type(self).__name__}.train")

    def correct(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Optional: whether the model's prediction on each example of a collated batch is right, bool ``[B]``
        (a classifier: argmax == label). Needed by ``gradstore evaluate brittleness``."""
        raise NotImplementedError(f"{type(self).__name__}.correct")


def implements(task: Task, method: str) -> bool:
    """Does ``task`` override the optional :class:`Task` method ``method`` (``train``, ``correct``, ...)?"""
    return getattr(type(task), method, None) is not getattr(Task, method)


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested lists/tuples/dicts to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def load_tied_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``load_state_dict`` where a parameter may be missing when it is tied to one that is present (safetensors
    files store a shared tensor once); anything else missing or unexpected is an error naming it."""
    from .errors import TaskError

    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    absent = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if absent or unexpected:
        raise TaskError(
            f"{path} does not fit {type(model).__name__}: missing {absent[:8]}, unexpected {list(unexpected)[:8]}; "
            "override Task.load_checkpoint for this format"
        )
