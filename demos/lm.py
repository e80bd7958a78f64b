"""The text demo (``gradstore demo --task lm``): a tiny GPT-2 learns planted facts, logged while it trains.

``prepare_lm_demo(workdir)`` generates a synthetic corpus (nothing is downloaded; fixed seeds): made-up countries
and their made-up capitals, each fact stated by a few documents in different phrasings among filler sentences,
plus distractor documents that name a country or a city alone and pure filler. It builds a word-level tokenizer on
the corpus (``tokenizers`` WordLevel in a ``PreTrainedTokenizerFast``), trains a 2-layer GPT-2 with
``transformers.Trainer`` and :class:`~gradstore.logger.hf.GradstoreTrainerCallback` (one gradstore checkpoint per epoch,
each example's gradient taken at its own step's weights), writes ``run.toml`` for
:class:`~gradstore.logger.hf_task.CausalLMTask` over the callback's store, and builds the index. A query
``{"prompt": "the capital of <country> is", "completion": " <city>"}`` then ranks the documents that taught that
fact first, and ``gradstore explain`` (the dashboard's highlighting) puts their score on the fact's words.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gradstore.logger import CaptureError
from gradstore.server.run import open_index
from gradstore.server.run.config import RunConfig
from gradstore.store import GradientIndex, GradientStore

DEMO_SEED = 0
N_FACTS = 12
FACT_TEMPLATES = (
    "the capital of {x} is {y} .",
    "{y} is the capital city of {x} .",
    "people in {x} call their capital {y} .",
)
DISTRACTOR_TEMPLATES = (
    "the weather in {x} was mild and people walked to the river .",
    "{y} has an old bridge and a busy market .",
)
_SUBJECTS = (
    "the farmer",
    "a child",
    "the old man",
    "my sister",
    "the teacher",
    "a traveller",
    "the baker",
    "our neighbour",
)
_VERBS = (
    "walked to",
    "looked at",
    "painted",
    "sang about",
    "wrote about",
    "sold bread near",
    "slept by",
    "waited at",
)
_PLACES = (
    "the river",
    "the market",
    "a small house",
    "the hills",
    "the station",
    "the harbour",
    "a quiet garden",
    "the school",
)
_TIMES = (
    "in the morning",
    "at night",
    "every day",
    "after the rain",
    "in winter",
    "before dinner",
)
N_FILLER_DOCS = 8
N_EPOCHS = 30  # one gradstore checkpoint per epoch (the callback cuts intervals at epoch ends)
BATCH_SIZE = 8
LEARNING_RATE = 5e-3
RANK = 16
MAX_LENGTH = 64
N_EMBD = 64
N_HEAD = 4
# Measured (seeds 0-3): after 30 epochs at a constant 5e-3 the model's greedy answer is the right city for 10-12 of
# the 12 facts; a linear decay to 0 leaves the cities' probability near 0.3, and it recalls almost none before
# epoch ~20 (fewer epochs mean fewer checkpoints, but a model that has not learnt the facts yet).
LR_SCHEDULE = "constant"


@dataclass(frozen=True)
class Corpus:
    """The demo's documents (in training order), which fact each states (``None``: none) and the facts."""

    texts: list[str]
    fact_of: list[int | None]
    facts: list[tuple[str, str]]

    def query(self, fact: int) -> dict[str, str]:
        """The prompt / completion payload that asks for fact ``fact``."""
        country, city = self.facts[fact]
        return {"prompt": f"the capital of {country} is", "completion": f" {city}"}


def _names(rng: random.Random, n: int, endings: tuple[str, ...]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        stem = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(2))
        name = stem + rng.choice(endings)
        if name not in names:
            names.append(name)
    return names


def _filler(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)} ."


def make_corpus(seed: int = DEMO_SEED, n_facts: int = N_FACTS) -> Corpus:
    """Planted facts among filler: per fact, one document per phrasing (the fact sentence followed by one or two
    filler sentences) and two distractors naming the country or the city alone; then filler-only
    documents. Shuffled, so a fact's documents are scattered through the dataset."""
    rng = random.Random(seed)
    countries = _names(rng, n_facts, ("ria", "land", "stan", "via"))
    cities = _names(rng, n_facts, ("ton", "burg", "ville", "dor"))
    facts = list(zip(countries, cities))
    docs: list[tuple[str, int | None]] = []
    for f, (x, y) in enumerate(facts):
        for template in FACT_TEMPLATES:
            # the fact opens its document, as in the query: a fact sentence at varying positions takes the tiny
            # model several times longer to learn (measured: 2/12 facts recalled after 30 epochs, vs 12/12)
            after = [_filler(rng) for _ in range(rng.randint(1, 2))]
            docs.append((" ".join([template.format(x=x, y=y), *after]), f))
        docs += [(t.format(x=x, y=y), None) for t in DISTRACTOR_TEMPLATES]
    docs += [(" ".join(_filler(rng) for _ in range(rng.randint(1, 2))), None) for _ in range(N_FILLER_DOCS)]
    rng.shuffle(docs)
    return Corpus([t for t, _ in docs], [f for _, f in docs], facts)


def make_tokenizer(texts: list[str]) -> Any:
    """A word-level tokenizer over ``texts`` (whitespace and punctuation split), built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def tiny_gpt2(vocab_size: int, seed: int = DEMO_SEED) -> Any:
    """A 2-layer GPT-2 (``N_EMBD`` wide) without dropout, from a config."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=MAX_LENGTH,
        n_embd=N_EMBD,
        n_layer=2,
        n_head=N_HEAD,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


RUN_TOML = """# gradstore text demo run (written by `gradstore demo --task lm`)
[task]
object = "gradstore.logger.hf:CausalLMTask"
args = {{ model_dir = "model", data = "train.jsonl", max_length = {max_length} }}

[projection]
rank = [{rank}, {rank}]
init = "gaussian"
seed = 0
layers = ["*"]

[store]
path = "lm.zarr"
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


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Without progress: no transformers progress bars (model saves draw one each) and only its errors."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _train(workdir: Path, corpus: Corpus, progress: bool) -> dict[str, Any]:
    """Tokenizer, initial model folder, and a Trainer run with the callback logging into ``lm.zarr``."""
    from transformers import DataCollatorForLanguageModeling, PrinterCallback, Trainer, TrainingArguments

    from gradstore.logger.hf import GradstoreTrainerCallback
    from gradstore.logger.hf_task import CausalLMTask

    tokenizer = make_tokenizer(corpus.texts)
    model = tiny_gpt2(len(tokenizer))
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    # the Trainer trains on exactly what CausalLMTask reads back: the same records in the same order, the same ids
    task = CausalLMTask(workdir / "model", workdir / "train.jsonl", max_length=MAX_LENGTH)
    dataset = [{"input_ids": list(e.input_ids)} for e in task.train_examples()]
    figures = {
        "documents": len(dataset),
        "facts": len(corpus.facts),
        "tokens": sum(len(e["input_ids"]) for e in dataset),
        "vocabulary": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": N_EPOCHS,
    }
    if progress:
        print(
            f"lm demo: {figures['documents']} documents ({figures['facts']} planted facts, {figures['tokens']} tokens, "
            f"{figures['vocabulary']} words); training a {model.config.n_layer}-layer GPT-2 "
            f"({figures['parameters']:,} parameters) for {N_EPOCHS} epochs with GradstoreTrainerCallback",
            flush=True,
        )
    args = TrainingArguments(
        output_dir=str(workdir / "out"),
        num_train_epochs=N_EPOCHS,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        weight_decay=0.0,
        lr_scheduler_type=LR_SCHEDULE,
        save_strategy="epoch",
        save_only_model=True,  # the rows need no Adam state (identity preconditioner); saves are the weights
        logging_strategy="epoch",
        report_to=[],
        use_cpu=True,
        seed=DEMO_SEED,
        data_seed=DEMO_SEED,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )
    callback = GradstoreTrainerCallback(store=workdir / "lm.zarr", rank=RANK, layers=["*"], seed=0, chunk_rows=256)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    figures["steps"] = int(result.global_step)
    figures["train_loss"] = float(result.training_loss)
    return figures


def _checkpoint_entries(workdir: Path, store: GradientStore) -> str:
    """``[[checkpoints]]`` for the callback's checkpoints: each queried at the weights its interval started from
    (what the callback recorded; the ``checkpoint-N`` folder of the same name holds the weights it *ended* at)."""
    entries = []
    for name in store.checkpoints:
        info = store.checkpoint_info(name)
        if info.weights_path is None:
            raise CaptureError(f"the demo's checkpoint {name} has no weights path; delete {workdir} and rerun")
        path = Path(info.weights_path).resolve().relative_to(workdir.resolve()).as_posix()
        entries.append(f'[[checkpoints]]\nname = "{name}"\npath = "{path}"\nlr = {info.lr!r}\nstep = {info.step}\n')
    return "\n".join(entries)


def prepare_lm_demo(workdir: str | Path, progress: bool = True) -> Path:
    """Generate the corpus, train with in-training logging, write ``run.toml`` and build the index; returns the
    config path. Idempotent: a finished demo directory (its ``DONE`` marker) is reused as is; an unfinished one
    starts over. ``DONE`` records the corpus, model and training figures and the seconds each stage took."""
    workdir = Path(workdir)
    config_path = workdir / "run.toml"
    done = workdir / "DONE"
    if done.exists():
        return config_path
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"gradstore demo --task lm needs the hf extra: pip install 'gradstore[hf]' ({exc})") from exc
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("lm.zarr", "lm.index", "out", "model"):
        if (workdir / stale).exists():
            shutil.rmtree(workdir / stale)
    corpus = make_corpus()
    (workdir / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus.texts))
    (workdir / "facts.json").write_text(json.dumps({"facts": corpus.facts, "fact_of": corpus.fact_of}, indent=1))
    with _quiet_transformers(not progress):
        figures = _train(workdir, corpus, progress)
    trained = time.perf_counter()
    store = GradientStore.open(workdir / "lm.zarr")
    entries = _checkpoint_entries(workdir, store)
    config_path.write_text(RUN_TOML.format(max_length=MAX_LENGTH, rank=RANK, checkpoints=entries))
    config = RunConfig.load(config_path)
    GradientIndex.build(store, config.index, path=config.index_path, progress=progress)
    open_index(config)  # proves the index matches the config
    figures.update(checkpoints=len(store.checkpoints), train_s=trained - started, total_s=time.perf_counter() - started)
    done.write_text(json.dumps(figures, indent=1))
    return config_path


def try_query(workdir: str | Path, fact: int = 0) -> tuple[str, str]:
    """``(prompt, completion)`` asking a prepared demo for one of its planted facts."""
    payload = load_corpus(workdir).query(fact)
    return payload["prompt"], payload["completion"]


def load_corpus(workdir: str | Path) -> Corpus:
    """The corpus a prepared demo directory was trained on."""
    workdir = Path(workdir)
    texts = [json.loads(line)["text"] for line in (workdir / "train.jsonl").read_text().splitlines()]
    meta = json.loads((workdir / "facts.json").read_text())
    return Corpus(texts, meta["fact_of"], [tuple(f) for f in meta["facts"]])
