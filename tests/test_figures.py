"""The report's figures, checked for what can be checked without eyes: every figure is drawn, every row appears
in it, legends stay outside the axes and inside the image, labels do not collide, one method keeps one colour,
an outlier does not flatten the rest; with 1, 5 and 60 rows. And the run records they can be redrawn from."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import matplotlib
import pytest
from matplotlib.container import ErrorbarContainer

from lightning_rigl.report import (
    RECORDS_FILE,
    Run,
    collect,
    figures,
    group_runs,
    read_records,
    write_records,
    write_report,
)

SPARSITIES = (0.8, 0.9, 0.95, 0.98)
# (method, distribution, multiplier): the study's fifteen kinds of sparse row.
KINDS = [("RigL", "erk", 1.0), ("RigL", "erk", 2.0), ("RigL", "uniform (all layers)", 1.0), ("RigL-SG", "erk", 1.0),
         ("RigL-SG", "uniform (all layers)", 1.0), ("RigL-SM", "erk", 1.0), ("RigL-SM", "uniform (all layers)", 1.0),
         ("SET", "erk", 1.0), ("Static", "erk", 1.0), ("Static", "erk", 2.0), ("SNFS", "erk", 1.0),
         ("SNIP", "global", 1.0), ("GradualMagnitudePruning", "global", 1.0), ("LotteryTicket", "ticket", 1.0),
         ("Small-Dense", None, 1.0)]
LAYERS = ("net.0.weight", "net.2.weight", "net.4.weight")


def _runs(kind: tuple[str, str | None, float], sparsity: float, accuracy: float, seeds: int = 3) -> list[Run]:
    method, distribution, multiplier = kind
    density = 1 - sparsity
    runs = []
    for seed in range(seeds):
        record = {"model": "lenet300_100", "data": "FashionMNISTDataModule", "method": method,
                  "distribution": distribution, "sparsity": sparsity, "achieved_sparsity": sparsity,
                  "multiplier": multiplier, "test": {"test/acc_top1": (accuracy + 0.2 * (seed - 1)) / 100},
                  "train_ratio": 1.0 if method == "Dense" else density * (1.5 if method == "SNFS" else 1.0),
                  "forward_ratio": 1.0 - sparsity, "size_bytes": 1e5,
                  "densities": {} if method in ("Dense", "Small-Dense") else
                  {name: min(1.0, density * factor) for name, factor in zip(LAYERS, (0.8, 1.5, 6.0))},
                  "validation_curves": {"acc_top1": [  # validated every 100 steps, rising to the test accuracy
                      [step, (accuracy + 0.2 * (seed - 1) - 400 / step) / 100]
                      for step in range(100, int(400 * multiplier) + 1, 100)]}}
        moving = method == "GradualMagnitudePruning"
        curve = [(t, max(density, 1 - t / 300)) for t in range(0, 430, 10)] if moving else [(0, density)]
        settings = {"kind": list(map(str, kind)), "sparsity": sparsity}
        runs.append(Run(Path(f"runs/{method}/{sparsity}/{multiplier}/seed_{seed}"), record, settings, curve,
                        {"seed_everything": seed}))
    return runs


def study(n_rows: int) -> list:
    """``n_rows`` rows like the study's: one sparse row alone, or dense first and then the kinds at each sparsity
    (61 rows: all of them)."""
    runs = _runs(("Dense", None, 1.0), 0.0, 89.0)
    for index, (sparsity, kind) in enumerate(itertools.product(SPARSITIES, KINDS)):
        accuracy = 89.5 - 3 * sparsity ** 8 - 0.1 * (index % 7)
        runs += _runs(kind, sparsity, accuracy)
    rows = group_runs(runs)
    return rows[1:2] if n_rows == 1 else rows[:n_rows]


def _extent(artist, renderer):
    return artist.get_window_extent(renderer)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _check_layout(figure) -> None:
    """The legend is outside every axes and inside the image; the axes do not overlap; the image is of a size a
    page can hold; no text is smaller than 6 points."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    page = figure.bbox
    axes = [a for a in figure.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    assert all(a.get_legend() is None for a in axes), "a legend inside the axes, over the data"
    for legend in figure.legends:
        box = _extent(legend, renderer)
        assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1 and box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1
        for a in axes:
            assert not _overlap(box, a.get_window_extent(renderer)), "a legend covers an axes"
        if figure._suptitle is not None:
            assert not _overlap(box, _extent(figure._suptitle, renderer)), "a legend covers the title"
    for a, b in itertools.combinations(axes, 2):
        assert not _overlap(a.get_window_extent(renderer), b.get_window_extent(renderer)), "panels overlap"
    width, height = figure.get_size_inches()
    assert width <= 24 and height <= 24, (width, height)
    for text in figure.findobj(matplotlib.text.Text):
        if text.get_text() and text.get_visible():
            assert text.get_fontsize() >= 6, text.get_text()


def _plotted_ys(figure) -> list[float]:
    ys = []
    for a in figure.axes:
        for line in a.get_lines():
            ys += [float(y) for y in line.get_ydata()]
    return ys


def _annotations(figure) -> list[str]:
    return [text.get_text() for a in figure.axes for text in a.texts]


@pytest.mark.parametrize("n_rows", [1, 5, 61])
def test_every_row_appears_and_nothing_covers_the_data(n_rows: int) -> None:
    rows = study(n_rows)
    drawn = figures(rows)
    expected = {"accuracy_vs_sparsity.png", "accuracy_vs_training_flops.png", "accuracy_over_training.png",
                "layer_densities.png"}
    if any(row.first["method"] == "GradualMagnitudePruning" for row in rows):
        expected.add("forward_flops.png")
    assert set(drawn) == expected
    for figure in drawn.values():
        _check_layout(figure)
    for name in ("accuracy_vs_sparsity.png", "accuracy_vs_training_flops.png"):
        if name not in drawn:
            continue
        ys, notes = _plotted_ys(drawn[name]), " ".join(_annotations(drawn[name]))
        for row in rows:
            if name == "accuracy_vs_sparsity.png" and row.first["sparsity"] == 0:
                continue  # dense is the reference line there
            mean = row.mean_std("test_top1")[0]
            assert any(math.isclose(y, mean) for y in ys) or f"{mean:.3g}" in notes, (name, row.label)
    over_training = _plotted_ys(drawn["accuracy_over_training.png"])
    for row in rows:  # the last validation's mean, 4/steps below the test accuracy
        last = row.curve("acc_top1")[-1]
        assert any(math.isclose(y, 100 * last[1]) for y in over_training), row.label
        assert 100 * last[1] == pytest.approx(row.mean_std("test_top1")[0] - 400 / last[0])
    if "layer_densities.png" in drawn:
        heat = drawn["layer_densities.png"].axes[0]
        labels = [tick.get_text() for tick in heat.get_yticklabels()]
        assert len(labels) == sum(1 for row in rows if row.densities())
        renderer = drawn["layer_densities.png"].canvas.get_renderer()
        boxes = [tick.get_window_extent(renderer) for tick in heat.get_yticklabels()]
        assert not any(_overlap(a, b) for a, b in zip(boxes, boxes[1:])), "row labels collide"


def test_a_curve_over_training_is_the_mean_over_seeds_at_the_steps_every_seed_validated() -> None:
    """Three seeds, one of them stopped after two validations; a panel per sparsity, the dense row in each."""
    runs = _runs(("RigL", "erk", 1.0), 0.9, 80.0) + _runs(("RigL", "erk", 1.0), 0.5, 85.0) + _runs(
        ("Dense", None, 1.0), 0.0, 89.0)
    curves = ([[100, 0.5], [200, 0.6], [300, 0.7]], [[100, 0.7], [200, 0.8], [300, 0.9]], [[100, 0.6], [200, 0.4]])
    for run, curve in zip(runs, curves):
        run.record["validation_curves"] = {"acc_top1": curve}
    dense, half, ninety = group_runs(runs)
    assert [point for step in ninety.curve("acc_top1") for point in step] == pytest.approx(
        [100, 0.6, 0.1, 200, 0.6, 0.2])
    figure = figures([dense, half, ninety])["accuracy_over_training.png"]
    assert [axes.get_title() for axes in figure.axes if axes.get_visible()] == ["sparsity 50%", "sparsity 90%"]
    for axes, row in zip(figure.axes, (half, ninety)):
        lines = {drawn.get_label(): list(drawn.lines[0].get_ydata()) for drawn in axes.containers}
        assert lines == {"RigL erk": pytest.approx([100 * point[1] for point in row.curve("acc_top1")]),
                         "Dense": pytest.approx([100 * point[1] for point in dense.curve("acc_top1")])}
    assert lines["RigL erk"] == pytest.approx([60.0, 60.0])


def test_a_method_keeps_its_colour_and_seeds_give_error_bars() -> None:
    drawn = figures(study(61))
    colours = {}
    for name in ("accuracy_vs_sparsity.png", "accuracy_vs_training_flops.png"):
        for axes in drawn[name].axes:
            for container in axes.containers:
                if isinstance(container, ErrorbarContainer) and container.get_label():
                    method = container.get_label().split()[0]
                    colours.setdefault(method, set()).add(matplotlib.colors.to_hex(container.lines[0].get_color()))
                    assert container.has_yerr, container.get_label()  # three seeds: mean ± std
    assert all(len(found) == 1 for found in colours.values()), colours
    assert len({next(iter(found)) for found in colours.values()}) == len(colours)  # and no two methods share one


def test_an_outlier_is_drawn_at_the_edge_with_its_value() -> None:
    rows = study(61)
    broken = next(row for row in rows if row.first["method"] == "Small-Dense" and row.first["sparsity"] == 0.98)
    for run in broken.runs:
        run.record["test"]["test/acc_top1"] = 0.512
    figure = figures(rows)["accuracy_vs_sparsity.png"]
    low, high = figure.axes[0].get_ylim()
    assert low > 80, "the outlier must not set the y range"
    assert any(note.startswith("51.2") for note in _annotations(figure))


def test_sparsities_are_spaced_apart() -> None:
    figure = figures(study(61))["accuracy_vs_sparsity.png"]
    axes = figure.axes[0]
    figure.canvas.draw()
    positions = [axes.transData.transform((1 - s, 0))[0] for s in SPARSITIES]
    gaps = [abs(b - a) for a, b in zip(positions, positions[1:])]
    assert min(gaps) > 0.25 * abs(positions[-1] - positions[0])  # on a linear axis 95% and 98% nearly touch
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["80%", "90%", "95%", "98%"]


def test_records_redraw_the_same_report_and_stay_small(tmp_path: Path) -> None:
    rows = study(61)
    runs = [run for row in rows for run in row.runs]
    path = write_records(runs, tmp_path / RECORDS_FILE)
    assert path.stat().st_size < 1500 * len(runs), path.stat().st_size
    again = collect([path]).rows
    assert [row.label for row in again] == [row.label for row in rows]
    for before, after in zip(rows, again):
        assert after.mean_std("test_top1") == pytest.approx(before.mean_std("test_top1"))
        assert after.densities() == before.densities()
        assert after.curve("acc_top1") == before.curve("acc_top1")
        assert [run.forward_curve for run in after.runs] == [
            run.forward_curve if len({v for _, v in run.forward_curve}) > 1 else [] for run in before.runs]
    assert len(read_records(path)) == len(runs)
    # The report writes them beside its figures, and draws the same figures from them.
    written = write_report(collect([path]), tmp_path / "again")
    assert {p.name for p in written} >= {"report.md", "report.csv", RECORDS_FILE, "accuracy_vs_sparsity.png"}
    assert json.loads((tmp_path / "again" / RECORDS_FILE).read_text())["runs"] == json.loads(path.read_text())["runs"]
