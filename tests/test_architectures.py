"""``layers=["*"]`` on the architectures users bring, against exact torch.func per-example gradients.

Full-rank orthonormal projections are isometries per block, so the projected Gram matrix ``G G^T`` must
equal the exact one over every distinct parameter of the logged modules (a tied weight counted once),
block by block. Models are tiny and built from configs (nothing is downloaded); dropout is 0.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradstore.logger import BatchLayoutError, GradientLogger, GradientProjector, Task, UnsupportedLayerError
from gradstore.logger.selection import parameter_coverage
from gradstore.store import GradientStore

from .helpers.models import NanoGPT, per_example_parameter_grads, relative_error

transformers = pytest.importorskip("transformers")

V, D, T_MAX, PAD = 50, 16, 16, 0


# -- tasks ------------------------------------------------------------------------------------------


class _Sequences(Task):
    """Random token sequences of varied length, right-padded, with an attention mask."""

    def __init__(self, n: int, lengths: tuple[int, int], seed: int = 0, labels: int = 0):
        gen = torch.Generator().manual_seed(seed)
        lo, hi = lengths
        lengths_ = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
        self.seqs = [torch.randint(1, V, (length,), generator=gen) for length in lengths_]
        self.seqs[0] = torch.randint(1, V, (hi,), generator=gen)  # the batch is padded to exactly `hi`
        self.labels = torch.randint(0, max(labels, 1), (n,), generator=gen)

    def train_examples(self):
        return [(s, y) for s, y in zip(self.seqs, self.labels)]

    def collate(self, examples):
        t = max(len(s) for s, _ in examples)
        ids = torch.full((len(examples), t), PAD, dtype=torch.long)
        mask = torch.zeros(len(examples), t, dtype=torch.long)
        for i, (s, _) in enumerate(examples):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return ids, mask, torch.stack([y for _, y in examples])


class CausalLMTask(_Sequences):
    """Next-token loss summed over non-pad targets; ``model(input_ids=, attention_mask=)`` (HF) or ``model(ids)``."""

    def __init__(self, n: int, lengths: tuple[int, int], hf: bool = True, seed: int = 0):
        super().__init__(n, lengths, seed)
        self.hf = hf

    def loss(self, model, batch):
        ids, mask, _ = batch
        logits = model(input_ids=ids, attention_mask=mask).logits if self.hf else model(ids)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
        return (nll.view(ids.shape[0], -1) * mask[:, 1:]).sum(dim=1)


class ClassifierTask(_Sequences):
    def __init__(self, n: int, lengths: tuple[int, int], seed: int = 0):
        super().__init__(n, lengths, seed, labels=3)

    def loss(self, model, batch):
        ids, mask, labels = batch
        out = model(input_ids=ids, attention_mask=mask)
        return F.cross_entropy(getattr(out, "logits", out), labels, reduction="none")


class EncoderClassifier(nn.Module):
    """Embeddings -> nn.TransformerEncoder (padding mask, optional causal mask) -> mean over tokens -> Linear."""

    def __init__(self, batch_first: bool = True, causal: bool = False, norm_first: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T_MAX, D)
        layer = nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, norm=nn.LayerNorm(D) if norm_first else None)
        self.head = nn.Linear(D, 3)
        self.batch_first, self.causal = batch_first, causal

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t).unsqueeze(0))
        pad = attention_mask == 0
        mask = torch.ones(t, t, dtype=torch.bool).triu(1) if self.causal else None
        h = h if self.batch_first else h.transpose(0, 1)
        h = self.encoder(h, mask=mask, src_key_padding_mask=pad, is_causal=self.causal)
        h = h if self.batch_first else h.transpose(0, 1)
        keep = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class CrossAttention(nn.Module):
    """nn.MultiheadAttention called directly: cross-attention (key is value), need_weights=True, float attn_mask."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.memory = nn.Linear(D, D)
        self.attn = nn.MultiheadAttention(D, 2, add_zero_attn=True)
        self.head = nn.Linear(D, 3)

    def forward(self, input_ids, attention_mask):
        h = self.tok(input_ids)
        memory = torch.tanh(self.memory(h)).transpose(0, 1)  # the attention is sequence-first
        h = h.transpose(0, 1)
        t = input_ids.shape[1]
        bias = torch.triu(torch.full((t, t), -0.5), diagonal=1)
        padding = (attention_mask == 0).float() * -1e4
        out, weights = self.attn(h, memory, memory, key_padding_mask=padding, attn_mask=bias, need_weights=True)
        return self.head(out.transpose(0, 1).sum(1)) + weights.square().sum(dim=(1, 2)).unsqueeze(-1)


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (sequence-first): the source is the sequence, the target its reverse, causal decoder."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.transformer = nn.Transformer(D, 2, 1, 1, 32, dropout=0.0)
        self.head = nn.Linear(D, 3)

    def forward(self, input_ids, attention_mask):
        src = self.tok(input_ids)
        tgt = self.tok(input_ids.flip(1))
        t = input_ids.shape[1]
        pad = attention_mask == 0
        out = self.transformer(
            src.transpose(0, 1),
            tgt.transpose(0, 1),
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(t),
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
            tgt_is_causal=True,
        )
        return self.head(out.mean(0))


class ImageTask(Task):
    def __init__(self, n: int = 6):
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)

    def train_examples(self):
        return [(self.x[i], self.y[i]) for i in range(len(self.y))]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")


def cnn() -> nn.Module:
    """Conv -> ReLU(inplace) -> Conv -> BatchNorm (eval, non-trivial running stats) -> ReLU(inplace) -> Linear."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8) * 2 + 1)  # moves the running statistics away from (0, 1)
        model[3].weight.uniform_(0.5, 1.5)
        model[3].bias.uniform_(-0.5, 0.5)
    return model.eval()


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=V,
        n_positions=T_MAX,
        n_embd=D,
        n_layer=2,
        n_head=2,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg)


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=T_MAX,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(cfg)


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=T_MAX,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg)


# -- the check ----------------------------------------------------------------------------------------


def check_exact_gram(
    model: nn.Module, task: Task, examples: list, vectorize: bool = True, layers=("*",), init: str = "orthonormal"
) -> dict:
    """Assert block-wise and total Gram equality with the exact reference; returns the projector's facts."""
    kw = {"pca_examples": examples} if init == "pca" else {}
    with GradientProjector(model, task, rank=10**6, init=init, layers=list(layers), **kw) as projector:
        assert all(spec.dim == spec.full_dim for spec in projector.spec.layers)  # full rank
        first = projector.project(examples).double()  # runs under the parameter-use audit (a torch function mode)
        g = projector.project(examples).double()  # plain: PyTorch's fused/nested fast paths would run here
        assert relative_error(first, g) < 1e-6
        grads = per_example_parameter_grads(model, task, examples, vectorize=vectorize)
        names = {id(p): n for n, p in model.named_parameters()}
        errors, total = {}, 0.0
        for layer, spec in zip(projector.layers, projector.spec.layers):
            assert layer.parameter_names() == {k: names[id(p)] for k, p in layer.parameters().items()}
            flat = torch.cat([grads[n].flatten(1) for n in layer.parameter_names().values()], dim=1)
            exact = flat @ flat.T
            got = g[:, spec.slice] @ g[:, spec.slice].T
            errors[layer.name] = relative_error(got, exact) if float(exact.abs().max()) > 0 else float(got.abs().max())
            total = total + exact
        gram_error = relative_error(g @ g.T, total)
        worst = max(errors, key=errors.get)  # type: ignore[arg-type]
        assert errors[worst] < 1e-4, f"block {worst!r}: relative Gram error {errors[worst]:.2e}"
        assert gram_error < 1e-4
        assert float(total.abs().max()) > 1e-3 and float(total.diagonal().min()) > 0  # not a comparison of zeros
        covered = {names[id(p)] for layer in projector.layers for p in layer.parameters().values()}
        assert len(covered) == sum(len(layer.parameters()) for layer in projector.layers)  # tied ones once
        facts = {
            "coverage": parameter_coverage(model, projector.layers),
            "gram_error": gram_error,
            "worst_block": (worst, errors[worst]),
            "kinds": sorted({layer.kind for layer in projector.layers}),
            "blocks": len(projector.layers),
            "layouts": {
                h.name: h.layout_1d
                for h in projector._installed.modules
                if h.layout_1d  # type: ignore[union-attr]
            },
        }
    print(f"\n{type(model).__name__}: {facts}")
    return facts


def test_hf_gpt2_conv1d_shared_positions_tied_head():
    torch.manual_seed(0)
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    task = CausalLMTask(n=4, lengths=(3, 7))
    facts = check_exact_gram(model, task, task.train_examples(), vectorize=False)
    assert facts["coverage"] == 1.0
    assert {"conv1d", "embedding", "norm"} <= set(facts["kinds"])


def test_hf_bert_classifier():
    torch.manual_seed(0)
    task = ClassifierTask(n=3, lengths=(4, 8))
    facts = check_exact_gram(bert(), task, task.train_examples(), vectorize=False)
    assert facts["coverage"] == 1.0


def test_hf_llama_rmsnorm():
    torch.manual_seed(0)
    task = CausalLMTask(n=3, lengths=(4, 6))
    facts = check_exact_gram(llama(), task, task.train_examples(), vectorize=False)
    assert facts["coverage"] == 1.0


@pytest.mark.parametrize(("n", "lengths"), [(4, (3, 7)), (6, (2, 6))], ids=["T!=B", "T==B"])
def test_nanogpt_arange_positions(n, lengths):
    torch.manual_seed(0)
    model = NanoGPT(vocab=V, d=D, max_len=T_MAX)
    task = CausalLMTask(n=n, lengths=lengths, hf=False)
    examples = task.train_examples()
    assert (max(len(s) for s, _ in examples) == n) == (lengths[1] == n)
    facts = check_exact_gram(model, task, examples)
    assert facts["coverage"] == 1.0
    assert facts["layouts"] == {"wpe": "shared"}  # T == B was decided by one-example probes


@pytest.mark.parametrize(
    "options",
    [
        dict(batch_first=True),
        dict(batch_first=False, causal=True),
        dict(batch_first=True, norm_first=True, causal=True),
    ],
    ids=["batch-first", "seq-first-causal", "norm-first-causal"],
)
def test_transformer_encoder_classifier(options):
    torch.manual_seed(0)
    task = ClassifierTask(n=4, lengths=(3, 7))
    facts = check_exact_gram(EncoderClassifier(**options), task, task.train_examples())
    assert "mha" in facts["kinds"] and facts["coverage"] == 1.0


def test_nn_transformer_encoder_decoder_sequence_first():
    torch.manual_seed(0)
    task = ClassifierTask(n=4, lengths=(3, 7))
    facts = check_exact_gram(Seq2Seq(), task, task.train_examples())
    assert facts["coverage"] == 1.0


@pytest.mark.parametrize(
    "case",
    [
        dict(batch_first=True, need_weights=False, kpm=True),
        dict(batch_first=False, need_weights=True, attn="float", average=False),
        dict(batch_first=True, need_weights=False, attn="causal", is_causal=True),
        dict(batch_first=False, need_weights=True, attn="bool3d", kpm=True, zero_attn=True, bias=False),
        dict(batch_first=True, need_weights=True, unbatched=True),
        dict(batch_first=False, need_weights=False, cross="kv", kpm=True),
        dict(batch_first=True, need_weights=True, cross="qkv", attn="float"),
    ],
)
def test_attention_forward_matches_pytorch(case):
    """The hookable MultiheadAttention path computes what PyTorch's own forward computes (float64)."""
    from gradstore.logger.attention import attention_forward

    torch.manual_seed(0)
    n, t, s, e, heads = 3, 5, 5 if case.get("cross") != "qkv" else 4, 8, 2
    mha = (
        nn.MultiheadAttention(
            e,
            heads,
            batch_first=case["batch_first"],
            add_zero_attn=case.get("zero_attn", False),
            bias=case.get("bias", True),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.3)

    def seq(length):
        x = torch.randn(n, length, e, dtype=torch.float64)
        return x if case["batch_first"] else x.transpose(0, 1)

    q = seq(t)
    k = q if not case.get("cross") else seq(s)
    v = k if case.get("cross") != "qkv" else seq(s)
    if case.get("unbatched"):
        q = k = v = q[0] if case["batch_first"] else q[:, 0]
    kw = dict(need_weights=case["need_weights"], average_attn_weights=case.get("average", True))
    if case.get("kpm"):
        kw["key_padding_mask"] = torch.arange(s).expand(n, s) >= torch.tensor([[s], [s - 2], [s - 1]])
    attn = case.get("attn")
    if attn == "float":
        kw["attn_mask"] = torch.randn(t, s, dtype=torch.float64)
    elif attn == "causal":
        kw["attn_mask"], kw["is_causal"] = nn.Transformer.generate_square_subsequent_mask(t, dtype=torch.float64), True
    elif attn == "bool3d":
        kw["attn_mask"] = torch.rand(n * heads, t, s) > 0.7
        kw["attn_mask"][..., 0] = False
    expected = mha(q, k, v, **kw)
    got = attention_forward(
        mha,
        q,
        k,
        v,
        kw.get("key_padding_mask"),
        kw["need_weights"],
        kw.get("attn_mask"),
        kw["average_attn_weights"],
        kw.get("is_causal", False),
        lambda x, w, b, rows: F.linear(x, w, b),
    )
    assert torch.allclose(got[0], expected[0], atol=1e-10)
    assert (got[1] is None) == (expected[1] is None)
    if got[1] is not None:
        assert torch.allclose(got[1], expected[1], atol=1e-10)


@pytest.mark.parametrize("model_name", ["nanogpt", "encoder", "tied-bias"])
def test_pca_init_full_rank_is_exact_on_new_kinds(model_name):
    """Full-rank PCA bases are orthonormal, so the Gram is exact: norms, MHA, ties and shared inputs feed the pass."""
    torch.manual_seed(0)
    if model_name == "encoder":
        task, model = ClassifierTask(n=4, lengths=(3, 7)), EncoderClassifier(batch_first=False, causal=True)
    else:
        task = CausalLMTask(n=4, lengths=(3, 7), hf=False)
        model = NanoGPT(vocab=V, d=D, max_len=T_MAX) if model_name == "nanogpt" else _Tied()
    check_exact_gram(model, task, task.train_examples(), init="pca")


def test_transformer_encoder_fast_path_cannot_bypass_the_hooks():
    """Only the encoder is logged, so in eval mode with frozen parameters no input requires grad: PyTorch's
    fused encoder-layer path and its nested-tensor conversion would skip every hook if they ran."""
    torch.manual_seed(0)
    task = ClassifierTask(n=4, lengths=(3, 7))
    check_exact_gram(EncoderClassifier(batch_first=True), task, task.train_examples(), layers=["encoder.*"])


def test_multihead_attention_cross_attention_with_weights():
    torch.manual_seed(0)
    task = ClassifierTask(n=4, lengths=(3, 6))
    model = CrossAttention()
    facts = check_exact_gram(model, task, task.train_examples())
    assert "mha" in facts["kinds"]
    assert "forward" not in model.attn.__dict__  # restored on close


def test_cnn_with_inplace_relu_and_batchnorm():
    torch.manual_seed(0)
    task = ImageTask()
    facts = check_exact_gram(cnn(), task, task.train_examples())
    assert facts["coverage"] == 1.0


# -- refusals and edge cases --------------------------------------------------------------------------


class _Tied(nn.Module):
    """An embedding tied to a head that has its own bias (BERT's MLM head layout); or the head registered first."""

    def __init__(self, functional: bool = False, head_first: bool = False, head_bias: bool = True):
        super().__init__()
        if head_first:
            self.head = nn.Linear(D, V, bias=head_bias)
        self.emb = nn.Embedding(V, D, padding_idx=PAD)
        self.mix = nn.Linear(D, D)
        if not head_first:
            self.head = nn.Linear(D, V, bias=head_bias)
        self.head.weight = self.emb.weight
        self.functional = functional

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        return F.linear(h, self.emb.weight) if self.functional else self.head(h)


def test_tied_head_with_own_bias_is_one_block_plus_a_bias_block():
    torch.manual_seed(0)
    task = CausalLMTask(n=3, lengths=(3, 6), hf=False)
    facts = check_exact_gram(_Tied(), task, task.train_examples())
    assert facts["coverage"] == 1.0 and "bias" in facts["kinds"]
    with GradientProjector(_Tied(), task, layers=["head"]) as projector:  # the head alone still logs both uses
        assert [(layer.name, layer.kind) for layer in projector.layers] == [("emb", "embedding"), ("head.bias", "bias")]


@pytest.mark.parametrize("head_bias", [True, False], ids=["bias", "no-bias"])
def test_tied_head_registered_before_the_embedding(head_bias):
    """The Linear owns the block; the embedding's one-hot use is the transposed contribution."""
    torch.manual_seed(0)
    task = CausalLMTask(n=3, lengths=(3, 6), hf=False)
    model = _Tied(head_first=True, head_bias=head_bias)
    facts = check_exact_gram(model, task, task.train_examples())
    assert facts["coverage"] == 1.0 and "bias" not in facts["kinds"]
    with GradientProjector(model, task) as projector:
        assert projector.layers[0].name == "head" and projector.layers[0].tied[0].transposed


def test_out_proj_alone_is_logged_through_the_attention_hook():
    torch.manual_seed(0)
    task = ClassifierTask(n=4, lengths=(3, 7))
    facts = check_exact_gram(EncoderClassifier(batch_first=False), task, task.train_examples(), layers=["*out_proj"])
    assert facts["kinds"] == ["linear"] and facts["blocks"] == 2


def test_functional_use_of_a_logged_weight_is_refused():
    task = CausalLMTask(n=3, lengths=(3, 6), hf=False)
    with (
        GradientProjector(_Tied(functional=True), task, layers=["emb", "mix"]) as projector,
        pytest.raises(UnsupportedLayerError, match=r"emb\.weight \(by linear\)"),
    ):
        projector.project(task.train_examples())


def test_unsupported_modules_are_refused_when_built_and_can_be_left_out():
    grouped = nn.Sequential(nn.EmbeddingBag(10, 4, mode="max"), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(UnsupportedLayerError, match=r"'0'.*mode='max'.*'!0'"):
        GradientProjector(grouped, ImageTask())
    with GradientProjector(grouped, ImageTask(), layers=["*", "!0"]) as projector:
        assert [layer.name for layer in projector.layers] == ["2"]
    with pytest.raises(UnsupportedLayerError, match="kdim"):
        GradientProjector(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)))
    with pytest.raises(UnsupportedLayerError, match=r"'0.out_proj'.*kdim"):  # its out_proj runs inside the MHA
        GradientProjector(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), layers=["*out_proj"])

    class FakeRMSNorm(nn.Module):  # duck-types as an RMSNorm but computes something else
        def __init__(self):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(D)), 1e-6

        def forward(self, x):
            return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.eps)

    model = nn.Sequential(nn.Linear(D, D), FakeRMSNorm(), nn.Linear(D, 3))
    task = ImageTask()
    task.x = torch.randn(6, D)
    with GradientProjector(model, task) as projector, pytest.raises(UnsupportedLayerError, match="RMSNorm"):
        projector.project(task.train_examples())


def test_batchnorm_in_training_mode_is_refused_by_capture(tmp_path):
    task = ImageTask()
    model = cnn().train()
    logger = GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, progress=False)
    x, y = task.collate(task.train_examples())
    with (
        pytest.raises(UnsupportedLayerError, match="BatchNorm in training mode"),
        logger.capture("c", lr=0.1, ids=list(range(len(y)))),
    ):
        task.loss(model, (x, y)).mean().backward()
    logger.close()


def test_shared_positions_in_training_capture_equal_the_pass(tmp_path):
    """GPT-2's [1, T] positions with the forward before capture(): the batch size comes from the token input."""
    torch.manual_seed(0)
    model = gpt2()
    task = CausalLMTask(n=4, lengths=(3, 7))
    examples = task.train_examples()
    logger = GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, dtype="float32", progress=False)
    logger.log_checkpoint("pass", lr=0.1)
    model.eval()  # dropout is 0 anyway; eval keeps the two passes identical
    for p in model.parameters():
        p.requires_grad_(True)
    losses = task.loss(model, task.collate(examples))
    with logger.capture("cap", lr=0.1, ids=list(range(len(examples))), reduction="sum"):
        losses.sum().backward()
    logger.close()
    store = GradientStore.open(tmp_path / "s.zarr")
    _, passed = store.read("pass")
    _, captured = store.read("cap", ids=list(range(len(examples))))
    assert relative_error(torch.from_numpy(captured), torch.from_numpy(passed)) < 1e-5


def test_ambiguous_positions_in_capture_are_refused_until_project_decides(tmp_path):
    torch.manual_seed(0)
    model = NanoGPT(vocab=V, d=D, max_len=T_MAX)
    task = CausalLMTask(n=6, lengths=(2, 6), hf=False)  # T == B == 6: arange(6) could be one index per example
    examples = task.train_examples()
    logger = GradientLogger(model, task, store=tmp_path / "s.zarr", rank=4, progress=False)

    def step(name):
        losses = task.loss(model, task.collate(examples))
        with logger.capture(name, lr=0.1, ids=list(range(len(examples)))):
            losses.mean().backward()
        model.zero_grad()

    with pytest.raises(BatchLayoutError, match="cannot tell"):
        step("first")
    logger.project(examples[:2])  # T != B here: decided and remembered
    step("second")
    logger.close()


@pytest.mark.parametrize("model_name", ["nanogpt", "encoder", "tied-bias"])
def test_adam_fold_on_every_block_kind(tmp_path, model_name):
    """Rows logged with an Adam state equal the dense projection of ``G / (r c^T)`` in each block's canonical
    layout: tied (transposed) weights, normalisation, MHA in-projection and bias blocks lay their parameters out
    the way the optimizer-state code reads them."""
    from gradstore.logger.adam_fold import split_factors
    from gradstore.projection import build_matrices
    from gradstore.projection.reference import project_dense

    from .helpers.models import per_example_canonical_grads

    torch.manual_seed(0)
    if model_name == "encoder":
        task, model = ClassifierTask(n=4, lengths=(3, 7)), EncoderClassifier(batch_first=False, causal=True)
    else:
        task = CausalLMTask(n=4, lengths=(3, 7), hf=False)
        model = NanoGPT(vocab=V, d=D, max_len=T_MAX) if model_name == "nanogpt" else _Tied()
    examples = task.train_examples()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        task.loss(model, task.collate(examples)).mean().backward()
        opt.step()
    logger = GradientLogger(
        model, task, store=tmp_path / "s.zarr", rank=10**6, init="orthonormal", dtype="float32", progress=False
    )
    logger.log_checkpoint("adam", lr=1e-2, optimizer_state=opt.state_dict())
    store = GradientStore.open(tmp_path / "s.zarr")
    factors = split_factors(logger.spec, store.adam_factors("adam"))
    canonical = per_example_canonical_grads(model, task, examples, logger.layers)
    corrected = {}
    for name, grads in canonical.items():
        r, c = factors[name]  # inf where training never moved a row/column (unseen tokens): zeroed
        corrected[name] = grads / torch.outer(r, c).double()
    expected = project_dense(logger.spec, build_matrices(logger.spec), corrected)
    _, rows = store.read("adam")
    logger.close()
    assert relative_error(torch.from_numpy(rows).double(), expected) < 1e-4
