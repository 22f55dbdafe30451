"""The text the command prints after training: test accuracy, achieved sparsity, density per layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from lightning_rigl.callbacks import SparseTraining
from lightning_rigl.callbacks.sparse_training import FORWARD_RATIO, SIZE_BYTES, TRAIN_RATIO
from lightning_rigl.sparsity import mask_densities
from lightning_rigl.timing import batch_timer


def fit_summary(trainer: pl.Trainer, test_metrics: Mapping[str, float], record: Mapping[str, Any]) -> str:
    """A short report of a finished run. ``test_metrics`` is one dict of ``trainer.test``'s result (may be
    empty when no test set was run); ``record`` is the run's ``results.json`` record (its costs per token, for a
    language model)."""
    lines = ["", "Summary", *_accuracy_lines(test_metrics), *_per_token_lines(record)]
    total = sum(p.numel() for p in trainer.lightning_module.parameters())
    sparse = [cb for cb in trainer.callbacks if isinstance(cb, SparseTraining)]
    timer = batch_timer(trainer)
    batch_time = "" if timer is None or timer.median_ms() is None else (
        f"an optimizer step took {timer.median_ms():.2f} ms (median of {len(timer.step_ms)}, forward to optimizer "
        "step)")
    if not sparse:
        lines.append(f"  dense training: {total:,} parameters" + (f"; {batch_time}" if batch_time else ""))
        return "\n".join(lines)
    for callback in sparse:
        lines.extend(_sparse_lines(callback, total))
        if batch_time:
            optimizer_step = f", optimizer step: {callback.live_step_used}" if callback.live_step_used else ""
            lines.insert(len(lines) - len(callback.masks) - 1,
                         f"  kernels: {callback.kernels}{optimizer_step}; {batch_time}")
        if callback.flops is not None:
            costs = callback.cost_metrics(trainer.lightning_module)
            lines.insert(len(lines) - len(callback.masks) - 1,
                         f"  costs: training FLOPs {costs[TRAIN_RATIO]:.2f}x dense, inference FLOPs "
                         f"{costs[FORWARD_RATIO]:.2f}x, size {costs[SIZE_BYTES] / 1e6:.3f} MB")
    return "\n".join(lines)


def _per_token_lines(record: Mapping[str, Any]) -> list[str]:
    """A language model's costs per token: FLOPs of inference and of training, and the tokens trained per second
    (per process); nothing for other runs."""
    if "tokens_per_second" not in record:
        return []
    parts = [f"{label} {record[key] / 1e6:.2f} MFLOPs" for label, key in
             (("inference", "forward_flops_per_token"), ("training", "train_flops_per_token"))
             if record[key] is not None]
    if record["tokens_per_second"] is not None:
        parts.append(f"{record['tokens_per_second']:,.0f} tokens/s trained")
    return [f"  per token: {', '.join(parts)}"] if parts else []


def checkpoint_summary(masks: Mapping[str, Tensor], test_metrics: Mapping[str, float]) -> str:
    """What ``test`` prints for a checkpoint: its test accuracy and the sparsity of its masks (parameter name ->
    bool tensor, as a lightning-rigl callback saves them)."""
    lines = ["", "Summary", *_accuracy_lines(test_metrics)]
    live = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    lines.append(f"  checkpoint masks: sparsity {1 - live / total:.4f} over {len(masks)} sparse layers "
                 f"({live:,} live of {total:,} sparsified weights)")
    lines.extend(_density_table(masks))
    return "\n".join(lines)


def _accuracy_lines(test_metrics: Mapping[str, float]) -> list[str]:
    """The test accuracy of a classifier; the loss, perplexity and bits of a language model."""
    accuracy = ", ".join(f"{key.split('_')[-1]} {value:.4f}" for key, value in sorted(test_metrics.items())
                         if key.startswith("test/acc"))
    lines = [f"  test accuracy: {accuracy}"] if accuracy else []
    if "test/perplexity" in test_metrics:
        bits = test_metrics.get("test/bits_per_byte")
        lines.append(f"  test: loss {test_metrics['test/loss']:.4f} nats per token, perplexity "
                     f"{test_metrics['test/perplexity']:.3f}" + ("" if bits is None else f", {bits:.4f} bits per byte"))
    return lines


def _density_table(masks: Mapping[str, Tensor], densities: Mapping[str, float] | None = None,
                   kernels: Mapping[str, str] | None = None) -> list[str]:
    """Each layer's shape and density, and the kernels it trained with where given."""
    lines = [f"  {'layer':<40} {'shape':<20} density" + ("  kernels" if kernels else "")]
    for (name, mask), density in zip(masks.items(), (densities or mask_densities(masks)).values()):
        used = f"  {kernels.get(name, 'dense')}" if kernels else ""
        lines.append(f"  {name:<40} {str(tuple(mask.shape)):<20} {density:.4f}{used}")
    return lines


def _sparse_lines(callback: SparseTraining, total: int) -> list[str]:
    target = "a per-layer mapping" if callback.sparsity is None else f"{callback.sparsity} ({callback.distribution})"
    updates = getattr(callback, "num_updates", None)
    dead = sum(mask.numel() for mask in callback.masks.values()) - sum(callback.live_counts.values())
    lines = [
        f"  {type(callback).__name__}: target sparsity {target}, achieved {1 - callback.global_density():.4f} "
        f"over {len(callback.masks)} sparse layers" + ("" if updates is None else f", {updates} mask updates"),
        f"  parameters: {total - dead:,} live of {total:,}",
        *_density_table(callback.masks, callback.achieved_densities(),
                        callback.kernels_used if callback.kernels != "dense" else None),
    ]
    return lines
