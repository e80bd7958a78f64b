"""The ``gradstore`` command line: index, query, score, self-influence, info (and serve, demo).

Start-up: ``gradstore --help`` / ``--version`` must answer in well under a second, so this module imports only
argparse, pydantic and the request schemas at the top; torch, FAISS, Zarr, FastAPI and transformers (through
config, engine, runs, evaluation, app, demos) are imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from . import __version__
from .run.schemas import ExplainRequest, InfluenceOptions, InfluenceRequest, SelfInfluenceRequest

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .run.config import RunConfig
    from .run.run import Run

# `gradstore --help` lists `evaluate` without importing the evaluation package (torch); its own options are
# added (gradstore.evaluation.commands) when the command line names it
EVALUATE_HELP = "validate attribution: LDS, brittleness, tail-patch, fact-tracing recall"


def _config(args: argparse.Namespace) -> RunConfig:
    from .run.config import RunConfig

    return RunConfig.load(args.config, hf_output=args.hf_output)


def _run(args: argparse.Namespace) -> Run:
    from .run.run import Run

    return Run(_config(args))


def _option(parser: argparse.ArgumentParser, flag: str, model: type[BaseModel], name: str, **kwargs: Any) -> None:
    """A flag whose default, help and (for a Literal) choices come from the request model's field."""
    field = model.model_fields[name]
    literal = next((a for a in (field.annotation, *get_args(field.annotation)) if get_origin(a) is Literal), None)
    if literal is not None:  # a Literal, or an optional one
        kwargs["choices"] = get_args(literal)
    shown = "" if field.default is None else f" (default: {field.default})"  # None: the description says it
    parser.add_argument(flag, default=field.default, help=f"{field.description}{shown}", **kwargs)


def _bad_input(message: str) -> SystemExit:
    """Report a bad command-line input like every other error: ``error: ...`` on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def _load_queries(args: argparse.Namespace) -> list[dict]:
    queries: list[dict] = []
    try:
        if args.query:
            queries.append(json.loads(args.query))
        if args.query_file:
            lines = Path(args.query_file).read_text().splitlines()
            queries += [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as exc:
        raise _bad_input(f"query payloads must be JSON objects ({exc})") from None
    except OSError as exc:
        raise _bad_input(f"cannot read --query-file: {exc}") from None
    if not queries:
        raise _bad_input("give --query '<json payload>' or --query-file queries.jsonl")
    if not all(isinstance(q, dict) for q in queries):
        raise _bad_input("each query payload must be a JSON object")
    return queries


def _checkpoints(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _short(example: dict, width: int = 70) -> str:
    text = json.dumps(example, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def cmd_index(args: argparse.Namespace) -> None:
    # the job writes the index and does not load it (a large resident index would be read for nothing)
    done = _run(args).index(progress=not args.quiet, wait_s=args.wait, rebuild=args.rebuild, load=False)
    if done is not None:
        print(f"logged {done.logged_rows} new rows; {done.describe()}")
        print(f"indexed {done.num_rows} examples x {len(done.checkpoints)} checkpoints into {done.path}")


def cmd_query(args: argparse.Namespace) -> None:
    from .run.engine import build_request

    request = build_request(
        InfluenceRequest,
        {
            "queries": _load_queries(args),
            "top_k": args.top_k,
            "lr_weighting": args.lr_weighting,
            "checkpoints": _checkpoints(args.checkpoints),
            "measurement": args.measurement,
        },
    )
    response = _run(args).open_engine(device=args.device).answer_influence(request)
    if args.json:
        print(response.model_dump_json(indent=2))
        return
    for i, result in enumerate(response.results):
        print(f"query {i}  (weights {response.weights})")
        for title, rows in (("proponents", result.proponents), ("opponents", result.opponents)):
            print(f"  {title}:")
            for rank, item in enumerate(rows, 1):
                marker = "" if item.role in (None, title[:-1]) else f"  [{item.role}: not a {title[:-1]}]"
                print(f"    {rank:>3}. id={item.id:<8} score={item.score:+.6g}  {_short(item.example)}{marker}")


def cmd_score(args: argparse.Namespace) -> None:
    from .run.engine import build_request
    from .run.score_job import read_payloads, score_queries

    options = build_request(
        InfluenceOptions,
        {
            "top_k": args.top_k,
            "lr_weighting": args.lr_weighting,
            "checkpoints": _checkpoints(args.checkpoints),
            "measurement": args.measurement,
        },
    )
    if args.block_queries < 1:
        raise _bad_input(f"--block-queries must be at least 1, got {args.block_queries}")
    payloads = read_payloads(args.queries)
    summary = score_queries(
        _run(args),
        payloads,
        args.output,
        options=options,
        block_queries=args.block_queries,
        workers=args.workers,
        output_format=args.format,
        device=args.device,
        ray=args.ray,
        progress=not args.quiet,
    )
    if args.json:
        fields = ("queries", "rows", "blocks", "blocks_written", "blocks_skipped", "seconds", "rows_per_second")
        print(json.dumps({"output": str(summary.output), **{f: getattr(summary, f) for f in fields}}, indent=2))
        return
    skipped = f", {summary.blocks_skipped} already written" if summary.blocks_skipped else ""
    print(
        f"scored {summary.queries} queries x {summary.rows} rows in {summary.blocks} blocks "
        f"({summary.blocks_written} written{skipped}) in {summary.seconds:.2f} s: "
        f"{summary.rows_per_second:,.0f} rows/s, {summary.pairs_per_second:,.0f} scores/s, "
        f"{summary.bytes_scanned / max(summary.seconds, 1e-9) / 1e6:,.0f} MB/s scanned{' on Ray' if args.ray else ''}"
    )
    print(f"output: {summary.output} (top {options.top_k} proponents and opponents per query)")


def cmd_explain(args: argparse.Namespace) -> None:
    from .run.engine import build_request

    try:
        query = json.loads(args.query)
    except json.JSONDecodeError as exc:
        raise _bad_input(f"--query must be a JSON object ({exc})") from None
    if not isinstance(query, dict):
        raise _bad_input("--query must be a JSON object")
    request = build_request(
        ExplainRequest,
        {
            "query": query,
            "example_id": args.example_id,
            "lr_weighting": args.lr_weighting,
            "checkpoints": _checkpoints(args.checkpoints),
            "measurement": args.measurement,
        },
    )
    response = _run(args).open_engine(device=args.device).answer_explain(request)
    if args.json:
        print(response.model_dump_json(indent=2))
        return
    stored = "-" if response.stored_score is None else f"{response.stored_score:+.6g}"
    print(f"id={response.example_id}  score={response.score:+.6g} (index: {stored})  {_short(response.example)}")
    scale = max((abs(t.share) for t in response.tokens), default=0.0) or 1.0
    for t in response.tokens:
        bar = ("+" if t.share >= 0 else "-") * round(20 * abs(t.share) / scale)
        print(f"  {t.position:>5}  {(t.text or '')[:24]:<24} {t.share:+.4g}  {bar}")
    if response.rest:
        print(f"  rest (not per token): {response.rest:+.4g}")


def cmd_self_influence(args: argparse.Namespace) -> None:
    from .run.engine import build_request

    request = build_request(
        SelfInfluenceRequest,
        {
            "top_k": args.top_k,
            "lr_weighting": args.lr_weighting,
            "checkpoints": _checkpoints(args.checkpoints),
        },
    )
    response = _run(args).open_engine(device=args.device).answer_self_influence(request)
    if args.json:
        print(response.model_dump_json(indent=2))
        return
    print(f"highest self-influence (weights {response.weights}):")
    for rank, item in enumerate(response.results, 1):
        print(f"  {rank:>3}. id={item.id:<8} score={item.score:.6g}  {_short(item.example)}")


def cmd_info(args: argparse.Namespace) -> None:
    run = _run(args)
    config = run.config
    info = run.describe()
    if args.json:
        print(info.model_dump_json(indent=2, exclude_none=True))
        return
    print(f"config: {config.path}")
    for key, value in info.model_dump(exclude_none=True).items():
        if key == "checkpoints":
            print("checkpoints:")
            for c in value:
                step = c.get("step", "-")
                line = f"  {c['name']:<20} lr={c['lr']:<10g} step={step!s:<8} rows={c['rows']:<9} adam={c['adam']}"
                print(f"{line}  {_verification_text(c.get('verification'))}")
        elif key == "coverage":
            skipped = value["skipped"]
            listed = f"; skipped: {', '.join(skipped[:12])}{' ...' if len(skipped) > 12 else ''}" if skipped else ""
            print(f"coverage: {100 * value['fraction']:.1f}% of {value['total_elements']:,} trainable elements{listed}")
        else:
            print(f"{key}: {value}")


def _verification_text(check: dict | None) -> str:
    """``exact (per-example, max error 3e-07 <= 0.001)``, ``UNVERIFIED (verify=False)`` or ``unchecked``."""
    if check is None:
        return "check: none recorded"
    if not check["passed"]:
        return "check: UNVERIFIED (logged with verify=False)"
    bound = f"max error {check['max_error']:.2g} <= {check['tolerance']:g}"
    return f"check: exact ({check['mode']} in {check['path']}, {bound})"


def cmd_evaluate(args: argparse.Namespace) -> None:
    from gradstore.evaluation.commands import run_evaluation

    run_evaluation(args, _config(args))


def cmd_verify(args: argparse.Namespace) -> None:
    problems = _run(args).verify()
    for line in problems:
        print(f"damaged: {line}")
    if problems:
        raise SystemExit(2)
    print("store and index intact")


def _serve(config: RunConfig, host: str, port: int) -> None:
    """Load the run's engine first (a run it refuses is a GradstoreError: ``error: ...``, exit 2, before any
    socket is opened), then serve it with the bounds of ``serving.py`` until SIGTERM/SIGINT."""
    from .http.app import create_app
    from .http.serving import serve
    from .http.watch import run_fingerprint
    from .run.run import Run

    run = Run(config)
    run.serving_threads()
    fingerprint = run_fingerprint(config)  # before loading: a change while it loads is seen by the watch
    engine = run.open_serving_engine()  # [server] engine = "ray": the index searched by Ray Serve shards
    serve(create_app(config, engine=engine, fingerprint=fingerprint), host, port)


def cmd_serve(args: argparse.Namespace) -> None:
    config = _config(args)
    if args.ray:
        config = config.model_copy(update={"server": config.server.model_copy(update={"engine": "ray"})})
    host, port = args.host or config.server.host, args.port or config.server.port
    print(f"gradstore: loading {config.path.name}; serving on http://{host}:{port} (API docs at /docs)", flush=True)
    _serve(config, host, port)


def cmd_demo(args: argparse.Namespace) -> None:
    from gradstore.demos.digits import demo_port

    from .run.config import RunConfig

    port = None if args.no_serve else demo_port(args.host, args.port)  # before training: a taken port fails fast
    if args.task == "lm":
        from gradstore.demos.lm import prepare_lm_demo, try_query

        workdir = args.workdir or "runs/demo-lm"
        config = RunConfig.load(prepare_lm_demo(workdir, progress=not args.quiet))
        prompt, completion = try_query(workdir)
        payload = json.dumps({"prompt": prompt, "completion": completion})
        print(f"demo run ready: {config.path}", flush=True)
        print(f"  try: gradstore query --config {config.path} --query '{payload}'", flush=True)
        print(
            f"  or in the dashboard: prompt -> completion, {prompt!r} -> {completion.strip()!r} "
            "(the dashboard puts the space between them)",
            flush=True,
        )
    else:
        from gradstore.demos.digits import prepare_demo

        config = RunConfig.load(prepare_demo(args.workdir or "runs/demo", progress=not args.quiet))
        try_it = f"gradstore query --config {config.path} --query '{{\"test_index\": 0}}'"
        print(f"demo run ready: {config.path} (try: {try_it})", flush=True)
    if args.no_serve:
        return
    assert port is not None
    print(f"gradstore demo: dashboard at http://{args.host}:{port}/  (API docs at /docs)", flush=True)
    _serve(config, args.host, port)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``gradstore`` parser; ``argv`` (default ``sys.argv[1:]``) only decides whether ``evaluate``'s own
    options are loaded (they import the evaluation package, torch included)."""
    parser = argparse.ArgumentParser(
        prog="gradstore", description="Training-data attribution: which training examples made my model say this?"
    )
    parser.add_argument("--version", action="version", version=f"gradstore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="TOML run config (see README)")
        p.add_argument(
            "--hf-output",
            metavar="DIR",
            help="a Hugging Face Trainer output_dir: its checkpoint-* folders are the checkpoints (as [hf] output)",
        )
        return p

    def with_weighting(p: argparse.ArgumentParser, model: type[BaseModel]) -> None:
        _option(p, "--lr-weighting", model, "lr_weighting")
        p.add_argument("--checkpoints", help="comma-separated subset of checkpoints (default: all)")
        p.add_argument("--device", help="device for query gradients (default: cuda when available)")
        p.add_argument("--json", action="store_true", help="print JSON (the HTTP API's schema)")

    p = with_config(sub.add_parser("index", help="log gradients at every checkpoint (resumable) and build the index"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long to wait for another `gradstore index` on the same store to finish (default: 0, fail at once)",
    )
    p.add_argument(
        "--rebuild", action="store_true", help="build the index afresh instead of updating it (reusing what holds)"
    )
    p.set_defaults(func=cmd_index)

    p = with_config(sub.add_parser("query", help="top proponents and opponents of query examples"))
    p.add_argument("--query", help="one JSON payload, as the Task's query_example takes it")
    p.add_argument("--query-file", help="JSON Lines file of payloads")
    _option(p, "--top-k", InfluenceOptions, "top_k", type=int)
    _option(p, "--measurement", InfluenceOptions, "measurement")
    with_weighting(p, InfluenceOptions)
    p.set_defaults(func=cmd_query)

    p = with_config(
        sub.add_parser("score", help="batch scoring: every query of a file against every training example, exactly")
    )
    p.add_argument("--queries", required=True, metavar="FILE", help="JSON Lines file of payloads (as --query-file)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder: one file per block (resumable)")
    _option(p, "--top-k", InfluenceOptions, "top_k", type=int)
    _option(p, "--measurement", InfluenceOptions, "measurement")
    with_weighting(p, InfluenceOptions)
    p.add_argument("--block-queries", type=int, default=256, help="queries per block and output file (default: 256)")
    p.add_argument("--workers", type=int, help="blocks scored at once (default: the CPU count)")
    p.add_argument(
        "--format", choices=("auto", "parquet", "jsonl"), default="auto", help="auto: Parquet when pyarrow is installed"
    )
    p.add_argument(
        "--ray", action="store_true", help="scan the rows in Ray Data workers (pip install 'gradstore[ray]')"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_score)

    p = with_config(sub.add_parser("explain", help="which tokens of one training example carry its score for a query"))
    p.add_argument("--query", required=True, help="one JSON payload, as the Task's query_example takes it")
    p.add_argument("--example-id", type=int, required=True, help="the training example to explain (a proponent's id)")
    _option(p, "--measurement", ExplainRequest, "measurement")
    with_weighting(p, ExplainRequest)
    p.set_defaults(func=cmd_explain)

    p = with_config(sub.add_parser("self-influence", help="training examples with the largest self-influence"))
    _option(p, "--top-k", SelfInfluenceRequest, "top_k", type=int)
    with_weighting(p, SelfInfluenceRequest)
    p.set_defaults(func=cmd_self_influence)

    p = with_config(sub.add_parser("serve", help="serve the HTTP API (and dashboard) for a run"))
    p.add_argument("--host", help="default: [server] host or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: [server] port or 8000")
    p.add_argument(
        "--ray",
        action="store_true",
        help='search the index with one Ray Serve deployment per shard ([server] engine = "ray"; RAY_ADDRESS or a '
        "local Ray)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "demo", help="train a small model with in-training logging (digits or a tiny LM), index it, serve the dashboard"
    )
    p.add_argument(
        "--task",
        choices=("digits", "lm"),
        default="digits",
        help="digits: an MLP on 8x8 digits; lm: a tiny GPT-2 (transformers.Trainer) on planted facts (default: digits)",
    )
    p.add_argument(
        "--workdir", help="where the demo run is written, reused if complete (default: runs/demo, runs/demo-lm)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, help="port to serve on (default: 8000, or the next free one when it is taken)")
    p.add_argument("--no-serve", action="store_true", help="prepare the run and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = with_config(sub.add_parser("verify", help="check every stored chunk and index file; list what is damaged"))
    p.set_defaults(func=cmd_verify)

    if "evaluate" in (sys.argv[1:] if argv is None else argv):
        from gradstore.evaluation.commands import add_evaluate_parser

        add_evaluate_parser(sub, with_config, cmd_evaluate)
    else:
        sub.add_parser("evaluate", help=EVALUATE_HELP)

    p = with_config(sub.add_parser("info", help="store, checkpoints and index status (works with an unusable index)"))
    p.add_argument("--json", action="store_true", help="print JSON (the schema of GET /v1/run)")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser(argv).parse_args(argv)
    from gradstore.projection import GradstoreError  # torch: only once a command runs

    try:
        args.func(args)
    except GradstoreError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # a config error has a line per bad field
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
