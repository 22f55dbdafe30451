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
    The batches run through ``training_step`` in eval mode (no dropout, no batch-norm statistics) and without
    gradients; what it logs is dropped.

    Raises:
        ConfigError: the training data is not one loader, it has fewer than ``batches`` batches, or a layer's
            forward never ran on them (an attention module that reads a linear layer's weight itself, say).
    """
    # The loader as the fit loop will get it, before the fit loop sets it up: a loader with persistent workers
    # resets the iterator these batches come from when the first epoch starts, and a stateful loader's position
    # is still restored afterwards. Lightning 2.x keeps the source in ``fit_loop._data_source`` from ``fit`` on.
    loader = trainer.fit_loop._data_source.dataloader()
    if not isinstance(loader, torch.utils.data.DataLoader):
        raise ConfigError("start='wanda' reads its calibration batches from the training DataLoader; this run trains "
                          f"on a {type(loader).__name__}. Use start='magnitude', or train on one DataLoader.")
    sums = {name: torch.zeros(_fan_in(layer), dtype=torch.float64, device=pl_module.device)
            for name, layer in layers.items()}
    calls = dict.fromkeys(layers, 0)
    hooks = [layer.register_forward_pre_hook(_accumulator(sums[name], calls, name, _fan_in(layer)))
             for name, layer in layers.items()]
    seen = 0
    try:
        with torch.no_grad(), _calibrating(pl_module), trainer.precision_plugin.forward_context():
            for index, batch in zip(range(batches), loader):
                pl_module.training_step(trainer.strategy.batch_to_device(batch), index)
                seen += 1
    finally:
        for hook in hooks:
            hook.remove()
    distributed = dist.is_available() and dist.is_initialized()
    counts = torch.tensor([seen, *calls.values()], dtype=torch.float64, device=pl_module.device)
    if distributed:  # every process decides alike: none raises while the others wait in an all-reduce
        dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    if int(counts[0]) < batches:
        raise ConfigError(f"start='wanda' calibrates on {batches} training batches; a loader has {int(counts[0])}. "
                          "Lower calibration_batches.")
    unseen = [name for name, count in zip(calls, counts[1:].tolist()) if count == 0]
    if unseen:
        raise ConfigError(f"start='wanda' saw no input reach {unseen[:3]}: their modules never ran in training_step "
                          "(an attention module reads such a weight itself). Keep them out with exclude=[...], or use "
                          "start='magnitude'.")
    if distributed:
        for total in sums.values():
            dist.all_reduce(total)
    return {name: total.sqrt() for name, total in sums.items()}


def wanda_score(layer: nn.Module, norm: Tensor) -> Tensor:
    """|W| times its input feature's norm, in the weight's own layout (an input feature is a column of an
    ``nn.Linear`` weight, a row of a ``Conv1D`` one), in float32; the whole weight under FSDP2."""
    weight = gather(layer.weight.detach()).abs().float()
    norm = norm.to(weight.device, torch.float32)
    return weight * (norm[None, :] if isinstance(layer, nn.Linear) else norm[:, None])


def _fan_in(layer: nn.Module) -> int:
    return layer.weight.shape[1] if isinstance(layer, nn.Linear) else layer.weight.shape[0]


def _accumulator(total: Tensor, calls: dict[str, int], name: str, fan_in: int) -> Any:
    def add(module: nn.Module, args: tuple[Any, ...]) -> None:
        total.add_(args[0].detach().reshape(-1, fan_in).double().pow(2).sum(0))
        calls[name] += 1
    return add


@contextmanager
def _calibrating(pl_module: pl.LightningModule) -> Iterator[None]:
    """``training_step`` called outside the training loop, on batches that are no training step: every module in
    eval mode, ``self.log`` a no-op (Lightning refuses it there); each module's mode restored after."""
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    pl_module.log, pl_module.log_dict = (lambda *args, **kwargs: None,) * 2  # instance attributes shadow the methods
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
        for module, training in modes.items():
            module.train(training)
