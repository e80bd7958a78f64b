"""A tiny MLP classification Task shared by the crash/resume, distributed and bad-input tests.

Examples are ``(x [6] float32, y int64, id int64)``; ids are the positions. Everything is generated
from fixed seeds so separate processes build bit-identical models and data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import Task

N_EXAMPLES = 200
DATA_SEED = 1234
MODEL_SEED = 0


def make_model(seed: int = MODEL_SEED) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_examples(n: int = N_EXAMPLES, seed: int = DATA_SEED) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = torch.randint(0, 3, (n,), generator=generator)
    return [(x[i], y[i], torch.tensor(i, dtype=torch.int64)) for i in range(n)]


class MLPTask(Task):
    """Per-example cross-entropy of the MLP; ``loss_calls`` counts calls to :meth:`loss`."""

    def __init__(self, n: int = N_EXAMPLES):
        self.examples = make_examples(n)
        self.loss_calls = 0

    def build_model(self) -> nn.Module:
        return make_model()

    def train_examples(self):
        return self.examples

    def example_id(self, example, index: int) -> int:
        return int(example[2])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        self.loss_calls += 1
        x, y, _ = batch
        return F.cross_entropy(model(x), y, reduction="none")
