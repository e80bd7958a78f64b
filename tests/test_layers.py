"""Every supported layer type, the Adam correction and PCA init against dense references."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import GradientLogger, Task
from gradstore.logger.adam_fold import split_factors
from gradstore.projection import build_matrices, fold_denominator, rank1_denominator
from gradstore.projection.reference import project_dense
from gradstore.store import GradientStore

from .helpers.models import MLPTask, per_example_canonical_grads, relative_error, sgd_steps


class Conv1D(nn.Module):
    """Same semantics as transformers' GPT-2 ``Conv1D`` (``y = x @ W + b``, ``W: [nx, nf]``)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class ZooNet(nn.Module):
    """Conv2d (stride, padding, no bias), Embedding with padding_idx, HF-style Conv1D and Linear in one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, kernel_size=3, stride=2, padding=1)
        self.conv_same = nn.Conv2d(4, 3, kernel_size=3, padding="same", bias=False)
        self.emb = nn.Embedding(7, 5, padding_idx=0)
        self.mix = Conv1D(6, 5)
        self.head = nn.Linear(3 * 4 * 4 + 6, 3)

    def forward(self, image, tokens):
        h = self.conv_same(torch.tanh(self.conv(image))).flatten(1)
        t = torch.tanh(self.mix(self.emb(tokens))).sum(1)
        return self.head(torch.cat([h, t], dim=1))


class ZooTask(Task):
    def __init__(self, n=12):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 2, 8, 8, generator=gen)
        self.tokens = torch.randint(0, 7, (n, 5), generator=gen)  # includes padding index 0
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def build_model(self):
        return ZooNet()

    def train_examples(self):
        return [(self.images[i], self.tokens[i], self.labels[i]) for i in range(len(self.labels))]

    def loss(self, model, batch):
        image, tokens, label = batch
        return F.cross_entropy(model(image, tokens), label, reduction="none")


def test_conv_embedding_conv1d_equal_dense_reference():
    task = ZooTask()
    torch.manual_seed(0)
    model = task.build_model()
    logger = GradientLogger(model, task, rank=(4, 3), seed=1, progress=False)
    assert [layer.kind for layer in logger.spec.layers] == ["conv2d", "conv2d", "embedding", "conv1d", "linear"]
    canonical = per_example_canonical_grads(model, task, task.train_examples(), logger.layers)
    dense = project_dense(logger.spec, build_matrices(logger.spec), canonical)
    assert relative_error(logger.project(task.train_examples()).double(), dense) < 1e-5


def test_rank1_denominator_is_exact_for_rank1_second_moments():
    gen = torch.Generator().manual_seed(0)
    r, c = torch.rand(5, generator=gen) + 0.5, torch.rand(4, generator=gen) + 0.5
    fr, fc = rank1_denominator(torch.outer(r, c) ** 2, eps=0.0)
    assert torch.allclose(torch.outer(fr, fc), torch.outer(r, c), rtol=1e-6)


def test_adam_correction_projects_grad_over_rank1_denominator(tmp_path):
    """Stored rows equal (P_out kron P_in) vec(G / (r c^T)), with r c^T fitted to Adam's sqrt(v_hat) + eps."""
    task = MLPTask(n=20)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        task.loss(model, task.collate(task.train_examples())).mean().backward()
        opt.step()
    logger = GradientLogger(model, task, store=tmp_path / "s.zarr", rank=5, dtype="float32", progress=False)
    logger.log_checkpoint("adam", lr=1e-2, optimizer_state=opt.state_dict())
    by_name = {name: opt.state[p]["exp_avg_sq"] for name, p in model.named_parameters()}
    logger.log_checkpoint("adam-by-name", lr=1e-2, optimizer_state={**by_name, "step": 3})
    store = GradientStore.open(tmp_path / "s.zarr")

    canonical = per_example_canonical_grads(model, task, task.train_examples(), logger.layers)
    factors = split_factors(logger.spec, store.adam_factors("adam"))
    corrected = {}
    for layer in logger.layers:
        v = layer.adapter.canonical(layer.module, by_name[f"{layer.name}.weight"], by_name[f"{layer.name}.bias"])
        r, c = rank1_denominator(v, step=3)
        assert torch.allclose(r, factors[layer.name][0]) and torch.allclose(c, factors[layer.name][1])
        corrected[layer.name] = canonical[layer.name] / torch.outer(r, c).double()
    expected = project_dense(logger.spec, build_matrices(logger.spec), corrected)
    for name in ("adam", "adam-by-name"):
        _, rows = store.read(name)
        assert relative_error(torch.from_numpy(rows).double(), expected) < 1e-5
    # and the folded matrices are the plain ones rescaled
    base = build_matrices(logger.spec)["0"]
    folded = fold_denominator(base, *factors["0"])
    assert torch.allclose(folded.p_out * factors["0"][0][None, :], base.p_out, rtol=1e-5)


def test_pca_init_full_rank_is_exact_and_reused_from_store(tmp_path):
    task = MLPTask(n=40)
    torch.manual_seed(0)
    model = task.build_model()
    sgd_steps(model, task, steps=3, lr=0.2)
    store = tmp_path / "s.zarr"
    logger = GradientLogger(model, task, store=store, rank=10**6, init="pca", dtype="float32", progress=False)
    matrices = build_matrices(logger.spec)
    for m in matrices.values():  # orthonormal rows
        for p in (m.p_in, m.p_out):
            assert torch.allclose(p @ p.T, torch.eye(p.shape[0]), atol=1e-5)
    logger.log_checkpoint("c", lr=1.0)
    _, rows = GradientStore.open(tmp_path / "s.zarr").read("c")
    names = [layer.name for layer in logger.layers]
    canonical = per_example_canonical_grads(model, task, task.train_examples(), logger.layers)
    full = torch.cat([canonical[n].flatten(1) for n in names], 1)
    gram = torch.from_numpy(rows).double() @ torch.from_numpy(rows).double().T
    assert relative_error(gram, full @ full.T) < 1e-4
    logger.close()
    # a second logger on the same store reuses the stored bases even after the weights moved
    sgd_steps(model, task, steps=3, lr=0.2, seed=5)
    again = GradientLogger(model, task, store=store, rank=10**6, init="pca", dtype="float32", progress=False)
    assert again.spec.same_projection(logger.spec)


def test_pca_low_rank_captures_top_directions():
    """At k < d the PCA input basis spans the top eigenvectors of E[x~ x~^T]."""
    task = MLPTask(n=200, dim=10, hidden=16)
    torch.manual_seed(0)
    model = task.build_model()
    logger = GradientLogger(model, task, rank=3, init="pca", progress=False)
    x = torch.cat([task.x, torch.ones(len(task.x), 1)], dim=1).double()
    _, evecs = torch.linalg.eigh(x.T @ x)
    top = evecs[:, -3:]
    p_in = torch.from_numpy(np.asarray(logger.spec.pca_bases["0"][0])).double()
    # the rows span the same subspace: all principal angles are zero
    assert torch.allclose(torch.linalg.svdvals(p_in @ top), torch.ones(3, dtype=torch.float64), atol=1e-4)
