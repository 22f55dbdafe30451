"""The `lightning-rigl` command: LightningCLI over `ImageClassifier`, the data modules and the sparse callbacks.

    lightning-rigl fit                                   # the default: RigL 90% ERK on Fashion-MNIST
    lightning-rigl fit --config recipes/cifar10_wrn22_2/rigl_erk_s90.yaml [--multiplier 2]
    lightning-rigl test --config <recipe> --ckpt_path <checkpoint>
    lightning-rigl report runs/ [--output report]         # the paper-style table of finished runs
    lightning-rigl export --ckpt_path <checkpoint> --output model.lrs [--dtype float16]   # the compact file
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import pytorch_lightning as pl
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_rigl import report
from lightning_rigl.callbacks import SparseTraining
from lightning_rigl.classifier import ImageClassifier
from lightning_rigl.errors import ConfigError
from lightning_rigl.export import command as export_command
from lightning_rigl.plots import plot_densities
from lightning_rigl.results import run_results, write_results
from lightning_rigl.summary import fit_summary

DEFAULT_CONFIG = files("lightning_rigl") / "configs" / "default.yaml"
_SUBCOMMANDS = ("fit", "validate", "test")


class RigLCLI(LightningCLI):
    """LightningCLI with the ``--multiplier`` of extended training and a summary after ``fit``."""

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
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        scale_step_counts(config, config.multiplier)
        if config.scaled_by <= 0:
            raise ConfigError(f"--scaled_by must be > 0 (the multiplier a saved config carries), got "
                              f"{config.scaled_by}.")
        # The config saved next to the logs holds the scaled counts: rerunning it must not scale them again, and
        # must still report the multiplier its counts carry.
        config.scaled_by = config.scaled_by * config.multiplier
        config.multiplier = 1.0

    def after_fit(self) -> None:
        test_metrics: dict[str, float] = {}
        if self.config.fit.test_after_fit:
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            test_metrics = results[0] if results else {}
            if self.trainer.is_global_zero:
                print(fit_summary(self.trainer, test_metrics))
        if not self.trainer.loggers:
            return  # no run folder to write the record and the plot in
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if self.trainer.is_global_zero and log_dir:
            write_results(log_dir, run_results(self.trainer, test_metrics, self.config.fit.scaled_by))
            save_density_plots(self.trainer, Path(log_dir))


def save_density_plots(trainer: pl.Trainer, folder: Path) -> None:
    """``densities.png`` in ``folder`` for the run's sparse callback; a hint instead when matplotlib is missing."""
    for callback in trainer.callbacks:
        if isinstance(callback, SparseTraining):
            title = f"{type(callback).__name__}: sparsity {1 - callback.global_density():.4f}"
            try:
                path = plot_densities(callback.achieved_densities(), folder / "densities.png", title)
            except ModuleNotFoundError:
                print("Install matplotlib (pip install 'lightning-rigl[plot]') for a plot of the layer densities.")
                return
            print(f"  density per layer plotted in {path}")


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

    trainer, model = config.trainer, config.model
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
    """``args`` with ``--config <the packaged default>`` after the subcommand when no config was given."""
    args = list(args)
    given = any(a in ("--config", "-c") or a.startswith("--config=") for a in args)
    if given or not args or args[0] not in _SUBCOMMANDS:
        return args
    return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]


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
        RigLCLI(
            ImageClassifier,
            pl.LightningDataModule,
            subclass_mode_data=True,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": __doc__.splitlines()[0] + " Also `lightning-rigl report --help` (the table "
                           "of finished runs) and `lightning-rigl export --help` (the compact file of a checkpoint)."},
        )
    except Exception as error:
        # jsonargparse wraps errors raised while it builds the classes; our ConfigError is in the chain.
        cause = _config_error(error)
        if cause is None:
            raise
        print(f"lightning-rigl: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _config_error(error: BaseException | None) -> ConfigError | None:
    """The ConfigError among ``error`` and its causes, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None

