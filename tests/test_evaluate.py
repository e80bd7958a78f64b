"""``gradstore evaluate`` (issue 11, tests 2-4): LDS, brittleness, tail-patch and fact-tracing recall, each checked
against a direct computation in the test from the same retrained models, scores taken through the public query
path (``QueryEngine.influence`` with ``top_k = N``, on indexes the test builds itself).

Measured (CPU, torch 2.13, 1 thread), the digits demo with 20 test queries, 24 subsets of 1/2, 2 seeds:
LDS identity 0.538, kfac 0.750, ekfac 0.749 (see the margin below); retraining one half-data model takes 0.03 s,
a full one 0.05 s (1 thread; with 2 OpenMP threads on a loaded 2-core machine, 1 s: hence ``--threads 1``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from gradstore.demos.digits import DigitsTask
from gradstore.evaluation import Job, RetrainCache, train_missing
from gradstore.logger import Task
from gradstore.projection import PRECONDITIONERS
from gradstore.server import cli
from gradstore.server.run import index_run, open_engine
from gradstore.server.run.config import RunConfig
from gradstore.server.run.engine import QueryEngine
from gradstore.store import GradientIndex, GradientStore, IndexOptions

QUERIES = 20
SUBSETS, SEEDS = 24, 2
# measured gaps over identity (LDS 0.538): kfac +0.212, ekfac +0.211; the margin sits well below both
LDS_MARGIN = 0.08
BRITTLE_QUERIES = 8
CURVATURE = [p for p in ("kfac", "ekfac") if p in PRECONDITIONERS]


@pytest.fixture
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is ~20x faster than two contending ones
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def digits_run(demo_config, tmp_path) -> Path:
    """A private copy of the demo run (the evaluations write under its folder)."""
    shutil.copytree(demo_config.parent, tmp_path / "demo")
    return tmp_path / "demo" / "run.toml"


def write_queries(path: Path, indices) -> Path:
    path.write_text("".join(json.dumps({"test_index": int(i)}) + "\n" for i in indices))
    return path


def all_scores(engine: QueryEngine, payloads: list[dict], n: int) -> np.ndarray:
    """``[Q, N]`` scores by example id from the index's own search (top ``N`` proponents: every example), on query
    gradients from the engine, with the schedule's lr weights."""
    weights = engine.checkpoint_weights(None, "schedule")
    raw = engine.query_gradients(engine.examples_from_payloads(payloads), weights)
    found = engine.index.search(raw, weights, n)
    out = np.full((len(payloads), n), np.nan)
    for q in range(len(payloads)):
        out[q, engine.index.ids[found.proponent_rows[q]]] = found.proponent_scores[q]
    assert np.isfinite(out).all()
    return out


def engine_with(config: RunConfig, options: IndexOptions, path: Path) -> QueryEngine:
    store = GradientStore.open(config.store.path)
    index = GradientIndex.build(store, options, path=path, progress=False)
    return QueryEngine(config.make_task(), store, index, {c.name: c.path for c in config.checkpoints}, device="cpu")


def evaluate(*argv: str) -> None:
    cli.main(["evaluate", *argv, "--quiet", "--threads", "1"])


@pytest.mark.slow
def test_lds_equals_a_direct_computation_and_curvature_beats_identity(digits_run, tmp_path, single_thread, capsys):
    config = RunConfig.load(digits_run)
    queries = write_queries(tmp_path / "q.jsonl", range(QUERIES))
    payloads = [json.loads(line) for line in queries.read_text().splitlines()]
    args = ["--config", str(digits_run), "--queries", str(queries), "--subsets", str(SUBSETS), "--seeds", str(SEEDS)]
    evaluate("lds", *args, "--preconditioners", ",".join(["identity", *CURVATURE]))
    out = capsys.readouterr().out
    assert "LDS over 20 queries, 24 subsets of 0.50, 2 seeds (loss)" in out
    run_dir = digits_run.parent / "evaluation"
    result = json.loads((run_dir / "lds" / "evaluation.json").read_text())
    assert (run_dir / "lds" / "lds.png").stat().st_size > 1000
    methods = {m["name"]: m for m in result["methods"]}
    assert list(methods) == ["identity", *CURVATURE] and methods["identity"]["configured"]
    assert result["retrain"]["trained"] == SUBSETS * SEEDS and result["retrain"]["cached"] == 0

    # the direct computation: every cached retrain, measured here, averaged over its seeds
    task = config.make_task()
    x, y = task.collate([task.query_example(p) for p in payloads])
    by_subset: dict[tuple, list[np.ndarray]] = {}
    files = sorted((run_dir / "retrains").glob("*.pt"))
    assert len(files) == SUBSETS * SEEDS
    for path in files:
        saved = torch.load(path, weights_only=True)
        model = task.build_model()
        model.load_state_dict(saved["model"])
        with torch.no_grad():
            by_subset.setdefault(tuple(saved["kept"].tolist()), []).append(-task.loss(model.eval(), (x, y)).numpy())
    assert len(by_subset) == SUBSETS and all(len(v) == SEEDS and len(k) == 750 for k, v in by_subset.items())
    n = len(task.train_examples())
    masks = np.zeros((SUBSETS, n), dtype=bool)
    outputs = np.zeros((SUBSETS, QUERIES))
    for s, (kept, measured) in enumerate(by_subset.items()):
        masks[s, list(kept)] = True
        outputs[s] = np.mean(measured, axis=0)
    engines = {"identity": open_engine(config, device="cpu")}
    for name in CURVATURE:
        engines[name] = engine_with(config, IndexOptions(preconditioner=name), tmp_path / f"{name}.index")
    direct = {}
    for name, engine in engines.items():
        predicted = masks @ all_scores(engine, payloads, n).T  # [S, Q]
        rho = [scipy.stats.spearmanr(predicted[:, q], outputs[:, q]).statistic for q in range(QUERIES)]
        np.testing.assert_allclose(methods[name]["per_query"], rho, rtol=1e-9, atol=1e-12)
        direct[name] = float(np.mean(rho))
        assert methods[name]["lds"] == pytest.approx(direct[name], rel=1e-12)
    for name in CURVATURE:
        assert direct[name] > direct["identity"] + LDS_MARGIN, direct

    # resumable: a second run trains nothing and answers the same; the results file it wrote reads back the same
    evaluate("lds", *args)
    again = json.loads((run_dir / "lds" / "evaluation.json").read_text())
    assert again["retrain"]["trained"] == 0 and again["retrain"]["cached"] == SUBSETS * SEEDS
    assert again["methods"][0]["lds"] == pytest.approx(direct["identity"], rel=1e-12)
    with np.load(run_dir / "lds" / "retrain_results.npz") as saved:  # the documented format, ids in another order
        order = np.random.default_rng(0).permutation(n)
        np.savez(
            tmp_path / "elsewhere.npz",
            masks=saved["masks"][:, order],
            measurements=saved["measurements"],
            ids=saved["ids"][order],
        )
    external = tmp_path / "external"
    evaluate("lds", *args, "--retrain-results", str(tmp_path / "elsewhere.npz"), "--out", str(external))
    from_file = json.loads((external / "evaluation.json").read_text())
    assert from_file["retrain"] is None and from_file["methods"][0]["lds"] == pytest.approx(direct["identity"])


class DigitsWithoutTrain(DigitsTask):
    """The demo's Task without the optional ``train`` (and ``correct``) the retraining evaluations need."""

    train = Task.train
    correct = Task.correct


def test_retraining_is_split_across_ranks(tmp_path, monkeypatch, single_thread):
    task = DigitsTask(n_train=200, hidden=8)
    cache = RetrainCache(tmp_path / "cache", task, np.arange(200))
    jobs = [Job(np.arange(0, 200, step), seed) for step in (2, 3) for seed in (0, 1)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no rendezvous: rank 0 trains what the others left
    stats = train_missing(cache, jobs)
    assert (stats.rank, stats.trained) == (1, 2) and [cache.has(j) for j in jobs] == [False, True, False, True]
    monkeypatch.setenv("RANK", "0")
    stats = train_missing(cache, jobs)
    assert (stats.rank, stats.trained, stats.cached) == (0, 2, 2) and all(cache.has(j) for j in jobs)
    saved = torch.load(cache.path(jobs[1]), weights_only=True)
    assert saved["seed"] == 1 and saved["kept"].tolist() == list(range(0, 200, 2))
    model = cache.load(jobs[1])  # the Task's own loader reads the file back
    torch.manual_seed(0)
    again = task.train([task.train_examples()[i] for i in range(0, 200, 2)], seed=1)
    for name, value in again.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("evaluation", ["lds", "brittleness"])
def test_an_evaluation_that_retrains_refuses_a_task_without_train(digits_run, tmp_path, capsys, evaluation):
    text = digits_run.read_text().replace("gradstore.demos.digits:DigitsTask", "tests.test_evaluate:DigitsWithoutTrain")
    digits_run.write_text(text)
    queries = write_queries(tmp_path / "q.jsonl", range(2))
    with pytest.raises(SystemExit) as exit_info:
        evaluate(evaluation, "--config", str(digits_run), "--queries", str(queries), "--no-plot")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: `gradstore evaluate {evaluation}` needs DigitsWithoutTrain.train(examples, seed) -> model" in err


def borderline_queries(task: DigitsTask, count: int) -> list[int]:
    """Test digits the full-data model (seed 0) gets right by the smallest margins: where removals can flip."""
    model = task.train(task.train_examples(), seed=0).eval()
    with torch.no_grad():
        margin = -task.measurement(model, task.collate(task.test_examples())).numpy()
    right = np.flatnonzero(margin > 0)
    return right[np.argsort(margin[right])[:count]].tolist()


@pytest.mark.slow
def test_brittleness_top_k_removal_flips_more_than_random(digits_run, tmp_path, single_thread):
    config = RunConfig.load(digits_run)
    task = config.make_task()
    indices = borderline_queries(task, BRITTLE_QUERIES)
    queries = write_queries(tmp_path / "q.jsonl", indices)
    evaluate("brittleness", "--config", str(digits_run), "--queries", str(queries), "--k", "10,40")
    result = json.loads((digits_run.parent / "evaluation" / "brittleness" / "evaluation.json").read_text())
    rows = {r["name"]: r for r in result["results"]}
    assert result["tested"] == {"0": list(range(BRITTLE_QUERIES))} and result["pairs"] == BRITTLE_QUERIES
    for k in ("10", "40"):
        assert rows["identity"]["flipped"][k] > rows["random"]["flipped"][k], rows
    # one removal, retrained directly: the query's top-40 proponents (the index's own ranking) gone, seed 0
    engine = open_engine(config, device="cpu")
    top = [
        p.id
        for p in engine.influence(examples=[task.query_example({"test_index": indices[0]})], top_k=40)
        .results[0]
        .proponents
    ]
    kept = [e for i, e in enumerate(task.train_examples()) if i not in set(top)]
    model = task.train(kept, seed=0).eval()
    with torch.no_grad():
        flipped = not bool(task.correct(model, task.collate([task.query_example({"test_index": indices[0]})]))[0])
    assert result["pair_list"][0] == [0, 0] and rows["identity"]["per_pair"]["40"][0] == float(flipped)


def test_tail_patch_top_k_proponents_raise_the_target_log_prob_more_than_random(digits_run, tmp_path, single_thread):
    config = RunConfig.load(digits_run)
    queries = write_queries(tmp_path / "q.jsonl", range(10))
    evaluate(
        "tail-patch",
        "--config",
        str(digits_run),
        "--queries",
        str(queries),
        "--k",
        "10,40",
        "--preconditioners",
        "kfac",
    )
    result = json.loads((digits_run.parent / "evaluation" / "tail-patch" / "evaluation.json").read_text())
    final = config.checkpoints[-1]
    assert (result["checkpoint"], result["lr"], result["optimizer"]) == (final.name, final.lr, "sgd")
    rows = {r["name"]: r for r in result["results"]}
    for name in ("identity", "kfac"):
        for k in ("10", "40"):
            assert rows[name]["mean_delta"][k] > rows["random"]["mean_delta"][k] + 0.05, rows[name]["mean_delta"]
    # query 0, k = 10, identity, directly: one SGD step on its top 10 from the last checkpoint's weights
    task = config.make_task()
    engine = open_engine(config, device="cpu")
    query = task.query_example({"test_index": 0})
    top = [p.id for p in engine.influence(examples=[query], top_k=10).results[0].proponents]
    model = task.build_model()
    task.load_checkpoint(model, final.path)
    model.eval()
    before = -float(task.loss(model, task.collate([query]))[0].detach())
    loss = task.loss(model, task.collate([task.train_examples()[i] for i in top])).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= final.lr * g
        after = -float(task.loss(model, task.collate([query]))[0])
    # `before` is the same float32 forward pass as the evaluation's, but on a batch of 1 where it ran a batch of 10
    # queries: another matmul kernel, another summation order, so the two agree only to float32 rounding (a fixed
    # rel=1e-6 missed by 1.9e-6 on some machines). The tolerance is the worst-case gap that rounding allows here.
    task.load_checkpoint(model, final.path)  # the weights `before` was computed with
    tol = float32_loss_gap(model, task.collate([query])[0])
    assert result["before"][0] == pytest.approx(before, rel=0, abs=tol)
    # `after` is computed the same way on both sides (same batch of 10, same batch-of-1 query): only `before` differs
    assert rows["identity"]["per_query"]["10"][0] == pytest.approx(after - before, rel=1e-5, abs=tol)


def float32_loss_gap(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest difference two float32 evaluations of ``cross_entropy(model(x), y)`` can show when they differ only
    in summation order (a batched vs an unbatched matmul), for a ``Sequential`` of ``Linear`` and 1-Lipschitz
    activations. Higham's bound for a float32 dot product of n terms plus a bias,
    ``|fl(w.h + b) - (w.h + b)| <= gamma_(n+1) (sum_i |w_i h_i| + |b|)`` with ``gamma_m = m u / (1 - m u)`` and
    ``u = 2^-24``, is carried through the layers (an error ``e`` on a layer's input adds ``|W| e``; ReLU/tanh pass
    it on, adding ``u |h|`` for their own rounding). The loss ``logsumexp(z) - z_y`` moves by at most ``2 max |dz|``,
    plus ``4 u (max |z| + 1)`` for the exp/log/sum of the logsumexp. Either evaluation may err either way: twice that.
    """
    u = 2.0**-24
    h = x.detach().double().reshape(-1)
    err = torch.zeros_like(h)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            w = layer.weight.detach().double()
            b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            m = w.shape[1] + 1
            gamma = m * u / (1 - m * u)
            err = gamma * (w.abs() @ h.abs() + b.abs()) + w.abs() @ err
            h = w @ h + b
        else:  # an elementwise activation with |f'| <= 1 (ReLU, Tanh)
            h = layer(h)
            err = err + u * h.abs()
    loss_err = 2 * float(err.max()) + 4 * u * (float(h.abs().max()) + 1)
    return 2 * loss_err


FACTS_TOML = """
[task]
object = "tests.helpers.facts:FactsTask"

[projection]
rank = [8, 8]
seed = 0

[store]
path = "facts.zarr"
dtype = "float32"

{checkpoints}
[index]
kind = "flat"
"""


def test_recall_and_mrr_on_fact_tracing_match_a_direct_computation(tmp_path, single_thread, capsys):
    from tests.helpers.facts import FactsTask, train_with_checkpoints

    task = FactsTask()
    entries = []
    for step, lr, model, _ in train_with_checkpoints(task, 300, [100, 200, 300], 1e-2):
        torch.save(model.state_dict(), tmp_path / f"step{step}.pt")
        entries.append(f'[[checkpoints]]\nname = "step{step}"\npath = "step{step}.pt"\nlr = {lr}\nstep = {step}\n')
    path = tmp_path / "facts.toml"
    path.write_text(FACTS_TOML.format(checkpoints="\n".join(entries)))
    config = RunConfig.load(path)
    index_run(config, progress=False)
    labels = tmp_path / "labels.jsonl"
    relevant = [sorted(task.relevant(f)) for f in range(len(task.facts))]
    labels.write_text("".join(json.dumps({"query": {"fact": f}, "relevant": r}) + "\n" for f, r in enumerate(relevant)))
    evaluate("recall", "--config", str(path), "--labels", str(labels), "--k", "1,10", "--preconditioners", "kfac")
    assert "fact tracing over 60 labelled queries, 240 training examples" in capsys.readouterr().out
    result = json.loads((tmp_path / "evaluation" / "recall" / "evaluation.json").read_text())
    methods = {m["name"]: m for m in result["methods"]}
    n = len(task.train_examples())
    payloads = [{"fact": f} for f in range(len(task.facts))]
    engines = {
        "identity": open_engine(config, device="cpu"),
        "kfac": engine_with(config, IndexOptions(preconditioner="kfac"), tmp_path / "kfac.index"),
    }
    for name, engine in engines.items():
        scores = all_scores(engine, payloads, n)
        reciprocal, at1, at10 = [], [], []
        for q, marked in enumerate(relevant):
            ranked = sorted(range(n), key=lambda i: (-scores[q, i], i))  # best first, ties by id
            first = next(r for r, i in enumerate(ranked, 1) if i in marked)
            reciprocal.append(1.0 / first)
            at1.append(len(set(ranked[:1]) & set(marked)) / len(marked))
            at10.append(len(set(ranked[:10]) & set(marked)) / len(marked))
        assert methods[name]["mrr"] == pytest.approx(np.mean(reciprocal), rel=1e-12)
        assert methods[name]["recall"] == pytest.approx({"1": np.mean(at1), "10": np.mean(at10)}, rel=1e-12)
        assert methods[name]["mrr"] > 0.2  # chance: 0.057 (3 relevant among 240)
