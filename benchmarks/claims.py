"""The paper's claims, checked against the rows of a report: one sentence per claim with the numbers behind it.

A difference no larger than the larger of the two standard deviations over seeds is a tie, not a win.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from lightning_rigl.report import RECORDS_FILE, Report, Row, markdown_table

SPARSITIES = (0.8, 0.9, 0.95, 0.98)


def find(rows: Sequence[Row], method: str, distribution: str | None, sparsity: float,
         multiplier: float = 1) -> Row | None:
    """The row of a method, distribution, sparsity (to 0.005, for Small-Dense's parameter match) and multiplier."""
    for row in rows:
        record = row.first
        if (record["method"] == method and record["distribution"] == distribution
                and abs(record["sparsity"] - sparsity) < 0.005 and record["multiplier"] == multiplier):
            return row
    return None


def accuracy(row: Row) -> str:
    stats = row.mean_std("test_top1")
    return "n/a" if stats is None else f"{stats[0]:.2f} ± {stats[1]:.2f}%"


def compare(a: Row | None, b: Row | None) -> tuple[str, float]:
    """"wins", "ties" or "loses" for ``a`` against ``b`` on test top-1, and the difference in points."""
    if a is None or b is None or a.mean_std("test_top1") is None or b.mean_std("test_top1") is None:
        return "n/a", 0.0
    (mean_a, std_a, _), (mean_b, std_b, _) = a.mean_std("test_top1"), b.mean_std("test_top1")
    difference = mean_a - mean_b
    if abs(difference) <= max(std_a, std_b):
        return "ties", difference
    return ("wins" if difference > 0 else "loses"), difference


def versus(a: Row | None, b: Row | None, label_a: str, label_b: str) -> str:
    if a is None or b is None:
        return f"{label_a} against {label_b}: not run"
    verdict, difference = compare(a, b)
    return f"{label_a} {accuracy(a)} {verdict} against {label_b} {accuracy(b)} ({difference:+.2f})"


def erk_against_uniform(rows: Sequence[Row], sparsity: float, uniform: str) -> tuple[str, str]:
    """RigL ERK against RigL ``uniform`` (the distribution's recorded name) at ``sparsity``: a line with their
    accuracies and their inference and training FLOPs, and the verdict ("wins", "ties", "loses" or "n/a")."""
    erk, other = find(rows, "RigL", "erk", sparsity), find(rows, "RigL", uniform, sparsity)
    if erk is None or other is None:
        return f"{at(sparsity)}: not run.", "n/a"
    costs = "; ".join(f"{what} FLOPs ERK {erk.mean_std(key)[0]:.3f}x, uniform {other.mean_std(key)[0]:.3f}x"
                      for what, key in (("inference", "forward_flops"), ("training", "train_flops")))
    return f"{at(sparsity)}: {versus(erk, other, 'ERK', 'uniform')}; {costs}.", compare(erk, other)[0]


def at(sparsity: float) -> str:
    return f"{100 * sparsity:g}%"


def claims(rows: Sequence[Row], sparsities: Sequence[float]) -> list[str]:
    """One paragraph per claim: the comparison at each sparsity, then whether the claim held here."""
    paragraphs = []
    high = [s for s in sparsities if s >= 0.95] or list(sparsities)

    lines, held = [], True
    for s in sparsities:
        rigl, set_, static = (find(rows, m, "erk", s) for m in ("RigL", "SET", "Static"))
        lines.append(f"{at(s)}: {versus(rigl, set_, 'RigL', 'SET')}; {versus(set_, static, 'SET', 'Static')}.")
        if s in high:
            held &= compare(rigl, set_)[0] == "wins" and compare(set_, static)[0] == "wins"
    paragraphs.append(_claim("RigL beats SET beats Static at high sparsity (ERK, 1x).", lines,
                             f"at {', '.join(map(at, high))}: " + ("held" if held else "did not hold")))

    lines, held = [], True
    for s in sparsities:
        pruning = find(rows, "GradualMagnitudePruning", "global", s)
        if pruning is None or pruning.mean_std("train_flops") is None:
            lines.append(f"{at(s)}: no pruning run.")
            continue
        budget = pruning.mean_std("train_flops")[0]
        candidates = [r for m in (1, 2) if (r := find(rows, "RigL", "erk", s, m)) is not None
                      and r.mean_std("train_flops") is not None]
        if not candidates:
            lines.append(f"{at(s)}: no RigL run.")
            continue
        closest = min(candidates, key=lambda r: abs(r.mean_std("train_flops")[0] - budget))
        verdict, _ = compare(closest, pruning)
        held &= verdict in ("wins", "ties")
        lines.append(f"{at(s)}: pruning trains at {budget:.2f}x dense; RigL {closest.first['multiplier']:g}x at "
                     f"{closest.mean_std('train_flops')[0]:.2f}x: "
                     + versus(closest, pruning, "RigL", "pruning") + ".")
    paragraphs.append(_claim("RigL matches or beats gradual magnitude pruning at about equal training FLOPs (RigL "
                             "at 1x or 2x, whichever spends closer to pruning's training FLOPs).", lines,
                             "held" if held else "did not hold"))

    lines, held = [], True
    dense = find(rows, "Dense", None, 0.0)
    for s in sparsities:
        one, two = find(rows, "RigL", "erk", s, 1), find(rows, "RigL", "erk", s, 2)
        if dense is None or one is None or two is None:
            lines.append(f"{at(s)}: not run.")
            continue
        gap_one, gap_two = -compare(one, dense)[1], -compare(two, dense)[1]
        held &= gap_two < gap_one or compare(two, dense)[0] in ("ties", "wins")
        lines.append(f"{at(s)}: dense {accuracy(dense)}; gap to RigL 1x {gap_one:+.2f}, to RigL 2x {gap_two:+.2f} "
                     f"(RigL 2x {compare(two, dense)[0]} against dense).")
    paragraphs.append(_claim("RigL 2x closes the gap to dense (ERK).", lines, "held" if held else "did not hold"))

    lines, params_held = [], True
    for s in sparsities:
        line, verdict = erk_against_uniform(rows, s, "uniform (all layers)")
        lines.append(line)
        params_held &= verdict == "wins"
    paragraphs.append(_claim(
        "ERK beats uniform at a fixed parameter count, but not at a fixed FLOP budget (report §6.1; RigL, 1x).",
        lines, ("at a fixed parameter count: " + ("held" if params_held else "did not hold")
                + ". At a fixed FLOP budget: not testable on LeNet-300-100, whose layers are all matrix products, "
                "so each layer's FLOPs are proportional to its parameters and ERK spends the same FLOPs as uniform "
                "at every sparsity (the FLOP columns above).")))

    lines, held = [], True
    for s in sparsities:
        gains = {}
        for distribution in ("uniform (all layers)", "erk"):
            base = find(rows, "RigL", distribution, s)
            for variant in ("RigL-SG", "RigL-SM"):
                gains[distribution, variant] = compare(find(rows, variant, distribution, s), base)
        if any(verdict == "n/a" for verdict, _ in gains.values()):
            lines.append(f"{at(s)}: not run.")
            continue
        uniform_gain = max(d for (dist, _), (_, d) in gains.items() if dist != "erk")
        erk_gain = max(d for (dist, _), (_, d) in gains.items() if dist == "erk")
        held &= uniform_gain > erk_gain
        described = {key: f"{difference:+.2f} ({verdict})" for key, (verdict, difference) in gains.items()}
        lines.append(f"{at(s)}: over RigL uniform, SG {described['uniform (all layers)', 'RigL-SG']}, SM "
                     f"{described['uniform (all layers)', 'RigL-SM']}; over RigL ERK, SG "
                     f"{described['erk', 'RigL-SG']}, SM {described['erk', 'RigL-SM']}.")
    paragraphs.append(_claim("Redistribution (RigL-SG, RigL-SM) helps uniform more than ERK (report §6.2).", lines,
                             ("held" if held else "did not hold") + " (the larger gain of SG and SM, compared; "
                             "a gain inside the seed spread is a tie)"))

    lines, held = [], True
    for s in sparsities:
        small = find(rows, "Small-Dense", None, s)
        rigl, set_ = find(rows, "RigL", "erk", s), find(rows, "SET", "erk", s)
        held &= compare(rigl, small)[0] == "wins" and compare(set_, small)[0] == "wins"
        lines.append(f"{at(s)}: {versus(rigl, small, 'RigL', 'Small-Dense')}; "
                     f"{versus(set_, small, 'SET', 'Small-Dense')}.")
    paragraphs.append(_claim("Small-Dense (a narrower dense model with the same parameter count) loses to the dynamic "
                             "methods (RigL and SET, ERK).", lines, "held" if held else "did not hold"))
    return paragraphs + srigl_claim(rows, sparsities)


def srigl_claim(rows: Sequence[Row], sparsities: Sequence[float]) -> list[str]:
    """SRigL (constant fan-in, ablation) against RigL and Static at ERK, with its ablated neurons and its inference
    FLOPs; no paragraph when the study has no SRigL row."""
    lines, held = [], True
    for s in sparsities:
        srigl, rigl, static = (find(rows, m, "erk", s) for m in ("SRigL", "RigL", "Static"))
        if srigl is None:
            continue
        ablated = srigl.mean_std("ablated_neurons")
        flops = srigl.mean_std("forward_flops")
        lines.append(f"{at(s)}: {versus(srigl, rigl, 'SRigL', 'RigL')}; {versus(srigl, static, 'SRigL', 'Static')}; "
                     + ("" if ablated is None else f"ablated neurons {ablated[0]:.1f} (mean over seeds); ")
                     + ("" if flops is None else f"inference FLOPs {flops[0]:.3f}x dense") + ".")
        held &= compare(srigl, rigl)[0] in ("wins", "ties")
    if not lines:
        return []
    return [_claim("SRigL (constant fan-in, neuron ablation) matches RigL's accuracy (Lasby et al. 2024; ERK, 1x).",
                   lines, "held" if held else "did not hold")]


def _claim(claim: str, lines: Sequence[str], verdict: str) -> str:
    return f"**{claim}** Here: {verdict.rstrip('.')}.\n\n" + "\n".join(f"- {line}" for line in lines)


VIT_HEADING = "## A vision transformer"
VIT_SPARSITIES = (0.9, 0.95)


def vit_claims(rows: Sequence[Row], sparsities: Sequence[float]) -> list[str]:
    """The claims the ViT study can test: one paragraph each, as ``claims`` writes them."""
    paragraphs = []
    lines, held = [], True
    for s in sparsities:
        for distribution in ("erk", "uniform"):
            rigl, set_, static = (find(rows, m, distribution, s) for m in ("RigL", "SET", "Static"))
            lines.append(f"{at(s)} {distribution}: {versus(rigl, set_, 'RigL', 'SET')}; "
                         f"{versus(set_, static, 'SET', 'Static')}.")
            held &= compare(rigl, set_)[0] == "wins" and compare(set_, static)[0] == "wins"
    paragraphs.append(_claim("RigL beats SET beats Static.", lines, "held" if held else "did not hold"))

    lines, held = [], True
    for s in sparsities:
        line, verdict = erk_against_uniform(rows, s, "uniform")
        lines.append(line)
        held &= verdict == "wins"
    paragraphs.append(_claim("ERK beats uniform at the same parameter count (RigL).", lines,
                             ("held" if held else "did not hold") + ". Unlike LeNet's, a ViT's FLOPs do not follow "
                             "its parameters (attention's products of two activations stay dense; the patch "
                             "embedding and the head see other numbers of tokens), so the FLOP columns differ"))

    lines = []
    dense = find(rows, "Dense", None, 0.0)
    for s in sparsities:
        for distribution in ("erk", "uniform"):
            rigl = find(rows, "RigL", distribution, s)
            lines.append(f"{at(s)} {distribution}: {versus(rigl, dense, 'RigL', 'dense')}.")
    paragraphs.append(_claim("How far sparse training stays from dense (RigL).", lines, "see each line"))
    return paragraphs + srigl_claim(rows, sparsities)


def write_vit_section(report: Report, figures: Path, path: Path, seeds: int) -> Path:
    """The ViT study's section of the study's page: its claims, its table and its figures (copied next to the
    page as ``vit_*.png``, with its runs' records as ``vit_records.json``), in place of the page's earlier ViT
    section; the rest of the page is kept."""
    assets = path.parent / path.stem
    assets.mkdir(parents=True, exist_ok=True)
    images = []
    for figure in sorted(figures.glob("*.png")):
        shutil.copy(figure, assets / f"vit_{figure.name}")
        images.append(f"![vit_{figure.stem}]({assets.name}/vit_{figure.name})")
    records = assets / f"vit_{RECORDS_FILE}"
    if (figures / RECORDS_FILE).resolve() != records.resolve():
        shutil.copy(figures / RECORDS_FILE, records)
    sparsities = [s for s in VIT_SPARSITIES if any(abs(r.first["sparsity"] - s) < 1e-9 for r in report.rows)]
    redraw = f"python benchmarks/reproduce.py --study vit --from-records {records} --docs {path}"
    section = "\n\n".join([
        VIT_HEADING,
        "Written by `python benchmarks/reproduce.py --study vit --docs " + str(path) + "`: `vit_tiny` (torchvision's "
        "VisionTransformer, patches of 4×4, 4 blocks of 64 features in 4 heads, 139,018 parameters) on the real "
        "Fashion-MNIST, trained as transformers are (AdamW, 100 warm-up steps then cosine, gradients clipped to "
        "norm 1, label smoothing 0.1) for 1,290 steps (3 epochs, the budget two CPU cores allow for the study), "
        f"{seeds} seeds each. The sparse runs mask the patch embedding, every attention projection "
        "(`in_proj_weight`, `out_proj`), the MLPs and the head; class token, position embedding, norms and biases "
        "stay dense. `uniform` keeps the patch embedding (1,024 weights) dense. Ties as above. Drawn from "
        f"`{records}`; `{redraw}` draws it again without training.",
        *vit_claims(report.rows, sparsities),
        "### The ViT table",
        markdown_table(report.rows),
        "### The ViT figures",
        *images,
    ])
    page = path.read_text() if path.exists() else ""
    kept = page.split(VIT_HEADING)[0].rstrip()
    path.write_text((kept + "\n\n" if kept else "") + section + "\n")
    return path


def write_reproduction_doc(report: Report, figures: Path, path: Path, seeds: int, quick: bool) -> Path:
    """The study's page: how it was run, the claims, the table and the figures, copied next to the page with the
    run records they were drawn from (``records.json``, from which ``--from-records`` redraws them)."""
    sparsities = [s for s in SPARSITIES if any(abs(r.first["sparsity"] - s) < 1e-9 for r in report.rows)]
    assets = path.parent / path.stem
    assets.mkdir(parents=True, exist_ok=True)
    images = []
    for figure in sorted(figures.glob("*.png")):
        shutil.copy(figure, assets / figure.name)
        images.append(f"![{figure.stem}]({assets.name}/{figure.name})")
    if (figures / RECORDS_FILE).resolve() != (assets / RECORDS_FILE).resolve():
        shutil.copy(figures / RECORDS_FILE, assets / RECORDS_FILE)
    command = "python benchmarks/reproduce.py" + (" --quick" if quick else "") + " --docs " + str(path)
    redraw = f"python benchmarks/reproduce.py --from-records {assets / RECORDS_FILE} --docs {path}"
    text = "\n\n".join([
        "# The paper's claims on Fashion-MNIST",
        f"Written by `{command}` (`make reproduce`): LeNet-300-100 on the real Fashion-MNIST (55,000 training "
        "images, 5,000 held out, the 10,000 test images), every method of `recipes/fashion_mnist/` with the same "
        f"step budget (4,300 steps; 2x runs twice that), {seeds} seeds each, on this project's 2-core CPU machine. "
        "Accuracies are test top-1, mean ± standard deviation over seeds; a difference no larger than the larger "
        "of the two standard deviations is called a tie. The figures and this page are drawn from the runs' "
        f"records in `{assets / RECORDS_FILE}`; `{redraw}` draws them again without training.",
        "## The claims",
        *claims(report.rows, sparsities),
        "## The table",
        "Training FLOPs are a multiple of dense training at 1x; inference FLOPs of the final masks; size as the "
        "official README counts it. Small-Dense's sparsity is the fraction of the dense model's parameters it "
        "lacks. `uniform (all layers)` puts every layer at the sparsity.",
        markdown_table(report.rows),
        "## Figures",
        *images,
    ]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if VIT_HEADING in old:  # the ViT study's section, written by its own run
        text = text.rstrip() + "\n\n" + VIT_HEADING + old.split(VIT_HEADING, 1)[1]
    path.write_text(text)
    return path
