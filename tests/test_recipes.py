"""Every recipe parses and trains a few steps through the command, on tiny data in the dataset's real format."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_processes
from fake_datasets import (
    allow_fake_cifar,
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_imagenet_folder,
    write_text_folder,
)

from lightning_rigl.checkpoints import is_sharded_checkpoint
from lightning_rigl.cli import main
from lightning_rigl.results import read_results

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL_RECIPES = sorted(RECIPES.glob("*/*.yaml"))
# The Fashion-MNIST studies' recipes differ between sparsities only in numbers: train those at 90%. Of ViT-B/16
# (86M parameters at 224×224) train the RigL recipe only: the others differ from it in the sparse callback alone.
# Extended-training recipes (`_2x`, `_5x`, ...) differ from the recipe of the least multiplier only in their
# `multiplier` line, which the smoke run sets to 1: that one trains. The sharded recipes (FSDP2) train on two
# processes, through the command in a process of its own.
SHARDED_RECIPES = [p for p in ALL_RECIPES if p.stem.endswith("_fsdp2")]


def _least_multiplier(recipes: list[Path]) -> list[Path]:
    """Of the recipes that differ only in their multiplier, the one with the least."""
    def multiplier(recipe: Path) -> int:
        match = re.search(r"_(\d+)x$", recipe.stem)
        return int(match.group(1)) if match else 1

    kept: dict[tuple[str, str], Path] = {}
    for recipe in sorted(recipes, key=multiplier):
        kept.setdefault((recipe.parent.name, re.sub(r"_\d+x$", "", recipe.stem)), recipe)
    return sorted(kept.values())


TRAINED_RECIPES = _least_multiplier([p for p in ALL_RECIPES
                                     if (p.parent.name not in ("fashion_mnist", "fashion_mnist_vit", "python_gpt_tiny")
                                         or p.stem == "dense" or "_s90" in p.stem)
                                     and (p.parent.name != "imagenet_vit_b_16" or p.stem == "rigl_uniform_s90")
                                     and (p.parent.name != "gpt2_small" or p.stem == "rigl_erk_s90")
                                     and p not in SHARDED_RECIPES])
# The language-model recipes print their test loss, the others their accuracy.
LANGUAGE_MODEL_FOLDERS = ("python_gpt_tiny", "gpt2_small")

# A few steps on tiny data: the recipe's model, method and schedule, with the step counts of a smoke test.
SMOKE = ["--trainer.max_steps", "2", "--multiplier", "1", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
         "false", "--trainer.enable_model_summary", "false", "--data.num_workers", "0"]


def smoke_args(recipe: Path) -> list[str]:
    """SMOKE, and no checkpoint unless the recipe saves one on purpose (the pruning run, for the ticket)."""
    text = recipe.read_text()
    if "GradualMagnitudePruning" in text:  # prune within the two steps (the pruner is the last callback)
        return [*SMOKE, "--trainer.callbacks.init_args.start_at", "0", "--trainer.callbacks.init_args.stop_at", "1"]
    return [*SMOKE, "--trainer.enable_checkpointing", "false"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Per recipe folder, the arguments that point its data module at a tiny dataset."""
    root = tmp_path_factory.mktemp("datasets")
    write_cifar10(root / "cifar10", n_per_batch=4, n_test=4)
    write_cifar100(root / "cifar100", n_train=20, n_test=4)
    write_imagenet_folder(root / "imagenet", n_train=2, n_val=2, size=(40, 36))
    write_fashion_mnist(root / "fashion", n_train=24, n_test=8)
    write_text_folder(root / "text", documents=40)
    text = ["--data.text_dir", str(root / "text"), "--data.cache_dir", str(root / "token_cache"), "--data.context",
            "16", "--data.batch_size", "2"]
    cifar = ["--data.download", "false", "--data.batch_size", "4", "--data.val_size", "4"]
    imagenet = ["--data.data_dir", str(root / "imagenet"), "--data.num_classes", "2", "--data.image_size", "32",
                "--data.batch_size", "2", "--trainer.accumulate_grad_batches", "1"]
    return {
        "cifar10_wrn22_2": ["--data.data_dir", str(root / "cifar10"), *cifar],
        "cifar100_resnet50": ["--data.data_dir", str(root / "cifar100"), *cifar],
        "imagenet_resnet50": imagenet,
        "imagenet_mobilenet_v1": imagenet,
        "fashion_mnist": ["--data.data_dir", str(root / "fashion"), "--data.batch_size", "8", "--data.val_size", "8"],
        "fashion_mnist_vit": ["--data.data_dir", str(root / "fashion"), "--data.batch_size", "8", "--data.val_size",
                              "8"],
        "cifar10_vit": ["--data.data_dir", str(root / "cifar10"), *cifar],
        "imagenet_vit_b_16": [*imagenet[:4], "--data.image_size", "224", "--data.batch_size", "1",
                              "--trainer.accumulate_grad_batches", "1", "--model.width", "0.25"],  # same names
        "python_gpt_tiny": text,
        # GPT-2's byte-pair tokenizer needs the transformers extra and its files: bytes here, a narrow model.
        "gpt2_small": [*text, "--data.tokenizer", "byte", "--data.val_fraction", "0.2", "--data.test_fraction", "0.2",
                       "--trainer.accumulate_grad_batches", "1", "--model.width", "0.0625"],
    }


def test_recipes_are_what_the_generator_writes() -> None:
    result = subprocess.run([sys.executable, str(RECIPES / "generate.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_is_a_recipe_per_table_row() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in ALL_RECIPES}
    for sparsity in ("s80", "s90"):  # reproducibility report, Tables 2 and 3
        for folder in ("cifar10_wrn22_2", "cifar100_resnet50"):
            for row in ("static_uniform", "static_erk", "set_uniform", "set_erk", "rigl_uniform", "rigl_erk",
                        "small_dense"):
                assert f"{folder}/{row}_{sparsity}" in names
        assert f"cifar10_wrn22_2/rigl_erk_{sparsity}_2x" in names
    for sparsity in ("s50", "s80", "s90", "s95"):  # the paper's CIFAR-10 table
        assert {f"cifar10_wrn22_2/{r}" for r in (f"rigl_erk_{sparsity}", f"rigl_erk_{sparsity}_2x",
                                                 f"static_erk_{sparsity}")} <= names
    assert {"imagenet_resnet50/rigl_erk_s80_5x", "imagenet_resnet50/rigl_erk_s99_100x",
            "imagenet_mobilenet_v1/rigl_uniform_s90_10x"} <= names
    for sparsity in ("s80", "s90"):  # the methods beyond RigL, SET and Static: Tables 2, 3 and 5 of the report
        for folder in ("cifar10_wrn22_2", "cifar100_resnet50"):
            for row in ("snfs_uniform", "snfs_erk", "pruning_global", "lottery_global", "rigl_sg_uniform",
                        "rigl_sm_uniform", "rigl_sg_erk", "rigl_sm_erk"):
                assert f"{folder}/{row}_{sparsity}" in names
        extended = ("static_uniform", "set_uniform", "snfs_uniform")
        assert {f"cifar10_wrn22_2/{r}_{sparsity}_2x" for r in extended} <= names
        assert f"cifar100_resnet50/rigl_uniform_{sparsity}_3x" in names
    # Transformers: the Fashion-MNIST ViT study, CIFAR-10 and SRigL's ViT-B/16 schedule.
    for folder, sparsities in (("fashion_mnist_vit", ("s90", "s95")), ("cifar10_vit", ("s90",))):
        assert f"{folder}/dense" in names
        assert {f"{folder}/{m}_{d}_{s}" for m in ("static", "set", "rigl") for d in ("erk", "uniform")
                for s in sparsities} <= names
    assert "imagenet_vit_b_16/rigl_uniform_s90" in names
    # The paper's 80% ResNet-50 comparison.
    assert {f"imagenet_resnet50/{r}" for r in ("static_uniform_s80", "small_dense_s80", "set_uniform_s80",
                                                "snfs_uniform_s80", "pruning_uniform_s80", "rigl_uniform_s80",
                                                "rigl_erk_s80")} <= names


def test_an_extended_recipe_left_untrained_differs_from_a_trained_one_in_its_multiplier_alone() -> None:
    def settings(recipe: Path) -> dict:
        config = yaml.safe_load(recipe.read_text())
        config.pop("multiplier", None)
        del config["trainer"]["logger"]["init_args"]["name"]
        return config

    trained = {(p.parent.name, re.sub(r"_\d+x$", "", p.stem)): p for p in TRAINED_RECIPES}
    extended = [p for p in ALL_RECIPES if re.search(r"_\d+x$", p.stem) and p not in TRAINED_RECIPES]
    siblings = [(p, trained.get((p.parent.name, re.sub(r"_\d+x$", "", p.stem)))) for p in extended]
    assert len(siblings) > 30
    for recipe, sibling in siblings:
        if sibling is not None:  # else a study recipe at another sparsity than the trained 90%
            assert settings(recipe) == settings(sibling), recipe.stem


def test_there_is_a_sharded_recipe_for_vit_b_16_and_resnet_50() -> None:
    assert {f"{p.parent.name}/{p.stem}" for p in SHARDED_RECIPES} == {
        "imagenet_vit_b_16/rigl_uniform_s90_fsdp2", "imagenet_resnet50/rigl_erk_s80_fsdp2", "gpt2_small/dense_fsdp2",
        *(f"gpt2_small/rigl_erk_s{s}_fsdp2" for s in (50, 75, 90))}
    for recipe in SHARDED_RECIPES:
        config = yaml.safe_load(recipe.read_text())
        one_gpu = yaml.safe_load(recipe.with_name(recipe.name.replace("_fsdp2", "")).read_text())
        trainer, one_gpu_trainer = config["trainer"], one_gpu["trainer"]
        assert trainer["strategy"]["init_args"] == {"data_parallel_size": trainer["devices"], "tensor_parallel_size": 1}
        # The same global batch (as the header says), validation after the same optimizer steps (Lightning counts
        # batches) on as many batches in all (it counts them per process), and otherwise the one-GPU recipe's.
        batch = config["data"]["init_args"]["batch_size"]
        processes, one_gpu_processes = trainer.pop("devices"), one_gpu_trainer.pop("devices")
        accumulate, one_gpu_accumulate = trainer.pop("accumulate_grad_batches"), \
            one_gpu_trainer.pop("accumulate_grad_batches")
        assert processes * accumulate == one_gpu_processes * one_gpu_accumulate
        assert f"so that {batch} x P x accumulate_grad_batches = {batch * processes * accumulate:,}" in \
            recipe.read_text()
        if "val_check_interval" in one_gpu_trainer:
            steps = one_gpu_trainer.pop("val_check_interval") / one_gpu_accumulate
            windows = one_gpu_trainer.pop("limit_val_batches") * one_gpu_processes
            assert trainer.pop("val_check_interval") / accumulate == steps
            assert trainer.pop("limit_val_batches") * processes == windows
            assert f"val_check_interval = {steps:g} x accumulate_grad_batches and limit_val_batches = {windows:,} / P" \
                in recipe.read_text()
        del trainer["strategy"], trainer["logger"], one_gpu_trainer["logger"]
        assert config == one_gpu


def test_sharded_recipe_trains_a_few_steps_on_two_processes(datasets: dict[str, list[str]], tmp_path: Path) -> None:
    """ResNet-50's (its bottleneck blocks sharded one by one); the ViT's differs from it only in the model, whose
    encoder blocks tests/test_fsdp.py shards."""
    recipe = RECIPES / "imagenet_resnet50/rigl_erk_s80_fsdp2.yaml"
    # A mask update at step 1 (RigL is the last callback), and the final checkpoint as a folder of shards.
    command = [str(Path(sys.executable).with_name("lightning-rigl")), "fit", "--config", str(recipe),
               *datasets[recipe.parent.name], *SMOKE, "--trainer.callbacks.init_args.update_interval", "1",
               "--trainer.devices", "2", "--trainer.strategy.data_parallel_size", "2"]
    result = run_processes(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stderr + result.stdout
    assert result.stdout.count("Summary") == 1 and "achieved 0.8000 over 54 sparse layers, 1 mask update" in \
        result.stdout
    (checkpoint,) = tmp_path.glob("runs/imagenet_resnet50/rigl_erk_s80_fsdp2/*/checkpoints/*.ckpt")
    assert is_sharded_checkpoint(checkpoint)


@pytest.mark.parametrize("recipe", TRAINED_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_trains_a_few_steps(
    recipe: Path, datasets: dict[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    allow_fake_cifar(monkeypatch)
    monkeypatch.chdir(tmp_path)
    if recipe.stem.startswith("lottery_"):  # the ticket retrains the pruning run's mask: that run comes first
        source = recipe.with_name(recipe.name.replace("lottery_", "pruning_"))
        main(["fit", "--config", str(source), *datasets[recipe.parent.name], *smoke_args(source)])
        capsys.readouterr()
    main(["fit", "--config", str(recipe), *datasets[recipe.parent.name], *smoke_args(recipe)])
    out = capsys.readouterr().out
    assert ("test: loss" if recipe.parent.name in LANGUAGE_MODEL_FOLDERS else "test accuracy: top1") in out
    # The run's record has its FLOP columns (a transformer's too): none is left out without a word.
    (run,) = tmp_path.glob(f"runs/{recipe.parent.name}/{recipe.stem}/*/results.json")
    record = read_results(run.parent)
    assert record["train_ratio"] is not None and record["forward_ratio"] is not None
    callbacks = yaml.safe_load(recipe.read_text())["trainer"]["callbacks"]
    sparse = [cb["init_args"] for cb in callbacks if cb["class_path"].startswith("lightning_rigl.")]
    if sparse and sparse[0].get("sparsity") is None:
        assert "target sparsity a per-layer mapping" in out
    elif sparse:
        assert f"target sparsity {sparse[0]['sparsity']} ({sparse[0]['distribution']})" in out
    else:
        assert "dense training" in out
