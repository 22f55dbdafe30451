"""The compact file (round trip, size, refusals) and the sparse inference copy (outputs against the dense model)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from fake_datasets import write_fashion_mnist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_rigl import ImageClassifier
from lightning_rigl.cli import main
from lightning_rigl.export import (
    CondensedConv2d,
    CondensedLinear,
    SemiStructuredLinear,
    SparseConv2d,
    SparseFileError,
    SparseLinear,
    SparseMultiheadAttention,
    condense,
    load_sparse,
    read_masks,
    read_metadata,
    save_sparse,
    sparse_inference,
)
from lightning_rigl.export.file import FORMAT_VERSION, nonzero_masks
from lightning_rigl.flops import model_size_bytes
from lightning_rigl.kernels.timing import choose
from lightning_rigl.models import create_model, list_models
from lightning_rigl.sparsity import layer_densities, live_count, random_masks
from lightning_rigl.sparsity.structure import NM, ConstantFanIn, Structure

INPUTS = {"lenet300_100": (1, 28, 28), "small_cnn": (1, 28, 28), "wrn22_2": (3, 32, 32),
          "resnet50_cifar": (3, 32, 32), "resnet50": (3, 64, 64), "mobilenet_v1": (3, 64, 64),
          "vit_tiny": (1, 28, 28), "vit_b_16": (3, 224, 224)}


def sparse_model(arch: str, sparsity: float = 0.9, seed: int = 0,
                 structure: Structure | None = None) -> tuple[nn.Module, dict[str, Tensor]]:
    """A registry model with random ERK masks (within ``structure``) applied, non-default BatchNorm statistics
    and its masks."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10)
    params = {name: model.get_parameter(name) for name in layer_densities(model, sparsity, "erk")}
    densities = layer_densities(model, sparsity, "erk")
    if structure is not None:
        densities = {name: d if d == 1 else structure.layer_count(name, params[name].shape, live_count(
            params[name].numel(), d)) / params[name].numel() for name, d in densities.items()}
    masks = random_masks(params, densities, seed, structure)
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(7)
    return model.eval(), masks


def buffer_bytes(model: nn.Module) -> int:
    return sum(buffer.numel() * buffer.element_size() for buffer in model.buffers())


@pytest.mark.parametrize("arch", [name for name in list_models() if name != "vit_b_16"])  # vit_tiny: its class
def test_round_trip_is_exact_and_the_file_is_the_official_size(arch: str, tmp_path) -> None:
    model, masks = sparse_model(arch)
    path = save_sparse(model, tmp_path / "model.safetensors", masks)
    state = load_sparse(path)
    expected = model.state_dict()
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert {name: torch.equal(mask, masks[name]) for name, mask in read_masks(path).items()} == dict.fromkeys(
        masks, True)
    official = model_size_bytes(model, {name: float(m.float().mean()) for name, m in masks.items()})
    header = int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: the header's length, then the header
    assert path.stat().st_size - 8 - header == pytest.approx(official + buffer_bytes(model), rel=0.005)
    assert header <= 320 * len(model.state_dict())  # its JSON index: names, dtypes, shapes, offsets

    fresh = create_model(arch, num_classes=10)
    assert load_sparse(path, fresh) is fresh
    assert all(torch.equal(fresh.state_dict()[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_constant_fan_in_layers_are_stored_condensed_and_round_trip_exactly(tmp_path, dtype) -> None:
    model, masks = sparse_model("lenet300_100", structure=ConstantFanIn())
    name = "features.2.weight"
    with torch.no_grad():  # an ablated neuron, and a live weight that is exactly 0 (grown at zero)
        masks[name][3] = False
        weight = model.get_parameter(name)
        weight[3] = 0
        weight[0, masks[name][0].nonzero()[0, 0]] = 0.0
    path = save_sparse(model, tmp_path / "model.safetensors", masks, dtype=dtype)
    stored = load_file(path)  # any safetensors reader reads it
    rows, fan_in = masks[name].shape[0], int(masks[name][0].sum())
    assert stored[f"{name}:indices"].shape == (rows - 1, fan_in) and stored[f"{name}:indices"].dtype == torch.int16
    assert stored[f"{name}:values"].shape == (rows - 1, fan_in) and f"{name}:mask" not in stored
    state, expected = load_sparse(path), model.state_dict()
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype
        if dtype is None:
            assert torch.equal(state[key], tensor), key
        else:
            torch.testing.assert_close(state[key], tensor, rtol=1e-2, atol=1e-3)
    assert all(torch.equal(mask, masks[key]) for key, mask in read_masks(path).items())
    bitmask = save_sparse(model, tmp_path / "bitmask.safetensors", masks, dtype=dtype, condensed=False)
    assert f"{name}:mask" in load_file(bitmask)
    # Condensed: 2 bytes of index per live weight and a bit per neuron, instead of a bit per position.
    sparse = {key: m for key, m in masks.items() if not m.all()}
    condensed_extra = sum(2 * int(m.sum()) + math.ceil(m.shape[0] / 8) - math.ceil(m.numel() / 8)
                          for m in sparse.values())
    assert path.stat().st_size - bitmask.stat().st_size == pytest.approx(condensed_extra, abs=2000)  # headers


def test_default_masks_are_the_non_zero_positions_and_float16_halves_the_values(tmp_path) -> None:
    model, masks = sparse_model("lenet300_100")
    full = save_sparse(model, tmp_path / "full.safetensors")
    holding_zeros = [name for name, mask in masks.items() if not mask.all()]  # ERK keeps the classifier dense
    assert {name: torch.equal(mask, masks[name]) for name, mask in read_masks(full).items()} == dict.fromkeys(
        holding_zeros, True)
    half = save_sparse(model, tmp_path / "half.safetensors", masks, dtype=torch.float16)
    state = load_sparse(half)
    for name, tensor in model.state_dict().items():
        assert state[name].dtype == tensor.dtype
        torch.testing.assert_close(state[name], tensor, rtol=1e-3, atol=1e-4)
    live = sum(int(mask.sum()) for mask in masks.values())
    assert full.stat().st_size - half.stat().st_size >= 2 * live


def test_a_mask_that_would_drop_a_weight_is_refused(tmp_path) -> None:
    model, masks = sparse_model("lenet300_100")
    name = next(iter(masks))
    wrong = masks[name].clone()
    wrong[masks[name]] = False  # a live, non-zero weight falls outside
    with pytest.raises(ValueError, match="non-zero weights outside its mask"):
        save_sparse(model, tmp_path / "x.safetensors", {name: wrong})
    with pytest.raises(ValueError, match="lacks"):
        save_sparse(model, tmp_path / "x.safetensors", {"nope.weight": wrong})
    assert not (tmp_path / "x.safetensors").exists()


def _rewritten(data: bytes, tmp_path, **changes: str) -> bytes:
    """The file with its safetensors metadata changed (tensors and checksum kept)."""
    source = tmp_path / "source.safetensors"
    source.write_bytes(data)
    with safe_open(source, framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        metadata = {**file.metadata(), **changes}
    save_file(tensors, tmp_path / "rewritten.safetensors", metadata=metadata)
    return (tmp_path / "rewritten.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data, _: data[: len(data) - 100], r"truncated or corrupted"),
        (lambda data, _: data[:40], r"truncated or corrupted"),
        (lambda data, _: data[:-5] + bytes(b ^ 0xFF for b in data[-5:]), r"corrupted: its tensors do not match"),
        (lambda data, _: b"PK\x03\x04" + data[4:], r"not a safetensors file"),
        (lambda data, tmp: _rewritten(data, tmp, format="other"), r"not a lightning-rigl sparse model file"),
        (lambda data, tmp: _rewritten(data, tmp, format_version=str(FORMAT_VERSION + 1)),
         rf"format {FORMAT_VERSION + 1}, written by a newer lightning-rigl"),
    ],
    ids=["truncated payload", "truncated header", "flipped bytes", "another file", "another safetensors file",
         "newer format"],
)
def test_a_damaged_file_is_refused_and_nothing_is_loaded(tmp_path, damage, message) -> None:
    model, masks = sparse_model("lenet300_100")
    path = save_sparse(model, tmp_path / "model.safetensors", masks)
    path.write_bytes(damage(path.read_bytes(), tmp_path))
    target = create_model("lenet300_100", num_classes=10)
    before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    with pytest.raises(SparseFileError, match=message):
        load_sparse(path, target)
    assert all(torch.equal(target.state_dict()[name], tensor) for name, tensor in before.items())


def test_another_models_file_is_refused_and_nothing_is_loaded(tmp_path) -> None:
    model, masks = sparse_model("lenet300_100")
    path = save_sparse(model, tmp_path / "model.safetensors", masks)
    other = create_model("lenet300_100", num_classes=7)
    before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with pytest.raises(SparseFileError, match=r"another model.*classifier\.weight: \(10, 100\) in the file"):
        load_sparse(path, other)
    assert all(torch.equal(other.state_dict()[name], tensor) for name, tensor in before.items())
    with pytest.raises(SparseFileError, match="missing"):
        load_sparse(path, create_model("small_cnn", num_classes=10))
    with pytest.raises(SparseFileError, match="no sparse model file"):
        load_sparse(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("arch", ["lenet300_100", "small_cnn", "resnet50_cifar", "mobilenet_v1", "vit_tiny"])
@pytest.mark.parametrize("mode", ["auto", "sparse"])
def test_the_inference_copy_gives_the_models_outputs(arch: str, mode: str) -> None:
    model, masks = sparse_model(arch, sparsity=0.95)
    example = torch.randn(4, *INPUTS[arch])
    inference = sparse_inference(model, masks, example_input=example, mode=mode, repeats=1)
    convertible = [choice for choice in inference.sparse_layers
                   if choice.kind in {"linear", "conv", "conv1x1", "attention projection"}]
    assert convertible and not any(c.converted for c in inference.sparse_layers if c not in convertible)
    if mode == "sparse":
        assert all(choice.converted for choice in convertible)
    else:
        assert all(set(choice.times_ms) == {"dense", "csr"} for choice in convertible)
        assert all(choice.kernel == choose(choice.times_ms) for choice in convertible)
    with torch.no_grad():
        for batch in (1, 3, 8):
            x = torch.randn(batch, *INPUTS[arch])
            torch.testing.assert_close(inference(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(module, (SparseLinear, SparseConv2d)) for module in model.modules()), "model changed"


@pytest.mark.parametrize("arch", ["lenet300_100", "resnet50_cifar", "vit_tiny"])
@pytest.mark.parametrize("mode", ["auto", "sparse"])
def test_constant_fan_in_layers_run_condensed_and_give_the_models_outputs(arch: str, mode: str) -> None:
    model, masks = sparse_model(arch, sparsity=0.9, structure=ConstantFanIn())
    example = torch.randn(2, *INPUTS[arch])
    inference = sparse_inference(model, masks, example_input=example, mode=mode, repeats=1)
    convertible = [choice for choice in inference.sparse_layers
                   if choice.kind in {"linear", "conv", "conv1x1", "attention projection"} and choice.density < 1]
    assert convertible
    if mode == "sparse":
        assert all(choice.kernel == "condensed" for choice in convertible)
        assert any(isinstance(module, (CondensedLinear, CondensedConv2d)) for module in inference.modules())
    else:
        assert all(set(choice.times_ms) == {"dense", "csr", "condensed"} for choice in convertible)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, *INPUTS[arch])
            torch.testing.assert_close(inference(x), model(x), rtol=1e-4, atol=1e-5)


def test_condensed_form_of_a_hand_made_layer_with_an_ablated_neuron() -> None:
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 7.0, 0.0]]))
    mask = linear.weight != 0
    indices, values = condense(linear.weight, mask)
    assert indices.tolist() == [[1, 3], [0, 1], [0, 2]] and values.tolist() == [[2, 3], [0, 0], [5, 7]]
    x = torch.tensor([[1.0, 10.0, 100.0, 1000.0], [2.0, 0.0, 0.0, 1.0]])  # one example, and two: two kernels
    expected = torch.tensor([[3020.0, 0.0, 705.0], [3.0, 0.0, 10.0]]) + linear.bias.detach()
    torch.testing.assert_close(CondensedLinear(linear, mask)(x[:1]), expected[:1])
    torch.testing.assert_close(CondensedLinear(linear, mask)(x), expected)
    with pytest.raises(ValueError, match="constant fan-in"):
        condense(linear.weight, mask | torch.tensor([True, False, False, False]))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="2:4 sparse tensor cores need a CUDA GPU of compute capability 8.0 or more")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_four_linear_layers_run_on_sparse_tensor_cores(dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).to("cuda", dtype)
    masks = {f"{i}.weight": NM(2, 4).random_mask(model[i].weight.shape, model[i].weight.numel() // 2,
                                                 torch.Generator().manual_seed(i), "cuda") for i in (0, 2)}
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.mul_(masks[f"{i}.weight"])
    inference = sparse_inference(model, masks, mode="sparse")
    assert [choice.kernel for choice in inference.sparse_layers] == ["2:4", "2:4"]
    assert isinstance(inference[0], SemiStructuredLinear)
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), model(x), rtol=2e-2, atol=2e-2)
    timed = sparse_inference(model, masks, example_input=x, mode="auto", repeats=3)
    assert all("2:4" in choice.times_ms for choice in timed.sparse_layers)


def test_strided_and_padded_convolutions_match_their_dense_version() -> None:
    torch.manual_seed(0)
    for conv in (nn.Conv2d(6, 8, 1, stride=2), nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
                 nn.Conv2d(6, 8, (3, 5), padding=(1, 2), dilation=(1, 2)), nn.Conv2d(6, 8, 1, bias=True)):
        for mask, kernel in [(torch.rand_like(conv.weight) < 0.3, "csr"),
                             (ConstantFanIn().random_mask(conv.weight.shape, 8 * 5, torch.Generator(), "cpu"),
                              "condensed")]:
            with torch.no_grad():
                conv.weight.mul_(mask)
            model = nn.Sequential(conv)
            inference = sparse_inference(model, {"0.weight": mask}, mode="sparse")
            assert inference.sparse_layers[0].kernel == kernel
            x = torch.randn(2, 6, 11, 13)
            with torch.no_grad():
                torch.testing.assert_close(inference(x), model(x), rtol=1e-4, atol=1e-5)


def test_depthwise_convolutions_stay_dense_and_bad_arguments_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    mask = torch.ones_like(model[0].weight, dtype=torch.bool)
    inference = sparse_inference(model, {"0.weight": mask}, mode="sparse")
    assert not inference.sparse_layers[0].converted and isinstance(inference[0], nn.Conv2d)
    with pytest.raises(ValueError, match="example_input"):
        sparse_inference(model, {"0.weight": mask})
    with pytest.raises(ValueError, match="mode must be"):
        sparse_inference(model, {"0.weight": mask}, mode="fast")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        sparse_inference(model, {"1.weight": mask}, mode="sparse")


def test_the_command_exports_a_tiny_runs_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    """`lightning-rigl export` on the checkpoint of a real `lightning-rigl fit`: the file holds the trained
    network, its masks are the callback's, and the printed sizes are the file's and the official count's."""
    monkeypatch.chdir(tmp_path)
    write_fashion_mnist(tmp_path / "fashion", n_train=64, n_test=16)
    main(["fit", "--data.data_dir", str(tmp_path / "fashion"), "--data.val_size", "0", "--data.batch_size", "16",
          "--trainer.max_steps", "4", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
          "--trainer.enable_model_summary", "false", "--test_after_fit", "false"])
    (checkpoint,) = tmp_path.glob("runs/*/version_0/checkpoints/*.ckpt")
    (config,) = tmp_path.glob("runs/*/version_0/config.yaml")
    trained = ImageClassifier.load_from_checkpoint(checkpoint, weights_only=False).net
    callback_masks = torch.load(checkpoint, weights_only=True)["callbacks"]["lightning_rigl"]["masks"]
    capsys.readouterr()

    for extra in ([], ["--config", str(config)]):
        main(["export", "--ckpt_path", str(checkpoint), "--output", "model.safetensors", *extra])
        out = capsys.readouterr().out
        network = load_sparse("model.safetensors", create_model(**read_metadata("model.safetensors")["model"]))
        assert all(torch.equal(network.state_dict()[name], t) for name, t in trained.state_dict().items())
        assert {f"net.{name}": mask for name, mask in read_masks("model.safetensors").items()}.keys() == callback_masks.keys()
        printed = re.search(r"compact file:\s+([\d,]+) bytes", out).group(1)
        assert int(printed.replace(",", "")) == Path("model.safetensors").stat().st_size
        assert "wrote model.safetensors (float32 values, 3 sparse layers)" in out

    main(["export", "--ckpt_path", str(checkpoint), "--output", "half.safetensors", "--dtype", "float16"])
    assert Path("half.safetensors").stat().st_size < Path("model.safetensors").stat().st_size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt_path", "missing.ckpt", "--output", "x.safetensors"], r"no checkpoint at missing\.ckpt"),
        (["--ckpt_path", "{notes}", "--output", "x.safetensors"], r"not a readable PyTorch checkpoint"),
        (["--ckpt_path", "{plain}", "--output", "x.safetensors"], r"not a checkpoint of the lightning-rigl command"),
        (["--ckpt_path", "{plain}", "--output", "x.safetensors", "--dtype", "int8"], r"invalid choice: 'int8'"),
        (["--ckpt_path", "tensor.ckpt", "--output", "x.safetensors"], r"holds a Tensor, not a checkpoint's dictionary"),
        (["--ckpt_path", "{plain}", "--output", "x.safetensors", "--config", "broken.yaml"], r"broken\.yaml is not valid YAML"),
        (["--ckpt_path", "{plain}", "--output", "x.safetensors", "--config", "list.yaml"], r"model section of list\.yaml"),
        (["--ckpt", "{plain}", "--output", "x.safetensors"], r"the following arguments are required: --ckpt_path"),
    ],
    ids=["missing", "not a checkpoint", "another checkpoint", "bad dtype", "a tensor", "broken YAML",
         "model not a mapping", "abbreviated option"],
)
def test_the_command_refuses_bad_input_with_exit_status_2(tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    Path("notes.ckpt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, "plain.ckpt")
    torch.save(torch.zeros(3), "tensor.ckpt")
    Path("broken.yaml").write_text("model: [unclosed\n")
    Path("list.yaml").write_text("model:\n  - lenet300_100\n")
    args = [arg.format(notes="notes.ckpt", plain="plain.ckpt") for arg in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not Path("x.safetensors").exists()


def test_a_config_without_num_classes_builds_the_checkpoints_network(tmp_path, monkeypatch, capsys) -> None:
    """The config LightningCLI saves has no model.num_classes (the data module links it): the checkpoint's
    value stands, and the config's settings go on top."""
    monkeypatch.chdir(tmp_path)
    classifier = ImageClassifier(arch="lenet300_100", num_classes=7)
    torch.save({"state_dict": classifier.state_dict(), "hyper_parameters": dict(classifier.hparams)}, "run.ckpt")
    Path("config.yaml").write_text("model:\n  arch: lenet300_100\n  lr: 0.3\n")
    main(["export", "--ckpt_path", "run.ckpt", "--output", "model.safetensors", "--config", "config.yaml"])
    assert "0 sparse layers" in capsys.readouterr().out
    network = load_sparse("model.safetensors", create_model(**read_metadata("model.safetensors")["model"]))
    assert network.classifier.out_features == 7
    Path("wrong.yaml").write_text("model:\n  arch: small_cnn\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", "run.ckpt", "--output", "x.safetensors", "--config", "wrong.yaml"])
    assert exit_info.value.code == 2 and "do not build the network" in capsys.readouterr().err


def test_weights_outside_the_masks_are_zero_in_the_copy_whichever_version_runs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(2, 2, 6, 6)
    model(x)
    masks = {"0.weight": torch.rand(2, 1, 3, 3) < 0.5, "2.weight": torch.rand(3, 32) < 0.5}
    inference = sparse_inference(model, masks, mode="sparse")
    assert [(c.kind, c.converted) for c in inference.sparse_layers] == [("grouped conv", False), ("linear", True)]
    reference = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(32, 3)).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        reference[0].weight.mul_(masks["0.weight"])
        reference[2].weight.mul_(masks["2.weight"])
        torch.testing.assert_close(inference(x), reference(x))
        assert not torch.equal(model(x), reference(x)), "the original model was changed"


def test_sparse_layers_return_row_major_outputs_and_convert_a_root_layer() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    linear = nn.Linear(5, 3)
    with torch.no_grad():
        conv.weight[0] = 0
        linear.weight[0] = 0
    for layer, x in ((conv, torch.randn(2, 3, 5, 5)), (linear, torch.randn(4, 5))):
        inference = sparse_inference(layer, mode="sparse")  # the default masks name the root's "weight"
        assert isinstance(inference, (CondensedConv2d, CondensedLinear))  # one neuron ablated, the others full
        with torch.no_grad():
            out = inference(x)
            assert out.is_contiguous()
            torch.testing.assert_close(out.view(len(x), -1), layer(x).view(len(x), -1))


def test_half_precision_layers_on_the_cpu_stay_dense_and_bad_masks_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).half()
    mask = torch.ones(3, 4, dtype=torch.bool)
    (choice,) = sparse_inference(model, {"0.weight": mask}, mode="sparse").sparse_layers
    assert not choice.converted and "float32" in choice.why_not
    with pytest.raises(ValueError, match=r"the mask of '0\.weight' has shape \(4,\)"):
        sparse_inference(model, {"0.weight": torch.ones(4, dtype=torch.bool)}, mode="sparse")
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        sparse_inference(model, {"0.weight": mask}, example_input=torch.randn(1, 4).half(), repeats=0)


def test_a_dense_runs_masks_are_its_zeros_in_convolution_and_linear_weights() -> None:
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight[0, 1] = 0.0
        net[1].weight.zero_()  # not a convolution or linear weight: never masked
    masks = nonzero_masks(net)
    assert list(masks) == ["0.weight"] and int(masks["0.weight"].sum()) == 5
    assert nonzero_masks(nn.Sequential(nn.ReLU())) == {}  # nothing to mask


def test_attention_projections_are_converted_through_a_stand_in_attention_module() -> None:
    # nn.MultiheadAttention reads in_proj_weight and out_proj.weight itself: the copy replaces it by a
    # SparseMultiheadAttention whose two projections are layers of their own.
    model, masks = sparse_model("vit_tiny", sparsity=0.95)
    inference = sparse_inference(model, masks, mode="sparse")
    choices = {choice.name: choice for choice in inference.sparse_layers}
    block = "encoder.layers.encoder_layer_0"
    for name in (f"{block}.self_attention.in_proj", f"{block}.self_attention.out_proj"):
        assert choices[name].kind == "attention projection" and choices[name].converted, choices[name]
        assert isinstance(inference.get_submodule(name), SparseLinear)
    assert isinstance(inference.get_submodule(f"{block}.self_attention"), SparseMultiheadAttention)
    assert isinstance(model.get_submodule(f"{block}.self_attention"), nn.MultiheadAttention), "model changed"


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "call",
    ["self", "self, weights per head", "cross", "padding and bool mask", "float mask, no weights", "causal",
     "unbatched"],
)
def test_the_stand_in_attention_gives_the_modules_outputs(call: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    stand_in = SparseMultiheadAttention(attention)
    batch, length, source = 3, 5, 7
    shape = (lambda n: (batch, n, 16)) if batch_first else (lambda n: (n, batch, 16))
    x = torch.randn(shape(length))
    kwargs: dict[str, object] = {}
    args = (x, x, x)
    if call == "self, weights per head":
        kwargs = {"average_attn_weights": False}
    elif call == "cross":
        memory = torch.randn(shape(source))
        args = (x, memory, memory.clone())
    elif call == "padding and bool mask":
        kwargs = {"key_padding_mask": torch.tensor([[False] * 4 + [True]] * batch),
                  "attn_mask": torch.rand(length, length) > 0.8}
        kwargs["attn_mask"].fill_diagonal_(False)
    elif call == "float mask, no weights":
        kwargs = {"attn_mask": torch.randn(batch * 4, length, length), "need_weights": False}
    elif call == "causal":
        kwargs = {"attn_mask": nn.Transformer.generate_square_subsequent_mask(length), "is_causal": True,
                  "need_weights": False}
    elif call == "unbatched":
        x = torch.randn(length, 16)
        args = (x, x, x)
    with torch.no_grad():
        expected, expected_weights = attention(*args, **kwargs)
        out, weights = stand_in(*args, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)


def test_attention_that_the_stand_in_cannot_replace_stays_dense_with_the_reason() -> None:
    model = nn.Sequential()
    model.attention = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    masks = {"attention.in_proj_weight": torch.rand(24, 8) > 0.5}
    (choice,) = sparse_inference(model, masks, mode="sparse").sparse_layers
    assert not choice.converted and "add_bias_kv" in choice.why_not