"""A run of the command stopped after an epoch's checkpoint and resumed with --ckpt_path trains on the batches the
uninterrupted run saw, so it ends with the same masks and parameters (one process here; two torchrun nodes in
test_torchrun.py). Also the training order itself (EpochShuffle) and the loop-state fix (ResumeBetweenEpochs)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, make_data
from fake_datasets import write_fashion_mnist
from process_probe import load_records, probe_config
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import ResumeBetweenEpochs
from lightning_rigl.cli import DEFAULT_CONFIG, main
from lightning_rigl.data.order import EpochShuffle, TrainingLoader, training_order

STEPS, STOP = 30, 10  # 10 steps per epoch: 160 training images, batch 16
RIGL = {"class_path": "lightning_rigl.RigL",
        "init_args": {"sparsity": 0.9, "update_interval": 4, "drop_fraction": 0.3, "stop_at": 0.75}}


def _fit(workdir: Path, data: Path, num_workers: int, stop_after_step: int | None = None,
         ckpt_path: Path | None = None) -> dict:
    workdir.mkdir()
    records = workdir / "records"
    args = ["fit", "--config", str(DEFAULT_CONFIG), "--config", str(probe_config(workdir, records, [RIGL],
                                                                                   stop_after_step)),
            "--data.data_dir", str(data), "--data.val_size", "16", "--data.batch_size", "16",
            "--data.num_workers", str(num_workers), "--trainer.max_steps", str(STEPS), "--trainer.max_epochs", "-1",
            "--trainer.default_root_dir", str(workdir), "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--test_after_fit", "false"]
    if ckpt_path is not None:
        args += ["--ckpt_path", str(ckpt_path)]
    main(args)
    (record,) = load_records(records)
    return record


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process loading", "2 loader workers"])
def test_a_resumed_run_of_the_command_ends_where_the_uninterrupted_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_workers: int
) -> None:
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "fashion"
    write_fashion_mnist(data, n_train=176, n_test=8)
    straight = _fit(tmp_path / "straight", data, num_workers)
    stopped = _fit(tmp_path / "stopped", data, num_workers, stop_after_step=STOP)
    (checkpoint,) = (tmp_path / "stopped").glob("runs/*/version_0/checkpoints/*.ckpt")
    assert checkpoint.name == f"epoch=0-step={STOP}.ckpt"
    resumed = _fit(tmp_path / "resumed", data, num_workers, ckpt_path=checkpoint)

    assert stopped["param_digests"] == straight["param_digests"][:STOP]
    assert resumed["param_digests"] == straight["param_digests"][STOP:]
    assert resumed["mask_digests"] == straight["mask_digests"][STOP:]
    assert len({digest for _, digest in resumed["mask_digests"]}) > 1, "no mask update after the resume"
    for name, param in straight["params"].items():
        assert torch.equal(param, resumed["params"][name]), name
    # The logs go on at the same steps: validation after each epoch, at the step where the epoch ended.
    assert _validation_rows(tmp_path / "resumed") == [row for row in _validation_rows(tmp_path / "straight")
                                                      if row[0] > STOP]


def _validation_rows(run: Path) -> list[tuple[int, int]]:
    """(step, epoch) of each row of the run's metrics.csv that holds validation metrics."""
    (metrics,) = run.glob("runs/*/version_0/metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return [(int(row["step"]), int(row["epoch"])) for row in rows if row.get("val/loss")]


def _orders(sampler: EpochShuffle) -> list[int]:
    return list(sampler)


def test_the_training_order_is_a_function_of_the_seed_and_the_epoch() -> None:
    data = TensorDataset(torch.arange(20))
    epoch = 0
    sampler = EpochShuffle(data, seed=3, epoch_of=lambda: epoch)  # no process group: the whole dataset
    first = _orders(sampler)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert _orders(EpochShuffle(data, seed=3, epoch_of=lambda: 0)) == first  # a fresh sampler: the same order
    epoch = 1
    assert _orders(sampler) != first
    sampler.set_epoch(0)  # Lightning's set_epoch does not override the epoch read when iteration starts
    assert _orders(sampler) == _orders(EpochShuffle(data, seed=3, epoch_of=lambda: 1))
    assert _orders(EpochShuffle(data, seed=4, epoch_of=lambda: 0)) != first


def test_each_process_takes_its_share_of_the_epoch_the_fit_loop_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")
    data = TensorDataset(torch.arange(21))
    progress = SimpleNamespace(processed=2, started=2)
    fit_loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=progress), restarting=False,
                               epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(is_last_batch=False)))

    def trainer(share: dict | None) -> SimpleNamespace:
        return SimpleNamespace(distributed_sampler_kwargs=share, fit_loop=fit_loop)

    shares = [_orders(training_order(data, trainer({"num_replicas": 2, "rank": rank}))) for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 11  # one index repeated to even out the shares
    assert set(shares[0]) | set(shares[1]) == set(range(21))
    assert shares[1] == _orders(EpochShuffle(data, num_replicas=2, rank=1, seed=5, epoch_of=lambda: 2))
    alone = training_order(data, trainer(None))  # one process: Lightning's strategy has no sampler kwargs
    assert (alone.num_replicas, alone.rank) == (1, 0)
    progress.processed = progress.started = 3
    assert _orders(alone) == _orders(EpochShuffle(data, seed=5, epoch_of=lambda: 3))


def _checkpoint(epochs: tuple[int, int, int, int], batches_done: int, last: bool) -> dict:
    """A checkpoint's fit-loop state: epoch counts (ready, started, processed, completed), the batches done in
    the current epoch, and whether the last of them was the epoch's last."""
    counts = dict(zip(("ready", "started", "processed", "completed"), epochs))
    batch_counts = dict.fromkeys(("ready", "started", "processed", "completed"), batches_done)
    return {"loops": {"fit_loop": {
        "epoch_progress": {"total": dict(counts), "current": dict(counts)},
        "epoch_loop.batch_progress": {"total": dict(batch_counts), "current": dict(batch_counts),
                                      "is_last_batch": last},
    }}}


@pytest.mark.parametrize(("what", "max_steps", "checkpoint"), [
    ("counted in epochs", -1, _checkpoint((3, 3, 3, 2), 10, True)),
    ("saved at validation end", 50, _checkpoint((3, 3, 2, 2), 10, True)),
    ("saved mid-epoch", 50, _checkpoint((3, 3, 2, 2), 4, False)),
    ("without loop state", 50, {"state_dict": {}}),
])
def test_other_checkpoints_are_left_as_they_are(what: str, max_steps: int, checkpoint: dict) -> None:
    before = copy.deepcopy(checkpoint)
    ResumeBetweenEpochs().on_load_checkpoint(SimpleNamespace(max_steps=max_steps), None, checkpoint)
    assert checkpoint == before, what


def test_an_end_of_epoch_checkpoint_of_a_step_counted_run_becomes_a_finished_epoch() -> None:
    checkpoint = _checkpoint((3, 3, 3, 2), 10, True)
    ResumeBetweenEpochs().on_load_checkpoint(SimpleNamespace(max_steps=50), None, checkpoint)
    fit_loop = checkpoint["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"] == dict.fromkeys(("ready", "started", "processed", "completed"), 3)
    assert fit_loop["epoch_loop.batch_progress"]["current"] == dict.fromkeys(
        ("ready", "started", "processed", "completed"), 0)
    assert fit_loop["epoch_loop.batch_progress"]["total"]["completed"] == 10  # the run's batch count stays


class EpochLog(pl.Callback):
    """The step at which each epoch ends, and the sampler epoch of each batch; stops after ``stop`` steps."""

    def __init__(self, sampler: EpochShuffle, stop: int | None = None) -> None:
        self.sampler, self.stop = sampler, stop
        self.epoch_ends: list[int] = []
        self.batch_epochs: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batch_epochs.append(self.sampler.epoch)
        if self.stop is not None and trainer.global_step >= self.stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append(trainer.global_step)


def _plain_fit(folder: Path, callbacks: list[pl.Callback], stop: int | None = None,
               ckpt_path: Path | None = None) -> EpochLog:
    data = make_data(40)
    sampler = EpochShuffle(data, seed=0)  # the epoch Lightning hands to set_epoch
    log = EpochLog(sampler, stop)
    trainer = pl.Trainer(max_steps=50, max_epochs=-1, accelerator="cpu", default_root_dir=folder, logger=False,
                         callbacks=[log, *callbacks], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyNet(), DataLoader(data, batch_size=4, sampler=sampler), ckpt_path=ckpt_path)
    return log


@pytest.mark.parametrize("fix", [True, False], ids=["ResumeBetweenEpochs", "Lightning alone"])
def test_a_step_counted_run_resumes_at_the_next_epoch_only_with_the_fix(tmp_path: Path, fix: bool) -> None:
    """Lightning 2.6 alone closes an epoch after one batch when a max_steps run resumes from an end-of-epoch
    checkpoint. The "Lightning alone" case shows that the fix is still needed: if it fails after an upgrade,
    Lightning has mended this and ResumeBetweenEpochs can go."""
    straight = _plain_fit(tmp_path / "straight", [])
    _plain_fit(tmp_path / "stopped", [], stop=30)
    (checkpoint,) = (tmp_path / "stopped").rglob("epoch=2-step=30.ckpt")
    resumed = _plain_fit(tmp_path / "resumed", [ResumeBetweenEpochs()] if fix else [], ckpt_path=checkpoint)
    matches = resumed.epoch_ends == [40, 50] and resumed.batch_epochs == straight.batch_epochs[30:]
    assert straight.epoch_ends == [10, 20, 30, 40, 50]
    assert matches == fix, (resumed.epoch_ends, resumed.batch_epochs)


class TrainingOrderData(pl.LightningDataModule):
    """TinyNet's data through the command's training order: its training loader (position in checkpoints) or a
    plain DataLoader over the same sampler."""

    def __init__(self, num_workers: int, stateful: bool = True) -> None:
        super().__init__()
        self.data, self.num_workers, self.stateful = make_data(40), num_workers, stateful

    def train_dataloader(self) -> DataLoader:
        options = {"batch_size": 4, "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.stateful:
            return TrainingLoader(self.data, self.trainer, **options)
        return DataLoader(self.data, sampler=training_order(self.data, self.trainer), **options)


class BatchLog(pl.Callback):
    def __init__(self, stop: int | None = None) -> None:
        self.batches: list[torch.Tensor] = []
        self.stop = stop

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch[0].clone())
        if self.stop is not None and trainer.global_step >= self.stop:
            trainer.should_stop = True


def _fit_in_order(folder: Path, num_workers: int, every: int, stop: int | None = None, ckpt_path: Path | None = None,
                  stateful: bool = True) -> BatchLog:
    """50 steps of 10-batch epochs, a checkpoint every ``every`` steps; stops after ``stop`` steps."""
    log = BatchLog(stop)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_top_k=-1)
    trainer = pl.Trainer(max_steps=50, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         callbacks=[log, ResumeBetweenEpochs(), checkpoints], enable_model_summary=False)
    trainer.fit(TinyNet(), datamodule=TrainingOrderData(num_workers, stateful), ckpt_path=ckpt_path)
    return log


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process loading", "2 loader workers"])
@pytest.mark.parametrize(("every", "stop", "name"), [
    (10, 30, "epoch=2-step=30.ckpt"),  # after an epoch's last batch, before the epoch ends
    (7, 14, "epoch=1-step=14.ckpt"),  # in the middle of an epoch
    (7, 28, "epoch=2-step=28.ckpt"),
], ids=["after the last batch", "mid-epoch 1", "mid-epoch 2"])
def test_a_resumed_run_takes_up_the_uninterrupted_runs_batches(tmp_path: Path, num_workers: int, every: int,
                                                               stop: int, name: str) -> None:
    """With loader workers, Lightning draws the resumed run's first indices before it counts a finished epoch;
    in the middle of an epoch, the training loader's position in the checkpoint skips the batches done."""
    straight = _fit_in_order(tmp_path / "straight", num_workers, every)
    _fit_in_order(tmp_path / "stopped", num_workers, every, stop=stop)
    resumed = _fit_in_order(tmp_path / "resumed", num_workers, every, ckpt_path=tmp_path / "stopped" / name)
    assert len(resumed.batches) == 50 - stop
    for step, (a, b) in enumerate(zip(straight.batches[stop:], resumed.batches), start=stop):
        assert torch.equal(a, b), f"step {step}: another batch"


def test_a_plain_loader_restarts_the_epochs_order_in_the_middle_of_an_epoch(tmp_path: Path) -> None:
    """Lightning alone replays an interrupted epoch's order from its start: what TrainingLoader's position
    mends. If this fails after an upgrade, Lightning resumes plain loaders exactly and the position can go."""
    straight = _fit_in_order(tmp_path / "straight", 0, 7, stateful=False)
    _fit_in_order(tmp_path / "stopped", 0, 7, stop=14, stateful=False)
    with pytest.warns(UserWarning, match="dataloader is not resumable"):
        resumed = _fit_in_order(tmp_path / "resumed", 0, 7, ckpt_path=tmp_path / "stopped" / "epoch=1-step=14.ckpt",
                                stateful=False)
    assert not torch.equal(resumed.batches[0], straight.batches[14])
