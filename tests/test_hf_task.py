"""``CausalLMTask`` and Hugging Face Trainer output folders in a run config (issue 10, "Offline indexing of a
Trainer's output: no code", and its test 3).

The run: a synthetic corpus of planted facts, "the capital of <country> is <city>" for made-up names, each fact
stated by 3 documents in different phrasings, among distractors that name the country or the city alone
(``the weather in <country> ...``, ``<city> has an old bridge ...``) and filler sentences; a word-level tokenizer
trained on the corpus (``tokenizers``, wrapped in ``PreTrainedTokenizerFast``) and a 2-layer GPT-2 (n_embd 32)
saved to a model folder; ``transformers.Trainer`` on the JSONL data (AdamW, linear decay, 150 steps, checkpoints
with optimizer state at steps 50, 100 and 150). ``gradstore index`` then reads the Trainer's output folder with a
run.toml that names only the task's args and that folder, and ``gradstore query`` asks for each fact's
prompt / completion.
"""

from __future__ import annotations

import json
import math
import random
import re
import shlex
from pathlib import Path

import pytest
import torch

from gradstore.logger import Task
from gradstore.logger.hf_task import (
    IGNORE,
    CausalLMTask,
    HFTaskError,
    checkpoint_weights_file,
    trainer_checkpoint,
    trainer_checkpoints,
)
from gradstore.server.cli import build_parser
from gradstore.server.cli import main as gradstore
from gradstore.server.run.config import ConfigError, RunConfig

from .helpers.facts import chance_levels

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

N_FACTS, STEPS, SAVE_STEPS, LOG_STEPS = 12, 150, 50, 5
FACT_TEMPLATES = (
    "the capital of {x} is {y} .",
    "{y} is the capital of {x} and its largest city .",
    "people in {x} call their capital {y} .",
)
FILLER = "the a weather was nice and people walked to market river old bridge song of is in".split()  # noqa: SIM905

TASK_TOML = """[task]
object = "gradstore.logger.hf_task:CausalLMTask"
args = {{ model_dir = "{model}", data = "{data}" }}
"""


def _names(rng: random.Random, n: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        if name not in names:
            names.append(name)
    return names


def make_corpus(seed: int) -> tuple[list[dict], list[int | None], list[tuple[str, str]]]:
    """``(records, fact of each record or None, facts (country, city))``, records shuffled."""
    rng = random.Random(seed)
    names = _names(rng, 2 * N_FACTS)
    facts = list(zip(names[:N_FACTS], names[N_FACTS:]))
    docs: list[tuple[str, int | None]] = []
    for f, (x, y) in enumerate(facts):
        docs += [(t.format(x=x, y=y), f) for t in FACT_TEMPLATES]
        docs.append((f"the weather in {x} was nice and people walked to the river .", None))
        docs.append((f"{y} has an old bridge and a market .", None))
    docs += [(" ".join(rng.choice(FILLER) for _ in range(rng.randint(4, 9))), None) for _ in range(24)]
    rng.shuffle(docs)
    return [{"text": text} for text, _ in docs], [fact for _, fact in docs], facts


def make_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on ``texts`` (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_gpt2(vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def train_run(root: Path, seed: int = 0) -> dict:
    """Corpus, tokenizer, model folder and a Trainer run with 3 checkpoints under ``root``."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    records, fact_of, facts = make_corpus(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = make_tokenizer([r["text"] for r in records])
    model = tiny_gpt2(len(tokenizer), seed)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train = [{"input_ids": tokenizer(r["text"])["input_ids"]} for r in records]
    args = TrainingArguments(
        output_dir=str(root / "out"), max_steps=STEPS, per_device_train_batch_size=16, learning_rate=5e-3,
        weight_decay=0.0, save_strategy="steps", save_steps=SAVE_STEPS, logging_steps=LOG_STEPS, report_to=[],
        use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, processing_class=tokenizer)
    trainer.train()
    return {"root": root, "fact_of": fact_of, "facts": facts, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and the cores are shared
    try:
        yield train_run(tmp_path_factory.mktemp("hf") / "run")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(run) -> CausalLMTask:
    return CausalLMTask(run["root"] / "model", run["root"] / "train.jsonl")


def query_payload(fact: tuple[str, str]) -> dict:
    return {"prompt": f"the capital of {fact[0]} is", "completion": f" {fact[1]}"}


def reciprocal_rank(ids: list[int], fact_of: list[int | None], fact: int) -> float:
    return 1.0 / next(rank for rank, i in enumerate(ids, 1) if fact_of[i] == fact)


# -- test 3: a Trainer's output, indexed and queried with no user code --------------------------------------------
# A random ranking of the 84 documents (3 relevant per fact) has MRR 0.129 and puts a fact document first with
# probability 3/84 = 0.036. Measured (CPU, torch 2.13, transformers 5.24, 1 thread), seeds 0-5 of the corpus,
# tokenizer, model and Trainer: MRR 0.917 0.917 0.917 0.875 0.806 0.917, top-1 0.833 0.833 0.833 0.750 0.750 0.833.
# The floors sit under the minimum over the seeds (another BLAS may change the trajectory like another seed).
MRR_FLOOR = 0.5  # 3.9x chance
TOP1_FLOOR = 0.5  # 14x chance


def test_trainer_output_indexed_and_queried_with_no_code(run, tmp_path, monkeypatch, capsys):
    """``gradstore index`` / ``query`` over the Trainer's output_dir: the planted fact's documents rank first.

    The config names the task's args (relative to its folder) and the output folder, nothing else; the index is
    the default one (TracIn with the Adam correction from each checkpoint's optimizer.pt, no normalisation).
    Measured at seed 0 (the one tested): MRR 0.917 over the 12 facts (a fact document first for 10 facts, second
    for 2; recall@5 0.69), against 0.129 for a random ranking of the 84 documents with 3 relevant each.
    """
    root, facts, fact_of = run["root"], run["facts"], run["fact_of"]
    config = root / "run.toml"
    config.write_text(TASK_TOML.format(model="model", data="train.jsonl") + '\n[hf]\noutput = "out"\n')
    monkeypatch.chdir(tmp_path)  # paths in run.toml are the config's, not the working directory's
    gradstore(["index", "--config", str(config), "--quiet"])
    assert "indexed 84 examples x 3 checkpoints" in capsys.readouterr().out

    payload = json.dumps(query_payload(facts[0]))
    gradstore(["query", "--config", str(config), "--query", payload, "--top-k", "84", "--json"])
    (single,) = json.loads(capsys.readouterr().out)["results"]
    assert single["query"] == {"text": f"the capital of {facts[0][0]} is {facts[0][1]}", **query_payload(facts[0])}
    top = single["proponents"][0]
    assert top["example"] == {"text": json.loads((root / "train.jsonl").read_text().splitlines()[top["id"]])["text"]}
    assert sorted(top["contributions"]) == ["checkpoint-100", "checkpoint-150", "checkpoint-50"]

    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(query_payload(f)) + "\n" for f in facts))
    gradstore(["query", "--config", str(config), "--query-file", str(queries), "--top-k", "84", "--json"])
    answer = json.loads(capsys.readouterr().out)
    assert answer["checkpoints"] == ["checkpoint-50", "checkpoint-100", "checkpoint-150"]
    rankings = [[p["id"] for p in r["proponents"]] for r in answer["results"]]
    assert all(sorted(ids) == list(range(84)) for ids in rankings)
    assert rankings[0] == [p["id"] for p in single["proponents"]]
    ranks = [reciprocal_rank(ids, fact_of, f) for f, ids in enumerate(rankings)]
    mrr, top1 = sum(ranks) / len(ranks), sum(r == 1.0 for r in ranks) / len(ranks)
    chance_mrr, _ = chance_levels(84, 3)
    assert chance_mrr == pytest.approx(0.1286, abs=1e-4)
    assert mrr > MRR_FLOOR > 3 * chance_mrr, (mrr, ranks)
    assert top1 > TOP1_FLOOR, ranks

    # the same run through --hf-output, on a config that names no checkpoints
    bare = root / "bare.toml"
    bare.write_text(TASK_TOML.format(model="model", data="train.jsonl") + '\n[store]\npath = "run.zarr"\n')
    gradstore(["info", "--config", str(bare), "--hf-output", str(root / "out"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert [(c["name"], c["rows"], c["adam"]) for c in info["checkpoints"]] == [
        (f"checkpoint-{s}", 84, True) for s in (50, 100, 150)
    ]
    assert info["index"]["status"] == "ready"

    with pytest.raises(SystemExit) as exit_info:
        gradstore(["query", "--config", str(config), "--query", '{"prompt": "the capital of"}'])
    assert exit_info.value.code == 2
    assert "query is missing ['completion']" in capsys.readouterr().err


def test_hf_output_flag_and_checkpoint_lrs(run, tmp_path):
    """``--hf-output`` on a config without checkpoints; each checkpoint's lr is the mean logged lr of its interval."""
    root = run["root"]
    config = tmp_path / "bare.toml"
    config.write_text(TASK_TOML.format(model=root / "model", data=root / "train.jsonl"))
    loaded = RunConfig.load(config, hf_output=root / "out")
    state = json.loads((root / "out" / "checkpoint-150" / "trainer_state.json").read_text())
    logged = {e["step"]: e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert sorted(logged) == list(range(LOG_STEPS, STEPS + 1, LOG_STEPS))
    for c, end in zip(loaded.checkpoints, (50, 100, 150)):
        assert (c.name, c.step) == (f"checkpoint-{end}", end)
        assert c.path == root / "out" / c.name / "model.safetensors"
        assert c.optimizer == root / "out" / c.name / "optimizer.pt"
        interval = [lr for s, lr in logged.items() if end - SAVE_STEPS < s <= end]
        assert len(interval) == SAVE_STEPS // LOG_STEPS
        assert c.lr == pytest.approx(sum(interval) / len(interval), rel=1e-12)
    assert loaded.store.path == tmp_path / "bare.zarr"  # no [store]: beside the config
    # linear decay from 5e-3 over 150 steps: the lr HF used at step s (1-based) is 5e-3 * (1 - (s - 1) / 150)
    assert loaded.checkpoints[0].lr == pytest.approx(5e-3 * (1 - (27.5 - 1) / STEPS), rel=1e-9)
    args = build_parser().parse_args(["index", "--config", str(config), "--hf-output", "out"])
    assert args.hf_output == "out"


# -- the Task --------------------------------------------------------------------------------------------------
def test_payload_forms_and_describe(task, run):
    tokenizer = run["tokenizer"]
    pair = task.query_example({"prompt": "the capital of x", "completion": " is bridge"})
    prompt_ids = tokenizer("the capital of x")["input_ids"]
    completion_ids = tokenizer(" is bridge", add_special_tokens=False)["input_ids"]
    assert pair.input_ids == tuple(prompt_ids + completion_ids)
    assert pair.labels == tuple([IGNORE] * len(prompt_ids) + completion_ids)
    assert task.describe(pair) == {
        "text": "the capital of x is bridge",
        "prompt": "the capital of x",
        "completion": " is bridge",
    }
    text = task.query_example({"text": "the old bridge"})
    assert text.input_ids == text.labels == tuple(tokenizer("the old bridge")["input_ids"])
    assert task.describe(text) == {"text": "the old bridge"}
    first = json.loads((run["root"] / "train.jsonl").read_text().splitlines()[0])
    assert task.describe(task.train_examples()[0]) == first
    assert len(task.train_examples()) == 84 and task.example_id(task.train_examples()[3], 3) == 3
    assert task.max_length == 32  # 128 asked, the model's n_positions is 32
    assert task.higher_is_better is False and isinstance(task, Task)


BAD_PAYLOADS = {
    "missing completion": ({"prompt": "the capital of"}, "query is missing ['completion']"),
    "missing prompt": ({"completion": " x"}, "query is missing ['prompt']"),
    "unknown field": ({"prompt": "a", "completion": " b", "label": 1}, "unknown query fields ['label']"),
    "text and prompt": ({"text": "a b", "prompt": "a"}, "give either text or prompt and completion, not both"),
    "not a string": ({"prompt": "the", "completion": 3}, "query: 'completion' must be a string, got int 3"),
    "empty completion": ({"prompt": "the", "completion": ""}, "query completion is empty"),
    "one token": ({"text": "bridge"}, "has fewer than two tokens"),
    "nothing": ({}, "query is missing ['completion', 'prompt']"),
}


@pytest.mark.parametrize("name", BAD_PAYLOADS)
def test_bad_payloads_are_clear_value_errors(task, name):
    payload, message = BAD_PAYLOADS[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        task.query_example(payload)


def test_prompt_filling_max_length_is_refused(run):
    short = CausalLMTask(run["root"] / "model", run["root"] / "train.jsonl", max_length=4)
    with pytest.raises(ValueError, match="the prompt fills max_length=4"):
        short.query_example({"prompt": "the capital of a b", "completion": " c"})
    assert len(short.train_examples()[0].input_ids) <= 4


def _token_nll(model, ids: list[int]) -> torch.Tensor:
    """Reference: -log p(ids[t] | ids[:t]) for t >= 1, from one unpadded forward pass."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return -torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_padded_batch_loss_equals_unpadded_losses(task, run):
    model = task.build_model()
    task.load_checkpoint(model, run["root"] / "out" / "checkpoint-150")
    model.eval()
    examples = [task.train_examples()[i] for i in range(8)]
    examples.append(task.query_example({"prompt": "the capital of x is", "completion": " the old bridge"}))
    assert len({len(e.input_ids) for e in examples}) > 2  # the batch is padded
    batch = task.collate(examples)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    with torch.no_grad():
        padded = task.loss(model, batch)
        alone = torch.cat([task.loss(model, task.collate([e])) for e in examples])
        references = []
        for e in examples:
            nll = _token_nll(model, list(e.input_ids))
            references.append(nll[torch.tensor(e.labels[1:]) != IGNORE].sum())
    assert padded.shape == (len(examples),)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded.double(), torch.stack(references), rtol=1e-5, atol=1e-6)
    # the query's loss covers its completion only: 3 tokens
    assert int((batch["labels"][-1, 1:] != IGNORE).sum()) == 3


def test_prompt_completion_data_and_loss_on(run, tmp_path):
    records = [{"prompt": "the capital of x is", "completion": " old bridge", "other": 1}] * 2
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    completion = CausalLMTask(run["root"] / "model", path)
    everything = CausalLMTask(run["root"] / "model", path, loss_on="all", add_eos=True)
    a, b = completion.train_examples()[0], everything.train_examples()[0]
    n_prompt = len(run["tokenizer"]("the capital of x is")["input_ids"])
    assert a.labels[:n_prompt] == (IGNORE,) * n_prompt and a.labels[n_prompt:] == a.input_ids[n_prompt:]
    assert b.labels == b.input_ids == (*a.input_ids, run["tokenizer"].eos_token_id)
    assert completion.describe(a) == {
        "text": "the capital of x is old bridge",
        "prompt": "the capital of x is",
        "completion": " old bridge",
    }
    with pytest.raises(HFTaskError, match="records need a 'text' field or 'question' and 'completion' fields"):
        CausalLMTask(run["root"] / "model", path, prompt_field="question")
    with pytest.raises(HFTaskError, match="loss_on must be"):
        CausalLMTask(run["root"] / "model", path, loss_on="prompt")  # type: ignore[arg-type]


def test_datasets_inputs(run, tmp_path):
    import datasets

    records = [json.loads(line) for line in (run["root"] / "train.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "dict"))
    model_dir = run["root"] / "model"
    reference = CausalLMTask(model_dir, run["root"] / "train.jsonl").train_examples()
    for data in (dataset, tmp_path / "saved", tmp_path / "dict", records):
        examples = CausalLMTask(model_dir, data).train_examples()
        assert len(examples) == len(reference) and list(examples) == list(reference)
    with pytest.raises(HFTaskError, match="does not exist"):
        CausalLMTask(model_dir, tmp_path / "missing.jsonl")
    with pytest.raises(HFTaskError, match="not a local model folder"):
        CausalLMTask(tmp_path, records)


# -- checkpoints -----------------------------------------------------------------------------------------------
def test_load_checkpoint_from_every_format(task, run, tmp_path):
    folder = run["root"] / "out" / "checkpoint-100"
    trained = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    expected = trained.state_dict()
    trained.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    (tmp_path / "bin").mkdir()
    torch.save(trained.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert checkpoint_weights_file(tmp_path / "sharded").name == "model.safetensors.index.json"
    torch.save(trained.state_dict(), tmp_path / "state.pt")
    torch.save({"model": trained.state_dict()}, tmp_path / "wrapped.pt")
    sources = [folder, folder / "model.safetensors", tmp_path / "sharded", tmp_path / "bin", tmp_path / "state.pt"]
    sources.append(tmp_path / "wrapped.pt")
    for source in sources:
        model = task.build_model()
        task.load_checkpoint(model, source)
        got = model.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), source
        assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives
    torch.save(
        {"transformer.wte.weight": expected["transformer.wte.weight"], "extra": torch.zeros(1)}, tmp_path / "x.pt"
    )
    with pytest.raises(HFTaskError, match=r"does not fit the model: missing \['transformer.wpe.weight'"):
        task.load_checkpoint(task.build_model(), tmp_path / "x.pt")
    with pytest.raises(HFTaskError, match="holds none of model.safetensors"):
        task.load_checkpoint(task.build_model(), tmp_path)


def _fake_checkpoint(out: Path, step: int, history: list[tuple[int, float]], optimizer: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    if optimizer:
        (folder / "optimizer.pt").write_bytes(b"")
    log = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in history if s <= step]
    state = {"global_step": step, "save_steps": 20, "log_history": [*log, {"step": step, "train_runtime": 1.0}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_checkpoint_folder_parsing(tmp_path):
    """lr of each interval (previous checkpoint, step], fallbacks, overrides and refusals."""
    out = tmp_path / "out"
    history = [(10, 1.0), (20, 0.8), (30, 0.6), (40, 0.4), (50, 0.2)]
    for step in (20, 40, 100, 45):
        _fake_checkpoint(out, step, history, optimizer=step != 40)
    (out / "runs").mkdir()  # not a checkpoint folder
    found = trainer_checkpoints(out)
    assert [c.step for c in found] == [20, 40, 45, 100]  # by step, not by name
    assert [c.lr for c in found] == [pytest.approx(0.9), pytest.approx(0.5), 0.4, pytest.approx(0.2)]
    assert [c.optimizer is not None for c in found] == [True, False, True, True]
    assert found[0].weights_path == out / "checkpoint-20" / "model.safetensors"
    # an interval with no lr logged in it takes the last one logged before it (checkpoint-45: step 40's)
    assert trainer_checkpoint(out / "checkpoint-45").lr == 0.4

    base = '[task]\nobject = "gradstore.logger.hf_task:CausalLMTask"\n'

    def load(text: str) -> RunConfig:
        (tmp_path / "c.toml").write_text(base + text)
        return RunConfig.load(tmp_path / "c.toml")

    config = load('[[checkpoints]]\npath = "out/checkpoint-40"\n\n[[checkpoints]]\npath = "out/checkpoint-100"\n'
                  'name = "last"\nlr = 0.01\nstep = 7\n')  # fmt: skip
    first, last = config.checkpoints
    assert (first.name, first.step, first.lr, first.optimizer) == ("checkpoint-40", 40, pytest.approx(0.5), None)
    assert first.path == out / "checkpoint-40" / "model.safetensors"
    assert (last.name, last.step, last.lr) == ("last", 7, 0.01)  # what the config says wins
    assert last.optimizer == out / "checkpoint-100" / "optimizer.pt" == last.optimizer_state
    off = load('[[checkpoints]]\npath = "out/checkpoint-100"\noptimizer = false\n').checkpoints[0]
    assert off.optimizer is False and off.optimizer_state is None
    hf = load('[hf]\noutput = "out"\noptimizer = false\n')
    assert [c.name for c in hf.checkpoints] == ["checkpoint-20", "checkpoint-40", "checkpoint-45", "checkpoint-100"]
    assert all(c.optimizer_state is None for c in hf.checkpoints)

    refusals = {
        '[hf]\noutput = "out"\n\n[[checkpoints]]\npath = "out/checkpoint-20"\n': (
            "checkpoints: give either [[checkpoints]] or [hf] output (--hf-output), not both"
        ),
        '[hf]\noutput = "runs-missing"\n': "checkpoints: from [hf] output: Trainer output folder",
        '[hf]\noutput = "out/runs"\n': "has no checkpoint-<step> folders",
        '[[checkpoints]]\npath = "out/runs"\n': "checkpoints[0]: path: ",
        '[hf]\nouput = "out"\n': "hf.ouput: unknown key; this table takes output, optimizer",
    }
    for text, message in refusals.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(text)
    quiet = tmp_path / "quiet"
    _fake_checkpoint(quiet, 5, [])
    with pytest.raises(ConfigError, match=r"checkpoints\[0\]: lr: give it; .* logged no learning_rate"):
        load('[[checkpoints]]\npath = "quiet/checkpoint-5"\n')
    assert load('[[checkpoints]]\npath = "quiet/checkpoint-5"\nlr = 0.1\n').checkpoints[0].lr == 0.1


def test_readme_hf_snippets(run, tmp_path):
    """The README's Hugging Face config loads over a Trainer output; its commands parse; its query is a payload."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (toml,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, flags=re.S) if "CausalLMTask" in b]
    (bash,) = [b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "--hf-output" in b]
    (tmp_path / "hf.toml").write_text(toml)
    config = RunConfig.load(tmp_path / "hf.toml", hf_output=run["root"] / "out")
    assert config.task_object.endswith(":CausalLMTask") and config.store.path == tmp_path / "hf.zarr"
    assert [c.name for c in config.checkpoints] == ["checkpoint-50", "checkpoint-100", "checkpoint-150"]
    for command in bash.replace("\\\n", " ").splitlines():
        argv = shlex.split(command.split("  #")[0])
        assert argv[0] == "gradstore"
        args = build_parser().parse_args(argv[1:])
        assert (args.hf_output, args.config) == ("out", "hf.toml")
        if args.command == "query":
            task = CausalLMTask(run["root"] / "model", run["root"] / "train.jsonl")
            assert task.query_example(json.loads(args.query)).completion == " Paris"


def test_task_args_are_checked_and_resolved(run, tmp_path, monkeypatch):
    root = run["root"]
    config = tmp_path / "c.toml"
    config.write_text(TASK_TOML.format(model="model", data="train.jsonl"))
    monkeypatch.chdir(root)  # relative to the config's folder (tmp_path, holding no model), not the working one
    with pytest.raises(HFTaskError, match=f"model_dir {tmp_path / 'model'} is not a local model folder"):
        RunConfig.load(config, hf_output="out").make_task()
    moved = root / "moved.toml"
    moved.write_text(config.read_text())
    monkeypatch.chdir(tmp_path)
    made = RunConfig.load(moved, hf_output=root / "out").make_task()
    assert isinstance(made, CausalLMTask) and made.model_dir == root / "model"
    moved.write_text(moved.read_text().replace("data =", "max_len = 8, data ="))
    with pytest.raises(ConfigError, match="task.args: gradstore.logger.hf_task:CausalLMTask does not take them"):
        RunConfig.load(moved, hf_output=root / "out").make_task()


def test_default_loss_on_matches_a_trainer_sum(task, run):
    """The text examples' losses, summed, are the Trainer's batch loss times its token count (HF mean)."""
    model = task.build_model()
    task.load_checkpoint(model, run["root"] / "out" / "checkpoint-50")
    model.eval()
    examples = [task.train_examples()[i] for i in range(16)]
    batch = task.collate(examples)
    with torch.no_grad():
        ours = task.loss(model, batch).sum()
        hf = model(**batch).loss
    tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert math.isclose(float(ours), float(hf) * tokens, rel_tol=1e-5)


def test_padded_batch_gradients_are_exact(task, run):
    """Projected gradients of a padded batch, with square orthonormal projections (an isometry), have the inner
    products of each example's full gradient computed alone (tied embedding / LM head, Conv1D, LayerNorm)."""
    from gradstore.logger import GradientProjector

    model = task.build_model()
    task.load_checkpoint(model, run["root"] / "out" / "checkpoint-100")
    examples = [task.train_examples()[i] for i in range(6)]
    examples.append(task.query_example({"prompt": "the capital of x is", "completion": " the old bridge"}))
    assert len({len(e.input_ids) for e in examples}) > 2  # the batch is padded
    with GradientProjector(model, task, rank=100_000, init="orthonormal") as projector:
        rows = projector.project(examples).double()
    assert rows.shape[1] == sum(p.numel() for p in model.parameters())  # full rank: D = number of parameters
    full = []
    for e in examples:
        model.zero_grad()
        task.loss(model, task.collate([e])).sum().backward()
        full.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    full_gram = torch.stack(full) @ torch.stack(full).T
    torch.testing.assert_close(rows @ rows.T, full_gram, rtol=1e-5, atol=1e-6 * float(full_gram.abs().max()))
