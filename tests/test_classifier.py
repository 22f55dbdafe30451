"""ImageClassifier and its learning-rate schedules: exact factors, parameter groups, a real Trainer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_rigl import ImageClassifier
from lightning_rigl.optimization import decay_groups
from lightning_rigl.errors import ConfigError
from lightning_rigl.lr_schedule import lr_factor


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.25), (1, 0.5), (3, 1.0), (9, 1.0), (10, 0.2), (19, 0.2), (20, 0.04), (1000, 0.04)],
)
def test_step_schedule_with_warmup(step: int, expected: float) -> None:
    factor = lr_factor(step, "step", warmup_steps=4, milestones=[10, 20], gamma=0.2)
    assert factor == pytest.approx(expected)


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (50, 0.5), (25, 0.5 * (1 + math.cos(math.pi / 4))), (100, 0)])
def test_cosine_schedule_decays_to_zero_at_the_last_step(step: int, expected: float) -> None:
    assert lr_factor(step, "cosine", total_steps=100) == pytest.approx(expected, abs=1e-12)


def test_cosine_starts_after_the_warmup() -> None:
    assert lr_factor(9, "cosine", warmup_steps=10, total_steps=110) == pytest.approx(1.0)
    assert lr_factor(60, "cosine", warmup_steps=10, total_steps=110) == pytest.approx(0.5)


def test_constant_schedule_only_warms_up() -> None:
    assert [lr_factor(s, "constant", warmup_steps=2) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_cosine_without_a_run_length_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_steps"):
        lr_factor(0, "cosine")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "resnet51"}, "wrn22_2"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": 0.0}, "nesterov"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"lr_schedule": "poly"}, "Unknown lr_schedule"),
        ({"lr_milestones": [20, 10]}, "increasing"),
        ({"lr_schedule": "cosine", "lr_milestones": [10]}, "only apply"),
        ({"lr_gamma": 2.0}, "lr_gamma"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"optimizer": "lamb"}, "Unknown optimizer"),
        ({"optimizer": "adamw", "betas": (0.9, 1.0)}, "betas"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ImageClassifier(**kwargs)


def test_weight_decay_spares_batchnorm_and_biases() -> None:
    net = ImageClassifier(arch="wrn22_2", num_classes=10).net
    decay, no_decay = decay_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    decayed, spared = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert decayed | spared == {id(p) for p in net.parameters()} and not decayed & spared
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert {id(module.weight), id(module.bias)} <= spared
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            assert id(module.weight) in decayed
            assert module.bias is None or id(module.bias) in spared


def test_adamw_takes_the_betas_and_the_same_decay_groups() -> None:
    model = ImageClassifier(optimizer="adamw", lr=3e-3, betas=(0.8, 0.99), weight_decay=0.3, momentum=0.0)
    model.trainer = SimpleNamespace(estimated_stepping_batches=100)
    optimizer = model.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.3, 0.0]
    assert all(group["betas"] == (0.8, 0.99) and group["lr"] == 3e-3 for group in optimizer.param_groups)


def test_top5_only_with_at_least_five_classes() -> None:
    assert set(ImageClassifier(num_classes=10).test_metrics) == {"test/acc_top1", "test/acc_top5"}
    assert set(ImageClassifier(num_classes=3).test_metrics) == {"test/acc_top1"}


def test_label_smoothing_reaches_the_loss() -> None:
    module = ImageClassifier(label_smoothing=0.1)
    logits, labels = torch.randn(4, 10), torch.tensor([0, 3, 5, 9])
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert module.loss(logits, labels) == pytest.approx(float(expected))


def test_trainer_steps_the_schedule_once_per_optimizer_step() -> None:
    """With accumulation 2, 6 batches are 3 optimizer steps: warm-up over 2 steps, then ×0.5 at step 2."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 1, 28, 28), torch.arange(12) % 10)
    module = ImageClassifier(lr=0.1, lr_milestones=[2], lr_gamma=0.5, warmup_steps=2)
    seen: list[float] = []

    class RecordLR(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            seen.append(optimizer.param_groups[0]["lr"])

    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RecordLR()])
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert seen == pytest.approx([0.05, 0.1, 0.05])


def test_test_accuracy_is_the_fraction_of_correct_predictions() -> None:
    """A model that always predicts class 0 scores the share of class-0 labels (top-1)."""
    module = ImageClassifier(num_classes=10)
    with torch.no_grad():
        for p in module.net.parameters():
            p.zero_()
        module.net.classifier.bias[0] = 1.0
    labels = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])
    data = TensorDataset(torch.randn(8, 1, 28, 28), labels)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.test(module, DataLoader(data, batch_size=3), verbose=False)
    assert result["test/acc_top1"] == pytest.approx(3 / 8)
