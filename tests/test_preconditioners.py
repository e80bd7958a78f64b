"""EK-FAC and SOURCE preconditioners (issue 11, "Tests that must pass" 1) against dense references.

The references are built here from the same stored vectors, independently of projection/ekfac.py and source.py:
dense float64 ``[D, D]`` matrices per checkpoint, block-diagonal over layers. EK-FAC: ``S``, ``A`` as sums of outer
products, their eigenvectors, ``Q = Q_S kron Q_A``, eigenvalues ``diag(Q^T R Q)`` of the layer's full second moment
``R = E[g g^T]``, ``H = Q diag(Lambda + damping * mean(Lambda)) Q^T``. SOURCE: ``scipy.linalg.expm`` of
``-eta_c K_c H_c`` and ``np.linalg.inv(H_c)``, ``B_c = E_L ... E_{c+1} (I - E_c) H_c^{-1}``, scores
``sum_c w_c q_L^T B_c g_c``. Index scores, self-influence and the top-k of every index kind must agree to 1e-6
(relative to the largest |score|); the engine end to end on a logged MLP (its query gradient at the final checkpoint,
``explain``'s shares summing to the stored score).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from gradstore.projection import (
    CurvatureStats,
    EigenvalueStats,
    EkfacCurvature,
    Preconditioner,
    PreconditionerError,
    kronecker_eigenbases,
    mixed_means,
    training_intervals,
)
from gradstore.server.run.engine import QueryEngine, QueryError
from gradstore.store import KINDS, CheckpointInfo, GradientIndex, GradientStore, IndexMismatchError, IndexOptions

from .helpers.search import (
    QueryMLPTask,
    all_scores,
    dense_curvature,
    gradient_like,
    log_mlp_run,
    payload,
    synthetic_spec,
)
from .helpers.search import write_store as write_rows

TOL = 1e-6
STEPS = (10, 25, 45)
LRS = (0.3, 0.1, 0.05)
NAMES = ("c0", "c1", "c2")
DAMPING = 0.05


def _write(path, spec, data, steps):
    """A float32 store ``{name: (lr, rows)}`` whose checkpoints record ``steps`` (None: no step)."""
    store = GradientStore.open_or_create(path, spec, dtype="float32", chunk_rows=64)
    for (name, (lr, _)), step in zip(data.items(), steps):
        store.begin_checkpoint(CheckpointInfo(name=name, lr=lr, step=step))
    return write_rows(path, spec, data, chunk_rows=64)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two layers (k = 12 and 15), three checkpoints of 150 anisotropic rows scaled so ``eta K H`` spans ~0.1-10."""
    directory = tmp_path_factory.mktemp("precond")
    rng = np.random.default_rng(5)
    spec = synthetic_spec([("a", 4, 3), ("b", 3, 5)])
    train, evals = {}, {}
    for name, lr, steps in zip(NAMES, LRS, np.diff((0, *STEPS))):
        scale = rng.lognormal(0.0, 1.0, size=spec.dim)
        rows = gradient_like(rng, 150, spec.dim, clusters=5, rank=6)[0].astype(np.float64) * scale
        rows *= np.sqrt(0.5 / (lr * steps) / (rows**2).mean())  # mean eigenvalue ~ 0.5 / (eta K)
        train[name] = (lr, rows.astype(np.float32))
        eval_rows = gradient_like(rng, 80, spec.dim, clusters=5, rank=6)[0] * scale[::-1]
        evals[name] = (lr, eval_rows.astype(np.float32))
    store = _write(directory / "train.zarr", spec, train, STEPS)
    eval_store = write_rows(directory / "eval.zarr", spec, evals, chunk_rows=64)
    queries = rng.normal(size=(4, len(NAMES), spec.dim)).astype(np.float32)
    return store, eval_store, queries, directory


# -- independent dense references -----------------------------------------------------------------------------


def dense_ekfac(train: np.ndarray, eval: np.ndarray | None, mix: float, damping: float, spec) -> np.ndarray:
    """The damped EK-FAC curvature ``[D, D]`` (block-diagonal over layers), dense."""
    H = np.zeros((spec.dim, spec.dim))
    for layer in spec.layers:
        sl = layer.slice

        def moments(rows, layer=layer, sl=sl):
            g = rows[:, sl].astype(np.float64)
            m = g.reshape(len(g), layer.k_out, layer.k_in)
            return sum(mi @ mi.T for mi in m) / len(m), sum(mi.T @ mi for mi in m) / len(m), g.T @ g / len(g)

        S, A, R = moments(train)
        if eval is not None:
            S, A, R = (mix * e + (1 - mix) * t for t, e in zip((S, A, R), moments(eval)))
        Q = np.kron(np.linalg.eigh(S)[1], np.linalg.eigh(A)[1])  # columns: eigenvectors of S kron A (row-major vec)
        lam = np.diag(Q.T @ R @ Q)
        H[sl, sl] = Q @ np.diag(lam + damping * lam.mean()) @ Q.T
    return H


def dense_source(store: GradientStore, names, damping: float) -> list[np.ndarray]:
    """``B_c = expm(-eta_L K_L H_L) ... expm(-eta_{c+1} K_{c+1} H_{c+1}) (I - expm(-eta_c K_c H_c)) H_c^{-1}``."""
    infos = [store.checkpoint_info(name) for name in names]
    steps = np.diff([0] + [info.step for info in infos])
    eye = np.eye(store.dim)
    E, F = [], []
    for name, info, k in zip(names, infos, steps):
        H = dense_ekfac(store.read(name)[1], None, 0.0, damping, store.spec)
        E.append(scipy.linalg.expm(-info.lr * k * H))
        F.append((eye - E[-1]) @ np.linalg.inv(H))
    out = []
    for c in range(len(names)):
        B = F[c]
        for later in E[c + 1 :]:
            B = later @ B
        out.append(B)
    return out


def _reference(store, names, raw, weights, transforms, final_query: bool, normalize: bool = False):
    """Dense ``[B, N]`` scores ``sum_c w_c <q, B_c g_c>`` and ``[N]`` self-influence.

    ``transforms[c]`` is the full ``B_c``: ``H_c^{-1}`` for a symmetric kind (its query ``q_c``), SOURCE's ``B_c``
    (its query ``q_L``). Normalised: cosines in the symmetric kind's metric, or of ``q_L`` and ``B_c g_c``."""
    train_final = store.read(names[-1])[1].astype(np.float64)
    scores, self_inf = 0.0, 0.0
    for c, name in enumerate(names):
        g = store.read(name)[1].astype(np.float64)
        B = transforms[c]
        q = raw[:, -1 if final_query else c].astype(np.float64)
        dots = q @ B @ g.T
        own = train_final if final_query else g
        self_dots = np.einsum("nd,nd->n", own, g @ B.T)
        if normalize:
            if final_query:
                q_norm, g_norm = np.linalg.norm(q, axis=1), np.linalg.norm(g @ B.T, axis=1)
            else:
                q_norm, g_norm = np.sqrt(np.einsum("bd,bd->b", q, q @ B)), np.sqrt(self_dots)
            dots = dots / q_norm[:, None] / g_norm[None, :]
        scores = scores + weights[c] * dots
        self_inf = self_inf + weights[c] * self_dots
    return scores, self_inf


def _max_rel(actual, expected) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# -- ekfac --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
@pytest.mark.parametrize("use_eval", [False, True], ids=["train-only", "eval-mix"])
def test_ekfac_equals_dense_reference(stores, use_eval, normalize):
    store, eval_store, raw, directory = stores
    eval_store = eval_store if use_eval else None
    mix = 0.7
    options = IndexOptions(preconditioner="ekfac", mix=mix, damping=DAMPING, normalize=normalize)
    index = GradientIndex.build(
        store, options, path=directory / f"ekfac-{use_eval}-{normalize}.index", eval_store=eval_store, progress=False
    )
    curvatures = []
    for name in NAMES:
        train = store.read(name)[1]
        curvatures.append(
            dense_ekfac(train, eval_store.read(name)[1] if eval_store else None, mix, DAMPING, store.spec)
        )
    weights = list(LRS)
    expected, expected_self = _reference(
        store, NAMES, raw, weights, [np.linalg.inv(H) for H in curvatures], final_query=False, normalize=normalize
    )
    error = _max_rel(all_scores(index, raw, weights), expected)
    print(f"ekfac eval={use_eval} normalize={normalize}: max relative error {error:.2e}")
    assert error < TOL
    assert _max_rel(index.self_influence(weights).sum(1), expected_self) < TOL
    if normalize:
        return
    # not vacuous: EK-FAC's eigenvalues differ from KFAC's Kronecker products of eigenvalues, and from no curvature
    evals = {n: eval_store.read(n)[1] if eval_store else None for n in NAMES}
    kfac = [np.linalg.inv(dense_curvature("kfac", store.read(n)[1], evals[n], mix, DAMPING, store.spec)) for n in NAMES]
    kfac_scores, _ = _reference(store, NAMES, raw, weights, kfac, final_query=False)
    assert _max_rel(kfac_scores / np.abs(kfac_scores).max(), expected / np.abs(expected).max()) > 1e-2
    identity, _ = _reference(store, NAMES, raw, weights, [np.eye(store.dim)] * 3, final_query=False)
    assert np.corrcoef(identity.ravel(), expected.ravel())[0, 1] < 0.95


# -- source -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cosine"])
def test_source_equals_dense_reference(stores, normalize):
    store, eval_store, raw, directory = stores
    options = IndexOptions(preconditioner="source", damping=DAMPING, normalize=normalize, mix=0.3)
    # the eval store is ignored: H describes the training dynamics
    index = GradientIndex.build(
        store, options, path=directory / f"source-{normalize}.index", eval_store=eval_store, progress=False
    )
    assert index.manifest.eval_store is None
    B = dense_source(store, NAMES, DAMPING)
    noisy = raw.copy()
    noisy[:, :-1] = 1e3  # only the final checkpoint's query gradient is read
    for weights in ([1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]):
        expected, expected_self = _reference(store, NAMES, raw, weights, B, final_query=True, normalize=normalize)
        error = _max_rel(all_scores(index, noisy, weights), expected)
        print(f"source weights={weights} normalize={normalize}: max relative error {error:.2e}")
        assert error < TOL
        assert _max_rel(index.self_influence(weights).sum(1), expected_self) < TOL
    assert index.query_checkpoints([1.0, 0.0, 0.0]).tolist() == [False, False, True]
    if normalize:
        return
    # not vacuous: the backward exp factors and (I - exp) H^-1 are far from TracIn's eta K I and from ekfac at c_L
    g = [store.read(n)[1].astype(np.float64) for n in NAMES]
    tracin = sum(lr * k * raw[:, -1].astype(np.float64) @ gc.T for lr, k, gc in zip(LRS, np.diff((0, *STEPS)), g))
    assert np.corrcoef(tracin.ravel(), expected.ravel())[0, 1] < 0.95
    forgotten = np.abs(np.linalg.eigvalsh(dense_ekfac(g[-1], None, 0, DAMPING, store.spec))).max()
    assert LRS[-1] * (STEPS[-1] - STEPS[-2]) * forgotten > 3  # the last segment forgets its stiffest directions


def test_source_refuses_stores_without_increasing_steps(stores, tmp_path):
    store, _, _, _ = stores
    spec = store.spec
    rows = {name: (lr, store.read(name)[1]) for name, lr in zip(NAMES, LRS)}
    cases = {
        "none": ((10, None, 30), r"checkpoints \['c1'\] have none; record the steps when logging"),
        "equal": ((10, 10, 30), r"steps to increase in index order .* got \{'c0': 10, 'c1': 10, 'c2': 30\}"),
        "negative": ((-1, 10, 30), r"steps to increase in index order"),
    }
    for label, (steps, message) in cases.items():
        bad = _write(tmp_path / f"{label}.zarr", spec, rows, steps)
        with pytest.raises(PreconditionerError, match=message) as info:
            GradientIndex.build(bad, IndexOptions(preconditioner="source"), progress=False)
        assert isinstance(info.value, ValueError)
        assert not (tmp_path / f"{label}.index").exists()
        GradientIndex.build(bad, IndexOptions(preconditioner="ekfac"), progress=False)  # ekfac needs no steps
    # checkpoints indexed out of training order
    with pytest.raises(PreconditionerError, match="index the checkpoints in training order"):
        options = IndexOptions(preconditioner="source")
        GradientIndex.build(store, options, path=tmp_path / "x.index", checkpoints=["c1", "c0"], progress=False)
    # a request with another preconditioner than the index's build is refused (the manifest's build key)
    built = GradientIndex.build(store, IndexOptions(preconditioner="source"), path=tmp_path / "s.index", progress=False)
    with pytest.raises(IndexMismatchError, match="preconditioner"):
        GradientIndex.open(built.path, store, options=IndexOptions(preconditioner="ekfac"))


@pytest.mark.parametrize("preconditioner", ["ekfac", "source"])
def test_every_index_kind_serves_the_exact_top_k(stores, preconditioner):
    store, _, raw, directory = stores
    weights = [1.0, 1.0, 1.0] if preconditioner == "source" else list(LRS)
    if preconditioner == "source":
        transforms, final = dense_source(store, NAMES, DAMPING), True
    else:
        transforms, final = (
            [np.linalg.inv(dense_ekfac(store.read(n)[1], None, 0, DAMPING, store.spec)) for n in NAMES],
            False,
        )
    expected, _ = _reference(store, NAMES, raw, weights, transforms, final_query=final)
    rows = np.arange(expected.shape[1])
    k = 7
    for kind in KINDS:
        # nprobe = nlist and k * rerank >= N: every kind must give the exact lists (a plumbing test, not recall)
        options = IndexOptions(kind=kind, preconditioner=preconditioner, damping=DAMPING, nlist=2, nprobe=2, rerank=30)
        index = GradientIndex.build(store, options, path=directory / f"{preconditioner}-{kind}.index", progress=False)
        reopened = GradientIndex.open(index.path, store, options=options)
        found = reopened.search(raw, weights, k)
        for b in range(len(raw)):
            top = np.lexsort((rows, -expected[b]))[:k]
            bottom = np.lexsort((rows, expected[b]))[:k]
            assert found.proponent_rows[b].tolist() == top.tolist(), kind
            assert found.opponent_rows[b].tolist() == bottom.tolist(), kind
            scale = np.abs(expected[b]).max()
            assert np.abs(found.proponent_scores[b] - expected[b, top]).max() < TOL * scale
            assert np.abs(found.proponent_contributions[b].sum(1) - found.proponent_scores[b]).max() < 1e-9 * scale


# -- the engine ---------------------------------------------------------------------------------------------------


def test_engine_source_queries_the_final_checkpoint(tmp_path):
    """A logged MLP (steps 0, 5, 10: the first segment is empty), the engine's payload queries, vectors, weightings,
    self-influence and explanations against the dense SOURCE reference."""
    logged = log_mlp_run(tmp_path, lrs=(0.1, 0.05, 0.02), n=48)
    store = GradientStore.open(logged.store_path)
    index = GradientIndex.build(store, IndexOptions(preconditioner="source", damping=DAMPING), progress=False)
    engine = QueryEngine(logged.task, store, index, logged.weights)
    queries = QueryMLPTask(n=3, seed=1).train_examples()
    q = logged.projected(logged.names[-1], queries, store)  # [3, D] by an independent logger at the final weights
    raw = np.zeros((len(q), 3, store.dim))
    raw[:, -1] = q
    B = dense_source(store, logged.names, DAMPING)
    expected, expected_self = _reference(store, logged.names, raw, [1.0, 1.0, 1.0], B, final_query=True)
    response = engine.influence([payload(x) for x in queries], top_k=5, lr_weighting="uniform")
    from_vectors = engine.influence(vectors=q[:, None].astype(np.float32), top_k=5)  # the default: uniform
    assert from_vectors.lr_weighting == "uniform"
    for b, result in enumerate(response.results):
        scale = np.abs(expected[b]).max()
        top = np.lexsort((np.arange(expected.shape[1]), -expected[b]))[:5]
        assert [p.id for p in result.proponents] == top.tolist()
        assert [p.id for p in from_vectors.results[b].proponents] == top.tolist()
        for p in result.proponents:
            assert abs(p.score - expected[b, p.id]) < 1e-4 * scale  # query gradients recomputed in float32
            assert p.contributions["ckpt-0"] == 0.0  # step 0: an empty segment
    for weighting in ("schedule", "normalized"):
        with pytest.raises(QueryError, match=f"lr_weighting='{weighting}' would apply the lr twice"):
            engine.influence(examples=queries[:1], lr_weighting=weighting)
        with pytest.raises(QueryError, match="would apply the lr twice"):
            engine.self_influence(lr_weighting=weighting)
    with pytest.raises(QueryError, match=r"vectors must have shape \[B, 1, \d+\] \(the query gradient at the final"):
        engine.influence(vectors=raw.astype(np.float32), lr_weighting="uniform")
    top_self = engine.self_influence(top_k=4, lr_weighting="uniform")
    best = np.lexsort((np.arange(len(expected_self)), -expected_self))[:4]
    assert [r.id for r in top_self.results] == best.tolist()
    assert top_self.results[0].score == pytest.approx(expected_self[best[0]], rel=1e-5)
    # explain: the training gradient's shares, mapped by T_c^T, sum to the index's own score
    example_id = response.results[0].proponents[0].id
    answer = engine.explain(payload(queries[0]), example_id, lr_weighting="uniform", checkpoints=["ckpt-1", "ckpt-2"])
    assert answer.score == pytest.approx(answer.stored_score, rel=1e-4)
    assert sum(t.share for t in answer.tokens) + answer.rest == pytest.approx(answer.score, rel=1e-6)


# -- the maps themselves ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preconditioner", ["kfac", "block", "ekfac", "source"])
def test_adjoint_is_the_transpose_of_apply(stores, preconditioner):
    """``<v, T g> = <T^T v, g>``: what ``explain`` relies on to split a score over positions."""
    store, _, raw, directory = stores
    options = IndexOptions(preconditioner=preconditioner)
    index = GradientIndex.build(store, options, path=directory / f"adj-{preconditioner}.index", progress=False)
    rng = np.random.default_rng(0)
    for name, p in index.preconditioners.items():
        g, v = rng.normal(size=store.dim), rng.normal(size=store.dim)
        lhs = float(v @ p.apply(g[None]).astype(np.float64)[0])
        assert lhs == pytest.approx(float(p.adjoint(v) @ g), rel=1e-6), name


def _curvature(rows: np.ndarray, spec) -> EkfacCurvature:
    kfac = CurvatureStats("kfac", spec.layers)
    kfac.update(rows)
    eigen = EigenvalueStats(spec.layers, kronecker_eigenbases(mixed_means(kfac, None, 0.0)))
    eigen.update(rows)
    return EkfacCurvature.fit(eigen)


def test_a_layer_without_gradient_stays_finite():
    """ekfac drops it (as kfac does); source needs no drop: ``(1 - exp(-eta K s)) / s -> eta K`` as ``s -> 0``."""
    rng = np.random.default_rng(1)
    spec = synthetic_spec([("live", 4, 3), ("dead", 3, 2)])
    alone = synthetic_spec([("live", 4, 3)])
    live, dead = spec.layer("live").slice, spec.layer("dead").slice
    rows = [gradient_like(rng, 60, spec.dim, clusters=3, rank=4)[0].astype(np.float64) for _ in range(2)]
    for r in rows:
        r[:, dead] = 0.0
    query = rng.normal(size=(3, spec.dim))
    ekfac = Preconditioner.ekfac(_curvature(rows[0], spec), damping=0.1)
    out = ekfac.apply(query)
    assert np.isfinite(out).all() and not out[:, dead].any()
    expected = Preconditioner.ekfac(_curvature(rows[0][:, live], alone), damping=0.1).apply(query[:, live])
    np.testing.assert_allclose(out[:, live], expected, rtol=1e-6)
    schedule = training_intervals(["c0", "c1"], [5, 12], [0.2, 0.1])
    both = Preconditioner.source([_curvature(r, spec) for r in rows], schedule, damping=0.1)
    single = Preconditioner.source([_curvature(r[:, live], alone) for r in rows], schedule, damping=0.1)
    for full, part in zip(both, single):
        out = full.apply(query)
        np.testing.assert_allclose(out[:, live], part.apply(query[:, live]), rtol=1e-6)
    # no curvature in the dead layer: nothing is forgotten (S = I) and F = eta K I
    np.testing.assert_allclose(both[0].apply(query)[:, dead], 0.2 * 5 * query[:, dead], rtol=1e-6)
    np.testing.assert_allclose(both[1].apply(query)[:, dead], 0.1 * 7 * query[:, dead], rtol=1e-6)
