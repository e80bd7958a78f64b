"""The embedded demo: an MLP on scikit-learn's bundled 8x8 digits (no download), logged during training.

``prepare_demo(workdir)`` trains for a few epochs with a decaying lr, logging every training example's
projected gradient with ``GradientLogger.capture()`` (one checkpoint per epoch), saves the weights each
epoch starts from (the ones its queries use; the store records their sha256), writes ``run.toml`` and builds
the index. 3% of the training labels are flipped on purpose, so the self-influence view has something to find.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradstore.logger import GradientLogger, Task
from gradstore.projection import GradstoreError
from gradstore.server.run import open_index
from gradstore.server.run.config import RunConfig
from gradstore.store import GradientIndex, GradientStore

DEMO_PORT = 8000  # the demos' first choice; the next free one when it is taken (PORT_TRIES of them)
PORT_TRIES = 20
N_TRAIN = 1500
FLIP_FRACTION = 0.03
EPOCH_LRS = (0.2, 0.1, 0.05, 0.025)
DEMO_SEED = 0


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(DEMO_SEED).permutation(len(digits.target))
    return digits.data[order].astype(np.float32), digits.target[order].astype(np.int64)


class DigitsTask(Task):
    """8x8 digits classification. An example is ``(features, label, train_index or None)``.

    Query payloads: ``{"test_index": i}`` (a held-out digit) or ``{"pixels": [64 values 0..16], "label": y}``.
    """

    def __init__(self, n_train: int = N_TRAIN, flip_fraction: float = FLIP_FRACTION, hidden: int = 64):
        pixels, labels = _digits()
        self.pixels, self.true_labels = pixels, labels
        self.n_train, self.hidden = n_train, hidden
        rng = np.random.default_rng(DEMO_SEED + 1)
        self.labels = labels.copy()
        flipped = rng.choice(n_train, size=int(flip_fraction * n_train), replace=False)
        self.labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
        self.flipped = {int(i) for i in flipped}

    @staticmethod
    def features(pixels: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(pixels, dtype=torch.float32) / 8.0 - 1.0

    def build_model(self) -> nn.Module:
        torch.manual_seed(DEMO_SEED)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def train_examples(self) -> list[tuple]:
        return [(self.features(self.pixels[i]), int(self.labels[i]), i) for i in range(self.n_train)]

    def test_examples(self) -> list[tuple]:
        return [
            (self.features(self.pixels[i]), int(self.labels[i]), None) for i in range(self.n_train, len(self.labels))
        ]

    def collate(self, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([e[0] for e in examples]), torch.tensor([e[1] for e in examples])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Negative margin of the labelled class (a common alternative to the loss for classifiers)."""
        x, y = batch
        logits = model(x)
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.masked_fill(F.one_hot(y, 10).bool(), float("-inf")).max(1).values
        return other - true

    def train(self, examples: Sequence, seed: int) -> nn.Module:
        """Retrain from scratch on ``examples`` as :func:`prepare_demo` trains (same init, lrs, batch size); ``seed``
        draws the order of each epoch (``gradstore evaluate`` retrains subsets with it)."""
        model = self.build_model()
        x, y = self.collate(list(examples))
        optimizer = torch.optim.SGD(model.parameters(), lr=EPOCH_LRS[0], momentum=0.0)
        generator = torch.Generator().manual_seed(seed)
        for lr in EPOCH_LRS:
            for group in optimizer.param_groups:
                group["lr"] = lr
            for batch in torch.randperm(len(x), generator=generator).split(32):
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        return model

    def correct(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Is the predicted digit (argmax) the example's label?"""
        x, y = batch
        return model(x).argmax(1) == y

    def query_example(self, payload: dict) -> tuple:
        if "test_index" in payload:
            index, n_test = payload["test_index"], len(self.labels) - self.n_train
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_test:
                raise ValueError(f"test_index must be an integer in [0, {n_test}), got {index!r}")
            return self.features(self.pixels[self.n_train + index]), int(self.labels[self.n_train + index]), None
        if "pixels" in payload:
            pixels, label = payload["pixels"], payload.get("label")
            if (
                not isinstance(pixels, list)
                or len(pixels) != 64
                or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 16 for p in pixels)
            ):
                raise ValueError("pixels must be a list of 64 numbers in 0..16 (8x8 image, row-major)")
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
                raise ValueError(f"label must be an integer digit 0..9 (the class whose loss is traced), got {label!r}")
            return self.features(np.asarray(pixels, dtype=np.float32)), label, None
        raise ValueError('payload needs "test_index", or "pixels" and "label"')

    def describe(self, example: tuple) -> dict:
        x, label, index = example
        out = {"label": int(label), "pixels": ((x + 1.0) * 8.0).round().clamp(0, 16).to(torch.int64).tolist()}
        if index is not None:
            out.update(true_label=int(self.true_labels[index]), flipped=index in self.flipped)
        return out


RUN_TOML = """# gradstore demo run (written by `gradstore demo`)
[task]
object = "gradstore.demos.digits:DigitsTask"
args = {{}}

[projection]
rank = [{rank}, {rank}]
init = "gaussian"
seed = 0
layers = ["*"]

[store]
path = "demo.zarr"
dtype = "float16"
chunk_rows = 256

{checkpoints}
[index]
kind = "flat"
preconditioner = "identity"
normalize = false

[server]
host = "127.0.0.1"
port = 8000
"""


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (bound as uvicorn binds: with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def demo_port(host: str, port: int | None) -> int:
    """The port a demo will serve on, chosen before it trains (minutes) so that it never ends on uvicorn's
    ``address already in use``: ``port`` when given (refused at once, saying how to choose another, when taken),
    else :data:`DEMO_PORT` or the next free port after it (said when it is not :data:`DEMO_PORT`)."""
    if port is not None:
        if not port_is_free(host, port):
            raise GradstoreError(
                f"port {port} on {host} is in use (another gradstore demo or server?): stop it, or choose another "
                f"port with --port, e.g. `gradstore demo --port {port + 1}`"
            )
        return port
    for candidate in range(DEMO_PORT, DEMO_PORT + PORT_TRIES):
        if port_is_free(host, candidate):
            if candidate != DEMO_PORT:
                print(
                    f"gradstore demo: port {DEMO_PORT} on {host} is in use (another demo or server?); "
                    f"serving on {candidate} instead (choose one with --port)",
                    flush=True,
                )
            return candidate
    raise GradstoreError(
        f"ports {DEMO_PORT}-{DEMO_PORT + PORT_TRIES - 1} on {host} are all in use: choose a free one with --port"
    )


def prepare_demo(workdir: str | Path, rank: int = 16, batch_size: int = 32, progress: bool = True) -> Path:
    """Train, log, save checkpoints, write ``run.toml`` and build the index; returns the config path.

    Idempotent: a finished demo directory is reused as is.
    """
    workdir = Path(workdir)
    config_path = workdir / "run.toml"
    done = workdir / "DONE"
    if done.exists():
        return config_path
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("demo.zarr", "demo.index"):
        if (workdir / stale).exists():
            shutil.rmtree(workdir / stale)
    task = DigitsTask()
    model = task.build_model()
    logger = GradientLogger(
        model, task, store=workdir / "demo.zarr", rank=rank, init="gaussian", seed=0, chunk_rows=256, progress=False
    )
    examples = task.train_examples()
    optimizer = torch.optim.SGD(model.parameters(), lr=EPOCH_LRS[0], momentum=0.0)
    generator = torch.Generator().manual_seed(DEMO_SEED)
    entries = []
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    for epoch, lr in enumerate(EPOCH_LRS):
        end_step = (epoch + 1) * steps_per_epoch  # the optimizer step this epoch's segment ends at (SOURCE's K)
        name = f"epoch-{epoch}"
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Queries use the weights this epoch *started* from: capture took each example's gradient at its own
        # step's weights, and those are closest to where most of the ideal TracIn score accrues (measured in
        # tests/test_capture_approximation.py: Pearson 0.97 with ideal TracIn, vs 0.58 with end-of-epoch weights).
        torch.save(model.state_dict(), workdir / f"{name}.pt")
        order = torch.randperm(len(examples), generator=generator)
        for batch_ids in tqdm(order.split(batch_size), desc=f"demo training {name}", disable=not progress):
            x, y = task.collate([examples[int(i)] for i in batch_ids])
            losses = F.cross_entropy(model(x), y, reduction="none")
            optimizer.zero_grad()
            weights_path = workdir / f"{name}.pt"
            with logger.capture(
                checkpoint=name, lr=lr, ids=batch_ids, step=end_step, weights_path=weights_path, losses=losses
            ):
                losses.mean().backward()
            optimizer.step()
        entries.append(f'[[checkpoints]]\nname = "{name}"\npath = "{name}.pt"\nlr = {lr}\nstep = {end_step}\n')
    logger.close()
    config_path.write_text(RUN_TOML.format(rank=rank, checkpoints="\n".join(entries)))
    config = RunConfig.load(config_path)
    GradientIndex.build(GradientStore.open(config.store.path), config.index, path=config.index_path, progress=progress)
    open_index(config)  # proves the index matches the config
    test = task.test_examples()
    with torch.no_grad():
        x = torch.stack([e[0] for e in test])
        accuracy = float((model(x).argmax(1) == torch.tensor([e[1] for e in test])).float().mean())
    done.write_text(json.dumps({"test_accuracy": accuracy}))
    return config_path
