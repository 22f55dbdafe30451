"""Writes every recipe YAML of this folder from the tables below: the one place the recipes' settings live.

    python recipes/generate.py           # rewrite the YAML files
    python recipes/generate.py --check   # exit 1 when a YAML file differs from what this script writes

A recipe is one row of a paper's table: a model and dataset (a ``Setup``, with the hyperparameters of the
source that produced the row) and a method at a sparsity (a ``Row``). Step counts are the 1x run's; a row
trained longer sets ``multiplier``, which the command applies to every step count.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lightning_rigl.models import create_model
from lightning_rigl.models.width import match_width, sparse_parameter_count
from lightning_rigl.sparsity.targets import sparsifiable_parameters

RECIPES = Path(__file__).resolve().parent

# The RigL update of every source: ΔT = 100 steps, α = 0.3 decayed by cosine (REFERENCE §1). SET, SNFS and
# RigL-SG/SM use the same cadence and fraction, as in the reproducibility report's unified code.
DYNAMIC_ARGS = {"update_interval": 100, "drop_fraction": 0.3, "drop_schedule": "cosine"}
METHOD_CLASSES = {
    "static": "lightning_rigl.Static",
    "set": "lightning_rigl.SET",
    "rigl": "lightning_rigl.RigL",
    "srigl": "lightning_rigl.SRigL",
    "rigl_sg": "lightning_rigl.RigL",
    "rigl_sm": "lightning_rigl.RigL",
    "snfs": "lightning_rigl.SNFS",
    "pruning": "lightning_rigl.GradualMagnitudePruning",
    "lottery": "lightning_rigl.LotteryTicket",
    "snip": "lightning_rigl.SNIP",
}
DYNAMIC_METHODS = ("set", "rigl", "rigl_sg", "rigl_sm", "snfs", "srigl")
REDISTRIBUTION = {"rigl_sg": "gradient", "rigl_sm": "momentum"}
TITLES = {"rigl": "RigL", "rigl_sg": "RigL-SG (RigL, redistribution by sparse gradient)",
          "rigl_sm": "RigL-SM (RigL, redistribution by sparse momentum)", "pruning": "Gradual magnitude pruning",
          "lottery": "Lottery ticket (the pruning run's mask, rewound to its initial weights)",
          "snip": "SNIP (one-shot pruning by |g·w| at the first step)",
          "srigl": "SRigL (RigL with a constant fan-in and neuron ablation, Lasby et al. 2024)"}


@dataclass(frozen=True)
class Setup:
    """A model on a dataset with one source's training hyperparameters.

    Attributes:
        folder: the recipes' folder name.
        source: where the hyperparameters come from (written into each file's header).
        arch: registry name of the model.
        num_classes: the dataset's classes (for the Small-Dense width search).
        data: the data module's ``class_path`` and ``init_args``.
        trainer: Trainer arguments (step counts of the 1x run).
        model: the LightningModule's arguments besides ``arch`` and ``width``.
        model_class: the LightningModule's ``class_path``; empty: ``ImageClassifier`` (the command's default, so
            that the model section holds its arguments alone).
        stop_at: T_end of the 1x run, in optimizer steps: masks are updated only at steps before it.
        pruning: (start, stop, interval) of gradual magnitude pruning in optimizer steps of the 1x run.
        pruning_source: where that schedule comes from (written into the pruning recipes' headers).
        sparse_args: further arguments of every sparse callback (e.g. layers kept out of the masks).
        srigl_args: further arguments of SRigL (the official code's ablation threshold for transformers).
        uniform_over_masks: "uniform" puts every masked layer at the sparsity, instead of our rule that keeps
            the first masked layer dense; for a model whose first layer is already outside the masks, or where
            a dense first layer would hold most of the weights (LeNet-300-100).
        global_masks_first: "global" pruning also masks the first layer (the report's code never does); SNIP always
            masks it.
        notes: lines for the header about choices a reader should know.
    """

    folder: str
    source: str
    arch: str
    num_classes: int
    data: dict[str, Any]
    trainer: dict[str, Any]
    model: dict[str, Any]
    stop_at: int
    pruning: tuple[int, int, int] = (0, 0, 100)
    pruning_source: str = ""
    sparse_args: dict[str, Any] = field(default_factory=dict)
    srigl_args: dict[str, Any] = field(default_factory=dict)
    uniform_over_masks: bool = False
    global_masks_first: bool = False
    notes: tuple[str, ...] = ()
    model_class: str = ""


@dataclass(frozen=True)
class Row:
    """A method at a sparsity: "dense", "small_dense", or a key of ``METHOD_CLASSES``. A "lottery" row retrains
    the mask of the "pruning" row with the same distribution and sparsity, which keeps its initial weights.

    ``sparsity`` is the fraction of zeros over the sparsified weights; for "small_dense" it names the sparse
    model whose parameter count the shrunk dense model matches. ``reported`` is the result to reproduce.
    ``sharded`` trains under FSDP2 (``SHARDED_STRATEGY`` on ``SHARDED_PROCESSES`` processes), with the same global
    batch.
    """

    method: str
    sparsity: float | None = None
    distribution: str | None = None
    multiplier: float = 1
    reported: str = ""
    sharded: bool = False

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.method in METHOD_CLASSES:
            parts.append(self.distribution or "")
        if self.sparsity is not None:
            parts.append(f"s{100 * self.sparsity:g}".replace(".", ""))
        if self.multiplier != 1:
            parts.append(f"{self.multiplier:g}x")
        if self.sharded:
            parts.append("fsdp2")
        return "_".join(parts)


def ticket_source(setup: Setup, row: Row) -> tuple[Row, str]:
    """The pruning row a "lottery" row retrains, and the checkpoint that run leaves for it."""
    source = replace(row, method="pruning", multiplier=1, reported="")
    return source, f"runs/{setup.folder}/{source.name}/final.ckpt"


def recipe(setup: Setup, row: Row) -> dict[str, Any]:
    """The LightningCLI config of ``row`` trained on ``setup``."""
    model: dict[str, Any] = {"arch": setup.arch, **setup.model}
    callbacks: list[dict[str, Any]] = [
        {"class_path": "pytorch_lightning.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}}
    ]
    if row.method == "small_dense":
        model["width"] = small_dense_width(setup, row)
    elif row.method == "lottery":
        callbacks.append({"class_path": METHOD_CLASSES["lottery"],
                          "init_args": {"checkpoint": ticket_source(setup, row)[1]}})
    elif row.method in METHOD_CLASSES:
        init_args = {"sparsity": row.sparsity, "distribution": row.distribution}
        if row.distribution == "uniform" and setup.uniform_over_masks:
            init_args = {"sparsity": None, "distribution": dict.fromkeys(masked_names(setup), row.sparsity)}
        if row.method in DYNAMIC_METHODS:
            init_args |= {**DYNAMIC_ARGS, "stop_at": setup.stop_at}
        if row.method == "srigl":
            init_args |= setup.srigl_args
        if row.method in REDISTRIBUTION:
            init_args["redistribution"] = REDISTRIBUTION[row.method]
        if row.method == "pruning":
            start, stop, interval = setup.pruning
            init_args |= {"update_interval": interval, "start_at": start, "stop_at": stop, "rewind_step": 0}
            if row.distribution == "global" and not setup.global_masks_first:  # as the report's code
                init_args["exclude"] = [masked_names(setup)[0]]
            # The final weights, masks and the rewind copy at a fixed path, for the lottery ticket.
            callbacks.append({"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                              "init_args": {"dirpath": f"runs/{setup.folder}/{row.name}", "filename": "final",
                                            "enable_version_counter": False}})
        callbacks.append({"class_path": METHOD_CLASSES[row.method], "init_args": init_args | setup.sparse_args})
    elif row.method != "dense":
        raise ValueError(f"unknown method {row.method!r}")
    logger = {"class_path": "pytorch_lightning.loggers.CSVLogger",
              "init_args": {"save_dir": "runs", "name": f"{setup.folder}/{row.name}"}}
    config: dict[str, Any] = {"seed_everything": 0}
    if row.multiplier != 1:
        config["multiplier"] = row.multiplier
    trainer = {"accelerator": "auto", "devices": 1, **setup.trainer}
    if row.sharded:
        trainer |= sharded_trainer(setup)
    config["trainer"] = {**trainer, "logger": logger, "callbacks": callbacks}
    config["model"] = {"class_path": setup.model_class, "init_args": model} if setup.model_class else model
    config["data"] = setup.data
    return config


# FSDP2 (Lightning's ModelParallelStrategy; ImageClassifier.configure_model applies fully_shard per block) over the
# processes of one 8-GPU node; every process is on the data-parallel axis (the callbacks refuse tensor parallelism).
SHARDED_PROCESSES = 8
SHARDED_STRATEGY = {"class_path": "pytorch_lightning.strategies.ModelParallelStrategy",
                    "init_args": {"data_parallel_size": SHARDED_PROCESSES, "tensor_parallel_size": 1}}


def sharded_trainer(setup: Setup) -> dict[str, Any]:
    """Trainer arguments of ``setup`` under FSDP2 on ``SHARDED_PROCESSES`` processes: the strategy, and the
    gradient accumulation divided among the processes so that the global batch stays the same; a validation
    every so many batches (Lightning counts batches, not optimizer steps) and a number of validation batches (per
    process) divided too, so that validation comes at the same optimizer steps on the same number of windows."""
    accumulate = setup.trainer.get("accumulate_grad_batches", 1)
    arguments = {"devices": SHARDED_PROCESSES, "strategy": SHARDED_STRATEGY,
                 "accumulate_grad_batches": accumulate // SHARDED_PROCESSES}
    for key, count in (("accumulate_grad_batches", accumulate), ("val_check_interval", setup.trainer.get(
            "val_check_interval")), ("limit_val_batches", setup.trainer.get("limit_val_batches"))):
        if isinstance(count, int):
            if count % SHARDED_PROCESSES:
                raise ValueError(f"{setup.folder}: {key} {count} does not divide among {SHARDED_PROCESSES} processes")
            arguments[key] = count // SHARDED_PROCESSES
    return arguments


def masked_names(setup: Setup) -> list[str]:
    """Names (as ImageClassifier sees them) of the parameters the sparse callbacks of ``setup`` mask."""
    holder = nn.Module()
    with torch.device("meta"):  # names and shapes only
        holder.net = create_model(setup.arch, num_classes=setup.num_classes)
    return list(sparsifiable_parameters(holder, exclude=setup.sparse_args.get("exclude", ())))


def small_dense_width(setup: Setup, row: Row) -> float:
    """The width at which the dense model has as many parameters as the sparse model of ``row`` keeps."""
    dense = create_model(setup.arch, num_classes=setup.num_classes)
    target = sparse_parameter_count(dense, row.sparsity, row.distribution or "erk")
    return round(match_width(setup.arch, setup.num_classes, target), 4)


def header(setup: Setup, row: Row) -> str:
    what = {"dense": "dense baseline", "small_dense": f"Small-Dense, parameters of a {row.sparsity} sparse model"}
    title = what.get(row.method) or f"{TITLES.get(row.method, row.method.upper())} " \
                                    f"{row.distribution}, sparsity {row.sparsity}"
    if row.multiplier != 1:
        title += f", {row.multiplier:g}x training"
    if row.sharded:
        title += ", sharded with FSDP2"
    lines = [f"{setup.folder}: {title}.", f"Hyperparameters: {setup.source}."]
    if row.reported:
        lines.append(f"Reported: {row.reported}.")
    lines.extend(setup.notes)
    if row.method in METHOD_NOTES:
        lines.extend(METHOD_NOTES[row.method](setup, row))
    if row.method == "lottery":
        source, checkpoint = ticket_source(setup, row)
        lines.append(f"First: lightning-rigl fit --config recipes/{setup.folder}/{source.name}.yaml "
                     f"(writes {checkpoint}).")
    if row.sharded:
        lines.extend(sharded_notes(setup))
    lines.append(f"Run: lightning-rigl fit --config recipes/{setup.folder}/{row.name}.yaml")
    lines.append("Generated by recipes/generate.py: edit that script, not this file.")
    return "".join(f"# {line}\n" for line in lines)


def _pruning_notes(setup: Setup, row: Row) -> list[str]:
    start, stop, interval = setup.pruning
    return [f"Pruning: from step {start} to step {stop}, every {interval} steps ({setup.pruning_source}). The run "
            f"keeps its initial weights (rewind_step 0) and writes runs/{setup.folder}/{row.name}/final.ckpt for "
            "the lottery ticket."]


def sharded_notes(setup: Setup) -> list[str]:
    """The header lines of a sharded row of ``setup``: how it shards, and how to keep its global batch."""
    batch = setup.data["init_args"]["batch_size"]
    accumulate = setup.trainer.get("accumulate_grad_batches", 1)
    validation = ""
    interval, limit = setup.trainer.get("val_check_interval"), setup.trainer.get("limit_val_batches")
    if isinstance(interval, int) and isinstance(limit, int):
        validation = (f"; and, since Lightning counts validation in batches per process, val_check_interval = "
                      f"{interval // accumulate} x accumulate_grad_batches and limit_val_batches = {limit:,} / P")
    return [
        f"Sharded: FSDP2 (ModelParallelStrategy, fully_shard per block) on {SHARDED_PROCESSES} processes of one "
        "node, the masks and per-weight state sharded like the weights; the same global batch as the one-GPU "
        "recipe. On P processes over N nodes: --trainer.devices P/N --trainer.num_nodes N "
        f"--trainer.strategy.data_parallel_size P, and accumulate_grad_batches so that {batch} x P x "
        f"accumulate_grad_batches = {batch * accumulate:,}{validation}.",
        "On one node the command below starts the processes; across nodes, start each node's with torchrun "
        "(README, 'Models too large to replicate').",
    ]

METHOD_NOTES = {
    "pruning": _pruning_notes,
    "snfs": lambda setup, row: [
        "SNFS: the callback's moving average of the dense gradient (momentum 0.9) costs 4 bytes per sparsified "
        "weight; same cadence and drop fraction as RigL, as the report ran it (drop fraction 0.3, cosine, every 100 "
        "steps; its momentum is SGD's dense buffer, ours the official code's moving average: the same ranking up to "
        "weight decay)."
    ],
}


def render(setup: Setup, row: Row) -> str:
    body = yaml.safe_dump(recipe(setup, row), sort_keys=False, default_flow_style=False, width=120)
    return header(setup, row) + body


# ----------------------------------------------------------------------------------------------- the tables

CIFAR10_WRN = Setup(
    folder="cifar10_wrn22_2",
    source="official RigL CIFAR-10 code (batch 128, 97,656 steps, SGD Nesterov 0.9, lr 0.1 x0.2 at 30k/60k/90k, "
    "weight decay 5e-4, last mask update at step 75,000)",
    arch="wrn22_2",
    num_classes=10,
    data={"class_path": "lightning_rigl.data.CIFAR10DataModule",
          "init_args": {"data_dir": "data", "download": True, "batch_size": 128, "val_size": 5000}},
    trainer={"max_steps": 97656},
    model={"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005, "lr_schedule": "step",
           "lr_milestones": [30000, 60000, 90000], "lr_gamma": 0.2},
    stop_at=75000,
    pruning=(700, 75000, 100),
    pruning_source="the reproducibility report's code: global magnitude pruning from step 700 every 100 steps "
    "(RigL's ΔT) to its T_end (65,918 of its 87,891 steps; here this setup's 75,000), first layer never masked; "
    "its 3,500-step warm-up for pruning is left out (the official code has none). The official CIFAR recipe "
    "prunes per layer from 20,000 to 75,000 every 1,000 steps",
    notes=("Validation: 5,000 training images held out, as in the reproducibility report; the paper trained on all "
           "50,000 (--data.val_size 0).",),
)

CIFAR100_RESNET = Setup(
    folder="cifar100_resnet50",
    source="RigL reproducibility report's code (batch 128, 88,000 steps = 250 epochs of 352 batches, SGD Nesterov "
    "0.9, lr 0.1 x0.2 every 20k steps after a 1,760-step warm-up, weight decay 1e-4, label smoothing 0.1, mask "
    "updates until step 75,000)",
    arch="resnet50_cifar",
    num_classes=100,
    data={"class_path": "lightning_rigl.data.CIFAR100DataModule",
          "init_args": {"data_dir": "data", "download": True, "batch_size": 128, "val_size": 5000}},
    trainer={"max_steps": 88000},
    model={"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0001, "lr_schedule": "step",
           "lr_milestones": [21760, 41760, 61760, 81760], "lr_gamma": 0.2, "warmup_steps": 1760,
           "label_smoothing": 0.1},
    stop_at=75000,
    pruning=(700, 75000, 100),
    pruning_source="the reproducibility report's code: global magnitude pruning from step 700 every 100 steps to "
    "its T_end (65,918; here this setup's 75,000), first layer never masked",
    notes=("The report's text says 2 warm-up epochs; its code warms up for 1,760 steps (5 epochs) and starts the "
           "20k-step decay after the warm-up. These are the code's numbers, which produced the table.",
           "Its code stops mask updates at step 75,000 of 88,000 (85%), not at 75% of the run.",),
)

IMAGENET_STEPS_PER_EPOCH = 1281167 / 4096
IMAGENET_DATA = {"class_path": "lightning_rigl.data.ImageNetDataModule",
                 "init_args": {"data_dir": None, "batch_size": 256, "num_workers": 8}}
IMAGENET_TRAINER = {"max_steps": 32000, "accumulate_grad_batches": 16}
IMAGENET_NOTES = (
    "Global batch 4,096 = data.batch_size 256 x accumulate_grad_batches 16 on one GPU; on N GPUs keep the product "
    "(e.g. --trainer.devices 8 --trainer.accumulate_grad_batches 2).",
    "The 1x length (32,000 steps of 4,096 images, ~102 epochs) is inferred from the README's dense training FLOPs "
    "(3.2e18 = 3 x 8.2e9 x 4,096 x 32,000); the code's flag defaults differ.",
    "Pass the ImageNet folder (train/ and val/ class folders) with --data.data_dir.",
)


def _epochs_to_steps(*epochs: float) -> list[int]:
    return [round(e * IMAGENET_STEPS_PER_EPOCH) for e in epochs]


IMAGENET_RESNET = Setup(
    folder="imagenet_resnet50",
    source="official RigL ImageNet code (SGD Nesterov 0.9, lr 0.1 x 4096/256 = 1.6 x0.1 at epochs 30/70/90, weight "
    "decay 1e-4, label smoothing 0.1, last BatchNorm of each block at 0, last mask update at step 25,000)",
    arch="resnet50",
    num_classes=1000,
    data=IMAGENET_DATA,
    trainer=IMAGENET_TRAINER,
    model={"arch_kwargs": {"zero_init_residual": True}, "lr": 1.6, "momentum": 0.9, "nesterov": True,
           "weight_decay": 0.0001, "lr_schedule": "step", "lr_milestones": _epochs_to_steps(30, 70, 90),
           "lr_gamma": 0.1, "label_smoothing": 0.1},
    stop_at=25000,
    pruning=(10000, 25000, 500),
    pruning_source="Gale et al.'s best 80% magnitude-pruning run, which the paper quotes (75.58%: from step 40,000 "
    "to 100,000 every 2,000 at batch 1,024), rescaled to batch 4,096; per layer, uniform",
    notes=IMAGENET_NOTES,
)

# Official MobileNet-v1: the first conv and the depthwise convs are never masked; 90% sparsity over the
# rest is the README's 0.89 overall.
IMAGENET_MOBILENET = Setup(
    folder="imagenet_mobilenet_v1",
    source="official RigL ImageNet code (SGD Nesterov 0.9, lr 1.6 with an 8-epoch linear warm-up, x0.1 at epochs "
    "40/75/95, weight decay 1e-4, label smoothing 0.1; first conv and depthwise convs dense)",
    arch="mobilenet_v1",
    num_classes=1000,
    data=IMAGENET_DATA,
    trainer=IMAGENET_TRAINER,
    model={"lr": 1.6, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0001, "lr_schedule": "step",
           "lr_milestones": _epochs_to_steps(40, 75, 95), "lr_gamma": 0.1, "warmup_steps": _epochs_to_steps(8)[0],
           "label_smoothing": 0.1},
    stop_at=25000,
    sparse_args={"exclude": ["net.features.0.*", "net.features.*.0.0.weight"]},
    uniform_over_masks=True,
    notes=IMAGENET_NOTES + ("The official code also exempts the depthwise convs from weight decay; here they get "
                            "it like every conv weight.",),
)


def _cifar10_rows() -> list[Row]:
    paper = {  # Evci et al. 2020, WRN-22-2 test accuracy
        ("rigl", 0.5): "94.2", ("rigl", 0.8): "93.6", ("rigl", 0.9): "92.9", ("rigl", 0.95): "91.8",
        ("rigl2", 0.5): "94.2", ("rigl2", 0.8): "93.8", ("rigl2", 0.9): "93.3", ("rigl2", 0.95): "92.4",
        ("static", 0.5): "94.1", ("static", 0.8): "92.9", ("static", 0.9): "91.5", ("static", 0.95): "89.0",
    }
    report = {  # reproducibility report Table 2, (density 0.1, density 0.2)
        ("small_dense", None): ("89.0", "91.0"), ("static", "uniform"): ("89.1", "91.2"),
        ("set", "uniform"): ("91.3", "92.7"), ("rigl", "uniform"): ("91.7", "92.6"),
        ("set", "erk"): ("92.2", "92.9"), ("rigl", "erk"): ("92.4", "93.1"),
        ("static2", "uniform"): ("89.15", "91.2"), ("set2", "uniform"): ("83.3", "93.0"),
        ("rigl2", "uniform"): ("92.3", "93.0"), ("rigl2", "erk"): ("92.7", "93.3"),
    }

    def reported(method: str, dist: str | None, sparsity: float, multiplier: float) -> str:
        if multiplier not in (1, 2):
            return ""  # no CIFAR-10 table has a longer run
        key = method + ("2" if multiplier == 2 else "")
        found = []
        if dist == "erk" and (key, sparsity) in paper:
            found.append(f"{paper[key, sparsity]} (paper, ERK)")
        if sparsity in (0.8, 0.9) and (key, dist) in report:
            found.append(f"{report[key, dist][sparsity == 0.8]} (reproducibility report Table 2)")
        return ", ".join(found)

    # Every method and distribution at 1x; extended training where a table has it, and RigL ERK at 5x as on
    # ImageNet. The report's 2x uniform rows exist at 80% and 90% only.
    runs = [(method, dist, 1) for method in ("static", "set", "rigl") for dist in ("uniform", "erk")]
    runs += [("rigl", "erk", 2), ("rigl", "erk", 5)]
    report_2x = [("static", "uniform", 2), ("set", "uniform", 2), ("rigl", "uniform", 2)]
    rows = [Row("dense", reported="93.4 (reproducibility report)")]
    for sparsity in (0.5, 0.8, 0.9, 0.95):
        rows.append(Row("small_dense", sparsity, "erk", reported=reported("small_dense", None, sparsity, 1)))
        for method, dist, multiplier in runs + (report_2x if sparsity in (0.8, 0.9) else []):
            rows.append(Row(method, sparsity, dist, multiplier, reported(method, dist, sparsity, multiplier)))
    table_2 = {  # reproducibility report Table 2, the rows that need the methods beyond RigL, SET and Static
        ("snfs", "uniform", 1): ("92.4", "92.7"), ("snfs", "erk", 1): ("92.2", "92.8"),
        ("snfs", "uniform", 2): ("92.3", "93.2"), ("pruning", "global", 1): ("92.6", "93.2"),
        ("lottery", "global", 1): ("90.4", "92.0"),
    }
    table_5 = {  # reproducibility report Table 5, CIFAR-10: RigL with redistribution
        ("rigl_sg", "uniform", 1): ("92.2", "92.7"), ("rigl_sm", "uniform", 1): ("92.2", "92.9"),
        ("rigl_sg", "erk", 1): ("92.1", "92.7"), ("rigl_sm", "erk", 1): ("92.27", "93.0"),
    }
    return rows + _report_rows(table_2, "Table 2") + _report_rows(table_5, "Table 5")


def _report_rows(table: dict[tuple[str, str, int], tuple[str, str]], name: str) -> list[Row]:
    """Rows at 90% and 80% sparsity (the report's densities 0.1 and 0.2) of one of its tables."""
    return [Row(method, sparsity, dist, multiplier, f"{accuracy[sparsity == 0.8]} (reproducibility report {name})")
            for sparsity in (0.8, 0.9) for (method, dist, multiplier), accuracy in table.items()]


def _cifar100_rows() -> list[Row]:
    report = {  # reproducibility report Table 3, (density 0.1, density 0.2)
        ("static", "uniform", 1): ("69.7", "72.3"), ("small_dense", "erk", 1): ("70.8", "72.6"),
        ("set", "uniform", 1): ("71.4", "73.4"), ("rigl", "uniform", 1): ("71.8", "73.5"),
        ("static", "erk", 1): ("71.5", "73.2"), ("set", "erk", 1): ("72.3", "73.5"),
        ("rigl", "erk", 1): ("72.6", "73.4"), ("rigl", "uniform", 2): ("73.1", "74.0"),
        ("rigl", "uniform", 3): ("73.7", "74.2"), ("rigl", "erk", 2): ("73.6", "74.4"),
    }
    report |= {
        ("snfs", "uniform", 1): ("72.3", "73.9"), ("snfs", "erk", 1): ("73.0", "73.9"),
        ("pruning", "global", 1): ("73.1", "73.8"), ("lottery", "global", 1): ("73.6", "74.2"),
    }
    table_5 = {  # reproducibility report Table 5, CIFAR-100
        ("rigl_sg", "uniform", 1): ("72.3", "73.7"), ("rigl_sm", "uniform", 1): ("72.6", "73.7"),
        ("rigl_sg", "erk", 1): ("73.0", "74.2"), ("rigl_sm", "erk", 1): ("72.6", "74.2"),
    }
    rows = [Row("dense", reported="74.7 (reproducibility report Table 3)")]
    return rows + _report_rows(report, "Table 3") + _report_rows(table_5, "Table 5")


def _imagenet_resnet_rows() -> list[Row]:
    one_x = {(0.8, "erk"): "75.12", (0.8, "uniform"): "74.60", (0.9, "erk"): "73.07", (0.9, "uniform"): "72.02"}
    five_x = {(0.8, "erk"): "77.17", (0.8, "uniform"): "76.71", (0.9, "erk"): "76.42", (0.9, "uniform"): "75.73",
              (0.95, "erk"): "74.63", (0.95, "uniform"): "73.22", (0.965, "erk"): "72.77",
              (0.965, "uniform"): "71.31"}
    rows = [Row("dense", reported="top-1 76.8 (official README)")]
    rows += [Row("rigl", s, d, 1, f"top-1 {acc} (official README)") for (s, d), acc in one_x.items()]
    rows += [Row("rigl", s, d, 5, f"top-1 {acc} (official README)") for (s, d), acc in five_x.items()]
    # The paper's 80% ResNet-50 comparison (the official README shows it as a plot, flops8.jpg; its values are
    # not in our sources, except pruning's, which the paper quotes from Gale et al.): uniform, 1x.
    compared = "in the paper's 80% ResNet-50 comparison (a plot in the official README; value not in our sources)"
    rows.append(Row("small_dense", 0.8, "uniform", reported=compared))
    rows += [Row(method, 0.8, "uniform", reported=compared) for method in ("static", "set", "snfs")]
    rows.append(Row("pruning", 0.8, "uniform", reported="top-1 75.58 (Gale et al.'s best run, quoted by the paper)"))
    return rows + [Row("rigl", 0.8, "erk", 1, f"top-1 {one_x[0.8, 'erk']} (official README)", sharded=True)]


# ERK at 99%: the README keeps the first layer dense (outside the masks, as the official custom sparsity map).
IMAGENET_RESNET_S99 = replace(IMAGENET_RESNET, sparse_args={"exclude": ["net.conv1.weight"]})


def _imagenet_resnet_s99_rows() -> list[Row]:
    results = {5: "61.86", 10: "63.89", 40: "66.94", 100: "68.15"}
    return [Row("rigl", 0.99, "erk", m, f"top-1 {acc} (official README, first layer dense)")
            for m, acc in results.items()]


def _imagenet_mobilenet_rows() -> list[Row]:
    results = {("erk", 10): "69.31", ("erk", 50): "70.63", ("uniform", 10): "69.28", ("uniform", 50): "70.25",
               ("uniform", 100): "70.59"}
    rows = [Row("dense", reported="top-1 72.1 (official README)")]
    rows += [Row("rigl", 0.9, d, 1) for d in ("erk", "uniform")]
    rows += [Row("rigl", 0.9, d, m, f"top-1 {acc} (official README, 0.89 overall)") for (d, m), acc in results.items()]
    return rows


# This project's study on the real Fashion-MNIST (benchmarks/reproduce.py): every method on LeNet-300-100 with
# the same step budget, sized so that the whole study runs in about two hours on two CPU cores.
FASHION_DATA = {"class_path": "lightning_rigl.data.FashionMNISTDataModule",
                "init_args": {"batch_size": 128, "val_size": 5000}}  # both studies: batches of 128, 5,000 held out
FASHION_STEPS = 4300  # 10 epochs of 430 batches of 128 (55,000 training images after the 5,000 held out)
FASHION_LENET = Setup(
    folder="fashion_mnist",
    source="this project's Fashion-MNIST study (batch 128, 4,300 steps = 10 epochs, SGD Nesterov 0.9, lr 0.1 x0.1 "
    "at 50% and 75% of the steps as the paper's step decay, weight decay 5e-4; RigL's ΔT 100, α 0.3 cosine, T_end "
    "at 75%)",
    arch="lenet300_100",
    num_classes=10,
    data=FASHION_DATA,
    trainer={"max_steps": FASHION_STEPS},
    model={"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0005, "lr_schedule": "step",
           "lr_milestones": [FASHION_STEPS // 2, FASHION_STEPS * 3 // 4], "lr_gamma": 0.1},
    stop_at=FASHION_STEPS * 3 // 4,
    pruning=(430, FASHION_STEPS * 3 // 4, 100),
    pruning_source="this study: from the end of the first epoch to T_end, every ΔT, over all layers",
    uniform_over_masks=True,
    global_masks_first=True,
    notes=("uniform: every layer at the sparsity; our usual rule keeps the first layer dense, which on "
           "LeNet-300-100 is 88% of the weights.",
           "Run the whole study with benchmarks/reproduce.py (make reproduce), which sets the seeds and the folders.",),
)


def _fashion_rows() -> list[Row]:
    rows = [Row("dense")]
    for sparsity in (0.8, 0.9, 0.95, 0.98):
        rows.append(Row("small_dense", sparsity, "erk"))
        rows += [Row(method, sparsity, "erk") for method in ("static", "set", "rigl", "snfs", "rigl_sg", "rigl_sm")]
        if sparsity in (0.9, 0.95):
            rows.append(Row("srigl", sparsity, "erk"))
        rows += [Row(method, sparsity, "uniform") for method in ("rigl", "rigl_sg", "rigl_sm")]
        rows += [Row("rigl", sparsity, "erk", 2), Row("static", sparsity, "erk", 2)]
        rows += [Row(method, sparsity, "global") for method in ("pruning", "lottery", "snip")]
    return rows


# Vision transformers. The Fashion-MNIST study's ViT: vit_tiny (patches of 4, 4 blocks of 64 features) trained as
# small ViTs are (AdamW, warm-up then cosine, clipping, label smoothing), on a budget the study can afford on
# two CPU cores: 3 epochs.
FASHION_VIT_STEPS = 1290  # 3 epochs of 430 batches of 128
VIT_NOTES = ("Transformer training: AdamW (its m and v cleared wherever a mask changes), linear warm-up then cosine, "
             "gradients clipped to norm 1 after the masks zero the dead ones.",)
FASHION_VIT = Setup(
    folder="fashion_mnist_vit",
    source="this project's Fashion-MNIST ViT study (vit_tiny; batch 128, 1,290 steps = 3 epochs, AdamW lr 2e-3 "
    "betas 0.9/0.999 weight decay 0.05, 100 warm-up steps then cosine, label smoothing 0.1, gradients clipped to "
    "norm 1; RigL's ΔT 100, α 0.3 cosine, T_end at 75%)",
    arch="vit_tiny",
    num_classes=10,
    data=FASHION_DATA,
    trainer={"max_steps": FASHION_VIT_STEPS, "gradient_clip_val": 1.0},
    model={"optimizer": "adamw", "lr": 0.002, "betas": [0.9, 0.999], "weight_decay": 0.05, "lr_schedule": "cosine",
           "warmup_steps": 100, "label_smoothing": 0.1},
    stop_at=FASHION_VIT_STEPS * 3 // 4,
    srigl_args={"min_salient_fraction": 0.95},  # the official ViT runs (configs/rigl/vit.yaml)
    notes=(*VIT_NOTES, "uniform keeps the first masked layer (the 4×4 patch embedding, 1,024 weights) dense.",
           "Run the whole study with benchmarks/reproduce.py --study vit, which sets the seeds and the folders."),
)

CIFAR10_VIT = Setup(
    folder="cifar10_vit",
    source="this project's choice for a small ViT trained from scratch on CIFAR-10, not a published table "
    "(vit_tiny at 32×32×3; batch 128, 200 epochs = 70,400 steps of 352 batches, AdamW lr 1e-3 weight decay 0.05, "
    "5 warm-up epochs then cosine, label smoothing 0.1, gradients clipped to norm 1; RigL's ΔT 100, α 0.3 cosine, "
    "T_end at 75%)",
    arch="vit_tiny",
    num_classes=10,
    data={"class_path": "lightning_rigl.data.CIFAR10DataModule",
          "init_args": {"data_dir": "data", "download": True, "batch_size": 128, "val_size": 5000}},
    trainer={"max_steps": 70400, "gradient_clip_val": 1.0},
    model={"arch_kwargs": {"in_channels": 3, "image_size": 32}, "optimizer": "adamw", "lr": 0.001,
           "betas": [0.9, 0.999], "weight_decay": 0.05, "lr_schedule": "cosine", "warmup_steps": 1760,
           "label_smoothing": 0.1},
    stop_at=52800,
    srigl_args={"min_salient_fraction": 0.95},  # the official ViT runs (configs/rigl/vit.yaml)
    notes=(*VIT_NOTES, "Not trained here (no GPU): a starting point, not a reproduction."),
)

IMAGENET_VIT = Setup(
    folder="imagenet_vit_b_16",
    source="SRigL's ViT-B/16 ImageNet run (Lasby et al., ICLR 2024; calgaryml/condensed-sparsity, "
    "configs/training/vit.yaml and configs/rigl/vit.yaml): global batch 4,096, 46,918 steps = 150 epochs, AdamW lr "
    "0.003 betas 0.9/0.999 weight decay 0.3, 16 warm-up epochs then cosine, label smoothing 0.11, gradients "
    "clipped to norm 1; RigL every 100 steps, α 0.3, updates until 75% of the run, uniform over every layer "
    "(patch embedding and attention included)",
    arch="vit_b_16",
    num_classes=1000,
    data=IMAGENET_DATA,
    trainer={"max_steps": 46918, "accumulate_grad_batches": 16, "gradient_clip_val": 1.0},
    model={"optimizer": "adamw", "lr": 0.003, "betas": [0.9, 0.999], "weight_decay": 0.3, "lr_schedule": "cosine",
           "warmup_steps": _epochs_to_steps(16)[0], "label_smoothing": 0.11},
    stop_at=35188,
    srigl_args={"min_salient_fraction": 0.95},  # the official ViT runs (configs/rigl/vit.yaml)
    uniform_over_masks=True,
    notes=(*IMAGENET_NOTES[:1], *VIT_NOTES,
           "SRigL's run is RigL with a constant fan-in and neuron ablation; this recipe is plain RigL on its "
           "schedule. Its warm-up starts from lr 9.9e-5 (ours from lr / warm-up steps), and its training images "
           "also get RandAugment (magnitude 9) and, per batch, mixup (alpha 0.2) or cutmix (alpha 1.0) "
           "(src/rigl_torch/datasets/_vit_imagenet.py), which the ImageNet data module does not do: it crops, "
           "resizes and flips only, so expect a lower accuracy than SRigL's dense and sparse ViTs.",
           "Pass the ImageNet folder (train/ and val/ class folders) with --data.data_dir. Not trained here."),
)


# Language models. The study's GPT: gpt_tiny (4 blocks of 192 features, 1.9M parameters) on the Python standard
# library's source at byte level, on a budget the study can afford on two CPU cores.
PYTHON_GPT_STEPS = 1000  # 4.1M tokens: 1,000 batches of 16 windows of 256 bytes, about 0.4 of an epoch
LM_NOTES = ("Language-model training: AdamW (its m and v cleared wherever a mask changes), linear warm-up then "
            "cosine, gradients clipped to norm 1 after the masks zero the dead ones. The tied token embedding and "
            "output head stays dense; the query, key, value, output and MLP projections are sparse.",)
PYTHON_GPT = Setup(
    folder="python_gpt_tiny",
    source="this project's language-model study (gpt_tiny, contexts of 256 bytes, on this Python's standard "
    "library source; batch 16, 1,000 steps = 4.1M tokens, AdamW lr 1e-3 betas 0.9/0.95 weight decay 0.1, 100 "
    "warm-up steps then cosine, gradients clipped to norm 1; RigL's ΔT 100, α 0.3 cosine, T_end at 75%)",
    arch="gpt_tiny",
    num_classes=256,
    data={"class_path": "lightning_rigl.data.TextDataModule",
          "init_args": {"tokenizer": "byte", "context": 256, "batch_size": 16}},
    trainer={"max_steps": PYTHON_GPT_STEPS, "gradient_clip_val": 1.0, "val_check_interval": 250,
             "limit_val_batches": 50},
    model={"optimizer": "adamw", "lr": 0.001, "betas": [0.9, 0.95], "weight_decay": 0.1, "lr_schedule": "cosine",
           "warmup_steps": 100},
    model_class="lightning_rigl.CausalLM",
    stop_at=PYTHON_GPT_STEPS * 3 // 4,
    srigl_args={"min_salient_fraction": 0.95},  # as for the transformers of the official SRigL runs
    uniform_over_masks=True,
    notes=(*LM_NOTES,
           "uniform: every projection at the sparsity (the first one is no input layer here).",
           "The corpus (data.text_dir unset) is this Python's standard library without its tests; its version and "
           "digest go into results.json. Validation every 250 steps on 50 batches; test after fit on the test "
           "split's documents.",
           "Run the whole study with benchmarks/reproduce.py --study lm, which sets the seeds and the folders."),
)

GPT2_STEPS = 19073  # 10B tokens in batches of 524,288
GPT2_SMALL = Setup(
    folder="gpt2_small",
    source="the schedule of the GPT-2 (124M) reproductions of nanoGPT and llm.c as we read it (10B tokens in "
    "batches of 524,288 = 64 sequences of 1,024 tokens x 8 accumulated, 19,073 steps, AdamW lr 6e-4 betas "
    "0.9/0.95 weight decay 0.1, 700 warm-up steps then cosine, gradients clipped to norm 1, bf16); RigL's ΔT 100, "
    "α 0.3 cosine, T_end at 75%",
    arch="gpt2_small",
    num_classes=50257,
    data={"class_path": "lightning_rigl.data.TextDataModule",
          "init_args": {"text_dir": "data/fineweb", "tokenizer": "gpt2", "context": 1024, "batch_size": 64,
                        "val_fraction": 0.001, "test_fraction": 0.001}},
    trainer={"max_steps": GPT2_STEPS, "accumulate_grad_batches": 8, "gradient_clip_val": 1.0,
             "precision": "bf16-mixed", "val_check_interval": 2000, "limit_val_batches": 160},
    model={"optimizer": "adamw", "lr": 0.0006, "betas": [0.9, 0.95], "weight_decay": 0.1, "lr_schedule": "cosine",
           "warmup_steps": 700},
    model_class="lightning_rigl.CausalLM",
    stop_at=GPT2_STEPS * 3 // 4,
    uniform_over_masks=True,
    notes=(*LM_NOTES,
           "Not run here (no GPU was lent): a starting point, not a reproduction. Put about 10B tokens of text "
           "(FineWeb's sample-10BT, say, as text files) in data/fineweb; the tokenizer is Hugging Face's gpt2 (the "
           "transformers extra, the tokenizer in the local cache), which ends each document with <|endoftext|>. "
           "Each file is one document and goes whole to train, validation or test (0.1% each held out), so give "
           "thousands of files (documents, or shards of a few MB), not a few large ones; it is tokenized once, one "
           "file at a time, into the cache.",
           "Validation every 250 optimizer steps on at most 10,240 windows of 1,024 tokens, about the whole "
           "validation split of 10B tokens at 0.1% (Lightning counts batches: every 2,000 batches of 64, at most "
           "160 of them, on one GPU; under FSDP2 on 8 every 250 batches, at most 20 per process).",),
)


def _lm_rows(sparsities: tuple[float, ...]) -> list[Row]:
    rows = [Row("dense")]
    for sparsity in sparsities:
        rows += [Row(method, sparsity, distribution) for distribution in ("erk", "uniform")
                 for method in ("static", "set", "rigl")]
        rows += [Row("srigl", sparsity, "erk"), Row("rigl", sparsity, "erk", 2)]
    return rows


def _gpt2_rows() -> list[Row]:
    rows = [Row("dense"), Row("dense", sharded=True)]
    for sparsity in (0.5, 0.75, 0.9):
        rows += [Row("rigl", sparsity, "erk"), Row("rigl", sparsity, "erk", sharded=True)]
    return rows


def _vit_rows(sparsities: tuple[float, ...]) -> list[Row]:
    rows = [Row("dense")] + [Row(method, sparsity, distribution) for sparsity in sparsities
                             for distribution in ("erk", "uniform") for method in ("static", "set", "rigl")]
    return rows + [Row("srigl", sparsity, "erk") for sparsity in sparsities]


def all_recipes() -> dict[Path, str]:
    """Every recipe file's path and text."""
    tables = [
        (FASHION_LENET, _fashion_rows()),
        (CIFAR10_WRN, _cifar10_rows()),
        (CIFAR100_RESNET, _cifar100_rows()),
        (IMAGENET_RESNET, _imagenet_resnet_rows()),
        (IMAGENET_RESNET_S99, _imagenet_resnet_s99_rows()),
        (IMAGENET_MOBILENET, _imagenet_mobilenet_rows()),
        (FASHION_VIT, _vit_rows((0.9, 0.95))),
        (CIFAR10_VIT, _vit_rows((0.9,))),
        (IMAGENET_VIT, [Row("dense"), Row("rigl", 0.9, "uniform"), Row("rigl", 0.9, "erk"),
                        Row("srigl", 0.9, "erk"), Row("rigl", 0.9, "uniform", sharded=True)]),
        (PYTHON_GPT, _lm_rows((0.75, 0.9))),
        (GPT2_SMALL, _gpt2_rows()),
    ]
    return {RECIPES / setup.folder / f"{row.name}.yaml": render(setup, row) for setup, rows in tables for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file differs")
    args = parser.parse_args()
    recipes = all_recipes()
    stale = [path for path, text in recipes.items() if not path.exists() or path.read_text() != text]
    orphans = [p for p in RECIPES.glob("*/*.yaml") if p not in recipes]
    if args.check:
        for path in stale + orphans:
            print(f"out of date: {path.relative_to(RECIPES.parent)}")
        sys.exit(1 if stale or orphans else 0)
    for path in orphans:
        path.unlink()
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recipes[path])
    print(f"{len(recipes)} recipes, {len(stale)} written, {len(orphans)} removed")


if __name__ == "__main__":
    main()
