"""Surviving preemption, as a cluster does it to the command, with the default config counted in epochs as users run
it: a SLURM job warned with SIGUSR1 in the middle of epoch 0 and again in the middle of epoch 1, requeued and killed
each time, then started again by the same command; the same with max_steps set on top of max_epochs; two torchrun
processes, one killed with SIGKILL in the middle of an epoch and the group restarted; a checkpoint killed while
being written. Each ends where the uninterrupted run ends: the same masks and parameters, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from fake_datasets import write_fashion_mnist
from process_probe import load_records, probe_config

from lightning_rigl.cli import DEFAULT_CONFIG, relaunch_identity
from lightning_rigl.report import collect, logged_series
from lightning_rigl.results import read_results

TESTS = Path(__file__).resolve().parent
COMMAND = str(Path(sys.executable).with_name("lightning-rigl"))
RIGL = {"class_path": "lightning_rigl.RigL",
        "init_args": {"sparsity": 0.9, "update_interval": 4, "drop_fraction": 0.3, "stop_at": 0.75}}
RUN_NAME = "preempted"
EPOCHS = ["--trainer.max_epochs", "3"]  # the default config's unit: 30 steps of 10-step epochs
EPOCHS_AND_STEPS = ["--trainer.max_epochs", "10", "--trainer.max_steps", "30"]  # the same 30 steps, and schedule


def _arguments(workdir: Path, data: Path, batch_size: int, configs: list[Path], counted: list[str] = EPOCHS,
               ) -> list[str]:
    return ["fit", "--config", str(DEFAULT_CONFIG), *[a for c in configs for a in ("--config", str(c))],
            "--data.data_dir", str(data), "--data.val_size", "16", "--data.batch_size", str(batch_size),
            *counted, "--trainer.accelerator", "cpu",
            "--trainer.logger.init_args.save_dir", str(workdir / "runs"),
            "--trainer.logger.init_args.name", RUN_NAME, "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def _environment(**variables: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    return {**env, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **variables}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fashion")
    write_fashion_mnist(folder, n_train=176, n_test=8)  # 160 training images after the 16 held out
    return folder


# ------------------------------------------------------------------------------------------------- SLURM


def _slurm(job: str, scontrol_log: Path) -> dict[str, str]:
    """What SLURM sets for one task of a batch job, and a stand-in ``scontrol`` first on PATH that records its
    arguments."""
    bin_dir = scontrol_log.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {scontrol_log}\n")
    scontrol.chmod(0o755)
    return {"SLURM_JOB_ID": job, "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _slurm_job(workdir: Path, data: Path, job: str, records: str, counted: list[str] = EPOCHS,
               **probe: int) -> subprocess.CompletedProcess:
    """The command as the job's batch script runs it: 16 images a batch, 10 steps an epoch."""
    workdir.mkdir(exist_ok=True)
    config = probe_config(workdir, workdir / records, [RIGL], **probe)
    env = _environment(**_slurm(job, workdir / "scontrol.log"))
    return subprocess.run([COMMAND, *_arguments(workdir, data, 16, [config], counted)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


def _requeued_job(workdir: Path, data: Path, job: str, signals: list[tuple[int, int]],
                  counted: list[str] = EPOCHS) -> None:
    """A job warned (SIGUSR1 as the batch of the first step of each pair starts) and killed (SIGKILL at the second)
    once per pair, each time started again by the same command, which at last runs to the end."""
    for start, (signal_at, kill_at) in enumerate(signals):
        preempted = _slurm_job(workdir, data, job, f"start{start}", counted, signal_at_step=signal_at,
                               kill_at_step=kill_at)
        assert preempted.returncode == -signal.SIGKILL, preempted.stderr[-3000:]
    last = _slurm_job(workdir, data, job, "last", counted)
    assert last.returncode == 0, last.stderr[-3000:]


@pytest.fixture(scope="module")
def slurm_runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slurm")
    straight = _slurm_job(root / "straight", data, "101", "records")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # 10-step epochs: warned at step 5 (epoch 0), checkpoint at 6, killed at 8; started again from step 6, warned
    # at step 13 (epoch 1), checkpoint at 14, killed at 16; started again from step 14, to the end.
    _requeued_job(root / "requeued", data, "202", [(5, 8), (13, 16)])
    _requeued_job(root / "steps on top", data, "303", [(13, 16)], EPOCHS_AND_STEPS)
    return {"straight": root / "straight", "requeued": root / "requeued", "steps on top": root / "steps on top"}


def test_the_signal_saves_between_two_steps_into_the_run_folder_and_requeues(slurm_runs: dict[str, Path]) -> None:
    folder = slurm_runs["requeued"] / "runs" / RUN_NAME / "slurm_202"
    assert (slurm_runs["requeued"] / "scontrol.log").read_text() == "requeue 202\n" * 2
    checkpoints = sorted(folder.glob("hpc_ckpt_*.ckpt"))
    assert [checkpoint.name for checkpoint in checkpoints] == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    # At the end of the warned step's batch: a whole step, never half of one.
    steps = [torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"] for checkpoint in checkpoints]
    assert steps == [6, 14]
    assert not list(folder.glob(".partial-*"))


@pytest.mark.parametrize("job", ["requeued", "steps on top"])
def test_the_requeued_job_resumes_by_itself_and_ends_where_the_uninterrupted_one_does(
    slurm_runs: dict[str, Path], job: str,
) -> None:
    """The last start resumed from the checkpoint of step 14, which the start before it (for "requeued", itself
    resumed in the middle of epoch 0) saved in the middle of epoch 1. The run counted in epochs and steps equals
    the one counted in epochs alone: the same 30 steps, the same schedule."""
    (straight,) = load_records(slurm_runs["straight"] / "records")
    (resumed,) = load_records(slurm_runs[job] / "last")
    assert resumed["checkpoint_io"] == "AtomicCheckpointIO"
    assert resumed["batch_digests"] == straight["batch_digests"][14:]
    assert resumed["mask_digests"] == straight["mask_digests"][14:]
    assert resumed["param_digests"] == straight["param_digests"][14:]
    for name, param in straight["params"].items():
        assert torch.equal(param, resumed["params"][name]), name
    folders = {run: next((slurm_runs[run] / "runs" / RUN_NAME).glob("slurm_*")) for run in ("straight", job)}
    # The test after fit tests the final weights, not those of the requeue checkpoint in the run folder.
    assert read_results(folders[job])["test"] == read_results(folders["straight"])["test"]
    # The logs of the job's starts, read as the report reads them, end as the uninterrupted run's do.
    logged = {run: logged_series(folder / "metrics.csv", "") for run, folder in folders.items()}
    assert logged[job].keys() == logged["straight"].keys()
    for metric, points in logged["straight"].items():
        requeued = dict(logged[job][metric])
        assert requeued.items() >= dict(points).items(), metric  # every point, with its value
        assert set(requeued) - {step for step, _ in points} <= {6, 14}, metric  # and fit start's logs on resuming
        assert logged[job][metric][-1] == points[-1], metric


def test_the_report_counts_the_requeued_job_as_one_finished_run(slurm_runs: dict[str, Path]) -> None:
    report = collect([slurm_runs["requeued"] / "runs"])
    assert not report.skipped
    (row,) = report.rows
    assert [run.folder.name for run in row.runs] == ["slurm_202"]


# ---------------------------------------------------------------------------------------------- torchrun


def _torchrun(workdir: Path, data: Path, **probe: int) -> list[dict]:
    """``torchrun --standalone --nproc_per_node 2 --max-restarts 1`` running the command with a checkpoint every
    6 steps and ``--ckpt_path last``: 8 images a batch per process, 10 steps an epoch."""
    workdir.mkdir()
    every_6 = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
               "init_args": {"every_n_train_steps": 6, "save_last": True, "save_top_k": -1}}
    config = probe_config(workdir, workdir / "records", [every_6, RIGL], **probe)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
               "2", "--max-restarts", "1", COMMAND, *_arguments(workdir, data, 8, [config]),
               "--trainer.strategy", "ddp", "--trainer.devices", "2", "--ckpt_path", "last"]
    finished = subprocess.run(command, cwd=workdir, env=_environment(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-4000:]
    return load_records(workdir / "records", 2)


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("torchrun")
    # Rank 1 dies at step 15 (epoch 1); the last checkpoint is step 12's, in the middle of that epoch.
    return {"straight": _torchrun(root / "straight", data), "restarted": _torchrun(root / "restarted", data,
                                                                                      kill_at_step=15, kill_rank=1)}


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint_and_ends_where_the_uninterrupted_run_does(
    torchrun_runs: dict[str, list[dict]],
) -> None:
    for straight, restarted in zip(torchrun_runs["straight"], torchrun_runs["restarted"]):
        assert restarted["mask_digests"] == straight["mask_digests"][12:]
        assert restarted["param_digests"] == straight["param_digests"][12:]
        for name, param in straight["params"].items():
            assert torch.equal(param, restarted["params"][name]), name
    assert torchrun_runs["restarted"][0]["mask_digests"] == torchrun_runs["restarted"][1]["mask_digests"]


# ------------------------------------------------------------------------------------------- checkpoints


def test_a_kill_while_saving_leaves_the_previous_checkpoint_for_the_restart(tmp_path: Path) -> None:
    """A process killed in the middle of writing hpc_ckpt_2.ckpt: Lightning's resume finds hpc_ckpt_1.ckpt,
    whole, and the half-written file under a name that neither SLURM's resume nor ``last`` picks up."""
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        import lightning_rigl.resume as resume
        from lightning_rigl import AtomicCheckpointIO

        folder = {str(tmp_path)!r}
        AtomicCheckpointIO().save_checkpoint({{"step": 1}}, os.path.join(folder, "hpc_ckpt_1.ckpt"))
        real_save = torch.save

        def killed_halfway(obj, file):
            file.write(b"half a checkpoint")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        resume.torch.save = killed_halfway
        AtomicCheckpointIO().save_checkpoint({{"step": 2, "weights": torch.zeros(1000)}},
                                             os.path.join(folder, "hpc_ckpt_2.ckpt"))
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["hpc_ckpt_1.ckpt"]
    (partial,) = tmp_path.glob(".partial-*")
    assert "hpc_ckpt" not in partial.name and "last" not in partial.name and partial.suffix != ".ckpt"
    from pytorch_lightning import Trainer

    trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    assert Path(trainer._checkpoint_connector._hpc_resume_path).name == "hpc_ckpt_1.ckpt"
    assert torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True) == {"step": 1}


@pytest.mark.parametrize(("environ", "identity"), [
    ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train"}, "slurm_4242"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "3"},
     "slurm_4200_3"),
    ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4244", "SLURM_JOB_NAME": "interactive"}, None),  # salloc, then by hand
    ({"TORCHELASTIC_RUN_ID": "c0ffee"}, "torchrun_c0ffee"),
    ({"TORCHELASTIC_RUN_ID": "none"}, None),  # static rendezvous without --rdzv-id: nothing names the job
    ({}, None),
])
def test_a_restarted_job_keeps_its_run_folder(environ: dict[str, str], identity: str | None) -> None:
    assert relaunch_identity(environ) == identity



def test_the_requeue_checkpoint_waits_for_the_end_of_an_accumulated_step(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 micro-batches a step, SIGUSR1 as the first micro-batch of step 3 starts: the checkpoint is saved
    after the second, when step 3 is whole (Lightning's checkpoints hold no accumulated gradient)."""
    import pytorch_lightning as pl
    from conftest import TinyNet, make_data
    from torch.utils.data import DataLoader

    from lightning_rigl import RequeueAtStepEnd

    for key, value in _slurm("77", tmp_path / "scontrol.log").items():
        monkeypatch.setenv(key, value)

    class SignalAtBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 4:
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         accumulate_grad_batches=2, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[SignalAtBatch(), RequeueAtStepEnd()])
    trainer.fit(TinyNet(), DataLoader(make_data(80), batch_size=4))
    state = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 6
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"


def test_the_requeue_checkpoint_waits_past_an_epochs_last_batch(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGUSR1 as the last batch of an epoch (5 batches) starts: the checkpoint is saved after the next step, the
    first of the next epoch (a run resumed from an epoch's last batch would skip the epoch's end)."""
    import pytorch_lightning as pl
    from conftest import TinyNet, make_data
    from torch.utils.data import DataLoader

    from lightning_rigl import RequeueAtStepEnd

    for key, value in _slurm("78", tmp_path / "scontrol.log").items():
        monkeypatch.setenv(key, value)

    class SignalAtBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGUSR1)

    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[SignalAtBatch(), RequeueAtStepEnd()])
    trainer.fit(TinyNet(), DataLoader(make_data(20), batch_size=4))
    state = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6 and state["epoch"] == 1


def test_a_job_refuses_to_train_again_into_its_finished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, data: Path) -> None:
    from lightning_rigl.cli import main

    for key, value in _slurm("88", tmp_path / "scontrol.log").items():
        monkeypatch.setenv(key, value)
    finished = tmp_path / "runs" / RUN_NAME / "slurm_88"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_status:
        main(_arguments(tmp_path, data, 16, []))
    assert exit_status.value.code == 2
    assert "holds a finished run of this job already" in capsys.readouterr().err
