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
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_rigl.callbacks.sparse_training import FORWARD_RATIO
from lightning_rigl.plots import Panel, plot_panels
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
                raise ReportError(f"{path} is a file; give a run's folder (it holds {RESULTS_FILE}) or a folder of "
                                  "runs.")
            path = path.parent
        for folder in _run_folders_under(path):
            found[folder] = None
    return list(found)


def _run_folders_under(folder: Path) -> list[Path]:
    if _is_run_folder(folder):
        return [folder]
    return [run for child in sorted(p for p in folder.iterdir() if p.is_dir()) for run in _run_folders_under(child)]


def _is_run_folder(folder: Path) -> bool:
    return bool(_VERSION_FOLDER.fullmatch(folder.name)) or any((folder / name).exists() for name in _RUN_MARKERS)


def load_run(folder: Path) -> Run:
    """The finished run in ``folder``.

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
    return Run(folder, record, _settings(config), _forward_curve(folder / "metrics.csv"), seeds)


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config flattened to dotted keys, without the keys that do not change what the run trains."""
    return {key: value for key, value in _flatten(config) if not _IGNORED_KEY.search(key)}


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


def collect(paths: Sequence[str | Path]) -> Report:
    """Every finished run at or under ``paths``, grouped into rows; folders that are not finished runs are
    listed in ``skipped``.

    Raises:
        ReportError: a path does not exist, or no finished run was found.
    """
    runs: dict[str, Run] = {}  # one per config and seeds: a rerun with the same seeds is no new seed
    skipped = []
    for folder in find_run_folders(paths):
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
            record["multiplier"]]


def _sort_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    return (str(record["model"]), str(record["data"]), record["method"] != "Dense", record["method"],
            str(record["distribution"]), record["sparsity"], record["multiplier"])


def _quantity(record: Mapping[str, Any], key: str) -> float | None:
    if key == "test_top1":
        value = record["test"].get("test/acc_top1")
        return None if value is None else 100.0 * value
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
)


def markdown_table(rows: Sequence[Row]) -> str:
    """The paper-style table: one line per row, "mean ± std" where the runs differ."""
    header = ["model", "data", "method", "distribution", "sparsity", "multiplier", "runs",
              *(title for title, _, _ in _MEASURED)]
    if any(row.note for row in rows):
        header.append("differs in")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        record = row.first
        cells = [record["model"], record["data"] or "", record["method"], record["distribution"] or "",
                 f"{record['sparsity']:.4g}", f"{record['multiplier']:g}x", str(len(row.runs))]
        for _, key, number in _MEASURED:
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
    for _, key, _ in _MEASURED:
        names += [key, f"{key}_std", f"{key}_n"]
    names += ["differs_in", "folders"]
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            record = row.first
            line: dict[str, Any] = {key: record[key] for key in names[:6]}
            line.update(runs=len(row.runs), differs_in=row.note, folders=" ".join(str(r.folder) for r in row.runs))
            for _, key, _ in _MEASURED:
                stats = row.mean_std(key)
                line.update(dict(zip((key, f"{key}_std", f"{key}_n"), stats or ("", "", 0))))
            writer.writerow(line)
    return path


def write_figures(rows: Sequence[Row], folder: Path) -> list[Path]:
    """The four figures of the reproducibility report, as PNG files in ``folder``: accuracy against sparsity
    (its Figure 1), accuracy against training FLOPs (Figure 3), each row's density per layer (Figure 4 right)
    and forward FLOPs over training for runs whose density moves (Figure 4 left). A figure with nothing to
    show is not written.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    written = []
    # Against sparsity, a line per method and multiplier; against training FLOPs, a line per method and
    # sparsity, through its multipliers (the report's Figure 3).
    for name, x_key, xlabel, line in (
        ("accuracy_vs_sparsity.png", "sparsity", "sparsity (fraction of zeros)", Row.label.fget),
        ("accuracy_vs_training_flops.png", "train_flops", "training FLOPs (x dense at 1x)", _label_with_sparsity),
    ):
        panels = _accuracy_panels(rows, x_key, line)
        if panels:
            title = "test top-1 against " + xlabel.split(" (")[0] + " (mean ± std over seeds)"
            written.append(plot_panels(panels, folder / name, xlabel=xlabel, ylabel="test top-1 (%)", title=title))
    densities = _density_panels(rows)
    if densities:
        written.append(plot_panels(densities, folder / "layer_densities.png", xlabel="layer",
                                   ylabel="density (fraction of live weights)", title="final density per layer"))
    curves = _curve_panels(rows)
    if curves:
        written.append(plot_panels(curves, folder / "forward_flops.png", xlabel="optimizer step",
                                   ylabel="forward FLOPs (x dense)", title="inference FLOPs over training",
                                   markers=False))
    return written


def _label_with_sparsity(row: Row) -> str:
    """The row's method and distribution at its sparsity, whatever its multiplier."""
    record = row.first
    if record["method"] == "Dense":
        return "Dense"
    label = f"{record['method']} {record['distribution']} s={record['sparsity']:.4g}"
    return label + (f" ({row.note})" if row.note else "")


def _accuracy_panels(rows: Sequence[Row], x_key: str, line: Callable[[Row], str]) -> dict[str, Panel]:
    """Per panel (model and data), the rows' mean accuracy against ``x_key``, joined into lines by ``line``;
    dense training at 1x is also a dashed reference line."""
    panels: dict[str, Panel] = {}
    for row in rows:
        accuracy, x = row.mean_std("test_top1"), row.mean_std(x_key)
        if accuracy is None or x is None:
            continue
        panel = panels.setdefault(row.panel, Panel())
        if row.first["method"] == "Dense" and row.first["multiplier"] == 1:
            panel.references[f"dense ({accuracy[0]:.2f}%)"] = accuracy[0]
        panel.series.setdefault(line(row), []).append((x[0], accuracy[0], accuracy[1]))
    for panel in panels.values():
        for points in panel.series.values():
            points.sort()
    return panels


def _density_panels(rows: Sequence[Row]) -> dict[str, Panel]:
    panels: dict[str, Panel] = {}
    for row in rows:
        densities = row.densities()
        if not densities:
            continue
        panel = panels.setdefault(row.panel, Panel(xticklabels=list(densities)))
        if list(densities) != panel.xticklabels:
            continue  # another selection of layers: not comparable position by position
        panel.series[f"{row.label} s={row.first['sparsity']:.4g}"] = [
            (i, d, 0.0) for i, d in enumerate(densities.values())]
    return panels


def _curve_panels(rows: Sequence[Row]) -> dict[str, Panel]:
    panels: dict[str, Panel] = {}
    for row in rows:
        curve = row.runs[0].forward_curve
        if not moves(curve):
            continue  # the density did not move
        panel = panels.setdefault(row.panel, Panel())
        panel.series[f"{row.label} s={row.first['sparsity']:.4g}"] = as_line(curve)
    return panels


def write_report(report: Report, output: Path) -> list[Path]:
    """``report.md`` (the table and the figures' names), ``report.csv`` and the figures in ``output``; the
    figures are left out, with a note in report.md, when matplotlib is missing."""
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
    paths = [output / "report.md", write_csv(report.rows, output / "report.csv"), *figures]
    paths[0].write_text(markdown)
    return paths


def main(args: Sequence[str] | None = None) -> int:
    """``lightning-rigl report``: prints the table and writes report.md, report.csv and the figures. Returns the
    exit status: 0, or 2 for bad input (with a message, no traceback)."""
    parser = argparse.ArgumentParser(
        prog="lightning-rigl report",
        allow_abbrev=False,
        description="The paper-style table of finished runs (mean ± std over seeds), as report.md and report.csv, "
        "with figures of accuracy against sparsity and training FLOPs, density per layer and FLOPs over training.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="a run's folder (runs/NAME/version_N) or a folder of runs, such as runs/")
    parser.add_argument("--output", default="report", metavar="DIR",
                        help="where report.md, report.csv and the PNG figures go (default: ./report)")
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
