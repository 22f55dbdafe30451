"""`ImageClassifier`: the LightningModule the recipes train, around any model of the registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_rigl.errors import ConfigError
from lightning_rigl.lr_schedule import LRSchedule, check_lr_schedule
from lightning_rigl.models import create_model
from lightning_rigl.models.sharding import shard_module
from lightning_rigl.optimization import check_optimizer, configure_optimizer


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training of a registered model with SGD, as in the RigL papers, or AdamW, as vision
    transformers are trained.

    Step counts (``warmup_steps``, ``lr_milestones``) are optimizer steps, the unit of ``trainer.max_steps``.

    Args:
        arch: a name from ``lightning_rigl.models.list_models()``.
        num_classes: output classes; the command links it to the data module's.
        width: multiplier on every layer's channel count (Small-Dense baselines); 1.0 is the standard network.
        arch_kwargs: further keyword arguments of the model, e.g. ``{"zero_init_residual": True}``.
        optimizer: "sgd" (with ``momentum`` and ``nesterov``) or "adamw" (with ``betas``; decoupled weight decay).
        lr: base learning rate (after warm-up, before decay).
        momentum: SGD momentum; 0 disables it.
        nesterov: Nesterov momentum.
        betas: AdamW's decays of its first and second moments, each in [0, 1).
        weight_decay: coefficient on every parameter of two or more dimensions (conv, linear and attention weights,
            a ViT's class token and position embedding); normalisation parameters and biases get none.
        lr_schedule: "step" (×``lr_gamma`` at each of ``lr_milestones``), "cosine" (to 0 at the last step) or
            "constant".
        lr_milestones: optimizer steps at which "step" multiplies the learning rate by ``lr_gamma``.
        lr_gamma: the factor of each step decay, in (0, 1].
        warmup_steps: optimizer steps of linear warm-up from lr/warmup_steps to lr.
        label_smoothing: fraction of the target mass spread uniformly over the classes, in [0, 1).

    Raises:
        ConfigError: an unknown ``arch``, or an optimizer or schedule setting out of range.
    """

    def __init__(
        self,
        arch: str = "lenet300_100",
        num_classes: int = 10,
        width: float = 1.0,
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 5e-4,
        lr_schedule: LRSchedule = "step",
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        warmup_steps: int = 0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_optimizer(optimizer, lr, momentum, nesterov, betas, weight_decay)
        _check_label_smoothing(label_smoothing)
        check_lr_schedule(lr_schedule, warmup_steps, lr_milestones, lr_gamma)
        self.save_hyperparameters()
        self.net = create_model(arch, num_classes=num_classes, width=width, **(arch_kwargs or {}))
        self.loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # Top-5 needs at least 5 classes. "micro": the share of correct images, not the mean over classes.
        # torchmetrics sums the counts over DDP ranks at compute().
        top_ks = (1, 5) if num_classes >= 5 else (1,)
        accuracy = MetricCollection(
            {f"acc_top{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in top_ks}
        )
        self.val_metrics = accuracy.clone(prefix="val/")
        self.test_metrics = accuracy.clone(prefix="test/")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``, shard the network with FSDP2 over the data-parallel mesh: one group
        per block (``shard_blocks``), the rest with this module. Under other strategies, nothing."""
        shard_module(self, self.net, self.device_mesh)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = self.loss(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val/loss")

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test/loss")

    def _evaluate(self, batch: Sequence[Tensor], metrics: MetricCollection, loss_name: str) -> None:
        images, labels = batch
        logits = self(images)
        metrics.update(logits, labels)
        self.log(loss_name, self.loss(logits, labels), sync_dist=True)
        self.log_dict(metrics, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_optimizer(self, self.net, self.hparams)


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
