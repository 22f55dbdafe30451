"""The Fashion-MNIST study's plumbing (benchmarks/reproduce.py) and its claim sentences (benchmarks/claims.py):
the job list and per-seed configs, and the tie rule on hand-made rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from lightning_rigl.report import Row, Run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import claims  # noqa: E402
import reproduce  # noqa: E402


def test_the_study_runs_every_recipe_per_seed_with_tickets_after_their_pruning_runs() -> None:
    jobs = reproduce.jobs("fashion_mnist", quick=False, seeds=3)
    recipes = {job.recipe for job in jobs}
    assert len(recipes) == 63 and len(jobs) == 3 * 63 and len(set(jobs)) == len(jobs)
    for position, job in enumerate(jobs):
        if job.depends_on() is not None:
            assert jobs.index(job.depends_on()) < position
    quick = reproduce.jobs("fashion_mnist", quick=True, seeds=2)
    assert {job.recipe for job in quick} == {"dense"} | {r for r in recipes if "_s90" in r}
    # The quick set's whole seeds come first: a study stopped early holds the central comparison.
    assert jobs[:3 * len(quick) // 2] == reproduce.jobs("fashion_mnist", quick=True, seeds=3)
    assert [job.seed for job in jobs[:3 * len(quick) // 2]] == sorted(job.seed for job in jobs[:3 * len(quick) // 2])
    assert reproduce.Job("fashion_mnist", "lottery_global_s90", 1).depends_on() == reproduce.Job(
        "fashion_mnist", "pruning_global_s90", 1)
    vit = reproduce.jobs("fashion_mnist_vit", quick=False, seeds=3)
    assert len(vit) == 3 * 15 and {job.recipe_file.parent.name for job in vit} == {"fashion_mnist_vit"}


def test_each_runs_config_has_its_seed_its_folder_and_its_own_ticket(tmp_path: Path) -> None:
    pruning = reproduce.Job("fashion_mnist", "pruning_global_s90", 2)
    ticket = reproduce.Job("fashion_mnist", "lottery_global_s90", 2)
    config = yaml.safe_load(reproduce.run_config(pruning, tmp_path).read_text())
    callbacks = {cb["class_path"].rsplit(".", 1)[1]: cb["init_args"] for cb in config["trainer"]["callbacks"]}
    assert config["seed_everything"] == 2 and callbacks["GradualMagnitudePruning"]["seed"] == 2
    assert Path(callbacks["ModelCheckpoint"]["dirpath"]) / "final.ckpt" == ticket.pruning_checkpoint(tmp_path)
    assert config["trainer"]["logger"]["init_args"] == {"save_dir": str(tmp_path / "runs"),
                                                       "name": "fashion_mnist/pruning_global_s90",
                                                       "version": "seed_2"}
    ticket_config = yaml.safe_load(reproduce.run_config(ticket, tmp_path).read_text())
    (lottery,) = [cb for cb in ticket_config["trainer"]["callbacks"] if cb["class_path"].endswith("LotteryTicket")]
    assert lottery["init_args"]["checkpoint"] == str(ticket.pruning_checkpoint(tmp_path))


def row(method: str, accuracies: list[float], distribution: str | None = "erk", sparsity: float = 0.9,
        multiplier: float = 1, train: float = 0.1, forward: float = 0.1, **extra: float) -> Row:
    runs = [Run(Path(f"{method}{i}"), {"model": "m", "data": "d", "method": method, "distribution": distribution,
                                       "sparsity": sparsity, "achieved_sparsity": sparsity, "multiplier": multiplier,
                                       "test": {"test/acc_top1": a / 100}, "train_ratio": train,
                                       "forward_ratio": forward, "size_bytes": 1.0, "densities": {}, **extra}, {}, [])
            for i, a in enumerate(accuracies)]
    return Row(runs)


def test_a_difference_inside_the_seed_spread_is_a_tie() -> None:
    assert claims.compare(row("RigL", [90, 91]), row("SET", [89.5, 90.5]))[0] == "ties"  # +0.5, std 0.71
    verdict, difference = claims.compare(row("RigL", [90, 90.2]), row("SET", [88, 88.2]))
    assert verdict == "wins" and difference == pytest.approx(2.0)
    assert claims.compare(row("SET", [88, 88.2]), row("RigL", [90, 90.2]))[0] == "loses"
    assert claims.compare(None, row("SET", [88]))[0] == "n/a"


def test_the_claims_say_held_or_not_with_the_numbers() -> None:
    rows = [row("Dense", [92, 92.2], None, 0.0), row("RigL", [90, 90.2]), row("SET", [88, 88.2]),
            row("Static", [89.9, 90.3]), row("RigL", [91, 91.2], multiplier=2, train=0.2),
            row("GradualMagnitudePruning", [89, 89.2], "global", train=0.5), row("Small-Dense", [85, 85.4], None)]
    paragraphs = claims.claims(rows, [0.9])
    assert paragraphs[0].startswith("**RigL beats SET beats Static at high sparsity (ERK, 1x).** Here: at 90%: did "
                                    "not hold")  # SET loses to Static
    assert "RigL 90.10 ± 0.14% wins against SET 88.10 ± 0.14% (+2.00)" in paragraphs[0]
    assert "Here: held" in paragraphs[1] and "RigL 2x at 0.40x" in paragraphs[1]  # 2 x 0.2: closer to pruning's 0.50x
    assert "Here: held" in paragraphs[2] and "gap to RigL 1x +2.00, to RigL 2x +1.00" in paragraphs[2]
    assert "not run" in paragraphs[3] and "not run" in paragraphs[4]
    assert "Here: held" in paragraphs[5]


def test_the_srigl_claim_counts_ablated_neurons_and_is_left_out_without_srigl() -> None:
    rows = [row("RigL", [90, 90.2]), row("Static", [88, 88.2]), row("SRigL", [90.1, 90.3], ablated_neurons=12)]
    (paragraph,) = claims.srigl_claim(rows, [0.9, 0.95])
    assert paragraph.startswith("**SRigL (constant fan-in, neuron ablation) matches RigL's accuracy")
    assert "Here: held" in paragraph and "SRigL 90.20 ± 0.14% ties against RigL 90.10 ± 0.14% (+0.10)" in paragraph
    assert "ablated neurons 12.0" in paragraph and "inference FLOPs 0.100x dense" in paragraph
    assert "95%" not in paragraph  # no SRigL row there
    assert claims.srigl_claim(rows[:2], [0.9]) == []
    assert claims.claims(rows, [0.9])[-1] == paragraph and claims.vit_claims(rows, [0.9])[-1] == paragraph


def test_the_vit_claims_and_its_section_beside_the_lenet_page(tmp_path: Path) -> None:
    rows = [row("Dense", [88, 88.2], None, 0.0)]
    for distribution, shift in (("erk", 0.5), ("uniform", 0.0)):
        rows += [row("RigL", [86 + shift, 86.2 + shift], distribution, forward=0.1 + shift / 10),
                 row("SET", [85 + shift, 85.2 + shift], distribution), row("Static", [84, 84.2], distribution)]
    paragraphs = claims.vit_claims(rows, [0.9])
    assert paragraphs[0].startswith("**RigL beats SET beats Static.** Here: held")
    assert "90% uniform: RigL 86.10 ± 0.14% wins against SET 85.10 ± 0.14% (+1.00)" in paragraphs[0]
    assert "Here: held" in paragraphs[1] and "inference FLOPs ERK 0.150x, uniform 0.100x" in paragraphs[1]
    assert "90% erk: RigL 86.60 ± 0.14% loses against dense 88.10 ± 0.14% (-1.50)" in paragraphs[2]

    page, figures = tmp_path / "reproduction.md", tmp_path / "report"
    figures.mkdir()
    (figures / "records.json").write_text("{}")
    (figures / "accuracy_vs_sparsity.png").write_bytes(b"png")
    page.write_text("# The paper's claims\n\nthe LeNet study\n")
    report = claims.Report(rows)
    claims.write_vit_section(report, figures, page, seeds=2)
    text = page.read_text()
    assert text.startswith("# The paper's claims\n\nthe LeNet study\n\n## A vision transformer")
    assert (tmp_path / "reproduction" / "vit_accuracy_vs_sparsity.png").exists()
    assert (tmp_path / "reproduction" / "vit_records.json").exists()
    claims.write_vit_section(report, figures, page, seeds=2)  # once more: replaced, not repeated
    assert page.read_text() == text
    claims.write_reproduction_doc(report, figures, page, seeds=3, quick=False)  # the LeNet page keeps it
    assert page.read_text().count("## A vision transformer") == 1 and "3 seeds each" in page.read_text()


def lm_row(method: str, bits: list[float], distribution: str | None = "erk", sparsity: float = 0.9,
           multiplier: float = 1, train: float = 0.3) -> Row:
    runs = [Run(Path(f"{method}{i}"), {"model": "gpt_tiny", "data": "TextDataModule", "method": method,
                                       "distribution": distribution, "sparsity": sparsity,
                                       "achieved_sparsity": sparsity, "multiplier": multiplier,
                                       "test": {"test/bits_per_byte": b}, "train_ratio": train, "forward_ratio": 0.28,
                                       "size_bytes": 1.0, "densities": {}}, {}, [])
            for i, b in enumerate(bits)]
    return Row(runs)


def test_fewer_bits_per_byte_win() -> None:
    verdict, difference = claims.compare(lm_row("RigL", [3.20, 3.21]), lm_row("SET", [3.30, 3.31]), claims.BITS)
    assert verdict == "wins" and difference == pytest.approx(-0.1)
    assert claims.compare(lm_row("SET", [3.30, 3.31]), lm_row("RigL", [3.20, 3.21]), claims.BITS)[0] == "loses"
    assert claims.compare(lm_row("RigL", [3.20, 3.22]), lm_row("SET", [3.21, 3.23]), claims.BITS)[0] == "ties"


def test_the_language_model_claims_read_bits_per_byte_and_say_not_run_for_missing_rows() -> None:
    rows = [lm_row("Dense", [2.60, 2.61], None, 0.0, train=1.0)]
    for distribution, shift in (("erk", 0.0), ("uniform (all layers)", 0.1)):
        rows += [lm_row("RigL", [3.20 + shift, 3.21 + shift], distribution),
                 lm_row("SET", [3.25 + shift, 3.26 + shift], distribution),
                 lm_row("Static", [3.30 + shift, 3.31 + shift], distribution)]
    rows.append(lm_row("RigL", [3.00, 3.01], multiplier=2))
    paragraphs = claims.lm_claims(rows, [0.9, 0.75])
    assert paragraphs[0].startswith("**RigL beats SET beats Static.** Here: held.")  # 75% not run: not counted
    assert ("90% erk: RigL 3.2050 ± 0.0071 bits/byte wins against SET 3.2550 ± 0.0071 bits/byte (-0.0500)"
            in paragraphs[0]) and "75% erk: RigL against SET: not run" in paragraphs[0]
    assert "Here: held" in paragraphs[1] and "RigL 90%: ERK 3.2050 ± 0.0071 bits/byte wins against uniform" \
        in paragraphs[1]
    # The gap to dense: 0.600 at 1x, 0.400 at 2x, a third of it closed, for 2 x 0.3 = 0.60x dense training FLOPs.
    assert "Here: held" in paragraphs[2] and "the gap to dense 0.6000 bits/byte at 1x, 0.4000 at 2x (33% of it " \
        "closed) for 0.60x dense training FLOPs" in paragraphs[2]
    assert "where RigL 1x ends" not in paragraphs[2]  # no validation curves logged
    ahead = [row if row.first["multiplier"] != 2 else lm_row("RigL", [2.50, 2.51], multiplier=2) for row in rows]
    assert "-0.1000 at 2x (RigL 2x ends ahead of dense)" in claims.lm_claims(ahead, [0.9])[2]
    one, two = rows[1], rows[-1]
    for row, curve in ((one, [[499, 3.4], [999, 3.3]]), (two, [[999, 3.0], [1999, 2.9]])):
        for shift, run in zip((-0.01, 0.01), row.runs):
            run.record["validation_curves"] = {"bits_per_byte": [[step, bits + shift] for step, bits in curve]}
    assert ("After 1,000 steps, where RigL 1x ends, RigL 2x validates at 3.0000 ± 0.0141 bits/byte against 1x's "
            "3.3000 ± 0.0141" in claims.lm_claims(rows, [0.9])[2])
    assert claims.lm_claims(rows[:1], [0.9])[0].startswith("**RigL beats SET beats Static.** Here: not run.")
    worse_set = [row if row.first["method"] != "SET" else lm_row("SET", [3.40, 3.41], row.first["distribution"])
                 for row in rows]
    assert claims.lm_claims(worse_set, [0.9])[0].startswith("**RigL beats SET beats Static.** Here: did not hold.")


def test_each_study_rewrites_its_own_section_of_the_page_and_keeps_the_others(tmp_path: Path) -> None:
    page, figures = tmp_path / "reproduction.md", tmp_path / "report"
    figures.mkdir()
    (figures / "records.json").write_text("{}")
    (figures / "bits_per_byte_vs_sparsity.png").write_bytes(b"png")
    page.write_text("# The paper's claims\n\nthe LeNet study\n")
    vit_rows = [row("Dense", [88, 88.2], None, 0.0), row("RigL", [86, 86.2])]
    corpus = {"python": "3.11.7", "files": 3, "bytes": 3e6, "digest": "ab" * 32,
              "splits": {split: {"bytes": 1e6} for split in ("train", "val", "test")}}
    lm_rows = [lm_row("Dense", [2.6, 2.61], None, 0.0), lm_row("RigL", [3.2, 3.21])]
    for run in lm_rows[0].runs + lm_rows[1].runs:
        run.record.update(corpus=corpus, forward_flops_per_token=1e6, train_flops_per_token=3e6)
    claims.write_lm_section(claims.Report(lm_rows), figures, page, seeds=2)
    claims.write_vit_section(claims.Report(vit_rows), figures, page, seeds=2)
    text = page.read_text()
    assert text.index("the LeNet study") < text.index("## A vision transformer") < text.index("## A language model")
    assert (tmp_path / "reproduction" / "lm_bits_per_byte_vs_sparsity.png").exists()
    assert "Python 3.11.7" in text and "2 seeds each" in text
    claims.write_lm_section(claims.Report(lm_rows), figures, page, seeds=2)  # again: replaced, not repeated
    claims.write_reproduction_doc(claims.Report(vit_rows), figures, page, seeds=3, quick=False)
    again = page.read_text()
    assert again.count("## A language model") == again.count("## A vision transformer") == 1
    assert again.split("## A vision transformer")[1] == text.split("## A vision transformer")[1]


def test_a_row_of_one_seed_gets_no_verdict() -> None:
    """One run has no spread: a difference from it cannot be told from a tie, so it is shown but not judged."""
    one, two = lm_row("RigL", [3.20]), lm_row("SET", [3.30, 3.31])
    assert claims.compare(one, two, claims.BITS) == ("one seed", pytest.approx(-0.105))
    assert claims.versus(one, two, "RigL", "SET", claims.BITS) == (
        "RigL 3.2000 (1 seed) bits/byte against SET 3.3050 ± 0.0071 bits/byte (-0.1050; no verdict on one seed)")
    rows = [lm_row("Dense", [2.6, 2.61], None, 0.0, train=1.0), one, two, lm_row("Static", [3.4])]
    assert "Here: no verdict yet (rows of one seed)." in claims.lm_claims(rows, [0.9])[0]
    rows.append(lm_row("RigL", [3.1, 3.11], "uniform (all layers)"))
    rows.append(lm_row("SET", [3.2, 3.21], "uniform (all layers)"))
    rows.append(lm_row("Static", [3.3, 3.31], "uniform (all layers)"))
    assert ("Here: held (1 comparison of one seed not counted)." in claims.lm_claims(rows, [0.9])[0])
