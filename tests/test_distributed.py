"""Two real processes (DDP over gloo on the CPU): masks must agree on every rank at every step."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import SPARSE_NAMES, TinyNet, make_data
from methods import CHANGING, METHODS
from torch.utils.data import DataLoader


class SaveMasksPerRank(pl.Callback):
    """Each rank writes its masks after every step, and its parameters at the end."""

    def __init__(self, sparse: pl.Callback, folder) -> None:
        self.sparse, self.folder = sparse, folder
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({n: m.clone() for n, m in self.sparse.masks.items()})

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"masks": self.history, "params": params, "updates": self.sparse.num_updates,
                    "densities": self.sparse.densities},
                   self.folder / f"rank{trainer.global_rank}.pt")


# One of each kind of rule: gradient growth, random growth, the moving average with redistribution, optimizer
# momentum redistribution, one-shot and gradual pruning across layers, and a ticket (about 6 s each).
@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "rigl_sm", "snip_global", "pruning", "lottery"])
def test_ranks_hold_identical_masks_at_every_step(tmp_path, method):
    torch.manual_seed(0)
    sparse = METHODS[method]()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=10,
        callbacks=[sparse, SaveMasksPerRank(sparse, tmp_path)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    # Each rank sees different samples, so growth must use the all-reduced gradient to agree.
    trainer.fit(TinyNet(), DataLoader(make_data(64), batch_size=16, shuffle=False))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["updates"] == rank1["updates"]
    assert rank0["densities"] == rank1["densities"]
    assert len(rank0["masks"]) == len(rank1["masks"]) == 10
    for step, (a, b) in enumerate(zip(rank0["masks"], rank1["masks"])):
        for name in SPARSE_NAMES:
            assert torch.equal(a[name], b[name]), f"step {step}, {name}"
    if method in CHANGING and method not in ("snip_global",):  # SNIP's only change is at step 0
        assert any(not torch.equal(rank0["masks"][0][n], rank0["masks"][-1][n]) for n in SPARSE_NAMES)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
