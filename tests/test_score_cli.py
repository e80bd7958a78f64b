"""``gradstore score`` (issue 19 part 5): a JSON Lines file of query payloads scored against every training example
of a run, the answers equal to ``gradstore query``'s for the same queries, resumable (no block and no query gradient
computed twice), bad input refused with ``error: ...``.

The run: test_cli's digits run (200 examples, two checkpoints, a flat float32 index).
"""

from __future__ import annotations

import json

import pytest

from gradstore.server import cli
from gradstore.server.run.engine import QueryEngine
from gradstore.store.batch_scoring import read_batch
from tests.test_cli import fails, run_cli, save_checkpoints, write_config

PAYLOADS = [{"test_index": i} for i in (3, 40, 7, 11, 0, 25, 30)] + [{"pixels": [0] * 32 + [16] * 32, "label": 7}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("score")
    save_checkpoints(directory)
    config = write_config(directory)
    cli.main(["index", "--config", str(config), "--quiet"])
    queries = directory / "queries.jsonl"
    queries.write_text(
        "\n".join(json.dumps(p) for p in PAYLOADS[:4]) + "\n\n" + "\n".join(map(json.dumps, PAYLOADS[4:]))
    )
    return config, queries


def score(capsys, config, queries, output, *extra) -> dict:
    argv = ["score", "--config", config, "--queries", queries, "--output", output, "--quiet", "--json", *extra]
    return json.loads(run_cli(capsys, *argv))


@pytest.mark.parametrize(
    "options",
    [[], ["--lr-weighting", "normalized", "--checkpoints", "epoch-1"], ["--measurement", "measurement"]],
    ids=["defaults", "subset-normalized", "measurement"],
)
def test_score_equals_query(run, capsys, tmp_path, options):
    config, queries = run
    summary = score(capsys, config, queries, tmp_path / "out", "--top-k", 4, "--block-queries", 3, *options)
    assert (summary["queries"], summary["rows"], summary["blocks_written"]) == (len(PAYLOADS), 200, 3)
    records = read_batch(tmp_path / "out")
    answer = json.loads(
        run_cli(capsys, "query", "--config", config, "--query-file", queries, "--top-k", 4, "--json", *options)
    )
    assert [r["query"] for r in records] == list(range(len(PAYLOADS)))
    for record, result in zip(records, answer["results"]):
        for side in ("proponent", "opponent"):
            expected = result[f"{side}s"]
            assert record[f"{side}_ids"] == [item["id"] for item in expected]
            assert record[f"{side}_scores"] == [item["score"] for item in expected]  # bit for bit
            chosen = [record["checkpoints"].index(c) for c in expected[0]["contributions"]]
            got = [[row[c] for c in chosen] for row in record[f"{side}_contributions"]]
            want = [list(item["contributions"].values()) for item in expected]
            assert got == want
        largest = max(abs(record["proponent_scores"][0]), abs(record["opponent_scores"][0]))
        assert record["max_abs_score"] == pytest.approx(largest, rel=1e-12)  # from the ranking pass


def test_score_resumes_without_recomputing(run, capsys, tmp_path, monkeypatch):
    config, queries = run
    out = tmp_path / "out"
    first = score(capsys, config, queries, out, "--block-queries", 3, "--format", "jsonl")
    before = read_batch(out)
    (out / "part-000001.jsonl").unlink()  # as if killed before this block was written
    calls = []
    original = QueryEngine.query_gradients
    monkeypatch.setattr(
        QueryEngine, "query_gradients", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    again = score(capsys, config, queries, out, "--block-queries", 3, "--format", "jsonl")
    assert (first["blocks_written"], again["blocks_written"], again["blocks_skipped"]) == (3, 1, 2)
    assert calls == []  # every block's query gradients came from the cache
    assert read_batch(out) == before
    argv = [
        "score",
        "--config",
        config,
        "--queries",
        queries,
        "--output",
        out,
        "--block-queries",
        3,
        "--format",
        "jsonl",
    ]
    text = run_cli(capsys, *argv)
    assert "0 written, 3 already written" in text and f"output: {out}" in text and "rows/s" in text
    # other options into the same folder are refused, not mixed in
    err = fails(capsys, *argv, "--lr-weighting", "uniform", "--quiet")
    assert "another batch" in err


def test_score_refuses_bad_input(run, capsys, tmp_path):
    config, _ = run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"test_index": 1}\n[1, 2]\n')
    assert "line 2" in fails(capsys, "score", "--config", config, "--queries", bad, "--output", tmp_path / "o")
    bad.write_text('{"test_index": 1}\n{"nonsense": 1}\n')
    assert "payload 1" in fails(capsys, "score", "--config", config, "--queries", bad, "--output", tmp_path / "o")
    assert "cannot read" in fails(
        capsys, "score", "--config", config, "--queries", tmp_path / "none.jsonl", "--output", tmp_path / "o"
    )
    err = fails(capsys, "score", "--config", config, "--queries", bad, "--output", tmp_path / "o", "--block-queries", 0)
    assert "--block-queries" in err
