"""The model registry, the architectures (shapes, gradients, parameter counts, FLOPs) and width matching."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from lightning_rigl.errors import ConfigError
from lightning_rigl.models import (
    count_parameters,
    create_model,
    list_models,
    match_width,
    scale_channels,
    sparse_parameter_count,
)

# (channels, height, width) of a test input, and the class count, per model: 28×28×1 for the Fashion-MNIST
# nets, 32×32×3 for the CIFAR nets, 64×64×3 (instead of 224×224, to stay fast) for the ImageNet nets; for the
# language models, (tokens,) of a sequence and the vocabulary.
INPUTS = {
    "gpt_tiny": ((16,), 256),
    "gpt2_small": ((16,), 50257),
    "lenet300_100": ((1, 28, 28), 10),
    "small_cnn": ((1, 28, 28), 10),
    "wrn22_2": ((3, 32, 32), 10),
    "resnet50_cifar": ((3, 32, 32), 100),
    "resnet50": ((3, 64, 64), 1000),
    "mobilenet_v1": ((3, 64, 64), 1000),
    "vit_tiny": ((1, 28, 28), 10),
    "vit_b_16": ((3, 224, 224), 1000),  # a ViT takes only the image size its position embedding was built for
}


def _meta_model(name: str, num_classes: int, width: float = 1.0, **kwargs: object) -> nn.Module:
    """The model on the meta device: shapes only, built in milliseconds."""
    with torch.device("meta"):
        return create_model(name, num_classes, width, **kwargs)


def _dense_flops(model: nn.Module, image_size: int) -> int:
    """Forward FLOPs of the convolutions and linear layers for one 3×image_size² image; multiply-add = 2."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        # Every output element is one dot product over a kernel slice (conv) or a weight row (linear).
        total += 2 * output.numel() * module.weight[0].numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(torch.zeros(1, 3, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    return total


def test_registry_lists_every_model_sorted() -> None:
    assert list_models() == sorted(INPUTS)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_every_parameter_gets_a_finite_gradient(name: str) -> None:
    torch.manual_seed(0)
    shape, num_classes = INPUTS[name]
    # 224×224 at full width, or GPT-2 small's 124M parameters: slow
    model = create_model(name, num_classes, width=0.25 if name in ("vit_b_16", "gpt2_small") else 1.0)
    if name.startswith("gpt"):  # next-token logits at every position
        tokens = torch.randint(0, num_classes, (2, *shape))
        logits = model(tokens)
        assert logits.shape == (2, *shape, num_classes)
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    else:
        logits = model(torch.randn(2, *shape))
        assert logits.shape == (2, num_classes)
        nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    non_finite = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    assert missing == [] and non_finite == []


@pytest.mark.parametrize("name", list_models())
def test_half_width_has_fewer_parameters(name: str) -> None:
    num_classes = INPUTS[name][1]
    assert count_parameters(_meta_model(name, num_classes, 0.5)) < count_parameters(_meta_model(name, num_classes))


def _wrn22_2_parameters(num_classes: int) -> int:
    """Stem conv 3→16; per group (16→32, 32→64, 64→128): a first block BN(c_in) + conv3×3 c_in→c + BN(c) +
    conv3×3 c→c + 1×1 shortcut c_in→c, and two blocks BN(c) + conv c→c + BN(c) + conv c→c; then BN(128) and
    linear 128→classes. A BN has a scale and a shift per channel; the convolutions have no bias."""
    total, c_in = 3 * 3 * 3 * 16, 16
    for c in (32, 64, 128):
        total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c + c_in * c
        total += 2 * (2 * c + 9 * c * c + 2 * c + 9 * c * c)
        c_in = c
    return total + 2 * 128 + 128 * num_classes + num_classes


def _mobilenet_v1_parameters(num_classes: int) -> int:
    """Stem conv3×3 3→32 + BN; per block depthwise 3×3 (9 per channel) + BN(c_in) + pointwise c_in→c_out +
    BN(c_out); linear 1024→classes."""
    channels = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    blocks = sum(9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out for c_in, c_out in zip(channels, channels[1:]))
    return 3 * 3 * 3 * 32 + 2 * 32 + blocks + 1024 * num_classes + num_classes


RESNET50_PARAMETERS = 25_557_032  # torchvision's ResNet50_Weights.IMAGENET1K_V1.meta["num_params"]


def _vit_parameters(in_channels: int, patch: int, tokens: int, layers: int, hidden: int, mlp: int,
                    num_classes: int) -> int:
    """Class token; patch embedding (a conv with bias); position embedding of the tokens and the class token;
    per block two LayerNorms (scale and shift), the attention's q/k/v projection and output projection (with
    biases) and the two MLP layers (with biases); the final LayerNorm; the head."""
    block = 2 * 2 * hidden + (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden) + (
        hidden * mlp + mlp) + (mlp * hidden + hidden)
    return (hidden + in_channels * patch * patch * hidden + hidden + (tokens + 1) * hidden + layers * block
            + 2 * hidden + hidden * num_classes + num_classes)


def _gpt_parameters(vocabulary: int, context: int, layers: int, hidden: int, mlp: int) -> int:
    """Token and position embeddings; per block two LayerNorms (scale and shift), the query, key, value and output
    projections (with biases) and the two MLP layers (with biases); the final LayerNorm; no head of its own (tied
    to the token embedding)."""
    block = 2 * 2 * hidden + 4 * (hidden * hidden + hidden) + (hidden * mlp + mlp) + (mlp * hidden + hidden)
    return vocabulary * hidden + context * hidden + layers * block + 2 * hidden


PARAMETER_COUNTS = {
    # (num_classes, parameters at width 1)
    "lenet300_100": (10, (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)),  # 266,610
    "small_cnn": (10, (1 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10)),
    "wrn22_2": (10, _wrn22_2_parameters(10)),  # 1,079,642: the "1.1M" usually quoted for WRN-22-2
    "resnet50": (1000, RESNET50_PARAMETERS),
    # ResNet-50 with the 7×7×3×64 stem kernel replaced by a 3×3×3×64 one and a 100-class head.
    "resnet50_cifar": (100, RESNET50_PARAMETERS - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64 - 2048 * 900 - 900),
    # Keras' MobileNet(alpha=1.0): "Trainable params: 4,231,976" (its 21,888 non-trainable are BN statistics).
    "mobilenet_v1": (1000, _mobilenet_v1_parameters(1000)),
    "vit_tiny": (10, _vit_parameters(1, 4, 49, 4, 64, 128, 10)),
    # torchvision's ViT_B_16_Weights.IMAGENET1K_V1.meta["num_params"]: 86,567,656.
    "vit_b_16": (1000, _vit_parameters(3, 16, 196, 12, 768, 3072, 1000)),
    "gpt_tiny": (256, _gpt_parameters(256, 256, 4, 192, 768)),
    # GPT-2 small (Radford et al., 2019) with the byte-pair vocabulary: 124,439,808, as published.
    "gpt2_small": (50257, _gpt_parameters(50257, 1024, 12, 768, 3072)),
}


def test_hand_arithmetic_gives_the_quoted_totals() -> None:
    assert PARAMETER_COUNTS["lenet300_100"][1] == 266_610
    assert PARAMETER_COUNTS["small_cnn"][1] == 421_642
    assert PARAMETER_COUNTS["wrn22_2"][1] == 1_079_642
    assert PARAMETER_COUNTS["resnet50_cifar"][1] == 23_705_252
    assert PARAMETER_COUNTS["mobilenet_v1"][1] == 4_231_976
    assert PARAMETER_COUNTS["vit_tiny"][1] == 139_018
    assert PARAMETER_COUNTS["vit_b_16"][1] == 86_567_656
    assert PARAMETER_COUNTS["gpt_tiny"][1] == 1_878_144
    assert PARAMETER_COUNTS["gpt2_small"][1] == 124_439_808


@pytest.mark.parametrize("name", list_models())
def test_parameter_count_at_width_1(name: str) -> None:
    num_classes, expected = PARAMETER_COUNTS[name]
    assert count_parameters(_meta_model(name, num_classes)) == expected


def test_resnet50_has_torchvision_parameter_names_and_shapes() -> None:
    with torch.device("meta"):
        reference = torchvision.models.resnet50()
    ours = _meta_model("resnet50", 1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def _last_bn_scales(model: nn.Module) -> list[torch.Tensor]:
    return [m.bn3.weight for m in model.modules() if isinstance(m, Bottleneck)]


def test_resnet50_cifar_starts_every_bottleneck_at_the_identity() -> None:
    scales = _last_bn_scales(create_model("resnet50_cifar", 100))
    assert len(scales) == 3 + 4 + 6 + 3
    assert all(bool((s == 0).all()) for s in scales)
    # The option, not the architecture, zeroes them: torchvision's default leaves them at 1.
    assert all(bool((s == 1).all()) for s in _last_bn_scales(create_model("resnet50", 10)))
    assert all(
        bool((s == 1).all()) for s in _last_bn_scales(create_model("resnet50_cifar", 10, zero_init_residual=False))
    )


@pytest.mark.parametrize(
    ("name", "num_classes", "image_size", "published"),
    [
        ("wrn22_2", 10, 32, 3.15e8),  # reproducibility report, dense inference FLOPs per image
        ("resnet50_cifar", 100, 32, 2.59e9),  # same report; a two-conv 3→32→64 stem would be 2.632e9
        ("resnet50", 1000, 224, 8.2e9),  # official RigL README
        ("mobilenet_v1", 1000, 224, 2 * 569e6),  # Howard et al. 2017, Table 4: 569 million mult-adds
    ],
)
def test_dense_flops_match_published_figures(name: str, num_classes: int, image_size: int, published: float) -> None:
    assert _dense_flops(_meta_model(name, num_classes), image_size) == pytest.approx(published, rel=5e-3)


def test_lenet_takes_images_or_flat_pixels() -> None:
    torch.manual_seed(0)
    model = create_model("lenet300_100", 10)
    images = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model(images), model(images.reshape(2, 784)))


def test_width_scales_every_hidden_layer_rounding_half_up() -> None:
    # 300·0.25 = 75 and 100·0.25 = 25 hidden units; inputs and classes keep their sizes.
    assert count_parameters(_meta_model("lenet300_100", 10, 0.25)) == (784 * 75 + 75) + (75 * 25 + 25) + (25 * 10 + 10)
    assert [scale_channels(5, 0.5), scale_channels(7, 0.5), scale_channels(3, 0.01)] == [3, 4, 1]


def test_unknown_model_name_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError) as error:
        create_model("resnet51", 10)
    assert "resnet51" in str(error.value)
    assert all(name in str(error.value) for name in list_models())


@pytest.mark.parametrize("width", [0, 0.0, -0.5, float("nan"), float("inf"), True])
@pytest.mark.parametrize("name", list_models())
def test_width_must_be_positive(name: str, width: float) -> None:
    with pytest.raises(ConfigError, match="width"):
        create_model(name, 10, width)


def test_unknown_model_option_names_the_options_it_takes() -> None:
    with pytest.raises(ConfigError, match="drop_rate"):
        create_model("wrn22_2", 10, depth=28)


def test_sparse_parameter_count_of_a_tiny_model_by_hand() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    # Uniform 50%: the first layer stays dense (16 weights), the second keeps 8 − floor(0.5·8) = 4; biases 4 + 2.
    assert sparse_parameter_count(model, 0.5, "uniform") == 16 + 4 + 4 + 2
    # ERK 50%: raw scores (4+4)/16 = 1/2 and (2+4)/8 = 3/4; ε solves ε(16·1/2 + 8·3/4) = 0.5·24, so ε = 6/7 and the
    # densities are 3/7 and 9/14: 16 − floor(16·4/7) = 7 and 8 − floor(8·5/14) = 6 live weights; biases 6.
    assert sparse_parameter_count(model, 0.5, "erk") == 7 + 6 + 6


def _lenet_parameters(width: float) -> int:
    h1, h2 = scale_channels(300, width), scale_channels(100, width)
    return (784 * h1 + h1) + (h1 * h2 + h2) + (h2 * 10 + 10)


LENET_90_ERK = 27_031  # sparse_parameter_count(lenet300_100, 0.9, "erk"), checked below


def test_lenet_sparse_target() -> None:
    assert sparse_parameter_count(create_model("lenet300_100", 10), 0.9, "erk") == LENET_90_ERK


# One count below an achievable count, the count itself, one above: the closest is on either side of the step.
@pytest.mark.parametrize(
    "target", [LENET_90_ERK, _lenet_parameters(0.5) - 1, _lenet_parameters(0.5), _lenet_parameters(0.5) + 1]
)
def test_match_width_finds_the_closest_achievable_count(target: int) -> None:
    width = match_width("lenet300_100", 10, target)
    achieved = count_parameters(_meta_model("lenet300_100", 10, width))
    assert achieved == _lenet_parameters(width)
    # Hidden sizes change only where 300·w or 100·w crosses k + 1/2: one width between each pair of such
    # steps covers every count any width in (0, 1) gives, and none comes closer to the target.
    steps = sorted({0.0, 1.0} | {(k + 0.5) / units for units in (300, 100) for k in range(units)})
    best = min(abs(_lenet_parameters((a + b) / 2) - target) for a, b in zip(steps, steps[1:]))
    assert abs(achieved - target) == best
    assert abs(achieved - target) / target < 0.01


def test_match_width_gives_the_small_dense_wrn() -> None:
    target = sparse_parameter_count(create_model("wrn22_2", 10), 0.9, "erk")
    width = match_width("wrn22_2", 10, target)
    assert 0.2 < width < 0.45  # about sqrt(0.1): parameters grow with the square of the width
    assert count_parameters(_meta_model("wrn22_2", 10, width)) == pytest.approx(target, rel=0.01)


@pytest.mark.parametrize("target", [0, -5, 10**15])
def test_match_width_rejects_unreachable_targets(target: int) -> None:
    with pytest.raises(ConfigError):
        match_width("lenet300_100", 10, target)


def test_match_width_gives_the_narrowest_network_for_a_tiny_target() -> None:
    width = match_width("lenet300_100", 10, 1)
    # Every hidden layer is down to one unit.
    assert count_parameters(_meta_model("lenet300_100", 10, width)) == (784 * 1 + 1) + (1 * 1 + 1) + (1 * 10 + 10)
