"""Damaged run files, one table: every case is a typed error naming the damaged file and what to do, the CLI's one
``error:`` line and exit status 2, ``gradstore verify`` finding it, and a repair (``gradstore index``, after deleting
what the message says to delete) that restores the exact answers of the undamaged run."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from gradstore.demos.digits import DigitsTask
from gradstore.server.cli import main
from gradstore.store import GradientIndex, GradientStore, IndexMismatchError, StoreCorruptError

N, CHUNK = 48, 8
RUN_TOML = """
[task]
object = "gradstore.demos.digits:DigitsTask"
args = {{ n_train = {n}, hidden = 16 }}

[projection]
rank = [2, 2]
seed = 0

[store]
path = "run.zarr"
dtype = "float32"
chunk_rows = {chunk}

[[checkpoints]]
name = "c0"
path = "c0.pt"
lr = 0.1

[index]
kind = "{kind}"
path = "{index}"
"""
QUERY = '{"test_index": 0}'
SEGMENT = "run.zarr/checkpoints/c0/pass"
VECTORS = "run.index/vectors/c0/part-00000.npy"  # the flat index's vectors of checkpoint c0, row part 0


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of one ``gradstore`` command, run in this process."""
    threads = torch.get_num_threads()  # `serve` sets the process's torch threads before it loads the run
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _answers(capsys, config: Path) -> list[tuple[int, float]]:
    code, out, err = _cli(capsys, "query", "--config", config, "--query", QUERY, "--top-k", "5", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    return [(item["id"], item["score"]) for role in ("proponents", "opponents") for item in result[role]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A logged and indexed run (a flat and an hnsw index), its answers and its rows."""
    run = tmp_path_factory.mktemp("run")
    torch.save(DigitsTask(n_train=N, hidden=16).build_model().state_dict(), run / "c0.pt")
    for name, kind in (("run", "flat"), ("hnsw", "hnsw")):
        (run / f"{name}.toml").write_text(RUN_TOML.format(n=N, chunk=CHUNK, kind=kind, index=f"{name}.index"))
        main(["index", "--config", str(run / f"{name}.toml"), "--quiet"])
    return run


@pytest.fixture(scope="module")
def reference(pristine):
    """The undamaged run's answers (per config) and rows (capsys is per test: stdout is read through a buffer)."""
    answers = {}
    for name in ("run", "hnsw"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["query", "--config", str(pristine / f"{name}.toml"), "--query", QUERY, "--top-k", "5", "--json"])
        (result,) = json.loads(out.getvalue())["results"]
        answers[name] = [(item["id"], item["score"]) for role in ("proponents", "opponents") for item in result[role]]
    return answers, GradientStore.open(pristine / "run.zarr").read("c0")


def _garble(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])


def _not_utf8(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] + b"\xff\xfe" + data[len(data) // 2 :])


def _edit_json(edit):
    def damage(file: Path) -> None:
        data = json.loads(file.read_text())
        file.write_text(json.dumps(edit(data)))

    return damage


def _shape_edited(meta: dict) -> dict:
    meta["shape"][0] -= CHUNK
    return meta


@dataclass(frozen=True)
class Case:
    file: str  # under the run directory
    damage: object
    named: str  # what the error names (the damaged file or chunk)
    fails: tuple[str, ...] = ()  # commands refused with one `error:` line, exit 2 (besides `verify`)
    delete: str | None = None  # what the message says to delete before `gradstore index` repairs it
    config: str = "run"

    @property
    def in_store(self) -> bool:
        return self.file.startswith("run.zarr")


REFUSED = ("query", "info", "index", "serve")
COMMIT_CASE = ("query", "info", "serve")  # `gradstore index` re-logs the chunk
INDEX_CASE = ("query", "serve")  # `info` shows the index unusable (exit 0); `gradstore index` rebuilds it
CASES = {
    # store: chunks (the index, built before the damage, still answers; `gradstore index` re-logs the chunk)
    "garbled grads chunk": Case(f"{SEGMENT}/grads/c/2/0", _garble, "chunk 2 (rows 16..23) fails its checksum"),
    "truncated grads chunk": Case(f"{SEGMENT}/grads/c/2/0", _truncate, "chunk 2 (rows 16..23) cannot be read"),
    "deleted grads chunk": Case(f"{SEGMENT}/grads/c/2/0", Path.unlink, "chunk 2 (rows 16..23) fails its checksum"),
    "garbled ids chunk": Case(f"{SEGMENT}/ids/c/3", _garble, "chunk 3 (rows 24..31) fails its checksum"),
    # store: commit records (which rows are committed is unknown: refused until `gradstore index` re-logs it)
    "garbled commit record": Case(
        f"{SEGMENT}/committed/c/1",
        lambda f: f.write_bytes(b"\xff\xff\xff\x7f"),
        f"{SEGMENT}/committed/c/1",
        COMMIT_CASE,
    ),
    "empty commit record": Case(
        f"{SEGMENT}/committed/c/1", lambda f: f.write_bytes(b""), f"{SEGMENT}/committed/c/1", COMMIT_CASE
    ),
    # store: metadata (refused everywhere; deleting the part the message names and re-logging repairs it)
    "truncated root zarr.json": Case("run.zarr/zarr.json", _truncate, "run.zarr/zarr.json", REFUSED, "run.zarr"),
    "truncated checkpoint zarr.json": Case(
        "run.zarr/checkpoints/c0/zarr.json", _truncate, "checkpoints/c0/zarr.json", REFUSED, "run.zarr/checkpoints/c0"
    ),
    "truncated segment zarr.json": Case(f"{SEGMENT}/zarr.json", _truncate, f"{SEGMENT}/zarr.json", REFUSED, SEGMENT),
    "truncated grads zarr.json": Case(
        f"{SEGMENT}/grads/zarr.json", _truncate, f"{SEGMENT}/grads/zarr.json", REFUSED, SEGMENT
    ),
    "edited grads shape": Case(
        f"{SEGMENT}/grads/zarr.json",
        _edit_json(_shape_edited),
        f"{SEGMENT}/grads/zarr.json has shape (40, ",
        REFUSED,
        SEGMENT,
    ),
    # index files (refused; `gradstore index` rebuilds)
    "truncated vectors": Case(VECTORS, _truncate, f"{VECTORS} has", INDEX_CASE),
    "deleted vectors": Case(VECTORS, Path.unlink, f"{VECTORS} is missing", INDEX_CASE),
    "garbled vectors": Case(VECTORS, _garble, "part-00000.npy changed since it was built", INDEX_CASE),
    "truncated ids": Case("run.index/ids.npy", _truncate, "run.index/ids.npy has", INDEX_CASE),
    "truncated preconditioner": Case(
        "run.index/preconditioners/c0.npz", _truncate, "run.index/preconditioners/c0.npz has", INDEX_CASE
    ),
    "garbled faiss index": Case(
        "hnsw.index/faiss.index", _garble, "faiss.index changed since it was built", INDEX_CASE, config="hnsw"
    ),
    # index manifest
    "edited lrs": Case(
        "run.index/manifest.json",
        _edit_json(lambda m: {**m, "lrs": [lr * 10 for lr in m["lrs"]]}),
        "records lrs",
        INDEX_CASE,
    ),
    "manifest without store_fingerprint": Case(
        "run.index/manifest.json",
        _edit_json(lambda m: {k: v for k, v in m.items() if k != "store_fingerprint"}),
        "run.index/manifest.json is malformed (ValueError(\"'store_fingerprint' should be a JSON string, got None\")",
        INDEX_CASE,
    ),
    "manifest holding []": Case(
        "run.index/manifest.json", _edit_json(lambda m: []), "run.index/manifest.json holds a JSON list", INDEX_CASE
    ),
    "manifest options not an object": Case(
        "run.index/manifest.json",
        _edit_json(lambda m: {**m, "options": "flat"}),
        "run.index/manifest.json is malformed (ValueError(\"'options' should be a JSON object, got 'flat'\")",
        INDEX_CASE,
    ),
    "truncated manifest": Case(
        "run.index/manifest.json", _truncate, "run.index/manifest.json is not valid JSON", INDEX_CASE
    ),
    "garbled manifest": Case(
        "run.index/manifest.json", _not_utf8, "run.index/manifest.json is not valid JSON", INDEX_CASE
    ),
}


EXTRA_ARGS = {"query": ["--query", QUERY, "--json"], "info": ["--json"]}


@pytest.mark.parametrize("name", list(CASES))
def test_damage_is_named_refused_found_and_repaired(tmp_path, pristine, reference, capsys, name):
    case = CASES[name]
    answers, (ref_ids, ref_grads) = reference
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    config = run / f"{case.config}.toml"
    case.damage(run / case.file)

    # the typed error, naming the damaged part and what to do
    store_path, index_path = run / "run.zarr", run / f"{case.config}.index"
    with pytest.raises(StoreCorruptError if case.in_store else IndexMismatchError) as info:
        if case.in_store:
            GradientStore.open(store_path).read("c0")
        else:
            GradientIndex.open(index_path, GradientStore.open(store_path))
    message = str(info.value)
    assert case.named in message
    assert ("re-log" in message or "log it again" in message) if case.in_store else "rebuild it" in message
    if case.delete is not None:
        assert f"delete {run / case.delete} and log" in message

    # the CLI: one `error:` line and exit 2 where the damage keeps a command from working; the others still work
    for command in ("query", "info", "serve"):
        argv = [command, "--config", config, *EXTRA_ARGS.get(command, [])]
        if command == "serve" and command not in case.fails:
            continue  # it would serve
        code, out, err = _cli(capsys, *argv)
        if command in case.fails:
            assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and case.named in err, err
        else:
            assert code == 0, err
            if command == "info" and not case.in_store:
                index = json.loads(out)["index"]
                assert index["status"] == "unusable" and case.named in index["reason"]
    code, out, _ = _cli(capsys, "verify", "--config", config)
    assert code == 2 and any(case.named in line for line in out.splitlines() if line.startswith("damaged: ")), out

    # repair: `gradstore index` re-logs damaged chunks and rebuilds the index; metadata damage is refused until the
    # part the message names is deleted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = _cli(capsys, "index", "--config", config, "--quiet")
        if "index" in case.fails:
            assert code == 2 and len(err.splitlines()) == 1 and case.named in err, err
            shutil.rmtree(run / case.delete)
            code, _, err = _cli(capsys, "index", "--config", config, "--quiet")
    assert code == 0, err
    if "chunk" in name or "commit" in name:
        assert any("re-logging damaged chunks" in str(w.message) for w in caught)
    code, out, _ = _cli(capsys, "verify", "--config", config)
    assert code == 0 and "store and index intact" in out
    ids, grads = GradientStore.open(store_path).read("c0")
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-6)  # a re-logged chunk is batched differently
    repaired = _answers(capsys, config)
    assert [i for i, _ in repaired] == [i for i, _ in answers[case.config]]
    np.testing.assert_allclose([s for _, s in repaired], [s for _, s in answers[case.config]], rtol=1e-5)


def test_index_build_refuses_a_damaged_chunk_instead_of_indexing_it(tmp_path, pristine):
    """The build reads whole chunks verified: a garbled chunk is an error naming it, not NaN rows in the index."""
    path = tmp_path / "run.zarr"
    shutil.copytree(pristine / "run.zarr", path)
    _garble(path / "checkpoints/c0/pass/grads/c/2/0")
    with pytest.raises(StoreCorruptError, match=r"chunk 2 \(rows 16..23\) fails its checksum"):
        GradientIndex.build(GradientStore.open(path), progress=False)
    assert not path.with_suffix(".index").exists()


def test_verify_lists_every_damaged_part(tmp_path, pristine, capsys):
    """One damaged part does not hide another: two chunks, an index file, each on its own `damaged:` line."""
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    _garble(run / f"{SEGMENT}/grads/c/2/0")
    _garble(run / f"{SEGMENT}/ids/c/4")
    _truncate(run / "run.index/ids.npy")
    code, out, _ = _cli(capsys, "verify", "--config", run / "run.toml")
    lines = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert code == 2 and len(lines) == 3
    assert "chunk 2 (rows 16..23)" in lines[0] and "chunk 4 (rows 32..39)" in lines[1] and "ids.npy has" in lines[2]
