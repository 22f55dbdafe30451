"""Wanda's scores (Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024): each weight of a linear layer times the L2 norm of the input feature it reads, over calibration
tokens, |W_ij| · ‖X_j‖₂. A start from trained weights (``start="wanda"``) keeps the largest."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.sharding import gather
from lightning_rigl.sparsity.targets import huggingface_conv1d


def linear_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """The layer whose ``weight`` each name is: an ``nn.Linear`` or a Hugging Face ``Conv1D``.

    Raises:
        ConfigError: a name that is another kind of weight (a convolution, an attention module's own
            projection), for which Wanda's score is not defined.
    """
    kinds = (nn.Linear, *filter(None, [huggingface_conv1d()]))
    layers, others = {}, []
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attribute == "weight" and isinstance(module, kinds):
            layers[name] = module
        else:
            others.append(name)
    if others:
        raise ConfigError(f"start='wanda' scores the weights of linear layers (nn.Linear, Conv1D), not {others[:3]}. "
                          "Keep those out with exclude=[...], or use start='magnitude'.")
    return layers


def input_norms(trainer: pl.Trainer, pl_module: pl.LightningModule, layers: Mapping[str, nn.Module],
                batches: int) -> dict[str, Tensor]:
    """For each named layer, the L2 norm of each of its input features over every token of the first ``batches``
    training batches (of every process under DDP: the sums of squares are added up, so all hold the same norms).
    The batches run through ``training_step`` without gradients; what it logs is dropped.

    Raises:
        ConfigError: the training data is not one loader, or has fewer than ``batches`` batches.
    """
    trainer.fit_loop.setup_data()  # what the fit loop does first; it keeps the loader for training
    loader = trainer.train_dataloader
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ConfigError("start='wanda' reads its calibration batches from the training DataLoader; this run trains "
                          f"on a {type(loader).__name__}. Use start='magnitude', or train on one DataLoader.")
    sums = {name: torch.zeros(_fan_in(layer), dtype=torch.float64, device=pl_module.device)
            for name, layer in layers.items()}
    hooks = [layer.register_forward_pre_hook(_accumulator(sums[name], _fan_in(layer)))
             for name, layer in layers.items()]
    seen = 0
    try:
        with torch.no_grad(), _unlogged(pl_module), trainer.precision_plugin.forward_context():
            for index, batch in zip(range(batches), loader):
                pl_module.training_step(trainer.strategy.batch_to_device(batch), index)
                seen += 1
    finally:
        for hook in hooks:
            hook.remove()
    if seen < batches:
        raise ConfigError(f"start='wanda' calibrates on {batches} training batches; the loader has {seen}. Lower "
                          "calibration_batches.")
    if dist.is_available() and dist.is_initialized():
        for total in sums.values():
            dist.all_reduce(total)
    return {name: total.sqrt() for name, total in sums.items()}


def wanda_scores(layers: Mapping[str, nn.Module], norms: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """|W| times its input feature's norm, in each weight's own layout (an input feature is a column of an
    ``nn.Linear`` weight, a row of a ``Conv1D`` one); whole weights under FSDP2."""
    scores = {}
    for name, layer in layers.items():
        weight = gather(layer.weight.detach()).abs().double()
        norm = norms[name].to(weight.device)
        scores[name] = weight * (norm[None, :] if isinstance(layer, nn.Linear) else norm[:, None])
    return scores


def _fan_in(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, nn.Linear) else layer.weight.shape[0]


def _accumulator(total: Tensor, fan_in: int) -> Any:
    def add(module: nn.Module, args: tuple[Any, ...]) -> None:
        total.add_(args[0].detach().reshape(-1, fan_in).double().pow(2).sum(0))
    return add


@contextmanager
def _unlogged(pl_module: pl.LightningModule) -> Iterator[None]:
    """``training_step`` called outside the training loop: Lightning refuses ``self.log`` there, and these
    batches are no training step to log."""
    pl_module.log, pl_module.log_dict = (lambda *args, **kwargs: None,) * 2  # instance attributes shadow the methods
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
