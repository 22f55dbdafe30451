"""The `lightning-rigl` command: LightningCLI over the LightningModules (`ImageClassifier` unless a config names
`CausalLM`), the data modules and the sparse callbacks.

    lightning-rigl fit                                   # the default: RigL 90% ERK on Fashion-MNIST
    lightning-rigl fit --config recipes/cifar10_wrn22_2/rigl_erk_s90.yaml [--multiplier 2]
    lightning-rigl test --config <recipe> --ckpt_path <checkpoint>
    lightning-rigl report runs/ [--output report]         # the paper-style table of finished runs
    lightning-rigl export --ckpt_path <checkpoint> --output model.safetensors [--dtype float16]   # the compact file
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from torch import Tensor
from typing_extensions import override

from lightning_rigl import report
from lightning_rigl.callbacks import SparseTraining
from lightning_rigl.callbacks.sparse_training import LAYER_DENSITY, saved_state
from lightning_rigl.checkpoints import is_sharded_checkpoint, read_checkpoint
from lightning_rigl.errors import ConfigError
from lightning_rigl.export import command as export_command
from lightning_rigl.plots import Line, Panel, plot_densities, plot_panels
from lightning_rigl.results import RESULTS_FILE, run_results, write_results
from lightning_rigl.resume import (
    ExactResume,
    RequeueAtStepEnd,
    join_torchrun_attempt,
    run_test_on_final_weights,
    slurm_job,
)
from lightning_rigl.summary import checkpoint_summary, fit_summary
from lightning_rigl.timing import BatchTimer

DEFAULT_CONFIG = files("lightning_rigl") / "configs" / "default.yaml"
_SUBCOMMANDS = ("fit", "validate", "test")
_WRITTEN_BEFORE_TRAINING = {"config.yaml", "hparams.yaml"}
_CSV_LOGGERS = ("pytorch_lightning.loggers.CSVLogger", "pytorch_lightning.loggers.csv_logs.CSVLogger",
                "lightning.pytorch.loggers.CSVLogger")
FIT_DESCRIPTION = (
    "Train a recipe. A callback's options: --trainer.callbacks.init_args.sparsity 0.8 sets an option of the last "
    "callback in the list (the sparse one, in the recipes); --trainer.callbacks.help lightning_rigl.RigL lists "
    "RigL's options; to replace the method, pass a config whose trainer.callbacks lists the callbacks you want "
    "(README: 'Changing the callback from the command line')."
)


class RigLArgumentParser(LightningArgumentParser):
    """Parse errors as one paragraph: no usage block, and a value that fits none of an option's types reduced to
    the option, the value and the types expected (``JSONARGPARSE_DEBUG=1`` shows jsonargparse's own)."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # jsonargparse tries the types of a Union through errors, with exit_on_error off: leave those alone.
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"lightning-rigl: error: {condensed_parse_error(message)}\n"
                         f"Run `{prog} --help` for the options.\n")
        self.exit(2)


def condensed_parse_error(message: str) -> str:
    """jsonargparse's message for a value that fits none of an option's types (nested once per type and class
    it tried) as one line: the option, the value, the types expected. Other messages as they are."""
    given = re.search(r"(?:Given|Got) value: (.*)", message)
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if given is None or not keys:
        return message.strip()
    expected = [name.removeprefix("builtins.") for name in re.findall(r"Expected a <class '([\w.]+)'>", message)]
    types = " or ".join(dict.fromkeys("None" if name == "NoneType" else name for name in expected)) or "another type"
    option = keys[-1] if len(keys) == 1 else f"{keys[-1]} (in --{keys[0]})"
    return f"{option}: {given.group(1)!r} is not a valid value; expected {types}."


class RigLCLI(LightningCLI):
    """LightningCLI with the ``--multiplier`` of extended training and a summary after ``fit``."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        # predict needs a predict_step and data the recipes do not define: not offered.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--multiplier", type=float, default=1.0,
            help="Extended training (RigL 2x, 5x): multiplies every step count of the recipe: trainer.max_steps "
            "and max_epochs, model.lr_milestones and warmup_steps, and a callback's start_at and stop_at when they are "
            "steps.",
        )
        parser.add_argument(
            "--scaled_by", type=float, default=1.0,
            help="Written by the command into the config it saves: the multiplier this config's step counts already "
            "carry. Never applied; results.json and the report read the run's multiplier from it.",
        )
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, test the final weights and print a summary.")
        # The model section names its class (ImageClassifier when it does not); each link applies where the chosen
        # model and data module both have the value: classes for a classifier, the vocabulary and context for a
        # language model.
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.context", "model.init_args.context", apply_on="instantiate")
        parser.set_defaults({"model": {"class_path": "lightning_rigl.ImageClassifier"}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            keep_run_folder_across_restarts(config, os.environ)
        scale_step_counts(config, config.multiplier)
        if config.scaled_by <= 0:
            raise ConfigError(f"--scaled_by must be > 0 (the multiplier a saved config carries), got "
                              f"{config.scaled_by}.")
        # The config saved next to the logs holds the scaled counts: rerunning it must not scale them again, and
        # must still report the multiplier its counts carry.
        config.scaled_by = config.scaled_by * config.multiplier
        config.multiplier = 1.0

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except Exception as error:
            if _config_error(error) is not None:  # refused before training: leave no empty run folder behind
                remove_unused_run_folders(self.trainer)
            raise

    def before_fit(self) -> None:
        if self.config.fit.test_after_fit and not getattr(self.datamodule, "has_test_split", True):
            raise ConfigError("the data holds no test split to test the final weights on (data.test_fraction is "
                              "0): set a data.test_fraction above 0, or --test_after_fit false.")
        join_torchrun_attempt(self.trainer)

    def after_test(self) -> None:
        masks = checkpoint_masks(self.config.test.ckpt_path)
        if masks and self.trainer.is_global_zero:
            metrics = {key: float(value) for key, value in self.trainer.callback_metrics.items()}
            print(checkpoint_summary(masks, metrics))

    def after_fit(self) -> None:
        test_metrics: dict[str, float] = {}
        if self.config.fit.test_after_fit:
            results = run_test_on_final_weights(self.trainer, self.model, self.datamodule)
            test_metrics = results[0] if results else {}
        record = {} if not self.trainer.is_global_zero else run_results(self.trainer, test_metrics,
                                                                           self.config.fit.scaled_by)
        if self.config.fit.test_after_fit and self.trainer.is_global_zero:
            print(fit_summary(self.trainer, test_metrics, record))
        if not self.trainer.loggers:
            return  # no run folder to write the record and the plot in
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir:
            write_results(log_dir, record)
            save_density_plots(self.trainer, Path(log_dir))


def checkpoint_masks(ckpt_path: str | None) -> dict[str, Tensor]:
    """The masks a lightning-rigl callback saved in a checkpoint (empty without one, or for a dense run)."""
    if not ckpt_path or not (Path(ckpt_path).is_file() or is_sharded_checkpoint(Path(ckpt_path))):
        return {}
    state = saved_state(read_checkpoint(Path(ckpt_path), weights=False))
    return dict(state["masks"]) if state else {}


def remove_unused_run_folders(trainer: pl.Trainer) -> None:
    """Removes the loggers' version folders of a run that stopped before training: empty, or holding only the
    saved config and hyperparameters. They would only shift the next run's version number."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        folder = Path(logger.log_dir) if getattr(logger, "log_dir", None) else None
        if folder is not None and folder.is_dir() and {p.name for p in folder.iterdir()} <= _WRITTEN_BEFORE_TRAINING:
            shutil.rmtree(folder)


def save_density_plots(trainer: pl.Trainer, folder: Path) -> None:
    """``densities.png`` in ``folder`` (each layer's final density beside its target) for the run's sparse
    callback, and ``density_history.png`` (each layer's density over training, from the CSV logger's
    metrics.csv) when the densities moved; a hint instead when matplotlib is missing."""
    for callback in trainer.callbacks:
        if isinstance(callback, SparseTraining):
            title = f"{type(callback).__name__}: sparsity {1 - callback.global_density():.4f}"
            try:
                path = plot_densities(callback.achieved_densities(), folder / "densities.png", title,
                                      targets=callback.targets)
                history = report.logged_series(folder / "metrics.csv", LAYER_DENSITY)
                moved = any(report.moves(points) for points in history.values())
                if moved:
                    panel = Panel([Line(report.as_line(points), label=name) for name, points in history.items()],
                                  title=title)
                    plot_panels([panel], folder / "density_history.png", xlabel="optimizer step",
                                ylabel="density (fraction of live weights)", title="density per layer over training",
                                markers=False)
            except ModuleNotFoundError:
                print("Install matplotlib (pip install 'lightning-rigl[plot]') for a plot of the layer densities.")
                return
            print(f"  density per layer plotted in {path}" + (" and density_history.png" if moved else ""))


def relaunch_identity(environ: Mapping[str, str]) -> str | None:
    """A name that stays the same when a launcher starts the same job again: ``slurm_<job id>`` (with
    ``_<task>`` for an array task) under SLURM, whose requeued jobs keep their id; ``torchrun_<run id>`` under
    torchrun with a rendezvous id (``--standalone`` draws one per launch, kept across ``--max-restarts``);
    None otherwise."""
    job = slurm_job(environ)
    if job:
        return f"slurm_{job}"
    run = environ.get("TORCHELASTIC_RUN_ID")
    return f"torchrun_{run}" if run and run != "none" else None


def keep_run_folder_across_restarts(config: Namespace, environ: Mapping[str, str]) -> None:
    """Under a launcher that restarts jobs (``relaunch_identity``), the run's logger version is that identity
    instead of the next ``version_N`` (unless the config sets one), so a restarted job writes into the folder of
    its first start and finds its checkpoints there, and a CSV logger goes on with the metrics.csv it finds
    (``ContinuingCSVLogger``); ``default_root_dir`` becomes that folder too, where Lightning saves the SLURM
    requeue checkpoint and looks for it when the job starts again."""
    identity = relaunch_identity(environ)
    logger = config.trainer.logger
    if identity is None or not isinstance(logger, Namespace) or "init_args" not in logger:
        return
    options = logger.init_args
    if options.get("version") is not None or options.get("save_dir") is None:
        return
    folder = Path(options.save_dir) / (options.get("name") or "") / identity
    if (folder / RESULTS_FILE).exists():
        raise ConfigError(f"{folder} holds a finished run of this job already: a job (or an array task) trains one "
                          "run of a given name, which it resumes when restarted. Give this run another name "
                          "(--trainer.logger.init_args.name) or a version (--trainer.logger.init_args.version), "
                          "or run it as a job of its own.")
    options.version = identity
    if logger.class_path in _CSV_LOGGERS:
        logger.class_path = "lightning_rigl.resume.ContinuingCSVLogger"
    if config.trainer.default_root_dir is None:
        config.trainer.default_root_dir = str(folder)


def scale_step_counts(config: Namespace, multiplier: float) -> None:
    """Multiplies in place every step count of a parsed config by ``multiplier`` (rounded to whole steps).

    The drop fraction's cadence (``update_interval``) stays: extended training makes more updates, as in the
    official code; nor does ``rewind_step`` (a point early in training). ``start_at`` and ``stop_at`` given as
    fractions of the run already scale with the run.
    """
    if multiplier <= 0:
        raise ConfigError(f"--multiplier must be > 0, got {multiplier}.")
    if multiplier == 1:
        return

    def scaled(steps: int) -> int:
        return max(1, round(steps * multiplier))

    trainer, model = config.trainer, config.model.init_args
    if trainer.max_steps is not None and trainer.max_steps > 0:
        trainer.max_steps = scaled(trainer.max_steps)
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        trainer.max_epochs = scaled(trainer.max_epochs)
    model.lr_milestones = [scaled(step) for step in model.lr_milestones]
    model.warmup_steps = round(model.warmup_steps * multiplier)
    for callback in trainer.callbacks or ():
        for option in ("start_at", "stop_at"):
            step = callback.init_args.get(option) if isinstance(callback, Namespace) else None
            if isinstance(step, int) and not isinstance(step, bool):
                if option == "stop_at" or step > 0:  # start_at 0 is "at step 0" however long the run
                    callback.init_args[option] = scaled(step)


def with_default_config(args: Sequence[str]) -> list[str]:
    """``args`` with ``--config <the packaged default>`` after the subcommand when no config was given, or when the
    first config given is an overlay (it sets neither ``model`` nor ``data``, e.g. only the callbacks)."""
    args = list(args)
    if not args or args[0] not in _SUBCOMMANDS:
        return args
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    if configs and not _is_overlay(Path(configs[0])):
        return args
    return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]


def _is_overlay(config: Path) -> bool:
    try:
        content = yaml.safe_load(config.read_text())
    except (OSError, yaml.YAMLError):
        return False  # the parser will say what is wrong with it
    return isinstance(content, dict) and "model" not in content and "data" not in content


def make_cli(args: Sequence[str] | None, **options: Any) -> RigLCLI:
    """The command's LightningCLI on ``args`` (None: the command line); ``options`` replace LightningCLI's
    arguments (``run=False`` to build without running)."""
    settings: dict[str, Any] = {
        "args": args,
        "seed_everything_default": 0,
        "trainer_defaults": {"callbacks": [ExactResume(), RequeueAtStepEnd(), BatchTimer()],
                             "plugins": [{"class_path": "lightning_rigl.AtomicCheckpointIO"}]},
        "save_config_kwargs": {"overwrite": True},
        "parser_kwargs": parser_kwargs(),
        "parser_class": RigLArgumentParser,
    }
    return RigLCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   **{**settings, **options})


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-rigl`` console script. Configuration mistakes exit with status 2 and
    the message of the error, without a traceback."""
    command_line = sys.argv[1:] if args is None else list(args)
    if command_line[:1] in (["report"], ["export"]):
        status = (report.main if command_line[0] == "report" else export_command.main)(command_line[1:])
        if status:
            raise SystemExit(status)
        return
    if args is None:
        # LightningCLI warns when given args beside a command line: complete the command line instead.
        sys.argv[1:] = with_default_config(sys.argv[1:])
    else:
        args = with_default_config(args)
    try:
        make_cli(args)
    except Exception as error:
        # jsonargparse wraps errors raised while it builds the classes; our ConfigError is in the chain.
        cause = _config_error(error)
        if cause is None:
            raise
        print(f"lightning-rigl: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        # A gloo process group left for interpreter exit to tear down can abort the process ("terminate called
        # without an active exception", seen about once in 70 two-process runs): close it while Python runs.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def parser_kwargs() -> dict[str, Any]:
    """Every parser refuses abbreviated options (``--trainer.max_step`` is not ``max_steps``); ``fit --help`` says
    how to set a callback's options."""
    subcommand = {"allow_abbrev": False}
    return {
        "prog": "lightning-rigl",
        "allow_abbrev": False,
        "description": __doc__.splitlines()[0] + " Also `lightning-rigl report --help` (the table of finished "
        "runs) and `lightning-rigl export --help` (the compact file of a checkpoint).",
        "fit": {**subcommand, "description": FIT_DESCRIPTION},
        "validate": subcommand,
        "test": subcommand,
    }


def _config_error(error: BaseException | None) -> ConfigError | None:
    """The ConfigError among ``error`` and its causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None

