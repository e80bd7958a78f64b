"""Tiny models, Tasks and the exact full-gradient TracIn reference (torch.func) used by the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradstore.logger import Task

PAD = 0


class MLPTask(Task):
    """3-class classification of 10-d Gaussian blobs with a 2-layer MLP."""

    def __init__(self, n: int = 96, seed: int = 0, dim: int = 10, hidden: int = 16, classes: int = 3):
        gen = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=gen) * 2
        self.y = torch.randint(0, classes, (n,), generator=gen)
        self.x = centers[self.y] + torch.randn(n, dim, generator=gen)
        self.dim, self.hidden, self.classes = dim, hidden, classes

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, self.classes))

    def train_examples(self):
        return [(self.x[i], self.y[i]) for i in range(len(self.y))]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def describe(self, example):
        return {"label": int(example[1])}


class DigitsTask(MLPTask):
    """scikit-learn's bundled 8x8 digits (no download), standardised, with a 64-128-10 MLP."""

    def __init__(self, start: int = 0, stop: int = 400, hidden: int = 128):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        x = (x - x.mean(0)) / (x.std(0) + 0.1)
        self.x, self.y = x[start:stop], torch.tensor(digits.target[start:stop])
        self.dim, self.hidden, self.classes = 64, hidden, 10


class TinyCausalLM(nn.Module):
    """One pre-norm transformer block with learned positions; batch-first ``[B, T]`` token ids."""

    def __init__(self, vocab: int = 13, d: int = 16, max_len: int = 8, heads: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.heads = heads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        h = self.tok(ids) + self.pos(torch.arange(t, device=ids.device).expand(b, t))
        return self.head(self.ln_f(self.block(h)))

    def block(self, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, -1).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, t, -1))
        return h + self.down(F.gelu(self.up(self.ln2(h))))


class LMTask(Task):
    """Next-token prediction on random sequences of varied length, right-padded; loss summed over tokens."""

    def __init__(self, n: int = 40, seed: int = 0, vocab: int = 13, max_len: int = 8):
        gen = torch.Generator().manual_seed(seed)
        self.vocab, self.max_len = vocab, max_len
        self.seqs = [
            torch.randint(1, vocab, (int(torch.randint(3, max_len + 1, (1,), generator=gen)),), generator=gen)
            for _ in range(n)
        ]

    def build_model(self) -> nn.Module:
        return TinyCausalLM(self.vocab, max_len=self.max_len)

    def train_examples(self):
        return self.seqs

    def collate(self, examples):
        t = max(len(s) for s in examples)
        out = torch.full((len(examples), t), PAD, dtype=torch.long)
        for i, s in enumerate(examples):
            out[i, : len(s)] = s
        return out

    def loss(self, model, batch):
        logits = model(batch[:, :-1])
        target = batch[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none", ignore_index=PAD
        )
        return nll.view(target.shape).sum(dim=1)


def per_example_canonical_grads(
    model: nn.Module, task: Task, examples: list, layers, dtype=torch.float64, vectorize: bool = True
) -> dict:
    """Exact per-example gradients with ``torch.func`` (vmap of grad), in each block's canonical layout.

    The model is copied to ``dtype`` without gradstore's hooks; returns ``{block name: [B, d_out, in_dim]}``.
    ``vectorize=False`` takes ``grad`` one example at a time (models whose masks branch on data, as HF's do).
    """
    grads = per_example_parameter_grads(model, task, examples, dtype, vectorize)
    return {layer.name: layer.canonical({k: grads[n] for k, n in layer.parameter_names().items()}) for layer in layers}


def per_example_parameter_grads(
    model: nn.Module, task: Task, examples: list, dtype=torch.float64, vectorize: bool = True
) -> dict:
    """``{parameter name: [B, *shape]}`` for every distinct parameter (a tied one once, under its first name)."""
    ref = _copy_as(model, dtype)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    batch = _to_dtype(task.collate(list(examples)), dtype)

    def one(p, item):
        item = item.unsqueeze(0) if isinstance(item, torch.Tensor) else tuple(b.unsqueeze(0) for b in item)
        return task.loss(lambda *a, **kw: functional_call(ref, p, a, kw), item).sum()

    if vectorize:
        return vmap(grad(one), in_dims=(None, 0))(params, batch)
    items = [batch[i] if isinstance(batch, torch.Tensor) else tuple(b[i] for b in batch) for i in range(len(examples))]
    per_item = [grad(one)(params, item) for item in items]
    return {k: torch.stack([g[k] for g in per_item]) for k in params}


def _to_dtype(batch, dtype):
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    return type(batch)(_to_dtype(b, dtype) for b in batch)


def flat_full_gradients(canonical: dict, layer_names: list[str]) -> torch.Tensor:
    return torch.cat([canonical[name].flatten(1) for name in layer_names], dim=1)


def _copy_as(model: nn.Module, dtype) -> nn.Module:
    """A copy in ``dtype``, eval mode, without gradstore's hooks and patched forwards: plain PyTorch."""
    import copy

    ref = copy.deepcopy(model).to(dtype).eval()
    for module in ref.modules():
        for hooks in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs",
        ):
            getattr(module, hooks).clear()
        module.__dict__.pop("forward", None)
    return ref


def sgd_steps(model: nn.Module, task: Task, steps: int, lr: float, seed: int = 0, batch_size: int = 8) -> None:
    """Move the weights a little so checkpoints differ."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    examples = task.train_examples()
    for _ in range(steps):
        idx = torch.randperm(len(examples), generator=gen)[:batch_size].tolist()
        opt.zero_grad()
        task.loss(model, task.collate([examples[i] for i in idx])).mean().backward()
        opt.step()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


class NanoGPT(nn.Module):
    """nanoGPT-style LM: ``wpe(arange(T))`` is ``[T, d]``, broadcast onto ``[B, T, d]``; ``wte``/``lm_head`` tied."""

    def __init__(self, vocab: int = 50, d: int = 16, max_len: int = 16, heads: int = 2, layers: int = 1):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(_NanoBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


class _NanoBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).split(d, dim=2)
        q, k, v = (x.view(b, t, self.heads, -1).transpose(1, 2) for x in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = h + self.c_proj(y)
        return h + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(h))))
