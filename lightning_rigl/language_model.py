"""`CausalLM`: the LightningModule that trains the registry's decoders (``gpt_tiny``, ``gpt2_small``) on next-token
prediction, beside `ImageClassifier`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_rigl.lr_schedule import LRSchedule, check_lr_schedule
from lightning_rigl.models import create_model
from lightning_rigl.models.sharding import shard_module
from lightning_rigl.optimization import check_optimizer, configure_optimizer


class CausalLM(pl.LightningModule):
    """Next-token cross-entropy training of a registered decoder, with AdamW, linear warm-up and cosine decay by
    default (as GPT-2 reproductions train); gradient clipping, bf16 and accumulation are the Trainer's
    (``gradient_clip_val``, ``precision``, ``accumulate_grad_batches``).

    Validation and test report, over every token of the split: the loss in nats per token (``val/loss``), the
    perplexity (its exponential), bits per token (loss / ln 2) and bits per byte (bits per token over the split's
    bytes per token, which the data module's ``corpus`` records; 1 byte per token at byte level).

    Step counts (``warmup_steps``, ``lr_milestones``) are optimizer steps.

    Args:
        arch: a decoder's name from ``lightning_rigl.models.list_models()``.
        vocab_size: the output layer's size; the command links it to the data module's.
        context: the longest sequence the model takes (its position embeddings); the command links it to the
            data module's.
        width: multiplier on every hidden size (Small-Dense baselines); 1.0 is the standard network.
        arch_kwargs: further options of the model, e.g. ``{"dropout": 0.1}``.
        optimizer, lr, momentum, nesterov, betas, weight_decay, lr_schedule, lr_milestones, lr_gamma,
            warmup_steps: as for ``ImageClassifier``; weight decay falls on weight matrices and embeddings only.

    Raises:
        ConfigError: an unknown ``arch``, or a setting out of range.
    """

    def __init__(
        self,
        arch: str = "gpt_tiny",
        vocab_size: int = 256,
        context: int = 256,
        width: float = 1.0,
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        momentum: float = 0.9,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        lr_schedule: LRSchedule = "cosine",
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer, lr, momentum, nesterov, betas, weight_decay)
        check_lr_schedule(lr_schedule, warmup_steps, lr_milestones, lr_gamma)
        self.save_hyperparameters()
        self.net = create_model(arch, num_classes=vocab_size, width=width, context=context, **(arch_kwargs or {}))
        self.val_loss = MeanMetric()  # nats per token, averaged over every token (summed over DDP processes)
        self.test_loss = MeanMetric()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, shard the network with FSDP2 (one group per block); else nothing."""
        shard_module(self, self.net, self.device_mesh)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=batch[1].numel())

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self.test_loss.update(self._loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        self._log_split("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_split("test", self.test_loss)

    def _loss(self, batch: Sequence[Tensor]) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)  # (B, T, vocabulary)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def _log_split(self, split: str, mean_loss: MeanMetric) -> None:
        loss = float(mean_loss.compute())
        mean_loss.reset()
        metrics = {f"{split}/loss": loss, f"{split}/perplexity": math.exp(min(loss, 700.0)),
                   f"{split}/bits_per_token": loss / math.log(2)}
        bytes_per_token = self._bytes_per_token(split)
        if bytes_per_token is not None:
            metrics[f"{split}/bits_per_byte"] = loss / math.log(2) / bytes_per_token
        self.log_dict(metrics, prog_bar=True)

    def _bytes_per_token(self, split: str) -> float | None:
        corpus = getattr(self.trainer.datamodule, "corpus", None) if self._trainer is not None else None
        return corpus["splits"][split]["bytes_per_token"] if corpus else None

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizer(self, self.net, self.hparams)

