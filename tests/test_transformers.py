"""Transformers: which weights are sparsified by default (torchvision's ViT, nn.TransformerEncoder, a GPT-style
decoder on F.scaled_dot_product_attention), their FLOPs counted per weight (attention projections called
functionally, products of two activations dense, token ids as input), against hand counts and torchvision's
published ViT-B/16 figure."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from conftest import TinyViT, train
from methods import CHANGING, METHODS
from test_callbacks import Recorder, _assert_resume_matches
from torch import nn
from torch.utils.data import TensorDataset

from lightning_rigl import RigL
from lightning_rigl.flops import forward_flops, weight_flops
from lightning_rigl.sparsity import sparsifiable_parameters


class Attention(nn.Module):
    """Self-attention of ``nn.MultiheadAttention`` over a (batch, tokens, features) input."""

    def __init__(self, features: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(features, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """A GPT-style decoder block: one linear layer for q, k and v, causal F.scaled_dot_product_attention."""

    def __init__(self, features: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_1, self.norm_2 = nn.LayerNorm(features), nn.LayerNorm(features)
        self.qkv, self.proj = nn.Linear(features, 3 * features), nn.Linear(features, features)
        self.mlp = nn.Sequential(nn.Linear(features, 4 * features), nn.GELU(), nn.Linear(4 * features, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, features = x.shape
        q, k, v = self.qkv(self.norm_1(x)).split(features, dim=2)
        q, k, v = (t.view(batch, tokens, self.heads, features // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, features))
        return x + self.mlp(self.norm_2(x))


class TinyGPT(nn.Module):
    """Token and position embeddings, two blocks, a final norm and a language-model head."""

    def __init__(self, vocabulary: int = 50, features: int = 16, heads: int = 2, context: int = 12) -> None:
        super().__init__()
        self.token, self.position = nn.Embedding(vocabulary, features), nn.Embedding(context, features)
        self.blocks = nn.Sequential(Block(features, heads), Block(features, heads))
        self.norm, self.head = nn.LayerNorm(features), nn.Linear(features, vocabulary, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.norm(self.blocks(self.token(ids) + self.position(positions))))


def test_vit_selection_takes_every_weight_matrix_and_leaves_tokens_and_norms_dense() -> None:
    vit = torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    per_layer = ["self_attention.in_proj_weight", "self_attention.out_proj.weight", "mlp.0.weight", "mlp.3.weight"]
    expected = ["conv_proj.weight",
                *[f"encoder.layers.encoder_layer_{i}.{name}" for i in range(2) for name in per_layer],
                "heads.head.weight"]
    assert list(sparsifiable_parameters(vit)) == expected  # not class_token, pos_embedding, norms or biases


def test_transformer_encoder_and_separate_projections() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2,
                                    enable_nested_tensor=False)
    per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight"]
    assert list(sparsifiable_parameters(encoder)) == [f"layers.{i}.{n}" for i in range(2) for n in per_layer]
    # Keys and values of their own sizes: three projection matrices instead of one.
    cross = nn.MultiheadAttention(16, 2, kdim=8, vdim=4)
    assert list(sparsifiable_parameters(cross)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight",
                                                    "out_proj.weight"]


def test_gpt_style_decoder_selection() -> None:
    per_block = ["qkv.weight", "proj.weight", "mlp.0.weight", "mlp.2.weight"]
    expected = [f"blocks.{i}.{name}" for i in range(2) for name in per_block] + ["head.weight"]
    assert list(sparsifiable_parameters(TinyGPT())) == expected  # embeddings dense unless included
    chosen = sparsifiable_parameters(TinyGPT(), include=["token.weight", "position.weight", "blocks.*.qkv.weight"])
    assert list(chosen)[:2] == ["token.weight", "position.weight"] and "blocks.0.qkv.weight" in chosen


def test_attention_flops_by_hand() -> None:
    # 5 tokens of 8 features, 2 heads of 4: the input projection 2·5·8·24 = 1,920 FLOPs; q·kᵀ and attention·v
    # 2·2·5·5·4 = 400 each, dense whatever the masks; the output projection 2·5·8·8 = 640.
    model = Attention()
    flops = weight_flops(model, (5, 8))
    assert flops.total == 1_920 + 400 + 400 + 640
    assert flops.per_weight == {"attention.in_proj_weight": 1_920, "attention.out_proj.weight": 640}
    densities = {"attention.in_proj_weight": 0.25, "attention.out_proj.weight": 0.5}
    assert forward_flops(model, (5, 8), densities) == 1_920 * 0.25 + 800 + 640 * 0.5


def test_a_token_id_model_is_counted_on_its_own_input() -> None:
    model = TinyGPT()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    flops = weight_flops(model, ids)
    # Per block, 8 tokens of 16 features in 2 heads of 8: qkv 2·8·16·48 = 12,288, proj 2·8·16·16 = 4,096,
    # mlp 2·2·8·16·64 = 32,768, and the causal attention products 2·(2·2·8·8·8) = 4,096 (counted in full, as
    # torch's formula counts them); the head 2·8·16·50 = 12,800. The embeddings are lookups: no FLOPs.
    block = 12_288 + 4_096 + 32_768 + 4_096
    assert flops.total == 2 * block + 12_800
    assert flops.per_weight["blocks.0.qkv.weight"] == 12_288 and flops.per_weight["head.weight"] == 12_800
    assert "token.weight" not in flops.per_weight


def test_vit_b_16_counts_torchvisions_published_figure() -> None:
    # torchvision documents 17.56 GFLOPS for vit_b_16, counting multiply-adds: 2 × 17.56e9 FLOPs here.
    flops = weight_flops(torchvision.models.vit_b_16(), (3, 224, 224))
    assert flops.total == pytest.approx(2 * 17.56e9, rel=0.01)
    assert len(flops.per_weight) == 50  # the patch embedding, 4 matrices in each of 12 blocks, the head


# --------------------------------------------------------------------------------- training a transformer


@pytest.mark.parametrize("method", [name for name in METHODS if name != "lottery"])  # a ticket needs its own run
def test_every_method_trains_a_vit_as_transformers_are_trained(method: str) -> None:
    """AdamW (m and v cleared where masks change), warm-up then cosine, clipping by norm, bf16, accumulation:
    counts, dead weights and new connections exact at every step (the Recorder of test_callbacks)."""
    sparse = METHODS[method]()
    train([sparse, Recorder(sparse)], model_factory=TinyViT, steps=13, batch_size=16, accumulate_grad_batches=2,
          precision="bf16-mixed", gradient_clip_val=1.0)
    assert sparse.num_updates >= (method in CHANGING)
    assert any(name.endswith("in_proj_weight") for name in sparse.masks)


@pytest.mark.parametrize("method", ["rigl", "snfs"])
def test_a_vit_resumes_where_it_would_have_gone_on(tmp_path, method: str) -> None:
    _assert_resume_matches(tmp_path, METHODS[method], 7, model_factory=TinyViT)


def test_gradient_clipping_sees_only_the_live_gradients() -> None:
    """A huge gradient at a dead position (before the callback masks it) must not shrink the live ones: the
    clipping norm is taken over the masked gradients."""

    class Spike(pl.Callback):  # before the sparse callback
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            name = next(n for n in rigl.masks if n.endswith("in_proj_weight"))
            dead = (~rigl.masks[name]).nonzero()[0]
            pl_module.get_parameter(name).grad[tuple(dead)] = 1e6

    class ClippingSpy(TinyViT):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            self.dead = [float(self.get_parameter(n).grad[~m].abs().max()) for n, m in rigl.masks.items()]
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    rigl = METHODS["rigl"]()
    model = ClippingSpy()
    model.norms = []
    train([Spike(), rigl], model=model, steps=3, gradient_clip_val=1.0)  # before the first update, at step 3,
    assert max(model.dead) == 0.0  # which would grow the spiked position (the largest gradient there is)
    assert max(model.norms) < 1e3  # the spike of 1e6 is not in the norm the clip divides by


def test_the_callback_counts_a_language_model_on_its_token_ids() -> None:
    class LanguageModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyGPT()

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.net(ids)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            logits = self(ids[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    rigl = RigL(sparsity=0.9, update_interval=2, stop_at=1.0)
    ids = torch.randint(0, 50, (16, 9), generator=torch.Generator().manual_seed(0))
    train([rigl], model=LanguageModel(), data=TensorDataset(ids), batch_size=8, steps=4)
    assert rigl.flops is not None and rigl.num_updates == 1
    # The account is that of the batch's first sequence (9 token ids, through forward): the blocks' weights at
    # their densities, the embeddings (lookups) nothing, the attention products dense.
    assert rigl.flops.dense_flops == weight_flops(LanguageModel().net, torch.zeros(1, 9, dtype=torch.long)).total
    assert 0.1 < rigl.flops.train_ratio < 0.5  # 90% sparse weights, attention products dense, one dense backward
