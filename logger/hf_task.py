"""A ready :class:`~gradstore.logger.Task` for Hugging Face causal LMs, and reading a ``Trainer``'s checkpoint folders.

``CausalLMTask(model_dir, data)`` needs no user code: the model comes from a local ``save_pretrained`` folder
(``AutoModelForCausalLM``), its tokenizer from the same folder unless given, and the training data from a JSONL
file, a saved ``datasets`` dataset (``save_to_disk`` folder) or a ``Dataset`` object, with either a text field or
prompt / completion fields. A run config names it as ``[task] object = "gradstore.logger.hf:CausalLMTask"``.

Loss: per example, summed over its predicted tokens (next-token cross-entropy), padding masked (label -100), as
the Task protocol asks; Hugging Face's mean over the batch's tokens is only a rescaling of these sums. A text
example's loss covers every token; a prompt / completion example's covers the completion only
(``loss_on="completion"``, what TRL's ``SFTTrainer`` trains by default), or every token with ``loss_on="all"``.
Sequences are cut to ``max_length`` tokens on the right.

Queries: ``{"prompt": ..., "completion": ...}`` measures the completion's loss given the prompt (always the
completion only, whatever ``loss_on``); ``{"text": ...}`` measures the whole text's loss. Lower loss means more of
that output, so :attr:`higher_is_better` stays ``False``: a training example whose gradient step lowered the query's
loss (taught it) is a proponent with a positive score; opponents (negative scores) made it less likely.

This module imports ``transformers`` / ``datasets`` / ``safetensors`` only when it needs them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HFTaskError
from .task import Task

__all__ = [
    "WEIGHTS_FILES",
    "CausalLMTask",
    "HFTaskError",
    "LMExample",
    "TrainerCheckpoint",
    "checkpoint_weights_file",
    "load_state_dict_file",
    "trainer_checkpoint",
    "trainer_checkpoints",
]

IGNORE = -100  # label of positions outside the loss (padding, prompt), as Hugging Face's loss functions use
# what save_pretrained / Trainer write, in the order transformers prefers them
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


# -- examples --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMExample:
    """A tokenised example: ``labels`` is ``input_ids`` with ``-100`` where the loss does not look."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    text: str
    prompt: str | None = None
    completion: str | None = None


class _Examples(Sequence):
    """Records tokenised on access (a ``Dataset`` is never materialised)."""

    def __init__(self, records: Any, encode: Any):
        self._records, self._encode = records, encode

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} out of range (the data has {len(self)})")
        index = index % len(self)
        return self._encode(self._records[index], index)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))


def _load_records(data: Any, split: str) -> Any:
    """Indexable records (mappings) from a JSONL / JSON file, a saved dataset folder, a (Dict) Dataset or a list."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            import datasets

            try:
                data = datasets.load_from_disk(str(path))
            except FileNotFoundError as exc:
                raise HFTaskError(f"{path} is not a dataset saved with save_to_disk ({exc})") from exc
        elif path.is_file():
            return _read_json_records(path)
        else:
            raise HFTaskError(f"training data {path} does not exist: give a .jsonl file or a saved dataset folder")
    if hasattr(data, "keys") and hasattr(data, "column_names") and not hasattr(data, "features"):  # a DatasetDict
        if split not in data:
            raise HFTaskError(f"the dataset has splits {sorted(data.keys())}, not {split!r}: pass split=...")
        data = data[split]
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__") or isinstance(data, (str, bytes, Mapping)):
        raise HFTaskError(
            f"data must be a .jsonl path, a saved dataset folder, a datasets.Dataset or a list of dicts, "
            f"got {type(data).__name__}"
        )
    return data


def _read_json_records(path: Path) -> list[dict]:
    if path.suffix not in (".jsonl", ".json"):
        raise HFTaskError(f"{path}: read .jsonl / .json files; load other formats with datasets and pass the Dataset")
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise HFTaskError(f"{path}: not JSON Lines ({exc})") from exc
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise HFTaskError(f"{path}: record {i} is a {type(record).__name__}, not a JSON object")
    return records


def _columns(records: Any) -> list[str]:
    names = getattr(records, "column_names", None)
    if names is not None:
        return list(names)
    return list(records[0]) if len(records) else []


# -- the Task --------------------------------------------------------------------------------------------------
class CausalLMTask(Task):
    """A causal LM from a local folder, trained on text or prompt / completion records (see the module's doc).

    Args:
        model_dir: a ``save_pretrained`` folder (config and weights; a Trainer ``checkpoint-*`` folder works).
        data: training data: a ``.jsonl`` (or JSON array) file, a ``save_to_disk`` folder, a ``datasets.Dataset``
            (or ``DatasetDict``, see ``split``) or a list of dicts. Example ids are positions in it, which are the
            dataset indices the Trainer saw if it trained on the same data in the same order.
        tokenizer: a tokenizer folder or object (default: ``model_dir``'s).
        text_field: the field of text records.
        prompt_field, completion_field: the fields of prompt / completion records (used when a record has both).
        max_length: tokens kept per example (cut on the right; at most the model's ``max_position_embeddings``).
        loss_on: ``completion`` (default) or ``all``: which tokens of a prompt / completion record the loss covers.
        add_eos: append the tokenizer's EOS token to every training text / completion (as TRL does).
        split: the split of a ``DatasetDict``.
        eval_data: held-out records in the same forms, for TrackStar's ``R_eval`` (``eval_examples``).
        dtype: the model's dtype (default ``float32``, what exact gradients want).
    """

    higher_is_better = False  # the measurement is a loss: lower means more of the queried output
    # arguments that are paths: a run config resolves relative ones against its folder (like its own paths)
    config_paths: ClassVar[tuple[str, ...]] = ("model_dir", "data", "tokenizer", "eval_data")

    def __init__(
        self,
        model_dir: str | Path,
        data: Any,
        tokenizer: Any = None,
        text_field: str = "text",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        max_length: int = 128,
        loss_on: Literal["completion", "all"] = "completion",
        add_eos: bool = False,
        split: str = "train",
        eval_data: Any = None,
        dtype: str = "float32",
    ):
        if loss_on not in ("completion", "all"):
            raise HFTaskError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise HFTaskError(f"max_length must be an integer >= 2, got {max_length!r}")
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise HFTaskError(
                f"model_dir {self.model_dir} is not a local model folder (no config.json): give the folder that "
                "model.save_pretrained(...) or a Trainer checkpoint wrote"
            )
        self.text_field, self.prompt_field, self.completion_field = text_field, prompt_field, completion_field
        max_length = min(max_length, _max_positions(self.model_dir / "config.json") or max_length)
        self.max_length, self.loss_on, self.add_eos = max_length, loss_on, add_eos
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise HFTaskError(f"dtype must name a torch dtype (float32, bfloat16, ...), got {dtype!r}")
        self.tokenizer = self._load_tokenizer(tokenizer)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        self.pad_id = int(pad) if pad is not None else 0  # any id: padded positions are masked out of the loss
        self._train = self._dataset(data, split, "data")
        self._eval = self._dataset(eval_data, split, "eval_data") if eval_data is not None else None

    def _load_tokenizer(self, tokenizer: Any) -> Any:
        if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
            return tokenizer
        from transformers import AutoTokenizer

        folder = Path(tokenizer) if tokenizer is not None else self.model_dir
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise HFTaskError(
                f"cannot load a tokenizer from {folder} ({exc}); save it there with tokenizer.save_pretrained(...) "
                "(or pass processing_class=tokenizer to the Trainer), or give tokenizer=<folder>"
            ) from exc

    def _dataset(self, data: Any, split: str, what: str) -> _Examples:
        records = _load_records(data, split)
        columns = _columns(records)
        if self.prompt_field in columns and self.completion_field in columns:
            kind = "prompt_completion"
        elif self.text_field in columns:
            kind = "text"
        else:
            raise HFTaskError(
                f"{what}: records need a {self.text_field!r} field or {self.prompt_field!r} and "
                f"{self.completion_field!r} fields (set text_field / prompt_field / completion_field); "
                f"they have {columns}"
            )

        def encode(record: Mapping[str, Any], index: int) -> LMExample:
            where = f"{what} record {index}"
            if kind == "text":
                return self._encode_text(_string(record, self.text_field, where), train=True)
            prompt = _string(record, self.prompt_field, where)
            completion = _string(record, self.completion_field, where)
            return self._encode_pair(prompt, completion, self.loss_on == "completion", train=True)

        return _Examples(records, encode)

    # -- tokenising ---------------------------------------------------------------------------------------
    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _eos(self, train: bool) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [int(eos)] if train and self.add_eos and eos is not None else []

    def _encode_text(self, text: str, train: bool) -> LMExample:
        ids = (self._ids(text, special=True) + self._eos(train))[: self.max_length]
        return LMExample(tuple(ids), tuple(ids), text)

    def _encode_pair(self, prompt: str, completion: str, completion_only: bool, train: bool) -> LMExample:
        # tokenised apart, so that the prompt / completion boundary is exact whatever the tokenizer merges
        head = self._ids(prompt, special=True)
        tail = self._ids(completion, special=False) + self._eos(train)
        ids = (head + tail)[: self.max_length]
        labels = ids if not completion_only else ([IGNORE] * len(head) + tail)[: self.max_length]
        return LMExample(tuple(ids), tuple(labels), prompt + completion, prompt, completion)

    # -- Task ---------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype, local_files_only=True)

    def load_checkpoint(self, model: nn.Module, path: str | Path) -> None:
        """Weights from a Hugging Face checkpoint folder, its ``model.safetensors`` / ``pytorch_model.bin`` (or their
        sharded ``*.index.json``), or a ``torch.save``'d state_dict (``{"model": state_dict}`` too)."""
        path = Path(path)
        file = checkpoint_weights_file(path) if path.is_dir() else path
        load_weights(model, load_state_dict_file(file), file)

    def train_examples(self) -> Sequence:
        return self._train

    def eval_examples(self) -> Sequence | None:
        return self._eval

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example next-token cross-entropy ``[B]``, summed over the labelled tokens."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        logits = logits[:, :-1].float()
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        )
        return nll.view(labels.shape).sum(dim=1)

    def query_example(self, payload: dict) -> LMExample:
        """``{"prompt": str, "completion": str}`` (the completion's loss) or ``{"text": str}`` (the whole text's)."""
        if not isinstance(payload, Mapping):
            raise ValueError(f"a query is a JSON object, got {type(payload).__name__}")
        keys = set(payload)
        forms = '{"prompt": "...", "completion": "..."} or {"text": "..."}'
        if keys == {"text"}:
            example = self._encode_text(_string(payload, "text", "query"), train=False)
            if len(example.input_ids) < 2:
                raise ValueError(f"query text {payload['text']!r} has fewer than two tokens: nothing to predict")
            return example
        if keys == {"prompt", "completion"}:
            prompt, completion = _string(payload, "prompt", "query"), _string(payload, "completion", "query")
            if not completion:
                raise ValueError("query completion is empty: give the output whose training sources you want")
            example = self._encode_pair(prompt, completion, completion_only=True, train=False)
            if all(label == IGNORE for label in example.labels[1:]):
                raise ValueError(
                    f"no completion token of the query is predicted: the prompt fills max_length={self.max_length} "
                    "tokens, or the completion is the first token with nothing before it; shorten the prompt"
                )
            return example
        unknown = sorted(keys - {"prompt", "completion", "text"})
        if unknown:
            raise ValueError(f"unknown query fields {unknown}; give {forms}")
        if "text" in keys:
            raise ValueError(f"give either text or prompt and completion, not both; give {forms}")
        missing = sorted({"prompt", "completion"} - keys)
        raise ValueError(f"query is missing {missing}; give {forms}")

    def describe(self, example: Any) -> dict:
        """``{"text": ...}``, plus ``prompt`` and ``completion`` for prompt / completion examples."""
        out: dict[str, Any] = {"text": example.text}
        if example.prompt is not None:
            out["prompt"], out["completion"] = example.prompt, example.completion
        return out

    def describe_positions(self, example: Any) -> list[str]:
        """Each input token as the tokenizer writes it alone, for per-token explanations."""
        return [self.tokenizer.decode([token]) for token in example.input_ids]


def _max_positions(config_file: Path) -> int | None:
    """The longest sequence the model takes, as its ``config.json`` says (``None`` when it does not)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HFTaskError(f"cannot read the model config {config_file}: {exc}") from exc
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return int(config[key])
    return None


def _string(record: Mapping[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise HFTaskError(f"{where} has no {field!r} field")
    value = record[field]
    if not isinstance(value, str):
        raise HFTaskError(f"{where}: {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    return value


# -- weights ---------------------------------------------------------------------------------------------------
def checkpoint_weights_file(folder: str | Path) -> Path:
    """The weights file of a ``save_pretrained`` / Trainer checkpoint folder (a sharded one's ``*.index.json``)."""
    folder = Path(folder)
    for name in WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise HFTaskError(
        f"{folder} holds none of {', '.join(WEIGHTS_FILES)}: give a folder written by save_pretrained or a Trainer "
        "checkpoint, or the weights file itself"
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``*.safetensors``, a sharded ``*.index.json``, or a ``torch.save``'d file."""
    path = Path(path)
    if not path.is_file():
        raise HFTaskError(f"no weights file at {path}")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HFTaskError(f"{path} is not a sharded checkpoint index (no weight_map): {exc}") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_state_dict_file(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise HFTaskError(f"cannot read {path} as a state_dict with weights_only=True: {exc}") from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping):
        raise HFTaskError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    return dict(loaded)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path = "the state_dict") -> None:
    """``model.load_state_dict(state)``, allowing tied weights saved once (``lm_head.weight``) and wrapper prefixes;
    any other missing or unexpected key is an :class:`HFTaskError`."""
    expected = model.state_dict()
    if not any(k in expected for k in state):
        for prefix in _WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), set()).add(name)
    loaded = set(state)
    untied = [k for k in missing if not any(a in loaded for a in aliases.get(id(_param(model, k)), set()))]
    if untied or unexpected:
        raise HFTaskError(
            f"{source} does not fit the model: missing {untied[:5]}, unexpected {list(unexpected)[:5]}; was it saved "
            "from another architecture than model_dir's?"
        )


def _param(model: nn.Module, name: str) -> Any:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


# -- Trainer output folders --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainerCheckpoint:
    """What a Trainer ``checkpoint-*`` folder says about itself.

    ``lr`` is the TracIn weight of the interval ending at this checkpoint: the mean of the ``learning_rate`` values
    ``trainer_state.json`` logged at steps ``(previous checkpoint, step]`` (the previous checkpoint being the
    sibling ``checkpoint-*`` folder with the largest smaller step, else step 0), or when none was logged there,
    the last value logged before it; ``None`` when nothing was logged (then ``lr_problem`` says why).
    """

    folder: Path
    name: str
    step: int | None
    lr: float | None
    weights_path: Path
    optimizer: Path | None
    lr_problem: str | None = None


def _folder_step(path: Path) -> int | None:
    match = _CHECKPOINT_DIR.match(path.name)
    return int(match.group(1)) if match else None


def trainer_checkpoint(folder: str | Path) -> TrainerCheckpoint:
    """Weights file, optimizer state (``optimizer.pt``), step and lr of a Trainer checkpoint folder (or of a plain
    ``save_pretrained`` folder, whose step and lr are then ``None``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFTaskError(f"checkpoint folder {folder} does not exist")
    weights = checkpoint_weights_file(folder)
    optimizer = next((folder / n for n in OPTIMIZER_FILES if (folder / n).is_file()), None)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        why = f"{folder} has no trainer_state.json (not a Trainer checkpoint)"
        return TrainerCheckpoint(folder, folder.name, _folder_step(folder), None, weights, optimizer, why)
    try:
        state = json.loads(state_file.read_text())
        step = int(state["global_step"])
        history = [
            (int(e["step"]), float(e["learning_rate"]))
            for e in state.get("log_history", [])
            if "learning_rate" in e and "step" in e
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HFTaskError(f"{state_file} is not a Trainer state (global_step, log_history): {exc}") from exc
    siblings = [s for p in folder.parent.iterdir() if p.is_dir() and (s := _folder_step(p)) is not None]
    start = max((s for s in siblings if s < step), default=0)
    lr, problem = _interval_lr(history, start, step), None
    if lr is None:
        problem = (
            f"{state_file} logged no learning_rate at or before step {step} (the Trainer logs every logging_steps; "
            "train with logging_steps <= save_steps)"
        )
    return TrainerCheckpoint(folder, folder.name, step, lr, weights, optimizer, problem)


def _interval_lr(history: list[tuple[int, float]], start: int, end: int) -> float | None:
    inside = [lr for s, lr in history if start < s <= end]
    if inside:
        return math.fsum(inside) / len(inside)
    before = [lr for s, lr in sorted(history) if s <= start]
    return before[-1] if before else None


def trainer_checkpoints(output_dir: str | Path) -> list[TrainerCheckpoint]:
    """Every ``checkpoint-<step>`` folder of a Trainer ``output_dir``, by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise HFTaskError(f"Trainer output folder {output_dir} does not exist")
    folders = sorted(
        (p for p in output_dir.iterdir() if p.is_dir() and _folder_step(p) is not None),
        key=lambda p: _folder_step(p) or 0,
    )
    if not folders:
        raise HFTaskError(
            f"{output_dir} has no checkpoint-<step> folders: train with save_strategy='steps' (or 'epoch') and "
            "point at the Trainer's output_dir"
        )
    return [trainer_checkpoint(p) for p in folders]
