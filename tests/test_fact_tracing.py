"""Known-answer fact tracing (issue 3, "Tests that must pass" item 4).

A one-block causal LM (:class:`tests.models.TinyCausalLM`, d = 32) is trained with Adam (600 steps, lr
1e-2 decaying linearly to 1e-3) on 240 sequences: 60 facts "subject relation -> object" (20 subjects x 3
relations, 16 objects shared between facts), each stated by 3 sequences with different templates (two with
random filler words), scattered among each other and 60 pure-filler distractors. Gradients (rank 16 per
side, D = 1648) are logged at steps 200, 400 and 600, with and without TrackStar's Adam correction, plus an
eval store of a second held-out phrasing of every fact (``eval_examples()``, for ``R_eval``). Each fact is
queried with a phrasing whose template never occurs in training (relation, then the token ``OF``, which no
training sequence holds, then subject), its loss on the object token only; a setting's MRR is the mean
reciprocal rank of the first of the fact's 3 sequences among all 240, its recall@10 the fraction of the 3 in
the top 10 (see ``tests/facts.py``).

The unseen ``OF`` is issue 9's test 4: Adam's ``exp_avg_sq`` is exactly zero in its embedding column, and
before the correction zeroed such columns, dividing by ``~eps`` made that column dominate every query: with
this template all five Adam settings fell to chance (seed 0: MRR 0.06-0.08, recall@10 0.03-0.08).

Measured (CPU, torch 2.13, 1 thread; seed 0 is the one tested, seeds 1-5 show the spread):

    setting                                    seed 0 MRR  R@10   | seeds 0-5 MRR (min)  R@10 (min)
    TracIn (identity)                              0.414   0.328  |  0.350-0.598 (0.350)  (0.311)
    cosine                                         0.494   0.400  |  0.453-0.734 (0.453)  (0.361)
    kfac + cosine                                  0.677   0.611  |  0.488-0.849 (0.488)  (0.517)
    Adam + identity                                0.495   0.422  |  0.369-0.632 (0.369)  (0.328)
    Adam + cosine                                  0.616   0.461  |  0.511-0.812 (0.511)  (0.389)
    TrackStar: Adam + kfac + cosine                0.699   0.628  |  0.485-0.880 (0.485)  (0.528)
    TrackStar: Adam + block + cosine               0.723   0.506  |  0.493-0.899 (0.493)  (0.439)
    TrackStar: Adam + kfac + cosine + R_eval 0.99  0.421   0.283  |  0.367-0.637 (0.367)  (0.250)
    chance (random ranking of 240, 3 relevant)     0.057   0.042

Every setting is several times chance; unit normalisation, the curvature preconditioner and the Adam
correction each help at seed 0, and TrackStar (Adam + kfac + cosine) is ahead of plain TracIn at all six
seeds (by 0.01-0.33 MRR; 0.01 at seed 4). Mixing in ``R_eval`` at TrackStar's lambda = 0.99 hurts here, at
every seed (with the earlier query template, which had no unseen token, lambda 0.1-0.5 moved MRR by -0.09 to
+0.06 at seeds 0-2; using half the facts' phrasings for ``R_eval`` and querying the other half did not help
either): the eval phrasings are each about one fact, so ``R_eval`` spans the fact-specific directions the
queries are scored on, and whitening divides them away.

The floors below sit under the minimum over the six seeds, not just under seed 0: the run is seeded and
deterministic, but a different BLAS could change the training trajectory, which at worst acts like
another seed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from .helpers.facts import OF, SETTINGS, chance_levels, trace_facts

TRACKSTAR = ("TrackStar: Adam + kfac + cosine", "TrackStar: Adam + block + cosine")
FLOOR_ALL = (0.12, 0.12)  # (MRR, recall@10) for every setting: > 2x / ~3x chance; measured minima 0.350 / 0.250
FLOOR_TRACKSTAR = (0.33, 0.25)  # ~6x chance; measured minima 0.485 / 0.439


@contextlib.contextmanager
def _single_threaded():
    """Tiny matrices: one thread is fastest and avoids oversubscription when other tests run alongside."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    try:
        with limits:
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_fact_tracing_known_answers(tmp_path):
    with _single_threaded():
        task, table = trace_facts(tmp_path, seed=0)
    assert list(table) == list(SETTINGS)
    # every query holds a token that no training sequence does (its Adam second moment is exactly zero)
    assert OF not in set(torch.cat([ids for ids, _ in task.train_examples()]).tolist())
    assert all(OF in ids.tolist() for ids, _ in task.queries)
    n = len(task.train_examples())
    chance_mrr, chance_recall = chance_levels(n, relevant=3)

    print(f"\nfact tracing: {len(task.facts)} facts x 3 sequences + distractors = {n} training sequences")
    print(f"{'setting':56s} {'MRR':>6s} {'R@10':>6s}")
    for name, (mrr, recall) in table.items():
        print(f"{name:56s} {mrr:6.3f} {recall:6.3f}")
    print(f"{'chance':56s} {chance_mrr:6.3f} {chance_recall:6.3f}")

    for name, (mrr, recall) in table.items():
        assert mrr >= FLOOR_ALL[0] and recall >= FLOOR_ALL[1], f"{name}: MRR {mrr:.3f}, recall@10 {recall:.3f}"
    for name in TRACKSTAR:
        mrr, recall = table[name]
        ok = mrr >= FLOOR_TRACKSTAR[0] and recall >= FLOOR_TRACKSTAR[1]
        assert ok, f"{name}: MRR {mrr:.3f}, recall@10 {recall:.3f}"
    # TrackStar's corrections pay off: ahead of plain TracIn at every seed measured (by 0.29 at seed 0)
    assert table["TrackStar: Adam + kfac + cosine"][0] > table["TracIn (identity)"][0]
