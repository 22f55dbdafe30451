"""`lightning-rigl report` and the run record it reads: real tiny runs through the command, seeds averaged,
unfinished folders warned about, figures written, bad input refused with exit status 2."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from fake_datasets import write_fashion_mnist

from lightning_rigl import SET, SNFS, ImageClassifier, RigL, Static
from lightning_rigl.cli import DEFAULT_CONFIG, main
from lightning_rigl.report import Row, Run, _curve_panels, _settings, collect, group_runs, markdown_table
from lightning_rigl.results import _distribution, _parameters_removed, method_label, read_results

QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.accelerator", "cpu", "--data.val_size", "16", "--data.batch_size", "16",
         "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "5"]
RIGL = ["--trainer.callbacks.init_args.update_interval", "4"]
PNG = b"\x89PNG\r\n\x1a\n"


def fit(data: Path, name: str, *args: str) -> Path:
    """One tiny run through the command; returns its folder."""
    main(["fit", "--config", str(DEFAULT_CONFIG), "--data.data_dir", str(data), "--trainer.logger.init_args.name",
          name, *QUICK, *args])
    (folder,) = sorted(Path.cwd().joinpath("runs", name).glob("version_*"))[-1:]
    return folder


def pruning(path: Path) -> Path:
    path.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_rigl.GradualMagnitudePruning\n      init_args:\n"
        "        sparsity: 0.8\n        distribution: erk\n        start_at: 2\n        stop_at: 8\n"
        "        update_interval: 2\n"
    )
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two RigL seeds of one config, a pruning run (its density moves), a 2x RigL run and an unfinished folder."""
    root = tmp_path_factory.mktemp("report")
    data = root / "fashion"
    write_fashion_mnist(data, n_train=160, n_test=40)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        folders = {
            "rigl_0": fit(data, "rigl", *RIGL, "--seed_everything", "0", "--trainer.callbacks.init_args.seed", "0"),
            "rigl_1": fit(data, "rigl", *RIGL, "--seed_everything", "1", "--trainer.callbacks.init_args.seed", "1"),
            "pruning": fit(data, "pruning", "--config", str(pruning(root / "pruning.yaml"))),
            "rigl_2x": fit(data, "rigl_2x", *RIGL, "--multiplier", "2", "--trainer.max_steps", "6"),
        }
    unfinished = root / "runs" / "crashed" / "version_0"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text("trainer: {}\n")
    return {**folders, "root": root, "unfinished": unfinished}


def test_the_record_holds_the_row_and_the_logs_end_where_the_run_ended(runs: dict[str, Path]) -> None:
    record = read_results(runs["rigl_0"])
    assert (record["method"], record["distribution"], record["sparsity"], record["multiplier"]) == (
        "RigL", "erk", 0.9, 1.0)
    assert record["steps"] == 12 and 0 < record["test"]["test/acc_top1"] <= 1
    assert record["achieved_sparsity"] == pytest.approx(0.9, abs=1e-4)
    # The last logged costs are the run's final ones, though 12 is not a multiple of log_every_n_steps.
    with (runs["rigl_0"] / "metrics.csv").open() as file:
        logged = [line for line in csv.DictReader(file) if line["flops/train_ratio"]]
    assert int(logged[-1]["step"]) == 12
    assert float(logged[-1]["flops/train_ratio"]) == pytest.approx(record["train_ratio"], rel=1e-9)
    assert float(logged[-1]["size/bytes"]) == record["size_bytes"]


def test_a_2x_run_records_its_multiplier_and_its_saved_config_keeps_it(runs: dict[str, Path]) -> None:
    record = read_results(runs["rigl_2x"])
    assert record["multiplier"] == 2.0 and record["steps"] == 12
    config = yaml.safe_load((runs["rigl_2x"] / "config.yaml").read_text())
    assert (config["multiplier"], config["scaled_by"], config["trainer"]["max_steps"]) == (1.0, 2.0, 12)


def test_the_report_averages_seeds_and_warns_about_an_unfinished_folder(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["report", str(runs["root"] / "runs"), "--output", str(tmp_path / "out")])
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(runs["unfinished"]) in warnings[0] and "not a finished run" in warnings[0]
    with (tmp_path / "out" / "report.csv").open() as file:
        rows = {(line["method"], line["multiplier"]): line for line in csv.DictReader(file)}
    assert set(rows) == {("RigL", "1.0"), ("RigL", "2.0"), ("GradualMagnitudePruning", "1.0")}

    seeds = [read_results(runs[key]) for key in ("rigl_0", "rigl_1")]
    accuracies = [100 * seed["test"]["test/acc_top1"] for seed in seeds]
    rigl = rows["RigL", "1.0"]
    assert rigl["runs"] == "2" and len(set(rigl["folders"].split())) == 2
    assert float(rigl["test_top1"]) == pytest.approx(statistics.fmean(accuracies))
    assert float(rigl["test_top1_std"]) == pytest.approx(statistics.stdev(accuracies))
    # Training FLOPs are a multiple of dense training at 1x: the 2x run's ratio times 2.
    doubled = read_results(runs["rigl_2x"])
    assert float(rows["RigL", "2.0"]["train_flops"]) == pytest.approx(2 * doubled["train_ratio"])
    assert "| RigL | erk | 0.9 | 1x | dense | 2 |" in captured.out and "±" in captured.out

    out = tmp_path / "out"
    for name in ("accuracy_vs_sparsity", "accuracy_vs_training_flops", "layer_densities", "forward_flops"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG, name
        assert f"({name}.png)" in (out / "report.md").read_text()


def test_only_runs_whose_density_moves_have_a_forward_flops_curve(runs: dict[str, Path]) -> None:
    report = collect([runs["root"] / "runs"])
    curves = {row.first["method"]: row.runs[0].forward_curve for row in report.rows}
    pruned = read_results(runs["pruning"])
    assert curves["GradualMagnitudePruning"][0] == (0, 1.0)  # dense start
    assert curves["GradualMagnitudePruning"][-1] == (12, pytest.approx(pruned["forward_ratio"]))
    assert len({ratio for _, ratio in curves["RigL"]}) == 1  # ERK masks move, densities do not
    (panel,) = _curve_panels(report.rows)
    assert [line.label.split()[0] for line in panel.lines] == ["GradualMagnitudePruning"]


def _run(folder: str, lr: float, seed: int, accuracy: float, method: str = "RigL") -> Run:
    record = {"model": "wrn22_2", "data": "CIFAR10DataModule", "method": method, "distribution": "erk",
              "sparsity": 0.9, "achieved_sparsity": 0.9, "multiplier": 1.0, "test": {"test/acc_top1": accuracy},
              "train_ratio": 0.2, "forward_ratio": 0.2, "size_bytes": 1e5, "densities": {"a.weight": 0.1}}
    config = {"seed_everything": seed, "model": {"init_args": {"lr": lr}},
              "trainer": {"max_steps": 100, "logger": {"init_args": {"version": folder}},
                          "callbacks": [{"init_args": {"seed": seed, "sparsity": 0.9}}]}}
    return Run(Path(folder), record, _settings(config), [])


def test_runs_that_differ_in_more_than_seed_are_rows_of_their_own_with_a_note() -> None:
    rows = group_runs([_run("a", 0.1, 0, 0.90), _run("b", 0.1, 1, 0.92), _run("c", 0.2, 0, 0.80),
                       _run("d", 0.1, 0, 0.5, method="SET")])
    assert [(row.first["method"], len(row.runs), row.note) for row in rows] == [
        ("RigL", 2, "model.init_args.lr=0.1"), ("RigL", 1, "model.init_args.lr=0.2"), ("SET", 1, "")]
    assert rows[0].mean_std("test_top1") == pytest.approx((91.0, statistics.stdev([90.0, 92.0]), 2))
    table = markdown_table(rows)
    assert "differs in" in table.splitlines()[0] and "91.00 ± 1.41" in table
    assert set(rows[0].runs[0].settings) == {"model.init_args.lr", "trainer.max_steps",
                                             "trainer.callbacks.0.init_args.sparsity"}  # no seeds, no logger


def test_a_rerun_with_the_same_seeds_is_counted_once_and_named(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "rerun" / "version_0"
    shutil.copytree(runs["rigl_0"], copy)
    (copy / "results.json").touch()  # the newer of the two
    report = collect([runs["rigl_0"], runs["rigl_1"], copy])
    (row,) = report.rows
    assert sorted(run.folder for run in row.runs) == sorted([copy, runs["rigl_1"]])
    assert report.skipped == [f"{runs['rigl_0']}: the same config and seeds as {copy}; the newer run is counted"]


def test_when_every_folder_is_skipped_the_error_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "version_0" / "results.json", json.dumps({"format": 1}))
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert re.search(r"no finished run under .*\n  skipped .*version_0.*lacks model", capsys.readouterr().err)


def test_a_row_without_test_accuracy_says_so(tmp_path: Path) -> None:
    row = Row([_run("a", 0.1, 0, 0.9)])
    row.runs[0].record["test"] = {}
    assert row.mean_std("test_top1") is None
    header, _, line = markdown_table([row]).splitlines()
    cells = dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | ")))
    assert cells["test top-1 (%)"] == "n/a"


def test_runs_with_sparse_kernels_are_rows_of_their_own_with_their_step_time() -> None:
    fast = [_run(f"s{seed}", 0.1, seed, 0.9) for seed in (0, 1)]
    for run, step in zip(fast, (2.0, 4.0)):
        run.record.update(kernels="sparse", step_ms=step)
        run.settings["trainer.callbacks.init_args.kernels"] = "sparse"
    rows = group_runs([_run("d", 0.1, 0, 0.9), *fast])  # a record written before kernels existed reads as dense
    assert [(row.first.get("kernels", "dense"), len(row.runs)) for row in rows] == [("dense", 1), ("sparse", 2)]
    header, _, dense, sparse = markdown_table(rows).splitlines()
    columns = header.strip("| ").split(" | ")
    assert dict(zip(columns, sparse.strip("| ").split(" | ")))["step (ms)"] == "3.00 ± 1.41"
    assert dict(zip(columns, dense.strip("| ").split(" | ")))["step (ms)"] == "n/a"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", r"missing: no such folder"),
        (lambda root: root, r"no finished run under"),
        (lambda root: _write(root / "notes.txt", "x"), r"notes\.txt is a file"),
        (lambda root: _write(root / "runs" / "x" / "version_0" / "results.json", "{"), r"no finished run under"),
    ],
    ids=["missing", "empty", "a file", "a broken record"],
)
def test_bad_input_exits_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], make, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(make(tmp_path)), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_broken_record_is_named_in_a_warning(tmp_path: Path, runs: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    broken = _write(tmp_path / "version_3" / "results.json", json.dumps({"format": 99}))
    main(["report", str(runs["rigl_0"]), str(broken.parent), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"skipped {broken.parent}: {broken} is not a lightning-rigl results file" in err


def test_a_record_with_a_value_of_the_wrong_type_is_skipped_with_a_warning(
    tmp_path: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    record = json.loads((runs["rigl_0"] / "results.json").read_text())
    edited = _write(tmp_path / "version_4" / "results.json", json.dumps({**record, "sparsity": "0.9"}))
    main(["report", str(runs["rigl_0"]), str(edited.parent), "--output", str(tmp_path / "out")])
    assert f"skipped {edited.parent}: {edited} has values of the wrong type in sparsity" in capsys.readouterr().err


def test_abbreviated_options_are_refused(runs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs["rigl_0"]), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --out" in capsys.readouterr().err


def test_a_run_whose_densities_moved_gets_a_density_history_plot(runs: dict[str, Path]) -> None:
    assert (runs["pruning"] / "density_history.png").read_bytes()[:8] == PNG
    assert (runs["rigl_0"] / "densities.png").read_bytes()[:8] == PNG
    assert not (runs["rigl_0"] / "density_history.png").exists()  # ERK without redistribution: densities fixed


def test_an_output_that_cannot_be_written_exits_2(runs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    blocker = _write(tmp_path / "taken", "a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs["rigl_0"]), "--output", str(blocker)])
    assert exit_info.value.code == 2
    assert f"cannot write the report into {blocker}" in capsys.readouterr().err


@pytest.mark.parametrize(("callback", "label"), [
    (RigL(sparsity=0.9), "RigL"),
    (RigL(sparsity=0.9, redistribution="momentum"), "RigL-SM"),
    (RigL(sparsity=0.9, redistribution="gradient"), "RigL-SG"),
    (SNFS(sparsity=0.9), "SNFS"),  # momentum redistribution is SNFS's own default
    (SNFS(sparsity=0.9, redistribution="none"), "SNFS (no redistribution)"),
    (SET(sparsity=0.9), "SET"),
    (Static(sparsity=0.9), "Static"),
])
def test_the_method_label_names_redistribution_other_than_the_methods_default(callback, label: str) -> None:
    assert method_label(callback) == label


@pytest.mark.parametrize(("callback", "expected"), [
    (RigL(sparsity=0.9), ("erk", 0.9)),
    (RigL(sparsity=0.8, distribution="uniform"), ("uniform", 0.8)),
    (RigL(sparsity=None, distribution={"a.weight": 0.9, "b.weight": 0.9}), ("uniform (all layers)", 0.9)),
    (RigL(sparsity=None, distribution={"a.weight": 0.9, "b.weight": 0.5}), ("custom", None)),
])
def test_the_recorded_distribution(callback, expected: tuple) -> None:
    assert _distribution(callback) == expected


def test_a_small_dense_run_records_its_own_flops_against_the_full_width_model(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion_mnist(tmp_path / "fashion", n_train=64, n_test=16)
    monkeypatch.chdir(tmp_path)
    narrow = tmp_path / "small_dense.yaml"
    narrow.write_text("trainer:\n  callbacks: []\nmodel:\n  width: 0.5\n")
    record = read_results(fit(tmp_path / "fashion", "small_dense", "--config", str(narrow)))
    # LeNet-300-100 at half width is 784-150-50-10: 125,600 weights against 266,200, and all its FLOPs are
    # matrix products, so it trains and infers at 125,600 / 266,200 of the full model's FLOPs.
    assert record["method"] == "Small-Dense"
    assert record["train_ratio"] == record["forward_ratio"] == pytest.approx(125_600 / 266_200)


def test_a_narrowed_dense_model_records_the_fraction_of_parameters_it_lacks() -> None:
    full = sum(p.numel() for p in ImageClassifier(arch="lenet300_100", num_classes=10).parameters())
    half = ImageClassifier(arch="lenet300_100", num_classes=10, width=0.5)
    assert _parameters_removed(half) == pytest.approx(1 - sum(p.numel() for p in half.parameters()) / full)
    assert 0.4 < _parameters_removed(half) < 0.6  # LeNet's first layer dominates: about half the weights go
    assert _parameters_removed(ImageClassifier(arch="lenet300_100", num_classes=10)) == 0.0


def test_a_run_older_than_an_option_is_a_seed_of_the_row_that_leaves_it_at_its_default() -> None:
    """A config written before RigL had ``start`` lacks the key: it reads as the default, "random"."""
    def run(folder: str, seed: int, **options: object) -> Run:
        config = {"trainer": {"callbacks": [{"class_path": "lightning_rigl.RigL",
                                             "init_args": {"sparsity": 0.9, "seed": seed, **options}}]}}
        return Run(Path(folder), _run(folder, 0.1, seed, 0.9).record, _settings(config), [])

    rows = group_runs([run("older", 0), run("newer", 1, start="random", calibration_batches=8),
                       run("other", 2, start="magnitude")])
    assert sorted((len(row.runs), row.note) for row in rows) == [
        (1, "trainer.callbacks.0.init_args.start=magnitude"), (2, "trainer.callbacks.0.init_args.start=random")]


def test_a_count_written_as_a_float_is_the_same_setting_but_a_fraction_is_not() -> None:
    def run(folder: str, seed: int, limit: object) -> Run:
        config = {"trainer": {"limit_val_batches": limit, "callbacks": [{"init_args": {"seed": seed}}]}}
        return Run(Path(folder), _run(folder, 0.1, seed, 0.9).record, _settings(config), [])

    rows = group_runs([run("a", 0, 50), run("b", 1, 50.0), run("c", 2, 1.0), run("d", 3, 1)])
    assert sorted(len(row.runs) for row in rows) == [1, 1, 2]  # 50 and 50.0 together; 1.0 (all) apart from 1
