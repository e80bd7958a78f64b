"""The ``gradstore`` CLI (issue 3): index, query, self-influence and info on a TOML run config, their JSON equal to
the in-process engine's answers, and every error an exit status 2 with a clear ``error: ...`` line.

The run: the demo's digits task with 200 training examples and a 64-16-10 MLP, two checkpoints a few SGD
steps apart, gaussian rank-8 projections into a float32 store.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradstore.demos.digits import DigitsTask
from gradstore.logger import GradientLogger
from gradstore.server import cli
from gradstore.server.run import open_engine
from gradstore.server.run.config import RunConfig
from gradstore.store import GradientStore, IndexOptions

N_TRAIN = 200
TIMING_KEYS = ("took_ms", "timings_ms")

RUN_TOML = """
[task]
object = "gradstore.demos.digits:DigitsTask"
args = {{ n_train = {n}, hidden = 16 }}

[projection]
rank = [8, 8]
init = "gaussian"
seed = 3
layers = ["*"]

[store]
path = "run.zarr"
dtype = "float32"
chunk_rows = 64

[[checkpoints]]
name = "epoch-0"
path = "epoch-0.pt"
lr = 0.2
step = 0

[[checkpoints]]
name = "epoch-1"
path = "epoch-1.pt"
lr = 0.05
step = 1

[index]
{index}

[query]
residency = "{residency}"
"""


def write_config(directory: Path, index: str = 'kind = "flat"', residency: str = "all", name: str = "run.toml") -> Path:
    path = directory / name
    path.write_text(RUN_TOML.format(n=N_TRAIN, index=index, residency=residency))
    return path


def save_checkpoints(directory: Path) -> None:
    task = DigitsTask(n_train=N_TRAIN, hidden=16)
    model = task.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    examples = task.train_examples()
    for epoch in range(2):
        for lo in range(0, N_TRAIN, 25):
            x, y = task.collate(examples[lo : lo + 25])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        torch.save(model.state_dict(), directory / f"epoch-{epoch}.pt")


def run_cli(capsys, *argv: str) -> str:
    cli.main([str(a) for a in argv])
    return capsys.readouterr().out


def run_json(capsys, *argv: str) -> dict:
    return json.loads(run_cli(capsys, *argv, "--json"))


def fails(capsys, *argv: str) -> str:
    """Run a command that must fail; returns its stderr (exit status 2, nothing on stdout)."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    assert captured.out == ""
    assert captured.err.startswith("error: ") or "error:" in captured.err
    return captured.err


def plain(response) -> dict:
    data = response.model_dump(mode="json") if hasattr(response, "model_dump") else dict(response)
    return {k: v for k, v in data.items() if k not in TIMING_KEYS}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """A run directory whose ``run.toml`` has been through ``gradstore index``."""
    directory = tmp_path_factory.mktemp("cli")
    save_checkpoints(directory)
    config = write_config(directory)
    return directory, config


def test_index_command(indexed, capsys):
    directory, config = indexed
    out = run_cli(capsys, "index", "--config", config, "--quiet")
    assert f"indexed {N_TRAIN} examples x 2 checkpoints" in out
    store = GradientStore.open(directory / "run.zarr")
    assert store.checkpoints == ["epoch-0", "epoch-1"]
    assert [store.num_rows(c) for c in store.checkpoints] == [N_TRAIN, N_TRAIN]
    info = store.checkpoint_info("epoch-1")
    assert (info.lr, info.step, Path(info.weights_path).name) == (0.05, 1, "epoch-1.pt")
    # a second run resumes: nothing left to log, the index is rebuilt and still opens
    assert f"indexed {N_TRAIN} examples" in run_cli(capsys, "index", "--config", config, "--quiet")


@pytest.fixture(scope="module")
def engine(indexed):
    directory, config = indexed
    cli.main(["index", "--config", str(config), "--quiet"])  # idempotent (resumes), in case this test runs alone
    return open_engine(RunConfig.load(config), device="cpu")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lr_weighting": "normalized", "checkpoints": ["epoch-1"]},
        {"lr_weighting": "uniform", "measurement": "measurement", "top_k": 3},
    ],
    ids=["defaults", "subset-normalized", "uniform-measurement"],
)
def test_query_json_equals_engine(indexed, engine, capsys, tmp_path, options):
    _, config = indexed
    payloads = [{"test_index": 3}, {"test_index": 40}, {"pixels": [0] * 32 + [16] * 32, "label": 7}]
    query_file = tmp_path / "queries.jsonl"
    query_file.write_text("\n".join(json.dumps(p) for p in payloads[1:]) + "\n\n")
    argv = [
        "query",
        "--config",
        config,
        "--query",
        json.dumps(payloads[0]),
        "--query-file",
        query_file,
        "--top-k",
        options.get("top_k", 5),
    ]
    for key, flag in (("lr_weighting", "--lr-weighting"), ("measurement", "--measurement")):
        if key in options:
            argv += [flag, options[key]]
    if "checkpoints" in options:
        argv += ["--checkpoints", ",".join(options["checkpoints"])]
    answer = run_json(capsys, *argv)
    expected = plain(
        engine.influence(payloads, top_k=options.get("top_k", 5), **{k: v for k, v in options.items() if k != "top_k"})
    )
    assert {k: v for k, v in answer.items() if k not in TIMING_KEYS} == expected
    assert len(answer["results"]) == 3 and all(
        len(r["proponents"]) == options.get("top_k", 5) for r in answer["results"]
    )
    first = answer["results"][0]["proponents"][0]
    assert set(first) == {"id", "score", "contributions", "example", "role"}
    assert list(first["contributions"]) == options.get("checkpoints", ["epoch-0", "epoch-1"])
    assert sum(first["contributions"].values()) == pytest.approx(first["score"], rel=1e-9)


def test_query_text_output(indexed, engine, capsys):
    _, config = indexed
    out = run_cli(capsys, "query", "--config", config, "--query", '{"test_index": 3}', "--top-k", 2)
    best = engine.influence([{"test_index": 3}], top_k=2).results[0]
    assert "proponents:" in out and "opponents:" in out
    assert f"id={best.proponents[0].id}" in out and f"id={best.opponents[1].id}" in out


def test_self_influence_json_equals_engine(indexed, engine, capsys):
    _, config = indexed
    answer = run_json(capsys, "self-influence", "--config", config, "--top-k", 7)
    assert {k: v for k, v in answer.items() if k not in TIMING_KEYS} == plain(engine.self_influence(top_k=7))
    scores = [r["score"] for r in answer["results"]]
    assert len(scores) == 7 and scores == sorted(scores, reverse=True)
    subset = run_json(
        capsys,
        "self-influence",
        "--config",
        config,
        "--top-k",
        4,
        "--checkpoints",
        "epoch-0",
        "--lr-weighting",
        "uniform",
    )
    assert {k: v for k, v in subset.items() if k not in TIMING_KEYS} == plain(
        engine.self_influence(top_k=4, checkpoints=["epoch-0"], lr_weighting="uniform")
    )
    assert "highest self-influence" in run_cli(capsys, "self-influence", "--config", config, "--top-k", 2)


def test_info_json(indexed, engine, capsys):
    directory, config = indexed
    info = run_json(capsys, "info", "--config", config)
    store = engine.store
    assert info["store"] == str(directory / "run.zarr") and info["dim"] == store.dim and info["dtype"] == "float32"
    assert info["projection"] == {
        "init": "gaussian",
        "seed": 3,
        "dim": store.dim,
        "layers": [{"name": name, "kind": "linear", "k_in": 8, "k_out": 8} for name in ("0", "2")],
    }
    checks = [c.pop("verification") for c in info["checkpoints"]]
    assert info["checkpoints"] == [
        {"name": "epoch-0", "lr": 0.2, "step": 0, "rows": N_TRAIN, "adam": False},
        {"name": "epoch-1", "lr": 0.05, "step": 1, "rows": N_TRAIN, "adam": False},
    ]
    # the offline pass checked its first batch against autograd: recorded per checkpoint
    for check in checks:
        assert check["passed"] and (check["mode"], check["path"], check["examples"]) == ("per-example", "project", 3)
        assert check["max_error"] < 1e-5 and check["tolerance"] == 1e-3
    coverage = info["coverage"]
    assert coverage["fraction"] == 1.0 and coverage["skipped"] == []
    assert coverage["logged_elements"] == coverage["total_elements"] == 64 * 16 + 16 + 16 * 10 + 10
    assert info["index"] == {
        "path": str(engine.index.path),
        "status": "ready",
        "kind": "flat",
        "preconditioner": "identity",
        "normalize": False,
        "rows": N_TRAIN,
        "checkpoints": ["epoch-0", "epoch-1"],
    }
    assert (info["residency"], info["device"]) == ("all", str(engine.device))
    text = run_cli(capsys, "info", "--config", config)
    assert "index: {" in text and "check: exact (per-example in project, max error" in text
    assert "coverage: 100.0% of 1,210 trainable elements" in text


def test_trackstar_style_index_over_the_same_store(indexed, engine, capsys):
    """Another index (kfac, cosine, hnsw) beside the same store is a re-index: logging resumes with nothing to do."""
    directory, _ = indexed
    config = write_config(
        directory,
        index='kind = "hnsw"\npreconditioner = "kfac"\nnormalize = true\npath = "trackstar.index"',
        residency="one",
        name="trackstar.toml",
    )
    assert "trackstar.index" in run_cli(capsys, "index", "--config", config, "--quiet")
    answer = run_json(capsys, "query", "--config", config, "--query", '{"test_index": 5}', "--top-k", 4)
    trackstar = open_engine(RunConfig.load(config), device="cpu")
    assert {k: v for k, v in answer.items() if k not in TIMING_KEYS} == plain(
        trackstar.influence([{"test_index": 5}], top_k=4)
    )
    # cosine per checkpoint: each contribution is bounded by its lr
    for item in answer["results"][0]["proponents"] + answer["results"][0]["opponents"]:
        assert (
            abs(item["contributions"]["epoch-0"]) <= 0.2 + 1e-6 and abs(item["contributions"]["epoch-1"]) <= 0.05 + 1e-6
        )
    info = run_json(capsys, "info", "--config", config)
    assert (
        info["index"]["kind"] == "hnsw"
        and info["index"]["preconditioner"] == "kfac"
        and info["index"]["normalize"] is True
    )
    # the flat index of run.toml is untouched and still serves the same answer
    assert plain(engine.influence([{"test_index": 5}], top_k=4)) == plain(
        open_engine(RunConfig.load(directory / "run.toml")).influence([{"test_index": 5}], top_k=4)
    )


# -- errors --------------------------------------------------------------------------------------------


def test_query_errors_exit_2_with_a_clear_message(indexed, engine, capsys, tmp_path):
    _, config = indexed
    base = ["query", "--config", config]
    err = fails(capsys, *base, "--query", '{"test_index": 3}', "--checkpoints", "epoch-0,nope")
    assert "unknown checkpoints ['nope']; the index has ['epoch-0', 'epoch-1']" in err
    err = fails(
        capsys,
        *base,
        "--query",
        '{"test_index": 3}',
        "--query-file",
        _jsonl(tmp_path, [{"test_index": 1}, {"test_index": 99999}]),
    )
    assert "query 2 rejected by DigitsTask: test_index must be an integer in [0, 1597), got 99999" in err
    assert "rejected by DigitsTask: pixels must be a list of 64 numbers" in fails(
        capsys, *base, "--query", '{"pixels": [1, 2], "label": 3}'
    )
    assert "query payloads must be JSON objects" in fails(capsys, *base, "--query", "{test_index: 3}")
    assert "each query payload must be a JSON object" in fails(capsys, *base, "--query", "[1, 2]")
    assert "give --query" in fails(capsys, *base)
    assert "cannot read --query-file" in fails(capsys, *base, "--query-file", tmp_path / "missing.jsonl")
    assert "top_k must be at least 1" in fails(capsys, *base, "--query", '{"test_index": 3}', "--top-k", 0)
    assert "invalid choice" in fails(
        capsys, *base, "--query", '{"test_index": 3}', "--lr-weighting", "cosine"
    )  # argparse
    assert "does not exist" in fails(capsys, "query", "--config", tmp_path / "nowhere.toml", "--query", "{}")
    assert "unknown checkpoints" in fails(capsys, "self-influence", "--config", config, "--checkpoints", "epoch-7")


def _jsonl(directory: Path, payloads: list) -> Path:
    path = directory / "queries.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in payloads))
    return path


def test_stale_mismatched_and_missing_index_then_reindex(indexed, capsys, tmp_path):
    """A fresh run: the store changes under the index, the config's index options change, the index goes."""
    source, _ = indexed
    for name in ("epoch-0.pt", "epoch-1.pt"):
        shutil.copy(source / name, tmp_path / name)
    config = write_config(tmp_path)
    run_cli(capsys, "index", "--config", config, "--quiet")
    query = ["query", "--config", config, "--query", '{"test_index": 3}', "--json"]
    before = run_cli(capsys, *query)

    # stale: another checkpoint is logged into the store after the index was built
    task = DigitsTask(n_train=N_TRAIN, hidden=16)
    model = task.build_model()
    task.load_checkpoint(model, tmp_path / "epoch-1.pt")
    with GradientLogger(
        model,
        task,
        store=tmp_path / "run.zarr",
        spec=GradientStore.open(tmp_path / "run.zarr").spec,
        dtype="float32",
        chunk_rows=64,
        progress=False,
    ) as logger:
        logger.log_checkpoint("extra", lr=0.01)
    err = fails(capsys, *query)
    assert "changed after index" in err and "gradstore index --config" in err
    info = run_json(capsys, "info", "--config", config)
    assert info["index"]["status"] == "unusable" and "changed after index" in info["index"]["reason"]
    assert [c["name"] for c in info["checkpoints"]] == ["epoch-0", "epoch-1", "extra"]
    run_cli(capsys, "index", "--config", config, "--quiet")  # resumes (nothing to log) and rebuilds
    assert json.loads(run_cli(capsys, *query))["results"] == json.loads(before)["results"]

    # mismatched: the config asks for another preconditioner than the index was built with
    block = write_config(tmp_path, index='preconditioner = "block"', name="block.toml")
    err = fails(capsys, "query", "--config", block, "--query", '{"test_index": 3}')
    assert "built with other options" in err and "'preconditioner': ('identity', 'block')" in err
    assert run_json(capsys, "info", "--config", block)["index"]["status"] == "unusable"

    # mismatched: the config lists checkpoints the index does not cover
    more = tmp_path / "more.toml"
    more.write_text(config.read_text() + '\n[[checkpoints]]\nname = "extra"\npath = "epoch-1.pt"\nlr = 0.01\n')
    err = fails(capsys, "query", "--config", more, "--query", '{"test_index": 3}')
    assert "covers checkpoints ['epoch-0', 'epoch-1'], the config lists ['epoch-0', 'epoch-1', 'extra']" in err

    # missing
    shutil.rmtree(tmp_path / "run.index")
    err = fails(capsys, *query)
    assert "no index at" in err and "gradstore index --config" in err
    assert run_json(capsys, "info", "--config", config)["index"]["status"] == "unusable"
    shutil.rmtree(tmp_path / "run.zarr")
    assert "no gradient store" in fails(capsys, *query)
    assert "no gradient store" in run_json(capsys, "info", "--config", config)["store_status"]


# -- the run config -----------------------------------------------------------------------------------


def _edited(directory: Path, old: str, new: str, name: str = "edited.toml") -> Path:
    """``run.toml`` with one text replaced (the replaced text must be there)."""
    text = RUN_TOML.format(n=N_TRAIN, index='kind = "flat"', residency="all")
    assert old in text, old
    path = directory / name
    path.write_text(text.replace(old, new, 1))
    return path


INITS = "'gaussian', 'rademacher', 'orthonormal' or 'pca'"
NOT_AN_INT = "Input should be a valid integer, unable to parse string as an integer"
CONFIG_ERRORS = {
    # name: (text in RUN_TOML, its replacement, the whole stderr of `gradstore info`)
    "unknown key in [logging]": (
        "[query]",
        "[logging]\nbatchsize = 8\n\n[query]",
        "error: logging.batchsize: unknown key; this table takes batch_size\n",
    ),
    "bad init": (
        'init = "gaussian"',
        'init = "gauss"',
        f"error: projection.init: Input should be {INITS}, got 'gauss'\n",
    ),
    "bad residency": (
        'residency = "all"',
        'residency = "some"',
        "error: query.residency: Input should be 'all' or 'one', got 'some'\n",
    ),
    "bad lr type": (
        "lr = 0.05",
        'lr = "fast"',
        "error: checkpoints[1].lr: Input should be a valid number, unable to parse string as a number, got 'fast'\n",
    ),
    "duplicate checkpoint names": (
        'name = "epoch-1"',
        'name = "epoch-0"',
        "error: checkpoints: checkpoint names must be unique; ['epoch-0'] appear more than once\n",
    ),
    "unknown checkpoint key": (
        "step = 0",
        "steps = 0",
        "error: checkpoints[0].steps: unknown key; this table takes name, path, lr, step, optimizer, adam_step, "
        "adam_eps\n",
    ),
    "bad index kind": (
        'kind = "flat"',
        'kind = "annoy"',
        "error: index.kind: Input should be 'flat', 'ivf', 'hnsw', 'ivfpq' or 'ivfsq', got 'annoy'\n",
    ),
    "index check of IndexOptions": (
        'kind = "flat"',
        'kind = "ivf"\nnlist = 0',
        "error: index.nlist: nlist must be a positive integer (or unset for the default), got 0\n",
    ),
    "bad store dtype": (
        'dtype = "float32"',
        'dtype = "int8"',
        "error: store.dtype: Input should be 'float16' or 'float32', got 'int8'\n",
    ),
    "task object without a colon": (
        'object = "gradstore.demos.digits:DigitsTask"',
        'object = "DigitsTask"',
        "error: task.object: must look like \"package.module:TaskClass\", got 'DigitsTask'\n",
    ),
    "two bad fields": (
        'init = "gaussian"\nseed = 3',
        'init = "pca2"\nseed = "three"',
        f"error: projection.init: Input should be {INITS}, got 'pca2'\n"
        f"error: projection.seed: {NOT_AN_INT}, got 'three'\n",
    ),
}


@pytest.mark.parametrize("name", CONFIG_ERRORS)
def test_config_errors_name_section_and_field_and_exit_2(name, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("GRADSTORE_PORT", raising=False)
    old, new, expected = CONFIG_ERRORS[name]
    assert fails(capsys, "info", "--config", _edited(tmp_path, old, new)) == expected


def test_config_without_checkpoints_or_task(capsys, tmp_path):
    text = RUN_TOML.format(n=N_TRAIN, index='kind = "flat"', residency="all")
    no_checkpoints = tmp_path / "none.toml"
    no_checkpoints.write_text(text.split("[[checkpoints]]")[0] + "[index]\n")
    assert fails(capsys, "info", "--config", no_checkpoints) == (
        "error: checkpoints: needs at least one [[checkpoints]] entry with name, path and lr (no store with "
        f"checkpoints at {tmp_path / 'run.zarr'} to take them from)\n"
    )
    no_task = tmp_path / "notask.toml"
    no_task.write_text(text.replace('[task]\nobject = "gradstore.demos.digits:DigitsTask"\n', ""))
    assert fails(capsys, "info", "--config", no_task).startswith("error: task: Field required\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[store\npath = 1\n")
    assert fails(capsys, "info", "--config", broken).startswith(f"error: {broken}: invalid TOML (")


def test_config_error_in_a_real_process_is_one_line_and_no_traceback(tmp_path):
    bad = _edited(tmp_path, 'residency = "all"', "residency = 3")
    command = [sys.executable, "-m", "gradstore.server.cli", "query", "--config", str(bad), "--query", "{}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: query.residency: Input should be 'all' or 'one', got 3\n"


def test_config_values_paths_and_defaults(tmp_path, monkeypatch):
    for var in ("GRADSTORE_API_KEY", "GRADSTORE_HOST", "GRADSTORE_PORT", "GRADSTORE_MAX_TOP_K"):
        monkeypatch.delenv(var, raising=False)
    config = RunConfig.load(_edited(tmp_path, "step = 1", 'step = 1\noptimizer = "opt/epoch-1.pt"\nadam_eps = 1e-6'))
    assert config.path == tmp_path / "edited.toml"
    assert config.store.path == tmp_path / "run.zarr" and config.store.eval_path is None
    assert [c.path for c in config.checkpoints] == [tmp_path / "epoch-0.pt", tmp_path / "epoch-1.pt"]
    assert [c.optimizer for c in config.checkpoints] == [None, tmp_path / "opt" / "epoch-1.pt"]
    assert [c.adam_eps for c in config.checkpoints] == [None, 1e-6]  # None: eps from the optimizer state
    projection = config.projection
    assert (projection.rank, projection.init, projection.seed, projection.layers) == ((8, 8), "gaussian", 3, ("*",))
    assert config.index == IndexOptions(kind="flat") and config.index_path is None
    query = config.query
    assert (query.residency, query.device, query.batch_size, config.batch_size) == ("all", None, 32, 64)
    server = config.server
    assert (server.host, server.port, server.api_key, server.max_top_k) == ("127.0.0.1", 8000, None, 100)
    assert config.task_object == "gradstore.demos.digits:DigitsTask"
    assert config.task_args == {"n_train": N_TRAIN, "hidden": 16}
    index = 'kind = "hnsw"\nef_search = 64\npath = "../elsewhere/x.index"'
    moved = RunConfig.load(_edited(tmp_path, 'kind = "flat"', index))
    assert moved.index == IndexOptions(kind="hnsw", ef_search=64)
    assert moved.index_path == tmp_path.parent / "elsewhere" / "x.index"


def test_server_settings_from_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADSTORE_API_KEY", "from-env")
    monkeypatch.setenv("GRADSTORE_MAX_TOP_K", "7")
    plain = RunConfig.load(_edited(tmp_path, "[query]", "[server]\nport = 9001\n\n[query]"))
    assert (plain.server.api_key, plain.server.max_top_k, plain.server.port) == ("from-env", 7, 9001)
    # what run.toml sets wins over the environment
    keyed_toml = _edited(tmp_path, "[query]", '[server]\napi_key = "from-toml"\n\n[query]', name="keyed.toml")
    keyed = RunConfig.load(keyed_toml)
    assert keyed.server.api_key == "from-toml" and keyed.server.max_top_k == 7
    monkeypatch.setenv("GRADSTORE_PORT", "eighty")
    assert fails(capsys, "info", "--config", keyed_toml) == f"error: server.port: {NOT_AN_INT}, got 'eighty'\n"
    monkeypatch.delenv("GRADSTORE_PORT")
    unknown = _edited(tmp_path, "[query]", '[server]\ncors = ["x"]\n\n[query]')
    assert fails(capsys, "info", "--config", unknown) == (
        "error: server.cors: unknown key; this table takes host, port, api_key, cors_origins, max_top_k, max_queries, "
        "max_body_bytes, max_header_bytes, header_timeout_s, body_timeout_s, keep_alive_s, max_connections, "
        "max_connections_per_client, drain_s, "
        "watch_s, batch_window_ms, batch_merge, engine, ray_shard_cpus, ray_shard_gpus, ray_gradients, "
        "ray_gradient_gpus, ray_gradient_cpus\n"
    )


def test_cli_defaults_and_choices_are_the_request_models():
    from typing import get_args

    from gradstore.server.run.schemas import InfluenceOptions, LrWeighting, Measurement, SelfInfluenceRequest

    parser = cli.build_parser()
    query = parser.parse_args(["query", "--config", "run.toml"])
    flags = (query.top_k, query.lr_weighting, query.measurement)
    assert flags == (10, None, "loss")  # None: the index's default weighting
    assert flags == tuple(InfluenceOptions.model_fields[k].default for k in ("top_k", "lr_weighting", "measurement"))
    self_inf = parser.parse_args(["self-influence", "--config", "run.toml"])
    fields = SelfInfluenceRequest.model_fields
    assert (self_inf.top_k, self_inf.lr_weighting) == (20, None)
    assert (self_inf.top_k, self_inf.lr_weighting) == (fields["top_k"].default, fields["lr_weighting"].default)
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["query"]._actions}
    assert tuple(actions["lr_weighting"].choices) == get_args(LrWeighting) == ("schedule", "uniform", "normalized")
    assert tuple(actions["measurement"].choices) == get_args(Measurement) == ("loss", "measurement")
    assert actions["top_k"].help == "proponents and opponents per query (default: 10)"


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"gradstore {version('gradstore')}\n"


def test_help_and_version_start_fast_without_the_heavy_stack():
    """`gradstore --help` / `--version` import argparse, pydantic, numpy and the request schemas, not torch, FAISS,
    Zarr, FastAPI or transformers (issue 18: they took 6-15 s; measured 0.4-0.6 s of CPU after)."""
    code = (
        "import sys\n"
        "from gradstore.server.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = {'torch', 'faiss', 'zarr', 'fastapi', 'transformers', 'sklearn'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    for flag in ("--help", "--version"):
        done = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "[]", flag
    # the evaluate command still has its own options (loaded when the command line names it)
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "tail-patch", "--help"])


def test_demo_port_taken_fails_before_training_or_moves_to_a_free_one(tmp_path, capsys, monkeypatch):
    from gradstore.demos import digits as demo

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not demo.port_is_free("127.0.0.1", taken)
        # an explicit --port that is taken: refused at once, nothing trained, the fix named
        err = fails(capsys, "demo", "--port", taken, "--workdir", tmp_path / "demo", "--quiet")
        assert f"port {taken} on 127.0.0.1 is in use" in err and "--port" in err
        assert not (tmp_path / "demo").exists()
        # the default port taken: the next free one, said on stdout
        monkeypatch.setattr(demo, "DEMO_PORT", taken)
        port = demo.demo_port("127.0.0.1", None)
        assert port > taken and demo.port_is_free("127.0.0.1", port)
        assert f"port {taken} on 127.0.0.1 is in use" in capsys.readouterr().out
