"""A small GPT-style causal LM for benchmarks (self-contained; nothing downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import Task


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(att)
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class SmallGPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, layers: int = 4, heads: int = 4, seq: int = 128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device).expand_as(ids))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class RandomTextTask(Task):
    """Random token sequences; per-example loss summed over tokens."""

    def __init__(self, n: int = 256, seq: int = 128, vocab: int = 512, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq + 1), generator=gen)
        self.seq, self.vocab = seq, vocab

    def build_model(self) -> nn.Module:
        return SmallGPT(vocab=self.vocab, seq=self.seq)

    def train_examples(self):
        return self.data

    def loss(self, model, batch):
        logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        return nll.view(batch.shape[0], -1).sum(1)
