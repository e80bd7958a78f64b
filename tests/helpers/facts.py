"""Synthetic facts for the known-answer tracing test: a tiny causal LM learns "subject relation -> object".

Vocabulary: ``PAD``, ``BOS``, template markers, subjects, relations, objects and filler words.
Every (subject, relation) pair is a fact with an object drawn at random (objects are shared by several
facts, subjects by every relation), stated in ``len(TRAIN_TEMPLATES)`` training sequences with different
templates; pure-filler sequences are added as distractors. Queries state each fact in a template never
seen in training, and their loss is on the object token only (the target span), as is the loss of the
eval examples (TrackStar's ``R_eval``), which use a second held-out template.

An example is ``(ids, target)``: ``target`` is ``None`` for a training sequence (loss summed over every
next-token prediction) or the position of the object token (loss on that token only).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import GradientLogger, Task
from gradstore.server.run.engine import QueryEngine
from gradstore.store import GradientIndex, GradientStore, IndexOptions

from .models import PAD, TinyCausalLM

BOS, IS, WAS, OF = 1, 2, 3, 4
N_SPECIAL = 5
# OF occurs in no training template, only in the queries' (test 4 of issue 9): a token training never updates
# has Adam exp_avg_sq = 0, and dividing its embedding column by ~eps used to make that column dominate every
# query's vector (Adam + identity/cosine fell to chance, MRR 0.08). The Adam correction now zeroes such
# columns (their training gradients are zero), so the queries hold an unseen token and keep their floors.
# Templates over symbols: s subject, r relation, o object, f a fresh random filler word, or a token id.
TRAIN_TEMPLATES = (
    (BOS, "s", "r", IS, "o"),
    (BOS, "f", "f", "s", "r", "o", "f"),
    (BOS, "s", "f", "r", WAS, "o"),
)
QUERY_TEMPLATE = (BOS, "r", OF, "s", IS, "o")  # held out: relation before subject, with the unseen OF
EVAL_TEMPLATE = (BOS, "f", "r", "s", WAS, "o")  # held out as well; the query distribution for R_eval


class TargetLossTask(Task):
    """Examples ``(token ids, target)``: the loss is the whole sequence's next-token loss (``target`` None) or only
    the token at position ``target``'s, summed per example."""

    def collate(self, examples):
        t = max(len(ids) for ids, _ in examples)
        batch = torch.full((len(examples), t), PAD, dtype=torch.long)
        weight = torch.zeros(len(examples), t - 1)
        for i, (ids, target) in enumerate(examples):
            batch[i, : len(ids)] = ids
            if target is None:
                weight[i, : len(ids) - 1] = 1.0
            else:
                weight[i, target - 1] = 1.0  # logits at position target - 1 predict the token at target
        return batch, weight

    def loss(self, model, batch):
        ids, weight = batch
        logits = model(ids[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return (nll.view(weight.shape) * weight).sum(dim=1)


class FactsTask(TargetLossTask):
    """Facts about ``subjects x relations`` with ``objects`` possible answers, plus ``noise`` filler sequences."""

    def __init__(
        self,
        subjects: int = 20,
        relations: int = 3,
        objects: int = 16,
        fillers: int = 24,
        noise: int = 60,
        seed: int = 0,
        d: int = 32,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.gen, self.d = gen, d
        self.subjects = list(range(N_SPECIAL, N_SPECIAL + subjects))
        self.relations = list(range(self.subjects[-1] + 1, self.subjects[-1] + 1 + relations))
        self.objects = list(range(self.relations[-1] + 1, self.relations[-1] + 1 + objects))
        self.fillers = list(range(self.objects[-1] + 1, self.objects[-1] + 1 + fillers))
        self.vocab = self.fillers[-1] + 1
        self.facts = [
            (s, r, self.objects[int(torch.randint(objects, (1,), generator=gen))])
            for s in self.subjects
            for r in self.relations
        ]
        self.max_len = max(len(t) for t in (*TRAIN_TEMPLATES, QUERY_TEMPLATE, EVAL_TEMPLATE))
        train: list[tuple[torch.Tensor, int | None, int | None]] = []  # (ids, target, fact index or None)
        for f, fact in enumerate(self.facts):
            for template in TRAIN_TEMPLATES:
                train.append((self._render(template, fact), None, f))
        for _ in range(noise):
            length = int(torch.randint(4, self.max_len + 1, (1,), generator=gen))
            ids = torch.tensor([BOS] + [self._filler() for _ in range(length - 1)])
            train.append((ids, None, None))
        order = torch.randperm(len(train), generator=gen).tolist()  # fact-bearing ids are scattered
        self.train = [(train[i][0], None) for i in order]
        self.fact_of = [train[i][2] for i in order]
        self.queries = [self._target_example(QUERY_TEMPLATE, fact) for fact in self.facts]
        self.evals = [self._target_example(EVAL_TEMPLATE, fact) for fact in self.facts]

    def _filler(self) -> int:
        return self.fillers[int(torch.randint(len(self.fillers), (1,), generator=self.gen))]

    def _render(self, template, fact) -> torch.Tensor:
        s, r, o = fact
        symbols = {"s": s, "r": r, "o": o}
        return torch.tensor([symbols[t] if t in symbols else self._filler() if t == "f" else t for t in template])

    def _target_example(self, template, fact) -> tuple[torch.Tensor, int]:
        return self._render(template, fact), template.index("o")

    def relevant(self, fact: int) -> set[int]:
        """Ids (positions) of the training sequences that state fact ``fact``."""
        return {i for i, f in enumerate(self.fact_of) if f == fact}

    # -- Task --------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return TinyCausalLM(self.vocab, d=self.d, max_len=self.max_len, heads=2)

    def train_examples(self):
        return self.train

    def eval_examples(self):
        return self.evals

    def query_example(self, payload: dict):
        fact = payload.get("fact")
        if isinstance(fact, bool) or not isinstance(fact, int) or not 0 <= fact < len(self.facts):
            raise ValueError(f'"fact" must be an integer in 0..{len(self.facts) - 1}, got {fact!r}')
        return self.queries[fact]

    def describe(self, example):
        ids, target = example
        return {"tokens": ids.tolist(), "target": target}


def train_with_checkpoints(
    task: FactsTask, steps: int, save_at: list[int], lr: float, batch_size: int = 32, seed: int = 0
):
    """Adam, lr decaying linearly to a tenth; yields ``(step, lr of that step, model, optimizer)`` after each step
    in ``save_at``."""
    torch.manual_seed(seed)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / steps)
    gen = torch.Generator().manual_seed(seed)
    examples = task.train_examples()
    for step in range(1, steps + 1):
        idx = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        opt.zero_grad()
        task.loss(model, task.collate([examples[i] for i in idx])).mean().backward()
        step_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        if step in save_at:
            yield step, step_lr, model, opt


# -- the tracing experiment ------------------------------------------------------------------------
STEPS, LR, RANK = 600, 1e-2, 16

# name -> (store logged with the Adam correction?, index options, use the eval store for R_eval?)
SETTINGS: dict[str, tuple[bool, IndexOptions, bool]] = {
    "TracIn (identity)": (False, IndexOptions(), False),
    "cosine": (False, IndexOptions(normalize=True), False),
    "kfac + cosine": (False, IndexOptions(preconditioner="kfac", normalize=True), False),
    "Adam + identity": (True, IndexOptions(), False),
    "Adam + cosine": (True, IndexOptions(normalize=True), False),
    "TrackStar: Adam + kfac + cosine": (True, IndexOptions(preconditioner="kfac", normalize=True), False),
    "TrackStar: Adam + block + cosine": (True, IndexOptions(preconditioner="block", normalize=True), False),
    "TrackStar: Adam + kfac + cosine + R_eval (lambda 0.99)": (
        True,
        IndexOptions(preconditioner="kfac", normalize=True, mix=0.99),
        True,
    ),
}


def trace_facts(
    workdir: Path, seed: int = 0, settings: dict = SETTINGS
) -> tuple[FactsTask, dict[str, tuple[float, float]]]:
    """Train, log 3 checkpoints, index each setting and query every fact; ``{setting: (MRR, recall@10)}``.

    Three stores share one projection: plain, Adam-corrected, and the Adam-corrected eval store
    (``task.eval_examples()``, for TrackStar's ``R_eval``). Queries go through :class:`QueryEngine`
    (query gradients) and :meth:`GradientIndex.search` with the schedule's lr weighting and top_k = N, so
    every rank is exact; ``QueryEngine.influence`` must return the same top 10.
    """
    task = FactsTask(seed=seed)
    n = len(task.train_examples())
    # each store is written by its own logger on its own copy of the weights (hooks stay off the trained model)
    loggers: dict[str, GradientLogger] = {}
    save_at = [STEPS // 3, 2 * STEPS // 3, STEPS]
    for step, lr, model, optimizer in train_with_checkpoints(task, STEPS, save_at, LR, seed=seed):
        if not loggers:
            plain = GradientLogger(
                task.build_model(), task, store=workdir / "plain.zarr", rank=RANK, dtype="float32", progress=False
            )
            loggers["plain"] = plain
            for name in ("adam", "adam-eval"):
                loggers[name] = GradientLogger(
                    task.build_model(),
                    task,
                    store=workdir / f"{name}.zarr",
                    spec=plain.spec,
                    dtype="float32",
                    progress=False,
                )
        weights = workdir / f"step{step}.pt"
        torch.save(model.state_dict(), weights)
        state = optimizer.state_dict()
        for name, logger in loggers.items():
            logger.model.load_state_dict(model.state_dict())
            logger.log_checkpoint(
                f"step{step}",
                lr=lr,
                step=step,
                examples=task.eval_examples() if name == "adam-eval" else None,
                weights_path=weights,
                optimizer_state=state if name.startswith("adam") else None,
                batch_size=128,
            )
    for logger in loggers.values():
        logger.close()
    stores = {name: GradientStore.open(workdir / f"{name}.zarr") for name in loggers}
    payloads = [{"fact": f} for f in range(len(task.facts))]
    table = {}
    for i, (name, (adam, options, use_eval)) in enumerate(settings.items()):
        store = stores["adam" if adam else "plain"]
        eval_store = stores["adam-eval"] if use_eval else None
        index_path = workdir / f"setting{i}.index"
        index = GradientIndex.build(store, options, path=index_path, eval_store=eval_store, progress=False)
        engine = QueryEngine(task, store, index, device="cpu")
        weights = engine.checkpoint_weights(None, "schedule")
        found = index.search(engine.query_gradients(engine.examples_from_payloads(payloads), weights), weights, n)
        top10 = engine.influence(payloads, top_k=10).results  # the public entry point agrees on the top 10
        reciprocal_ranks, recalls = [], []
        for fact, rows in enumerate(found.proponent_rows):
            ranked = index.ids[rows].tolist()  # every training example, best first
            assert sorted(ranked) == list(range(n))
            top = [p.score for p in top10[fact].proponents]  # scores, not ids: robust to near-ties at rank 10
            np.testing.assert_allclose(top, found.proponent_scores[fact][:10], rtol=1e-5, atol=1e-7 * abs(top[0]))
            relevant = task.relevant(fact)
            first = next(rank for rank, example_id in enumerate(ranked, 1) if example_id in relevant)
            reciprocal_ranks.append(1.0 / first)
            recalls.append(len(relevant & set(ranked[:10])) / len(relevant))
        table[name] = (float(np.mean(reciprocal_ranks)), float(np.mean(recalls)))
    return task, table


def chance_levels(n: int, relevant: int, k: int = 10) -> tuple[float, float]:
    """Expected MRR (first of ``relevant`` items among ``n`` in random order) and recall@k of a random ranking."""
    mrr = sum(math.comb(n - r, relevant - 1) / math.comb(n, relevant) / r for r in range(1, n - relevant + 2))
    return mrr, k / n
