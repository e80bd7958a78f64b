"""The first-batch exactness check catches models the hooks misread, without knowing about them."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import ExactnessError, GradientLogger, GradientProjector, UnsupportedLayerError
from gradstore.logger.verify import FLOAT32_TOLERANCE
from gradstore.store import GradientStore

from .helpers.models import LMTask, MLPTask, flat_full_gradients, per_example_canonical_grads, relative_error


class _SequenceFirst(nn.Module):
    """``[T, B, d]`` through a Linear: the hooks take dim 0 (T) for the batch; with T == B no shape tells."""

    def __init__(self, d: int = 6, classes: int = 3):
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, d]
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # [T, B, d]
        return self.head(h.mean(dim=0))


class _SeqTask(MLPTask):
    """Examples of T = 4 positions; batches of 4 make T == B."""

    def __init__(self, n: int = 8):
        super().__init__(n=n, dim=6)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, 6, generator=g)

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return _SequenceFirst()

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")


class _TiedHead(nn.Module):
    """An LM whose head is written ``h @ emb.weight.T``: a use of the embedding outside any hooked module."""

    def __init__(self, vocab: int = 13, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.mix(self.emb(ids))) @ self.emb.weight.T


class _TiedTask(LMTask):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return _TiedHead()


class _ScaledEmbedding(nn.Embedding):
    """Gemma-style: an Embedding subclass whose forward scales the lookup."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight * 1.0) * self.embedding_dim**0.5


class _ScaledLM(nn.Module):
    def __init__(self, vocab: int = 13, d: int = 8):
        super().__init__()
        self.emb = _ScaledEmbedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


class _ScaledTask(LMTask):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return _ScaledLM()


def _exact_or_refused(task, examples, **kwargs) -> str:
    """``"exact"`` when project() matches torch.func, ``"refused"`` on a gradstore error naming a layer."""
    model = task.build_model()
    try:
        with GradientProjector(model, task, rank=10**6, init="orthonormal", **kwargs) as projector:
            rows = projector.project(examples)
            names = [layer.name for layer in projector.layers]
            layers = projector.layers
    except UnsupportedLayerError as exc:
        assert "layer" in str(exc) or "parameter" in str(exc)
        return "refused"
    exact = flat_full_gradients(per_example_canonical_grads(model, task, examples, layers), names)
    rows = rows.double()  # an orthonormal full-rank projection keeps inner products
    assert relative_error(rows @ rows.T, exact @ exact.T) < 1e-4, "silently wrong"
    return "exact"


def test_sequence_first_linear_with_t_equal_b_is_refused_naming_the_layer():
    task = _SeqTask()
    with GradientProjector(task.build_model(), task, rank=4) as projector:
        with pytest.raises(ExactnessError, match="'inner'") as caught:
            projector.project(task.train_examples()[:4])  # B = 4 = T
    assert caught.value.layer == "inner" and caught.value.relative_error > 0.05
    assert caught.value.tolerance == FLOAT32_TOLERANCE


def test_tied_head_through_weight_transpose_is_caught():
    task = _TiedTask(n=6)
    with GradientProjector(task.build_model(), task, rank=4) as projector:
        with pytest.raises(ExactnessError, match="'emb'"):
            projector.project(task.train_examples()[:3])


def test_scaled_embedding_subclass_is_exact_or_refused():
    task = _ScaledTask(n=6)
    assert _exact_or_refused(task, task.train_examples()[:4]) in ("exact", "refused")


def test_exact_models_pass_and_record_the_check_in_the_store(tmp_path):
    task = LMTask(n=12)
    model = task.build_model()
    with GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, progress=False) as logger:
        logger.log_checkpoint("c0", lr=0.1, batch_size=5)
        assert logger.verification is not None and logger.verification.mode == "per-example"
        assert logger.verification.max_error < 1e-5
    checks = GradientStore.open(tmp_path / "s.zarr").checks()
    recorded = checks["verification"]["c0"]
    assert recorded["passed"] and recorded["mode"] == "per-example" and recorded["examples"] == 3
    assert recorded["tolerance"] == FLOAT32_TOLERANCE and set(recorded["errors"]) == {
        layer.name for layer in logger.layers
    }
    assert checks["coverage"]["fraction"] == 1.0 and checks["coverage"]["skipped"] == []


def test_verify_false_warns_and_records_off(tmp_path):
    task = _SeqTask()
    with pytest.warns(UserWarning, match="verify=False"):
        logger = GradientLogger(
            task.build_model(), task, store=tmp_path / "s.zarr", rank=4, progress=False, verify=False
        )
    with logger:
        logger.log_checkpoint("c0", lr=0.1, batch_size=4)  # silently wrong rows: the user asked for no check
    recorded = GradientStore.open(tmp_path / "s.zarr").checks()["verification"]
    assert recorded["c0"]["mode"] == "off" and not recorded["c0"]["passed"]


def _train_step(model, task, batch_ids, logger=None, losses_to_check=True):
    examples = task.train_examples()
    batch = task.collate([examples[i] for i in batch_ids])
    losses = task.loss(model, batch)
    if logger is None:
        losses.mean().backward()
        return
    with logger.capture("c0", lr=0.1, ids=batch_ids, losses=losses if losses_to_check else None):
        losses.mean().backward()


def test_capture_per_example_check_catches_what_the_sum_check_cannot(tmp_path):
    task = _SeqTask()
    # batch-sum: the sum over the batch of the sequence-first rows is right, so it passes
    model = task.build_model()
    with GradientLogger(model, task, store=tmp_path / "a.zarr", rank=4, progress=False) as logger:
        _train_step(model, task, [0, 1, 2, 3], logger, losses_to_check=False)
        assert logger.capture_verification is not None and logger.capture_verification.mode == "batch-sum"
    # per-example: the rows are not each example's own gradient
    model = task.build_model()
    with GradientLogger(model, task, store=tmp_path / "b.zarr", rank=4, progress=False) as logger:
        with pytest.raises(ExactnessError, match="'inner'"):
            _train_step(model, task, [0, 1, 2, 3], logger)


def test_capture_check_leaves_gradients_untouched(tmp_path):
    task = LMTask(n=12)
    torch.manual_seed(0)
    plain = task.build_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with GradientLogger(plain, task, store=tmp_path / "off.zarr", rank=4, progress=False, verify=False) as logger:
            _train_step(plain, task, [0, 1, 2, 3, 4], logger)
    torch.manual_seed(0)
    model = task.build_model()
    with GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, progress=False) as logger:
        _train_step(model, task, [0, 1, 2, 3, 4], logger)
        assert logger.capture_verification is not None and logger.capture_verification.mode == "per-example"
        assert logger.capture_verification.max_error < 1e-5
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad), name
    recorded = GradientStore.open(tmp_path / "s.zarr").checks()["verification"]["c0"]
    assert recorded["mode"] == "per-example" and recorded["path"] == "capture()"


def test_capture_batch_sum_check_catches_a_missed_use(tmp_path):
    task = _TiedTask(n=8)
    model = task.build_model()
    with GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, progress=False) as logger:
        with pytest.raises(ExactnessError, match="'emb'"):
            _train_step(model, task, [0, 1, 2], logger, losses_to_check=False)


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


class _BatchNormTask(MLPTask):
    def build_model(self):
        torch.manual_seed(0)
        return _BatchNormNet()


def test_batchnorm_in_training_mode_couples_the_batch_and_is_refused(tmp_path):
    task = _BatchNormTask(n=16)
    # only the Linear layers are logged, but BatchNorm mixes their examples' gradients
    for losses_to_check, error in ((False, UnsupportedLayerError), (True, ExactnessError)):
        model = task.build_model().train()
        store = tmp_path / f"{losses_to_check}.zarr"
        with GradientLogger(model, task, store=store, layers=["fc", "out"], rank=4, progress=False) as logger:
            with pytest.raises(error, match="BatchNorm|'fc'|'out'"):
                _train_step(model, task, [0, 1, 2, 3], logger, losses_to_check)
    # in eval mode (offline pass) BatchNorm uses running statistics: exact
    assert _exact_or_refused(task, task.train_examples()[:5], layers=["fc", "out"]) == "exact"


def test_a_second_logger_on_one_model_is_refused_and_outputs_do_not_change():
    task = LMTask(n=6)
    model = task.build_model()
    batch = task.collate(task.train_examples()[:3])
    before = task.loss(model, batch)
    with GradientProjector(model, task, rank=4):
        with pytest.raises(UnsupportedLayerError, match="already has a gradstore"):
            GradientProjector(model, task, rank=4)
        assert torch.equal(task.loss(model, batch), before)
    with GradientProjector(model, task, rank=4):  # the first one closed: a new one attaches
        pass


class _WithBareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 3)
        self.temperature = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.fc(x) * self.temperature


class _BareTask(MLPTask):
    def build_model(self):
        torch.manual_seed(0)
        return _WithBareParameter()


def test_coverage_reports_what_star_does_not_log():
    task = _BareTask()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        projector = GradientProjector(task.build_model(), task, rank=4, layers=["*"])
    with projector:
        coverage = projector.coverage
        if coverage.skipped:  # bare parameters not logged: the user is told which
            assert coverage.skipped == ["temperature"] and coverage.fraction == pytest.approx(33 / 34)
            assert any("temperature" in str(w.message) for w in caught)
        else:
            assert coverage.fraction == 1.0
        rows = projector.project(task.train_examples()[:3])  # exact on what it logs (the check passed)
        assert projector.verification is not None and rows.shape[0] == 3
