"""The paper's comparison on the real Fashion-MNIST: every method of recipes/fashion_mnist/ at every sparsity
(``--study vit``: the small ViT of recipes/fashion_mnist_vit/; ``--study lm``: gpt_tiny on the Python standard
library's source, recipes/python_gpt_tiny/), over several seeds, through the `lightning-rigl` command; then the
report and docs/reproduction.md (each study writes its own section of it: the page's text, "A vision transformer",
"A language model").

    python benchmarks/reproduce.py [--study lenet|vit|lm] [--quick] [--output DIR] [--seeds 3] [--workers 2]
                                   [--docs docs/reproduction.md]
    python benchmarks/reproduce.py --from-records docs/reproduction/records.json --docs docs/reproduction.md

Runs go to DIR/runs/<recipes folder>/<recipe>/seed_<k>/; a run whose results.json exists is reused, so an
interrupted study continues where it stopped (a folder without it is trained again). Dense and 90% runs start
first, seed after seed. `--quick` trains every method at 90% sparsity with two seeds. `--from-records` trains nothing and redraws from the run records a
report wrote (the study's page keeps them in docs/reproduction/records.json). Each run is one
`lightning-rigl fit` process with one thread; `--workers` of them run at once. A lottery ticket starts when its
pruning run (same sparsity, same seed) is done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from claims import write_lm_section, write_reproduction_doc, write_vit_section

from lightning_rigl.report import collect, write_report
from lightning_rigl.results import RESULTS_FILE

REPO = Path(__file__).resolve().parents[1]
# The studies: LeNet-300-100 with every method, and a small ViT against Static, SET and RigL.
STUDIES = {"lenet": "fashion_mnist", "vit": "fashion_mnist_vit", "lm": "python_gpt_tiny"}
QUICK_SPARSITY = "s90"


@dataclass(frozen=True)
class Job:
    study: str  # the recipes' folder, e.g. "fashion_mnist"
    recipe: str  # the recipe's name, e.g. "rigl_erk_s90"
    seed: int

    @property
    def name(self) -> str:
        return f"{self.recipe} seed {self.seed}"

    @property
    def recipe_file(self) -> Path:
        return REPO / "recipes" / self.study / f"{self.recipe}.yaml"

    def folder(self, output: Path) -> Path:
        return output / "runs" / self.study / self.recipe / f"seed_{self.seed}"

    def pruning_checkpoint(self, output: Path) -> Path:
        """Where the pruning run of this sparsity and seed leaves its final weights, masks and rewind copy."""
        return output / "tickets" / self.recipe.replace("lottery", "pruning") / f"seed_{self.seed}" / "final.ckpt"

    def depends_on(self) -> Job | None:
        if not self.recipe.startswith("lottery"):
            return None
        return Job(self.study, self.recipe.replace("lottery", "pruning"), self.seed)


def jobs(study: str, quick: bool, seeds: int) -> list[Job]:
    """Every run of the study (a folder of recipes/), in the order they start: the quick set (dense and 90%)
    before the other sparsities, and within each, seed after seed with pruning runs before lottery tickets, so
    that a study stopped early holds whole seeds of the central comparison."""
    recipes = sorted(path.stem for path in (REPO / "recipes" / study).glob("*.yaml"))
    quick_set = [name for name in recipes if name == "dense" or f"_{QUICK_SPARSITY}" in name]
    every = [Job(study, recipe, seed) for recipe in (quick_set if quick else recipes) for seed in range(seeds)]
    return sorted(every, key=lambda job: (job.recipe not in quick_set, job.seed, job.recipe.startswith("lottery"),
                                          job.recipe))


def run_config(job: Job, output: Path) -> Path:
    """The recipe with this job's seed and folders, written to DIR/configs/."""
    config = yaml.safe_load(job.recipe_file.read_text())
    config["seed_everything"] = job.seed
    config["trainer"]["enable_progress_bar"] = False
    config["trainer"]["enable_model_summary"] = False
    config["trainer"]["logger"]["init_args"] = {"save_dir": str(output / "runs"), "name": f"{job.study}/{job.recipe}",
                                                "version": f"seed_{job.seed}"}
    for callback in config["trainer"]["callbacks"]:
        args = callback.setdefault("init_args", {})
        if callback["class_path"].startswith("lightning_rigl."):
            args["seed"] = job.seed
            if "checkpoint" in args:  # the lottery ticket of this seed's pruning run
                args["checkpoint"] = str(job.pruning_checkpoint(output))
        elif callback["class_path"].endswith("ModelCheckpoint"):
            args["dirpath"] = str(job.pruning_checkpoint(output).parent)
    path = output / "configs" / f"{job.recipe}_seed{job.seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def launch(job: Job, output: Path) -> subprocess.Popen:
    folder = job.folder(output)
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run: train it again
    command = [str(Path(sys.executable).with_name("lightning-rigl")), "fit", "--config", str(run_config(job, output))]
    log = (output / "logs" / f"{job.recipe}_seed{job.seed}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with log.open("w") as file:
        return subprocess.Popen(command, cwd=output, stdout=file, stderr=subprocess.STDOUT, env=env)


def run_all(todo: Sequence[Job], output: Path, workers: int) -> list[Job]:
    """Trains every job not finished yet, ``workers`` at a time; returns the jobs that failed."""
    done = {job for job in todo if (job.folder(output) / RESULTS_FILE).exists()}
    waiting = [job for job in todo if job not in done]
    print(f"{len(todo)} runs: {len(done)} done already, {len(waiting)} to train, {workers} at a time", flush=True)
    running: dict[Job, tuple[subprocess.Popen, float]] = {}
    failed: list[Job] = []
    start, finished = time.monotonic(), 0
    while waiting or running:
        for job in [job for job in waiting if len(running) < workers]:
            dependency = job.depends_on()
            if dependency is not None and dependency in failed:
                waiting.remove(job)
                failed.append(job)
                print(f"  skipped {job.name}: its pruning run failed", flush=True)
            elif dependency is None or dependency in done:
                waiting.remove(job)
                running[job] = (launch(job, output), time.monotonic())
            if len(running) >= workers:
                break
        time.sleep(0.5)
        for job, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[job]
            finished += 1
            elapsed = time.monotonic() - start
            eta = elapsed / finished * (len(waiting) + len(running))
            if process.returncode == 0 and (job.folder(output) / RESULTS_FILE).exists():
                done.add(job)
                status = "done"
            else:
                failed.append(job)
                status = f"FAILED (exit {process.returncode}; log in {output / 'logs'})"
            took = time.monotonic() - started
            print(f"  [{len(done) + len(failed)}/{len(todo)}] {job.name}: {status} in {took:.0f} s; about "
                  f"{eta / 60:.0f} min left", flush=True)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="lenet",
                        help="lenet: LeNet-300-100 and every method (recipes/fashion_mnist); vit: a small ViT, dense "
                        "against Static, SET and RigL (recipes/fashion_mnist_vit); lm: gpt_tiny on the Python "
                        "standard library's source (recipes/python_gpt_tiny)")
    parser.add_argument("--quick", action="store_true", help="90%% sparsity only, two seeds (about 15 minutes)")
    parser.add_argument("--output", default="reproduction", help="where the runs, the logs and the report go")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per run (default 3, or 2 with --quick)")
    parser.add_argument("--workers", type=int, default=2, help="runs at once, one thread each")
    parser.add_argument("--docs", default=None,
                        help="also write the study's page here (docs/reproduction.md for the full study)")
    parser.add_argument("--from-records", default=None, metavar="FILE",
                        help="train nothing: draw the report (and the page) from the run records of an earlier "
                        "study, such as docs/reproduction/records.json")
    args = parser.parse_args()
    output = Path(args.output).resolve()
    seeds = args.seeds or (2 if args.quick else 3)
    failed = [] if args.from_records else run_all(jobs(STUDIES[args.study], args.quick, seeds), output, args.workers)
    report = collect([Path(args.from_records) if args.from_records else output / "runs"])
    if args.from_records:
        seeds = max(len(row.runs) for row in report.rows)
    paths = write_report(report, output / "report")
    print(f"report: {', '.join(str(path) for path in paths)}")
    if args.docs and args.study == "vit":
        print(f"wrote {write_vit_section(report, output / 'report', Path(args.docs), seeds)}")
    elif args.docs and args.study == "lm":
        print(f"wrote {write_lm_section(report, output / 'report', Path(args.docs), seeds)}")
    elif args.docs:
        print(f"wrote {write_reproduction_doc(report, output / 'report', Path(args.docs), seeds, args.quick)}")
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(job.name for job in failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
