"""A run captured during training needs no repetition in run.toml: projection, checkpoints, lrs, steps and weights
come from the store (issue 18, part 3). The Trainer callback -> ``gradstore index`` -> query path, from a config
that names only the task and the store, or the task, the store and ``[hf] output``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers import Trainer, TrainingArguments  # noqa: E402

from gradstore.logger.hf import GradstoreTrainerCallback  # noqa: E402
from gradstore.server import cli  # noqa: E402
from gradstore.store import GradientStore  # noqa: E402

from .helpers.hf_run import DOCS, collate, tiny_gpt2  # noqa: E402

TASK = '[task]\nobject = "tests.helpers.hf_run:TinyGPT2Task"\n'


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A Trainer run (2 epochs, saves every 2 steps, Adam correction) logged by the callback into run.zarr."""
    run = tmp_path_factory.mktemp("zero-config")
    args = TrainingArguments(
        output_dir=str(run / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    callback = GradstoreTrainerCallback(store=run / "run.zarr", rank=(4, 6), dtype="float32", adam_correction=True)
    dataset = datasets.Dataset.from_dict({"input_ids": DOCS})
    with pytest.warns(UserWarning, match="no Adam state"):
        Trainer(tiny_gpt2(), args, train_dataset=dataset, data_collator=collate, callbacks=[callback]).train()
    return run


def _cli_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    cli.main(argv)
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("hf", [False, True], ids=["task-and-store", "hf-output"])
def test_captured_run_indexes_and_answers_from_a_config_naming_only_task_and_store(trained, capsys, hf):
    config = trained / f"run-{hf}.toml"
    hf_table = '[hf]\noutput = "out"\n' if hf else ""
    index = f'[index]\npath = "index-{hf}"\n'
    config.write_text(f'{TASK}[store]\npath = "run.zarr"\n{hf_table}{index}')
    store = GradientStore.open(trained / "run.zarr")
    cli.main(["index", "--config", str(config), "--quiet"])
    info = _cli_json(capsys, ["info", "--config", str(config), "--json"])
    expected = [(n, store.checkpoint_info(n).lr, store.checkpoint_info(n).step) for n in store.checkpoints]
    assert [(c["name"], c["lr"], c["step"]) for c in info["checkpoints"]] == expected
    assert info["index"]["status"] == "ready" and info["index"]["checkpoints"] == store.checkpoints
    assert info["projection"]["layers"][0]["k_in"] == 4 and info["dtype"] == "float32"  # the store's, not defaults
    answer = _cli_json(
        capsys, ["query", "--config", str(config), "--query", json.dumps({"input_ids": DOCS[3]}), "--json"]
    )
    proponents = answer["results"][0]["proponents"]
    assert proponents and all(set(p["contributions"]) == set(store.checkpoints) for p in proponents)


def test_no_checkpoints_and_no_store_says_where_it_looked(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(f'{TASK}[store]\npath = "nothing.zarr"\n')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["info", "--config", str(config)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "needs at least one [[checkpoints]] entry" in err and "nothing.zarr" in err


def test_safetensors_weights_load_with_their_tied_head(trained):
    """The callback saves weights with save_pretrained (GPT-2's tied head stored once): the default Task loads them."""
    from tests.helpers.hf_run import TinyGPT2Task

    store = GradientStore.open(trained / "run.zarr")
    weights = store.checkpoint_info(store.checkpoints[-1]).weights_path
    assert weights.endswith(".safetensors")
    model = tiny_gpt2()
    TinyGPT2Task().load_checkpoint(model, weights)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.transformer.wte.weight, tiny_gpt2().transformer.wte.weight)  # trained weights
