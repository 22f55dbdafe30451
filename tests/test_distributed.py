"""Two real processes (DDP over gloo on the CPU): masks must agree on every rank at every step, for every method.

The two processes are started once and train every method in turn (strategy "ddp" with the environment a
launcher such as torchrun sets), which is faster than one ddp_spawn per method and starts fewer process
groups.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from conftest import SPARSE_NAMES, TinyNet, make_data
from methods import CHANGING, METHODS
from torch.utils.data import DataLoader

STEPS = 10


class SaveMasksPerRank(pl.Callback):
    """Each rank writes its masks after every step, and its parameters at the end."""

    def __init__(self, sparse: pl.Callback, folder: Path) -> None:
        self.sparse, self.folder = sparse, folder
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.history.append({n: m.clone() for n, m in self.sparse.masks.items()})

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"masks": self.history, "params": params, "updates": self.sparse.num_updates,
                    "densities": self.sparse.densities},
                   self.folder / f"rank{trainer.global_rank}.pt")


def _train_every_method(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    for method, make in METHODS.items():
        torch.manual_seed(0)
        sparse = make()
        out = Path(folder) / method
        out.mkdir(parents=True, exist_ok=True)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS,
            callbacks=[sparse, SaveMasksPerRank(sparse, out)],
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        # Each rank sees different samples, so decisions must use the all-reduced gradient to agree.
        trainer.fit(TinyNet(), DataLoader(make_data(64), batch_size=16, shuffle=False))
    # Close gloo while Python runs: left to interpreter exit, it aborts now and then (as the command does).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method trained by two processes; each rank's masks per step, densities and final parameters."""
    folder = tmp_path_factory.mktemp("ddp")
    ticket = METHODS["lottery"]().checkpoint  # made once here, not by both ranks at once
    assert Path(ticket).is_file()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_train_every_method, args=(port, str(folder)), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("method", list(METHODS))
def test_ranks_hold_identical_masks_at_every_step(runs: Path, method: str) -> None:
    rank0, rank1 = (torch.load(runs / method / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["updates"] == rank1["updates"]
    assert rank0["densities"] == rank1["densities"]
    assert len(rank0["masks"]) == len(rank1["masks"]) == STEPS
    for step, (a, b) in enumerate(zip(rank0["masks"], rank1["masks"])):
        for name in SPARSE_NAMES:
            assert torch.equal(a[name], b[name]), f"step {step}, {name}"
    if method in CHANGING and not method.startswith("snip"):  # SNIP's only change is at step 0
        assert any(not torch.equal(rank0["masks"][0][n], rank0["masks"][-1][n]) for n in SPARSE_NAMES)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
