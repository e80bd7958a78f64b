"""The in-process query engine against exact full-gradient TracIn (issue 3, tests 1, 3 and 5).

A 10-16-3 MLP (96 training examples) is logged at three checkpoints five SGD steps apart with
orthonormal full-rank projections (the projection is then an isometry) into a float32 store. The
reference is computed independently: per-example gradients with torch.func in float64 and
``score(q, i) = sum_c w_c <g_q,c, g_i,c>``. Proponent / opponent lists must agree in ids and order, and
scores and per-checkpoint contributions to 1e-4 of the query's largest |score|.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gradstore.logger import GradientLogger
from gradstore.server.run.engine import QueryEngine, QueryError, lr_weights
from gradstore.store import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    GradientIndex,
    GradientStore,
    IndexOptions,
    StaleIndexError,
)

from .helpers.models import sgd_steps
from .helpers.search import MeasurementAsLoss, QueryMLPTask, dense_curvature, log_mlp_run, payload, reference_weights

LRS = (0.1, 0.05, 0.02)
TOL = 1e-4  # relative to the query's largest |score|
WEIGHTINGS = ["schedule", "uniform", "normalized"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine")
    logged = log_mlp_run(directory, lrs=LRS)
    store = GradientStore.open(logged.store_path)
    index = GradientIndex.build(store, IndexOptions(), progress=False)
    assert all(layer.dim == layer.full_dim for layer in store.spec.layers)  # full rank: an isometry
    queries = QueryMLPTask(n=6, seed=1).train_examples()
    train = logged.task.train_examples()
    # exact per-checkpoint dot products [C, Q, N] (loss and measurement) and squared norms [C, N]
    dots, measured, sqnorms = [], [], []
    for name in logged.names:
        g_train = logged.full_gradients(name, train)
        dots.append((logged.full_gradients(name, queries) @ g_train.T).numpy())
        measured.append((logged.full_gradients(name, queries, MeasurementAsLoss(logged.task)) @ g_train.T).numpy())
        sqnorms.append((g_train**2).sum(1).numpy())
    engines = {
        residency: QueryEngine(logged.task, store, index, logged.weights, residency=residency)
        for residency in ("all", "one")
    }
    return dict(
        logged=logged,
        store=store,
        index=index,
        queries=queries,
        payloads=[payload(q) for q in queries],
        dots=np.stack(dots),
        measured=np.stack(measured),
        sqnorms=np.stack(sqnorms),
        engines=engines,
    )


def _expected(run, weighting: str, checkpoints=None, dots=None):
    """Reference ``(weights [C], contributions [C, Q, N])``, zero for checkpoints outside the subset."""
    names = run["logged"].names
    chosen = [c in (checkpoints or names) for c in names]
    weights = np.zeros(len(names))
    weights[chosen] = reference_weights(np.asarray(LRS)[chosen], weighting)
    dots = run["dots"] if dots is None else dots
    return weights, weights[:, None, None] * dots


def _check_lists(run, response, contributions: np.ndarray, k: int, checkpoints=None) -> None:
    """Proponents/opponents of every query equal the reference lists.

    Compared: ids, order, scores, contributions, descriptions.
    """
    names = run["logged"].names
    chosen = [c for c in names if c in (checkpoints or names)]
    train = run["logged"].task.train_examples()
    scores = contributions.sum(0)  # [Q, N]
    ids = np.arange(scores.shape[1])
    assert len(response.results) == scores.shape[0]
    for q, result in enumerate(response.results):
        scale = np.abs(scores[q]).max()
        assert scale > 1e-3  # not a comparison between zeros
        for items, order in (
            (result.proponents, np.lexsort((ids, -scores[q]))),
            (result.opponents, np.lexsort((ids, scores[q]))),
        ):
            assert [item.id for item in items] == order[:k].tolist()
            for item in items:
                assert abs(item.score - scores[q, item.id]) <= TOL * scale
                assert list(item.contributions) == chosen
                for c, name in enumerate(names):
                    if name in chosen:
                        assert abs(item.contributions[name] - contributions[c, q, item.id]) <= TOL * scale
                assert sum(item.contributions.values()) == pytest.approx(item.score, rel=1e-9, abs=1e-12)
                assert item.example == run["logged"].task.describe(train[item.id])
        assert result.proponents[0].score > 0 > result.opponents[0].score


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("residency", ["all", "one"])
def test_influence_equals_exact_tracin(run, residency, weighting):
    engine = run["engines"][residency]
    response = engine.influence(run["payloads"], top_k=8, lr_weighting=weighting)
    weights, contributions = _expected(run, weighting)
    _check_lists(run, response, contributions, k=8)
    assert response.checkpoints == run["logged"].names
    assert list(response.weights.values()) == pytest.approx(weights.tolist(), rel=1e-12)
    assert [r.query for r in response.results] == [run["logged"].task.describe(q) for q in run["queries"]]
    # summary statistics over every training example
    scores = contributions.sum(0)
    assert [r.mean_abs_score for r in response.results] == pytest.approx(np.abs(scores).mean(1), rel=TOL)
    assert [r.max_abs_score for r in response.results] == pytest.approx(np.abs(scores).max(1), rel=TOL)


@pytest.mark.parametrize(
    "checkpoints, weighting",
    [(["ckpt-0", "ckpt-2"], "normalized"), (["ckpt-2", "ckpt-1"], "schedule"), (["ckpt-2"], "uniform")],
    ids=["first-last-normalized", "unordered-schedule", "final-only-graddot"],
)
@pytest.mark.parametrize("residency", ["all", "one"])
def test_checkpoint_subset_equals_exact_tracin(run, residency, checkpoints, weighting):
    engine = run["engines"][residency]
    response = engine.influence(run["payloads"], top_k=5, lr_weighting=weighting, checkpoints=checkpoints)
    weights, contributions = _expected(run, weighting, checkpoints)
    _check_lists(run, response, contributions, k=5, checkpoints=checkpoints)
    assert response.checkpoints == [c for c in run["logged"].names if c in checkpoints]
    if weighting == "normalized":  # lr / mean lr over the chosen checkpoints
        assert list(response.weights.values()) == pytest.approx([0.1 / 0.06, 0.02 / 0.06])


def test_precomputed_vectors_give_the_same_answers(run):
    """Projected query gradients computed outside the engine (same spec) answer exactly like the payloads."""
    logged, store, engine = run["logged"], run["store"], run["engines"]["all"]
    projected = {name: logged.projected(name, run["queries"], store) for name in logged.names}  # [Q, D] each
    for checkpoints, weighting in (
        (None, "schedule"),
        (["ckpt-0", "ckpt-2"], "uniform"),
        (["ckpt-2", "ckpt-0"], "normalized"),
    ):
        names = checkpoints or logged.names
        vectors = np.stack([projected[name] for name in names], axis=1)  # [Q, chosen, D] in the order of `checkpoints`
        by_vector = engine.influence(vectors=vectors, top_k=6, lr_weighting=weighting, checkpoints=checkpoints)
        by_payload = engine.influence(run["payloads"], top_k=6, lr_weighting=weighting, checkpoints=checkpoints)
        _, contributions = _expected(run, weighting, checkpoints)
        _check_lists(run, by_vector, contributions, k=6, checkpoints=checkpoints)
        for a, b in zip(by_vector.results, by_payload.results):
            assert a.query is None
            for x, y in zip(a.proponents + a.opponents, b.proponents + b.opponents):
                assert x.id == y.id and x.score == pytest.approx(y.score, rel=1e-6)
    # nested lists (as JSON delivers them) work too
    listed = engine.influence(
        vectors=vectors.tolist(), top_k=6, lr_weighting="normalized", checkpoints=["ckpt-2", "ckpt-0"]
    )
    assert [p.id for p in listed.results[0].proponents] == [p.id for p in by_vector.results[0].proponents]


def test_examples_and_batches_agree_with_single_queries(run):
    engine = run["engines"]["one"]
    batch = engine.influence(examples=run["queries"], top_k=4)
    for q, example in enumerate(run["queries"]):
        alone = engine.influence(examples=[example], top_k=4).results[0]
        assert [p.id for p in alone.proponents] == [p.id for p in batch.results[q].proponents]
        assert [p.score for p in alone.opponents] == pytest.approx(
            [p.score for p in batch.results[q].opponents], rel=1e-5
        )


def test_measurement_equals_exact_tracin_of_the_measurement(run):
    engine = run["engines"]["all"]
    response = engine.influence(run["payloads"], top_k=5, measurement="measurement")
    _, contributions = _expected(run, "schedule", dots=run["measured"])
    _check_lists(run, response, contributions, k=5)
    assert response.measurement == "measurement"


@pytest.mark.parametrize("weighting, checkpoints", [("schedule", None), ("normalized", ["ckpt-1", "ckpt-2"])])
def test_self_influence_equals_exact(run, weighting, checkpoints):
    engine = run["engines"]["all"]
    response = engine.self_influence(top_k=1000, lr_weighting=weighting, checkpoints=checkpoints)
    weights, _ = _expected(run, weighting, checkpoints)
    per_ckpt = weights[:, None] * run["sqnorms"]  # [C, N]
    scores = per_ckpt.sum(0)
    assert [item.id for item in response.results] == np.lexsort((np.arange(len(scores)), -scores)).tolist()
    names = run["logged"].names
    for item in response.results:
        assert item.score == pytest.approx(scores[item.id], rel=TOL)
        assert list(item.contributions) == [c for c in names if c in (checkpoints or names)]
        for c, name in enumerate(names):
            if name in item.contributions:
                assert item.contributions[name] == pytest.approx(per_ckpt[c, item.id], rel=TOL)
    assert len(engine.self_influence(top_k=3).results) == 3


def test_engine_kfac_and_block_with_eval_store_equal_dense_reference(tmp_path):
    """Query-side preconditioning in the engine matches ``sum_c w_c q^T R_c^{-1} g`` built from the stored rows."""
    eval_examples = QueryMLPTask(n=48, seed=2).train_examples()
    logged = log_mlp_run(tmp_path, lrs=(0.1, 0.03), rank=4, init="gaussian", eval_examples=eval_examples)
    store, eval_store = GradientStore.open(logged.store_path), GradientStore.open(tmp_path / "eval.zarr")
    queries = QueryMLPTask(n=4, seed=1).train_examples()
    for kind in ("kfac", "block"):
        options = IndexOptions(preconditioner=kind, mix=0.6, damping=0.05)
        index = GradientIndex.build(
            store, options, path=tmp_path / f"{kind}.index", eval_store=eval_store, progress=False
        )
        engine = QueryEngine(logged.task, store, index, residency="one")  # weights paths from the store
        expected = 0.0
        for name, lr in zip(logged.names, (0.1, 0.03)):
            train = store.read(name)[1].astype(np.float64)
            R = dense_curvature(kind, train, eval_store.read(name)[1], 0.6, 0.05, store.spec)
            expected = expected + lr * logged.projected(name, queries, store) @ np.linalg.solve(R, train.T)
        response = engine.influence(examples=queries, top_k=5)
        ids = np.arange(expected.shape[1])
        for q, result in enumerate(response.results):
            assert [p.id for p in result.proponents] == np.lexsort((ids, -expected[q]))[:5].tolist()
            assert [p.id for p in result.opponents] == np.lexsort((ids, expected[q]))[:5].tolist()
            assert [p.score for p in result.proponents] == pytest.approx(
                expected[q][[p.id for p in result.proponents]], rel=1e-4
            )


# -- errors ---------------------------------------------------------------------------------------


def test_payload_the_task_rejects_names_the_query(run):
    engine = run["engines"]["all"]
    bad = [run["payloads"][0], {"x": [0.0] * 10, "y": 7}, run["payloads"][1]]
    with pytest.raises(QueryError, match=r"query 1 rejected by QueryMLPTask: \"y\" must be a class in 0\.\.2, got 7"):
        engine.influence(bad)
    with pytest.raises(QueryError, match=r"query 0 rejected by QueryMLPTask: \"x\" must be a list of 10 numbers"):
        engine.influence([{"x": "nope", "y": 0}])
    assert isinstance(QueryError("x"), ValueError)


def test_unknown_checkpoints_are_refused(run):
    engine = run["engines"]["all"]
    with pytest.raises(
        CheckpointNotFoundError, match=r"unknown checkpoints \['nope'\]; the index has \['ckpt-0', 'ckpt-1', 'ckpt-2'\]"
    ):
        engine.influence(run["payloads"], checkpoints=["ckpt-0", "nope"])
    with pytest.raises(CheckpointNotFoundError, match="unknown checkpoints"):
        engine.self_influence(checkpoints=["ckpt-9"])
    with pytest.raises(QueryError, match="at least one checkpoint"):
        engine.influence(run["payloads"], checkpoints=[])


def test_bad_options_and_vectors_are_refused(run):
    engine = run["engines"]["all"]
    with pytest.raises(QueryError, match="lr_weighting must be"):
        engine.influence(run["payloads"], lr_weighting="cosine")
    with pytest.raises(QueryError, match="top_k must be at least 1"):
        engine.influence(run["payloads"], top_k=0)
    with pytest.raises(QueryError, match="normalize=False"):
        engine.influence(run["payloads"], normalize=True)
    dim = run["store"].dim
    with pytest.raises(QueryError, match=rf"shape \[B, 2, {dim}\]"):
        engine.influence(vectors=np.zeros((1, 3, dim)), checkpoints=["ckpt-0", "ckpt-1"])
    with pytest.raises(QueryError, match="NaN or Inf"):
        engine.influence(vectors=np.full((1, 3, dim), np.nan))
    with pytest.raises(QueryError, match="exactly one of"):
        engine.influence(run["payloads"], vectors=np.zeros((1, 3, dim)))
    with pytest.raises(QueryError, match="mean lr is not zero"):
        lr_weights([0.0, 0.0], "normalized")


def test_request_models_are_the_engines_options(run):
    """The engine answers the request models; its keyword methods build them (their defaults and rules)."""
    from gradstore.server.run.config import ConfigError
    from gradstore.server.run.schemas import InfluenceOptions, InfluenceRequest, SelfInfluenceRequest

    engine = run["engines"]["all"]
    options = dict(top_k=6, lr_weighting="uniform", checkpoints=["ckpt-2", "ckpt-0"])
    answer = engine.answer_influence(InfluenceRequest(queries=run["payloads"], **options))
    _check_lists(run, answer, _expected(run, "uniform", ["ckpt-2", "ckpt-0"])[1], k=6, checkpoints=["ckpt-2", "ckpt-0"])
    keyword = engine.influence(run["payloads"], **options)
    for a, b in zip(answer.results, keyword.results):
        assert a.model_dump() == b.model_dump()
    # already-built examples take the options alone; defaults are the model's (top_k 10, schedule, loss)
    by_examples = engine.answer_influence(InfluenceOptions(), examples=run["queries"])
    assert len(by_examples.results[0].proponents) == 10
    assert (by_examples.lr_weighting, by_examples.measurement) == ("schedule", "loss")
    _check_lists(run, by_examples, _expected(run, "schedule")[1], k=10)
    assert [len(r.proponents) for r in engine.influence(run["payloads"]).results] == [10] * len(run["payloads"])
    assert len(engine.self_influence().results) == 20
    assert engine.answer_self_influence(SelfInfluenceRequest(top_k=3)).model_dump(exclude={"took_ms"}) == (
        engine.self_influence(top_k=3).model_dump(exclude={"took_ms"})
    )
    with pytest.raises(QueryError, match="exactly one of"):
        engine.answer_influence(InfluenceRequest(queries=run["payloads"]), examples=run["queries"])
    with pytest.raises(QueryError, match="exactly one of"):
        engine.answer_influence(InfluenceOptions())
    with pytest.raises(QueryError, match=r"^measurement must be 'loss' or 'measurement', got 'margin'$"):
        engine.influence(run["payloads"], measurement="margin")
    with pytest.raises(QueryError, match=r"^topk: Extra inputs are not permitted$"):
        engine.influence(run["payloads"], topk=3)
    with pytest.raises(QueryError, match=r"^top_k must be at least 1, got 0$"):
        engine.self_influence(top_k=0)
    with pytest.raises(ConfigError, match=r"residency must be one of \('all', 'one'\), got 'some'"):
        QueryEngine(run["logged"].task, run["store"], run["index"], run["logged"].weights, residency="some")


def test_changed_weights_file_is_refused(run, tmp_path):
    logged = run["logged"]
    changed = tmp_path / "changed.pt"
    model = logged.model_at("ckpt-2")
    sgd_steps(model, logged.task, steps=1, lr=0.1)
    torch.save(model.state_dict(), changed)
    with pytest.raises(CheckpointMismatchError, match="sha256 mismatch"):
        QueryEngine(logged.task, run["store"], run["index"], {**logged.weights, "ckpt-2": changed})
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        QueryEngine(logged.task, run["store"], run["index"], {**logged.weights, "ckpt-1": tmp_path / "missing.pt"})


def test_stale_index_after_another_checkpoint_then_rebuild(run, tmp_path):
    """Logging another checkpoint makes the index stale; rebuild() restores the same answers."""
    logged = run["logged"]
    store_path = tmp_path / "run.zarr"
    shutil.copytree(logged.store_path, store_path)
    index_path = tmp_path / "run.index"
    shutil.copytree(run["index"].path, index_path)
    GradientIndex.open(index_path, GradientStore.open(store_path))  # a faithful copy opens
    model = logged.model_at("ckpt-2")
    with GradientLogger(
        model, logged.task, store=store_path, spec=run["store"].spec, dtype="float32", progress=False
    ) as logger:
        logger.log_checkpoint("ckpt-3", lr=0.01, batch_size=48)
    store = GradientStore.open(store_path)
    with pytest.raises(StaleIndexError, match="changed after index"):
        GradientIndex.open(index_path, store)
    index = GradientIndex.rebuild(index_path, store, progress=False)
    assert index.checkpoints == logged.names
    engine = QueryEngine(logged.task, store, GradientIndex.open(index_path, store), logged.weights)
    response = engine.influence(run["payloads"], top_k=5, lr_weighting="uniform")
    _check_lists(run, response, _expected(run, "uniform")[1], k=5)
