"""The damage matrix's "follow the advice" path, end to end through the CLI (issue 21): damage a run, read the
refusal, do exactly what it says (delete what it names, run `gradstore index`), and the answers equal those of a
clean build of the same inputs; `gradstore verify` never says "intact" while an answer would be wrong."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore.demos.digits import DigitsTask

from .test_store_damage import QUERY, RUN_TOML, _cli

N, CHUNK = 48, 8
SEGMENT = "run.zarr/checkpoints/c0/pass"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("advice")
    torch.save(DigitsTask(n_train=N, hidden=16).build_model().state_dict(), run / "c0.pt")
    (run / "run.toml").write_text(RUN_TOML.format(n=N, chunk=CHUNK, kind="flat", index="run.index"))
    from gradstore.server.cli import main

    main(["index", "--config", str(run / "run.toml"), "--quiet"])
    return run


def _answers(capsys, run: Path) -> list[tuple[int, float]] | str:
    """The query's ids and scores, or the one-line refusal."""
    code, out, err = _cli(capsys, "query", "--config", run / "run.toml", "--query", QUERY, "--top-k", "5", "--json")
    if code:
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        return err
    (result,) = json.loads(out)["results"]
    return [(item["id"], item["score"]) for role in ("proponents", "opponents") for item in result[role]]


def _verify(capsys, run: Path) -> tuple[int, str]:
    code, out, _ = _cli(capsys, "verify", "--config", run / "run.toml")
    return code, out


def _clean_build(capsys, run: Path, into: Path) -> list[tuple[int, float]]:
    """The answers of a run logged and indexed from scratch with ``run``'s config and weights now."""
    into.mkdir()
    shutil.copy(run / "run.toml", into / "run.toml")
    shutil.copy(run / "c0.pt", into / "c0.pt")
    code, _, err = _cli(capsys, "index", "--config", into / "run.toml", "--quiet")
    assert code == 0, err
    answers = _answers(capsys, into)
    assert isinstance(answers, list)
    return answers


def _new_weights(run: Path) -> None:
    state = torch.load(run / "c0.pt")
    generator = torch.Generator().manual_seed(7)
    torch.save({k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}, run / "c0.pt")


DAMAGE = {
    "replaced weights": _new_weights,
    "deleted commit record": lambda run: (run / SEGMENT / "committed/c/1").unlink(),
    "deleted checksum record": lambda run: (run / SEGMENT / "checksums/c/2").unlink(),
    "deleted ids zarr.json": lambda run: (run / SEGMENT / "ids/zarr.json").unlink(),
    "deleted checkpoint zarr.json": lambda run: (run / "run.zarr/checkpoints/c0/zarr.json").unlink(),
    "deleted segment zarr.json": lambda run: (run / SEGMENT / "zarr.json").unlink(),
}


def _follow(advice: str, run: Path) -> None:
    """Do what a refusal says: delete the folder it names (if it names one), then nothing more (the caller runs
    `gradstore index`)."""
    named = re.search(r"delete (\S+) and (?:log|run)", advice)
    if named is not None:
        target = Path(named.group(1))
        assert target.is_relative_to(run) and target.exists(), advice
        shutil.rmtree(target)
    else:
        assert "gradstore index" in advice, advice  # re-logging is the whole repair


@pytest.mark.parametrize("name", list(DAMAGE))
def test_following_the_advice_gives_the_answers_of_a_clean_build(tmp_path, pristine, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    before = _answers(capsys, run)
    assert isinstance(before, list)
    DAMAGE[name](run)

    # refused (never answered wrong), and verify says damaged, naming the same thing
    refusal = _answers(capsys, run)
    assert isinstance(refusal, str), f"answered after {name}: {refusal}"
    code, out = _verify(capsys, run)
    assert code == 2 and "store and index intact" not in out, out
    damaged = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert damaged

    # follow the advice (the refusal's, else verify's first line), then `gradstore index`
    advice = refusal if re.search(r"delete \S+ and|gradstore index", refusal) else damaged[0]
    _follow(advice, run)
    code, _, err = _cli(capsys, "index", "--config", run / "run.toml", "--quiet")
    assert code == 0, err

    repaired = _answers(capsys, run)
    assert isinstance(repaired, list), repaired
    code, out = _verify(capsys, run)
    assert code == 0 and "store and index intact" in out, out
    clean = _clean_build(capsys, run, tmp_path / "clean")
    assert [i for i, _ in repaired] == [i for i, _ in clean]
    np.testing.assert_allclose([s for _, s in repaired], [s for _, s in clean], rtol=1e-5)
    if name == "replaced weights":  # the new weights do change the answer: the old vectors are not served
        assert [s for _, s in repaired] != pytest.approx([s for _, s in before], rel=1e-3)


def test_verify_reports_replaced_weights_and_a_config_lr_that_differs(tmp_path, pristine, capsys):
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    _new_weights(run)
    (run / "run.toml").write_text((run / "run.toml").read_text().replace("lr = 0.1", "lr = 0.2"))
    code, out = _verify(capsys, run)
    lines = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert code == 2
    assert any("c0.pt" in line and "differs from the one its rows were logged with" in line for line in lines), out
    assert any("gives lr=0.2, its rows were logged with lr=0.1" in line for line in lines), out
    refusal = _answers(capsys, run)
    assert isinstance(refusal, str) and "lr=0.2" in refusal
