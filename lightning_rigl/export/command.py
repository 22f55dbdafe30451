"""``lightning-rigl export --ckpt_path CKPT --output FILE [--config CONFIG ...] [--dtype float16]``: the compact
file of a run's network, from its training checkpoint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lightning_rigl.callbacks.sparse_training import saved_state
from lightning_rigl.checkpoints import is_sharded_checkpoint, read_checkpoint
from lightning_rigl.classifier import ImageClassifier
from lightning_rigl.errors import ConfigError
from lightning_rigl.export.file import nonzero_masks, save_sparse
from lightning_rigl.flops import model_size_bytes
from lightning_rigl.sparsity import mask_densities

DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(args: Sequence[str] | None = None) -> int:
    """Writes the file and prints the sizes; returns the exit status (2, with a message, for bad input)."""
    parser = argparse.ArgumentParser(
        prog="lightning-rigl export",
        allow_abbrev=False,
        description="Write the network of a lightning-rigl checkpoint as a compact safetensors file: a bitmask and "
        "the live values of every sparse layer (a constant fan-in layer condensed: its values and their indices), "
        "every other tensor as it is. Load it with lightning_rigl.export.load_sparse.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `lightning-rigl fit`")
    parser.add_argument("--output", required=True, help="the file to write, e.g. model.safetensors")
    parser.add_argument("--config", action="append", default=[],
                        help="the run's config.yaml (repeatable, later files override): its model section builds "
                        "the network instead of the hyperparameters stored in the checkpoint")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="precision of the stored values (float32: an exact copy)")
    parser.add_argument("--bitmask", action="store_true",
                        help="store constant fan-in layers as a bitmask and values too (the official size "
                        "accounting) instead of condensed")
    options = parser.parse_args(args)
    try:
        network, masks, model_args = load_network(Path(options.ckpt_path), [Path(c) for c in options.config])
        masks = nonzero_masks(network) if masks is None else masks  # a dense run: whatever zeros it has
        path = save_sparse(network, options.output, masks, dtype=DTYPES[options.dtype],
                           metadata={"model": model_args}, condensed=not options.bitmask)
    except (ConfigError, ValueError, OSError) as error:
        print(f"lightning-rigl export: error: {error}", file=sys.stderr)
        return 2
    dense = sum(tensor.numel() * tensor.element_size() for tensor in network.state_dict().values())
    buffers = sum(buffer.numel() * buffer.element_size() for buffer in network.buffers())
    official = model_size_bytes(network, mask_densities(masks))
    print(f"wrote {path} ({options.dtype} values, {len(masks)} sparse layers)")
    print(f"  dense tensors:       {dense:>14,} bytes")
    print(f"  compact file:        {path.stat().st_size:>14,} bytes ({path.stat().st_size / dense:.3f}x dense)")
    print(f"  official accounting: {official + buffers:>14,.0f} bytes, float32 values ({official:,.0f} for the "
          f"parameters, {buffers:,} for the buffers)")
    return 0


def load_network(checkpoint: Path, configs: Sequence[Path]) -> tuple[nn.Module, dict[str, torch.Tensor] | None,
                                                                      dict[str, Any]]:
    """The trained network (``ImageClassifier.net``) of a checkpoint, its masks (parameter names of the network;
    None for a run without a sparse callback) and the keyword arguments of ``create_model`` that rebuild it.

    Raises:
        ConfigError: no such checkpoint, not a checkpoint of the command's ``ImageClassifier``, or a config
            without a model section.
    """
    if not checkpoint.is_file() and not is_sharded_checkpoint(checkpoint):
        raise ConfigError(f"no checkpoint at {checkpoint}: give a .ckpt file (or folder of shards) from "
                          "runs/NAME/version_N/checkpoints/.")
    try:
        state = read_checkpoint(checkpoint)
    except Exception as error:  # a file torch cannot read: say so rather than show its traceback
        raise ConfigError(f"{checkpoint} is not a readable PyTorch checkpoint ({type(error).__name__}).") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{checkpoint} is not a checkpoint of the lightning-rigl command (it holds a "
                          f"{type(state).__name__}, not a checkpoint's dictionary).")
    # The saved config lacks num_classes (the data module sets it): the checkpoint's values, the config's on top.
    hparams = {**(state.get("hyper_parameters") or {}), **(_model_args(configs) if configs else {})}
    if "state_dict" not in state or "arch" not in hparams:
        raise ConfigError(f"{checkpoint} is not a checkpoint of the lightning-rigl command (no model "
                          "hyperparameters); pass the run's config with --config.")
    try:
        model = ImageClassifier(**{key: value for key, value in hparams.items() if not key.startswith("_")})
        model.load_state_dict(state["state_dict"])
    except (TypeError, RuntimeError) as error:
        raise ConfigError(f"the model settings do not build the network in {checkpoint}: {error}") from None
    sparse_state = saved_state(state)
    masks = None
    if sparse_state is not None:
        masks = {name.removeprefix("net."): mask for name, mask in sparse_state["masks"].items()}
    rebuild = {"name": model.hparams.arch, "num_classes": model.hparams.num_classes, "width": model.hparams.width,
               **(model.hparams.arch_kwargs or {})}
    return model.net, masks, rebuild


def _model_args(configs: Sequence[Path]) -> dict[str, Any]:
    """The ``model`` section of the stacked configs (later files override)."""
    merged: dict[str, Any] = {}
    for config in configs:
        if not config.is_file():
            raise ConfigError(f"no config at {config}.")
        try:
            content = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{config} is not valid YAML ({error.__class__.__name__}).") from None
        section = content.get("model") if isinstance(content, dict) else None
        if not isinstance(section or {}, dict):
            raise ConfigError(f"the model section of {config} is not a mapping.")
        section = section or {}
        merged.update(section.get("init_args", section))
    if not merged:
        raise ConfigError(f"no model section in {', '.join(map(str, configs))}.")
    return merged
