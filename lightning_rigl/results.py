"""The record of a finished run that ``lightning-rigl report`` reads: ``results.json`` in the run's folder.

The command writes it after ``fit`` (and its test), so its presence is what makes a folder a finished run. It
holds what the paper's tables put in a row (method, distribution, sparsity, multiplier, training and inference
FLOPs as multiples of dense, size, test accuracy) and each sparse layer's final density.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_rigl.callbacks import DynamicSparseTraining, LotteryTicket, SparseTraining, SRigL
from lightning_rigl.callbacks.sparse_training import FORWARD_RATIO, SIZE_BYTES, TRAIN_RATIO
from lightning_rigl.flops import forward_flops, model_size_bytes
from lightning_rigl.timing import batch_timer

RESULTS_FILE = "results.json"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "data", "method", "distribution", "sparsity", "achieved_sparsity", "multiplier", "steps",
                 "test", "train_ratio", "forward_ratio", "size_bytes", "densities")
_NUMBER = (int, float)
# What the report computes with: numbers (ratios may be missing), the test metrics and densities as mappings.
_FIELD_TYPES = {"sparsity": _NUMBER, "achieved_sparsity": _NUMBER, "multiplier": _NUMBER, "steps": _NUMBER,
                "size_bytes": _NUMBER, "train_ratio": (*_NUMBER, type(None)),
                "forward_ratio": (*_NUMBER, type(None)), "test": dict, "densities": dict}


def run_results(trainer: pl.Trainer, test_metrics: Mapping[str, float], multiplier: float) -> dict[str, Any]:
    """The record of a run that has just finished ``fit``. A run without a sparse callback is "Dense", or
    "Small-Dense" when its model is narrowed (``width`` < 1), with the fraction of parameters it lacks as its
    sparsity.

    Args:
        trainer: the run's trainer, after ``fit``.
        test_metrics: one dict of ``trainer.test``'s result; empty when the run was not tested.
        multiplier: the extended-training multiplier the run was scaled by (the command's ``--multiplier``);
            the paper's training FLOPs are ``train_ratio`` times it, a multiple of dense training at 1x.
    """
    model = trainer.lightning_module
    sparse = [cb for cb in trainer.callbacks if isinstance(cb, SparseTraining)]
    if len(sparse) > 1:
        raise ValueError(f"a run holds one sparse callback, this one {len(sparse)}")
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": str(model.hparams.get("arch", type(model).__name__)),
        "data": type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
        "multiplier": float(multiplier),
        "steps": trainer.global_step,
        "test": {key: float(value) for key, value in test_metrics.items()},
    }
    if not sparse:
        removed = _parameters_removed(model)
        # A Small-Dense model trains and infers at its own FLOPs: a fraction of the full-width model's.
        ratio = 1.0 if removed == 0 else _narrowed_flop_ratio(model, _example(trainer))
        record.update(method="Dense" if removed == 0 else "Small-Dense", distribution=None, sparsity=removed,
                      achieved_sparsity=removed, seed=None, train_ratio=ratio, forward_ratio=ratio,
                      size_bytes=model_size_bytes(model), densities={}, kernels="dense", layer_kernels={},
                      optimizer_step="dense", step_ms=_batch_ms(trainer))
        record.update(_language_model_record(trainer, record))
        return record
    (callback,) = sparse
    distribution, sparsity = _distribution(callback)
    achieved = 1.0 - callback.global_density()
    record.update(
        method=method_label(callback),
        distribution=distribution,
        sparsity=achieved if sparsity is None else sparsity,
        achieved_sparsity=achieved,
        seed=callback.seed,
        densities=callback.achieved_densities(),
        kernels=callback.kernels,
        layer_kernels=dict(callback.kernels_used),
        optimizer_step=callback.live_step_used or "dense",
        step_ms=_batch_ms(trainer),
    )
    if callback.structure is not None:
        record.update(structure=str(callback.structure), ablated_neurons=callback.ablated_neurons())
    if callback.flops is None:  # FLOPs could not be counted (the callback warned): only the size is known
        record.update(train_ratio=None, forward_ratio=None, size_bytes=model_size_bytes(model, callback.densities))
    else:
        costs = callback.cost_metrics(model)
        record.update(train_ratio=costs[TRAIN_RATIO], forward_ratio=costs[FORWARD_RATIO], size_bytes=costs[SIZE_BYTES])
    record.update(_language_model_record(trainer, record))
    return record


def _batch_ms(trainer: pl.Trainer) -> float | None:
    """The median optimizer step time of the run (ms); None without the command's timer or before any step."""
    timer = batch_timer(trainer)
    return None if timer is None else timer.median_ms()


def _language_model_record(trainer: pl.Trainer, record: Mapping[str, Any]) -> dict[str, Any]:
    """For a run on text (a data module with a ``corpus``): the corpus it read, FLOPs per token of inference and
    of training (the full-width dense model's forward FLOPs per token, attention's products included, times the
    run's ratios; training as the paper counts it, over the steps run) and tokens per second (per process, from
    the median optimizer step time and the batches of a step; None without one). Nothing for other runs."""
    corpus = getattr(trainer.datamodule, "corpus", None)
    example = _example(trainer)
    if not corpus or example is None:
        return {}
    model = trainer.lightning_module
    tokens = example.numel()
    dense = forward_flops(_full_width_model(model) or model.net, example) / tokens
    forward_ratio, train_ratio = record["forward_ratio"], record["train_ratio"]
    step_ms = record["step_ms"]
    return {
        "corpus": corpus,
        "forward_flops_per_token": None if forward_ratio is None else forward_ratio * dense,
        "train_flops_per_token": None if train_ratio is None else 3 * train_ratio * dense,
        "tokens_per_second": None if not step_ms else
        trainer.datamodule.batch_size * trainer.accumulate_grad_batches * tokens / (step_ms / 1e3),
    }


def _full_width_model(model: pl.LightningModule) -> nn.Module | None:
    """The full-width network of a narrowed dense model (``width`` < 1: a Small-Dense baseline); None for any
    other model."""
    hparams = model.hparams
    if float(hparams.get("width", 1.0)) == 1.0 or "arch" not in hparams:
        return None
    return type(model)(**{**{key: value for key, value in hparams.items() if not key.startswith("_")},
                          "width": 1.0}).net


def _parameters_removed(model: pl.LightningModule) -> float:
    """For a narrowed dense model, the fraction of the full-width model's parameters it lacks, the sparsity
    whose parameter count it matches; 0 for any other model."""
    full = _full_width_model(model)
    if full is None:
        return 0.0
    return 1.0 - sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in full.parameters())


def _narrowed_flop_ratio(model: pl.LightningModule, example: torch.Tensor | None) -> float | None:
    """A narrowed model's forward FLOPs over its full-width model's, for one example (also its training FLOPs
    over the full model's, both trained densely); None when no example is known."""
    full = _full_width_model(model)
    if full is None or example is None:
        return None
    return forward_flops(model.net, example) / forward_flops(full, example)


def _example(trainer: pl.Trainer) -> torch.Tensor | None:
    """One training example of the trainer's data module (``train_set[0]``'s first tensor) as a batch of one, if
    it has one: images or token ids."""
    dataset = getattr(trainer.datamodule, "train_set", None)
    if dataset is None:
        return None
    example = dataset[0]
    inputs = example[0] if isinstance(example, (tuple, list)) else example
    return inputs.unsqueeze(0) if isinstance(inputs, torch.Tensor) else None


def _distribution(callback: SparseTraining) -> tuple[str, float | None]:
    """The distribution's name and the configured sparsity (None: only the achieved one is known). A mapping
    that puts every layer at one sparsity is "uniform (all layers)"; a lottery ticket's masks are its source's."""
    if isinstance(callback, LotteryTicket):
        return "ticket", None
    if isinstance(callback.distribution, str):
        return callback.distribution, float(callback.sparsity)
    values = set(callback.distribution.values())
    if len(values) == 1:
        return "uniform (all layers)", float(values.pop())
    return "custom", None


def method_label(callback: SparseTraining) -> str:
    """The callback's class name, with the paper's suffix when it redistributes otherwise than its default:
    RigL with ``redistribution="momentum"`` is "RigL-SM", with "gradient" "RigL-SG"; a structure the class does
    not keep by default follows the name ("RigL 2:4"); SRigL without ablation is "SRigL (no ablation)"."""
    name = type(callback).__name__
    if callback.structure is not None and not isinstance(callback, SRigL):
        name = f"{name} {callback.structure}"
    if isinstance(callback, SRigL) and callback.min_salient_fraction == 0:
        return f"{name} (no ablation)"
    if not isinstance(callback, DynamicSparseTraining):
        return name
    # The nearest class that declares the option (a subclass may take **kwargs).
    default = next(parameter.default for cls in type(callback).__mro__
                   if (parameter := inspect.signature(cls.__init__).parameters.get("redistribution")) is not None)
    if callback.redistribution == default:
        return name
    if callback.redistribution == "none":
        return f"{name} (no redistribution)"
    return f"{name}-S{callback.redistribution[0].upper()}"


def write_results(folder: str | Path, record: Mapping[str, Any]) -> Path:
    """Writes ``record`` as ``results.json`` in ``folder``; returns the file's path."""
    path = Path(folder) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_results(folder: str | Path) -> dict[str, Any]:
    """The record in ``folder``'s ``results.json``.

    Raises:
        FileNotFoundError: the folder holds no ``results.json`` (the run did not finish).
        ValueError: the file is not a record this version reads.
    """
    path = Path(folder) / RESULTS_FILE
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a lightning-rigl results file of format {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    wrong = [key for key, kinds in _FIELD_TYPES.items() if not isinstance(record[key], kinds)
             or isinstance(record[key], bool)]
    if wrong:
        raise ValueError(f"{path} has values of the wrong type in {', '.join(wrong)}")
    return record
