"""Two real processes (DDP over gloo on the CPU): masks must agree on every rank at every step, for every method,
and no run may stop on the callbacks' own agreement check (``MaskDisagreementError``).

The two processes are started once and train every method in turn (strategy "ddp" with the environment a
launcher such as torchrun sets), which is faster than one ddp_spawn per method and starts fewer process
groups.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from conftest import TinyGPT, TinyGPT2, TinyLlama, TinyNet, TinyViT, make_data
from methods import CHANGING, DYNAMIC, METHODS
from torch.utils.data import DataLoader

from lightning_rigl import RigL, Static

STEPS = 10
RANK_DEPENDENT = "static_seeded_by_rank"
TRANSFORMER_RUNS = {**{f"{method}_vit": (METHODS[method], TinyViT) for method in ("rigl", "set")},
                    **{f"{method}_gpt": (METHODS[method], TinyGPT) for method in ("rigl", "srigl")},
                    # Hugging Face models: GPT-2's Conv1D weights stored (in, out), Llama's bias-free Linear.
                    **{f"{method}_gpt2": (METHODS[method], TinyGPT2) for method in ("rigl", "srigl")},
                    "rigl_llama": (METHODS["rigl"], TinyLlama),
                    # Wanda's input norms differ between ranks unless the processes add them up.
                    "wanda_gpt2": (lambda: RigL(sparsity=0.8, start="wanda", calibration_batches=2, **DYNAMIC),
                                   TinyGPT2)}
# Sparse kernels inside DDP; under "auto" the processes sum their timings, so that all choose the same kernels.
KERNEL_RUNS = {f"{method}_{kernels}": (functools.partial(METHODS[method], kernels=kernels), TinyNet)
               for method, kernels in (("rigl", "sparse"), ("set", "sparse"), ("srigl", "sparse"), ("rigl", "auto"),
                                       ("snfs", "auto"))}


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
                    "densities": self.sparse.densities, "kernels": dict(self.sparse.kernels_used)},
                   self.folder / f"rank{trainer.global_rank}.pt")


def _train_every_method(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    # A seed that differs between ranks (a configuration no process can notice alone) must stop both at once.
    runs = {**{method: (make, TinyNet) for method, make in METHODS.items()}, **TRANSFORMER_RUNS, **KERNEL_RUNS,
            RANK_DEPENDENT: (lambda: Static(sparsity=0.8, seed=rank), TinyNet)}
    for method, (make, model_factory) in runs.items():
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
        try:
            trainer.fit(model_factory(), DataLoader(make_data(64), batch_size=16, shuffle=False))
        except Exception as error:  # raised on both ranks at once (the agreement check): the next method runs
            torch.save({"error": f"{type(error).__name__}: {error}"}, out / f"rank{rank}.pt")
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


@pytest.mark.parametrize("method", [*METHODS, *TRANSFORMER_RUNS, *KERNEL_RUNS])
def test_ranks_hold_identical_masks_at_every_step(runs: Path, method: str) -> None:
    rank0, rank1 = (torch.load(runs / method / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "error" not in rank0 and "error" not in rank1, rank0.get("error") or rank1.get("error")
    assert rank0["updates"] == rank1["updates"]
    assert rank0["densities"] == rank1["densities"]
    assert rank0["kernels"] == rank1["kernels"]
    if method.endswith("_sparse"):
        assert rank0["kernels"]["classifier.1.weight"] in ("native", "csr")  # ERK keeps classifier.3 dense
    assert len(rank0["masks"]) == len(rank1["masks"]) == STEPS
    for step, (a, b) in enumerate(zip(rank0["masks"], rank1["masks"])):
        assert list(a) == list(b)
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}, {name}"
    if method.removesuffix("_vit").removesuffix("_sparse").removesuffix("_auto") in CHANGING and not method.startswith("snip"):  # SNIP changes at step 0 only
        assert any(not torch.equal(rank0["masks"][0][n], rank0["masks"][-1][n]) for n in rank0["masks"][0])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name


def test_masks_that_differ_between_ranks_stop_every_rank(runs: Path) -> None:
    for rank in (0, 1):
        error = torch.load(runs / RANK_DEPENDENT / f"rank{rank}.pt", weights_only=True)["error"]
        expected = ("MaskDisagreementError: Masks differ between processes at optimizer step 0: rank(s) [1] "
                    "disagree with rank 0 on ['features.3.weight', 'classifier.1.weight']")
        assert error.startswith(expected), error
