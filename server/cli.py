"""The ``gradstore`` command line: index, query, self-influence, info (and serve, demo)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from gradstore.projection import GradstoreError


def _config(args: argparse.Namespace):
    from .config import RunConfig

    return RunConfig.load(args.config)


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
    from .jobs import index_run

    index = index_run(_config(args), progress=not args.quiet)
    if index is not None:
        print(f"indexed {index.num_rows} examples x {len(index.checkpoints)} checkpoints into {index.path}")


def cmd_query(args: argparse.Namespace) -> None:
    from .jobs import open_engine

    engine = open_engine(_config(args), device=args.device)
    response = engine.influence(
        _load_queries(args), top_k=args.top_k, lr_weighting=args.lr_weighting,
        checkpoints=_checkpoints(args.checkpoints), measurement=args.measurement,
    )
    if args.json:
        print(response.model_dump_json(indent=2))
        return
    for i, result in enumerate(response.results):
        print(f"query {i}  (weights {response.weights})")
        for title, rows in (("proponents", result.proponents), ("opponents", result.opponents)):
            print(f"  {title}:")
            for rank, item in enumerate(rows, 1):
                print(f"    {rank:>3}. id={item.id:<8} score={item.score:+.6g}  {_short(item.example)}")


def cmd_self_influence(args: argparse.Namespace) -> None:
    from .jobs import open_engine

    engine = open_engine(_config(args), device=args.device)
    response = engine.self_influence(top_k=args.top_k, lr_weighting=args.lr_weighting, checkpoints=_checkpoints(args.checkpoints))
    if args.json:
        print(response.model_dump_json(indent=2))
        return
    print(f"highest self-influence (weights {response.weights}):")
    for rank, item in enumerate(response.results, 1):
        print(f"  {rank:>3}. id={item.id:<8} score={item.score:.6g}  {_short(item.example)}")


def cmd_info(args: argparse.Namespace) -> None:
    from gradstore.store import GradientStore

    from .jobs import open_index

    config = _config(args)
    info: dict = {"config": str(config.path), "store": str(config.store.path)}
    try:
        store = GradientStore.open(config.store.path)
        info.update(
            dim=store.dim,
            dtype=store.dtype,
            projection={"init": store.spec.init, "seed": store.spec.seed, "layers": len(store.spec.layers)},
            checkpoints=[
                {"name": c, "lr": store.checkpoint_info(c).lr, "rows": store.num_rows(c), "adam": store.checkpoint_info(c).adam}
                for c in store.checkpoints
            ],
        )
        try:
            index = open_index(config, store, device="cpu")
            info["index"] = {"path": str(index.path), "status": "ready", "kind": index.options.kind,
                             "preconditioner": index.options.preconditioner, "normalize": index.options.normalize,
                             "rows": index.num_rows}
        except GradstoreError as exc:
            info["index"] = {"status": "unusable", "reason": str(exc)}
    except GradstoreError as exc:
        info["store_status"] = str(exc)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "checkpoints":
            print("checkpoints:")
            for c in value:
                print(f"  {c['name']:<20} lr={c['lr']:<10g} rows={c['rows']:<9} adam={c['adam']}")
        else:
            print(f"{key}: {value}")


def _serve(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")


def cmd_serve(args: argparse.Namespace) -> None:
    from .app import create_app

    config = _config(args)
    host, port = args.host or config.server.host, args.port or config.server.port
    print(f"gradstore: loading {config.path.name}; serving on http://{host}:{port} (API docs at /docs)", flush=True)
    _serve(create_app(config), host, port)


def cmd_demo(args: argparse.Namespace) -> None:
    from .app import create_app
    from .config import RunConfig
    from .demo import prepare_demo

    config = RunConfig.load(prepare_demo(args.workdir, progress=not args.quiet))
    print(f"demo run ready: {config.path} (try: gradstore query --config {config.path} --query '{{\"test_index\": 0}}')", flush=True)
    if args.no_serve:
        return
    print(f"gradstore demo: dashboard at http://{args.host}:{args.port}/  (API docs at /docs)", flush=True)
    _serve(create_app(config), args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradstore", description="Training-data attribution: which training examples made my model say this?")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="TOML run config (see README)")
        return p

    def with_weighting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--lr-weighting", choices=["schedule", "uniform", "normalized"], default="schedule",
                       help="checkpoint weights: the lrs, 1, or lr / mean lr (default: schedule)")
        p.add_argument("--checkpoints", help="comma-separated subset of checkpoints (default: all)")
        p.add_argument("--device", help="device for query gradients (default: cuda when available)")
        p.add_argument("--json", action="store_true", help="print JSON (the HTTP API's schema)")

    p = with_config(sub.add_parser("index", help="log gradients at every checkpoint (resumable) and build the index"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_index)

    p = with_config(sub.add_parser("query", help="top proponents and opponents of query examples"))
    p.add_argument("--query", help="one JSON payload, as the Task's query_example takes it")
    p.add_argument("--query-file", help="JSON Lines file of payloads")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--measurement", choices=["loss", "measurement"], default="loss")
    with_weighting(p)
    p.set_defaults(func=cmd_query)

    p = with_config(sub.add_parser("self-influence", help="training examples with the largest self-influence"))
    p.add_argument("--top-k", type=int, default=20)
    with_weighting(p)
    p.set_defaults(func=cmd_self_influence)

    p = with_config(sub.add_parser("serve", help="serve the HTTP API (and dashboard) for a run"))
    p.add_argument("--host", help="default: [server] host or 127.0.0.1")
    p.add_argument("--port", type=int, help="default: [server] port or 8000")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train a digits classifier with in-training logging, index it, serve the dashboard")
    p.add_argument("--workdir", default="runs/demo", help="where the demo run is written (reused if complete)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="prepare the run and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = with_config(sub.add_parser("info", help="store, checkpoints and index status"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except GradstoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
