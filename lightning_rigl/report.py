"""``lightning-rigl report RUN_DIR [RUN_DIR ...] [--output DIR]``: the paper-style table of finished runs, and
its figures.

A finished run is a folder the command wrote with ``results.json`` in it (written after ``fit``). Runs whose
configs differ only in seeds (and in where they log, where the data lies, progress bars) form one row, with
the mean and the sample standard deviation over them. Training FLOPs are a multiple of dense training at 1x,
as in the paper: the run's ratio to dense training over the same steps, times its multiplier.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import inspect
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_rigl.callbacks.sparse_training import FORWARD_RATIO
from lightning_rigl.plots import Line, Look, Panel, draw_heatmap, draw_panels, save_figure
from lightning_rigl.results import RESULTS_FILE, read_results

# What a folder the command wrote holds; any of them marks a run folder, finished or not.
_RUN_MARKERS = (RESULTS_FILE, "config.yaml", "metrics.csv", "hparams.yaml", "checkpoints")
_VERSION_FOLDER = re.compile(r"version_\d+")
# Config keys that do not change what a run trains: runs that differ only in these are seeds of one row. A
# lottery ticket's source checkpoint is one of them: each seed's ticket comes from that seed's pruning run.
_IGNORED_KEY = re.compile(
    r"(^|\.)(seed|seed_everything|data_dir|num_workers|ckpt_path|config|multiplier|scaled_by|test_after_fit|"
    r"enable_progress_bar|enable_model_summary|default_root_dir|dirpath|checkpoint)$|^trainer\.logger(\.|$)"
)
_SEED_KEY = re.compile(r"(^|\.)(seed|seed_everything)$")
RECORDS_FILE = "records.json"  # the runs a report drew from, written beside it (write_records)
RECORDS_FORMAT = 1


class ReportError(Exception):
    """Bad input to the report (no such folder, no finished run); the command exits with status 2."""


@dataclass
class Run:
    """One finished run: its folder, its record (``results.json``), the config settings that define its row,
    and the logged forward-FLOP ratio over training ((step, f_S / f_D) pairs; empty without ``metrics.csv``)."""

    folder: Path
    record: dict[str, Any]
    settings: dict[str, Any]
    forward_curve: list[tuple[int, float]]
    seeds: dict[str, Any] = field(default_factory=dict)  # the config's seed settings (and the callback's seed)


@dataclass
class Row:
    """Runs that differ only in seed. ``note`` tells rows apart whose table columns are the same."""

    runs: list[Run]
    note: str = ""

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0].record

    @property
    def label(self) -> str:
        """Method and distribution (and multiplier when not 1), as a legend names the row's line."""
        record = self.first
        label = record["method"] if record["distribution"] is None else f"{record['method']} {record['distribution']}"
        if record["multiplier"] != 1:
            label += f" {record['multiplier']:g}x"
        return label + (f" ({self.note})" if self.note else "")

    @property
    def panel(self) -> str:
        """The model and data set: rows of one panel of a figure are comparable."""
        return f"{self.first['model']} on {self.first['data']}"

    def values(self, key: str) -> list[float]:
        """The quantity ``key`` of each run, where known: "test_top1" (%), "train_flops" (x dense at 1x),
        "forward_flops" (x), "size_mb", "achieved_sparsity", or any numeric field of the record."""
        found = []
        for run in self.runs:
            value = _quantity(run.record, key)
            if value is not None:
                found.append(value)
        return found

    def mean_std(self, key: str) -> tuple[float, float, int] | None:
        """Mean, sample standard deviation (0 for one run) and number of runs of ``key``; None if unknown."""
        values = self.values(key)
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)

    def curve(self, name: str) -> list[tuple[int, float, float]]:
        """The validation metric ``name`` ("bits_per_byte", "acc_top1") over training: (step, mean, sample
        standard deviation) over the runs at each step every run logged; empty where a run logged none."""
        by_run = [dict((int(step), value) for step, value in run.record.get("validation_curves", {}).get(name, []))
                  for run in self.runs]
        curve = []
        for step in sorted(set.intersection(*(set(points) for points in by_run))):
            values = [points[step] for points in by_run]
            curve.append((step, statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
        return curve

    def densities(self) -> dict[str, float]:
        """Each sparse layer's final density, the mean over the runs."""
        names = list(self.first["densities"])
        return {name: statistics.fmean(run.record["densities"].get(name, math.nan) for run in self.runs)
                for name in names}


@dataclass
class Report:
    rows: list[Row]
    skipped: list[str] = field(default_factory=list)  # one line per folder that is not a finished run


# ------------------------------------------------------------------------------------------------ reading


def find_run_folders(paths: Sequence[str | Path]) -> list[Path]:
    """The run folders at or under ``paths``: a folder holding any of results.json, config.yaml, metrics.csv,
    hparams.yaml or checkpoints/, or named version_N; a folder of runs is searched. In order, without repeats.

    Raises:
        ReportError: a path does not exist or is a file other than a results.json.
    """
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"{path}: no such folder. Give the folders `lightning-rigl fit` wrote (runs/NAME/"
                              "version_N), or a folder above them such as runs/.")
        if path.is_file():
            if path.name != RESULTS_FILE:
                raise ReportError(f"{path} is a file; give a run's folder (it holds {RESULTS_FILE}), a folder of "
                                  "runs, or a file of run records (a .json file the report wrote).")
            path = path.parent
        for folder in _run_folders_under(path):
            found[folder] = None
    return list(found)


def _is_records_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".json" and path.name != RESULTS_FILE


def _run_folders_under(folder: Path) -> list[Path]:
    if _is_run_folder(folder):
        return [folder]
    return [run for child in sorted(p for p in folder.iterdir() if p.is_dir()) for run in _run_folders_under(child)]


def _is_run_folder(folder: Path) -> bool:
    return bool(_VERSION_FOLDER.fullmatch(folder.name)) or any((folder / name).exists() for name in _RUN_MARKERS)


def load_run(folder: Path) -> Run:
    """The finished run in ``folder``. Its record gains what its ``metrics.csv`` logged of the validation
    metrics ("val/..."): ``validation``, the last value of each, and ``validation_curves``, the [step, value]
    pairs of those the figures draw over training (``Quality.curve``; both empty without the file).

    Raises:
        FileNotFoundError: no results.json (the run did not finish).
        ValueError: a results.json this version cannot read.
    """
    record = read_results(folder)
    config_file = folder / "config.yaml"
    try:
        config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    except yaml.YAMLError as error:
        raise ValueError(f"{config_file} does not parse ({type(error).__name__})") from None
    seeds = {key: value for key, value in _flatten(config) if _SEED_KEY.search(key)}
    seeds["record.seed"] = record.get("seed")
    curves = logged_series(folder / "metrics.csv", "val/")
    record.setdefault("validation", {f"val/{name}": points[-1][1] for name, points in curves.items() if points})
    record.setdefault("validation_curves", {name: [list(point) for point in points] for name, points in curves.items()
                                            if name in {quality.curve for quality in QUALITIES}})
    return Run(folder, record, _settings(config), _forward_curve(folder / "metrics.csv"), seeds)


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config flattened to dotted keys, without the keys that do not change what the run trains, and with
    the defaults of the options a lightning-rigl class gained after the run (see ``_with_defaults``)."""
    return _grouped(dict(_flatten(config)))


def _grouped(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings that tell rows apart: defaults filled in, ignored keys left out, and a float with a
    whole value above 1 read as that int: the command's parser writes a count such as ``limit_val_batches: 50``
    as 50 or 50.0 depending on the packages installed, and no fraction is above 1."""
    return {key: int(value) if isinstance(value, float) and value > 1 and value.is_integer() else value
            for key, value in _with_defaults(settings).items() if not _IGNORED_KEY.search(key)}


def _with_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with each lightning-rigl class's options (``X.class_path``) that it lacks set to their defaults,
    so that a run whose config predates an option is a seed of the same row as a newer run that leaves it at its
    default. Other classes are left as they are."""
    filled = dict(settings)
    for key, class_path in settings.items():
        if not key.endswith("class_path") or not str(class_path).startswith("lightning_rigl."):
            continue
        prefix = key.removesuffix("class_path") + "init_args"
        for name, default in _option_defaults(str(class_path)).items():
            if not any(k == f"{prefix}.{name}" or k.startswith(f"{prefix}.{name}.") for k in settings):
                filled.update(_flatten(default, f"{prefix}.{name}"))
    return filled


@functools.cache
def _option_defaults(class_path: str) -> dict[str, Any]:
    """The keyword options of a lightning-rigl class and their defaults, through the classes it passes
    ``**kwargs`` on to; empty for a name that does not import."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return {}
    defaults: dict[str, Any] = {}
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.default is not inspect.Parameter.empty:
                defaults.setdefault(parameter.name, parameter.default)
    return defaults


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        yield prefix, value
        return
    for key, item in items:
        yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))


def _forward_curve(metrics: Path) -> list[tuple[int, float]]:
    """(step, forward FLOP ratio) logged in a CSV logger's metrics.csv."""
    return logged_series(metrics, FORWARD_RATIO).get("", [])


def logged_series(metrics: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric whose name starts with ``prefix`` in a CSV logger's metrics.csv, by the rest of its name
    ("" for ``prefix`` itself): (step, value) pairs in step order, the last value of each step. Empty without
    the file."""
    if not metrics.exists():
        return {}
    series: dict[str, dict[int, float]] = {}
    with metrics.open(newline="") as file:
        for line in csv.DictReader(file):
            for key, value in line.items():
                if key and key.startswith(prefix) and value and line.get("step"):
                    series.setdefault(key[len(prefix):], {})[int(float(line["step"]))] = float(value)
    return {name: sorted(by_step.items()) for name, by_step in series.items()}


def moves(points: Sequence[tuple[int, float]]) -> bool:
    """Whether a logged series takes more than one value (compared to 9 decimals)."""
    return len({round(value, 9) for _, value in points}) > 1


def as_line(points: Sequence[tuple[int, float]]) -> list[tuple[float, float, float]]:
    """A logged series as the points of a plotted line, without error bars."""
    return [(step, value, 0.0) for step, value in points]


def write_records(runs: Sequence[Run], path: Path) -> Path:
    """The runs as one JSON file the report can draw from again without the run folders (``collect`` reads
    it): each run's record, the settings that group it into a row (those shared by every run stored once), its
    seeds, and its forward-FLOP curve where it moves. A few kB per run."""
    folders = [run.folder.resolve() for run in runs]
    root = Path(os.path.commonpath(folders)) if folders else Path()
    shared = dict(runs[0].settings) if runs else {}
    for run in runs[1:]:
        shared = {key: value for key, value in shared.items() if key in run.settings and run.settings[key] == value}
    stored = [{"folder": str(folder.relative_to(root)) if folder != root else folder.name, "record": run.record,
               "settings": {key: value for key, value in run.settings.items() if key not in shared},
               "seeds": run.seeds, "forward_curve": run.forward_curve if moves(run.forward_curve) else []}
              for run, folder in zip(runs, folders)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": RECORDS_FORMAT, "shared_settings": shared, "runs": stored},
                               separators=(",", ":"), default=str) + "\n")
    return path


def read_records(path: Path) -> list[Run]:
    """The runs of a file ``write_records`` wrote.

    Raises:
        ValueError: the file is not such a file, or of another format version.
    """
    try:
        stored = json.loads(path.read_text())
        if stored.get("format") != RECORDS_FORMAT:
            raise ValueError(f"format {stored.get('format')!r}, not {RECORDS_FORMAT}")
        shared = stored["shared_settings"]
        return [Run(path.parent / run["folder"], run["record"], _grouped({**shared, **run["settings"]}),
                    [(int(step), float(value)) for step, value in run["forward_curve"]], run["seeds"])
                for run in stored["runs"]]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a file of run records written by the report ({error})") from None


def collect(paths: Sequence[str | Path]) -> Report:
    """Every finished run at or under ``paths`` (run folders, folders of them, or files of run records that
    ``write_records`` wrote), grouped into rows; folders that are not finished runs are listed in ``skipped``.

    Raises:
        ReportError: a path does not exist, a records file does not read, or no finished run was found.
    """
    runs: dict[str, Run] = {}  # one per config and seeds: a rerun with the same seeds is no new seed
    skipped = []
    record_files = [Path(path) for path in paths if _is_records_file(Path(path))]
    folder_paths = [path for path in paths if not _is_records_file(Path(path))]
    for file in record_files:
        try:
            loaded = read_records(file)
        except (ValueError, OSError) as error:
            raise ReportError(str(error)) from None
        for run in loaded:
            runs[json.dumps([_columns(run.record), run.settings, run.seeds], sort_keys=True, default=str)] = run
    for folder in find_run_folders(folder_paths):
        try:
            run = load_run(folder)
        except FileNotFoundError:
            skipped.append(f"{folder}: not a finished run (no {RESULTS_FILE}: the run failed, was stopped or is "
                           "still training)")
            continue
        except (ValueError, OSError) as error:
            skipped.append(f"{folder}: {error}")
            continue
        key = json.dumps([_columns(run.record), run.settings, run.seeds], sort_keys=True, default=str)
        if key in runs:
            older, newer = sorted((runs[key], run), key=lambda r: (r.folder / RESULTS_FILE).stat().st_mtime)
            skipped.append(f"{older.folder}: the same config and seeds as {newer.folder}; the newer run is counted")
            run = newer
        runs[key] = run
    if not runs:
        where = ", ".join(map(str, paths))
        reasons = "".join(f"\n  skipped {line}" for line in skipped)
        raise ReportError(f"no finished run under {where}: a finished run's folder holds {RESULTS_FILE}, which "
                          f"`lightning-rigl fit` writes when training ends (it needs a logger).{reasons}")
    return Report(group_runs(list(runs.values())), skipped)


def group_runs(runs: Sequence[Run]) -> list[Row]:
    """Rows of runs that differ only in seed, sorted by model, data, method, distribution, sparsity and
    multiplier (dense first); rows that share all of these get a note naming the settings they differ in."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[json.dumps([_columns(run.record), run.settings], sort_keys=True, default=str)].append(run)
    rows = sorted((Row(members) for members in groups.values()), key=lambda row: _sort_key(row.first))
    by_columns: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_columns[json.dumps(_columns(row.first), default=str)].append(row)
    for twins in by_columns.values():
        if len(twins) > 1:
            differing = sorted({key for row in twins for key in row.runs[0].settings
                                if len({json.dumps(r.runs[0].settings.get(key), default=str) for r in twins}) > 1})
            for row in twins:
                row.note = ", ".join(f"{key}={row.runs[0].settings.get(key)}" for key in differing[:3])
    return rows


def _columns(record: Mapping[str, Any]) -> list[Any]:
    return [record["model"], record["data"], record["method"], record["distribution"], round(record["sparsity"], 6),
            record["multiplier"], record.get("kernels", "dense")]


def _sort_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (str(record["model"]), str(record["data"]), record["method"] != "Dense", record["method"],
            str(record["distribution"]), record["sparsity"], record["multiplier"])


def _quantity(record: Mapping[str, Any], key: str) -> float | None:
    if key == "test_top1":
        value = record["test"].get("test/acc_top1")
        return None if value is None else 100.0 * value
    if key == "test_bits_per_byte":
        return record["test"].get("test/bits_per_byte")
    if key == "val_bits_per_byte":
        return record.get("validation", {}).get("val/bits_per_byte")
    if key == "forward_mflops_per_token":
        flops = record.get("forward_flops_per_token")
        return None if flops is None else flops / 1e6
    if key == "train_flops":
        ratio = record["train_ratio"]
        return None if ratio is None else ratio * record["multiplier"]
    if key == "forward_flops":
        return record["forward_ratio"]
    if key == "size_mb":
        return record["size_bytes"] / 1e6
    return record.get(key)


# ------------------------------------------------------------------------------------------------ writing

# (column title, quantity, format of its mean and spread)
_MEASURED = (
    ("achieved sparsity", "achieved_sparsity", "{:.4f}"),
    ("training FLOPs", "train_flops", "{:.2f}x"),
    ("inference FLOPs", "forward_flops", "{:.2f}x"),
    ("size (MB)", "size_mb", "{:.3f}"),
    ("test top-1 (%)", "test_top1", "{:.2f}"),
    ("step (ms)", "step_ms", "{:.2f}"),
)
# Language models' columns, in a report that holds a language-model run.
_LANGUAGE_MEASURED = (
    ("inference MFLOPs/token", "forward_mflops_per_token", "{:.3f}"),
    ("val bits/byte", "val_bits_per_byte", "{:.4f}"),
    ("test bits/byte", "test_bits_per_byte", "{:.4f}"),
    ("tokens/s", "tokens_per_second", "{:.0f}"),
)


def _measured(rows: Sequence[Row]) -> tuple[tuple[str, str, str], ...]:
    """The measured columns of a report of ``rows``."""
    classifier = any(row.mean_std("test_top1") is not None for row in rows)
    language = any(row.mean_std("test_bits_per_byte") is not None for row in rows)
    # A report of language models alone has no accuracy column; a classifier without a test keeps its "n/a".
    measured = tuple(column for column in _MEASURED if classifier or not language or column[1] != "test_top1")
    return measured + _LANGUAGE_MEASURED if language else measured


def markdown_table(rows: Sequence[Row]) -> str:
    """The paper-style table: one line per row, "mean ± std" where the runs differ."""
    measured = _measured(rows)
    header = ["model", "data", "method", "distribution", "sparsity", "multiplier", "kernels", "runs",
              *(title for title, _, _ in measured)]
    if any(row.note for row in rows):
        header.append("differs in")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        record = row.first
        cells = [record["model"], record["data"] or "", record["method"], record["distribution"] or "",
                 f"{record['sparsity']:.4g}", f"{record['multiplier']:g}x", record.get("kernels", "dense"),
                 str(len(row.runs))]
        for _, key, number in measured:
            stats = row.mean_std(key)
            if stats is None:
                cells.append("n/a")
                continue
            mean, std, n = stats
            cells.append(number.format(mean) + (f" ± {number.format(std).rstrip('x')}" if n > 1 else "")
                         + (f" (n={n})" if n < len(row.runs) else ""))
        if "differs in" in header:
            cells.append(row.note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    """One line per row: the table's columns, each measured quantity's mean, std and count, and the folders."""
    names = ["model", "data", "method", "distribution", "sparsity", "multiplier", "runs"]
    measured = _measured(rows)
    for _, key, _ in measured:
        names += [key, f"{key}_std", f"{key}_n"]
    names += ["differs_in", "folders"]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            record = row.first
            line: dict[str, Any] = {key: record[key] for key in names[:6]}
            line.update(runs=len(row.runs), differs_in=row.note, folders=" ".join(str(r.folder) for r in row.runs))
            for _, key, _ in measured:
                stats = row.mean_std(key)
                line.update(dict(zip((key, f"{key}_std", f"{key}_n"), stats or ("", "", 0))))
            writer.writerow(line)
    return path


def write_figures(rows: Sequence[Row], folder: Path) -> list[Path]:
    """The figures of ``figures(rows)``, as PNG files in ``folder``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    return [save_figure(figure, folder / name) for name, figure in figures(rows).items()]


@dataclass(frozen=True)
class Quality:
    """What the figures plot against sparsity and training FLOPs: a run's result on its test split."""

    key: str  # the quantity of a row (Row.values)
    name: str  # its figures' file names begin with it
    title: str
    axis: str
    reference: str  # how a dense row's reference line labels its mean
    curve: str  # the validation metric that follows it over training (Row.curve)
    curve_scale: float  # the metric's logged values times this are in the axis's unit


# Classifiers' top-1 accuracy, language models' bits per byte: each in figures of its own.
QUALITIES = (
    Quality("test_top1", "accuracy", "test top-1", "test top-1 (%)", "{:.2f}%", "acc_top1", 100.0),
    Quality("test_bits_per_byte", "bits_per_byte", "test bits per byte", "test bits per byte (lower is better)",
            "{:.3f}", "bits_per_byte", 1.0),
)


def figures(rows: Sequence[Row]) -> dict[str, Any]:
    """The report's figures by file name (matplotlib figures), after the reproducibility report's: accuracy
    against sparsity (its Figure 1; one panel per layer distribution), accuracy against training FLOPs (Figure 3;
    one panel per sparsity, a line through each method's multipliers), every row's final density per layer (a
    heat map), forward FLOPs over training for runs whose density moves (Figure 4 left) and validation accuracy
    over training (one panel per sparsity, the dense rows in each; from the runs' metrics.csv). Language
    models' rows get the first two and the last with their bits per byte in place of accuracy
    (``bits_per_byte_*.png``).
    Each method keeps one colour and marker in every figure; hollow markers are uniform distributions, dashed
    lines longer training. A figure with nothing to show is left out.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    looks = _method_looks(rows)
    drawn = {}
    for quality in QUALITIES:
        panels = _sparsity_panels(rows, looks, quality)
        if panels:
            drawn[f"{quality.name}_vs_sparsity.png"] = draw_panels(
                panels, xlabel="sparsity (log scale of the density)", ylabel=quality.axis,
                title=f"{quality.title} against sparsity (mean ± std over seeds)",
                legend=_legend(rows, looks, by_multiplier=True), xscale="log", invert_x=True, share_y=True,
                clip_outliers=True)
        panels = _flops_panels(rows, looks, quality)
        if panels:
            xs = [p[0] for panel in panels for line in panel.lines for p in line.points if p[0] > 0]
            drawn[f"{quality.name}_vs_training_flops.png"] = draw_panels(
                panels, xlabel="training FLOPs (x dense at 1x)", ylabel=quality.axis,
                title=f"{quality.title} against training FLOPs (mean ± std over seeds; lines join 1x, 2x, ...)",
                legend=_legend(rows, looks, by_multiplier=False, with_dense=True),
                xscale="log" if xs and max(xs) > 10 * min(xs) else "linear", clip_outliers=True, dodge=True)
        panels = _training_panels(rows, looks, quality)
        if panels:
            longest = max(len(line.points) for panel in panels for line in panel.lines)
            drawn[f"{quality.name}_over_training.png"] = draw_panels(
                panels, xlabel="optimizer step", ylabel=quality.axis.replace("test", "validation"),
                title=f"{quality.title.replace('test', 'validation')} over training (mean ± std over seeds)",
                legend=_legend(rows, looks, by_multiplier=True, with_dense=True), markers=longest <= _MARKED_POINTS)
    grids = _density_grids(rows)
    for panel, grid in grids.items():
        title = "final density per layer (fraction of live weights; mean over seeds)"
        name = "layer_densities.png"
        if len(grids) > 1:
            title, name = f"{title}: {panel}", f"layer_densities_{re.sub(r'[^A-Za-z0-9]+', '_', panel)}.png"
        drawn[name] = draw_heatmap(grid.values, grid.labels, grid.layers, title=title, colorbar_label="density",
                                   group_ends=grid.group_ends)
    panels = _curve_panels(rows)
    if panels:
        drawn["forward_flops.png"] = draw_panels(
            panels, xlabel="optimizer step", ylabel="forward FLOPs (x dense)", title="inference FLOPs over training",
            markers=False)
    return drawn


# The paper's convention: RigL one strong colour and its variants shades of it, the baselines apart, dense grey.
_METHOD_LOOKS = {
    "Dense": Look("#6e6e6e", "s"),
    "RigL": Look("#1f4fa3", "o"),
    "RigL-SG": Look("#5b9bd5", "^"),
    "RigL-SM": Look("#0b2656", "v"),
    "SRigL": Look("#0f9b9b", "p"),
    "SET": Look("#ef8a17", "s"),
    "Static": Look("#2e9e44", "D"),
    "SNFS": Look("#8e4fc0", "P"),
    "SNIP": Look("#8c564b", "X"),
    "GradualMagnitudePruning": Look("#d62728", "*"),
    "LotteryTicket": Look("#e377c2", "h"),
    "Small-Dense": Look("#a6a61c", "d"),
}
_SPARE_LOOKS = (Look("#17becf", "o"), Look("#393b79", "s"), Look("#bcbd22", "^"), Look("#9c9ede", "D"),
                Look("#7b4173", "v"), Look("#637939", "P"))
_MULTIPLIER_STYLES = ("-", "--", "-.", ":")
_MARKED_POINTS = 30  # curves of more points than this are drawn without markers
# Panels of distributions in this order, then any other by name.
_DISTRIBUTION_ORDER = {name: i for i, name in enumerate(("erk", "er", "uniform", "uniform (all layers)", "global",
                                                          "ticket", "custom"))}


def _method_looks(rows: Sequence[Row]) -> dict[str, Look]:
    """A colour and marker per method: the paper's for the known ones, the spare ones in name order."""
    methods = sorted({row.first["method"] for row in rows})
    unknown = [method for method in methods if method not in _METHOD_LOOKS]
    spare = {method: _SPARE_LOOKS[i % len(_SPARE_LOOKS)] for i, method in enumerate(unknown)}
    return {method: _METHOD_LOOKS.get(method) or spare[method] for method in methods}


def _is_uniform(distribution: Any) -> bool:
    return isinstance(distribution, str) and distribution.startswith("uniform")


def _multiplier_styles(rows: Sequence[Row]) -> dict[float, str]:
    multipliers = sorted({row.first["multiplier"] for row in rows} | {1.0})
    return {m: _MULTIPLIER_STYLES[min(i, len(_MULTIPLIER_STYLES) - 1)] for i, m in enumerate(multipliers)}


def _row_look(row: Row, looks: Mapping[str, Look], linestyle: str = "-") -> Look:
    look = looks[row.first["method"]]
    return Look(look.color, look.marker, linestyle, filled=not _is_uniform(row.first["distribution"]))


def _legend(rows: Sequence[Row], looks: Mapping[str, Look], by_multiplier: bool,
            with_dense: bool = False) -> list[tuple[str, Look]]:
    """A key to the looks: one entry per method, then what hollow markers and line styles mean."""
    order = list(_METHOD_LOOKS)
    methods = sorted({row.first["method"] for row in rows if row.first["method"] != "Dense" or with_dense},
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    entries = [(method, Look(looks[method].color, looks[method].marker, "-")) for method in methods]
    distributions = {row.first["distribution"] for row in rows if row.first["method"] != "Dense"}
    if any(_is_uniform(d) for d in distributions) and not all(_is_uniform(d) for d in distributions):
        entries.append(("hollow: uniform distribution", Look("black", "o", "none", filled=False)))
    styles = _multiplier_styles(rows)
    if by_multiplier and len(styles) > 1:
        entries += [(f"{m:g}x training", Look("black", "", style)) for m, style in styles.items()]
    return entries


def _sparsity_ticks(sparsities: Iterable[float]) -> list[float]:
    """The distinct sparsities, those within 0.005 of one another counted once, as the most frequent of them
    (Small-Dense matches the parameter count of its sparse rows only roughly: 0.7993 for 0.8)."""
    groups: list[list[float]] = []
    for value in sorted(sparsities):
        if groups and value - groups[-1][-1] <= 0.005:
            groups[-1].append(value)
        else:
            groups.append([value])
    return [max(set(group), key=lambda value: (group.count(value), -len(repr(value)))) for group in groups]


def _tick_of(sparsity: float, ticks: Sequence[float]) -> float:
    return min(ticks, key=lambda tick: abs(tick - sparsity))


def _percent(sparsity: float) -> str:
    return f"{100 * sparsity:.4g}%"


def _references(rows: Sequence[Row], quality: Quality) -> dict[str, dict[str, float]]:
    """Per panel, the dense rows' mean ``quality`` as labelled reference lines."""
    references: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        value = row.mean_std(quality.key)
        if row.first["method"] == "Dense" and value is not None:
            multiplier = "" if row.first["multiplier"] == 1 else f" {row.first['multiplier']:g}x"
            references[row.panel][f"dense{multiplier} {quality.reference.format(value[0])}"] = value[0]
    return references


def _sparsity_panels(rows: Sequence[Row], looks: Mapping[str, Look], quality: Quality) -> list[Panel]:
    """One panel per model/data and layer distribution (rows without one, such as Small-Dense, in every panel
    of their model): each row's ``quality`` against its density, 1 - sparsity, on a log scale."""
    sparse = [row for row in rows if row.first["sparsity"] > 0 and row.mean_std(quality.key) is not None]
    references = _references(rows, quality)
    ticks = _sparsity_ticks(row.first["sparsity"] for row in sparse)
    styles = _multiplier_styles(rows)
    panels: dict[tuple[str, Any], Panel] = {}
    keys = sorted(dict.fromkeys((row.panel, row.first["distribution"]) for row in sparse
                                if row.first["distribution"] is not None),
                  key=lambda key: (key[0], _DISTRIBUTION_ORDER.get(key[1], len(_DISTRIBUTION_ORDER)), str(key[1])))
    several_models = len({key[0] for key in keys}) > 1
    for panel_name, distribution in keys:
        title = f"distribution: {distribution}" + (f" ({panel_name})" if several_models else "")
        panels[panel_name, distribution] = Panel(title=title, references=references.get(panel_name, {}),
                                                 xticks={1 - tick: _percent(tick) for tick in ticks})
    lines: dict[tuple[Any, ...], Line] = {}
    for row in sparse:
        targets = [key for key in panels if key[0] == row.panel and row.first["distribution"] in (None, key[1])]
        for key in targets:
            line_key = (*key, row.first["method"], row.first["distribution"], row.first["multiplier"], row.note)
            if line_key not in lines:
                lines[line_key] = Line([], _row_look(row, looks, styles[row.first["multiplier"]]), row.label)
                panels[key].lines.append(lines[line_key])
            value = row.mean_std(quality.key)
            lines[line_key].points.append((1 - row.first["sparsity"], value[0], value[1]))
    for line in lines.values():
        line.points.sort(reverse=True)
    return list(panels.values())


def _by_sparsity(rows: Sequence[Row]) -> dict[tuple[str, float], list[Row]]:
    """The rows of each panel of one model/data and sparsity (sparsities within 0.005 of one another share
    one), in the given order; dense rows are in every panel of their model. Panels sorted by model, then
    sparsity."""
    ticks = _sparsity_ticks(row.first["sparsity"] for row in rows if row.first["sparsity"] > 0)
    groups: dict[tuple[str, float], list[Row]] = {}
    for row in rows:
        if row.first["sparsity"] > 0:
            groups.setdefault((row.panel, _tick_of(row.first["sparsity"], ticks)), [])
    for row in rows:
        sparsity = row.first["sparsity"]
        for key, members in groups.items():
            if key[0] == row.panel and (sparsity == 0 or key[1] == _tick_of(sparsity, ticks)):
                members.append(row)
    return {key: groups[key] for key in sorted(groups)}


def _sparsity_title(key: tuple[str, float], several_models: bool) -> str:
    return f"sparsity {_percent(key[1])}" + (f" ({key[0]})" if several_models else "")


def _flops_panels(rows: Sequence[Row], looks: Mapping[str, Look], quality: Quality) -> list[Panel]:
    """One panel per model/data and sparsity: each row's ``quality`` against its training FLOPs, a line through
    the multipliers of a method and distribution; the dense rows as a point and a reference line in each."""
    measured = [row for row in rows if row.mean_std(quality.key) is not None and row.mean_std("train_flops")]
    references = _references(rows, quality)
    groups = _by_sparsity(measured)
    several_models = len({key[0] for key in groups}) > 1
    panels = []
    for key, members in groups.items():
        panel = Panel(title=_sparsity_title(key, several_models), references=references.get(key[0], {}))
        lines: dict[tuple[Any, ...], Line] = {}
        for row in members:
            line_key = (row.first["method"], row.first["distribution"], row.note)
            if line_key not in lines:
                lines[line_key] = Line([], _row_look(row, looks), row.label)
                panel.lines.append(lines[line_key])
            value, flops = row.mean_std(quality.key), row.mean_std("train_flops")
            lines[line_key].points.append((flops[0], value[0], value[1]))
            lines[line_key].notes.append(f"{row.first['multiplier']:g}x")
        for line in lines.values():
            order = sorted(range(len(line.points)), key=lambda i: line.points[i][0])
            line.points = [line.points[i] for i in order]
            line.notes = [line.notes[i] for i in order] if len(line.points) > 1 else [""]
        panels.append(panel)
    return panels


def _training_panels(rows: Sequence[Row], looks: Mapping[str, Look], quality: Quality) -> list[Panel]:
    """One panel per model/data and sparsity: each row's validation ``quality.curve`` against the optimizer
    step, the mean over its seeds; the dense rows in every panel of their model. Rows that validated fewer
    than twice are left out."""
    curves = {id(row): [(step, quality.curve_scale * mean, quality.curve_scale * spread)
                        for step, mean, spread in row.curve(quality.curve)] for row in rows}
    groups = _by_sparsity([row for row in rows if len(curves[id(row)]) > 1])
    several_models = len({key[0] for key in groups}) > 1
    styles = _multiplier_styles(rows)
    return [Panel(title=_sparsity_title(key, several_models),
                  lines=[Line(curves[id(row)], _row_look(row, looks, styles[row.first["multiplier"]]), row.label)
                         for row in members])
            for key, members in groups.items()]


@dataclass
class _DensityGrid:
    """One model's heat map: a label and a row of densities (one per layer) for each row of the report."""

    layers: list[str]
    labels: list[str] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)
    group_ends: list[int] = field(default_factory=list)  # the last row of each sparsity
    last_tick: float | None = None


def _density_grids(rows: Sequence[Row]) -> dict[str, _DensityGrid]:
    """Per model/data, each row's mean final density per layer; rows ordered by sparsity, then as the table
    orders them."""
    with_densities = [row for row in rows if row.densities()]
    ticks = _sparsity_ticks(row.first["sparsity"] for row in with_densities)
    grids: dict[str, _DensityGrid] = {}
    for row in sorted(with_densities, key=lambda row: _tick_of(row.first["sparsity"], ticks)):  # stable
        densities = row.densities()
        grid = grids.setdefault(row.panel, _DensityGrid(list(densities)))
        if list(densities) != grid.layers:
            continue  # another selection of layers: not comparable position by position
        tick = _tick_of(row.first["sparsity"], ticks)
        if grid.last_tick is not None and tick != grid.last_tick:
            grid.group_ends.append(len(grid.labels) - 1)
        grid.last_tick = tick
        grid.labels.append(f"{_percent(row.first['sparsity'])}  {row.label}")
        grid.values.append(list(densities.values()))
    return grids


def _curve_panels(rows: Sequence[Row]) -> list[Panel]:
    """Per model/data, the forward FLOP ratio over training of each row whose density moves (its first run)."""
    panels: dict[str, Panel] = {}
    for row in rows:
        curve = row.runs[0].forward_curve
        if not moves(curve):
            continue  # the density did not move
        panel = panels.setdefault(row.panel, Panel(title=row.panel))
        panel.lines.append(Line(as_line(curve), label=f"{row.label} s={row.first['sparsity']:.4g}"))
    return list(panels.values())


def write_report(report: Report, output: Path) -> list[Path]:
    """``report.md`` (the table and the figures' names), ``report.csv``, the figures and ``records.json`` (the
    runs it drew from, which ``lightning-rigl report records.json`` redraws without the run folders) in
    ``output``; the figures are left out, with a note in report.md, when matplotlib is missing."""
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(report.rows)
    try:
        figures = write_figures(report.rows, output)
        figure_lines = [f"![{path.stem}]({path.name})" for path in figures]
    except ModuleNotFoundError:
        figures, figure_lines = [], ["Figures need matplotlib: pip install 'lightning-rigl[plot]'."]
    notes = [
        "Training FLOPs: the run's training FLOPs over dense training's in the same steps, times its multiplier "
        "(a multiple of dense training at 1x, as in the RigL paper). Inference FLOPs: the final masks' forward "
        "pass over the dense one. Size: 4 bytes per live weight and dense parameter, 1 bit per position of a "
        "sparse layer. Mean ± sample standard deviation over runs that differ only in seed.",
    ]
    if report.skipped:
        notes.append("Skipped: " + "; ".join(report.skipped))
    markdown = "\n\n".join(["# lightning-rigl report", table, *notes, *figure_lines]) + "\n"
    runs = [run for row in report.rows for run in row.runs]
    paths = [output / "report.md", write_csv(report.rows, output / "report.csv"), *figures,
             write_records(runs, output / RECORDS_FILE)]
    paths[0].write_text(markdown)
    return paths


def main(args: Sequence[str] | None = None) -> int:
    """``lightning-rigl report``: prints the table and writes report.md, report.csv, the figures and records.json.
    Returns the exit status: 0, or 2 for bad input (with a message, no traceback)."""
    parser = argparse.ArgumentParser(
        prog="lightning-rigl report",
        allow_abbrev=False,
        description="The paper-style table of finished runs (mean ± std over seeds), as report.md and report.csv, "
        "with figures of accuracy against sparsity and training FLOPs, density per layer and FLOPs over training, "
        "and records.json, the runs it drew from (give it instead of the run folders to redraw).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run's folder (runs/NAME/version_N), a folder of runs such as runs/, or a records.json "
                        "an earlier report wrote")
    parser.add_argument("--output", default="report", metavar="DIR",
                        help="where report.md, report.csv, records.json and the PNG figures go (default: ./report)")
    options = parser.parse_args(args)
    try:
        report = collect(options.runs)
    except ReportError as error:
        print(f"lightning-rigl report: error: {error}", file=sys.stderr)
        return 2
    for line in report.skipped:
        print(f"lightning-rigl report: warning: skipped {line}", file=sys.stderr)
    print(markdown_table(report.rows))
    try:
        paths = write_report(report, Path(options.output))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        print(f"lightning-rigl report: error: cannot write the report into {options.output} ({reason}).",
              file=sys.stderr)
        return 2
    print(f"\nwrote {', '.join(str(path) for path in paths)}")
    return 0
