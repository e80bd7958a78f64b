"""What logging costs a training step, side by side in one process, with the order of the modes rotating.

One GPT-2 style model (transformers' ``GPT2LMHeadModel``: ``--layers`` blocks of width ``--width``, seq ``--seq``,
batch ``--batch``, every trainable parameter logged: ``layers=["*"]``) is trained or passed over in these modes:

  loop          a hand-written AdamW loop                                      (baseline of ``capture``)
  capture       the same loop with ``GradientLogger.capture()`` around each backward
  hf            ``transformers.Trainer``                                       (baseline of ``hf+gs``)
  hf+gs         the same Trainer with ``gradstore.logger.hf.GradstoreTrainerCallback``
  lightning     ``lightning.Trainer``                                          (baseline of ``lightning+gs``)
  lightning+gs  the same Trainer with ``gradstore.logger.lightning.GradstoreLightningCallback``
  fwdbwd        forward + backward of the per-example loss, no optimizer       (baseline of ``pass``)
  pass          ``GradientLogger.log_checkpoint`` over the same examples (the offline pass)
  bergson       EleutherAI Bergson's ``GradientCollector`` around the loop's backward (only when importable)
  bergson-pass  Bergson's collector over the examples, no weight gradients (only when importable)

Every run builds its model afresh (same seed) and times each step after ``--warmup``; a round runs every mode once,
each round in another (rotated) order, and a mode's figure is the median over all its timed steps (``min``: its
fastest round's median, less sensitive to a loaded machine). ``--clock cpu`` times the process's CPU time
instead (all its threads, OpenMP workers sleeping when idle): the work a step costs, for a machine others load.
Overheads are per step time against the mode's baseline; the passes are compared as examples/s. The default
``--quick`` grid (width 256, ranks 16 and 64, the loop, HF and Lightning modes and the passes) runs in a few minutes
on 2 CPU cores; ``--full`` runs widths 128-1024 and ranks 8-64. Stores are written to a temporary folder, so the
writes are part of the cost.

Bergson is no dependency of gradstore; to run its modes, install it into a virtual environment that reuses this
torch, and drop the torchvision / torchaudio wheels it pulls in (built for another torch, they make transformers
fail to import ``PreTrainedModel``):

    python -m venv /tmp/bvenv --system-site-packages
    /tmp/bvenv/bin/pip install bergson==2.5.1 torch==$(python -c 'import torch; print(torch.__version__)')
    /tmp/bvenv/bin/pip uninstall -y torchvision torchaudio
    /tmp/bvenv/bin/python benchmarks/capture_overhead.py --quick --clock cpu

    python benchmarks/capture_overhead.py [--quick | --full] [--threads 2] [--device cpu] [--clock cpu] [--json out]
    python benchmarks/capture_overhead.py --widths 1024 --ranks 16 --modes loop capture --rounds 5
    python benchmarks/capture_overhead.py --paired --ranks 16 64 --clock cpu   # loop vs capture, fwdbwd vs pass
    python benchmarks/capture_overhead.py --paired --breakdown --modes capture --clock cpu --steps 24  # + hook time

``--paired`` is the load-robust form: ``loop`` and ``capture`` steps alternate on two copies of the model, and the
offline pass runs one plain forward+backward (on a second copy) before each of its batches; the ratios are medians
of per-pair ratios, so both sides of a pair see the same machine load.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "--clock=cpu" in sys.argv or " ".join(sys.argv).find("--clock cpu") >= 0:
    # idle OpenMP workers sleep instead of spinning, so CPU time counts work, not waiting (set before torch loads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

_now = time.perf_counter  # --clock cpu: time.process_time (all threads of the process, the writer's included)

BASELINES = {
    "capture": "loop",
    "hf+gs": "hf",
    "lightning+gs": "lightning",
    "pass": "fwdbwd",
    "bergson": "loop",
    "bergson-pass": "fwdbwd",
}
STEP_MODES = ("loop", "capture", "hf", "hf+gs", "lightning", "lightning+gs", "bergson")
PASS_MODES = ("fwdbwd", "pass", "bergson-pass")


def _bergson_available() -> bool:
    try:
        import bergson  # noqa: F401
    except Exception:
        return False
    return True


# -- the model and the data -----------------------------------------------------------------------------------------


def _model(cfg: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=cfg.layers,
        n_embd=cfg.width,
        n_head=max(1, cfg.width // 64),
        vocab_size=cfg.vocab,
        n_positions=cfg.seq,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).to(cfg.device)


def _tokens(cfg: argparse.Namespace, n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab, (n, cfg.seq), generator=gen)


def _batches(cfg: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    ids = _tokens(cfg, cfg.batch * (cfg.warmup + cfg.steps))
    return [
        {"input_ids": ids[i : i + cfg.batch], "labels": ids[i : i + cfg.batch]} for i in range(0, len(ids), cfg.batch)
    ]


def _collate(features: list) -> dict:
    ids = torch.stack([torch.as_tensor(f["input_ids"]) for f in features])
    return {"input_ids": ids, "labels": ids}


def _example_losses(model, batch: torch.Tensor) -> torch.Tensor:
    """Per-example summed next-token loss ``[B]``."""
    logits = model(input_ids=batch).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
    return nll.view(batch.shape[0], -1).sum(1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Steps:
    """Per-step wall times between consecutive ``tick`` calls, after ``warmup`` steps."""

    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.count, self.last, self.times = warmup, device, 0, 0.0, []

    def start(self) -> None:
        _sync(self.device)
        self.last = _now()

    def tick(self) -> None:
        _sync(self.device)
        now = _now()
        if self.count >= self.warmup:
            self.times.append(now - self.last)
        self.count, self.last = self.count + 1, now


# -- the modes ------------------------------------------------------------------------------------------------------


def run_loop(cfg: argparse.Namespace, mode: str, tmp: Path) -> list[float]:
    from gradstore.logger import GradientLogger

    model = _model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [{k: v.to(cfg.device) for k, v in b.items()} for b in _batches(cfg)]
    logger = collector = None
    if mode == "capture":
        logger = GradientLogger(model, None, store=tmp / "run.zarr", rank=cfg.rank, progress=False)
    elif mode == "bergson":
        collector = _bergson_collector(cfg, model, tmp, len(batches) * cfg.batch)
    clock = _Steps(cfg.warmup, cfg.device)
    clock.start()
    for step, batch in enumerate(batches):
        ids = np.arange(step * cfg.batch, (step + 1) * cfg.batch)
        if collector is not None:  # Bergson's hooks are registered while its context is open: forward inside
            with collector.with_batch():
                loss = model(**batch).loss
                loss.backward()
            collector.process_batch(ids.tolist(), losses=loss.detach().expand(len(ids)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.tick()
            continue
        loss = model(**batch).loss  # HF's token mean over the batch
        if logger is not None:
            tokens = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
            with logger.capture("c", 1e-4, ids, reduction="sum", loss_scale=1 / tokens):
                loss.backward()
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    if logger is not None:
        logger.close()  # the last writes are part of the cost
        clock.tick()
        clock.times[-2] += clock.times.pop()
    if collector is not None:
        _bergson_flush(collector)
    return clock.times


def run_hf(cfg: argparse.Namespace, mode: str, tmp: Path) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradstore.logger.hf import GradstoreTrainerCallback

    clock = _Steps(cfg.warmup, cfg.device)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    callbacks: list = [Timer()]
    if mode == "hf+gs":
        callbacks.insert(0, GradstoreTrainerCallback(store=tmp / "run.zarr", rank=cfg.rank))
    training = TrainingArguments(
        output_dir=str(tmp / "out"),
        per_device_train_batch_size=cfg.batch,
        max_steps=cfg.warmup + cfg.steps,
        learning_rate=1e-4,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=cfg.device == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    data = [{"input_ids": row} for row in _tokens(cfg, cfg.batch * (cfg.warmup + cfg.steps))]
    trainer = Trainer(model=_model(cfg), args=training, train_dataset=data, data_collator=_collate, callbacks=callbacks)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return clock.times


def run_lightning(cfg: argparse.Namespace, mode: str, tmp: Path) -> list[float]:
    import lightning.pytorch as pl

    from gradstore.logger.lightning import GradstoreLightningCallback

    clock = _Steps(cfg.warmup, cfg.device)

    class LitLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model(cfg)

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def on_train_start(self):
            clock.start()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            clock.tick()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    callbacks: list = []
    if mode == "lightning+gs":
        tokens = lambda batch: batch["labels"][:, 1:].numel()  # noqa: E731 - HF's token mean (no padding here)
        callbacks.append(
            GradstoreLightningCallback(store=tmp / "run.zarr", rank=cfg.rank, module="model", reduction=tokens)
        )
    data: Any = [{"input_ids": row} for row in _tokens(cfg, cfg.batch * (cfg.warmup + cfg.steps))]
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch, collate_fn=_collate)
    trainer = pl.Trainer(
        accelerator="cuda" if cfg.device.startswith("cuda") else "cpu",
        devices=1,
        max_steps=cfg.warmup + cfg.steps,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=callbacks,
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(LitLM(), loader)
    return clock.times


class _TokenTask:
    """gradstore Task over token rows: per-example summed next-token loss."""

    def __init__(self, rows: torch.Tensor, device: str):
        self.rows, self.device = rows, device

    def train_examples(self):
        return self.rows

    def collate(self, examples):
        return torch.stack(list(examples))

    def example_id(self, example, index):
        return index

    def loss(self, model, batch):
        return _example_losses(model, batch)


def run_pass(cfg: argparse.Namespace, mode: str, tmp: Path) -> list[float]:
    """Seconds per batch of an offline pass (or of forward+backward) over ``steps`` batches (after ``warmup``)."""
    from gradstore.logger import GradientLogger, Task

    model = _model(cfg).eval()
    rows = _tokens(cfg, cfg.batch * (cfg.warmup + cfg.steps)).to(cfg.device)
    warm, timed = rows[: cfg.batch * cfg.warmup], rows[cfg.batch * cfg.warmup :]
    if mode == "fwdbwd":
        times = []
        for i in range(0, len(rows), cfg.batch):
            _sync(cfg.device)
            start = _now()
            _example_losses(model, rows[i : i + cfg.batch]).sum().backward()
            model.zero_grad(set_to_none=True)
            _sync(cfg.device)
            times.append(_now() - start)
        return times[cfg.warmup :]
    if mode == "bergson-pass":
        return _bergson_pass(cfg, model, rows, tmp)

    class TokenTask(_TokenTask, Task):
        pass

    task = TokenTask(rows, cfg.device)
    with GradientLogger(model, task, store=tmp / "run.zarr", rank=cfg.rank, progress=False) as logger:
        logger.log_checkpoint("warmup", lr=0.1, examples=warm, batch_size=cfg.batch)  # includes the exactness check
        _sync(cfg.device)
        start = _now()
        logger.log_checkpoint("bench", lr=0.1, examples=timed, batch_size=cfg.batch)  # flushes its writes
        _sync(cfg.device)
        elapsed = _now() - start
    return [elapsed / cfg.steps] * cfg.steps


# -- Bergson (optional) ---------------------------------------------------------------------------------------------


def _bergson_collector(cfg: argparse.Namespace, model, tmp: Path, n: int):
    from bergson import GradientCollector, GradientProcessor
    from bergson.config.config import IndexConfig
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": _tokens(cfg, n).tolist()})
    index = IndexConfig(run_path=str(tmp / "bergson"), projection_dim=cfg.rank)
    processor = GradientProcessor(projection_dim=cfg.rank)
    return GradientCollector(model=model, data=data, cfg=index, processor=processor)


def _bergson_flush(collector) -> None:
    """Flush Bergson's gradient writer (its full teardown also saves the dataset, which is no part of the cost)."""
    if collector.builder is not None:
        collector.builder.teardown()


def _bergson_pass(cfg: argparse.Namespace, model, rows: torch.Tensor, tmp: Path) -> list[float]:
    collector = _bergson_collector(cfg, model, tmp, len(rows))
    for p in model.parameters():
        p.requires_grad_(False)
    times = []
    for i in range(0, len(rows), cfg.batch):
        batch = rows[i : i + cfg.batch]
        _sync(cfg.device)
        start = _now()
        with collector.with_batch():
            embeds = model.get_input_embeddings()(batch).detach().requires_grad_(True)
            logits = model(inputs_embeds=embeds).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
            losses = nll.view(batch.shape[0], -1).sum(1)
            losses.sum().backward()
        collector.process_batch(list(range(i, i + len(batch))), losses=losses.detach())
        _sync(cfg.device)
        times.append(_now() - start)
    _bergson_flush(collector)
    return times[cfg.warmup :]


class _HookTimes:
    """``--breakdown``: the clock's time inside gradstore's module hooks, per captured step, split into the projections
    of Linear / Conv1D / Embedding blocks (their matrix products), the normalisation blocks, and the rest (hook
    bookkeeping: checks, tensor-hook registration, the buffer). Wraps the hook classes once, for the process's
    lifetime (:meth:`get`); :meth:`reset` starts a new run."""

    _instance: _HookTimes | None = None

    @classmethod
    def get(cls) -> _HookTimes:
        if cls._instance is None:
            cls._instance = cls()
        cls._instance.reset()
        return cls._instance

    def reset(self) -> None:
        self.totals.clear()
        self.steps = []

    def __init__(self) -> None:
        from gradstore.logger import hooks

        self.totals: dict[str, float] = {}
        self.steps: list[dict[str, float]] = []
        self._wrap(hooks.ModuleHook, "_forward", "hooks")
        self._wrap(hooks.ModuleHook, "_backward", "hooks")
        for cls, kind in ((hooks.WeightPart, "projections"), (hooks.TransposedPart, "projections")):
            self._wrap(cls, "forward", kind)
            self._wrap(cls, "accumulate", kind)
        self._wrap(hooks.NormPart, "forward", "norms")
        self._wrap(hooks.NormPart, "accumulate", "norms")

    def _wrap(self, cls: type, name: str, key: str) -> None:
        inner = getattr(cls, name)
        totals = self.totals

        def timed(*args, **kwargs):
            start = _now()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[key] = totals.get(key, 0.0) + _now() - start

        setattr(cls, name, timed)

    def step_done(self) -> None:
        hooks_s = self.totals.get("hooks", 0.0)
        parts = {k: v for k, v in self.totals.items() if k != "hooks"}
        self.steps.append({"hooks": hooks_s, **parts, "bookkeeping": hooks_s - sum(parts.values())})
        self.totals.clear()

    def summary(self, plain_ms: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in ("hooks", "projections", "norms", "bookkeeping"):
            ms = 1000 * statistics.median(s.get(key, 0.0) for s in self.steps)
            out[f"{key}_ms"] = ms
            out[f"{key}_percent_of_loop"] = 100 * ms / plain_ms
        return out


def run_paired(cfg: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """``loop`` and ``capture`` step by step in one process: two copies of the model (same weights, same batches),
    their steps alternating (AB BA AB ...), so each pair of steps sees the same machine load. Returns the medians
    and the median of the per-pair ratios (with ``--breakdown``, also the hooks' own time per captured step)."""
    from gradstore.logger import GradientLogger

    timer = _HookTimes.get() if cfg.breakdown else None  # before the logger: forward hooks bind at registration
    plain, hooked = _model(cfg), _model(cfg)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (plain, hooked)]
    logger = GradientLogger(hooked, None, store=tmp / "run.zarr", rank=cfg.rank, progress=False)
    batches = [{k: v.to(cfg.device) for k, v in b.items()} for b in _batches(cfg)]
    tokens = cfg.batch * (cfg.seq - 1)

    def step(which: int, i: int, batch: dict) -> float:
        model, optimizer = (plain, hooked)[which], optimizers[which]
        _sync(cfg.device)
        start = _now()
        loss = model(**batch).loss
        if which:
            ids = np.arange(i * cfg.batch, (i + 1) * cfg.batch)
            with logger.capture("c", 1e-4, ids, reduction="sum", loss_scale=1 / tokens):
                loss.backward()
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(cfg.device)
        return _now() - start

    pairs = []
    for i, batch in enumerate(batches):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        took = {which: step(which, i, batch) for which in order}
        if timer is not None:
            timer.step_done()
        if i >= cfg.warmup:
            pairs.append((took[0], took[1]))
    start = _now()
    logger.close()
    pairs[-1] = (pairs[-1][0], pairs[-1][1] + _now() - start)
    result = {
        "loop_ms": 1000 * statistics.median(p for p, _ in pairs),
        "capture_ms": 1000 * statistics.median(c for _, c in pairs),
        "overhead_percent_paired": 100 * (statistics.median(c / p for p, c in pairs) - 1),
        "overhead_percent_total": 100 * (sum(c for _, c in pairs) / sum(p for p, _ in pairs) - 1),
        "pairs": len(pairs),
    }
    if timer is not None:
        timer.steps = timer.steps[cfg.warmup :]
        result.update(timer.summary(result["loop_ms"]))
    return result


def run_paired_pass(cfg: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """The offline pass against plain forward+backward, batch by batch in one process: one ``log_checkpoint`` call
    over ``steps`` batches on one copy of the model, and before each of its batches (from the Task's ``collate``,
    after the writer has caught up, so its work is timed with the pass) one plain forward+backward of the same
    batch on another copy. A pass batch is the time between consecutive collates less the plain batch inside; the
    call's own setup and final flush are spread over its batches. Returns medians and the ratio plain / pass."""
    from gradstore.logger import GradientLogger, Task

    plain, hooked = _model(cfg).eval(), _model(cfg).eval()
    rows = _tokens(cfg, cfg.batch * (cfg.warmup + cfg.steps)).to(cfg.device)
    warm, timed = rows[: cfg.batch * cfg.warmup], rows[cfg.batch * cfg.warmup :]
    plain_times: list[float] = []
    marks: list[float] = []
    held: dict[str, Any] = {}  # the logger, once built

    class PairedTask(_TokenTask, Task):
        def collate(self, examples):
            batch = super().collate(examples)
            if "logger" in held and marks and len(examples) > 1:  # not the fingerprints' one-example collates
                held["logger"]._writer.flush()  # the pass's queued writes are its cost, not the plain batch's
                _sync(cfg.device)
                start = _now()
                _example_losses(plain, batch).sum().backward()
                plain.zero_grad(set_to_none=True)
                _sync(cfg.device)
                plain_times.append(_now() - start)
                marks.append(_now())
            return batch

    task = PairedTask(rows, cfg.device)
    with GradientLogger(hooked, task, store=tmp / "run.zarr", rank=cfg.rank, progress=False) as logger:
        held["logger"] = logger
        logger.log_checkpoint("warmup", lr=0.1, examples=warm, batch_size=cfg.batch)  # includes the exactness check
        _sync(cfg.device)
        marks.append(_now())
        logger.log_checkpoint("bench", lr=0.1, examples=timed, batch_size=cfg.batch)  # flushes its writes
        _sync(cfg.device)
        end = _now()
    # pass batch i: from the end of plain batch i to the start of plain batch i+1 (the last one: to the end)
    starts = [m - p for m, p in zip(marks[1:], plain_times)]  # when each plain batch began
    pass_times = [b - a for a, b in zip(marks[:-1], starts)]  # [0]: the call's setup (no batch yet)
    pass_times = [*pass_times[1:], end - marks[-1]]
    pass_times[0] += starts[0] - marks[0]  # setup, spread onto the first batch
    pairs = list(zip(plain_times, pass_times))
    return {
        "fwdbwd_ms": 1000 * statistics.median(plain_times),
        "pass_ms": 1000 * statistics.median(pass_times),
        "pass_vs_fwdbwd_paired": statistics.median(p / q for p, q in pairs),
        "pass_vs_fwdbwd_total": sum(plain_times) / sum(pass_times),
        "batches": len(pairs),
    }


RUNNERS: dict[str, Callable[[argparse.Namespace, str, Path], list[float]]] = {
    "loop": run_loop,
    "capture": run_loop,
    "bergson": run_loop,
    "hf": run_hf,
    "hf+gs": run_hf,
    "lightning": run_lightning,
    "lightning+gs": run_lightning,
    "fwdbwd": run_pass,
    "pass": run_pass,
    "bergson-pass": run_pass,
}


# -- the grid -------------------------------------------------------------------------------------------------------


def measure(cfg: argparse.Namespace, modes: list[str]) -> dict[str, list[list[float]]]:
    """Per mode, one list of step times per round; rounds rotate the order of the modes."""
    times: dict[str, list[list[float]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, _quiet():  # a throwaway run: first-call costs (kernels, imports)
        RUNNERS[modes[0]](argparse.Namespace(**{**vars(cfg), "steps": 1, "warmup": 1}), modes[0], Path(tmp))
    for r in range(cfg.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for mode in order:
            gc.collect()
            with tempfile.TemporaryDirectory() as tmp, _quiet():
                times[mode].append(RUNNERS[mode](cfg, mode, Path(tmp)))
    return times


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def summarize(cfg: argparse.Namespace, times: dict[str, list[list[float]]]) -> list[dict]:
    out = []
    median = {m: statistics.median([t for run in runs for t in run]) for m, runs in times.items() if runs}
    best = {m: min(statistics.median(run) for run in runs) for m, runs in times.items() if runs}
    for mode in times:
        row: dict[str, Any] = {
            "width": cfg.width,
            "rank": cfg.rank,
            "mode": mode,
            "step_ms": round(1000 * median[mode], 2),
            "best_round_step_ms": round(1000 * best[mode], 2),
            "examples_per_s": round(cfg.batch / median[mode], 2),
        }
        base = BASELINES.get(mode)
        if base in median:
            if mode in PASS_MODES:
                row["vs_baseline"] = f"{median[base] / median[mode]:.2f}x {base}"
                row["vs_baseline_best"] = f"{best[base] / best[mode]:.2f}x"
            else:
                row["overhead_percent"] = round(100 * (median[mode] / median[base] - 1), 1)
                row["overhead_percent_best"] = round(100 * (best[mode] / best[base] - 1), 1)
                # paired per round (same round = similar machine load)
                pairs = [statistics.median(a) / statistics.median(b) for a, b in zip(times[mode], times[base])]
                row["overhead_percent_paired"] = round(100 * (statistics.median(pairs) - 1), 1)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="width 256, ranks 16 and 64 (the default)")
    grid.add_argument("--full", action="store_true", help="widths 128 256 512 1024, ranks 8 16 64")
    parser.add_argument("--widths", type=int, nargs="+")
    parser.add_argument("--ranks", type=int, nargs="+")
    parser.add_argument("--modes", nargs="+", choices=list(RUNNERS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 8 quick, 12 full)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every mode (default 3 quick, 4 full)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="only loop vs capture (two model copies, alternating steps) and fwdbwd vs pass (a plain batch before "
        "each pass batch), step by step in one process: the most load-robust figures; --steps pairs per width and "
        "rank; --modes capture / pass picks one",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="with --paired: also time gradstore's hooks inside each captured step (projections of Linear / Conv1D / "
        "Embedding blocks, normalisation blocks, the rest): the capture's own work, far less load-sensitive than the "
        "difference of two step times",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: the process's CPU time (every thread, OMP_WAIT_POLICY=PASSIVE): the work a step "
        "costs, much less sensitive to other processes on a shared machine than wall time",
    )
    cfg = parser.parse_args()
    if cfg.clock == "cpu":
        global _now
        _now = time.process_time
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    widths = cfg.widths or ([128, 256, 512, 1024] if cfg.full else [256])
    ranks = cfg.ranks or ([8, 16, 64] if cfg.full else [16, 64])
    cfg.steps = cfg.steps or (12 if cfg.full else 8)
    cfg.rounds = cfg.rounds or (4 if cfg.full else 3)
    bergson = _bergson_available()
    requested = cfg.modes or [m for m in RUNNERS if bergson or not m.startswith("bergson")]
    if not bergson and any(m.startswith("bergson") for m in requested):
        sys.exit("bergson is not importable here")
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = []
    if cfg.paired:
        for width in widths:
            for rank in ranks:
                cfg.width, cfg.rank = width, rank
                runs = []
                if not cfg.modes or "capture" in cfg.modes:
                    runs.append(run_paired)
                if not cfg.modes or "pass" in cfg.modes:
                    runs.append(run_paired_pass)
                for run in runs:
                    with tempfile.TemporaryDirectory() as tmp, _quiet():
                        result = {"width": width, "rank": rank, **run(cfg, Path(tmp))}
                    print(
                        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
                        flush=True,
                    )
        print(
            json.dumps(
                {
                    "threads": torch.get_num_threads(),
                    "clock": cfg.clock,
                    "load_before": load,
                    "load_after": os.getloadavg(),
                }
            )
        )
        return
    for width in widths:
        for i, rank in enumerate(ranks):
            cfg.width, cfg.rank = width, rank
            # the step modes at the first rank only in --quick (the step overhead target is at rank 16)
            modes = [m for m in requested if m in PASS_MODES or i == 0 or cfg.full or cfg.ranks]
            result = summarize(cfg, measure(cfg, modes))
            rows += result
            for row in result:
                print(json.dumps(row), flush=True)
    after = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta = {
        "layers": cfg.layers,
        "seq": cfg.seq,
        "batch": cfg.batch,
        "threads": torch.get_num_threads(),
        "device": cfg.device,
        "torch": torch.__version__,
        "bergson": bergson,
        "steps": cfg.steps,
        "rounds": cfg.rounds,
        "clock": cfg.clock,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_before": load,
        "load_after": after,
    }
    print(json.dumps(meta))
    header = f"{'width':>5} {'rank':>4} {'mode':<13} {'step ms':>9} {'ex/s':>8}"
    print(f"\n{header}  vs baseline (median / fastest round / paired)")
    for row in rows:
        extra = ""
        if "overhead_percent" in row:
            extra = (
                f"{row['overhead_percent']:+6.1f}% / {row['overhead_percent_best']:+6.1f}% / "
                f"{row['overhead_percent_paired']:+6.1f}%  vs {BASELINES[row['mode']]}"
            )
        elif "vs_baseline" in row:
            extra = f"{row['vs_baseline']} / {row['vs_baseline_best']}"
        print(
            f"{row['width']:>5} {row['rank']:>4} {row['mode']:<13} {row['step_ms']:>9.1f} "
            f"{row['examples_per_s']:>8.1f}  {extra}"
        )
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
