"""The paper's claims, checked against the rows of a report: one sentence per claim with the numbers behind it.

A difference no larger than the larger of the two standard deviations over seeds is a tie, not a win.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Metric:
    """The result the claims compare: a quantity of a row (``Row.values``), which way is better, how it reads."""

    key: str
    higher_is_better: bool
    noun: str  # "accuracy": what a claim says a method matches
    unit: str  # written after the mean ± std
    digits: int

    def worse(self, a: float, b: float) -> float:
        """How much worse ``a`` is than ``b`` (negative: better)."""
        return b - a if self.higher_is_better else a - b


TOP1 = Metric("test_top1", True, "accuracy", "%", 2)
BITS = Metric("test_bits_per_byte", False, "bits per byte", " bits/byte", 4)


def result(row: Row, metric: Metric = TOP1) -> str:
    stats = row.mean_std(metric.key)
    if stats is None:
        return "n/a"
    spread = " (1 seed)" if stats[2] == 1 else f" ± {stats[1]:.{metric.digits}f}"
    return f"{stats[0]:.{metric.digits}f}{spread}{metric.unit}"


def compare(a: Row | None, b: Row | None, metric: Metric = TOP1) -> tuple[str, float]:
    """"wins", "ties" or "loses" for ``a`` against ``b`` on ``metric`` (test top-1 by default), and the difference
    of the means, ``a`` minus ``b``, in the metric's units; "one seed" where a row has one run, whose spread is
    unknown, so that no difference can be told from a tie."""
    if a is None or b is None or a.mean_std(metric.key) is None or b.mean_std(metric.key) is None:
        return "n/a", 0.0
    (mean_a, std_a, n_a), (mean_b, std_b, n_b) = a.mean_std(metric.key), b.mean_std(metric.key)
    difference = mean_a - mean_b
    if min(n_a, n_b) < 2:
        return "one seed", difference
    if abs(difference) <= max(std_a, std_b):
        return "ties", difference
    return ("loses" if metric.worse(mean_a, mean_b) > 0 else "wins"), difference


def versus(a: Row | None, b: Row | None, label_a: str, label_b: str, metric: Metric = TOP1) -> str:
    if a is None or b is None:
        return f"{label_a} against {label_b}: not run"
    verdict, difference = compare(a, b, metric)
    if verdict == "one seed":
        return (f"{label_a} {result(a, metric)} against {label_b} {result(b, metric)} "
                f"({difference:+.{metric.digits}f}; no verdict on one seed)")
    return (f"{label_a} {result(a, metric)} {verdict} against {label_b} {result(b, metric)} "
            f"({difference:+.{metric.digits}f})")


def erk_against_uniform(rows: Sequence[Row], sparsity: float, uniform: str, metric: Metric = TOP1,
                        method: str = "RigL") -> tuple[str, str]:
    """``method`` ERK against ``method`` ``uniform`` (the distribution's recorded name) at ``sparsity``: a line with
    their results and their inference and training FLOPs, and the verdict ("wins", "ties", "loses" or "n/a")."""
    erk, other = find(rows, method, "erk", sparsity), find(rows, method, uniform, sparsity)
    if erk is None or other is None:
        return f"{at(sparsity)}: not run.", "n/a"
    costs = "; ".join(f"{what} FLOPs ERK {erk.mean_std(key)[0]:.3f}x, uniform {other.mean_std(key)[0]:.3f}x"
                      for what, key in (("inference", "forward_flops"), ("training", "train_flops")))
    return f"{at(sparsity)}: {versus(erk, other, 'ERK', 'uniform', metric)}; {costs}.", compare(erk, other, metric)[0]


def at(sparsity: float) -> str:
    return f"{100 * sparsity:g}%"


def claims(rows: Sequence[Row], sparsities: Sequence[float]) -> list[str]:
    """One paragraph per claim: the comparison at each sparsity, then whether the claim held here."""
    paragraphs = []
    high = [s for s in sparsities if s >= 0.95] or list(sparsities)

    lines, outcomes = [], []
    for s in sparsities:
        rigl, set_, static = (find(rows, m, "erk", s) for m in ("RigL", "SET", "Static"))
        lines.append(f"{at(s)}: {versus(rigl, set_, 'RigL', 'SET')}; {versus(set_, static, 'SET', 'Static')}.")
        if s in high:
            outcomes.append(_outcome(compare(rigl, set_)[0], compare(set_, static)[0]))
    paragraphs.append(_claim("RigL beats SET beats Static at high sparsity (ERK, 1x).", lines,
                             f"at {', '.join(map(at, high))}: " + _held(outcomes)))

    lines, outcomes = [], []
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
        outcomes.append(_outcome(compare(closest, pruning)[0], passing=("wins", "ties")))
        lines.append(f"{at(s)}: pruning trains at {budget:.2f}x dense; RigL {closest.first['multiplier']:g}x at "
                     f"{closest.mean_std('train_flops')[0]:.2f}x: "
                     + versus(closest, pruning, "RigL", "pruning") + ".")
    paragraphs.append(_claim("RigL matches or beats gradual magnitude pruning at about equal training FLOPs (RigL "
                             "at 1x or 2x, whichever spends closer to pruning's training FLOPs).", lines,
                             _held(outcomes)))

    lines, outcomes = [], []
    dense = find(rows, "Dense", None, 0.0)
    for s, one, two in _rigl_1x_and_2x(rows, sparsities, dense, lines):
        (verdict_one, difference_one), (verdict_two, difference_two) = compare(one, dense), compare(two, dense)
        gap_one, gap_two = -difference_one, -difference_two
        outcomes.append(None if "one seed" in (verdict_one, verdict_two) else
                        gap_two < gap_one or verdict_two in ("ties", "wins"))
        against = "no verdict on one seed" if verdict_two == "one seed" else f"RigL 2x {verdict_two} against dense"
        lines.append(f"{at(s)}: dense {result(dense)}; gap to RigL 1x {gap_one:+.2f}, to RigL 2x {gap_two:+.2f} "
                     f"({against}).")
    paragraphs.append(_claim("RigL 2x closes the gap to dense (ERK).", lines, _held(outcomes)))

    lines, outcomes = [], []
    for s in sparsities:
        line, verdict = erk_against_uniform(rows, s, "uniform (all layers)")
        lines.append(line)
        outcomes.append(_outcome(verdict))
    paragraphs.append(_claim(
        "ERK beats uniform at a fixed parameter count, but not at a fixed FLOP budget (report §6.1; RigL, 1x).",
        lines, ("at a fixed parameter count: " + _held(outcomes)
                + ". At a fixed FLOP budget: not testable on LeNet-300-100, whose layers are all matrix products, "
                "so each layer's FLOPs are proportional to its parameters and ERK spends the same FLOPs as uniform "
                "at every sparsity (the FLOP columns above).")))

    lines, outcomes = [], []
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
        outcomes.append(None if any(verdict == "one seed" for verdict, _ in gains.values()) else
                        uniform_gain > erk_gain)
        described = {key: f"{difference:+.2f} ({verdict})" for key, (verdict, difference) in gains.items()}
        lines.append(f"{at(s)}: over RigL uniform, SG {described['uniform (all layers)', 'RigL-SG']}, SM "
                     f"{described['uniform (all layers)', 'RigL-SM']}; over RigL ERK, SG "
                     f"{described['erk', 'RigL-SG']}, SM {described['erk', 'RigL-SM']}.")
    paragraphs.append(_claim("Redistribution (RigL-SG, RigL-SM) helps uniform more than ERK (report §6.2).", lines,
                             _held(outcomes) + " (the larger gain of SG and SM, compared; "
                             "a gain inside the seed spread is a tie)"))

    lines, outcomes = [], []
    for s in sparsities:
        small = find(rows, "Small-Dense", None, s)
        rigl, set_ = find(rows, "RigL", "erk", s), find(rows, "SET", "erk", s)
        outcomes.append(_outcome(compare(rigl, small)[0], compare(set_, small)[0]))
        lines.append(f"{at(s)}: {versus(rigl, small, 'RigL', 'Small-Dense')}; "
                     f"{versus(set_, small, 'SET', 'Small-Dense')}.")
    paragraphs.append(_claim("Small-Dense (a narrower dense model with the same parameter count) loses to the dynamic "
                             "methods (RigL and SET, ERK).", lines, _held(outcomes)))
    return paragraphs + srigl_claim(rows, sparsities)


def srigl_claim(rows: Sequence[Row], sparsities: Sequence[float], metric: Metric = TOP1) -> list[str]:
    """SRigL (constant fan-in, ablation) against RigL and Static at ERK, with its ablated neurons and its inference
    FLOPs; no paragraph when the study has no SRigL row."""
    lines, outcomes = [], []
    for s in sparsities:
        srigl, rigl, static = (find(rows, m, "erk", s) for m in ("SRigL", "RigL", "Static"))
        if srigl is None:
            continue
        ablated = srigl.mean_std("ablated_neurons")
        flops = srigl.mean_std("forward_flops")
        lines.append(f"{at(s)}: {versus(srigl, rigl, 'SRigL', 'RigL', metric)}; "
                     f"{versus(srigl, static, 'SRigL', 'Static', metric)}; "
                     + ("" if ablated is None else f"ablated neurons {ablated[0]:.1f} (mean over seeds); ")
                     + ("" if flops is None else f"inference FLOPs {flops[0]:.3f}x dense") + ".")
        outcomes.append(_outcome(compare(srigl, rigl, metric)[0], passing=("wins", "ties")))
    if not lines:
        return []
    return [_claim(f"SRigL (constant fan-in, neuron ablation) matches RigL's {metric.noun} (Lasby et al. 2024; ERK, "
                   "1x).", lines, _held(outcomes))]


def _rigl_1x_and_2x(rows: Sequence[Row], sparsities: Sequence[float], dense: Row | None,
                    lines: list[str]) -> Iterator[tuple[float, Row, Row]]:
    """(sparsity, RigL ERK 1x, RigL ERK 2x) at each sparsity where they and ``dense`` ran; a "not run" line in
    ``lines`` for each other."""
    for s in sparsities:
        one, two = find(rows, "RigL", "erk", s, 1), find(rows, "RigL", "erk", s, 2)
        if dense is None or one is None or two is None:
            lines.append(f"{at(s)}: not run.")
        else:
            yield s, one, two


def _claim(claim: str, lines: Sequence[str], verdict: str) -> str:
    return f"**{claim}** Here: {verdict.rstrip('.')}.\n\n" + "\n".join(f"- {line}" for line in lines)


VIT_HEADING = "## A vision transformer"
VIT_SPARSITIES = (0.9, 0.95)


def vit_claims(rows: Sequence[Row], sparsities: Sequence[float]) -> list[str]:
    """The claims the ViT study can test: one paragraph each, as ``claims`` writes them."""
    paragraphs = []
    lines, outcomes = [], []
    for s in sparsities:
        for distribution in ("erk", "uniform"):
            rigl, set_, static = (find(rows, m, distribution, s) for m in ("RigL", "SET", "Static"))
            lines.append(f"{at(s)} {distribution}: {versus(rigl, set_, 'RigL', 'SET')}; "
                         f"{versus(set_, static, 'SET', 'Static')}.")
            outcomes.append(_outcome(compare(rigl, set_)[0], compare(set_, static)[0]))
    paragraphs.append(_claim("RigL beats SET beats Static.", lines, _held(outcomes)))

    lines, outcomes = [], []
    for s in sparsities:
        line, verdict = erk_against_uniform(rows, s, "uniform")
        lines.append(line)
        outcomes.append(_outcome(verdict))
    paragraphs.append(_claim("ERK beats uniform at the same parameter count (RigL).", lines,
                             _held(outcomes) + ". Unlike LeNet's, a ViT's FLOPs do not follow "
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
    images, records = _copy_assets(figures, path, "vit_")
    sparsities = [s for s in VIT_SPARSITIES if any(abs(r.first["sparsity"] - s) < 1e-9 for r in report.rows)]
    redraw = f"python benchmarks/reproduce.py --study vit --from-records {records} --docs {path}"
    _replace_section(path, VIT_HEADING, "\n\n".join([
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
    ]))
    return path


LM_HEADING = "## A language model"
LM_SPARSITIES = (0.75, 0.9)
# q·kᵀ and the weighted sum of the values: 2 FLOPs per multiply-add, context x width multiply-adds each, per token and
# block (4 blocks of 192 features, a context of 256).
GPT_TINY_ATTENTION_FLOPS = 2 * 2 * 256 * 192 * 4
LM_UNIFORM = "uniform (all layers)"  # the recipes' uniform: every projection at the sparsity, as results.json names it
# The study's sections after the Fashion-MNIST page's own text, in this order; each is rewritten by its study.
STUDY_HEADINGS = (VIT_HEADING, LM_HEADING)


def lm_claims(rows: Sequence[Row], sparsities: Sequence[float]) -> list[str]:
    """The paper's questions for the language model, on test bits per byte (lower is better): one paragraph
    each, as ``claims`` writes them; a question none of whose rows ran is "not run"."""
    paragraphs = []
    lines, outcomes = [], []
    for s in sparsities:
        for distribution in ("erk", LM_UNIFORM):
            rigl, set_, static = (find(rows, m, distribution, s) for m in ("RigL", "SET", "Static"))
            lines.append(f"{at(s)} {distribution.split()[0]}: {versus(rigl, set_, 'RigL', 'SET', BITS)}; "
                         f"{versus(set_, static, 'SET', 'Static', BITS)}.")
            if None not in (rigl, set_, static):
                outcomes.append(_outcome(compare(rigl, set_, BITS)[0], compare(set_, static, BITS)[0]))
    paragraphs.append(_claim("RigL beats SET beats Static.", lines, _held(outcomes)))

    lines, outcomes = [], []
    for s in sparsities:
        for method in ("RigL", "SET", "Static"):
            line, verdict = erk_against_uniform(rows, s, LM_UNIFORM, BITS, method)
            lines.append(f"{method} {line}")
            if method == "RigL" and verdict != "n/a":
                outcomes.append(_outcome(verdict))
    paragraphs.append(_claim(
        "ERK beats uniform at the same parameter count (RigL; SET and Static shown too).", lines,
        _held(outcomes) + ". Every sparse layer here is a projection applied once per token, so FLOPs follow "
        "parameters and ERK spends what uniform spends"))

    lines, outcomes = [], []
    dense = find(rows, "Dense", None, 0.0)
    for s, one, two in _rigl_1x_and_2x(rows, sparsities, dense, lines):
        means = {name: row.mean_std(BITS.key)[0] for name, row in (("dense", dense), ("1x", one), ("2x", two))}
        gap_one, gap_two = BITS.worse(means["1x"], means["dense"]), BITS.worse(means["2x"], means["dense"])
        outcomes.append(_outcome(compare(two, one, BITS)[0]))
        closed = (" (RigL 1x is not behind dense)" if gap_one <= 0 else " (RigL 2x ends ahead of dense)"
                  if gap_two < 0 else f" ({1 - gap_two / gap_one:.0%} of it closed)")
        lines.append(f"{at(s)}: dense {result(dense, BITS)}; {versus(two, one, 'RigL 2x', 'RigL 1x', BITS)}; the gap "
                     f"to dense {gap_one:.4f} bits/byte at 1x, {gap_two:.4f} at 2x{closed} for "
                     f"{two.mean_std('train_flops')[0]:.2f}x dense training FLOPs.{_halfway(one, two)}")
    paragraphs.append(_claim("RigL at 2x the steps narrows the gap to dense (ERK).", lines, _held(outcomes)))

    lines = []
    for s in sparsities:
        for distribution in ("erk", LM_UNIFORM):
            lines.append(f"{at(s)} {distribution.split()[0]}: "
                         f"{versus(find(rows, 'RigL', distribution, s), dense, 'RigL', 'dense', BITS)}.")
    paragraphs.append(_claim("How far sparse training stays from dense (RigL).", lines, "see each line"))
    return paragraphs + srigl_claim(rows, sparsities, BITS)


def _halfway(one: Row, two: Row) -> str:
    """The validation of the 2x row at the last step of the 1x row's, beside the 1x row's (a sentence; empty
    where either row logged no validation curve there)."""
    at_end = dict((step, (mean, spread)) for step, mean, spread in one.curve("bits_per_byte"))
    halfway = dict((step, (mean, spread)) for step, mean, spread in two.curve("bits_per_byte"))
    if not at_end or max(at_end) not in halfway:
        return ""
    step = max(at_end)  # the logger's steps count from 0
    return (f" After {step + 1:,} steps, where RigL 1x ends, RigL 2x validates at {halfway[step][0]:.4f} ± "
            f"{halfway[step][1]:.4f} bits/byte against 1x's {at_end[step][0]:.4f} ± {at_end[step][1]:.4f}, after "
            "the same tokens and with its learning rate less decayed (the figure of bits per byte over training).")


def _held(outcomes: Sequence[bool | None]) -> str:
    """A claim's verdict from its comparisons that ran (None: one that has a row of one seed, which no verdict
    counts)."""
    if not outcomes:
        return "not run"
    decided = [outcome for outcome in outcomes if outcome is not None]
    if not decided:
        return "no verdict yet (rows of one seed)"
    verdict = "held" if all(decided) else "did not hold"
    uncounted = len(outcomes) - len(decided)
    return verdict + (f" ({uncounted} comparison{'s' * (uncounted > 1)} of one seed not counted)" if uncounted else "")


def _outcome(*verdicts: str, passing: Sequence[str] = ("wins",)) -> bool | None:
    """Whether every verdict is one of ``passing``; None when one of them rests on one seed."""
    return None if "one seed" in verdicts else all(verdict in passing for verdict in verdicts)


def write_lm_section(report: Report, figures: Path, path: Path, seeds: int) -> Path:
    """The language-model study's section of the study's page: how it ran, its claims, its costs per token, its
    table and its figures (copied next to the page as ``lm_*.png``, with its runs' records as
    ``lm_records.json``), in place of the page's earlier section of it; the rest of the page is kept."""
    images, records = _copy_assets(figures, path, "lm_")
    sparsities = [s for s in LM_SPARSITIES if any(abs(r.first["sparsity"] - s) < 1e-9 for r in report.rows)]
    corpus = report.rows[0].first["corpus"]
    runs = sorted(len(row.runs) for row in report.rows)
    counted = f"{seeds} seeds each" if runs[0] == runs[-1] == seeds else f"{runs[0]} to {runs[-1]} seeds a row " \
        "(the table's runs column)"
    redraw = f"python benchmarks/reproduce.py --study lm --from-records {records} --docs {path}"
    _replace_section(path, LM_HEADING, "\n\n".join([
        f"Written by `python benchmarks/reproduce.py --study lm --docs {path}`: `gpt_tiny` (4 pre-norm blocks of "
        "192 features in 6 heads, context 256, 1,878,144 parameters with the tied byte embedding) trained on the "
        f"source of the Python {corpus['python']} standard library without its tests ({corpus['files']} files, "
        f"{corpus['bytes'] / 1e6:.1f} MB, digest `{corpus['digest'][:12]}…`; split by document: "
        f"{corpus['splits']['train']['bytes'] / 1e6:.2f} MB to train, {corpus['splits']['val']['bytes'] / 1e6:.2f} MB "
        f"to validate, {corpus['splits']['test']['bytes'] / 1e6:.2f} MB to test), byte-level, every recipe of "
        "`recipes/python_gpt_tiny/` with one token budget: 1,000 steps of 16 windows of 256 bytes, 4.1M tokens (2x "
        f"runs twice that), {counted}. AdamW (betas 0.9/0.95, weight decay 0.1), 100 warm-up steps then cosine from "
        "1e-3, gradients clipped to norm 1. The sparse runs mask the query, key, value, output and MLP projections "
        "(24 layers); the tied embedding and head, the position embedding, norms and biases stay dense. `uniform` "
        "puts every projection at the sparsity. The result is the test split's bits per byte (its 0.89M bytes; "
        "lower is better); the table also gives the last validation (50 batches of the validation split). About "
        "a tenth of every split (14% of the test split) is the codec tables of `encodings/` (`cp*.py`, `mac_*.py`, "
        "`iso8859_*.py`), near copies of one another across the splits: absolute bits per byte are lower than on "
        "text without such repeats, while the methods are compared on the same bytes. Ties "
        f"as above: a difference no larger than the larger standard deviation. Drawn from `{records}`; `{redraw}` "
        "draws it again without training.",
        *lm_claims(report.rows, sparsities),
        "### Costs per token",
        _lm_costs(report.rows),
        "### The language-model table",
        markdown_table(report.rows),
        "### The language-model figures",
        *images,
    ]))
    return path


def _lm_costs(rows: Sequence[Row]) -> str:
    """FLOPs per token and throughput of the language-model rows, as a paragraph."""
    dense = find(rows, "Dense", None, 0.0)
    flops = {}
    for s in LM_SPARSITIES:
        row = find(rows, "RigL", "erk", s)
        if row is not None and row.mean_std("forward_flops_per_token") is not None:
            flops[s] = row.mean_std("forward_flops_per_token")[0]
    speeds = [row.mean_std("tokens_per_second") for row in rows if row.mean_std("tokens_per_second") is not None]
    counted = dense is not None and None not in (dense.mean_std("forward_flops_per_token"),
                                                 dense.mean_std("train_flops_per_token"))
    text = ("" if not counted else
            f"Dense inference costs {dense.mean_std('forward_flops_per_token')[0] / 1e6:.2f}M FLOPs per token and "
            f"training {dense.mean_std('train_flops_per_token')[0] / 1e6:.2f}M (three forward passes' worth, the "
            "paper's accounting). ")
    sparse_costs = "; ".join(f"at {at(s)} (RigL ERK) inference costs {value / 1e6:.2f}M" for s, value in flops.items())
    text += sparse_costs[:1].upper() + sparse_costs[1:]
    text += (f". Attention's two products of activations (q·kᵀ and the weighted sum of the values, "
             f"{GPT_TINY_ATTENTION_FLOPS / 1e6:.2f}M FLOPs per token at a context of 256) and the dense tied head do "
             "not shrink with the weights, so 90% sparse projections buy far less than a 10× saving. Those products "
             "are counted over the whole 256 × 256 square of scores, as `torch.utils.flop_counter` counts them; a "
             "causal kernel computes about half of it")
    ninety = flops.get(0.9)
    if counted and ninety is not None:
        dense_flops, half = dense.mean_std("forward_flops_per_token")[0], GPT_TINY_ATTENTION_FLOPS / 2
        text += (f", which would put 90% RigL ERK at {(ninety - half) / (dense_flops - half):.2f}x dense instead of "
                 f"{ninety / dense_flops:.2f}x")
    text += "."
    if speeds:
        low, high = min(speed[0] for speed in speeds), max(speed[0] for speed in speeds)
        text += (f" Throughput: {low:,.0f} to {high:,.0f} tokens per second per run (the table's tokens/s: the median "
                 "batch, one thread per run, two runs sharing the two cores and at times other work, so compare "
                 "within a row's spread), every run with dense kernels: at "
                 "these layer sizes (192↔768, 4,096 rows) sparse kernels are slower on this CPU, and `\"auto\"` keeps "
                 "them dense.")
    return text


def _copy_assets(figures: Path, path: Path, prefix: str) -> tuple[list[str], Path]:
    """The report's figures and its run records copied next to the page ``path`` (in the folder of its name,
    each name prefixed); the figures' image lines and the records' path."""
    assets = path.parent / path.stem
    assets.mkdir(parents=True, exist_ok=True)
    images = []
    for figure in sorted(figures.glob("*.png")):
        shutil.copy(figure, assets / f"{prefix}{figure.name}")
        images.append(f"![{prefix}{figure.stem}]({assets.name}/{prefix}{figure.name})")
    records = assets / f"{prefix}{RECORDS_FILE}"
    if (figures / RECORDS_FILE).resolve() != records.resolve():
        shutil.copy(figures / RECORDS_FILE, records)
    return images, records


def _replace_section(path: Path, heading: str, text: str) -> None:
    """Writes ``text`` as the page's section ``heading`` (one of STUDY_HEADINGS, or "" for the page's own text
    before them), replacing what it held; the other sections are kept, in STUDY_HEADINGS' order."""
    page = path.read_text() if path.exists() else ""
    pieces = re.split("^(" + "|".join(map(re.escape, STUDY_HEADINGS)) + ")$", page, flags=re.MULTILINE)
    sections = {"": pieces[0].strip(), **{pieces[i]: pieces[i + 1].strip() for i in range(1, len(pieces), 2)}}
    sections[heading] = text.strip()
    parts = [sections[""]] if sections[""] else []
    parts += [f"{name}\n\n{sections[name]}" for name in STUDY_HEADINGS if name in sections]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")


def write_reproduction_doc(report: Report, figures: Path, path: Path, seeds: int, quick: bool) -> Path:
    """The study's page: how it was run, the claims, the table and the figures, copied next to the page with the
    run records they were drawn from (``records.json``, from which ``--from-records`` redraws them)."""
    sparsities = [s for s in SPARSITIES if any(abs(r.first["sparsity"] - s) < 1e-9 for r in report.rows)]
    images, records = _copy_assets(figures, path, "")
    command = "python benchmarks/reproduce.py" + (" --quick" if quick else "") + " --docs " + str(path)
    redraw = f"python benchmarks/reproduce.py --from-records {records} --docs {path}"
    text = "\n\n".join([
        "# The paper's claims on Fashion-MNIST",
        f"Written by `{command}` (`make reproduce`): LeNet-300-100 on the real Fashion-MNIST (55,000 training "
        "images, 5,000 held out, the 10,000 test images), every method of `recipes/fashion_mnist/` with the same "
        f"step budget (4,300 steps; 2x runs twice that), {seeds} seeds each, on this project's 2-core CPU machine. "
        "Accuracies are test top-1, mean ± standard deviation over seeds; a difference no larger than the larger "
        "of the two standard deviations is called a tie. The figures and this page are drawn from the runs' "
        f"records in `{records}`; `{redraw}` draws them again without training.",
        "## The claims",
        *claims(report.rows, sparsities),
        "## The table",
        "Training FLOPs are a multiple of dense training at 1x; inference FLOPs of the final masks; size as the "
        "official README counts it. Small-Dense's sparsity is the fraction of the dense model's parameters it "
        "lacks. `uniform (all layers)` puts every layer at the sparsity.",
        markdown_table(report.rows),
        "## Figures",
        *images,
    ])
    _replace_section(path, "", text)  # the ViT and language-model sections, written by their own studies, stay
    return path
