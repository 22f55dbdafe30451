"""Two real processes (gloo on the CPU), a small transformer sharded with ``fully_shard`` (FSDP2, Lightning's
``ModelParallelStrategy``): every method's masks, assembled from the shards, equal the masks of the same run
under DDP at every step, and the trained weights agree.

The comparison is with DDP directly, not with a decision recomputed in one process: with two processes the
two reductions give the same gradients to the last bit (FSDP2 averages by a reduce-scatter, DDP by an
all-reduce of halves; a sum of two numbers and its halving are exact in either order), so any difference
in a mask is a difference in the decision.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from conftest import TinyGPT, TinyGPT2, TinyViT, make_data, train
from methods import CHANGING, DYNAMIC, METHODS
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from lightning_rigl import GradualMagnitudePruning, LotteryTicket, RigL, Static
from lightning_rigl.checkpoints import SHARDED_TENSORS, read_checkpoint
from lightning_rigl.cli import checkpoint_masks
from lightning_rigl.models.sharding import shard_blocks, shard_module
from lightning_rigl.sparsity.sharding import gather, is_sharded

STEPS = 10
STRATEGIES = ("ddp", "fsdp2")
TIMEOUT = timedelta(seconds=60)
RANK_DEPENDENT = "static_seeded_by_rank"
IN_RANK_ORDER = "rigl_decided_in_rank_order"
RESUMED = ("rigl", "snfs", "srigl")  # SNFS: a moving average per weight; SRigL: a structure
RESUME_AT = 4  # the end of the second epoch of two steps each


class ShardedTinyViT(TinyViT):
    """TinyViT that ``configure_model`` shards with ``fully_shard`` over the data-parallel mesh, as
    ``ImageClassifier`` does: each encoder block (``shard_blocks``), then the rest (patch embedding, head) with the
    root."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        assert shard_blocks(self.classifier, mesh) == 1  # the one encoder block
        fully_shard(self, mesh=mesh)

    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


class ShardedTinyGPT(TinyGPT):
    """TinyGPT sharded as ``CausalLM`` shards a decoder (``shard_module``: each block, then the root)."""

    def configure_model(self) -> None:
        shard_module(self, self.classifier, self.device_mesh)


class ShardedTinyGPT2(TinyGPT2):
    """The Hugging Face GPT-2 sharded as its users shard it: each block, then the model itself (the module the
    training step calls). Its Conv1D weights, stored (in, out), are sharded along their inputs."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for block in self.classifier.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.classifier, mesh=mesh)


# Methods trained on a GPT as well, and on Hugging Face's GPT-2 (Wanda's start too): plain under DDP, sharded
# under FSDP2.
GPT_RUNS = {f"{method}_gpt": METHODS[method] for method in ("rigl", "srigl")}
GPT2_RUNS = {**{f"{method}_gpt2": METHODS[method] for method in ("rigl", "srigl")},
             "wanda_gpt2": lambda: RigL(sparsity=0.8, start="wanda", calibration_batches=2, **DYNAMIC)}
MODELS = {**dict.fromkeys(GPT_RUNS, (TinyGPT, ShardedTinyGPT)), **dict.fromkeys(GPT2_RUNS, (TinyGPT2, ShardedTinyGPT2))}


class BlocksOnlyTinyViT(TinyViT):
    """TinyViT whose encoder block alone is sharded: the patch embedding and the head stay plain tensors."""

    def configure_model(self) -> None:
        shard_blocks(self.classifier, self.device_mesh["data_parallel"])


class SaveWholeMasks(pl.Callback):
    """Each rank writes the whole masks after every step (gathered from the shards under FSDP2), and at the end
    the whole parameters and the FLOP account."""

    def __init__(self, sparse: pl.Callback, path: Path) -> None:
        self.sparse, self.path = sparse, path
        self.history: list[dict[str, torch.Tensor]] = []
        self.sharded = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.sharded |= any(is_sharded(mask) for mask in self.sparse.masks.values())
        self.history.append({n: gather(m).clone() for n, m in self.sparse.masks.items()})

    def on_train_end(self, trainer, pl_module):
        params = {n: gather(p.detach()).clone() for n, p in pl_module.named_parameters()}
        flops = self.sparse.flops
        torch.save({"masks": self.history, "params": params, "updates": self.sparse.num_updates,
                    "densities": self.sparse.densities, "sharded": self.sharded, "live": self.sparse.live_counts,
                    "flops": None if flops is None else (flops.dense_flops, flops.layer_flops, flops.spent)},
                   self.path)


class RigLInRankOrder(RigL):
    """RigL whose layers finish deciding in a different order on each process: a delay on every other layer,
    the even ones on rank 0, the odd ones on rank 1."""

    def change_mask(self, name, weights, scores, n_drop, n_grow):
        if list(self.masks).index(name) % 2 == torch.distributed.get_rank():
            time.sleep(0.05)
        return super().change_mask(name, weights, scores, n_drop, n_grow)


class StopAfter(pl.Callback):
    """Stops the run after ``step`` optimizer steps, as a preemption would (the schedules still span the run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def _methods(ticket: str) -> dict:
    return {**METHODS, "lottery": lambda: LotteryTicket(checkpoint=ticket), **GPT_RUNS, **GPT2_RUNS}


def _train_every_method_both_ways(rank: int, port: int, folder: str, ticket: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    for method, make in _methods(ticket).items():
        for strategy in STRATEGIES:
            torch.manual_seed(0)
            sparse = make()
            out = Path(folder) / method / f"{strategy}_rank{rank}.pt"
            out.parent.mkdir(parents=True, exist_ok=True)
            sharded = strategy == "fsdp2"
            trainer = pl.Trainer(
                accelerator="cpu", devices=2, max_steps=STEPS,
                # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
                strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT)
                if sharded else DDPStrategy(timeout=TIMEOUT),
                callbacks=[sparse, SaveWholeMasks(sparse, out)], num_sanity_val_steps=0,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            )
            try:
                models = MODELS.get(method, (TinyViT, ShardedTinyViT))
                trainer.fit(models[sharded](), DataLoader(make_data(64), batch_size=16, shuffle=False))
            except Exception as error:
                torch.save({"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}, out)
    # Stopped after RESUME_AT steps, saved in both of Lightning's forms, resumed to the end.
    for method in RESUMED:
        for form in ("sharded", "full"):
            checkpoint = Path(folder) / method / f"{form}.ckpt"
            for ckpt_path in (None, checkpoint):
                torch.manual_seed(0)
                sparse = METHODS[method](rewind_step=0)  # a rewind copy in the checkpoint, for a ticket
                out = Path(folder) / method / f"resumed_{form}_rank{rank}.pt"
                strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT,
                                                 save_distributed_checkpoint=form == "sharded")
                # Counted in epochs (the same 10 steps): Lightning resumes those exactly at the next epoch.
                stop = [StopAfter(RESUME_AT)] if ckpt_path is None else []
                trainer = pl.Trainer(accelerator="cpu", devices=2, max_epochs=STEPS // 2, strategy=strategy,
                                     callbacks=[sparse, SaveWholeMasks(sparse, out), *stop], num_sanity_val_steps=0,
                                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False)
                try:
                    trainer.fit(ShardedTinyViT(), DataLoader(make_data(64), batch_size=16, shuffle=False),
                                ckpt_path=ckpt_path)
                    if ckpt_path is None:
                        trainer.save_checkpoint(checkpoint)
                except Exception as error:
                    torch.save({"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}, out)
    # A seed that differs between ranks: each process draws other whole masks, and must stop at once.
    _record_error(Static(sparsity=0.8, seed=rank), ShardedTinyViT(), Path(folder) / f"{RANK_DEPENDENT}_rank{rank}.pt")
    # Global pruning ranks each process's rows: a sparsified parameter left unsharded is refused.
    _record_error(GradualMagnitudePruning(sparsity=0.8, distribution="global"), BlocksOnlyTinyViT(),
                  Path(folder) / f"global_partly_sharded_rank{rank}.pt")
    # Layers that finish deciding in another order on each process still agree.
    _record_error(RigLInRankOrder(sparsity=0.8, update_interval=2), ShardedTinyViT(),
                  Path(folder) / f"{IN_RANK_ORDER}_rank{rank}.pt")
    # Tensor parallelism (the mesh's second dimension) is refused before training.
    _record_error(Static(sparsity=0.8), TinyViT(), Path(folder) / f"tensor_parallel_rank{rank}.pt",
                  data_parallel_size=1, tensor_parallel_size=2)
    _validate_from_folder_of_shards(rank, Path(folder))
    _rank_across_two_processes(rank, folder)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _validate_from_folder_of_shards(rank: int, folder: Path) -> None:
    """``validate`` with the RigL run's folder of shards (Lightning restores callbacks outside fit too): saves the
    masks the callback then holds, whole."""
    sparse = METHODS["rigl"]()
    trainer = pl.Trainer(accelerator="cpu", devices=2, callbacks=[sparse], logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=TIMEOUT))
    try:
        trainer.validate(ShardedTinyViT(), DataLoader(make_data(32), batch_size=16),
                         ckpt_path=folder / "rigl" / "sharded.ckpt")
        record = {"masks": {name: gather(mask).clone() for name, mask in sparse.masks.items()}}
    except Exception as error:
        record = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
    torch.save(record, folder / f"validated_rank{rank}.pt")


def _record_error(sparse: pl.Callback, model: pl.LightningModule, path: Path, data_parallel_size: int = 2,
                  tensor_parallel_size: int = 1) -> None:
    """Trains under ModelParallelStrategy and saves the error the run stopped with (None if it did not)."""
    strategy = ModelParallelStrategy(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                                     timeout=TIMEOUT)
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=STEPS, callbacks=[sparse], strategy=strategy,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    try:
        trainer.fit(model, DataLoader(make_data(64), batch_size=16, shuffle=False))
        error = None
    except Exception as raised:
        error = f"{type(raised).__name__}: {raised}"
    torch.save({"error": error}, path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every method trained by two processes under DDP and under FSDP2."""
    folder = tmp_path_factory.mktemp("fsdp")
    ticket = folder / "vit_ticket.ckpt"
    pruning = GradualMagnitudePruning(sparsity=0.8, update_interval=2, start_at=2, stop_at=8, rewind_step=0)
    train([pruning], steps=10, model_factory=TinyViT).save_checkpoint(ticket)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_train_every_method_both_ways, args=(port, str(folder), str(ticket)), nprocs=2, join=True)
    return folder


@pytest.mark.parametrize("method", [*METHODS, *GPT_RUNS, *GPT2_RUNS])
def test_sharded_masks_equal_the_ddp_masks_at_every_step(runs: Path, method: str) -> None:
    saved = {(strategy, rank): torch.load(runs / method / f"{strategy}_rank{rank}.pt", weights_only=True)
             for strategy in STRATEGIES for rank in (0, 1)}
    for key, record in saved.items():
        assert "error" not in record, f"{key}: {record['error']}"
    assert saved["fsdp2", 0]["sharded"] and not saved["ddp", 0]["sharded"]
    reference = saved["ddp", 0]
    for key, record in saved.items():
        assert record["updates"] == reference["updates"], key
        assert record["densities"] == reference["densities"], key
        assert record["flops"] is not None and record["flops"] == reference["flops"], key  # counted per weight too
        assert len(record["masks"]) == STEPS
        for step, (masks, expected) in enumerate(zip(record["masks"], reference["masks"])):
            assert list(masks) == list(expected)
            for name in masks:
                assert torch.equal(masks[name], expected[name]), f"{key}, step {step}, {name}"
        for name, value in record["params"].items():
            torch.testing.assert_close(value, reference["params"][name], rtol=0, atol=1e-6, msg=f"{key} {name}")
        assert record["live"] == {name: int(mask.sum()) for name, mask in record["masks"][-1].items()}, key
        for name, mask in record["masks"][-1].items():  # dead weights at exactly 0 after the last step
            assert not record["params"][name][~mask].any(), f"{key}: dead weights of {name} moved"
    # SNIP changes at step 0 only.
    if method.removesuffix("_gpt").removesuffix("_gpt2") in CHANGING and not method.startswith("snip"):
        first, last = reference["masks"][0], reference["masks"][-1]
        assert any(not torch.equal(first[name], last[name]) for name in first)


def test_processes_that_decide_differently_stop_every_rank(runs: Path) -> None:
    for rank in (0, 1):
        error = torch.load(runs / f"{RANK_DEPENDENT}_rank{rank}.pt", weights_only=True)["error"]
        expected = "MaskDisagreementError: Masks differ between processes at optimizer step 0: rank(s) [1] disagree"
        assert error is not None and error.startswith(expected), error


def test_global_pruning_refuses_a_partly_sharded_model_before_training(runs: Path) -> None:
    for rank in (0, 1):
        error = torch.load(runs / f"global_partly_sharded_rank{rank}.pt", weights_only=True)["error"]
        assert error is not None and error.startswith(
            "ConfigError: distribution='global' under FSDP2 ranks each process's rows of every layer, so every "
            "sparsified parameter must be sharded by fully_shard; these are not: ['classifier.conv_proj.weight'"), error


def test_layers_decided_in_another_order_on_each_process_agree(runs: Path) -> None:
    for rank in (0, 1):
        assert torch.load(runs / f"{IN_RANK_ORDER}_rank{rank}.pt", weights_only=True)["error"] is None


def test_tensor_parallelism_is_refused_before_training(runs: Path) -> None:
    for rank in (0, 1):
        error = torch.load(runs / f"tensor_parallel_rank{rank}.pt", weights_only=True)["error"]
        assert error == ("ConfigError: Tensor parallelism is not supported: masks follow fully_shard's row shards "
                         "only. Use ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)."), error


@pytest.mark.parametrize("form", ["sharded", "full"])
@pytest.mark.parametrize("method", RESUMED)
def test_a_run_resumed_from_either_checkpoint_form_reproduces_the_uninterrupted_run(runs: Path, method: str,
                                                                                    form: str) -> None:
    for rank in (0, 1):
        uninterrupted = torch.load(runs / method / f"fsdp2_rank{rank}.pt", weights_only=True)
        resumed = torch.load(runs / method / f"resumed_{form}_rank{rank}.pt", weights_only=True)
        assert "error" not in resumed, resumed.get("error")
        assert resumed["sharded"] and resumed["updates"] == uninterrupted["updates"]
        assert resumed["densities"] == uninterrupted["densities"]
        assert len(resumed["masks"]) == STEPS - RESUME_AT
        for step, masks in enumerate(resumed["masks"], start=RESUME_AT):
            for name, mask in masks.items():
                assert torch.equal(mask, uninterrupted["masks"][step][name]), f"rank {rank}, step {step}, {name}"
        for name, value in resumed["params"].items():
            assert torch.equal(value, uninterrupted["params"][name]), f"rank {rank}, {name}"


@pytest.mark.parametrize("method", RESUMED)
def test_a_folder_of_shards_keeps_the_callbacks_tensors_as_shards(runs: Path, method: str) -> None:
    """No process gathers a whole mask, moving average or rewind copy to save a folder of shards: meta.pt (rank 0's
    callback state) holds none, only their names; read back, they equal the single file's whole ones."""
    full = torch.load(runs / method / "full.ckpt", weights_only=True)["callbacks"]["lightning_rigl"]
    kinds = {kind for kind in ("masks", "rewind", "moving_average") if full.get(kind)}
    assert {"masks", "rewind"} | ({"moving_average"} if method == "snfs" else set()) <= kinds
    folder = runs / method / "sharded.ckpt"
    saved = torch.load(folder / "meta.pt", weights_only=True)["callbacks"]["lightning_rigl"]
    assert {kind: set(names) for kind, names in saved[SHARDED_TENSORS].items()} == \
        {kind: set(full[kind]) for kind in kinds}
    assert not any(saved.get(kind) for kind in kinds)
    read = read_checkpoint(folder, weights=False)["callbacks"]["lightning_rigl"]
    assert SHARDED_TENSORS not in read
    for kind in kinds:
        for name, value in full[kind].items():
            assert torch.equal(read[kind][name], value), f"{kind} {name}"
    masks = checkpoint_masks(str(folder))  # what `lightning-rigl test --ckpt_path` reports
    assert masks.keys() == full["masks"].keys() and all(torch.equal(masks[n], full["masks"][n]) for n in masks)


@pytest.mark.parametrize("form", ["sharded", "full"])
def test_a_ticket_reads_masks_and_rewind_copy_from_either_checkpoint_form(runs: Path, form: str) -> None:
    checkpoint = runs / "rigl" / f"{form}.ckpt"
    assert checkpoint.is_dir() == (form == "sharded")
    ticket = LotteryTicket(checkpoint=str(checkpoint))
    uninterrupted = torch.load(runs / "rigl" / "fsdp2_rank0.pt", weights_only=True)
    for name, mask in uninterrupted["masks"][RESUME_AT - 1].items():
        assert torch.equal(ticket.source_masks[name], mask), name
    torch.manual_seed(0)
    initial = dict(TinyViT().named_parameters())
    assert set(ticket.source_rewind) == set(initial)
    initial_masks = uninterrupted["masks"][0]  # RigL's first update comes at step 3
    for name, value in ticket.source_rewind.items():  # taken at step 0, once the initial masks were applied
        expected = initial[name].detach() * initial_masks[name] if name in initial_masks else initial[name].detach()
        assert torch.equal(value, expected), name


def test_validate_restores_the_masks_from_a_folder_of_shards(runs: Path) -> None:
    saved = torch.load(runs / "rigl" / "fsdp2_rank0.pt", weights_only=True)["masks"][RESUME_AT - 1]
    for rank in (0, 1):
        record = torch.load(runs / f"validated_rank{rank}.pt", weights_only=True)
        assert "error" not in record, record.get("error")
        assert record["masks"].keys() == saved.keys()
        assert all(torch.equal(record["masks"][name], mask) for name, mask in saved.items())


def test_only_fully_shards_row_layout_can_be_masked(tmp_path: Path) -> None:
    """A parameter split by columns (tensor parallelism's layout, or a custom ``shard_placement_fn``) cannot carry
    a row-sharded mask: named, with the reason; a row shard and a plain tensor pass."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_rigl.sparsity.sharding import unsupported_sharding

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.zeros(4, 6)
        assert unsupported_sharding(weight) is None
        assert unsupported_sharding(distribute_tensor(weight, mesh, [Shard(0)])) is None
        reason = unsupported_sharding(distribute_tensor(weight, mesh, [Shard(1)]))
        assert reason is not None and reason.startswith("it is laid out as (Shard(dim=1),)"), reason
    finally:
        torch.distributed.destroy_process_group()


def _rank_across_two_processes(rank: int, folder: str) -> None:
    """Ranks hand-made, tie-heavy scores sharded by rows over the two processes; saves the (layer, position)
    chosen here for each trial."""
    import math

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_rigl.sparsity.distributed_top_k import order_keys, top_k_over_processes
    from lightning_rigl.sparsity.sharding import local, local_rows

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(1)  # the same scores on both processes
    chosen = []
    for _ in range(12):
        # (1, 6): a single row, all on rank 0; (7,): a 1-D layer. Integers from -2 to 2: ties everywhere.
        scores = [torch.randint(-2, 3, shape, generator=gen).float() for shape in [(5, 3), (1, 6), (4, 2), (7,)]]
        scores[0].view(-1)[0], scores[2].view(-1)[1] = -0.0, math.inf
        k = int(torch.randint(1, sum(s.numel() for s in scores) + 1, (1,), generator=gen))
        keys, positions = [], []
        for layer in scores:
            shard = distribute_tensor(layer, mesh, [Shard(0)])
            first = local_rows(shard)[0] * layer[0].numel()
            keys.append(order_keys(local(shard).reshape(-1)))
            positions.append(torch.arange(keys[-1].numel()) + first)
        kept = top_k_over_processes(torch.cat(keys), k, [key.numel() for key in keys], shard)
        here = [(layer, int(p)) for layer, (p_layer, k_layer) in enumerate(zip(positions, kept.split(
            [key.numel() for key in keys]))) for p in p_layer[k_layer]]
        chosen.append({"scores": scores, "k": k, "chosen": here})
    torch.save(chosen, Path(folder) / f"top_k_rank{rank}.pt")


def test_the_top_k_across_processes_is_the_one_process_ranking(runs: Path) -> None:
    """Scores sharded by rows over two processes: together the processes choose exactly the k largest of the
    concatenated scores, ties lowest position first (layer after layer, -0.0 equal to 0.0), without gathering."""
    ranks = [torch.load(runs / f"top_k_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for trial, (mine, theirs) in enumerate(zip(*ranks)):
        ranked = sorted((-float(value), layer, position) for layer, scores in enumerate(mine["scores"])
                        for position, value in enumerate(scores.reshape(-1).tolist()))
        expected = {(layer, position) for _, layer, position in ranked[:mine["k"]]}
        assert set(mine["chosen"]) | set(theirs["chosen"]) == expected, f"trial {trial}"
        assert not set(mine["chosen"]) & set(theirs["chosen"])
