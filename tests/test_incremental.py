"""Growing a run in place: `gradstore index` after new examples and after a new checkpoint logs and transforms
only what is new, and the updated index answers exactly as a fresh build; a query during an update sees the old
index or the new one, never a mix; the preconditioner rule (identity reused, kfac refitted when rows change)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore.demos.digits import DigitsTask
from gradstore.logger import GradientLogger
from gradstore.projection import Preconditioner
from gradstore.server import cli
from gradstore.store import GradientIndex, GradientStore, IndexOptions, StaleIndexError
from tests.helpers.search import synthetic_spec, write_store

RUN_TOML = """
[task]
object = "gradstore.demos.digits:DigitsTask"
args = {{ n_train = {n}, hidden = 16, flip_fraction = 0.0 }}

[projection]
rank = [8, 8]
init = "gaussian"
seed = 3
layers = ["*"]

[store]
path = "run.zarr"
dtype = "float16"
chunk_rows = 64
{checkpoints}
[index]
kind = "flat"
"""

CHECKPOINT = """
[[checkpoints]]
name = "epoch-{e}"
path = "epoch-{e}.pt"
lr = {lr}
step = {e}
"""


def _write_config(directory: Path, n: int, epochs: int) -> Path:
    checkpoints = "".join(CHECKPOINT.format(e=e, lr=0.2 / (e + 1)) for e in range(epochs))
    path = directory / "run.toml"
    path.write_text(RUN_TOML.format(n=n, checkpoints=checkpoints))
    return path


class _Counts:
    """Examples the logger projected and rows the preconditioners transformed (patched in, counted)."""

    def __init__(self, monkeypatch):
        self.projected = self.transformed = 0
        project, apply = GradientLogger.project, Preconditioner.apply

        def counting_project(logger, examples, *args, **kwargs):
            self.projected += len(examples)
            return project(logger, examples, *args, **kwargs)

        def counting_apply(preconditioner, rows):
            self.transformed += len(rows)
            return apply(preconditioner, rows)

        monkeypatch.setattr(GradientLogger, "project", counting_project)
        monkeypatch.setattr(Preconditioner, "apply", counting_apply)

    def take(self) -> tuple[int, int]:
        out = (self.projected, self.transformed)
        self.projected = self.transformed = 0
        return out


def _answers(index: GradientIndex, raw: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
    """The ids and scores of each query's proponents and opponents (rows differ between layouts; ids do not)."""
    found = index.search(raw, np.ones(len(index.checkpoints)), k)
    return {
        "pro_ids": index.ids[found.proponent_rows],
        "pro": found.proponent_scores,
        "opp_ids": index.ids[found.opponent_rows],
        "opp": found.opponent_scores,
        "mean": found.mean_abs_score,
    }


def _assert_same_as_fresh(updated: GradientIndex, store: GradientStore, tmp: Path) -> None:
    fresh = GradientIndex.build(store, updated.options, tmp, updated.checkpoints, progress=False)
    assert sorted(updated.ids.tolist()) == sorted(fresh.ids.tolist())
    order = np.argsort(updated.ids)
    fresh_order = np.argsort(fresh.ids)
    # every example's stored vector and self-influence terms are bit-identical to a fresh build's
    assert np.array_equal(updated.exact_vectors(order), fresh.exact_vectors(fresh_order)), (
        "updated vectors differ from a fresh build"
    )
    assert np.array_equal(updated.sqnorms[order], fresh.sqnorms[fresh_order])
    raw = np.random.default_rng(0).standard_normal((3, len(updated.checkpoints), store.dim)).astype(np.float32)
    got, want = _answers(updated, raw), _answers(fresh, raw)
    for key in ("pro_ids", "opp_ids"):
        assert np.array_equal(got[key], want[key])
    for key in ("pro", "opp", "mean"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6)


def test_index_after_new_examples_then_a_new_checkpoint_equals_a_rebuild(tmp_path, monkeypatch, capsys):
    task = DigitsTask(n_train=200, hidden=16, flip_fraction=0.0)
    model = task.build_model()
    torch.manual_seed(1)
    for epoch in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        torch.save(model.state_dict(), tmp_path / f"epoch-{epoch}.pt")
    counts = _Counts(monkeypatch)
    config = _write_config(tmp_path, n=160, epochs=2)
    cli.main(["index", "--config", str(config), "--quiet"])
    assert counts.take() == (2 * 160, 2 * 160)
    capsys.readouterr()
    store_path, index_path = tmp_path / "run.zarr", tmp_path / "run.index"

    # an approximate kind over the same store, updated through the Python API alongside
    GradientIndex.build(
        GradientStore.open(store_path),
        IndexOptions(kind="ivf", nlist=4, nprobe=2),
        tmp_path / "ivf.index",
        progress=False,
    )
    counts.take()

    # 40 new examples: only they are logged (at both checkpoints) and transformed
    config = _write_config(tmp_path, n=200, epochs=2)
    cli.main(["index", "--config", str(config), "--quiet"])
    out = capsys.readouterr().out
    assert "logged 80 new rows; appended 40 rows; reused 2 parts, wrote 2" in out, out
    assert counts.take() == (2 * 40, 2 * 40)
    store = GradientStore.open(store_path)
    updated = GradientIndex.open(index_path, store)
    assert updated.manifest.row_parts == [[0, 160], [160, 200]]
    _assert_same_as_fresh(updated, store, tmp_path / "fresh1.index")
    counts.take()

    ivf = GradientIndex.update(tmp_path / "ivf.index", store, progress=False)
    assert ivf.changes is not None and ivf.changes.faiss == "added 40 rows"
    assert counts.take()[1] == 2 * 40
    fresh_ivf = GradientIndex.build(
        store, IndexOptions(kind="ivf", nlist=4, nprobe=2), tmp_path / "fresh-ivf.index", progress=False
    )
    raw = np.random.default_rng(1).standard_normal((16, 2, store.dim)).astype(np.float32)
    exact = updated.search(raw, [1.0, 1.0], 10)

    def recall(index: GradientIndex) -> float:
        found = index.search(raw, [1.0, 1.0], 10)
        want = updated.ids[exact.proponent_rows]
        got = index.ids[found.proponent_rows]
        return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]))

    assert recall(ivf) >= 0.5 and abs(recall(ivf) - recall(fresh_ivf)) <= 0.1, (recall(ivf), recall(fresh_ivf))

    # a new checkpoint: only its 200 rows are logged and transformed; the 4 parts of the others are reused
    config = _write_config(tmp_path, n=200, epochs=3)
    counts.take()
    cli.main(["index", "--config", str(config), "--quiet"])
    out = capsys.readouterr().out
    assert "logged 200 new rows; appended 0 rows; added checkpoints ['epoch-2']; reused 4 parts, wrote 2" in out, out
    assert counts.take() == (200, 200)
    store = GradientStore.open(store_path)
    updated = GradientIndex.open(index_path, store)
    _assert_same_as_fresh(updated, store, tmp_path / "fresh2.index")

    # nothing new: nothing logged or transformed; --rebuild builds everything
    counts.take()
    cli.main(["index", "--config", str(config), "--quiet"])
    assert "logged 0 new rows; appended 0 rows; reused 6 parts, wrote 0" in capsys.readouterr().out
    assert counts.take() == (0, 0)
    cli.main(["index", "--config", str(config), "--quiet", "--rebuild"])
    assert "built all 3 parts (a full build)" in capsys.readouterr().out
    assert counts.take() == (0, 3 * 200)

    # grown examples whose first ones changed (other label flips) are refused, not appended
    config.write_text(config.read_text().replace("n_train = 200,", "n_train = 240,").replace("0.0 }", "0.2 }"))
    with pytest.raises(SystemExit):
        cli.main(["index", "--config", str(config), "--quiet"])
    assert "the examples differ from those of the interrupted run" in capsys.readouterr().err
    assert counts.take()[0] == 0


# -- synthetic stores: the preconditioner rule, and queries during an update ----------------------


def _append(store: GradientStore, name: str, ids: np.ndarray, rows: np.ndarray, tag: str) -> None:
    """Commit rows of new example ids into a second segment of a checkpoint (what a grown logging pass does)."""
    segment = store._create_segment(name, f"pass-append-{tag}", "pass", len(ids))
    for chunk in range(segment.n_chunks):
        lo, hi = chunk * store.chunk_rows, min((chunk + 1) * store.chunk_rows, len(ids))
        segment.write_chunk(chunk, ids[lo:hi], rows[lo:hi].astype(store.dtype))


def _synthetic(tmp_path: Path, n: int = 300) -> tuple[GradientStore, np.random.Generator]:
    rng = np.random.default_rng(7)
    spec = synthetic_spec([("a", 6, 5), ("b", 4, 3)])
    data = {name: (lr, rng.standard_normal((n, spec.dim))) for name, lr in (("c0", 0.1), ("c1", 0.05))}
    return write_store(tmp_path / "s.zarr", spec, data, dtype="float16", chunk_rows=64), rng


@pytest.mark.parametrize("kind", ["identity", "kfac"])
def test_preconditioner_rule_new_rows_and_new_checkpoint(tmp_path, kind):
    store, rng = _synthetic(tmp_path)
    options = IndexOptions(kind="flat", preconditioner=kind, normalize=False)
    GradientIndex.build(store, options, tmp_path / "i.index", ["c0"], progress=False)
    first = (tmp_path / "i.index" / "preconditioners" / "c0.npz").read_bytes()

    # a new checkpoint only: c0's transform and parts are reused whatever the kind
    index = GradientIndex.update(tmp_path / "i.index", store, checkpoints=["c0", "c1"], progress=False)
    assert index.changes is not None
    assert (index.changes.checkpoints_added, index.changes.refitted, index.changes.parts_reused) == (["c1"], [], 1)
    assert (tmp_path / "i.index" / "preconditioners" / "c0.npz").read_bytes() == first
    _assert_same_as_fresh(index, store, tmp_path / "f1.index")

    # new rows at both checkpoints: identity transforms them alone; kfac's statistics changed, so it refits
    # both checkpoints and re-transforms all their rows (the result equals a fresh build either way)
    new_ids = np.arange(1000, 1050)
    for name in ("c0", "c1"):
        _append(store, name, new_ids, rng.standard_normal((50, store.dim)), "x")
    store = GradientStore.open(store.path)
    index = GradientIndex.update(tmp_path / "i.index", store, progress=False)
    changes = index.changes
    assert changes is not None and changes.appended_rows == 50
    if kind == "identity":
        assert (changes.refitted, changes.parts_reused, changes.vectors_computed) == ([], 2, 2 * 50)
    else:
        assert (changes.refitted, changes.parts_reused, changes.vectors_computed) == (["c0", "c1"], 0, 2 * 350)
        assert index.manifest.checkpoint_state["c0"]["fitted_rows"] == 350
    _assert_same_as_fresh(index, store, tmp_path / "f2.index")


def test_query_during_update_sees_old_or_new_never_a_mix(tmp_path):
    store, rng = _synthetic(tmp_path, n=2000)
    path = tmp_path / "i.index"
    old = GradientIndex.build(store, IndexOptions(kind="flat"), path, progress=False)
    raw = rng.standard_normal((2, 2, store.dim)).astype(np.float32)
    before = _answers(old, raw)
    _append(store, "c0", np.arange(5000, 5600), rng.standard_normal((600, store.dim)), "q")
    _append(store, "c1", np.arange(5000, 5600), rng.standard_normal((600, store.dim)), "q")
    grown = GradientStore.open(store.path)

    seen: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                # an index opened before keeps answering from its snapshot
                got = _answers(old, raw)
                assert all(np.array_equal(got[k], before[k]) for k in before), "the open index changed under it"
                try:
                    now = GradientIndex.open(path, grown)
                except StaleIndexError:
                    seen.append("old")  # the old snapshot, refused as stale: never served
                    continue
                seen.append(f"new:{now.num_rows}")
                answers.append(_answers(now, raw))
        except BaseException as exc:
            failures.append(exc)

    answers: list[dict[str, np.ndarray]] = []
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):  # several swaps while the readers run
            GradientIndex.update(path, grown, progress=False)
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not failures, failures
    after = _answers(GradientIndex.open(path, grown), raw)
    assert "old" in seen or answers, seen
    assert all(s in ("old", "new:2600") for s in seen), set(seen)
    for got in answers:
        assert all(np.array_equal(got[k], after[k]) for k in after)


def test_old_format_is_refused_and_updated_by_rebuilding(tmp_path):
    store, _ = _synthetic(tmp_path, n=100)
    path = tmp_path / "i.index"
    GradientIndex.build(store, IndexOptions(kind="flat"), path, progress=False)
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format_version": 3', '"format_version": 2'))
    with pytest.raises(Exception, match="format version 2 .* rebuild it"):
        GradientIndex.open(path, store)
    index = GradientIndex.update(path, store, progress=False)
    assert index.changes is not None and index.changes.rebuilt is not None
    assert "could not be extended" in index.changes.rebuilt
    assert index.manifest.format_version == 3
