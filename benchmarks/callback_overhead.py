"""Training throughput with and without the gradstore callbacks on a tiny GPT-2 (CPU by default).

Side by side in one run, alternating plain and logged runs (``--repeats`` each) so machine noise hits both:
  hf         transformers.Trainer, with and without ``gradstore.logger.hf.GradstoreTrainerCallback``
  lightning  lightning.Trainer, with and without ``gradstore.logger.lightning.GradstoreLightningCallback``
  loop       a hand-written loop, with and without ``GradientLogger.capture`` (the capture's own cost, for reference)
Steps/s is timed over the optimizer steps after ``--warmup`` (so start-up, the store's creation and the initial
weights' save are excluded); the median over repeats is reported with the overhead in percent (and the overhead
between the best runs, less sensitive to a busy machine).

    python benchmarks/callback_overhead.py [--steps 40] [--batch 8] [--seq 64] [--rank 16] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _model(args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=args.layers,
        n_embd=args.width,
        n_head=4,
        vocab_size=args.vocab,
        n_positions=args.seq,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _docs(args: argparse.Namespace) -> list[list[int]]:
    rng = np.random.default_rng(0)
    n = args.batch * (args.steps + args.warmup + 1)
    return [rng.integers(0, args.vocab, size=int(rng.integers(args.seq // 2, args.seq + 1))).tolist() for _ in range(n)]


def _collate(features: list) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        ids[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        mask[row, : len(feature["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _Clock:
    """Times optimizer steps ``warmup+1 .. warmup+steps``."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.stop, self.steps = warmup, 0.0, 0.0, 0

    def step_done(self, step: int) -> None:
        if step == self.warmup:
            self.start = time.perf_counter()
        elif step > self.warmup:
            self.stop, self.steps = time.perf_counter(), step - self.warmup

    @property
    def rate(self) -> float:
        return self.steps / (self.stop - self.start)


def run_hf(args: argparse.Namespace, logged: bool, tmp: Path) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradstore.logger.hf import GradstoreTrainerCallback

    clock = _Clock(args.warmup)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step)

    callbacks: list = [Timer()]
    if logged:
        callbacks.insert(0, GradstoreTrainerCallback(store=tmp / "run.zarr", rank=args.rank, layers=args.log_layers))
    training = TrainingArguments(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + args.warmup,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=args.device == "cpu",
        disable_tqdm=True,
        seed=0,
    )
    docs = [{"input_ids": d} for d in _docs(args)]
    Trainer(model=_model(args), args=training, train_dataset=docs, data_collator=_collate, callbacks=callbacks).train()
    return clock.rate


def run_lightning(args: argparse.Namespace, logged: bool, tmp: Path) -> float:
    import lightning.pytorch as pl

    from gradstore.logger.lightning import GradstoreLightningCallback

    clock = _Clock(args.warmup)

    class LitLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model(args)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            clock.step_done(self.trainer.global_step)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    callbacks: list = []
    if logged:
        normalizer = lambda batch: (batch["labels"][:, 1:] != -100).sum()  # noqa: E731 - HF's token mean
        callbacks.append(
            GradstoreLightningCallback(
                store=tmp / "run.zarr", rank=args.rank, module="model", reduction=normalizer, layers=args.log_layers
            )
        )
    examples: Any = [{"input_ids": d} for d in _docs(args)]
    loader = torch.utils.data.DataLoader(examples, batch_size=args.batch, shuffle=True, collate_fn=_collate)
    trainer = pl.Trainer(
        accelerator=args.device,
        max_steps=args.steps + args.warmup,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=callbacks,
    )
    trainer.fit(LitLM(), loader)
    return clock.rate


def run_loop(args: argparse.Namespace, logged: bool, tmp: Path) -> float:
    """A hand-written loop, plain or with ``GradientLogger.capture`` around each backward: the capture's own cost."""
    from gradstore.logger import GradientLogger

    model = _model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    docs = _docs(args)
    batches = [_collate([{"input_ids": d} for d in docs[i : i + args.batch]]) for i in range(0, len(docs), args.batch)]
    logger = (
        GradientLogger(model, None, store=tmp / "run.zarr", rank=args.rank, layers=args.log_layers, progress=False)
        if logged
        else None
    )
    clock = _Clock(args.warmup)
    for step, batch in enumerate(batches[: args.steps + args.warmup]):
        loss = model(**batch).loss
        if logger is not None:
            tokens = float((batch["labels"][:, 1:] != -100).sum())
            ids = range(step * args.batch, (step + 1) * args.batch)
            with logger.capture("c", 1e-3, list(ids), reduction="sum", loss_scale=1 / tokens):
                loss.backward()
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        clock.step_done(step + 1)
    if logger is not None:
        logger.close()
    return clock.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", choices=["hf", "lightning", "loop", "all"], default="all")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--log-layers",
        nargs="+",
        default=["*"],
        help="layer globs to log; one small layer (transformer.ln_f) isolates the callback's own plumbing",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    runners = {"hf": run_hf, "lightning": run_lightning, "loop": run_loop}
    frameworks = list(runners) if args.framework == "all" else [args.framework]
    results = []
    for framework in frameworks:
        rates: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for logged in (False, True):
                with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                    rates[logged].append(runners[framework](args, logged, Path(tmp)))  # the Trainer prints its logs
        plain, with_callback = statistics.median(rates[False]), statistics.median(rates[True])
        results.append(
            {
                "framework": framework,
                "plain_steps_per_s": round(plain, 2),
                "callback_steps_per_s": round(with_callback, 2),
                "overhead_percent": round(100 * (plain / with_callback - 1), 1),
                "best_overhead_percent": round(100 * (max(rates[False]) / max(rates[True]) - 1), 1),
                "runs": {"plain": [round(r, 2) for r in rates[False]], "callback": [round(r, 2) for r in rates[True]]},
            }
        )
    keys = ("steps", "batch", "seq", "layers", "width", "vocab", "rank", "log_layers", "device")
    config = {k: getattr(args, k) for k in keys}
    print(json.dumps({"config": {**config, "threads": torch.get_num_threads()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
