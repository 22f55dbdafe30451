"""The `lightning-rigl` command end to end: default run, recipes' step counts, errors, a two-process DDP run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import run_processes
from fake_datasets import write_fashion_mnist
from pytorch_lightning.cli import LightningArgumentParser

from lightning_rigl import SET, SNFS, SNIP, GradualMagnitudePruning, ImageClassifier, LotteryTicket, RigL, Static
from lightning_rigl.cli import DEFAULT_CONFIG, RigLCLI, main, make_cli, save_density_plots, with_default_config
from lightning_rigl.data import FashionMNISTDataModule

REPO = Path(__file__).resolve().parents[1]
# A small slice: a few steps, one batch of validation and test, nothing written outside tmp_path.
QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu"]


@pytest.fixture
def fashion_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # logs and checkpoints land in tmp_path/runs
    root = tmp_path / "fashion"
    write_fashion_mnist(root, n_train=160, n_test=40)
    return root


def rigl_config(folder: Path, class_path: str = "lightning_rigl.RigL", **init_args: object) -> Path:
    """A config to stack on the default that replaces its RigL callback by ``class_path`` with ``init_args``."""
    path = folder / "rigl.yaml"
    lines = "".join(f"        {key}: {value}\n" for key, value in init_args.items())
    path.write_text(f"trainer:\n  callbacks:\n    - class_path: {class_path}\n      init_args:\n{lines}")
    return path


def test_default_fit_trains_rigl_at_90_percent_and_prints_a_summary(fashion_dir: Path, capsys) -> None:
    frequent_updates = rigl_config(fashion_dir, sparsity=0.9, update_interval=5)
    main(["fit", "--config", str(DEFAULT_CONFIG), "--config", str(frequent_updates),
          "--data.data_dir", str(fashion_dir), "--data.val_size", "32", "--data.batch_size", "16",
          "--trainer.max_epochs", "3", *QUICK])
    out = capsys.readouterr().out
    assert "test accuracy: top1" in out and "top5" in out
    summary = r"RigL: target sparsity 0\.9 \(erk\), achieved 0\.9000 over 3 sparse layers, [1-9]\d* mask updates"
    assert re.search(summary, out), out
    assert re.search(r"costs: training FLOPs 0\.\d\dx dense, inference FLOPs 0\.\d\dx, size 0\.\d{3} MB", out), out
    for name in ("net.features.0.weight", "net.features.2.weight", "net.classifier.weight"):
        assert re.search(rf"{re.escape(name)}\s+\(\d+, \d+\)\s+[01]\.\d{{4}}", out), name
    assert list(Path("runs").glob("*/version_0/metrics.csv")), "the CSV logger wrote no metrics"
    (plot,) = Path("runs").glob("*/version_0/densities.png")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plotted in {plot}" in out


def test_without_matplotlib_the_plot_is_a_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    rigl = RigL(sparsity=0.5)
    rigl.masks = {"fc.weight": torch.tensor([[True, False], [False, True]])}
    rigl.live_counts = {"fc.weight": 2}
    trainer = pl.Trainer(callbacks=[rigl], logger=False)
    save_density_plots(trainer, tmp_path)
    assert "Install matplotlib" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_default_config_is_inserted_without_a_config_or_under_an_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "set.yaml"
    overlay.write_text("trainer:\n  callbacks:\n    - class_path: lightning_rigl.SET\n")
    assert with_default_config(["fit", "--config", str(overlay)]) == [
        "fit", "--config", str(DEFAULT_CONFIG), "--config", str(overlay)]
    recipe = str(REPO / "recipes/cifar10_wrn22_2/rigl_erk_s90.yaml")
    assert with_default_config(["fit", "--config", recipe, "--config", str(overlay)])[2] == recipe
    assert with_default_config(["fit"]) == ["fit", "--config", str(DEFAULT_CONFIG)]
    assert with_default_config(["fit", "--trainer.max_steps", "3"])[1:3] == ["--config", str(DEFAULT_CONFIG)]
    for given in (["fit", "--config", "x.yaml"], ["fit", "-c", "x.yaml"], ["fit", "--config=x.yaml"], ["--help"]):
        assert with_default_config(given) == given


def _parse(*args: str) -> RigLCLI:
    return make_cli(list(args), run=False, save_config_callback=None)


@pytest.mark.parametrize("multiplier", [1, 2, 5])
def test_multiplier_scales_every_step_count_of_a_recipe(multiplier: int) -> None:
    cli = _parse("--config", str(REPO / "recipes/cifar100_resnet50/rigl_erk_s90.yaml"),
                 "--multiplier", str(multiplier), "--data.data_dir", "unused")
    rigl = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RigL))
    assert cli.trainer.max_steps == 88000 * multiplier
    assert list(cli.model.hparams.lr_milestones) == [m * multiplier for m in (21760, 41760, 61760, 81760)]
    assert cli.model.hparams.warmup_steps == 1760 * multiplier
    assert rigl.stop_at == 75000 * multiplier
    assert rigl.update_interval == 100  # ΔT stays, as in the official code


def test_multiplier_scales_the_pruning_schedule_but_not_the_rewind_step() -> None:
    cli = _parse("--config", str(REPO / "recipes/cifar10_wrn22_2/pruning_global_s90.yaml"), "--multiplier", "2",
                 "--data.data_dir", "unused")
    pruning = next(cb for cb in cli.trainer.callbacks if isinstance(cb, GradualMagnitudePruning))
    assert (pruning.start_at, pruning.stop_at, pruning.update_interval) == (1400, 150000, 100)
    assert pruning.rewind_step == 0


def test_a_short_multiplier_keeps_the_first_update_after_delta_t() -> None:
    cli = _parse("--config", str(REPO / "recipes/cifar10_wrn22_2/rigl_erk_s90.yaml"), "--multiplier", "0.5",
                 "--data.data_dir", "unused")
    rigl = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RigL))
    assert rigl.start_at is None and rigl.stop_at == 37500


def test_a_fractional_stop_at_is_left_to_scale_with_the_run() -> None:
    cli = _parse("--config", str(DEFAULT_CONFIG), "--multiplier", "2")
    rigl = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RigL))
    assert rigl.stop_at == 0.75 and cli.trainer.max_epochs == 20


def test_the_data_module_sets_the_number_of_classes() -> None:
    cli = _parse("--config", str(REPO / "recipes/cifar100_resnet50/dense.yaml"), "--data.data_dir", "unused")
    assert cli.model.hparams.num_classes == 100 and cli.model.net.fc.out_features == 100


@pytest.mark.parametrize(
    ("args", "rigl", "message"),
    [
        (["--model.arch", "resnet51"], None, r"Unknown model 'resnet51'.*wrn22_2"),
        (["--multiplier", "0"], None, r"--multiplier must be > 0"),
        (["--scaled_by", "-1"], None, r"--scaled_by must be > 0"),
        (["--data.data_dir", "missing_dir"], None, r"IDX files not found in missing_dir .*--data\.download true"),
        (["--data.batch_size", "0"], None, r"batch_size must be >= 1"),
        (["--model.lr_milestones", "[5, 2]"], None, r"lr_milestones must be increasing"),
        ([], {"sparsity": 0.9, "update_interval": 0}, r"update_interval must be an int >= 1"),
        ([], {"sparsity": 0.9, "dense": '["net.features.0.weight"]'}, r"(?s)infeasible.*net\.features\.0\.weight"),
        ([], {"sparsity": 0.9, "distribution": "global"}, r"only SNIP, GradualMagnitudePruning and a start"),
        ([], {"class_path": "lightning_rigl.LotteryTicket", "checkpoint": "missing.ckpt"}, r"no checkpoint at"),
        ([], {"class_path": "lightning_rigl.SNFS", "sparsity": 0.9, "momentum": 1.5}, r"momentum must be"),
        (["--config", str(REPO / "recipes/imagenet_resnet50/dense.yaml")], None, r"needs --data.data_dir"),
    ],
)
def test_configuration_mistakes_exit_with_a_message_not_a_traceback(
    args: list[str], rigl: dict | None, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    configs = ["--config", str(DEFAULT_CONFIG), "--config", str(rigl_config(tmp_path, **rigl))] if rigl else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--trainer.max_steps", "1", *QUICK, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_the_saved_config_holds_scaled_counts_and_multiplier_1(fashion_dir: Path) -> None:
    """Rerunning the config saved beside the logs trains the same run, not one scaled twice, and still records
    the multiplier its counts carry."""
    main(["fit", "--data.data_dir", str(fashion_dir), "--data.val_size", "0", "--trainer.max_epochs", "1",
          "--trainer.max_steps", "3", "--multiplier", "2", "--test_after_fit", "false", *QUICK])
    (saved,) = Path("runs").glob("*/version_0/config.yaml")
    config = yaml.safe_load(saved.read_text())
    assert config["multiplier"] == 1.0 and config["scaled_by"] == 2.0
    assert config["trainer"]["max_steps"] == 6 and config["trainer"]["max_epochs"] == 2

    main(["fit", "--config", str(saved), "--trainer.logger.init_args.name", "rerun"])
    (rerun,) = Path("runs/rerun").glob("version_0")
    assert yaml.safe_load((rerun / "config.yaml").read_text())["trainer"]["max_steps"] == 6
    assert json.loads((rerun / "results.json").read_text())["multiplier"] == 2.0


def test_a_key_the_recipe_does_not_have_is_refused_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.learning_rate", "0.1"])
    assert exit_info.value.code == 2
    assert "learning_rate" in capsys.readouterr().err


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_process_ddp_run_through_the_command(tmp_path: Path) -> None:
    """`lightning-rigl fit --trainer.strategy ddp --trainer.devices 2` on the CPU (gloo): one summary, from rank 0,
    whose test accuracy (synced over both ranks) equals a single-process test of the saved checkpoint."""
    data = tmp_path / "fashion"
    write_fashion_mnist(data, n_train=128, n_test=40)
    command = [str(Path(sys.executable).with_name("lightning-rigl")), "fit", "--config", str(DEFAULT_CONFIG),
               "--config", str(rigl_config(tmp_path, sparsity=0.9, update_interval=4)), "--data.data_dir", str(data),
               "--data.val_size", "16", "--data.batch_size", "8", "--trainer.max_steps", "12",
               "--trainer.strategy", "ddp",
               "--trainer.devices", "2", *QUICK]
    result = run_processes(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Summary") == 1
    assert "achieved 0.9000" in result.stdout and "2 mask updates" in result.stdout
    ddp_top1 = float(re.search(r"test accuracy: top1 (\d\.\d{4})", result.stdout).group(1))
    (record,) = tmp_path.glob("runs/*/version_0/results.json")  # written once, by rank 0
    assert json.loads(record.read_text())["test"]["test/acc_top1"] == pytest.approx(ddp_top1, abs=1e-4)

    (checkpoint,) = tmp_path.glob("runs/*/version_0/checkpoints/*.ckpt")
    model = ImageClassifier.load_from_checkpoint(checkpoint, weights_only=False)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (single,) = trainer.test(model, datamodule=FashionMNISTDataModule(str(data), batch_size=8), verbose=False)
    assert single["test/acc_top1"] == pytest.approx(ddp_top1, abs=1e-4)
    callbacks = torch.load(checkpoint, weights_only=True)["callbacks"]
    rigl_state = callbacks["lightning_rigl"]
    weights = model.state_dict()
    for name, mask in rigl_state["masks"].items():
        assert bool((weights[name][~mask] == 0).all()), f"{name}: a dead weight is not 0"


def test_without_a_logger_no_plot_is_written(fashion_dir: Path, tmp_path: Path) -> None:
    main(["fit", "--data.data_dir", str(fashion_dir), "--data.val_size", "0", "--trainer.max_steps", "2",
          "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--test_after_fit", "false",
          *QUICK])
    assert not list(tmp_path.rglob("*.png"))


def _refused(args: list[str], capsys) -> str:
    """Runs the command, which must refuse with exit status 2; returns what it wrote to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_failed_download_is_one_line_with_what_to_do_and_leaves_no_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    err = _refused(["fit", "--config", str(REPO / "recipes/cifar10_wrn22_2/rigl_erk_s90.yaml"), "--data.data_dir",
                    str(tmp_path / "data"), "--trainer.max_steps", "5", *QUICK], capsys)
    (line,) = err.strip().splitlines()
    assert re.match(r"lightning-rigl: error: could not download CIFAR10 into .*data \(.*Name or service not known\)\. "
                    r"Without a network, put the extracted cifar-10-batches-py folder", line), line
    assert not list(tmp_path.glob("runs/*/version_*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.max_step", "20"], r"unrecognized arguments: --trainer\.max_step 20"),
        (["--trainer.callbacks.init_args.sparsity", "ninety"],
         r"sparsity \(in --trainer\.callbacks\): 'ninety' is not a valid value; expected float or None\."),
        (["--trainer.max_steps", "abc"], r"trainer\.max_steps: 'abc' is not a valid value; expected int\."),
    ],
    ids=["abbreviation", "callback option type", "trainer option type"],
)
def test_parse_errors_are_one_line_and_abbreviations_are_refused(args: list[str], message: str, capsys) -> None:
    err = _refused(["fit", *args], capsys)
    first, hint = err.strip().splitlines()
    assert re.fullmatch(f"lightning-rigl: error: {message}", first), first
    assert hint == "Run `lightning-rigl fit --help` for the options."


def test_a_refusal_at_setup_leaves_no_run_folder_and_a_named_folder_gets_no_debian_hint(
    fashion_dir: Path, tmp_path: Path, capsys
) -> None:
    err = _refused(["fit", "--data.data_dir", str(fashion_dir), "--data.val_size", "16",
                    "--trainer.callbacks.init_args.dense", '["nope"]', *QUICK], capsys)
    assert "dense pattern 'nope' matches no parameter" in err
    err = _refused(["fit", "--data.data_dir", str(tmp_path / "nonexistent"), *QUICK], capsys)
    assert "Fashion-MNIST IDX files not found" in err and "Debian" not in err
    assert not list(Path("runs").glob("*/version_*")), "an empty run folder was left behind"


def test_predict_is_not_offered(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "test" in out and "predict" not in out


@pytest.mark.parametrize("callback", [RigL, SET, SNFS, Static, SNIP, GradualMagnitudePruning, LotteryTicket],
                         ids=lambda cls: cls.__name__)
def test_help_describes_every_option_of_every_callback(callback: type) -> None:
    """`lightning-rigl fit --trainer.callbacks.help <class>` reads each option's text from the class docstring."""
    parser = LightningArgumentParser()
    parser.add_class_arguments(callback, "callback")
    options = [action for action in parser._actions if action.dest.startswith("callback.")]
    assert len(options) >= 2
    undescribed = [action.dest for action in options if not re.sub(r"\(type:.*", "", action.help or "", flags=re.S)
                   .strip()]
    assert not undescribed, f"{callback.__name__}: no description for {undescribed}"


def test_test_prints_the_sparsity_of_the_checkpoints_masks(fashion_dir: Path, capsys) -> None:
    main(["fit", "--data.data_dir", str(fashion_dir), "--data.val_size", "0", "--trainer.max_steps", "2",
          "--test_after_fit", "false", *QUICK])
    (checkpoint,) = Path("runs").glob("*/version_0/checkpoints/*.ckpt")
    capsys.readouterr()
    main(["test", "--data.data_dir", str(fashion_dir), "--ckpt_path", str(checkpoint), *QUICK])
    out = capsys.readouterr().out
    assert re.search(r"test accuracy: top1 \d\.\d{4}", out)
    assert "checkpoint masks: sparsity 0.9000 over 3 sparse layers" in out
    assert re.search(r"net\.features\.0\.weight\s+\(300, 784\)\s+0\.0796", out), out


def test_the_readme_example_script_runs(tmp_path: Path) -> None:
    """docs/examples/custom_module.py, which the README shows, on a small slice of data in the real format."""
    write_fashion_mnist(tmp_path / "fashion", n_train=64, n_test=16)
    result = subprocess.run([sys.executable, str(REPO / "docs/examples/custom_module.py"), "--data-dir",
                             str(tmp_path / "fashion"), "--max-steps", "3"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("RigL", "SET", "Static"):
        assert re.search(rf"^{method}: test accuracy \d\.\d{{4}}, sparsity 0\.9000", result.stdout, re.M), result.stdout
