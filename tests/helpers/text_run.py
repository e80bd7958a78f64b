"""A tiny text run for the dashboard's text view: a word-level causal LM over a few synthetic documents.

Documents state capital-city facts among filler sentences (some long, one holding HTML-like text, which the
dashboard must show as text). Query payloads are ``{"text": ...}`` (loss of every next word) or
``{"prompt": ..., "completion": ...}`` (loss of the completion's words only). ``describe`` gives
``{"text", "source", "words"}`` for training documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import GradientLogger, Task
from gradstore.server.run.engine import QueryEngine
from gradstore.store import GradientIndex, GradientStore, IndexOptions

from .models import PAD, TinyCausalLM, sgd_steps

UNK = 1
FACTS = (("france", "paris"), ("italy", "rome"), ("spain", "madrid"), ("japan", "tokyo"), ("egypt", "cairo"))
FILLER = (
    "many people visit {city} in the summer and walk along the old streets near the river",
    "the trains to {city} are fast and the tickets are cheap in the early morning",
    "a small museum in {city} keeps maps and letters from travellers of long ago",
    "markets in {city} sell bread and fruit and fish from the coast every single day",
)
HTML_DOC = 'notes on markup : <b>bold</b> & <img src=x onerror="window.__gradstore_xss=1"> stay plain text here'


def corpus() -> list[str]:
    """The training documents: short fact statements, long fact documents with filler, an HTML-like note."""
    docs = []
    for i, (country, city) in enumerate(FACTS):
        docs.append(f"the capital of {country} is {city} .")
        filler = " . ".join(s.format(city=city) for s in FILLER[i % 2 :] + FILLER[: i % 2])
        docs.append(f"{filler} . everyone knows that the capital of {country} is {city} .")
        docs.append(FILLER[i % len(FILLER)].format(city=city) + " .")
    docs.append(HTML_DOC)
    docs.append("the weather is mild and the sky is blue .")
    return docs


@dataclass
class TextExample:
    """Word ids, which next-word targets count in the loss (``mask[t]`` for predicting word ``t + 1``), display."""

    ids: torch.Tensor
    mask: torch.Tensor
    words: list[str]
    fields: dict = field(default_factory=dict)


class TextTask(Task):
    """Word-level next-word prediction with :class:`TinyCausalLM`; loss summed over the counted targets."""

    def __init__(self, max_len: int = 96):
        self.docs = corpus()
        words = sorted({w for doc in self.docs for w in doc.lower().split()})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}  # 0: padding, 1: unknown word
        self.max_len = max_len
        self.examples = [
            self._example(doc, None, {"text": doc, "source": f"doc-{i:02d}", "words": len(doc.split())})
            for i, doc in enumerate(self.docs)
        ]

    def _example(self, text: str, prompt_words: int | None, fields: dict) -> TextExample:
        words = text.split()[: self.max_len + 1]
        if len(words) < 2:
            raise ValueError("a query needs at least two words (a word and the word that follows it)")
        ids = torch.tensor([self.vocab.get(w.lower(), UNK) for w in words])
        mask = torch.ones(len(words) - 1)
        if prompt_words is not None:
            mask[: prompt_words - 1] = 0  # only the completion's words are predicted
        return TextExample(ids, mask, words, fields)

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return TinyCausalLM(vocab=len(self.vocab) + 2, d=16, max_len=self.max_len)

    def train_examples(self) -> list[TextExample]:
        return self.examples

    def collate(self, examples: list[TextExample]) -> tuple[torch.Tensor, torch.Tensor]:
        t = max(len(e.ids) for e in examples)
        ids = torch.full((len(examples), t), PAD, dtype=torch.long)
        mask = torch.zeros(len(examples), t - 1)
        for i, e in enumerate(examples):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.mask)] = e.mask
        return ids, mask

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, mask = batch
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return (nll.view(mask.shape) * mask).sum(dim=1)

    def query_example(self, payload: dict) -> TextExample:
        if isinstance(payload.get("text"), str):
            return self._example(payload["text"], None, {"text": payload["text"]})
        prompt, completion = payload.get("prompt"), payload.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str) and prompt.split() and completion.split():
            fields = {"prompt": prompt, "completion": completion}
            return self._example(f"{prompt} {completion}", len(prompt.split()), fields)
        raise ValueError('payload needs "text", or "prompt" and "completion" (non-empty strings)')

    def describe(self, example: TextExample) -> dict:
        return dict(example.fields)

    def describe_positions(self, example: TextExample) -> list[str]:
        return list(example.words)


@dataclass
class TextRun:
    task: TextTask
    store: GradientStore
    index: GradientIndex
    weights: dict[str, Path]

    def engine(self) -> QueryEngine:
        return QueryEngine(self.task, self.store, self.index, self.weights, device="cpu")


def build_text_run(
    directory: Path, steps: tuple[int, ...] = (80, 80), lrs: tuple[float, ...] = (0.02, 0.01)
) -> TextRun:
    """Train :class:`TextTask`'s model with SGD, log an offline pass after each stretch, build a flat index."""
    task = TextTask()
    model = task.build_model()
    logger = GradientLogger(model, task, store=directory / "text.zarr", rank=8, dtype="float32", progress=False)
    weights = {}
    for c, (n_steps, lr) in enumerate(zip(steps, lrs)):
        sgd_steps(model, task, steps=n_steps, lr=lr, seed=c, batch_size=8)
        name = f"ckpt-{c}"
        path = directory / f"{name}.pt"
        torch.save(model.state_dict(), path)
        logger.log_checkpoint(name, lr=lr, batch_size=8, step=sum(steps[: c + 1]), weights_path=path)
        weights[name] = path
    logger.close()
    store = GradientStore.open(directory / "text.zarr")
    index = GradientIndex.build(store, IndexOptions(), progress=False)
    return TextRun(task, store, index, weights)
