"""Every method, configured to change its masks within a few steps of the tiny test model: the shared
invariants are tested over all of them."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_rigl import SET, SNFS, SNIP, GradualMagnitudePruning, LotteryTicket, RigL, SRigL, Static

DYNAMIC = {"update_interval": 3, "drop_fraction": 0.5, "stop_at": 1.0}


@functools.cache
def ticket_checkpoint() -> str:
    """A finished pruning run's checkpoint with a rewind copy of the initial weights (made once)."""
    from conftest import train  # the test helpers, importable once pytest has put tests/ on the path

    path = Path(tempfile.mkdtemp(prefix="lightning_rigl_ticket_")) / "pruned.ckpt"
    trainer = train([GradualMagnitudePruning(sparsity=0.8, update_interval=2, start_at=2, stop_at=8, rewind_step=0)],
                    steps=10)
    trainer.save_checkpoint(path)
    return str(path)


METHODS: dict[str, Callable[..., pl.Callback]] = {  # keyword arguments are passed on (rewind_step, say)
    "static": lambda **kw: Static(sparsity=0.8, **kw),
    "rigl": lambda **kw: RigL(sparsity=0.8, **DYNAMIC, **kw),
    "set": lambda **kw: SET(sparsity=0.8, **DYNAMIC, **kw),
    "snfs": lambda **kw: SNFS(sparsity=0.8, **DYNAMIC, **kw),
    "rigl_sg": lambda **kw: RigL(sparsity=0.8, redistribution="gradient", **DYNAMIC, **kw),
    "rigl_sm": lambda **kw: RigL(sparsity=0.8, redistribution="momentum", **DYNAMIC, **kw),
    "rigl_2_4": lambda **kw: RigL(sparsity=0.8, distribution="uniform", structure="2:4", **DYNAMIC, **kw),
    # A threshold high enough that the tiny model ablates neurons (and brings some back) within a few updates.
    "srigl": lambda **kw: SRigL(sparsity=0.8, min_salient_fraction=0.9, **DYNAMIC, **kw),
    "rigl_skip_step": lambda **kw: RigL(sparsity=0.8, update_placement="skip_step", start_at=0, **DYNAMIC, **kw),
    "snip": lambda **kw: SNIP(sparsity=0.8, **kw),
    "snip_global": lambda **kw: SNIP(sparsity=0.8, distribution="global", **kw),
    "pruning": lambda **kw: GradualMagnitudePruning(sparsity=0.8, update_interval=2, start_at=2, stop_at=8, **kw),
    "pruning_global": lambda **kw: GradualMagnitudePruning(sparsity=0.8, distribution="global", update_interval=2,
                                                           start_at=2, stop_at=8, **kw),
    "lottery": lambda **kw: LotteryTicket(checkpoint=ticket_checkpoint(), **kw),  # takes no rewind_step
}
# Methods whose masks change during training (all but the static ones), and the update steps of a 13-step run.
CHANGING = [name for name in METHODS if name not in ("static", "lottery")]
# Methods that refuse kernels="sparse" (they read the dense gradient every step, or start dense) train with "auto".
REFUSES_SPARSE_KERNELS = ("snfs", "snip", "snip_global", "pruning", "pruning_global")


def sparse_kernels_for(method: str) -> str:
    """The kernels setting that runs ``method`` on sparse kernels wherever it may."""
    return "auto" if method in REFUSES_SPARSE_KERNELS else "sparse"


def assert_masks_hold(sparse: pl.Callback, model: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
    """The shared invariants after training with AdamW: every dead weight 0, each layer's live count exact (its
    density's), and Adam's m and v 0 at every dead position."""
    for name, mask in sparse.masks.items():
        weight = model.get_parameter(name)
        assert not weight[~mask].any(), name
        assert int(mask.sum()) == sparse.live_counts[name] == round(mask.numel() * sparse.densities[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[weight][key][~mask].any(), (name, key)
