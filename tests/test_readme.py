"""The README's snippets, run as a newcomer would run them.

The `MyTask` snippet becomes `mytask.py` (after a prelude defining what it leaves to the user: `load`, `MyNet`,
`encode`, `decode`, on a tiny generated text data set), the `run.toml` snippet becomes the run config, and the
Python snippets of "Log gradients from Python" and "Read the store" run in order in one namespace. Then the
README's commands index the run and answer a query. The SDK and in-process snippets run against the demo run.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from gradstore.server.cli import main as gradstore
from gradstore.store import GradientStore

README = Path(__file__).resolve().parents[1] / "README.md"

PRELUDE = '''
from pathlib import Path

import torch
from torch import nn

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
LENGTH = 24


def encode(text, vocab):
    """(character ids [LENGTH], label): label 1 when the text mentions "good"."""
    ids = [vocab[c] for c in text.lower() if c in vocab][:LENGTH]
    return torch.tensor(ids + [0] * (LENGTH - len(ids))), torch.tensor(int("good" in text))


def decode(example):
    return "".join(ALPHABET[i - 1] for i in example[0].tolist() if i > 0)


def load(data_dir):
    vocab = {c: i + 1 for i, c in enumerate(ALPHABET)}
    lines = (Path(data_dir) / "train.txt").read_text().splitlines()
    return [encode(line, vocab) for line in lines], vocab


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(ALPHABET) + 1, 8, padding_idx=0)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.embed(x).sum(1))

'''

WORDS = ["good", "bad", "day", "film", "plot", "very", "not", "fine", "dull", "story"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _block(language: str, containing: str) -> str:
    (block,) = [b for b in _blocks(language) if containing in b]
    return block


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder holding mytask.py, run.toml, data/ and ckpt/ as the README lays them out."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    lines = [" ".join(rng.choice(WORDS, size=3)) for _ in range(48)]
    (tmp_path / "data" / "train.txt").write_text("\n".join(lines))
    (tmp_path / "mytask.py").write_text(PRELUDE + _block("python", "class MyTask(Task)"))
    (tmp_path / "run.toml").write_text(_block("toml", "[task]"))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "runs").mkdir()
    yield tmp_path
    sys.modules.pop("mytask", None)


def _train_checkpoints(task) -> None:
    """ckpt/epoch5.pt (+ its AdamW state) and ckpt/epoch10.pt, as the run.toml snippet names them."""
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    examples = task.train_examples()
    for step in range(10):
        batch = task.collate(examples[(step * 8) % 48 : (step * 8) % 48 + 8])
        optimizer.zero_grad()
        task.loss(model, batch).mean().backward()
        optimizer.step()
        if step == 4:
            torch.save(model.state_dict(), "ckpt/epoch5.pt")
            torch.save(optimizer.state_dict(), "ckpt/epoch5.opt.pt")
    torch.save(model.state_dict(), "ckpt/epoch10.pt")


def test_readme_run_from_python_snippets_to_an_answer(workdir, capsys):
    from mytask import MyTask

    _train_checkpoints(MyTask("data"))
    namespace: dict = {"MyTask": MyTask, "torch": torch}
    exec(_block("python", "logger = GradientLogger("), namespace)
    exec(_block("python", 'logger.log_checkpoint(\n    name="epoch-5"'), namespace)

    # the training loop, with what it leaves to the user: a loader of (ids, batch), the schedule, the state
    task, model = namespace["task"], namespace["model"]
    examples = task.train_examples()
    order = torch.arange(len(examples))
    namespace.update(
        start_epoch=0,
        epochs=2,
        epoch_lr=0.01,
        save_every=2,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        loader=[(ids, task.collate([examples[int(i)] for i in ids])) for ids in order.split(8)],
        training_state=lambda: {"model": model.state_dict()},
    )
    exec(_block("python", "for epoch in range(start_epoch, epochs):"), namespace)
    assert Path("ckpt/epoch0.pt").exists() and Path("ckpt/state.pt").exists()

    exec(_block("python", 'store = GradientStore.open("runs/my.zarr")'), namespace)
    store = GradientStore.open("runs/my.zarr")
    assert store.checkpoints == ["epoch-5", "epoch-0", "epoch-1"]
    assert all(sorted(store.committed_ids(c).tolist()) == list(range(48)) for c in store.checkpoints)
    assert store.checkpoint_info("epoch-5").adam  # the Adam state was folded in

    # the README's commands on its run.toml: index (epoch-5 is resumed, not recomputed), info, query
    commands = [line.split("#")[0].split() for line in _block("bash", "gradstore index --config").splitlines()]
    for command in commands[:2]:
        assert command[0] == "gradstore"
        gradstore(command[1:])
    capsys.readouterr()
    gradstore(["query", "--config", "run.toml", "--query", '{"text": "a good film"}', "--top-k", "3", "--json"])
    answer = json.loads(capsys.readouterr().out)
    (result,) = answer["results"]
    assert answer["checkpoints"] == ["epoch-5", "epoch-10"] and len(result["proponents"]) == 3
    assert all(set(p["example"]) == {"text"} for p in result["proponents"])
    assert result["proponents"][0]["score"] >= result["proponents"][-1]["score"]


def test_readme_toml_mentions_only_keys_the_config_takes(workdir):
    """Every key the README's run.toml shows, set or commented out, is a field of its table's model."""
    import dataclasses

    from gradstore.server.run.config import (
        CheckpointConfig,
        LoggingConfig,
        ProjectionConfig,
        QueryConfig,
        RunConfig,
        ServerConfig,
        StoreConfig,
        TaskConfig,
    )
    from gradstore.store import IndexOptions

    fields = {
        "task": set(TaskConfig.model_fields),
        "projection": set(ProjectionConfig.model_fields),
        "store": set(StoreConfig.model_fields),
        "checkpoints": set(CheckpointConfig.model_fields),
        "index": {f.name for f in dataclasses.fields(IndexOptions)} | {"path"},
        "query": set(QueryConfig.model_fields),
        "server": set(ServerConfig.model_fields),
        "logging": set(LoggingConfig.model_fields),
    }
    config = RunConfig.load("run.toml")
    assert [c.name for c in config.checkpoints] == ["epoch-5", "epoch-10"]
    table, mentioned = None, 0
    for line in _block("toml", "[task]").splitlines():
        header = re.match(r"^\[+(\w+)\]+", line)
        if header:
            table = header.group(1)
            continue
        text = line[1:].strip() if line.startswith("#") else line
        keys = re.findall(r"(?:^|, )([a-z_]+) =", text.split(" # ")[0]) or (
            re.findall(r"([a-z_]+)(?:,|:)", text.split(":")[0] + ":") if re.match(r"^[a-z_]+, ", text) else []
        )
        for key in keys:
            assert key in fields[table], f"README's run.toml mentions [{table}] {key}, which the config does not take"
            mentioned += 1
    assert mentioned > 30


def test_readme_in_process_and_sdk_snippets(demo_config, monkeypatch):
    """The in-process snippet on the demo run, and the SDK snippet against that run served on loopback."""
    import socket

    import uvicorn

    from gradstore.server.http.app import create_app
    from gradstore.server.run.config import RunConfig

    monkeypatch.chdir(demo_config.parent)  # the snippet opens "run.toml"
    namespace: dict = {}
    exec(_block("python", "engine = Run.load("), namespace)
    assert namespace["engine"].influence([{"test_index": 3}], top_k=10).results[0].proponents

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(RunConfig.load(demo_config)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        snippet = _block("python", "with Client(").replace("http://127.0.0.1:8000", f"http://127.0.0.1:{port}")
        namespace = {}
        exec(snippet, namespace)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        assert namespace["answer"].results[0].proponents
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
