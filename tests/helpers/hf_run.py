"""A Task for a tiny GPT-2 trained by the HF Trainer with GradstoreTrainerCallback (tests/test_zero_config.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from gradstore.logger import Task

_rng = np.random.default_rng(0)
DOCS = [_rng.integers(1, 60, size=int(_rng.integers(3, 13))).tolist() for _ in range(22)]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=60, n_positions=16, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return GPT2LMHeadModel(config)


def collate(features: list) -> dict:
    """Right-pad to the batch's longest document; labels are -100 on padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        ids[row, :n] = torch.tensor(feature["input_ids"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class TinyGPT2Task(Task):
    """Next-token cross-entropy summed over each document's tokens; queries are ``{"input_ids": [...]}``."""

    def build_model(self) -> torch.nn.Module:
        return tiny_gpt2()

    def train_examples(self) -> list:
        return [{"input_ids": d} for d in DOCS]

    def collate(self, examples: list) -> dict:
        return collate(examples)

    def loss(self, model, batch) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        ce = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none"
        )
        return ce.view(labels.shape).sum(1)

    def query_example(self, payload: dict) -> dict:
        return {"input_ids": [int(t) for t in payload["input_ids"]]}
