"""A tiny conv + linear LightningModule, full-batch data and a `train` helper shared by the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyNet(pl.LightningModule):
    """conv(1→8, 3×3) → BN → conv(8→16, 3×3) → linear(16·4·4 → 32) → linear(32 → 4) on 1×8×8 inputs."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.05, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))
        self.optimizer_name, self.lr = optimizer, lr
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.parameters()
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        if self.optimizer_name == "sgd_plain":  # no momentum state
            return torch.optim.SGD(params, lr=self.lr, weight_decay=5e-4)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr / 10, weight_decay=1e-4)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr / 10, weight_decay=1e-2)
        raise ValueError(self.optimizer_name)


SPARSE_NAMES = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"]


class TinyViT(TinyNet):
    """torchvision's VisionTransformer on TinyNet's 1×8×8 inputs (patches of 4: 4 tokens and a class token; one
    block of 16 features in 2 heads), trained as transformers are: AdamW, linear warm-up then cosine."""

    def __init__(self, lr: float = 0.05) -> None:
        from lightning_rigl.models.vit import ViTConfig, build_vit

        super().__init__(optimizer="adamw", lr=lr)
        self.features = nn.Identity()
        self.classifier = build_vit(ViTConfig(num_classes=4, in_channels=1, image_size=8, patch_size=4, layers=1,
                                              heads=2, hidden=16, mlp=32))

    def configure_optimizers(self) -> dict:
        from lightning_rigl.lr_schedule import lr_factor

        optimizer = super().configure_optimizers()
        steps = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
            step, "cosine", warmup_steps=3, milestones=(), gamma=1.0, total_steps=int(steps)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TinyGPT(TinyNet):
    """A one-block GPT (16 features in 2 heads, the head tied to the token embedding) on TinyNet's data: the first
    16 pixels of each image, rounded to 8 levels, read as a sequence of tokens; next-token loss, AdamW."""

    def __init__(self, lr: float = 0.01) -> None:
        from lightning_rigl.models.gpt import GPT, GPTConfig

        super().__init__(optimizer="adamw", lr=lr)
        self.features = nn.Identity()
        self.classifier = GPT(GPTConfig(num_classes=8, context=15, layers=1, heads=2, hidden=16, mlp=32))

    @staticmethod
    def tokens(images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1)[:, :16] * 2).round().clamp(-4, 3).long() + 4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.tokens(images)[:, :-1])

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = self.tokens(batch[0])
        return nn.functional.cross_entropy(self(batch[0]).flatten(0, 1), tokens[:, 1:].flatten())


def tiny_huggingface_lm(arch: str, tie_head: bool = False) -> nn.Module:
    """A Hugging Face causal LM from a tiny config, without a download: "gpt2" (Conv1D projections stored
    (in, out), the head tied to the token embedding) or "llama" (bias-free Linear projections, grouped-query
    attention: keys and values of 8 features; its head untied unless ``tie_head``). No dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=8, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                          eos_token_id=0))
    return LlamaForCausalLM(LlamaConfig(vocab_size=8, max_position_embeddings=16, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=tie_head, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


class TinyHuggingFace(TinyNet):
    """A tiny Hugging Face causal LM (``tiny_huggingface_lm``) on TinyNet's data read as tokens as TinyGPT reads
    them, trained on the model's own next-token loss with AdamW."""

    def __init__(self, arch: str = "gpt2", lr: float = 0.01) -> None:
        super().__init__(optimizer="adamw", lr=lr)
        self.features = nn.Identity()
        self.classifier = tiny_huggingface_lm(arch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(input_ids=TinyGPT.tokens(images)).logits

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens = TinyGPT.tokens(batch[0])
        return self.classifier(input_ids=tokens, labels=tokens).loss


class TinyGPT2(TinyHuggingFace):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__("gpt2", lr)


class TinyLlama(TinyHuggingFace):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__("llama", lr)


def make_data(n: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorDataset(x, y)


def train(
    callbacks: Sequence[pl.Callback],
    model: pl.LightningModule | None = None,
    steps: int = 12,
    batch_size: int = 32,
    data: TensorDataset | None = None,
    model_factory: Callable[[], pl.LightningModule] = TinyNet,
    **trainer_kwargs: object,
) -> pl.Trainer:
    """Fit ``model`` for ``steps`` optimizer steps on a fixed, unshuffled dataset (full batch by default)."""
    torch.manual_seed(0)
    model = model if model is not None else model_factory()
    data = data if data is not None else make_data()
    trainer_kwargs.setdefault("logger", False)
    ckpt_path = trainer_kwargs.pop("ckpt_path", None)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=trainer_kwargs.pop("devices", 1),
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=False), ckpt_path=ckpt_path)
    return trainer


# gloo's rare abort at process teardown (about 1 in 70 runs here), not this library's.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def run_processes(command: list[str], cwd: Path, timeout: float = 300,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs a command that starts several processes (Lightning launches them) in ``cwd`` (with ``env``, this
    process's environment by default); after gloo's teardown abort, removes ``cwd/runs`` and tries once more."""
    env = {**(os.environ if env is None else env), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0 and GLOO_TEARDOWN_ABORT in result.stderr:
        shutil.rmtree(cwd / "runs", ignore_errors=True)
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return result


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()
