"""FLOPs and model size against the published figures (official README, reproducibility report)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import TinyNet

from lightning_rigl.flops import TrainingFlops, forward_flops, model_size_bytes, weight_flops
from lightning_rigl.models import create_model
from lightning_rigl.sparsity import layer_densities


@pytest.fixture(scope="module")
def resnet50() -> torch.nn.Module:
    return torchvision.models.resnet50()


def test_dense_resnet50_flops_and_size(resnet50):
    assert forward_flops(resnet50, (3, 224, 224)) == pytest.approx(8.2e9, rel=0.005)  # official README: 8.2e9
    size = model_size_bytes(resnet50)
    assert size == 4 * 25_557_032
    # The official 102.122 MB holds one of the two vectors (γ, β) of every BatchNorm: 26,560 values fewer.
    one_vector_per_batchnorm = sum(m.weight.numel() for m in resnet50.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert one_vector_per_batchnorm == 26_560
    assert (size - 4 * one_vector_per_batchnorm) / 1e6 == pytest.approx(102.122, abs=0.0005)


# The official README's ImageNet rows: (distribution, sparsity, inference FLOPs multiple, size in MB).
README_ROWS = [
    ("erk", 0.8, 0.42, 23.683), ("uniform", 0.8, 0.23, 23.685), ("erk", 0.9, 0.24, 13.499),
    ("uniform", 0.9, 0.13, 13.532), ("erk", 0.95, 0.12, 8.399), ("uniform", 0.95, 0.08, 8.433),
    ("erk", 0.965, 0.09, 6.904), ("uniform", 0.965, 0.07, 6.904),
]


@pytest.mark.parametrize(("distribution", "sparsity", "multiple", "megabytes"), README_ROWS)
def test_resnet50_inference_multiples_and_sizes(resnet50, distribution, sparsity, multiple, megabytes):
    densities = layer_densities(resnet50, sparsity, distribution)
    dense = forward_flops(resnet50, (3, 224, 224))
    assert forward_flops(resnet50, (3, 224, 224), densities) / dense == pytest.approx(multiple, abs=0.01)
    assert abs(model_size_bytes(resnet50, densities) / 1e6 - megabytes) <= max(0.01 * megabytes, 0.12)


def test_resnet50_erk_99_with_a_dense_first_layer(resnet50):
    densities = layer_densities(resnet50, 0.99, "erk", exclude=["conv1.weight"])  # outside the budget, official
    dense = forward_flops(resnet50, (3, 224, 224))
    assert forward_flops(resnet50, (3, 224, 224), densities) / dense == pytest.approx(0.05, abs=0.01)
    assert model_size_bytes(resnet50, densities) / 1e6 == pytest.approx(4.354, abs=0.12)


@pytest.mark.parametrize(
    ("arch", "classes", "dense_flops", "multiples"),
    [
        # Reproducibility report: WRN-22-2 3.15e8 dense; RigL at density 0.1 / 0.2, uniform 0.10x / 0.20x,
        # ERK 0.17x / 0.35x. CIFAR ResNet-50 2.59e9 dense; ERK at density 0.1: 0.22x.
        ("wrn22_2", 10, 3.15e8, {("uniform", 0.9): 0.10, ("uniform", 0.8): 0.20, ("erk", 0.9): 0.17,
                                  ("erk", 0.8): 0.35}),
        ("resnet50_cifar", 100, 2.59e9, {("erk", 0.9): 0.22}),
    ],
)
def test_cifar_figures_of_the_reproducibility_report(arch, classes, dense_flops, multiples):
    model = create_model(arch, num_classes=classes)
    dense = forward_flops(model, (3, 32, 32))
    assert dense == pytest.approx(dense_flops, rel=0.005)
    for (distribution, sparsity), multiple in multiples.items():
        densities = layer_densities(model, sparsity, distribution)
        assert forward_flops(model, (3, 32, 32), densities) / dense == pytest.approx(multiple, abs=0.01)


def test_mobilenet_v1_flops_and_size():
    model = create_model("mobilenet_v1", num_classes=1000)
    assert forward_flops(model, (3, 224, 224)) == pytest.approx(1.14e9, rel=0.005)  # official README: 1.14e9
    assert model_size_bytes(model) / 1e6 == pytest.approx(16.864, rel=0.005)  # official README: 16.864 MB


def test_a_sparse_layer_costs_its_dense_flops_times_its_density():
    model = TinyNet()
    flops = weight_flops(model, (1, 8, 8))
    # conv 3×3 from 1 to 8 channels on 8×8: 2·(1·9)·8·64 = 9,216 FLOPs; linear 256 -> 32: 2·256·32 = 16,384.
    assert flops.per_weight["features.0.weight"] == 9_216 and flops.per_weight["classifier.1.weight"] == 16_384
    densities = {"features.0.weight": 0.5, "classifier.1.weight": 0.25}
    assert forward_flops(model, (1, 8, 8), densities) == flops.total - 9_216 * 0.5 - 16_384 * 0.75
    # Size: 4 bytes per live weight and a bit per position of each sparse layer, 4 bytes per other value.
    total = sum(p.numel() for p in model.parameters())
    expected = 4 * (total - 72 - 8_192) + (4 * 36 + 72 / 8) + (4 * 2_048 + 8_192 / 8)
    assert model_size_bytes(model, densities) == expected


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="not weights that a matrix product or convolution"):
        forward_flops(TinyNet(), (1, 8, 8), {"features.1.weight": 0.5})  # a BatchNorm: no FLOPs counted
    with pytest.raises(ValueError, match="lacks"):
        model_size_bytes(TinyNet(), {"missing.weight": 0.5})


@pytest.mark.parametrize(("multiplier", "published"), [(1, 0.42), (5, 2.09)])
def test_rigl_erk_80_training_multiples(resnet50, multiplier, published):
    # The official README's training FLOPs of RigL ERK 0.8 (a multiple of dense 1x training), from the per-step
    # costs: 3·f_S, and f_S + f_D for the backward of the update steps (every ΔT = 100 until T_end at 75%).
    densities = layer_densities(resnet50, 0.8, "erk")
    account = TrainingFlops.of(resnet50, (3, 224, 224), list(densities))
    steps = 32_000 * multiplier
    updates = {step for step in range(100, int(0.75 * steps), 100)}
    sparse = account.forward(densities)
    for step in range(steps):
        account.add_step(sparse, step in updates)
    assert account.spent / (3 * account.dense_flops * 32_000) == pytest.approx(published, abs=0.02)
