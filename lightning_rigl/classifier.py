"""`ImageClassifier`: the LightningModule the recipes train, around any model of the registry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_rigl.errors import ConfigError
from lightning_rigl.lr_schedule import LRSchedule, check_lr_schedule, lr_factor
from lightning_rigl.models import create_model
from lightning_rigl.models.sharding import shard_blocks

OPTIMIZERS = ("sgd", "adamw")


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
        _check_optimizer(optimizer, lr, momentum, nesterov, betas, weight_decay, label_smoothing)
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
        mesh = self.device_mesh
        if mesh is None or isinstance(self, FSDPModule):  # not sharded, or sharded already by an earlier fit
            return
        if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
            mesh = mesh["data_parallel"]
        shard_blocks(self.net, mesh)
        fully_shard(self, mesh=mesh)

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
        hp = self.hparams
        groups = _decay_groups(self.net, hp.weight_decay)
        if hp.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov)
        total_steps = None
        if hp.lr_schedule == "cosine":
            estimate = self.trainer.estimated_stepping_batches
            total_steps = int(estimate) if math.isfinite(estimate) else None
        scheduler = LambdaLR(
            optimizer,
            lambda step: lr_factor(
                step, hp.lr_schedule, warmup_steps=hp.warmup_steps, milestones=hp.lr_milestones,
                gamma=hp.lr_gamma, total_steps=total_steps,
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _decay_groups(net: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weight decay on parameters of rank >= 2, none on normalisation parameters and
    biases."""
    decay = [p for p in net.parameters() if p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_optimizer(optimizer: str, lr: float, momentum: float, nesterov: bool, betas: Sequence[float],
                     weight_decay: float, label_smoothing: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"Unknown optimizer {optimizer!r}: use one of {OPTIMIZERS}.")
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ConfigError(f"betas must be two decays in [0, 1), got {tuple(betas)}.")
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}.")
    if not 0 <= momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {momentum}.")
    if optimizer == "sgd" and nesterov and momentum == 0:
        raise ConfigError("nesterov=True needs momentum > 0: set model.momentum or model.nesterov false.")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}.")
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
