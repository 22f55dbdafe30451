"""Sparse kernels in training (``kernels="sparse"`` and ``"auto"``): each kernel against the masked dense product it
replaces, on small exact cases and on a real training step; the plain model after fit; the refusals."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import SPARSE_NAMES, TinyNet, train
from methods import METHODS
from torch import nn

from lightning_rigl import SET, RigL, Static
from lightning_rigl.errors import ConfigError
from lightning_rigl.kernels import KernelPlan, TrainingKernels
from lightning_rigl.kernels.timing import choose
from lightning_rigl.kernels.training import sparse_kernels

KERNELS = sparse_kernels(torch.empty(1))  # ("native", "csr") where the native kernels build here, else ("csr",)


def _plan(kernel: str) -> KernelPlan:
    return KernelPlan(kernel, kernel, kernel)


def _with_kernels(module: nn.Module, mask: torch.Tensor, kernel: str) -> TrainingKernels:
    kernels = TrainingKernels("sparse")
    kernels.install({"weight": module}, {"weight": mask})
    kernels.layers["weight"].plan = _plan(kernel)
    kernels.begin_step(dense_weight_grad=False)
    return kernels


def test_auto_keeps_dense_unless_a_kernel_beats_it_by_more_than_five_percent() -> None:
    assert choose({"dense": 1.0, "native": 0.96, "csr": 1.2}) == "dense"  # inside the timing noise: a tie
    assert choose({"dense": 1.0, "native": 0.90, "csr": 0.94}) == "native"
    assert choose({"native": 0.90, "csr": 0.80}) == "csr"  # nothing to fall back to: the fastest


def test_the_native_kernels_build_here() -> None:
    # CI and the development machine have a compiler: a silent fallback there would hide a broken build.
    assert KERNELS[0] == "native"


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_hand_made_4x4_layer_gives_the_masked_products_exactly(kernel: str) -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0],  # a neuron without live weights
                           [0.0, -1.0, 0.0, 3.0],
                           [4.0, 0.0, 0.0, -2.0]])
    mask = weight != 0
    linear = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]], requires_grad=True)
    grad = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, 1.0]])
    _with_kernels(linear, mask, kernel)
    out = linear(x)
    out.backward(grad)
    # By hand: row o of the output is Σ W[o, i] x[i] over live i; x's gradient Σ_o g[o] W[o, i]; W's g[o] x[i].
    assert torch.equal(out, torch.tensor([[7.0, 0.0, 10.0, -4.0], [0.5, 0.0, 7.0, -2.0]]))
    assert torch.equal(x.grad, torch.tensor([[9.0, 1.0, 2.0, -7.0], [4.0, -1.0, 0.0, 1.0]]))
    expected = torch.tensor([[1.0, 0.0, 3.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0],
                             [0.0, -3.0, 0.0, -2.0],
                             [2.5, 0.0, 0.0, 10.0]])
    assert torch.equal(linear.weight.grad, expected)  # 0 at every dead position, none computed there


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 70, 600])  # under, over and across the native kernels' 64-wide chunks
@pytest.mark.parametrize("kernel", KERNELS)
def test_each_kernel_matches_the_masked_dense_layer(kernel: str, rows: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(53, 37).to(dtype)
    mask = torch.rand(37, 53) < 0.2
    mask[5] = False  # an empty row
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = copy.deepcopy(dense)
    _with_kernels(sparse, mask, kernel)
    x = torch.randn(2, rows, 53, dtype=dtype)  # a batch of sequences: the leading dimensions are kept
    grad = torch.randn(2, rows, 37, dtype=dtype)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outputs = [module(inp) for module, inp in zip((dense, sparse), inputs)]
    for out, inp in zip(outputs, inputs):
        out.backward(grad)
    # float32 sums of up to 1,200 products differ in their last bits with the order of summation; float64 shows that
    # nothing else differs.
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
    assert outputs[1].is_contiguous()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, **tolerance)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **tolerance)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad * mask, **tolerance)
    assert not sparse.weight.grad[~mask].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: cuSPARSE's path is untested without one")
def test_on_cuda_the_csr_kernels_match_the_masked_dense_layer() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(256, 384).cuda()
    mask = torch.rand(384, 256, device="cuda") < 0.1
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = copy.deepcopy(dense)
    kernels = _with_kernels(sparse, mask, "csr")
    assert sparse_kernels(sparse.weight) == ("csr",)
    x = torch.randn(64, 256, device="cuda")
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outputs = [module(inp) for module, inp in zip((dense, sparse), inputs)]
    for out in outputs:
        out.sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad * mask, rtol=1e-4, atol=1e-4)
    kernels.remove()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", KERNELS)
def test_a_1x1_convolution_is_a_linear_layer_over_pixels(kernel: str, stride: int) -> None:
    torch.manual_seed(0)
    dense = nn.Conv2d(12, 20, 1, stride=stride)
    mask = torch.rand(20, 12, 1, 1) < 0.3
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = copy.deepcopy(dense)
    _with_kernels(sparse, mask, kernel)
    x = torch.randn(3, 12, 7, 9)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outputs = [module(inp) for module, inp in zip((dense, sparse), inputs)]
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    torch.testing.assert_close(outputs[1], outputs[0])
    assert outputs[1].is_contiguous()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad)
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad * mask)
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)


def test_a_step_that_reads_the_dense_gradient_gets_it_and_the_others_stay_sparse() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    mask = torch.rand(8, 16) < 0.25
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = copy.deepcopy(dense)
    kernels = _with_kernels(sparse, mask, KERNELS[0])
    kernels.begin_step(dense_weight_grad=True)
    x = torch.randn(5, 16)
    dense(x).sum().backward()
    sparse(x).sum().backward()
    torch.testing.assert_close(sparse.weight.grad, dense.weight.grad)  # every position: growth reads dead ones
    assert sparse.weight.grad[~mask].any()


def test_patterns_follow_a_mask_change() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :3] = True
    kernels = _with_kernels(linear, mask, KERNELS[0])
    mask = ~mask  # the other half of the weights goes live
    with torch.no_grad():
        linear.weight.mul_(mask)
    kernels.masks_changed({"weight": mask})
    x = torch.randn(3, 6)
    torch.testing.assert_close(linear(x), x @ linear.weight.t() + linear.bias)


class OneByOneNet(TinyNet):
    """TinyNet with a 1×1 convolution and a wide linear layer, so that every kernel kind trains."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU(),
                                      nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 4))


@pytest.mark.parametrize("mode", ["sparse", "auto"])
def test_a_real_step_gives_the_dense_paths_outputs_and_live_gradients(mode: str) -> None:
    """One training step of a real Trainer, kernels against dense: same loss, same gradients at live positions."""

    class Probe(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads = {n: step_gradient(sparse, n, p) for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = outputs["loss"].item()

    probes = {}
    for kernels in ("dense", mode):
        probes[kernels], sparse = Probe(), Static(sparsity=0.7, distribution="uniform", kernels=kernels)
        train([sparse, probes[kernels]], model_factory=OneByOneNet, steps=1)
    if mode == "sparse":  # the first layer is a 3×3 convolution, which "uniform" keeps dense as well
        assert {name for name, used in sparse.kernels_used.items() if used == KERNELS[0]} == {
            "features.2.weight", "classifier.1.weight", "classifier.3.weight"}
    assert probes[mode].loss == pytest.approx(probes["dense"].loss, rel=1e-5)
    for name, grad in probes["dense"].grads.items():
        torch.testing.assert_close(probes[mode].grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["static", "rigl", "set", "srigl", "rigl_2_4"])
def test_sparse_kernels_train_the_dense_paths_masks(method: str) -> None:
    """Twelve steps with four mask updates: the same masks as the dense path, weights to float tolerance."""
    runs = {}
    for kernels in ("dense", "sparse"):
        sparse = METHODS[method](kernels=kernels)
        trainer = train([sparse], model_factory=OneByOneNet, steps=12)
        runs[kernels] = sparse, dict(trainer.lightning_module.named_parameters())
    (dense, dense_params), (fast, fast_params) = runs["dense"], runs["sparse"]
    assert fast.num_updates == dense.num_updates
    for name, mask in dense.masks.items():
        assert torch.equal(fast.masks[name], mask), name
    for name, param in dense_params.items():
        torch.testing.assert_close(fast_params[name], param, rtol=1e-4, atol=1e-5, msg=name)


class TiedNet(TinyNet):
    """A linear layer whose weight the forward also reads outside the layer (as tied weights are)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.classifier = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(self.classifier(x) + x @ self.classifier.weight)  # the second use: a dense gradient


def step_gradient(sparse, name: str, param: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient this step: its ``.grad``, or the live values the kernels kept for the live step (0
    elsewhere)."""
    if param.grad is not None:
        return param.grad.clone()
    layer = sparse.training_kernels.layers[name]
    return layer.pattern.dense(layer.live_grad, param.shape)


def test_gradients_from_the_kernels_alone_skip_the_masking_and_any_other_use_is_masked() -> None:
    class Spy(pl.Callback):
        clean: list[set[str]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.clean.append(sparse.training_kernels.clean_gradients())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            for name, mask in sparse.masks.items():
                assert not pl_module.get_parameter(name)[~mask].any(), f"step {trainer.global_step}: {name}"

    sparse, spy = Static(distribution={"classifier.weight": 0.7, "head.weight": 0.5},
                         include=["classifier.weight", "head.weight"], kernels="sparse", live_step=False), Spy()
    train([spy, sparse], model_factory=TiedNet, steps=4, accumulate_grad_batches=2, batch_size=16)  # spy first
    assert spy.clean == [{"head.weight"}] * 4


def test_a_pruning_step_masks_the_gradients_the_kernels_computed_under_the_old_mask(monkeypatch) -> None:
    """Pruning reads no dense gradient, so its pruning steps' weight gradients come from the sparse kernels, 0 only
    where the old mask was dead: the newly pruned positions must be masked before the optimizer step."""
    monkeypatch.setattr("lightning_rigl.kernels.training.choose", lambda times: next(
        (kernel for kernel in times if kernel == KERNELS[0]), "dense"))  # "auto" always picks the sparse kernel
    pruning = METHODS["pruning"](kernels="auto")
    recorder_masks = []

    class DeadStayZero(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder_masks.append(pruning.kernels_used["classifier.1.weight"])
            for name, mask in pruning.masks.items():
                assert not pl_module.get_parameter(name)[~mask].any(), f"step {trainer.global_step}: {name}"

    train([pruning, DeadStayZero()], model=TinyNet(optimizer="adam"), steps=10)
    assert pruning.num_updates >= 3 and KERNELS[0] in recorder_masks


def test_after_fit_the_model_is_plain_and_its_state_dict_unchanged() -> None:
    torch.manual_seed(0)
    model = OneByOneNet()
    keys = list(model.state_dict())
    sparse = RigL(sparsity=0.8, update_interval=2, stop_at=1.0, kernels="sparse")
    seen = {}

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["during"] = "forward" in pl_module.classifier[1].__dict__
            seen["copy"] = copy.deepcopy(pl_module)  # a deep copy during training (an EMA, say) works on its own

    train([sparse, Look()], model=model, steps=3)
    assert seen["during"] and not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(seen["copy"](x).shape, model(x).shape)


def test_a_failed_fit_leaves_the_model_plain() -> None:
    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise RuntimeError("boom")

    torch.manual_seed(0)
    model = OneByOneNet()
    with pytest.raises(RuntimeError, match="boom"):
        train([Static(sparsity=0.8, kernels="sparse"), Boom()], model=model, steps=3)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_auto_reports_each_layers_kernels_after_fit() -> None:
    sparse = Static(sparsity=0.5, kernels="auto")
    train([sparse], steps=2)
    assert sparse.training_kernels is None  # removed after fit; the record stays
    assert set(sparse.kernels_used) == set(SPARSE_NAMES)
    assert all(re.fullmatch(r"dense|native|csr|(\w+=\w+ ?){3}|dense \(.*\)", used)
               for used in sparse.kernels_used.values()), sparse.kernels_used


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("snfs", "SNFS keeps a moving average of the dense gradient"),
        ("rigl_sm", "RigL keeps a moving average of the dense gradient"),  # plain SGD: no momentum to read
        ("pruning", "GradualMagnitudePruning starts dense"),
        ("snip", "SNIP starts dense"),
    ],
)
def test_methods_that_cannot_train_sparse_kernels_refuse_before_training(method: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"kernels='sparse' cannot run here: {message}.*Use kernels='auto'"):
        train([METHODS[method](kernels="sparse")], model=TinyNet(optimizer="sgd_plain"), steps=12)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--trainer.callbacks.init_args.kernels", "fast"], r"kernels must be one of \('dense', 'sparse', 'auto'\)"),
     (["--trainer.callbacks.init_args.kernels", "sparse", "--trainer.precision", "bf16-mixed"],
      r"kernels='sparse' cannot run here: precision 'bf16-mixed'.*Use kernels='auto'")],
    ids=["unknown", "mixed precision"],
)
def test_the_command_refuses_bad_kernel_settings_in_one_line(tmp_path, monkeypatch, capsys, args, message) -> None:
    from fake_datasets import write_fashion_mnist

    from lightning_rigl.cli import main

    monkeypatch.chdir(tmp_path)
    write_fashion_mnist(tmp_path / "fashion", n_train=64, n_test=16)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.data_dir", str(tmp_path / "fashion"), "--data.val_size", "16", "--trainer.max_steps", "2",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", *args])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.match(f"lightning-rigl: error: .*{message}", line), line


def test_an_unknown_kernel_mode_fails_at_construction() -> None:
    with pytest.raises(ConfigError, match=r"kernels must be one of \('dense', 'sparse', 'auto'\), got 'fast'"):
        RigL(sparsity=0.9, kernels="fast")


def test_mixed_precision_refuses_sparse_and_auto_stays_dense() -> None:
    with pytest.raises(ConfigError, match="precision 'bf16-mixed'"):
        train([SET(sparsity=0.8, kernels="sparse")], steps=1, precision="bf16-mixed")
    auto = SET(sparsity=0.8, kernels="auto")
    train([auto], steps=2, precision="bf16-mixed")
    assert all(used.startswith("dense (precision 'bf16-mixed'") for used in auto.kernels_used.values())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("kernels", ["dense", "auto"])
def test_a_compiled_model_trains_under_every_method(method: str, kernels: str) -> None:
    sparse = METHODS[method](kernels=kernels)
    torch.manual_seed(0)
    compiled = torch.compile(TinyNet(), backend="eager")  # dynamo traces; eager runs the graph (no C++ build)
    trainer = train([sparse], model=compiled, steps=4)
    model = trainer.lightning_module
    for name, mask in sparse.masks.items():
        assert not model.get_parameter(name)[~mask].any(), name
    if kernels == "auto":
        assert all("torch.compile" in used for used in sparse.kernels_used.values())


def test_a_compiled_model_refuses_sparse_kernels() -> None:
    with pytest.raises(ConfigError, match="compiled with torch.compile"):
        train([METHODS["static"](kernels="sparse")], model=torch.compile(TinyNet(), backend="eager"), steps=1)


def test_a_compiled_submodule_is_seen_as_well() -> None:
    class CompiledInside(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.classifier = torch.compile(self.classifier, backend="eager")

    auto = RigL(sparsity=0.8, kernels="auto", update_interval=2)
    train([auto], model_factory=CompiledInside, steps=3)
    assert all("torch.compile" in used for used in auto.kernels_used.values())


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_the_default_run_makes_the_same_mask_updates_with_sparse_kernels(tmp_path, monkeypatch, capsys) -> None:
    """The default run's first two updates. From the third on, masks differ in several hundred positions: a dense
    run whose weights are perturbed by 1e-7 (relative) diverges from the plain one at the same update by the same
    counts (docs/sparse-kernels.md), so float rounding, not the kernels, decides those near-ties."""
    from lightning_rigl.cli import main

    monkeypatch.chdir(tmp_path)
    masks = {}
    for kernels in ("dense", "sparse"):
        # The default run's 4,300 steps end its updates at step 3,225: stopped early, its schedule unchanged.
        main(["fit", "--trainer.max_steps", "201", "--trainer.callbacks.init_args.stop_at", "3225",
              "--trainer.enable_progress_bar", "false",
              "--trainer.callbacks.init_args.kernels", kernels, "--trainer.logger.init_args.name", kernels])
        out = capsys.readouterr().out
        optimizer_step = "live weights" if kernels == "sparse" else "dense"
        line = "kernels: sparse, optimizer step: live weights" if kernels == "sparse" else "kernels: dense"
        assert re.search(rf"{line}; an optimizer step took \d+\.\d\d ms \(median of 201,", out), out
        record = json.loads(Path("runs", kernels, "version_0", "results.json").read_text())
        assert record["kernels"] == kernels and record["step_ms"] > 0 and record["optimizer_step"] == optimizer_step
        expected = "dense" if kernels == "dense" else KERNELS[0]
        assert record["layer_kernels"] == {"net.features.0.weight": expected, "net.features.2.weight": expected,
                                           "net.classifier.weight": "dense (the configuration keeps the layer dense)"
                                           if kernels == "sparse" else "dense"}
        (checkpoint,) = Path("runs", kernels).glob("version_0/checkpoints/*.ckpt")
        state = torch.load(checkpoint, weights_only=True)["callbacks"]["lightning_rigl"]
        assert state["num_updates"] == 2  # steps 100 and 200
        masks[kernels] = state["masks"]
    for name, mask in masks["dense"].items():
        assert torch.equal(masks["sparse"][name], mask), name
