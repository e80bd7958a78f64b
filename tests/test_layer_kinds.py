"""The layer kinds beyond Linear/Embedding/Conv2d: exact against torch.func, or refused naming the layer.

Each model is tiny. A full-rank orthonormal projection is an isometry per block, so the rows of ``project()`` and of a
training-time ``capture()`` must equal the dense projection of the exact per-example gradients (``torch.func``, in
float64) of every logged block, in that block's canonical layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import GradientLogger, GradientProjector, Task, UnsupportedLayerError
from gradstore.projection import build_matrices
from gradstore.projection.reference import project_dense
from gradstore.store import GradientStore

from .helpers.models import per_example_canonical_grads, relative_error

N = 5


class Inputs(Task):
    """Random float inputs (any shape) or token ids, and class labels; cross-entropy on the model's logits."""

    def __init__(self, shape: tuple[int, ...], classes: int = 3, vocab: int | None = None, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        if vocab is None:
            self.x = torch.randn(N, *shape, generator=gen)
        else:
            self.x = torch.randint(0, vocab, (N, *shape), generator=gen)
        self.y = torch.randint(0, classes, (N,), generator=gen)

    def train_examples(self):
        return [(self.x[i], self.y[i]) for i in range(N)]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")


def check(model: nn.Module, task: Task, tmp_path, layers=("*",), vectorize: bool = True) -> dict[str, float]:
    """Rows of project() and capture() against the dense projection of exact gradients; returns the errors."""
    torch.manual_seed(0)
    examples = task.train_examples()
    with GradientProjector(model, task, rank=10**6, init="orthonormal", layers=list(layers)) as projector:
        rows = projector.project(examples).double()
        spec, blocks = projector.spec, projector.layers
    assert all(s.dim == s.full_dim for s in spec.layers)
    canonical = per_example_canonical_grads(model, task, examples, blocks, vectorize=vectorize)
    exact = project_dense(spec, build_matrices(spec), canonical)
    assert float(exact.abs().max()) > 1e-4
    errors = {"project": relative_error(rows, exact)}
    store = tmp_path / f"{type(model).__name__}.zarr"
    logger = GradientLogger(
        model, task, store=store, rank=10**6, init="orthonormal", layers=list(layers), dtype="float32", progress=False
    )
    model.eval()
    losses = task.loss(model, task.collate(examples))
    with logger.capture("c", lr=1.0, ids=list(range(N)), reduction="sum", losses=losses):
        losses.sum().backward()
    logger.close()
    model.zero_grad()
    _, captured = GradientStore.open(store).read("c", ids=list(range(N)))
    errors["capture"] = relative_error(torch.from_numpy(captured).double(), exact)
    for block in spec.layers:  # every block, not only the largest
        errors[block.name] = relative_error(rows[:, block.slice], exact[:, block.slice])
    print(f"\n{type(model).__name__}: {[(s.name, s.kind) for s in spec.layers]} {errors}")
    assert max(errors.values()) < 1e-4, errors
    return errors


def kinds(model: nn.Module, layers=("*",)) -> list[str]:
    with GradientProjector(model, None, rank=2, layers=list(layers)) as projector:
        return [layer.kind for layer in projector.layers]


# -- convolutions -------------------------------------------------------------------------------------


class Convs1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(4, 6, 3, stride=2, padding=1)
        self.grouped = nn.Conv1d(6, 6, 4, padding="same", groups=3, bias=False, dilation=2)
        self.depthwise = nn.Conv1d(6, 6, 3, groups=6, padding=2, padding_mode="reflect")
        self.up = nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.depthwise(self.grouped(h)))
        return self.head(torch.tanh(self.up(h)).mean(-1))


class Convs2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, (3, 2), groups=2, padding="same", padding_mode="circular")
        self.up = nn.ConvTranspose2d(6, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
        self.norm = nn.InstanceNorm2d(3, affine=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.norm(self.up(torch.tanh(self.grouped(x))))
        return self.head(torch.tanh(h).mean((-1, -2)))


class Convs3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(2, 4, 3, stride=(1, 2, 1), padding=1, padding_mode="replicate")
        self.depthwise = nn.Conv3d(4, 4, 2, groups=4, dilation=(1, 1, 2))
        self.up = nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.depthwise(torch.tanh(self.a(x))))
        return self.head(torch.tanh(self.up(h)).mean((-1, -2, -3)))


def test_conv1d_grouped_depthwise_padding_modes_and_transposed(tmp_path):
    model = Convs1d()
    assert kinds(model) == ["conv", "conv", "conv", "conv_transpose", "bias", "linear"]
    check(model, Inputs((4, 9)), tmp_path)


def test_conv2d_grouped_circular_transposed_dilated_and_instance_norm(tmp_path):
    model = Convs2d()
    assert kinds(model) == ["conv2d", "conv_transpose", "norm", "linear"]
    check(model, Inputs((4, 6, 5)), tmp_path)


def test_conv3d_depthwise_and_transposed(tmp_path):
    check(Convs3d(), Inputs((2, 4, 5, 4)), tmp_path)


def test_conv_transpose_with_output_size(tmp_path):
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(3, 2, 3, stride=3)
            self.head = nn.Linear(2, 3)

        def forward(self, x):
            return self.head(self.up(x, output_size=[x.shape[-1] * 3 + 2]).mean(-1))

    check(Up(), Inputs((3, 4)), tmp_path)


# -- embedding bags, frozen weights ------------------------------------------------------------------


class Bags(nn.Module):
    def __init__(self, mode: str, padding_idx: int | None = None):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 4, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.bag(ids))


class WeightedBags(nn.Module):
    """1-D indices with offsets (one bag per example) and per-sample weights."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 4, mode="sum", include_last_offset=True)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        lengths = ids[:, 0] % 3 + 1  # ragged bags: an example keeps its first 1 to 3 ids
        flat = torch.cat([row[:n] for row, n in zip(ids, lengths.tolist())])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        weights = 0.5 + flat.to(self.bag.weight.dtype) / 11
        return self.head(self.bag(flat, offsets, per_sample_weights=weights))


@pytest.mark.parametrize("model", [Bags("sum"), Bags("mean", padding_idx=0), WeightedBags()], ids=str)
def test_embedding_bag(tmp_path, model):
    assert kinds(model)[0] == "embedding_bag"
    check(model, Inputs((4,), vocab=11), tmp_path, vectorize=False)


def test_embedding_bag_max_and_rnns_are_refused_by_name_and_skipped_by_globs():
    with pytest.raises(UnsupportedLayerError, match=r"'bag'.*mode='max'"):
        GradientProjector(Bags("max"), None)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    assert kinds(Recurrent()) == ["linear"]  # "*": the LSTM is left out (not covered)
    with pytest.raises(UnsupportedLayerError, match=r"'rnn' \(LSTM\).*recurrent"):
        GradientProjector(Recurrent(), None, layers=["rnn", "head"])


def test_frozen_weights_with_trainable_biases_are_bias_blocks(tmp_path):
    model = nn.Sequential(nn.Conv1d(3, 4, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    model[0].weight.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    assert kinds(model) == ["bias", "bias"]
    check(model, Inputs((3, 4)), tmp_path)


# -- subclasses overriding forward -------------------------------------------------------------------


class ScaledEmbedding(nn.Embedding):
    """Gemma / BART ``scale_embedding``: ``super().forward(ids) * scale``."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class OffsetPositions(nn.Embedding):
    """OPT / BART learned positions: indices made from the attention mask, shifted by an offset of 2."""

    def __init__(self, n: int, d: int):
        super().__init__(n + 2, d)

    def forward(self, mask):
        positions = (torch.cumsum(mask, dim=1) * mask - 1).long()
        return super().forward(positions + 2)


class SliceTable(nn.Embedding):
    """Whisper's decoder positions: ``self.weight[:T]``, no F.embedding at all."""

    def forward(self, ids):
        return self.weight[: ids.shape[1]]


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 0.5 * F.linear(x * 2.0, self.weight, self.bias) + 1.0


class Text(nn.Module):
    def __init__(self, positions: nn.Module | None = None, tied: bool = True):
        super().__init__()
        self.tok = ScaledEmbedding(11, 6, padding_idx=0)
        self.pos = positions if positions is not None else OffsetPositions(7, 6)
        self.mix = ScaledLinear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        mask = (ids != 0).long()
        pos = self.pos(mask) if isinstance(self.pos, OffsetPositions) else self.pos(ids)
        h = torch.tanh(self.mix(self.tok(ids) + pos))
        return self.head(h).mean(1)


def test_embedding_and_linear_subclasses_are_hooked_on_their_functional_op(tmp_path):
    task = Inputs((5,), classes=11, vocab=11)
    task.x[:, -2:] = 0  # padding: OPT's positions come from the mask
    model = Text()
    assert kinds(model) == ["embedding", "embedding", "linear"]
    check(model, task, tmp_path, vectorize=False)


def test_a_subclass_without_the_functional_op_is_refused():
    task = Inputs((5,), classes=11, vocab=11)
    model = Text(positions=SliceTable(7, 6), tied=False)
    with GradientProjector(model, task, layers=["tok", "pos", "mix"]) as projector:
        with pytest.raises(UnsupportedLayerError, match=r"'pos' \(SliceTable\) overrides forward.*__getitem__"):
            projector.project(task.train_examples())


# -- bare parameters ---------------------------------------------------------------------------------


class TinyViT(nn.Module):
    """ViT embeddings: cls token (expand + cat), a position table (sliced, added), a layer scale, a logit scale."""

    def __init__(self, d: int = 6, patches: int = 4):
        super().__init__()
        self.patch = nn.Linear(5, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.position = nn.Parameter(torch.randn(1, patches + 3, d) * 0.1)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.logit_scale = nn.Parameter(torch.tensor(0.3))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.patch(x)
        cls = self.cls_token.expand(h.shape[0], -1, -1)
        h = torch.cat([cls, h], dim=1)
        h = h + self.position[:, : h.shape[1]]
        h = torch.tanh(h) * self.gamma
        return self.head(h[:, 0] - h[:, 1:].mean(1)) * self.logit_scale.exp()


def test_bare_parameters_are_logged_where_they_meet_the_batch(tmp_path):
    model = TinyViT()
    assert kinds(model) == ["linear", "linear", "parameter", "parameter", "parameter", "parameter"]
    errors = check(model, Inputs((4, 5)), tmp_path)
    assert {"cls_token", "position", "gamma", "logit_scale"} <= set(errors)


def test_bare_parameters_in_other_ops_are_refused_by_name():
    class Experts(nn.Module):  # a fused [E, d_out, d_in] expert weight, used through bmm with the routing
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(4, 2)
            self.experts = nn.Parameter(torch.randn(2, 3, 4))

        def forward(self, x):
            chosen = self.router(x).argmax(-1)
            return torch.bmm(self.experts[chosen], x.unsqueeze(-1)).squeeze(-1)

    task = Inputs((4,))
    with GradientProjector(Experts(), task) as projector:
        with pytest.raises(UnsupportedLayerError, match=r"parameter 'experts' \(Experts\) is used by bmm.*'!experts'"):
            projector.project(task.train_examples())
    with GradientProjector(Experts(), task, layers=["*", "!experts"]) as projector:
        assert [layer.kind for layer in projector.layers] == ["linear"]
