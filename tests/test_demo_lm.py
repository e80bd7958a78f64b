"""``gradstore demo --task lm`` (issue 10, "A text demo"): a tiny GPT-2 trained with ``transformers.Trainer`` and
``GradstoreTrainerCallback`` on a synthetic corpus of planted facts, indexed with ``CausalLMTask`` and no user code.

One session fixture prepares the demo (about 20-30 s on 2 cores); the tests query each planted fact's prompt /
completion through ``gradstore query``, explain the top proponent's tokens, and check the preparation is reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from gradstore.demos.lm import (
    FACT_TEMPLATES,
    N_EPOCHS,
    Corpus,
    load_corpus,
    make_corpus,
    prepare_lm_demo,
)
from gradstore.server.cli import build_parser
from gradstore.server.cli import main as gradstore
from gradstore.server.run import open_engine
from gradstore.server.run.config import RunConfig
from gradstore.store import GradientStore

from .helpers.facts import chance_levels

pytestmark = pytest.mark.slow  # trains the text demo (about 30 s on 2 cores) before its first test

N_DOCS, N_FACTS, PER_FACT = 68, 12, len(FACT_TEMPLATES)


@pytest.fixture(scope="session")
def lm_demo(tmp_path_factory) -> tuple[Path, Path]:
    """``(workdir, run.toml)`` of a prepared demo (one thread while training: a tiny model, shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workdir = tmp_path_factory.mktemp("demo-lm")
        return workdir, prepare_lm_demo(workdir, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(lm_demo) -> Corpus:
    return load_corpus(lm_demo[0])


@pytest.fixture(scope="module")
def rankings(lm_demo, corpus, tmp_path_factory) -> list[list[int]]:
    """Every fact's proponent ids (all documents, best first), from ``gradstore query --json``."""
    queries = tmp_path_factory.mktemp("queries") / "facts.jsonl"
    queries.write_text("".join(json.dumps(corpus.query(f)) + "\n" for f in range(N_FACTS)))
    return _query_ids(lm_demo[1], queries)


def _query_ids(config: Path, queries: Path) -> list[list[int]]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gradstore(["query", "--config", str(config), "--query-file", str(queries), "--top-k", str(N_DOCS), "--json"])
    return [[p["id"] for p in r["proponents"]] for r in json.loads(out.getvalue())["results"]]


def test_corpus_is_generated_with_fixed_seeds(lm_demo, corpus):
    """68 documents: 12 facts x 3 phrasings (each opening its document, filler after), 2 distractors per fact naming
    the country or the city alone, 8 filler documents; the same corpus every time."""
    assert len(corpus.texts) == N_DOCS and len(corpus.facts) == N_FACTS
    assert corpus == make_corpus()
    for f, (country, city) in enumerate(corpus.facts):
        holding = [t for t, of in zip(corpus.texts, corpus.fact_of) if of == f]
        assert len(holding) == PER_FACT
        starts = sorted(t.split(" . ")[0] + " ." for t in holding)
        assert starts == sorted(template.format(x=country, y=city) for template in FACT_TEMPLATES)
        naming = [t for t, of in zip(corpus.texts, corpus.fact_of) if of is None and (country in t or city in t)]
        assert len(naming) == 2  # the distractors
    assert sum(of is None for of in corpus.fact_of) == N_FACTS * 2 + 8
    country, city = corpus.facts[0]
    assert corpus.query(0) == {"prompt": f"the capital of {country} is", "completion": f" {city}"}


def test_the_run_indexes_one_checkpoint_per_epoch(lm_demo, capsys):
    """The callback's store (one checkpoint per epoch, every document once in each), queried at the weights each
    interval started from; ``gradstore info`` finds the index ready."""
    workdir, config_path = lm_demo
    figures = json.loads((workdir / "DONE").read_text())
    assert (figures["documents"], figures["facts"], figures["checkpoints"], figures["epochs"]) == (68, 12, 30, 30)
    assert figures["steps"] == N_EPOCHS * 9  # 68 documents in batches of 8
    config = RunConfig.load(config_path)
    assert config.task_object == "gradstore.logger.hf:CausalLMTask"
    ends = [9 * (e + 1) for e in range(N_EPOCHS)]
    assert [c.name for c in config.checkpoints] == [f"checkpoint-{s}" for s in ends]
    starts = ["out/gradstore-weights/step-0"] + [f"out/checkpoint-{s}" for s in ends[:-1]]
    assert [c.path for c in config.checkpoints] == [workdir / s / "model.safetensors" for s in starts]
    store = GradientStore.open(config.store.path)
    assert store.checkpoints == [c.name for c in config.checkpoints]
    for c in config.checkpoints:
        ids, _ = store.read(c.name)
        assert sorted(ids.tolist()) == list(range(N_DOCS))
        assert store.checkpoint_info(c.name).lr == c.lr == pytest.approx(5e-3)
    gradstore(["info", "--config", str(config_path), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["index"]["status"] == "ready"
    assert [(c["name"], c["rows"]) for c in info["checkpoints"]] == [(c.name, N_DOCS) for c in config.checkpoints]


# A random ranking of the 68 documents (3 hold each fact) has MRR 0.150 and puts a fact's document first with
# probability 3/68 = 0.044. Measured (CPU, torch 2.13, transformers 5.24): MRR 1.0 and top-1 12/12 at the demo's
# seeds, and at corpus / model / Trainer seeds 1, 2 and 3 as well. The floors leave room for another BLAS.
MRR_FLOOR = 0.8  # 5.3x chance
TOP1_FLOOR = 0.75  # 17x chance


def test_each_facts_prompt_ranks_a_document_holding_it_first(corpus, rankings):
    chance_mrr, _ = chance_levels(N_DOCS, PER_FACT)
    chance_top1 = PER_FACT / N_DOCS
    assert (round(chance_mrr, 4), round(chance_top1, 4)) == (0.1502, 0.0441)
    assert all(sorted(ids) == list(range(N_DOCS)) for ids in rankings)
    ranks = [next(r for r, i in enumerate(ids, 1) if corpus.fact_of[i] == f) for f, ids in enumerate(rankings)]
    mrr = sum(1 / r for r in ranks) / N_FACTS
    top1 = sum(r == 1 for r in ranks) / N_FACTS
    assert mrr > MRR_FLOOR > 5 * chance_mrr, ranks
    assert top1 > TOP1_FLOOR > 10 * chance_top1, ranks


def test_explain_puts_the_top_proponents_score_on_the_facts_tokens(lm_demo, corpus, rankings):
    """Position t's share is the gradient at token t, which carries the loss of predicting token t + 1; so the
    fact's positions are the country, the word that predicts the city (the one just before it) and the city.
    Measured: the largest share is the word before the city for 12/12 facts (60-98% of the score), and the fact
    sentence holds 88-116% of it (the filler after it nets about zero). The shares plus the rest add up to the
    explained score (1e-5 relative). Every third checkpoint (an explanation costs two passes per checkpoint)."""
    engine = open_engine(RunConfig.load(lm_demo[1]), device="cpu")
    checkpoints = engine.checkpoints[2::3]
    on_fact = sentence_holds_most = 0
    for f, ids in enumerate(rankings):
        top = ids[0]
        country, city = corpus.facts[f]
        answer = engine.explain(corpus.query(f), top, checkpoints=checkpoints)
        words = [(t.text or "").strip() for t in answer.tokens]
        shares = [t.share for t in answer.tokens]
        assert sum(shares) + answer.rest == pytest.approx(answer.score, rel=1e-5)
        assert answer.score > 0
        if corpus.fact_of[top] != f:
            continue
        city_at = words.index(city)
        fact_positions = {words.index(country), city_at - 1, city_at}
        largest = max(range(len(shares)), key=lambda t: shares[t])
        on_fact += largest in fact_positions
        sentence = words.index(".") + 1  # the fact sentence opens the document
        sentence_holds_most += sum(shares[:sentence]) > 0.5 * answer.score
    assert on_fact >= 0.75 * N_FACTS, on_fact
    assert sentence_holds_most >= 0.75 * N_FACTS, sentence_holds_most


def test_prepare_is_idempotent_and_the_cli_reuses_it(lm_demo, corpus, capsys):
    workdir, config_path = lm_demo
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    start = time.perf_counter()
    assert prepare_lm_demo(workdir, progress=False) == config_path
    assert time.perf_counter() - start < 0.5
    gradstore(["demo", "--task", "lm", "--workdir", str(workdir), "--no-serve", "--quiet"])
    out = capsys.readouterr().out
    country, city = corpus.facts[0]
    payload = json.dumps({"prompt": f"the capital of {country} is", "completion": f" {city}"})
    assert f"--query '{payload}'" in out and f"'the capital of {country} is' -> '{city}'" in out
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before  # nothing retrained or rewritten


def test_readme_names_the_demos_first_fact(corpus):
    country, city = corpus.facts[0]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`gradstore demo --task lm`" in readme and f"`the capital of {country} is` → `{city}`" in readme


def test_demo_task_flag():
    parser = build_parser()
    assert parser.parse_args(["demo"]).task == "digits"
    assert parser.parse_args(["demo", "--task", "lm"]).task == "lm"
    assert parser.parse_args(["demo"]).workdir is None  # runs/demo or runs/demo-lm by task
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--task", "cifar"])
