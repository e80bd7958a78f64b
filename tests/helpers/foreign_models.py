"""Models other people test with, re-created tiny, and the "exact or refused" check run on each of them.

Sources (own code, written after how each library's public tests build their models): Kronfluence (MLPs, conv
nets, a GPT-2), Opacus (its per-sample-gradient modules: Conv1d/2d/3d, grouped and transposed convs,
Embedding, EmbeddingBag, the norms, RNN/LSTM/GRU, MultiheadAttention, sequence-first inputs), Bergson (tiny
HF causal LMs), TRAK (a ResNet-9 with BatchNorm), the torch.func per-sample-gradients tutorial (a CNN), Hugging
Face families built from tiny configs with random weights, and in-training cases run through ``capture()``.

Each :class:`Case` ends in one :class:`Outcome`:

- ``exact``: every logged block's rows equal the exact per-example gradient (full-rank orthonormal projection,
  relative error < 1e-4 in float32), and every trainable parameter is logged;
- ``exact (partial, warned)``: the same for the logged blocks, and a warning named the parameters left out;
- ``refused``: a :class:`GradstoreError` whose message (or ``.layer``) names a layer or parameter of the model;
- ``SILENTLY WRONG``: rows that differ from the exact gradient (or model outputs changed by the hooks);
- ``SILENTLY PARTIAL``: exact rows, but trainable parameters left out without a warning naming them;
- ``REFUSED, LAYER UNNAMED``: a gradstore error that does not say which layer;
- ``UNEXPLAINED CRASH``: any other exception.

The first three pass. The reference gradients are exact float64 autograd: for ``project()``, each example's
own loss with the example collated alone (what ``torch.func.vmap(grad)`` computes); for ``capture()``, the
gradient of ``loss[i]`` within the same batched forward in training mode (so batch coupling shows).
"""

from __future__ import annotations

import copy
import inspect
import re
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradstore.logger import ExactnessError, GradientLogger, GradientProjector, Task
from gradstore.projection.errors import GradstoreError
from gradstore.projection.reference import dense_layer_projector

V, PAD = 32, 0  # vocabulary of every text model; token 0 pads
TOL = 1e-4

EXACT = "exact"
PARTIAL_WARNED = "exact (partial, warned)"
REFUSED = "refused"
WRONG = "SILENTLY WRONG"
PARTIAL = "SILENTLY PARTIAL"
UNNAMED = "REFUSED, LAYER UNNAMED"
CRASH = "UNEXPLAINED CRASH"
PASSING = (EXACT, PARTIAL_WARNED, REFUSED)
STATUSES = (EXACT, PARTIAL_WARNED, REFUSED, WRONG, PARTIAL, UNNAMED, CRASH)


# -- cases ----------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a builder returns. ``prepare`` runs on the model after the reference copy is taken and before the
    logger attaches (``torch.compile`` a block, attach another logger); it returns the model to log."""

    model: nn.Module
    task: Task
    examples: list
    train: bool = False  # capture(): the model's mode during the step
    prepare: Callable[[nn.Module], nn.Module] | None = None


@dataclass
class Case:
    name: str
    source: str
    build: Callable[[], Setup]
    mode: str = "project"  # "project" | "capture" | "two_projectors" | "two_loggers"
    layers: tuple[str, ...] = ("*",)
    culprits: tuple[str, ...] = ()  # a refusal must name one of these (default: any module/parameter name)
    reference_dtype: torch.dtype = torch.float64  # float32 where a kernel has no float64 (grouped_mm)
    note: str = ""


@dataclass
class Outcome:
    case: str
    source: str
    status: str
    detail: str
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status in PASSING


class FnTask(Task):
    """A Task from plain functions: ``loss(model, batch) -> [B]``, optional ``collate(examples)``."""

    def __init__(self, examples: list, loss: Callable, collate: Callable | None = None):
        self.examples, self._loss, self._collate = examples, loss, collate

    def train_examples(self):
        return self.examples

    def collate(self, examples):
        return self._collate(examples) if self._collate is not None else super().collate(examples)

    def loss(self, model, batch):
        return self._loss(model, batch)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification(model: nn.Module, x: torch.Tensor, classes: int, **kw) -> Setup:
    """Examples ``(x_i, y_i)``; cross-entropy of ``model(x)``."""
    y = torch.randint(0, classes, (len(x),), generator=_gen(1))
    examples = [(x[i], y[i]) for i in range(len(x))]
    return Setup(model, FnTask(examples, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")), examples, **kw)


def images(n: int, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=_gen(seed))


def token_lists(n: int, lengths: tuple[int, int], seed: int = 0, low: int = 3) -> list[torch.Tensor]:
    """``n`` random sequences (tokens ``>= low``), lengths in ``lengths``; the first is of the maximum length."""
    gen = _gen(seed)
    lo, hi = lengths
    sizes = [hi, *torch.randint(lo, hi + 1, (n - 1,), generator=gen).tolist()]
    return [torch.randint(low, V, (s,), generator=gen) for s in sizes]


def pad(seqs: Sequence[torch.Tensor], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, t - len(s) :], mask[i, t - len(s) :] = s, 1
        else:
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view(targets.shape) * mask).sum(dim=1)


def causal_lm(model: nn.Module, n: int, lengths: tuple[int, int], hf: bool = True, left: bool = False, **kw) -> Setup:
    """Next-token loss summed over real tokens; ``model(input_ids=, attention_mask=)`` or ``model(ids)``."""
    seqs = token_lists(n, lengths)

    def loss(m, batch):
        ids, mask = batch
        logits = m(input_ids=ids, attention_mask=mask).logits if hf else m(ids)
        return _token_nll(logits[:, :-1], ids[:, 1:], mask[:, 1:] * mask[:, :-1])

    return Setup(model, FnTask(seqs, loss, lambda ex: pad(ex, left=left)), seqs, **kw)


def sequence_classifier(model: nn.Module, n: int, lengths: tuple[int, int], classes: int = 3, **kw) -> Setup:
    seqs = token_lists(n, lengths)
    labels = torch.randint(0, classes, (n,), generator=_gen(2))
    examples = [(s, y) for s, y in zip(seqs, labels)]

    def collate(ex):
        ids, mask = pad([s for s, _ in ex])
        return ids, mask, torch.stack([y for _, y in ex])

    def loss(m, batch):
        ids, mask, y = batch
        out = m(input_ids=ids, attention_mask=mask)
        return F.cross_entropy(getattr(out, "logits", out), y, reduction="none")

    return Setup(model, FnTask(examples, loss, collate), examples, **kw)


def seq2seq(model: nn.Module, n: int, src: tuple[int, int], tgt: tuple[int, int], start: int, **kw) -> Setup:
    """Encoder-decoder LM loss: decoder input is ``[start] + target[:-1]``, summed over real target tokens."""
    examples = list(zip(token_lists(n, src, seed=0), token_lists(n, tgt, seed=1)))

    def collate(ex):
        src_ids, src_mask = pad([s for s, _ in ex])
        tgt_ids, tgt_mask = pad([t for _, t in ex])
        dec_in = torch.cat([torch.full((len(ex), 1), start), tgt_ids[:, :-1]], dim=1)
        dec_mask = torch.cat([torch.ones(len(ex), 1, dtype=torch.long), tgt_mask[:, :-1]], dim=1)
        return src_ids, src_mask, dec_in, dec_mask, tgt_ids, tgt_mask

    def loss(m, batch):
        src_ids, src_mask, dec_in, dec_mask, tgt_ids, tgt_mask = batch
        logits = m(
            input_ids=src_ids, attention_mask=src_mask, decoder_input_ids=dec_in, decoder_attention_mask=dec_mask
        ).logits
        return _token_nll(logits, tgt_ids, tgt_mask)

    return Setup(model, FnTask(examples, loss, collate), examples, **kw)


# -- Kronfluence-style models -----------------------------------------------------------------------------------


class RepeatedMLP(nn.Module):
    """One Linear applied three times in a forward (a module reused, as in Kronfluence's repeated-module test)."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, d), nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.shared(h))
        return self.out(h)


class TwoTowerMLP(nn.Module):
    """Two inputs through separate towers, concatenated (Kronfluence's multi-input/multi-module tests)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(5, 6, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.cat([F.gelu(self.a(x[:, :4])), F.silu(self.b(x[:, 4:]))], dim=-1))


def moved_batchnorm(model: nn.Module, shape: Sequence[int]) -> nn.Module:
    """Move every BatchNorm's running statistics and affine parameters away from (0, 1) and (1, 0)."""
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape) * 2 + 1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def kf_mlp() -> Setup:
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return classification(model, images(4, [6]), 3)


def kf_regression() -> Setup:
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False))
    x, y = images(4, [6]), images(4, [2], seed=3)
    examples = [(x[i], y[i]) for i in range(4)]
    return Setup(model, FnTask(examples, lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1)), examples)


def kf_conv() -> Setup:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return classification(model, images(4, [3, 8, 8]), 3)


def kf_conv_bn() -> Setup:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return classification(moved_batchnorm(model, [3, 8, 8]), images(4, [3, 8, 8]), 3)


# -- Opacus-style per-sample-gradient modules -------------------------------------------------------------------


def conv_classifier(conv: nn.Module, in_shape: Sequence[int], norm: nn.Module | None = None) -> Setup:
    """``conv -> (norm) -> tanh -> flatten -> Linear``, sized by a dry run."""
    body = nn.Sequential(conv, *([norm] if norm is not None else []), nn.Tanh(), nn.Flatten())
    with torch.no_grad():
        features = body(torch.zeros(1, *in_shape)).shape[1]
    return classification(nn.Sequential(*body, nn.Linear(features, 3)), images(4, in_shape), 3)


class SequenceFirstLinear(nn.Module):
    """``[T, B, d]`` inputs: Linear -> tanh -> Linear over positions, mean over T (Opacus' batch_first=False)."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).mean(0)


def sequence_first(model: nn.Module, n: int, t: int, d: int = 6, ids: bool = False) -> Setup:
    """Examples ``[T, d]`` (or token ids ``[T]``) collated to ``[T, B, ...]``: the batch is dim 1."""
    gen = _gen(0)
    xs = [torch.randint(1, V, (t,), generator=gen) if ids else torch.randn(t, d, generator=gen) for _ in range(n)]
    y = torch.randint(0, 3, (n,), generator=gen)
    examples = [(xs[i], y[i]) for i in range(n)]

    def collate(ex):
        return torch.stack([x for x, _ in ex], dim=1), torch.stack([y for _, y in ex])

    return Setup(
        model, FnTask(examples, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), collate), examples
    )


class SequenceFirstMHA(nn.Module):
    def __init__(self, e: int = 8):
        super().__init__()
        self.inp = nn.Linear(6, e)
        self.attn = nn.MultiheadAttention(e, 2)
        self.head = nn.Linear(e, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(0))


class SequenceFirstEncoder(nn.Module):
    """``nn.TransformerEncoder`` with ``batch_first=False`` fed ``[T, B, d]`` features."""

    def __init__(self, e: int = 8):
        super().__init__()
        self.inp = nn.Linear(6, e)
        layer = nn.TransformerEncoderLayer(e, 2, 16, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(e, 3)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(0))


def weight_norm_mlp() -> nn.Module:
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(6, 8)), nn.Tanh(), nn.Linear(8, 3))


class Recurrent(nn.Module):
    """Embedding -> RNN/LSTM/GRU -> Linear on the last step (Opacus' DPLSTM tests' shape of model)."""

    def __init__(self, cell: str, batch_first: bool = True, bidirectional: bool = False, layers: int = 1):
        super().__init__()
        self.emb = nn.Embedding(V, 6)
        self.rnn = getattr(nn, cell)(6, 5, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(5 * (2 if bidirectional else 1), 3)
        self.batch_first = batch_first

    def forward(self, ids):
        out, _ = self.rnn(self.emb(ids))
        return self.head(out[:, -1] if self.batch_first else out[-1])


class LSTMCellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.cell, self.head = nn.Embedding(V, 6), nn.LSTMCell(6, 5), nn.Linear(5, 3)

    def forward(self, ids):
        h = c = torch.zeros(ids.shape[0], 5, dtype=self.head.weight.dtype)
        for t in range(ids.shape[1]):
            h, c = self.cell(self.emb(ids[:, t]), (h, c))
        return self.head(h)


def id_classifier(model: nn.Module, n: int = 4, t: int = 5) -> Setup:
    ids = torch.randint(1, V, (n, t), generator=_gen(0))
    return classification(model, ids, 3)


class BagModel(nn.Module):
    def __init__(self, mode: str, offsets: bool = False, weights: bool = False):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, 6, mode=mode)
        self.head = nn.Linear(6, 3)
        self.offsets, self.weights = offsets, weights

    def forward(self, ids, offsets=None, per_sample_weights=None):
        return self.head(torch.tanh(self.bag(ids, offsets, per_sample_weights=per_sample_weights)))


def bag_offsets(mode: str, weights: bool = False) -> Setup:
    """EmbeddingBag over a flat 1-D input with offsets: the batch dimension is implicit."""
    seqs = token_lists(4, (2, 5))
    y = torch.randint(0, 3, (4,), generator=_gen(1))
    examples = [(s, y[i]) for i, s in enumerate(seqs)]

    def collate(ex):
        flat = torch.cat([s for s, _ in ex])
        offsets = torch.tensor([0, *[len(s) for s, _ in ex][:-1]]).cumsum(0)
        w = torch.cat([torch.linspace(0.5, 1.5, len(s)) for s, _ in ex])
        return flat, offsets, w, torch.stack([t for _, t in ex])

    def loss(m, b):
        flat, offsets, w, target = b
        return F.cross_entropy(m(flat, offsets, w if weights else None), target, reduction="none")

    return Setup(BagModel(mode, offsets=True, weights=weights), FnTask(examples, loss, collate), examples)


class Norms(nn.Module):
    """``Linear -> norm -> Linear`` on features of shape ``shape`` (per example)."""

    def __init__(self, norm: nn.Module, shape: Sequence[int]):
        super().__init__()
        self.norm = norm
        self.head = nn.Linear(int(torch.tensor(shape).prod()), 3)
        self.shape = list(shape)
        with torch.no_grad():
            for p in norm.parameters():
                p.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(x)).flatten(1))


# -- TRAK-style ResNet, torch.func tutorial CNN ------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Mul(nn.Module):
    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x * self.weight


def resnet9(c: int = 4) -> nn.Module:
    return nn.Sequential(
        conv_bn(3, c),
        conv_bn(c, 2 * c),
        Residual(nn.Sequential(conv_bn(2 * c, 2 * c), conv_bn(2 * c, 2 * c))),
        nn.MaxPool2d(2),
        conv_bn(2 * c, 2 * c),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, 3, bias=False),
        Mul(0.2),
    )


class TutorialCNN(nn.Module):
    """The torch.func per-sample-grads tutorial's MNIST CNN, narrowed to 1x10x10 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, 1), nn.Conv2d(4, 6, 3, 1)
        self.fc1, self.fc2 = nn.Linear(6 * 3 * 3, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = F.dropout(x, p=0.25, training=self.training).flatten(1)
        return F.log_softmax(self.fc2(F.dropout(F.relu(self.fc1(x)), 0.5, self.training)), dim=1)


def tutorial_cnn() -> Setup:
    x = images(4, [1, 10, 10])
    y = torch.randint(0, 3, (4,), generator=_gen(1))
    examples = [(x[i], y[i]) for i in range(4)]
    return Setup(TutorialCNN(), FnTask(examples, lambda m, b: F.nll_loss(m(b[0]), b[1], reduction="none")), examples)


# -- hand-written models that break hook assumptions -------------------------------------------------------------


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 2.0, self.bias)


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 3.0


class OffsetEmbedding(nn.Embedding):
    """Learned positions computed from a mask, with an offset (OPT's and RoBERTa's pattern)."""

    def forward(self, mask):
        return super().forward(mask.long().cumsum(1) * mask.long() + 1)


class SubclassModel(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.tok = ScaledEmbedding(V, 8) if kind == "embedding" else nn.Embedding(V, 8)
        self.pos = OffsetEmbedding(10, 8) if kind == "positions" else None
        self.mix = ScaledLinear(8, 8) if kind == "linear" else nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids)
        if self.pos is not None:
            h = h + self.pos(attention_mask)
        return self.head((torch.tanh(self.mix(h)) * attention_mask.unsqueeze(-1)).sum(1))


class BareParameters(nn.Module):
    """A per-feature scale, a cls token and a position table as bare ``nn.Parameter`` s."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.positions = nn.Parameter(torch.randn(1, 8, 8) * 0.5)
        self.scale = nn.Parameter(torch.ones(8) * 1.5)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.positions[:, : h.shape[1]]
        return self.head(torch.tanh(h * self.scale)[:, 0])


class TiedLM(nn.Module):
    """Embedding -> Linear -> tied head, the head written as ``h @ emb.weight.T`` or ``F.linear(h, emb.weight)``."""

    def __init__(self, head: str):
        super().__init__()
        self.emb, self.mix = nn.Embedding(V, 8), nn.Linear(8, 8)
        self.head = head

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return h @ self.emb.weight.T if self.head == "matmul" else F.linear(h, self.emb.weight)


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(self.ln(h))))


class BlockLM(nn.Module):
    """Embedding -> Block (optionally reentrant-checkpointed) -> Linear head."""

    def __init__(self, reentrant: bool = False):
        super().__init__()
        self.emb, self.block, self.head = nn.Embedding(V, 8), Block(), nn.Linear(8, V)
        self.reentrant = reentrant

    def forward(self, ids):
        h = self.emb(ids)
        h = checkpoint(self.block, h, use_reentrant=True) if self.reentrant else self.block(h)
        return self.head(h)


class BatchNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(self.l1(x))))


class TwoTowerCLIP(nn.Module):
    """A CLIP-like two-tower: image and text encoders, projections, a learned ``logit_scale``."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 8))
        self.text = nn.Embedding(V, 8)
        self.text_proj = nn.Linear(8, 8, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, pixels, ids, mask):
        img = F.normalize(self.image(pixels), dim=-1)
        txt = (self.text(ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        txt = F.normalize(self.text_proj(txt), dim=-1)
        return self.logit_scale.exp() * (img * txt).sum(-1)


def two_tower(model: nn.Module, call: Callable) -> Setup:
    """Each example: an image, its caption and a wrong caption; loss: 2-way softmax of the two similarities."""
    x = images(4, [3, 8, 8])
    captions, wrong = token_lists(4, (3, 5), seed=0), token_lists(4, (3, 5), seed=5)
    examples = [(x[i], captions[i], wrong[i]) for i in range(4)]

    def collate(ex):
        ids, mask = pad([c for _, c, _ in ex])
        ids2, mask2 = pad([w for _, _, w in ex])
        return torch.stack([e[0] for e in ex]), ids, mask, ids2, mask2

    def loss(m, b):
        pixels, ids, mask, ids2, mask2 = b
        right, wrong_ = call(m, pixels, ids, mask), call(m, pixels, ids2, mask2)
        return -F.log_softmax(torch.stack([right, wrong_], dim=1), dim=1)[:, 0]

    return Setup(model, FnTask(examples, loss, collate), examples)


# -- Hugging Face families from tiny configs ---------------------------------------------------------------------


def _hf():
    import transformers

    return transformers


def _small(**kw) -> dict:
    base = dict(vocab_size=V, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return base


def llama_like(cls: str, config: str, **kw) -> nn.Module:
    tf = _hf()
    cfg = getattr(tf, config)(
        **_small(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            **kw,
        )
    )
    return getattr(tf, cls)(cfg)


def gpt2(**kw) -> nn.Module:
    tf = _hf()
    cfg = tf.GPT2Config(
        **_small(n_positions=16, n_embd=8, n_layer=1, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    )
    return tf.GPT2LMHeadModel(cfg)


def bart(cls: str = "BartForConditionalGeneration", config: str = "BartConfig", **kw) -> nn.Module:
    tf = _hf()
    cfg = getattr(tf, config)(
        **_small(
            d_model=8,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
            max_position_embeddings=16,
            scale_embedding=True,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            decoder_start_token_id=2,
            **kw,
        )
    )
    return getattr(tf, cls)(cfg)


def t5() -> nn.Module:
    tf = _hf()
    cfg = tf.T5Config(
        vocab_size=V,
        d_model=8,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return tf.T5ForConditionalGeneration(cfg)


def opt(**kw) -> nn.Module:
    tf = _hf()
    cfg = tf.OPTConfig(
        **_small(
            hidden_size=8,
            num_hidden_layers=1,
            ffn_dim=16,
            num_attention_heads=2,
            max_position_embeddings=16,
            dropout=0.0,
            attention_dropout=0.0,
            **kw,
        )
    )
    return tf.OPTForCausalLM(cfg)


def encoder_classifier(cls: str, config: str, **kw) -> nn.Module:
    tf = _hf()
    base = dict(
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    base.update(kw)
    return getattr(tf, cls)(getattr(tf, config)(**_small(**base)))


def whisper() -> Setup:
    tf = _hf()
    cfg = tf.WhisperConfig(
        **_small(
            num_mel_bins=4,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            d_model=8,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
            max_source_positions=4,
            max_target_positions=16,
            decoder_start_token_id=1,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    )
    model = tf.WhisperForConditionalGeneration(cfg)
    feats = images(4, [4, 8])
    targets = token_lists(4, (3, 6))
    examples = [(feats[i], targets[i]) for i in range(4)]

    def collate(ex):
        ids, mask = pad([t for _, t in ex])
        dec_in = torch.cat([torch.ones(len(ex), 1, dtype=torch.long), ids[:, :-1]], dim=1)
        return torch.stack([f for f, _ in ex]), dec_in, ids, mask

    def loss(m, b):
        f, dec_in, ids, mask = b
        return _token_nll(m(input_features=f, decoder_input_ids=dec_in).logits, ids, mask)

    return Setup(model, FnTask(examples, loss, collate), examples)


def vit(n: int) -> Setup:
    tf = _hf()
    cfg = tf.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = tf.ViTForImageClassification(cfg)
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_()
    x = images(n, [3, 8, 8])
    y = torch.randint(0, 3, (n,), generator=_gen(1))
    examples = [(x[i], y[i]) for i in range(n)]
    loss = lambda m, b: F.cross_entropy(m(pixel_values=b[0]).logits, b[1], reduction="none")  # noqa: E731
    return Setup(model, FnTask(examples, loss), examples)


def hf_clip() -> Setup:
    tf = _hf()
    text = dict(
        vocab_size=V,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=8,
        eos_token_id=2,
    )
    vision = dict(
        image_size=8, patch_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    model = tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def call(m, pixels, ids, mask):
        img = F.normalize(features(m.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(features(m.get_text_features(input_ids=ids, attention_mask=mask)), dim=-1)
        return m.logit_scale.exp() * (img * txt).sum(-1)

    return two_tower(model, call)


def peft_lora() -> Setup:
    import peft

    model = llama_like("LlamaForCausalLM", "LlamaConfig")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return causal_lm(peft.get_peft_model(model, lora), 4, (3, 6))


# -- in-training setups ------------------------------------------------------------------------------------------


def lm_ids(model: nn.Module, n: int, t: int, **kw) -> Setup:
    """Equal-length token sequences, ``model(ids) -> [B, T, V]``, next-token loss summed."""
    seqs = token_lists(n, (t, t))

    def loss(m, ids):
        logits = m(ids)
        logits = getattr(logits, "logits", logits)  # an HF model's output
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return nll.view(ids.shape[0], -1).sum(1)

    return Setup(model, FnTask(seqs, loss, lambda ex: torch.stack(ex)), seqs, **kw)


def compile_block(model: nn.Module) -> nn.Module:
    model.block = torch.compile(model.block, backend="eager")
    return model


# -- the registry ------------------------------------------------------------------------------------------------


def _gemma(**kw) -> nn.Module:
    return llama_like("GemmaForCausalLM", "GemmaConfig", head_dim=4, **kw)


def _moe(cls: str, config: str, **kw) -> nn.Module:
    model = llama_like(cls, config, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.dim() == 2 and "proj" not in name:
                p.normal_(0, 1.0)  # decisive routing, so that float noise cannot flip an expert choice
    return model


def _norm_case(norm: nn.Module, shape: Sequence[int]) -> Callable[[], Setup]:
    return lambda: classification(Norms(norm, shape), images(4, shape), 3)


def _conv(conv: Callable[[], nn.Module], shape: Sequence[int], norm: Callable[[], nn.Module] | None = None):
    return lambda: conv_classifier(conv(), shape, norm() if norm else None)


CASES: list[Case] = [
    # Kronfluence
    Case("kf_mlp", "kronfluence", kf_mlp),
    Case("kf_regression_nobias", "kronfluence", kf_regression),
    Case("kf_repeated_module", "kronfluence", lambda: classification(RepeatedMLP(), images(4, [6]), 3)),
    Case("kf_two_towers", "kronfluence", lambda: classification(TwoTowerMLP(), images(4, [9]), 3)),
    Case("kf_conv_maxpool", "kronfluence", kf_conv),
    Case("kf_conv_bn_eval", "kronfluence", kf_conv_bn),
    Case("kf_gpt2", "kronfluence", lambda: causal_lm(gpt2(), 3, (3, 6))),
    Case("kf_gpt2_T=B", "kronfluence", lambda: causal_lm(gpt2(), 4, (2, 4))),
    # Opacus
    Case("op_conv1d", "opacus", _conv(lambda: nn.Conv1d(3, 4, 3, padding=1), [3, 7])),
    Case("op_conv1d_grouped", "opacus", _conv(lambda: nn.Conv1d(4, 4, 3, groups=2), [4, 7])),
    Case("op_conv2d_stride_dilation", "opacus", _conv(lambda: nn.Conv2d(3, 4, 3, 2, 1, 2, bias=False), [3, 9, 9])),
    Case("op_conv2d_padding_same", "opacus", _conv(lambda: nn.Conv2d(3, 4, 3, padding="same"), [3, 6, 6])),
    Case(
        "op_conv2d_circular", "opacus", _conv(lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), [3, 6, 6])
    ),
    Case(
        "op_conv2d_reflect", "opacus", _conv(lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), [3, 6, 6])
    ),
    Case("op_conv2d_grouped", "opacus", _conv(lambda: nn.Conv2d(4, 6, 3, groups=2), [4, 6, 6])),
    Case("op_conv2d_depthwise", "opacus", _conv(lambda: nn.Conv2d(4, 8, 3, groups=4), [4, 6, 6])),
    Case("op_conv3d", "opacus", _conv(lambda: nn.Conv3d(2, 3, 2), [2, 4, 4, 4])),
    Case("op_convtranspose1d", "opacus", _conv(lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), [3, 5])),
    Case(
        "op_convtranspose2d",
        "opacus",
        _conv(lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), [3, 4, 4]),
    ),
    Case("op_convtranspose3d", "opacus", _conv(lambda: nn.ConvTranspose3d(2, 3, 2), [2, 3, 3, 3])),
    Case(
        "op_embedding_padding_idx",
        "opacus",
        lambda: id_classifier(nn.Sequential(nn.Embedding(V, 6, padding_idx=3), nn.Flatten(), nn.Linear(30, 3))),
    ),
    Case(
        "op_embedding_scale_grad_by_freq",
        "opacus",
        lambda: id_classifier(
            nn.Sequential(nn.Embedding(V, 6, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(30, 3))
        ),
    ),
    Case("op_embeddingbag_sum_2d", "opacus", lambda: id_classifier(BagModel("sum"))),
    Case("op_embeddingbag_max_2d", "opacus", lambda: id_classifier(BagModel("max"))),
    Case("op_embeddingbag_mean_offsets", "opacus", lambda: bag_offsets("mean")),
    Case("op_embeddingbag_weighted_offsets", "opacus", lambda: bag_offsets("sum", weights=True)),
    Case("op_layernorm_2d_shape", "opacus", _norm_case(nn.LayerNorm([3, 4]), [3, 4])),
    Case("op_layernorm_no_bias", "opacus", _norm_case(nn.LayerNorm(6, bias=False), [6])),
    Case("op_groupnorm", "opacus", _conv(lambda: nn.Conv2d(3, 4, 3), [3, 6, 6], lambda: nn.GroupNorm(2, 4))),
    Case("op_instancenorm1d_affine", "opacus", _norm_case(nn.InstanceNorm1d(3, affine=True), [3, 5])),
    Case("op_instancenorm2d_affine", "opacus", _norm_case(nn.InstanceNorm2d(3, affine=True), [3, 4, 4])),
    Case("op_instancenorm3d_affine", "opacus", _norm_case(nn.InstanceNorm3d(2, affine=True), [2, 3, 3, 3])),
    Case("op_rnn", "opacus", lambda: id_classifier(Recurrent("RNN"))),
    Case("op_lstm", "opacus", lambda: id_classifier(Recurrent("LSTM", layers=2))),
    Case("op_gru_bidirectional", "opacus", lambda: id_classifier(Recurrent("GRU", bidirectional=True))),
    Case(
        "op_lstm_seq_first_T=B", "opacus", lambda: sequence_first(Recurrent("LSTM", batch_first=False), 4, 4, ids=True)
    ),
    Case("op_lstmcell_loop", "opacus", lambda: id_classifier(LSTMCellLoop())),
    Case("op_linear_seq_first_T!=B", "opacus", lambda: sequence_first(SequenceFirstLinear(), 4, 5)),
    Case("op_linear_seq_first_T=B", "opacus", lambda: sequence_first(SequenceFirstLinear(), 4, 4)),
    Case("op_mha_seq_first_T=B", "opacus", lambda: sequence_first(SequenceFirstMHA(), 4, 4)),
    Case("op_transformer_encoder_seq_first_T=B", "opacus", lambda: sequence_first(SequenceFirstEncoder(), 4, 4)),
    Case("op_weight_norm_linear", "opacus", lambda: classification(weight_norm_mlp(), images(4, [6]), 3)),
    Case(
        "op_linear_4d_input",
        "opacus",
        lambda: classification(
            nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 5, 3)), images(4, [3, 2, 4]), 3
        ),
    ),
    # Bergson (tiny HF causal LMs)
    Case(
        "bg_gpt_neox",
        "bergson",
        lambda: causal_lm(llama_like("GPTNeoXForCausalLM", "GPTNeoXConfig", rotary_pct=0.5), 3, (3, 6)),
    ),
    Case(
        "bg_phi",
        "bergson",
        lambda: causal_lm(llama_like("PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5), 3, (3, 6)),
    ),
    Case("bg_qwen2_T=B", "bergson", lambda: causal_lm(llama_like("Qwen2ForCausalLM", "Qwen2Config"), 4, (2, 4))),
    Case("bg_llama_T=B", "bergson", lambda: causal_lm(llama_like("LlamaForCausalLM", "LlamaConfig"), 4, (2, 4))),
    # TRAK
    Case(
        "trak_resnet9_eval_bn",
        "trak",
        lambda: classification(moved_batchnorm(resnet9(), [3, 8, 8]), images(4, [3, 8, 8]), 3),
    ),
    # torch.func tutorial
    Case("torchfunc_tutorial_cnn", "torch.func", tutorial_cnn),
    # Hugging Face families
    Case("hf_gemma_scaled_tied", "hf", lambda: causal_lm(_gemma(), 3, (3, 6))),
    Case("hf_gemma_T=B", "hf", lambda: causal_lm(_gemma(), 4, (2, 4))),
    Case("hf_bart_scaled_positions", "hf", lambda: seq2seq(bart(), 3, (3, 6), (3, 5), start=2)),
    Case("hf_bart_T=B", "hf", lambda: seq2seq(bart(), 4, (2, 4), (2, 4), start=2)),
    Case(
        "hf_mbart",
        "hf",
        lambda: seq2seq(bart("MBartForConditionalGeneration", "MBartConfig"), 3, (3, 6), (3, 5), start=2),
    ),
    Case("hf_opt_positions", "hf", lambda: causal_lm(opt(), 3, (3, 6))),
    Case("hf_opt_left_padded", "hf", lambda: causal_lm(opt(), 3, (3, 6), left=True)),
    Case("hf_opt_project_in_out", "hf", lambda: causal_lm(opt(word_embed_proj_dim=4), 4, (2, 4))),
    Case("hf_t5_relative_bias_T=B", "hf", lambda: seq2seq(t5(), 4, (2, 4), (2, 4), start=0)),
    Case("hf_t5_relative_bias", "hf", lambda: seq2seq(t5(), 3, (3, 6), (3, 5), start=0)),
    Case("hf_whisper", "hf", whisper),
    Case(
        "hf_mixtral_moe",
        "hf",
        lambda: causal_lm(
            _moe(
                "MixtralForCausalLM",
                "MixtralConfig",
                num_local_experts=4,
                num_experts_per_tok=2,
                experts_implementation="eager",
            ),
            3,
            (3, 6),
        ),
    ),
    Case(
        "hf_mixtral_moe_grouped_mm",
        "hf",
        lambda: causal_lm(
            _moe("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2), 3, (3, 6)
        ),
        reference_dtype=torch.float32,
    ),
    Case(
        "hf_qwen2_moe",
        "hf",
        lambda: causal_lm(
            _moe(
                "Qwen2MoeForCausalLM",
                "Qwen2MoeConfig",
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=8,
                shared_expert_intermediate_size=8,
                decoder_sparse_step=1,
                experts_implementation="eager",
            ),
            3,
            (3, 6),
        ),
    ),
    Case("hf_vit_cls_positions", "hf", lambda: vit(3)),
    Case("hf_vit_T=B", "hf", lambda: vit(5)),
    Case("hf_clip_logit_scale", "hf", hf_clip),
    Case("clip_like_two_tower", "hf", lambda: two_tower(TwoTowerCLIP(), lambda m, p, i, k: m(p, i, k))),
    Case(
        "hf_roberta_padding_positions",
        "hf",
        lambda: sequence_classifier(encoder_classifier("RobertaForSequenceClassification", "RobertaConfig"), 3, (3, 6)),
    ),
    Case(
        "hf_deberta_v2_relative",
        "hf",
        lambda: sequence_classifier(
            encoder_classifier(
                "DebertaV2ForSequenceClassification",
                "DebertaV2Config",
                relative_attention=True,
                position_buckets=4,
                pos_att_type=["p2c", "c2p"],
                max_relative_positions=8,
                pooler_dropout=0.0,
            ),
            3,
            (3, 6),
        ),
    ),
    Case(
        "hf_albert_factorized_shared",
        "hf",
        lambda: sequence_classifier(
            encoder_classifier(
                "AlbertForSequenceClassification",
                "AlbertConfig",
                embedding_size=4,
                num_hidden_layers=2,
                classifier_dropout_prob=0.0,
            ),
            3,
            (3, 6),
        ),
    ),
    Case(
        "hf_bert_T=B",
        "hf",
        lambda: sequence_classifier(encoder_classifier("BertForSequenceClassification", "BertConfig"), 4, (2, 4)),
    ),
    Case(
        "hf_distilbert",
        "hf",
        lambda: sequence_classifier(
            encoder_classifier(
                "DistilBertForSequenceClassification",
                "DistilBertConfig",
                dim=8,
                n_layers=1,
                n_heads=2,
                hidden_dim=16,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
            ),
            3,
            (3, 6),
        ),
    ),
    Case(
        "hf_bloom_alibi",
        "hf",
        lambda: causal_lm(
            llama_like(
                "BloomForCausalLM", "BloomConfig", n_layer=1, n_head=2, hidden_dropout=0.0, attention_dropout=0.0
            ),
            3,
            (3, 6),
        ),
    ),
    Case(
        "hf_mamba",
        "hf",
        lambda: lm_ids(
            llama_like("MambaForCausalLM", "MambaConfig", state_size=4, expand=2, conv_kernel=3, use_mambapy=False),
            3,
            5,
        ),
    ),
    Case(
        "hf_gpt2_seq_classification",
        "hf",
        lambda: sequence_classifier(
            encoder_classifier(
                "GPT2ForSequenceClassification",
                "GPT2Config",
                n_embd=8,
                n_layer=1,
                n_head=2,
                n_positions=16,
                attn_pdrop=0.0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
            ),
            3,
            (3, 6),
        ),
    ),
    Case("peft_lora_llama", "peft", peft_lora),
    # hand-written breakers of hook assumptions
    Case("subclass_linear_forward", "issue-17", lambda: sequence_classifier(SubclassModel("linear"), 3, (3, 6))),
    Case("subclass_embedding_forward", "issue-17", lambda: sequence_classifier(SubclassModel("embedding"), 3, (3, 6))),
    Case(
        "subclass_positions_from_mask", "issue-17", lambda: sequence_classifier(SubclassModel("positions"), 3, (3, 6))
    ),
    Case("bare_parameters", "issue-17", lambda: sequence_classifier(BareParameters(), 3, (3, 6))),
    # in-training
    Case("train_tied_head_matmul_project", "training", lambda: lm_ids(TiedLM("matmul"), 3, 5)),
    Case(
        "train_tied_head_matmul_capture", "training", lambda: lm_ids(TiedLM("matmul"), 3, 5, train=True), mode="capture"
    ),
    Case(
        "train_tied_head_F_linear_capture",
        "training",
        lambda: lm_ids(TiedLM("linear"), 3, 5, train=True),
        mode="capture",
    ),
    Case(
        "train_compiled_block_capture",
        "training",
        lambda: lm_ids(BlockLM(), 3, 5, train=True, prepare=compile_block),
        mode="capture",
    ),
    Case(
        "train_batchnorm_training_capture",
        "training",
        lambda: classification(BatchNormMLP(), images(4, [6]), 3, train=True),
        mode="capture",
        layers=("*", "!bn"),
    ),
    Case(
        "train_resnet9_bn_training_capture",
        "training",
        lambda: classification(resnet9(), images(4, [3, 8, 8]), 3, train=True),
        mode="capture",
        layers=("*", "!*.1"),
    ),
    Case(
        "train_reentrant_checkpoint_after_unlogged_project",
        "training",
        lambda: lm_ids(BlockLM(reentrant=True), 3, 5),
        layers=("*", "!emb"),
    ),
    Case(
        "train_reentrant_checkpoint_after_unlogged_capture",
        "training",
        lambda: lm_ids(BlockLM(reentrant=True), 3, 5, train=True),
        mode="capture",
        layers=("*", "!emb"),
    ),
    Case(
        "train_subclass_embedding_capture",
        "training",
        lambda: sequence_classifier(SubclassModel("embedding"), 3, (3, 6), train=True),
        mode="capture",
    ),
    Case("train_gemma_capture", "training", lambda: causal_lm(_gemma(), 3, (3, 6), train=True), mode="capture"),
    Case(
        "train_mlp_capture",
        "training",
        lambda: classification(
            nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), images(4, [6]), 3, train=True
        ),
        mode="capture",
    ),
    Case("train_gpt2_capture_T=B", "training", lambda: causal_lm(gpt2(), 4, (2, 4), train=True), mode="capture"),
    Case(
        "train_two_projectors_nanogpt",
        "training",
        lambda: lm_ids(nanogpt(), 3, 5),
        mode="two_projectors",
        culprits=("",),
    ),
    Case(
        "train_two_loggers_nanogpt_capture",
        "training",
        lambda: lm_ids(nanogpt(), 3, 5, train=True),
        mode="two_loggers",
        culprits=("",),
    ),
]


def nanogpt() -> nn.Module:
    from .models import NanoGPT

    return NanoGPT(vocab=V, d=8, max_len=8)


# -- the check ---------------------------------------------------------------------------------------------------


def _to_double(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_double(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_double(b) for b in batch)
    return batch


def _canonical_name(name: str) -> str:
    return name.replace("_orig_mod.", "")


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def reference_grads(
    pristine: nn.Module, task: Task, examples: list, batched: bool, train: bool, dtype=torch.float64
) -> dict:
    """``{parameter name: [B, *shape]}`` exact per-example gradients (float64) of every trainable parameter.

    ``batched=False``: each example collated alone, its own loss (``torch.func``'s per-sample gradient);
    ``batched=True``: the gradient of ``loss[i]`` within one batched forward (training-mode batch coupling
    included). ``backward()`` into ``.grad`` rather than ``autograd.grad``, which reentrant checkpointing refuses.
    """
    ref = copy.deepcopy(pristine).to(dtype).train(train)
    params = _trainable(ref)
    out: dict[str, list] = {n: [] for n in params}

    def record(loss, retain):
        for p in params.values():
            p.grad = None
        loss.backward(retain_graph=retain)
        for n, p in params.items():
            out[n].append(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())

    def cast(batch):
        return _to_double(batch) if dtype == torch.float64 else batch

    if batched:
        losses = task.loss(ref, cast(task.collate(list(examples))))
        for i in range(len(examples)):
            record(losses[i], retain=i + 1 < len(examples))
    else:
        alone = []
        for example in examples:
            loss = task.loss(ref, cast(task.collate([example]))).sum()
            alone.append(loss.detach())
            record(loss, retain=False)
        with torch.no_grad():  # an example's loss must not depend on its batch (padding), or the case is ill-posed
            together = task.loss(ref, cast(task.collate(list(examples))))
        if relative_error(torch.stack(alone), together) > 1e-6:
            raise AssertionError(f"the case's losses depend on the batch: {torch.stack(alone)} vs {together}")
    return {n: torch.stack(g).double() for n, g in out.items()}


def _names_refusal(exc: BaseException, model: nn.Module, culprits: Sequence[str]) -> bool:
    message = str(exc)
    if isinstance(exc, ExactnessError):
        message += f" {exc.layer}"
    if culprits:
        return any(c in message for c in culprits)
    names = {n for n, _ in model.named_modules() if n} | {n for n, _ in model.named_parameters()}
    names |= {_canonical_name(n) for n in names}
    for name in names:
        if len(name) <= 2:
            if f"'{name}'" in message or f'"{name}"' in message:
                return True
        elif re.search(r"(?<![\w.])" + re.escape(name) + r"(?!\w)", message):
            return True
    return False


def compare(rows: torch.Tensor, projector: GradientProjector, exact: dict, model: nn.Module, warned: list) -> tuple:
    """Block-wise: the rows' Gram equals the exact gradients' Gram and the rows equal the dense projection of the
    exact gradients in the block's canonical layout. Then coverage of the trainable parameters."""
    rows = rows.double().cpu()
    names = {id(p): _canonical_name(n) for n, p in model.named_parameters()}
    errors: dict[str, float] = {}
    covered: set[str] = set()
    scale = 0.0
    for layer, spec in zip(projector.layers, projector.spec.layers):
        params = layer.parameters()
        pnames = {role: names[id(p)] for role, p in params.items()}
        covered |= set(pnames.values())
        flat = torch.cat([exact[n].reshape(len(rows), -1) for n in pnames.values()], dim=1)
        got = rows[:, spec.slice]
        exact_gram, got_gram = flat @ flat.T, got @ got.T
        top = float(exact_gram.abs().max())
        scale = max(scale, top)
        err = relative_error(got_gram, exact_gram) if top > 1e-20 else float(got_gram.abs().max())
        try:
            canonical = layer.canonical({role: exact[n] for role, n in pnames.items()}).reshape(len(rows), -1)
            dense = canonical @ dense_layer_projector(projector.base_matrices[spec.name]).T
            if float(dense.abs().max()) > 1e-10:
                err = max(err, relative_error(got, dense))
        except Exception:  # a canonical layout the dense check cannot build: the Gram check alone decides
            pass
        errors[layer.name] = err
    if scale <= 1e-12:
        raise AssertionError("degenerate case: the exact gradients of the logged blocks are all zero")
    worst = max(errors, key=errors.get) if errors else None  # type: ignore[arg-type]
    if worst is not None and errors[worst] >= TOL:
        bad = sorted((e, n) for n, e in errors.items() if e >= TOL)[::-1]
        listed = ", ".join(f"{n} {e:.1e}" for e, n in bad[:4])
        return WRONG, f"{len(bad)}/{len(errors)} blocks off: {listed}"
    missing = sorted(n for n in exact if n not in covered)
    if missing:
        text = " ".join(warned)
        named = [n for n in missing if n in text or n.rsplit(".", 1)[0] in text]
        listed = ", ".join(missing[:4]) + (f" (+{len(missing) - 4})" if len(missing) > 4 else "")
        if named:
            return PARTIAL_WARNED, f"{len(errors)} blocks exact; warned about: {listed}"
        return PARTIAL, f"{len(errors)} blocks exact; not logged, no warning: {listed}"
    return EXACT, f"{len(errors)} blocks, worst {worst} {errors[worst]:.1e}" if worst else "no blocks"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _eval_losses(model: nn.Module, task: Task, examples: list, train: bool = False) -> torch.Tensor:
    """The batch's losses without gradients (``train``: in training mode, on a copy: BatchNorm statistics move)."""
    was = model.training
    if train:
        model = copy.deepcopy(model)
    model.train(train)
    try:
        with torch.no_grad():
            return task.loss(model, task.collate(list(examples))).detach().clone()
    finally:
        model.train(was)


def _outputs_changed(before: torch.Tensor, after: torch.Tensor) -> str | None:
    if before.shape != after.shape:
        return f"model outputs changed shape while hooked: {tuple(before.shape)} -> {tuple(after.shape)}"
    if relative_error(after.double(), before.double()) > 1e-5:
        return f"model outputs changed while hooked (relative {relative_error(after.double(), before.double()):.1e})"
    return None


def capture_accepts_losses() -> bool:
    return "losses" in inspect.signature(GradientLogger.capture).parameters


def projector_accepts_verify() -> bool:
    return "verify" in inspect.signature(GradientProjector.__init__).parameters


def _project_rows(model, setup: Setup, layers, **kw) -> tuple[torch.Tensor, GradientProjector]:
    projector = GradientProjector(model, setup.task, rank=10**6, init="orthonormal", layers=list(layers), **kw)
    try:
        return projector.project(setup.examples), projector
    except BaseException:
        projector.close()
        raise


def _capture_rows(model, setup: Setup, layers, store: Path, name: str = "c", logger=None):
    """One training step under ``capture()``; returns (rows, logger, losses of the step)."""
    if logger is None:
        logger = GradientLogger(
            model,
            setup.task,
            store=store,
            rank=10**6,
            init="orthonormal",
            dtype="float32",
            progress=False,
            layers=list(layers),
        )
    model.train(setup.train)
    ids = list(range(len(setup.examples)))
    try:
        losses = setup.task.loss(model, setup.task.collate(list(setup.examples)))
        kw = {"losses": losses} if capture_accepts_losses() else {}
        with logger.capture(name, lr=0.1, ids=ids, reduction="mean", **kw):
            losses.mean().backward()
        model.zero_grad(set_to_none=True)
        logger.flush()
        _, rows = logger._require_store().read(name, ids=ids)
        return torch.from_numpy(rows), logger, losses.detach()
    except BaseException:
        logger.close()
        raise


def _execute(case: Case, setup: Setup, workdir: Path) -> tuple[str, str]:
    model = setup.model
    batched = case.mode in ("capture", "two_loggers")
    exact = reference_grads(model, setup.task, setup.examples, batched, setup.train and batched, case.reference_dtype)
    before = _eval_losses(model, setup.task, setup.examples, train=setup.train and batched)
    if setup.prepare is not None:
        model = setup.prepare(model)
    warned: list[str] = []
    note = "" if capture_accepts_losses() or not batched else " [capture() has no losses= yet]"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.mode == "project":
                rows, projector = _project_rows(model, setup, case.layers)
                projectors = [(rows, projector)]
            elif case.mode == "two_projectors":
                first = GradientProjector(model, setup.task, rank=10**6, init="orthonormal", layers=list(case.layers))
                try:
                    second = GradientProjector(
                        model, setup.task, rank=10**6, init="orthonormal", layers=list(case.layers), seed=1
                    )
                except BaseException:
                    first.close()
                    raise
                projectors = []
                changed = _outputs_changed(before, _eval_losses(model, setup.task, setup.examples))
                if changed:
                    first.close(), second.close()
                    return WRONG, changed
                projectors = [(first.project(setup.examples), first), (second.project(setup.examples), second)]
            elif case.mode == "capture":
                rows, projector, losses = _capture_rows(model, setup, case.layers, workdir / "s.zarr")
                projectors = [(rows, projector)]
            elif case.mode == "two_loggers":
                projectors, losses = _two_loggers(model, setup, case.layers, workdir)
            else:
                raise ValueError(case.mode)
        except GradstoreError as exc:
            warned.extend(str(w.message) for w in caught)
            kind = type(exc).__name__
            if not _names_refusal(exc, model, case.culprits):
                return UNNAMED, f"{kind}: {_short(exc)}"
            detail = f"{kind}: {_short(exc)}"
            if isinstance(exc, ExactnessError) and case.mode == "project" and projector_accepts_verify():
                detail += _false_refusal(model, setup, case, exact)
            return REFUSED, detail + note
        warned.extend(str(w.message) for w in caught)
    try:
        if case.mode in ("capture", "two_loggers"):
            changed = _outputs_changed(before, losses)
            if changed:
                return WRONG, changed
        elif case.mode == "project":
            changed = _outputs_changed(before, _eval_losses(model, setup.task, setup.examples))
            if changed:
                return WRONG, changed
        results = [compare(rows, projector, exact, model, warned) for rows, projector in projectors]
    finally:
        for _, projector in projectors:
            projector.close()
    worst = next((r for r in results if r[0] not in PASSING), results[0])
    return worst[0], worst[1] + note


def _two_loggers(model: nn.Module, setup: Setup, layers, workdir: Path) -> tuple[list, torch.Tensor]:
    """Two GradientLoggers on one model, one training step captured by both (nested capture blocks)."""
    kw = dict(rank=10**6, init="orthonormal", dtype="float32", progress=False, layers=list(layers))
    first = GradientLogger(model, setup.task, store=workdir / "a.zarr", **kw)
    try:
        second = GradientLogger(model, setup.task, store=workdir / "b.zarr", seed=1, **kw)
    except BaseException:
        first.close()
        raise
    loggers = [first, second]
    try:
        model.train(setup.train)
        ids = list(range(len(setup.examples)))
        losses = setup.task.loss(model, setup.task.collate(list(setup.examples)))
        extra = {"losses": losses} if capture_accepts_losses() else {}
        with first.capture("c", lr=0.1, ids=ids, reduction="mean", **extra):
            with second.capture("c", lr=0.1, ids=ids, reduction="mean", **extra):
                losses.mean().backward()
        out = []
        for logger in loggers:
            logger.flush()
            out.append((torch.from_numpy(logger._require_store().read("c", ids=ids)[1]), logger))
        return out, losses.detach()
    except BaseException:
        for logger in loggers:
            logger.close()
        raise


def _false_refusal(model: nn.Module, setup: Setup, case: Case, exact: dict) -> str:
    """An ExactnessError on rows that are exact (by this reference) is a false refusal: say so in the detail."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows, projector = _project_rows(model, setup, case.layers, verify=False)
        try:
            status, _ = compare(rows, projector, exact, model, [])
        finally:
            projector.close()
        return " [FALSE REFUSAL: the rows are exact]" if status == EXACT else ""
    except Exception:
        return ""


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_case(case: Case, workdir: Path | None = None) -> Outcome:
    """Build the case's model (seeded) and classify what gradstore does with it."""
    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        setup = case.build()
    except ImportError as exc:
        return Outcome(case.name, case.source, "skipped", f"not importable: {exc}", time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            status, detail = _execute(case, setup, Path(workdir or tmp))
        except AssertionError:
            raise
        except GradstoreError as exc:  # raised outside the guarded region (e.g. while closing)
            status, detail = (REFUSED if _names_refusal(exc, setup.model, case.culprits) else UNNAMED), _short(exc)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            status, detail = CRASH, f"{type(exc).__name__} at {where}: {_short(exc)}"
    return Outcome(case.name, case.source, status, detail, time.perf_counter() - start)


def summary_table(outcomes: Sequence[Outcome]) -> str:
    """A table of every case's classification, then counts per status."""
    width = max((len(o.case) for o in outcomes), default=10)
    lines = [f"{'case':<{width}}  {'source':<11} {'status':<24} {'s':>5}  detail"]
    for o in outcomes:
        lines.append(f"{o.case:<{width}}  {o.source:<11} {o.status:<24} {o.seconds:5.2f}  {o.detail}")
    counts = {s: sum(o.status == s for o in outcomes) for s in (*STATUSES, "skipped")}
    lines.append("counts: " + ", ".join(f"{s}: {c}" for s, c in counts.items() if c))
    lines.append(f"total {len(outcomes)} cases, {sum(o.seconds for o in outcomes):.1f} s")
    return "\n".join(lines)


__all__ = ["CASES", "PASSING", "Case", "Outcome", "Setup", "run_case", "summary_table"]
