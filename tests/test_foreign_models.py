"""Other people's models: every case is exact against per-example autograd, or refused naming the layer.

The cases (tests/helpers/foreign_models.py) re-create, tiny and on CPU, the models of Kronfluence's, Opacus',
Bergson's and TRAK's test suites, the torch.func per-sample-gradients tutorial, Hugging Face families built from
configs (Gemma, BART/mBART, OPT, T5, Whisper, Mixtral/Qwen2-MoE, ViT, CLIP, RoBERTa, DeBERTa-v2, ALBERT, ...), peft
LoRA, and in-training cases under ``capture()`` (tied heads written functionally, a ``torch.compile``d block,
BatchNorm in training mode, reentrant checkpointing after an unlogged layer, two loggers on one model). Several
use a sequence length equal to the batch size, where a batch dimension that is not dim 0 goes unnoticed.

A case passes when its rows are exact (full-rank orthonormal projection, relative error < 1e-4 in float32;
parameters left out are named in a warning) or when gradstore refuses it with a ``GradstoreError`` naming the
layer. SILENTLY WRONG, SILENTLY PARTIAL, an unnamed refusal and an UNEXPLAINED CRASH fail. The module prints a
table of every case's classification at the end (``benchmarks/foreign_models_report.py`` prints the same).
"""

from __future__ import annotations

import pytest
import torch

from .helpers.foreign_models import CASES, PASSING, Outcome, capture_accepts_losses, run_case, summary_table

pytest.importorskip("transformers")

_OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if not _OUTCOMES:
        return
    table = "\n" + summary_table(_OUTCOMES)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(table)
        return
    with capture.global_and_fixture_disabled():
        print(table)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_exact_or_refused(case, tmp_path):
    outcome = run_case(case, tmp_path)
    _OUTCOMES.append(outcome)
    if outcome.status == "skipped":
        pytest.skip(outcome.detail)
    assert outcome.status in PASSING, f"{case.name} ({case.source}): {outcome.status}: {outcome.detail}"


def test_capture_takes_the_batch_losses_for_its_first_batch_check():
    """``capture(..., losses=)``: the per-example losses ``[B]`` of the step, which the first-batch exactness check
    differentiates one by one (the in-training cases above pass them once the argument exists)."""
    assert capture_accepts_losses()


def test_cases_cover_the_sources_and_the_batch_equals_length_trap():
    sources = {case.source for case in CASES}
    assert {"kronfluence", "opacus", "bergson", "trak", "torch.func", "hf", "training"} <= sources
    assert len(CASES) >= 60
    assert sum("T=B" in case.name for case in CASES) >= 8
    assert len({case.name for case in CASES}) == len(CASES)
