"""Reading a saved optimizer state and matching it to the model's parameters by identity.

Accepted states: a path to a ``torch.save``'d state (or to a folder holding Hugging Face's ``optimizer.pt``),
an ``optimizer.state_dict()``, or a mapping ``{parameter name: exp_avg_sq}`` (values may also be per-parameter
state dicts; an optional ``"step"`` key gives the step). Each matched parameter comes with the hyperparameters
of its group; :mod:`.adam_fold` turns them into the TrackStar correction.

An ``optimizer.state_dict()`` numbers parameters in group order. Parameters are matched to those numbers:

1. by ``param_names`` when every group has them (optimizers built from ``model.named_parameters()``);
2. otherwise by reconstructing the layout: the model's parameter order cut into the groups (in any group
   order), and Hugging Face Trainer's decay / no-decay split. A layout is accepted only if every state's shape
   fits its parameter; two layouts that fit with different assignments are refused as ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import OptimizerStateError

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # Hugging Face Trainer / Accelerate checkpoint folders
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_SEARCH_BUDGET = 200_000
_FIX = (
    "build the optimizer from model.named_parameters() (or named param groups) so that its state_dict() carries "
    "'param_names', or save {name: exp_avg_sq} for the parameters, e.g. "
    "{n: opt.state[p]['exp_avg_sq'] for n, p in model.named_parameters() if p in opt.state} "
    "(or add 'param_names', the names in the order of 'params', to each param group of the saved state)"
)


@dataclass(frozen=True)
class _Entry:
    """One parameter's optimizer state and the hyperparameters of its group (``{}`` for a name mapping)."""

    state: Mapping[str, Any]
    group: Mapping[str, Any]


# -- loading -------------------------------------------------------------------------------------------
def load_optimizer_state(source: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    """The state as a mapping: ``source`` itself, a ``torch.save``'d file, or a folder's ``optimizer.pt``."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, Path)):
        raise OptimizerStateError(f"optimizer state must be a path or a mapping, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in OPTIMIZER_FILES if (path / name).is_file()]
        if not found:
            raise OptimizerStateError(
                f"{path} is a folder without {' or '.join(OPTIMIZER_FILES)}; pass the file that holds "
                "optimizer.state_dict() (sharded DeepSpeed/FSDP states must be consolidated into one first)"
            )
        path = found[0]
    if not path.is_file():
        raise OptimizerStateError(
            f"no optimizer state at {path}: pass a torch.save'd optimizer.state_dict() or a folder holding optimizer.pt"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise OptimizerStateError(f"could not load the optimizer state {path} with weights_only=True: {exc}") from exc
    if not isinstance(state, Mapping):
        raise OptimizerStateError(f"{path} holds a {type(state).__name__}, not an optimizer state_dict or name mapping")
    return state


def hf_decay_parameter_names(model: nn.Module, rule: str = "trainer") -> set[str]:
    """The parameters Hugging Face puts in the weight-decay group.

    ``trainer``: ``Trainer.get_decay_parameter_names`` (transformers 4.4x-5.x): not inside an ``nn.LayerNorm`` and
    no name part matching bias / layernorm / rmsnorm / norm. ``trainer-old``: older Trainers (LayerNorm modules and
    names containing ``bias`` excluded). ``examples``: the example scripts' ``no_decay = ["bias", "LayerNorm.weight"]``.
    """
    if rule == "examples":
        return {n for n, _ in model.named_parameters() if not any(nd in n for nd in ("bias", "LayerNorm.weight"))}
    if rule == "trainer":
        forbidden = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
        patterns = [re.compile(p) for p in forbidden]
    elif rule == "trainer-old":
        patterns = []
    else:
        raise ValueError(f"unknown Hugging Face decay rule {rule!r}")

    def walk(module: nn.Module) -> list[str]:  # transformers.trainer_pt_utils.get_parameter_names
        names = []
        for child_name, child in module.named_children():
            names += [
                f"{child_name}.{n}"
                for n in walk(child)
                if not _is_norm(child, rule) and not any(p.search(f"{child_name}.{n}".lower()) for p in patterns)
            ]
        return names + [k for k in module._parameters if not any(p.search(k.lower()) for p in patterns)]

    names = set(walk(model))
    return {n for n in names if "bias" not in n} if rule == "trainer-old" else names


def _is_norm(module: nn.Module, rule: str) -> bool:
    # older Trainers excluded ALL_LAYERNORM_LAYERS, to which some models appended their RMSNorm classes
    if isinstance(module, nn.LayerNorm):
        return True
    return rule == "trainer-old" and type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


# -- matching ------------------------------------------------------------------------------------------
def match_optimizer_state(
    model: nn.Module, state: str | Path | Mapping[str, Any], needed: Sequence[str] | None = None
) -> tuple[dict[str, _Entry], str]:
    """``({parameter name: its state and group}, layout)`` for the parameters in ``needed`` (default: all).

    Raises :class:`OptimizerStateError` when the state cannot be matched unambiguously.
    """
    state = load_optimizer_state(state)
    params = dict(model.named_parameters())
    needed = list(params) if needed is None else list(needed)
    if "state" in state and "param_groups" in state:
        by_name, layout, unknown = _match_state_dict(model, state, needed)
    else:
        (by_name, unknown), layout = _match_name_mapping(params, state), "by name"
    missing = [n for n in needed if n not in by_name]
    if missing:
        others = f"; it names parameters the model does not have, e.g. {unknown[:5]}" if unknown else ""
        raise OptimizerStateError(
            f"the optimizer state ({layout}) has no entry for parameter(s) {missing[:5]}{others}: they were not in "
            "the optimizer or never received a gradient; leave their layers out of `layers`, or pass the state of "
            "the optimizer that trained them, built for this model"
        )
    for name in needed:
        if not _fits(by_name[name].state, tuple(params[name].shape)):
            raise OptimizerStateError(
                f"the optimizer state ({layout}) for {name!r} has shape {_shape_of(by_name[name].state)} but the "
                f"parameter is {tuple(params[name].shape)}: was it saved from another model?"
            )
    return {n: by_name[n] for n in needed}, layout


def _normalise(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def _resolve_names(params: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    """The model's names for saved ones (``""``: not in the model), allowing wrapper prefixes (``module.``,
    ``_orig_mod.``) on either side."""
    if all(n in params for n in names):
        return list(names)
    model_names: dict[str, str] = {}
    for n in params:
        model_names.setdefault(_normalise(n), n)
    return [n if n in params else model_names.get(_normalise(n), "") for n in names]


def _match_name_mapping(params: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[dict[str, _Entry], list[str]]:
    group = {k: state[k] for k in ("betas", "eps", "amsgrad") if k in state}
    items = [(k, v) for k, v in state.items() if k not in ("step", "betas", "eps", "amsgrad")]
    names = _resolve_names(params, [k for k, _ in items])
    by_name = {}
    for name, (key, value) in zip(names, items):
        if not name:
            continue
        entry = dict(value) if isinstance(value, Mapping) else {"exp_avg_sq": value}
        if "step" not in entry and state.get("step") is not None:
            entry["step"] = state["step"]
        if not any(isinstance(v, torch.Tensor) for v in entry.values()):
            raise OptimizerStateError(f"the optimizer state's entry {key!r} holds no tensor; expected exp_avg_sq")
        by_name[name] = _Entry(entry, group)
    return by_name, [k for n, (k, _) in zip(names, items) if not n]


def _match_state_dict(
    model: nn.Module, state: Mapping[str, Any], needed: Sequence[str]
) -> tuple[dict[str, _Entry], str, list[str]]:
    groups = list(state["param_groups"])
    states = state["state"]
    group_of = {i: g for g in groups for i in g["params"]}
    params = dict(model.named_parameters())
    named = ["param_names" in g for g in groups]
    unknown: list[str] = []
    if all(named):
        ids = [i for g in groups for i in g["params"]]
        saved = [n for g in groups for n in g["param_names"]]
        names = _resolve_names(params, saved)
        assignment, layout = {i: n for i, n in zip(ids, names) if n}, "param_names"
        unknown = [s for s, n in zip(saved, names) if not n]
    elif any(named):
        raise OptimizerStateError("some param groups of the optimizer state have 'param_names', some not; " + _FIX)
    else:
        assignment, layout = _reconstruct_layout(model, groups, states, needed)
    return {name: _Entry(states[i], group_of[i]) for i, name in assignment.items() if i in states}, layout, unknown


def _reconstruct_layout(
    model: nn.Module, groups: list[Mapping[str, Any]], states: Mapping[int, Any], needed: Sequence[str]
) -> tuple[dict[int, str], str]:
    """The one assignment ``{state id: parameter name}`` that fits every shape, or a clear refusal."""
    params = list(model.named_parameters())
    shape = {n: tuple(p.shape) for n, p in params}
    group_ids = [list(g["params"]) for g in groups]
    sizes = [len(ids) for ids in group_ids]

    def fits(i: int, name: str) -> bool:
        return i not in states or _fits(states[i], shape[name])

    sequences = {
        "model order": [n for n, _ in params],
        "model order, trainable only": [n for n, p in params if p.requires_grad],
    }
    found: list[tuple[str, dict[int, str]]] = []
    reasons: list[str] = []
    truncated = False
    seen_sequences: list[list[str]] = []
    for label, sequence in sequences.items():
        if sequence in seen_sequences:
            continue
        seen_sequences.append(sequence)
        if len(sequence) != sum(sizes):
            reasons.append(f"{label}: {len(sequence)} parameters, the state has {sum(sizes)}")
            continue
        solutions, cut = _contiguous_layouts(sequence, group_ids, fits, needed)
        truncated |= cut
        for order in solutions:
            reordered = f", groups reordered {list(order)}" if list(order) != sorted(order) else ""
            found.append((label + reordered, _assign(sequence, group_ids, order)))
        if not solutions:
            reasons.append(f"{label}: {_first_misfit(sequence, group_ids, fits)}")
    if len(groups) == 2:
        trainable = {n for n, p in params if p.requires_grad}
        for rule in ("trainer", "trainer-old", "examples"):
            decay = hf_decay_parameter_names(model, rule)
            for suffix, keep in (("", trainable), (", frozen included", set(shape))):
                kept = [n for n, _ in params if n in keep]
                split = [[n for n in kept if n in decay], [n for n in kept if n not in decay]]
                label = f"Hugging Face decay/no-decay ({rule}{suffix})"
                if [len(s) for s in split] != sizes:
                    continue
                bad = [(i, n) for ids, names in zip(group_ids, split) for i, n in zip(ids, names) if not fits(i, n)]
                if bad:
                    reasons.append(f"{label}: state {bad[0][0]} does not fit {bad[0][1]} {shape[bad[0][1]]}")
                else:
                    found.append((label, {i: n for ids, names in zip(group_ids, split) for i, n in zip(ids, names)}))
    wanted = set(needed)
    distinct: list[tuple[str, dict[str, int], dict[int, str]]] = []
    for label, assignment in found:
        restricted = {n: i for i, n in assignment.items() if n in wanted}
        if not any(restricted == other for _, other, _ in distinct):
            distinct.append((label, restricted, assignment))
    description = f"{sum(sizes)} parameters in {len(groups)} unnamed param group(s) of sizes {sizes}"
    if len(distinct) > 1 or truncated:
        labels = [label for label, _, _ in distinct]
        raise OptimizerStateError(
            f"the optimizer state's layout is ambiguous: {description} fit the model's parameters in several ways "
            f"({'; '.join(labels)}{'; and more' if truncated else ''}) that give logged parameters different "
            "states; " + _FIX
        )
    if not distinct:
        raise OptimizerStateError(
            f"cannot match the optimizer state ({description}) to the model's parameters: "
            f"{'; '.join(reasons) or 'no layout fits'}; " + _FIX
        )
    return distinct[0][2], distinct[0][0]


def _contiguous_layouts(
    sequence: list[str], group_ids: list[list[int]], fits, needed: Sequence[str]
) -> tuple[list[tuple[int, ...]], bool]:
    """Orders of the groups whose concatenation, laid over ``sequence``, fits every shape.

    Stops at the second order that assigns a needed parameter differently from the first (ambiguity);
    the flag says the search ran out of budget before finishing.
    """
    groups = [g for g in range(len(group_ids)) if group_ids[g]]
    wanted = set(needed)
    solutions: list[tuple[int, ...]] = []
    first: dict[str, int] | None = None
    nodes = 0

    def search(position: int, order: list[int]) -> bool:  # True: stop
        nonlocal nodes, first
        if position == len(sequence):
            assignment = {n: i for i, n in _assign(sequence, group_ids, order).items() if n in wanted}
            if first is None:
                first = assignment
                solutions.append(tuple(order))
            elif assignment != first:
                solutions.append(tuple(order))
                return True
            return False
        for g in groups:
            if g in order:
                continue
            nodes += 1
            if nodes > _SEARCH_BUDGET:
                return True
            ids = group_ids[g]
            window = sequence[position : position + len(ids)]
            fitting = len(window) == len(ids) and all(fits(i, name) for i, name in zip(ids, window))
            if fitting and search(position + len(ids), [*order, g]):
                return True
        return False

    search(0, [])
    return solutions, nodes > _SEARCH_BUDGET


def _assign(sequence: list[str], group_ids: list[list[int]], order: Sequence[int]) -> dict[int, str]:
    ids = [i for g in order for i in group_ids[g]]
    return dict(zip(ids, sequence))


def _first_misfit(sequence: list[str], group_ids: list[list[int]], fits) -> str:
    for i, name in zip([i for ids in group_ids for i in ids], sequence):
        if not fits(i, name):
            return f"state {i} does not fit {name}"
    return "no order of the groups fits"


def _tensor(entry: Mapping[str, Any], key: str) -> torch.Tensor | None:
    value = entry.get(key)
    return value if isinstance(value, torch.Tensor) else None


def _shape_of(entry: Mapping[str, Any]) -> Any:
    for key in ("exp_avg_sq", "max_exp_avg_sq", "exp_avg", "momentum_buffer"):
        if (t := _tensor(entry, key)) is not None:
            return tuple(t.shape)
    row, col = _tensor(entry, "exp_avg_sq_row"), _tensor(entry, "exp_avg_sq_col")
    if row is not None and col is not None:
        return {"exp_avg_sq_row": tuple(row.shape), "exp_avg_sq_col": tuple(col.shape)}
    return None


def _fits(entry: Mapping[str, Any], shape: tuple[int, ...]) -> bool:
    """Whether a parameter's state is shaped like a parameter of ``shape`` (no shape information: yes)."""
    for key in ("exp_avg_sq", "max_exp_avg_sq", "exp_avg", "momentum_buffer"):
        if (t := _tensor(entry, key)) is not None and tuple(t.shape) != shape:
            return False
    row, col = _tensor(entry, "exp_avg_sq_row"), _tensor(entry, "exp_avg_sq_col")
    if row is not None or col is not None:
        if row is None or col is None or len(shape) < 2:
            return False
        return tuple(row.shape) == shape[:-1] and tuple(col.shape) == shape[:-2] + shape[-1:]
    return True
