"""A resumed run goes on as the uninterrupted one did: through the command (the default config, and the CIFAR-10
recipe with its augmentation and dropout, mid-epoch, with loader workers and with two DDP processes; two torchrun
nodes in test_torchrun.py, preemption in test_preemption.py), and with a plain Trainer for every way a run is
counted (max_epochs, max_steps, both, neither) from checkpoints in the middle of an epoch, after its last batch and
after its end. Also the training order itself (EpochShuffle) and the pieces of ExactResume."""

from __future__ import annotations

import copy
import csv
import os
import random
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, make_data, run_processes
from fake_datasets import allow_fake_cifar, write_cifar10, write_fashion_mnist
from process_probe import load_records, probe_config
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_rigl import ExactResume
from lightning_rigl.cli import DEFAULT_CONFIG, main
from lightning_rigl.data import ExampleKey, Transformed
from lightning_rigl.data.order import EpochShuffle, TrainingLoader, training_order
from lightning_rigl.errors import ConfigError
from lightning_rigl.resume import _finish_saved_epoch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
STOP = 10  # 10 steps per epoch: 160 training images, batch 16
RIGL = {"class_path": "lightning_rigl.RigL",
        "init_args": {"sparsity": 0.9, "update_interval": 4, "drop_fraction": 0.3, "stop_at": 0.75}}
QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false", "--test_after_fit", "false"]


def _fit(workdir: Path, data: Path, num_workers: int, stop_after_step: int | None = None,
         ckpt_path: Path | None = None) -> dict:
    """The default config, counted in epochs (3 of 10 steps)."""
    workdir.mkdir()
    records = workdir / "records"
    args = ["fit", "--config", str(DEFAULT_CONFIG), "--config", str(probe_config(workdir, records, [RIGL],
                                                                                   stop_after_step)),
            "--data.data_dir", str(data), "--data.val_size", "16", "--data.batch_size", "16",
            "--data.num_workers", str(num_workers), "--trainer.max_epochs", "3",
            "--trainer.default_root_dir", str(workdir), "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            *QUIET]
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


# ------------------------------------------------------------------------ the CIFAR-10 recipe, as users run it

CIFAR_RECIPE = REPO / "recipes" / "cifar10_wrn22_2" / "rigl_erk_s90.yaml"
CIFAR_STEPS, CIFAR_RESUME = 24, 14  # 12 steps an epoch (184 training images, 16 a step): step 14 is mid-epoch 1


def _cifar_arguments(workdir: Path, data: Path, num_workers: int, batch_size: int,
                     ckpt_path: Path | None) -> list[str]:
    """The recipe as written (its random crop and flip, WRN-22-2's dropout of 0.3 in every block, SGD, RigL ERK), a
    quarter as wide, on a small CIFAR-10 folder; a checkpoint every 7 steps. Only RigL's cadence is shortened, so
    that masks change on both sides of the resume."""
    every_7 = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
               "init_args": {"dirpath": str(workdir / "checkpoints"), "filename": "{step}",
                             "every_n_train_steps": 7, "save_top_k": -1}}
    rigl = {"class_path": "lightning_rigl.RigL",
            "init_args": {**RIGL["init_args"], "distribution": "erk", "stop_at": 1.0}}  # updates at 4, 8, ..., 20
    args = ["fit", "--config", str(CIFAR_RECIPE), "--config", str(probe_config(workdir, workdir / "records",
                                                                                 [every_7, rigl])),
            "--data.data_dir", str(data), "--data.download", "false", "--data.val_size", "16",
            "--data.batch_size", str(batch_size), "--data.num_workers", str(num_workers),
            "--model.width", "0.25",
            "--trainer.max_steps", str(CIFAR_STEPS), "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            *QUIET]
    return args + (["--ckpt_path", str(ckpt_path)] if ckpt_path is not None else [])


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cifar10")
    write_cifar10(folder, n_per_batch=40, n_test=4)  # 200 training images, 16 held out
    return folder


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory: pytest.TempPathFactory, cifar_folder: Path) -> dict[str, dict]:
    """The recipe straight with 0 and with 2 loader workers, and resumed (2 workers) from the middle of epoch 1."""
    root = tmp_path_factory.mktemp("cifar_runs")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        allow_fake_cifar(patch)
        for name, workers, resume_from in (("0 workers", 0, None), ("2 workers", 2, None),
                                           ("resumed", 2, root / "2 workers" / "checkpoints")):
            workdir = root / name
            workdir.mkdir()
            ckpt = None if resume_from is None else resume_from / f"step={CIFAR_RESUME}.ckpt"
            main(_cifar_arguments(workdir, cifar_folder, workers, 16, ckpt))
            (runs[name],) = load_records(workdir / "records")
    return runs


def test_the_cifar_recipe_resumed_in_the_middle_of_an_epoch_ends_where_the_uninterrupted_run_does(
    cifar_runs: dict[str, dict],
) -> None:
    straight, resumed = cifar_runs["2 workers"], cifar_runs["resumed"]
    assert resumed["batch_digests"] == straight["batch_digests"][CIFAR_RESUME:]  # the same augmented images
    assert resumed["mask_digests"] == straight["mask_digests"][CIFAR_RESUME:]
    assert resumed["param_digests"] == straight["param_digests"][CIFAR_RESUME:]  # the same dropout too
    for name, param in straight["params"].items():
        assert torch.equal(param, resumed["params"][name]), name
    assert len({digest for _, digest in straight["mask_digests"][:CIFAR_RESUME]}) > 1
    assert len({digest for _, digest in resumed["mask_digests"]}) > 1, "no mask update after the resume"


def test_the_cifar_recipe_augments_the_same_with_and_without_loader_workers(cifar_runs: dict[str, dict]) -> None:
    alone, workers = cifar_runs["0 workers"], cifar_runs["2 workers"]
    assert alone["batch_digests"] == workers["batch_digests"]
    assert len({digest for _, digest in alone["batch_digests"]}) == CIFAR_STEPS
    for name, param in alone["params"].items():
        assert torch.equal(param, workers["params"][name]), name


def test_the_cifar_recipe_resumes_on_two_ddp_processes_in_the_middle_of_an_epoch(
    tmp_path: Path, cifar_folder: Path,
) -> None:
    """Two processes of 8 images a step (the single process's global batch); Lightning starts the second with the
    first's command line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    records = []
    for name, ckpt in (("straight", None), ("resumed", tmp_path / "straight" / "checkpoints" /
                                                       f"step={CIFAR_RESUME}.ckpt")):
        workdir = tmp_path / name
        workdir.mkdir()
        command = [sys.executable, str(TESTS / "cifar_command.py"),
                   *_cifar_arguments(workdir, cifar_folder, 0, 8, ckpt), "--trainer.strategy", "ddp",
                   "--trainer.devices", "2"]
        finished = run_processes(command, workdir, env=env)
        assert finished.returncode == 0, finished.stderr[-3000:]
        records.append(load_records(workdir / "records", 2))
    for straight, resumed in zip(*records):
        assert resumed["batch_digests"] == straight["batch_digests"][CIFAR_RESUME:]
        assert resumed["param_digests"] == straight["param_digests"][CIFAR_RESUME:]
        assert resumed["mask_digests"] == straight["mask_digests"][CIFAR_RESUME:]
    assert records[1][0]["batch_digests"] != records[1][1]["batch_digests"]  # each process its share


# ------------------------------------------------------------------------------------ the training order


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
    keyed = EpochShuffle(data, seed=3, epoch_of=lambda: 0, keys=True)
    assert _orders(keyed) == [ExampleKey(index, 0, 3) for index in first]


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


def test_the_position_applies_to_every_iteration_of_its_epoch_and_to_no_other() -> None:
    """ExactResume makes the restored epoch's iterator again at train start: the skip must hold for it too."""
    epoch = 1
    sampler = EpochShuffle(TensorDataset(torch.arange(10)), seed=0, epoch_of=lambda: epoch)
    whole = _orders(sampler)
    sampler.resume_at(1, 4)
    assert _orders(sampler) == _orders(sampler) == whole[4:]
    epoch = 2
    assert len(_orders(sampler)) == 10
    epoch = 1
    assert _orders(sampler) == whole


# ------------------------------------------------------------------- every way a run is counted, one process


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


@pytest.mark.parametrize(("what", "checkpoint"), [
    ("saved at validation end", _checkpoint((3, 3, 2, 2), 10, True)),
    ("saved mid-epoch", _checkpoint((3, 3, 2, 2), 4, False)),
    ("without loop state", {"state_dict": {}}),
])
def test_other_checkpoints_are_left_as_they_are(what: str, checkpoint: dict) -> None:
    before = copy.deepcopy(checkpoint)
    assert not _finish_saved_epoch(checkpoint)
    assert checkpoint == before, what


def test_an_end_of_epoch_checkpoint_of_a_step_counted_run_becomes_a_finished_epoch() -> None:
    checkpoint = _checkpoint((3, 3, 3, 2), 10, True)
    assert _finish_saved_epoch(checkpoint)
    fit_loop = checkpoint["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"] == dict.fromkeys(("ready", "started", "processed", "completed"), 3)
    assert fit_loop["epoch_loop.batch_progress"]["current"] == dict.fromkeys(
        ("ready", "started", "processed", "completed"), 0)
    assert fit_loop["epoch_loop.batch_progress"]["total"]["completed"] == 10  # the run's batch count stays


class DropoutNet(TinyNet):
    """TinyNet with dropout in its classifier, a learning-rate schedule over ``trainer.estimated_stepping_batches``
    (as the command's cosine schedule and the sparse callbacks ask for it: Lightning then makes the training loader
    before it restores a checkpoint when the run sets max_epochs), and a validation step that draws from the global
    random state between training steps, as a loader's workers or an evaluation may."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier.insert(3, nn.Dropout(0.5))

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        torch.rand(3), random.random(), np.random.rand()

    def configure_optimizers(self) -> dict:
        optimizer = super().configure_optimizers()
        steps = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (steps + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class TrainingOrderData(pl.LightningDataModule):
    """TinyNet's data through the command's training order (10 batches of 4 an epoch), with a validation set: its
    training loader (position in checkpoints) or a plain DataLoader over the same sampler."""

    def __init__(self, num_workers: int, stateful: bool = True) -> None:
        super().__init__()
        self.data, self.num_workers, self.stateful = make_data(40), num_workers, stateful

    def train_dataloader(self) -> DataLoader:
        options = {"batch_size": 4, "num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        if self.stateful:
            return TrainingLoader(self.data, self.trainer, **options)
        return DataLoader(self.data, sampler=training_order(self.data, self.trainer), **options)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_data(8, seed=1), batch_size=4)


class RunLog(pl.Callback):
    """Each batch trained on, the step each epoch ended at, the final parameters; stops after ``stop`` steps."""

    def __init__(self, stop: int = 30) -> None:
        self.stop = stop
        self.batches: list[torch.Tensor] = []
        self.epoch_ends: list[int] = []
        self.params: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches.append(batch[0].clone())
        if trainer.global_step >= self.stop:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_ends.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


class SaveAtStep(pl.Callback):
    """Saves ``path`` at the end of step ``step``'s batch, before the callbacks listed after it run their
    batch-end hooks (as a user's callback may; Lightning runs ModelCheckpoint after all others)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


COUNTED = {  # 30 steps in all, 10 an epoch
    "max_epochs": {"max_epochs": 3},
    "max_steps": {"max_steps": 30, "max_epochs": -1},
    "both": {"max_epochs": 10, "max_steps": 30},
    "neither": {},  # Lightning's defaults (1000 epochs): RunLog stops the run
}
RESUMED_FROM = {  # checkpoint: the step it holds
    "mid-epoch": 14,
    "after the last batch": 20,  # ModelCheckpoint(every_n_train_steps) at the epoch's last batch, before its end
    "after the epoch's end": 20,  # ModelCheckpoint at on_train_epoch_end, after validation
}
CHAINED_FROM = 24  # a resumed run's own checkpoint, in the middle of the epoch after


def _fit_counted(folder: Path, counted: str, num_workers: int, ckpt_path: Path | None = None,
                 exact: bool = True) -> RunLog:
    """Without seed_everything: a resumed run's process starts from another torch seed (1, not 0), so only the
    checkpoint's seed gives it the uninterrupted run's draws."""
    log = RunLog()
    checkpoints = [SaveAtStep(RESUMED_FROM["mid-epoch"], folder / "mid-epoch.ckpt"),
                   SaveAtStep(CHAINED_FROM, folder / "chained.ckpt"),
                   pl.callbacks.ModelCheckpoint(dirpath=folder / "after the last batch", filename="{step}",
                                                every_n_train_steps=10, save_top_k=-1),
                   pl.callbacks.ModelCheckpoint(dirpath=folder / "after the epoch's end", filename="{step}",
                                                every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)]
    callbacks = [log, *checkpoints[:2], *([ExactResume()] if exact else []), *checkpoints[2:]]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, **COUNTED[counted])
    torch.manual_seed(0 if ckpt_path is None else 1)
    trainer.fit(DropoutNet(), datamodule=TrainingOrderData(num_workers), ckpt_path=ckpt_path)
    return log


def _saved(folder: Path, where: str) -> Path:
    return folder / "mid-epoch.ckpt" if where == "mid-epoch" else folder / where / f"step={RESUMED_FROM[where]}.ckpt"


@pytest.mark.parametrize(("counted", "num_workers"), [
    ("max_epochs", 0), ("max_epochs", 2), ("max_steps", 0), ("both", 0), ("both", 2), ("neither", 0),
])
def test_a_run_resumed_from_any_checkpoint_goes_on_as_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted: str, num_workers: int,
) -> None:
    """The same batches, the same dropout, epochs ending at the same steps, the same final weights."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # as a Trainer without seed_everything
    straight = _fit_counted(tmp_path / "straight", counted, num_workers)
    assert straight.epoch_ends == [10, 20, 30]
    for where, step in RESUMED_FROM.items():
        resumed = _fit_counted(tmp_path / where, counted, num_workers, ckpt_path=_saved(tmp_path / "straight", where))
        # Resumed again, from the checkpoint the resumed run saved in the next epoch.
        chained = _fit_counted(tmp_path / f"{where}, again", counted, num_workers,
                               ckpt_path=tmp_path / where / "chained.ckpt")
        for run, first in ((resumed, step), (chained, CHAINED_FROM)):
            assert len(run.batches) == 30 - first, where
            for at, (a, b) in enumerate(zip(straight.batches[first:], run.batches), start=first):
                assert torch.equal(a, b), f"{where} (from step {first}): step {at} trained on another batch"
            # A checkpoint after an epoch's last batch skips that epoch's end (README, "Not covered").
            assert run.epoch_ends == [end for end in straight.epoch_ends if end > first], where
            for name, param in straight.params.items():
                assert torch.equal(param, run.params[name]), f"{where} (from step {first}): {name}"


def test_lightning_alone_restarts_an_epoch_counted_runs_epoch_when_resumed_in_its_middle(tmp_path: Path) -> None:
    """What ExactResume mends: with max_epochs set, estimated_stepping_batches makes the training iterator before
    the checkpoint is restored, and Lightning keeps that iterator (epoch 0's order from its start). If this fails
    after an upgrade, Lightning has mended it, and ExactResume's iterator can go."""
    straight = _fit_counted(tmp_path / "straight", "max_epochs", 0, exact=False)
    resumed = _fit_counted(tmp_path / "resumed", "max_epochs", 0, exact=False,
                           ckpt_path=_saved(tmp_path / "straight", "mid-epoch"))
    assert not torch.equal(resumed.batches[0], straight.batches[RESUMED_FROM["mid-epoch"]])


def _plain_fit(folder: Path, callbacks: list[pl.Callback], stop: int | None = None,
               ckpt_path: Path | None = None) -> list[int]:
    """The steps at which the epochs of a step-counted run (50 steps of 10-batch epochs) end."""
    log = RunLog(stop=stop or 50)
    trainer = pl.Trainer(max_steps=50, max_epochs=-1, accelerator="cpu", default_root_dir=folder, logger=False,
                         callbacks=[log, *callbacks], enable_progress_bar=False, enable_model_summary=False)
    data = make_data(40)
    trainer.fit(TinyNet(), DataLoader(data, batch_size=4, sampler=EpochShuffle(data, seed=0)), ckpt_path=ckpt_path)
    return log.epoch_ends


def test_lightning_alone_closes_an_epoch_early_when_a_step_counted_run_resumes_at_an_epochs_end(
    tmp_path: Path,
) -> None:
    """What ExactResume's finished epoch mends (its case in the test above): if this fails after an upgrade,
    Lightning has mended it, and _finish_saved_epoch can go."""
    assert _plain_fit(tmp_path / "straight", []) == [10, 20, 30, 40, 50]
    _plain_fit(tmp_path / "stopped", [], stop=30)
    (checkpoint,) = (tmp_path / "stopped").rglob("epoch=2-step=30.ckpt")
    assert _plain_fit(tmp_path / "resumed", [], ckpt_path=checkpoint) != [40, 50]


def test_a_plain_loader_restarts_the_epochs_order_in_the_middle_of_an_epoch(tmp_path: Path) -> None:
    """Lightning alone replays an interrupted epoch's order from its start: what TrainingLoader's position
    mends. If this fails after an upgrade, Lightning resumes plain loaders exactly and the position can go."""
    def fit(folder: Path, ckpt_path: Path | None = None) -> RunLog:
        log = RunLog(stop=50)
        trainer = pl.Trainer(max_steps=50, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False,
                             callbacks=[log, ExactResume(), SaveAtStep(14, folder / "14.ckpt")])
        trainer.fit(TinyNet(), datamodule=TrainingOrderData(0, stateful=False), ckpt_path=ckpt_path)
        return log

    straight = fit(tmp_path / "straight")
    with pytest.warns(UserWarning, match="dataloader is not resumable"):
        resumed = fit(tmp_path / "resumed", ckpt_path=tmp_path / "straight" / "14.ckpt")
    assert not torch.equal(resumed.batches[0], straight.batches[14])


# ---------------------------------------------------------------------------------------------- the seed


def test_each_training_batch_draws_from_its_own_stream_on_each_process() -> None:
    """What a batch draws is a function of (seed, epoch, batch, rank) alone: equal keys draw equal numbers
    whatever drew before, and any other key draws others."""
    resume = ExactResume()
    resume.seed = 7

    def draws(epoch: int, batch: int, rank: int) -> tuple[float, float, float]:
        trainer = SimpleNamespace(current_epoch=epoch, global_rank=rank)
        resume.on_train_batch_start(trainer, None, None, batch)
        return torch.rand(()).item(), random.random(), float(np.random.rand())

    first = draws(1, 3, 0)
    torch.rand(5), random.random(), np.random.rand()
    assert draws(1, 3, 0) == first
    for other in ((1, 4, 0), (2, 3, 0), (1, 3, 1)):
        assert all(a != b for a, b in zip(draws(*other), first)), other
    resume.seed = 8
    assert all(a != b for a, b in zip(draws(1, 3, 0), first))


def test_any_seed_keys_the_draws() -> None:
    """A Trainer without seed_everything draws from torch.initial_seed(), which may be any 64-bit number."""
    resume = ExactResume()
    trainer = SimpleNamespace(current_epoch=0, global_rank=0)
    for seed in (0, 2**63, 2**64 - 1):
        resume.seed = seed
        resume.on_train_batch_start(trainer, None, None, 0)


@pytest.mark.parametrize(("processed", "last", "warned"), [(3, False, True), (4, False, False), (3, True, False)])
def test_a_checkpoint_in_the_middle_of_an_accumulated_step_is_named(processed: int, last: bool,
                                                                     warned: bool) -> None:
    """accumulate_grad_batches 2: 3 micro-batches of the epoch done is half a step, unless the epoch's last batch
    closed it (Lightning steps at an epoch's end)."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed), is_last_batch=last)
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), accumulate_grad_batches=2, global_step=1,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ExactResume().on_save_checkpoint(trainer, None, {})
    assert any("middle of an accumulated step (1 of 2" in str(w.message) for w in caught) == warned


def test_a_subset_of_a_dataset_taking_keys_is_refused() -> None:
    dataset = Transformed(TensorDataset(torch.zeros(4, 1), torch.zeros(4)), lambda x: x)
    with pytest.raises(ConfigError, match=r"Transformed\(Subset\(images, indices\), transform\)"):
        training_order(Subset(dataset, [0, 1]), None)
    assert training_order(Transformed(Subset(dataset.dataset, [0, 1]), lambda x: x), None).keys


def test_a_run_resumed_with_another_seed_is_told_what_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    fitting = SimpleNamespace(state=SimpleNamespace(fn="fit"), max_steps=-1)
    with pytest.warns(UserWarning, match="seeded with 3, this one with 4"):
        ExactResume().on_load_checkpoint(fitting, None, {"callbacks": {"ExactResume": {"seed": 3}}})
    testing = SimpleNamespace(state=SimpleNamespace(fn="test"), max_steps=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # validate and test resume nothing
        ExactResume().on_load_checkpoint(testing, None, {"callbacks": {"ExactResume": {"seed": 3}}})
    resume = ExactResume()
    resume.load_state_dict({"seed": 3})
    assert resume.seed == 3  # the checkpoint's draws, still


def test_a_checkpoint_without_the_seed_is_named() -> None:
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), max_steps=-1)
    with pytest.warns(UserWarning, match="holds no seed"):
        ExactResume().on_load_checkpoint(trainer, None, {"callbacks": {}})
