"""Per-token explanations (issue 10, "Tests that must pass" 4) and the marking of wrong-signed proponents/opponents.

1. ``GradientProjector.project_positions`` is exact on every part kind (embeddings, shared positions, Linear,
   HF Conv1D, tied heads with and without their own bias, LayerNorm / RMSNorm / BatchNorm, MHA in-projection,
   convolutions, a T = 1 MLP): ``per_position.sum(0) + rest`` equals ``project([example])[0]``, and the terms of
   both embeddings of a tiny LM at position t equal exact torch.func gradients of that position.
2. On a run logged offline in float32 with Adam states, for identity, kfac + cosine and block indexes:
   ``sum(shares) + rest == score`` and ``score == stored_score`` (the index's score of the pair), for any
   checkpoint subset and lr weighting.
3. A tiny causal LM trained on filler text (a fixed cycle, learned fast) with planted fact pairs ``A_k B_k``: for
   each fact, the best-scored training document stating it has its largest share on ``A_k`` or ``B_k``, and those
   two positions carry most of its score.
4. ``POST /v1/explain`` and the SDK (sync and async) return the engine's answer; unknown ids are 404, bad payloads
   and options 422.
5. Every proponent / opponent carries a ``role`` from its score's sign.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from gradstore.logger import GradientLogger, GradientProjector, TaskError
from gradstore.projection import build_matrices
from gradstore.projection.reference import project_dense
from gradstore.server.client import AsyncClient, Client, InvalidRequestError
from gradstore.server.http.app import create_app
from gradstore.server.run.engine import QueryEngine, QueryError
from gradstore.store import GradientIndex, GradientStore, IndexOptions, UnknownExampleError

from .helpers.facts import TargetLossTask
from .helpers.models import LMTask, MLPTask, TinyCausalLM, per_example_parameter_grads
from .test_architectures import (
    CausalLMTask,
    ClassifierTask,
    EncoderClassifier,
    ImageTask,
    _Tied,
    cnn,
    gpt2,
    llama,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")

SUM_TOL = 1e-5  # project_positions vs project (float32 sums in another order)
STORED_TOL = 1e-4  # explain's recomputed score vs the index's score from the stored float32 rows


# -- 1. the projector's per-position mode -------------------------------------------------------------------


MODELS = {  # name -> (model, task) builders
    "tiny-lm": lambda: (LMTask(n=4).build_model(), LMTask(n=4)),
    "mlp": lambda: (MLPTask(n=4).build_model(), MLPTask(n=4)),
    "gpt2-tied": lambda: (gpt2(), CausalLMTask(n=4, lengths=(3, 7))),
    "tied-head-bias": lambda: (_Tied(), CausalLMTask(n=4, lengths=(3, 7), hf=False)),
    "llama-rmsnorm": lambda: (llama(), CausalLMTask(n=4, lengths=(3, 7))),
    "encoder-mha-seq-first": lambda: (
        EncoderClassifier(batch_first=False, causal=True),
        ClassifierTask(n=4, lengths=(3, 7)),
    ),
    "cnn-batchnorm": lambda: (cnn(), ImageTask(n=4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_positions_sum_to_the_projected_gradient(name):
    torch.manual_seed(0)
    model, task = MODELS[name]()
    with GradientProjector(model, task, rank=6, init="gaussian", seed=3) as projector:
        kinds = {layer.kind for layer in projector.layers}
        for example in task.train_examples()[:3]:
            split = projector.project_positions(example)
            whole = projector.project([example])[0]
            total = split.per_position.sum(0) + split.rest
            error = float((total - whole).abs().max() / whole.abs().max())
            assert error < SUM_TOL, f"{name}: per-position terms sum to the gradient within {error:.2e}"
            d = whole.numel()
            if name == "mlp":  # every Linear sees one position: all of it is position 0
                assert split.per_position.shape == (1, d) and float(split.rest.abs().max()) == 0.0
            elif name == "cnn-batchnorm":  # positions of the first conv (8x8 pixels); the rest (2nd conv, head)
                assert split.per_position.shape == (64, d) and float(split.rest.abs().max()) > 0
            elif name == "encoder-mha-seq-first":  # tokens; only the pooled head (T = 1) goes to rest
                assert len(split.per_position) == len(example[0])
                head = next(s for s in projector.spec.layers if s.name == "head").slice
                assert float(split.rest[head].abs().max()) > 0
                outside = torch.cat([split.rest[: head.start], split.rest[head.stop :]])
                assert float(outside.abs().max()) == 0.0
            else:  # text models: every call is per token (tied heads, norms, positions included), nothing left over
                tokens = len(example) - 1 if name == "tiny-lm" else len(example[0])  # LMTask's model reads ids[:-1]
                assert split.per_position.shape == (tokens, d) and float(split.rest.abs().max()) == 0.0
        if name == "gpt2-tied":
            assert {"embedding", "conv1d", "norm"} <= kinds
        if name == "tied-head-bias":
            assert "bias" in kinds


def test_positions_given_explicitly_route_other_calls_to_rest():
    """With ``positions`` naming a T no call has, everything is rest; the sum stays exact."""
    torch.manual_seed(0)
    task = LMTask(n=2)
    with GradientProjector(task.build_model(), task, rank=4) as projector:
        example = task.train_examples()[0]
        split = projector.project_positions(example, positions=len(example) + 5)
        assert split.per_position.shape[0] == len(example) + 5 and float(split.per_position.abs().max()) == 0.0
        whole = projector.project([example])[0]
        assert float((split.rest - whole).abs().max() / whole.abs().max()) < SUM_TOL
        with pytest.raises(ValueError, match="positive integer"):
            projector.project_positions(example, positions=0)


def test_embedding_terms_at_each_position_equal_exact_gradients():
    """TinyCausalLM adds ``tok(ids)`` and ``pos(arange)``, so both receive ``g_t`` at position t: the term of the
    position embedding at t is the projection of ``g_t e_t^T`` (``g_t`` = the exact gradient of its row t), and
    the token embedding's is ``g_t e_{id_t}^T``; no other position holds any of them."""
    torch.manual_seed(0)
    task = LMTask(n=3)
    model = task.build_model()
    with GradientProjector(model, task, rank=5, layers=["tok", "pos"]) as projector:
        matrices = build_matrices(projector.spec)
        for example in task.train_examples():
            split = projector.project_positions(example)
            rows = per_example_parameter_grads(model, task, [example])["pos.weight"][0]  # [max_len, d]
            inputs = example[:-1]  # the model reads ids[:-1]
            assert split.per_position.shape[0] == len(inputs)
            for t in range(len(inputs)):
                expected = {}
                for layer in projector.spec.layers:
                    canonical = torch.zeros(1, layer.d_out, layer.d_in, dtype=torch.float64)
                    column = t if layer.name == "pos" else int(inputs[t])
                    canonical[0, :, column] = rows[t]
                    expected[layer.name] = canonical
                reference = project_dense(projector.spec, matrices, expected)[0]
                got = split.per_position[t].double()
                assert float((got - reference).abs().max() / reference.abs().max()) < 1e-5, f"position {t}"


# -- the planted-fact run ---------------------------------------------------------------------------------

BOS, FILLERS, FACTS, PER_FACT, NOISE, LENGTH = 1, 12, 8, 4, 40, 8
STEPS, LR, BATCH, RANK = 100, 1e-2, 16, 8
CHECKPOINTS = (STEPS // 2, STEPS)


class PlantedTask(TargetLossTask):
    """Documents of ``LENGTH`` tokens: ``BOS`` then a fixed cycle over ``FILLERS`` filler words from a random start;
    ``PER_FACT`` documents of each fact ``k`` have the pair ``A_k B_k`` written over two of their words, at a random
    position. The loss sums every next-token prediction; a query ``{"fact": k}`` is ``BOS w w A_k B_k`` with the
    loss on ``B_k`` only. Examples are ``(ids, target)`` (target: None, or the position whose token is scored)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.fillers = list(range(2, 2 + FILLERS))
        self.keys = list(range(2 + FILLERS, 2 + FILLERS + FACTS))
        self.values = list(range(2 + FILLERS + FACTS, 2 + FILLERS + 2 * FACTS))
        self.vocab = self.values[-1] + 1

        def cycle(n: int) -> list[int]:
            start = int(torch.randint(FILLERS, (1,), generator=gen))
            return [self.fillers[(start + j) % FILLERS] for j in range(n)]

        docs: list[tuple[list[int], int | None, int | None]] = []
        for k in range(FACTS):
            for _ in range(PER_FACT):
                ids = [BOS, *cycle(LENGTH - 1)]
                at = int(torch.randint(1, LENGTH - 1, (1,), generator=gen))
                ids[at], ids[at + 1] = self.keys[k], self.values[k]
                docs.append((ids, k, at))
        docs += [([BOS, *cycle(LENGTH - 1)], None, None) for _ in range(NOISE)]
        order = torch.randperm(len(docs), generator=gen).tolist()  # fact documents scattered over the ids
        self.train = [(torch.tensor(docs[i][0]), None) for i in order]
        self.fact_of = [docs[i][1] for i in order]
        self.planted_at = [docs[i][2] for i in order]
        self.queries = [(torch.tensor([BOS, *cycle(2), self.keys[k], self.values[k]]), 4) for k in range(FACTS)]

    def build_model(self):
        return TinyCausalLM(self.vocab, d=16, max_len=LENGTH)

    def train_examples(self):
        return self.train

    def query_example(self, payload):
        fact = payload.get("fact")
        if isinstance(fact, bool) or not isinstance(fact, int) or not 0 <= fact < FACTS:
            raise ValueError(f'"fact" must be an integer in 0..{FACTS - 1}, got {fact!r}')
        return self.queries[fact]

    def _name(self, token: int) -> str:
        if token == BOS:
            return "<bos>"
        if token in self.keys:
            return f"A{self.keys.index(token)}"
        if token in self.values:
            return f"B{self.values.index(token)}"
        return f"w{token}"

    def describe(self, example):
        return {"text": " ".join(self.describe_positions(example))}

    def describe_positions(self, example):
        return [self._name(int(t)) for t in example[0]]


SETTINGS = {
    "identity": IndexOptions(),
    "kfac+normalize": IndexOptions(preconditioner="kfac", normalize=True),
    "block": IndexOptions(preconditioner="block"),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> SimpleNamespace:
    """Train with Adam, log both checkpoints offline (float32, Adam-corrected), index every setting."""
    workdir: Path = tmp_path_factory.mktemp("explain")
    task = PlantedTask()
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    examples = task.train_examples()
    logger = GradientLogger(
        task.build_model(), task, store=workdir / "s.zarr", rank=RANK, dtype="float32", progress=False
    )
    for step in range(1, STEPS + 1):
        batch = torch.randperm(len(examples), generator=gen)[:BATCH].tolist()
        optimizer.zero_grad()
        task.loss(model, task.collate([examples[i] for i in batch])).mean().backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if step in CHECKPOINTS:
            weights = workdir / f"step{step}.pt"
            torch.save(model.state_dict(), weights)
            logger.model.load_state_dict(model.state_dict())
            logger.log_checkpoint(
                f"step{step}", lr=lr, step=step, weights_path=weights, optimizer_state=optimizer.state_dict()
            )
    logger.close()
    store = GradientStore.open(workdir / "s.zarr")
    engines = {}
    for name, options in SETTINGS.items():
        index = GradientIndex.build(store, options, path=workdir / f"{name}.index", progress=False)
        engines[name] = QueryEngine(task, store, index, device="cpu")
    return SimpleNamespace(task=task, store=store, engines=engines, n=len(examples))


def _shares(response) -> np.ndarray:
    return np.array([token.share for token in response.tokens])


# -- 2. exactness against the index --------------------------------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_shares_sum_to_the_score_and_equal_the_stored_score(planted, setting):
    engine, task = planted.engines[setting], planted.task
    names = [f"step{s}" for s in CHECKPOINTS]
    worst_sum = worst_stored = 0.0
    for fact in (0, 5):
        ranked = engine.influence([{"fact": fact}], top_k=planted.n).results[0]
        scores = {p.id: p.score for p in ranked.proponents}
        scale = max(abs(s) for s in scores.values())
        noise = next(i for i in range(planted.n) if task.fact_of[i] is None)
        stating = next(i for i in range(planted.n) if task.fact_of[i] == fact)
        chosen = {ranked.proponents[0].id, ranked.opponents[0].id, noise, stating}
        for example_id in sorted(chosen):
            for options in ({}, {"checkpoints": [names[0]]}, {"checkpoints": [names[1]], "lr_weighting": "uniform"}):
                answer = engine.explain({"fact": fact}, example_id, **options)
                total = _shares(answer).sum() + answer.rest
                worst_sum = max(worst_sum, abs(total - answer.score) / abs(answer.score))
                assert total == pytest.approx(answer.score, rel=1e-5)
                assert sum(answer.contributions.values()) == pytest.approx(answer.score, rel=1e-9)
                assert answer.stored_score is not None
                worst_stored = max(worst_stored, abs(answer.score - answer.stored_score) / abs(answer.stored_score))
                assert answer.score == pytest.approx(answer.stored_score, rel=STORED_TOL, abs=1e-6 * scale)
                assert answer.checkpoints == options.get("checkpoints", names)
                assert list(answer.contributions) == answer.checkpoints == list(answer.weights)
                if not options:  # the index's search scored this pair the same way
                    assert answer.stored_score == pytest.approx(scores[example_id], rel=1e-9, abs=1e-12 * scale)
                # labels: the model reads ids[:-1] (T = 7); the 8th token is only a target, listed with share 0
                assert answer.positions == LENGTH - 1 and len(answer.tokens) == LENGTH
                assert [t.text for t in answer.tokens] == task.describe_positions(task.train_examples()[example_id])
                assert answer.tokens[-1].share == 0.0 and answer.rest == 0.0
                assert answer.example == engine.describe(example_id) and answer.example_id == example_id
    print(f"{setting}: |sum - score| / score <= {worst_sum:.1e}, |score - stored| / stored <= {worst_stored:.1e}")


class _GPT2Task(CausalLMTask):
    """Tiny HF GPT-2 (tied head); a query ``{"i": n}`` is training sequence n."""

    def build_model(self):
        torch.manual_seed(1)
        return gpt2()

    def query_example(self, payload):
        return self.train_examples()[payload["i"]]

    def describe(self, example):
        return {"length": len(example[0])}

    def describe_positions(self, example):
        return [f"t{int(token)}" for token in example[0]]


@pytest.mark.parametrize("options", [IndexOptions(), IndexOptions(preconditioner="kfac", normalize=True)])
def test_hf_gpt2_tied_explanations_equal_stored_scores(tmp_path, options):
    """Through the engine on a tied GPT-2: every position is a token (nothing in rest), and the shares add up to
    the index's score of the pair."""
    task = _GPT2Task(n=12, lengths=(3, 9))
    model = task.build_model()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, dtype="float32", progress=False) as logger:
        logger.log_checkpoint("c0", lr=0.1, weights_path=tmp_path / "w.pt")
    store = GradientStore.open(tmp_path / "s.zarr")
    index = GradientIndex.build(store, options, path=tmp_path / "s.index", progress=False)
    engine = QueryEngine(task, store, index, device="cpu")
    for example_id in range(4):
        answer = engine.explain({"i": 0}, example_id)
        example = task.train_examples()[example_id]
        assert answer.positions == len(answer.tokens) == len(example[0]) and answer.rest == 0.0
        assert _shares(answer).sum() == pytest.approx(answer.score, rel=1e-9)
        assert answer.score == pytest.approx(answer.stored_score, rel=STORED_TOL)


def test_skipped_steps_count_zero_at_their_checkpoint(planted, monkeypatch):
    """An example whose step a GradScaler skipped is a zero row there in the index, so zero in the explanation."""
    engine = planted.engines["identity"]
    example_id = 3
    whole = engine.explain({"fact": 1}, example_id)
    monkeypatch.setattr(engine, "_skipped", {"step50": {example_id}})
    answer = engine.explain({"fact": 1}, example_id)
    assert answer.contributions["step50"] == 0.0
    assert answer.contributions["step100"] == pytest.approx(whole.contributions["step100"], rel=1e-9)
    assert _shares(answer).sum() + answer.rest == pytest.approx(answer.score, rel=1e-9)


def test_one_model_residency_gives_the_same_explanation(planted):
    """``residency="one"`` loads each checkpoint's weights in turn into one model: the same shares."""
    resident = planted.engines["kfac+normalize"]
    engine = QueryEngine(planted.task, planted.store, resident.index, residency="one", device="cpu")
    for example_id in (0, 9):
        got, expected = engine.explain({"fact": 6}, example_id), resident.explain({"fact": 6}, example_id)
        np.testing.assert_allclose(_shares(got), _shares(expected), rtol=1e-6, atol=1e-9 * abs(expected.score))
        assert got.score == pytest.approx(expected.score, rel=1e-6)


def test_describe_positions_must_be_strings(planted, monkeypatch):
    engine = planted.engines["identity"]
    monkeypatch.setattr(engine.task, "describe_positions", lambda example: "not a list")
    with pytest.raises(TaskError, match="list of strings"):
        engine.explain({"fact": 0}, 0)


# -- 3. planted tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["identity", "kfac+normalize"])
def test_largest_shares_fall_on_the_planted_tokens(planted, setting):
    """For each fact, the best-scored document stating it (the one a user would click): its largest share is at
    ``A_k`` (whose computation predicts ``B_k``) or ``B_k``, and those two positions hold at least half its score
    (measured: 0.74-1.23 over the facts and settings). The best document is a fact document for most facts."""
    engine, task = planted.engines[setting], planted.task
    fractions, first_is_fact = [], 0
    for fact in range(FACTS):
        ranked = engine.influence([{"fact": fact}], top_k=planted.n).results[0].proponents
        first_is_fact += task.fact_of[ranked[0].id] == fact
        best = next(p for p in ranked if task.fact_of[p.id] == fact)
        assert best.score > 0
        answer = engine.explain({"fact": fact}, best.id)
        shares, at = _shares(answer), task.planted_at[best.id]
        assert [answer.tokens[at].text, answer.tokens[at + 1].text] == [f"A{fact}", f"B{fact}"]
        assert int(np.argmax(shares)) in (at, at + 1), f"fact {fact}: shares {np.round(shares, 4)}"
        fractions.append((shares[at] + shares[at + 1]) / answer.score)
    print(
        f"{setting}: planted share of the score per fact {np.round(fractions, 2)}; top-1 is a fact doc "
        f"for {first_is_fact}/{FACTS}"
    )
    assert min(fractions) >= 0.5
    assert first_is_fact >= FACTS // 2


# -- 4. HTTP and SDK ------------------------------------------------------------------------------------------


def _without_timing(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "took_ms"}


@pytest.fixture(scope="module")
def http(planted):
    from fastapi.testclient import TestClient

    app = create_app(engine=planted.engines["kfac+normalize"])
    with TestClient(app, raise_server_exceptions=False) as client:
        yield SimpleNamespace(app=app, client=client, engine=planted.engines["kfac+normalize"])


def test_http_explain_returns_the_engines_answer(http):
    body = {"query": {"fact": 2}, "example_id": 7, "checkpoints": ["step100"], "lr_weighting": "uniform"}
    response = http.client.post("/v1/explain", json=body)
    assert response.status_code == 200, response.text
    expected = http.engine.explain({"fact": 2}, 7, checkpoints=["step100"], lr_weighting="uniform")
    assert _without_timing(response.json()) == _without_timing(expected.model_dump(mode="json"))
    assert "/v1/explain" in http.client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"query": {"fact": 0}, "example_id": 10**6}, 404, "no training example with id 1000000"),
        ({"query": {"fact": "zero"}, "example_id": 0}, 422, '"fact" must be an integer'),
        ({"query": {"fact": 0}}, 422, "example_id"),
        ({"query": {"fact": 0}, "example_id": 0, "top_k": 3}, 422, "top_k"),
        ({"query": {"fact": 0}, "example_id": 0, "checkpoints": ["nope"]}, 422, "unknown checkpoints"),
        ({"query": {"fact": 0}, "example_id": 0, "normalize": False}, 422, "normalize=True"),
        ({"query": {"fact": 0}, "example_id": 0, "lr_weighting": "bogus"}, 422, "lr_weighting"),
    ],
    ids=["unknown-id", "bad-payload", "no-id", "extra-field", "bad-checkpoint", "normalize-mismatch", "bad-weighting"],
)
def test_http_explain_errors(http, body, status, message):
    response = http.client.post("/v1/explain", json=body)
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])


def test_sdk_explain_round_trip_sync_and_async(http):
    expected = _without_timing(http.engine.explain({"fact": 4}, 11, measurement="loss").model_dump(mode="json"))

    def forward(request: httpx.Request) -> httpx.Response:  # the sync SDK over the in-process app
        answer = http.client.request(request.method, request.url.path, content=request.content, headers=request.headers)
        return httpx.Response(answer.status_code, content=answer.content, headers=answer.headers)

    with Client("http://testserver", transport=httpx.MockTransport(forward)) as client:
        assert _without_timing(client.explain({"fact": 4}, 11, measurement="loss").model_dump(mode="json")) == expected
        with pytest.raises(InvalidRequestError, match="lr_weighting"):  # refused before sending
            client.explain({"fact": 4}, 11, lr_weighting="bogus")
        with pytest.raises(Exception) as error:
            client.explain({"fact": 4}, 10**6)
        assert getattr(error.value, "status_code", None) == 404

    async def run() -> dict:
        async with AsyncClient("http://testserver", transport=httpx.ASGITransport(app=http.app)) as client:
            return (await client.explain({"fact": 4}, 11, measurement="loss")).model_dump(mode="json")

    assert _without_timing(asyncio.run(run())) == expected


def test_engine_explain_errors_in_process(planted):
    engine = planted.engines["identity"]
    with pytest.raises(UnknownExampleError):
        engine.explain({"fact": 0}, -1)
    with pytest.raises(QueryError, match="fact"):
        engine.explain({"fact": 99}, 0)
    with pytest.raises(QueryError, match="top_k"):
        engine.explain({"fact": 0}, 0, top_k=3)


# -- 5. roles of proponents and opponents ----------------------------------------------------------------------


def test_every_listed_example_is_marked_with_its_scores_sign(planted):
    """With top_k = N both lists hold every example: the tails of each list have the other sign and say so."""
    engine = planted.engines["identity"]
    result = engine.influence([{"fact": 0}], top_k=planted.n).results[0]
    for items in (result.proponents, result.opponents):
        for item in items:
            expected = "proponent" if item.score > 0 else "opponent" if item.score < 0 else "neutral"
            assert item.role == expected
    assert result.proponents[0].role == "proponent" and result.opponents[0].role == "opponent"
    assert {p.role for p in result.proponents} >= {"proponent", "opponent"}  # the wrong-signed tail is marked
    assert [p.role for p in engine.influence([{"fact": 0}], top_k=3).results[0].proponents] == ["proponent"] * 3
    assert all(item.role is None for item in engine.self_influence(top_k=5).results)


def test_cli_explain_prints_shares_that_sum_to_the_score(demo_config, capsys):
    """`gradstore explain` on the demo run: JSON whose shares plus rest are its score, and a readable table."""
    import json as _json

    from gradstore.server.cli import main

    args = ["explain", "--config", str(demo_config), "--query", '{"test_index": 0}', "--example-id", "3"]
    main([*args, "--json"])
    answer = _json.loads(capsys.readouterr().out)
    total = sum(t["share"] for t in answer["tokens"]) + answer["rest"]
    assert abs(total - answer["score"]) <= 1e-6 * max(1.0, abs(answer["score"]))
    main(args)
    assert f"id=3  score={answer['score']:+.6g}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-1], "99999"])
    assert exit_info.value.code == 2
