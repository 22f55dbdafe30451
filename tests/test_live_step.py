"""The live step (``live_step=True``, the default with sparse kernels): between mask updates a sparse layer's
gradient is kept as its live values and the optimizer's rule runs on the live weights only. Each against the dense
gradient and the optimizer's own dense step it replaces."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet, train
from test_kernels import TiedNet
from torch import nn

from lightning_rigl import SET, RigL, Static
from lightning_rigl.errors import ConfigError
from lightning_rigl.kernels.live_step import LiveGradient, step_live, why_no_live_step

OPTIMIZERS = {
    "sgd_nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
    "sgd_dampening": (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}),
    "adam_amsgrad": (torch.optim.Adam, {"amsgrad": True, "weight_decay": 1e-4}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "rmsprop_centered": (torch.optim.RMSprop, {"momentum": 0.9, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {"lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    "nadam": (torch.optim.NAdam, {}),
    "radam": (torch.optim.RAdam, {"decoupled_weight_decay": True, "weight_decay": 0.1}),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_live_moves_live_weights_and_state_as_the_dense_step(name: str) -> None:
    """Two layers in two param groups (their own learning rates, moved between steps as a scheduler would): five
    live steps against the optimizer's own dense steps on the masked gradient."""
    cls, options = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(6, 8, generator=generator) < 0.3, torch.rand(5, 6, generator=generator) < 0.5]
    start = [torch.randn(mask.shape, generator=generator) * mask for mask in masks]
    dense = [nn.Parameter(w.clone()) for w in start]
    live = [nn.Parameter(w.clone()) for w in start]
    dense_opt = cls([{"params": [dense[0]]}, {"params": [dense[1]], "lr": 0.02}], lr=0.01, **options)
    live_opt = cls([{"params": [live[0]]}, {"params": [live[1]], "lr": 0.02}], lr=0.01, **options)
    positions = [mask.reshape(-1).nonzero().squeeze(1) for mask in masks]
    for step in range(5):
        grads = [torch.randn(mask.shape, generator=generator) * mask for mask in masks]
        for param, grad in zip(dense, grads):
            param.grad = grad
        dense_opt.step()
        step_live(live_opt, [LiveGradient(param, where, grad.reshape(-1)[where])
                             for param, where, grad in zip(live, positions, grads)])
        for opt in (dense_opt, live_opt):
            opt.param_groups[1]["lr"] *= 0.5
    for a, b, mask in zip(dense, live, masks):
        torch.testing.assert_close(b, a)
        assert not b[~mask].any()
        assert b.grad is None  # the optimizer's own step skips the weight
        dense_state, live_state = dense_opt.state[a], live_opt.state[b]
        assert dense_state.keys() == live_state.keys()
        for key, value in dense_state.items():
            torch.testing.assert_close(live_state[key], value, msg=key)


def test_optimizers_whose_rule_is_not_per_weight_keep_the_dense_step() -> None:
    weight = nn.Parameter(torch.zeros(2, 2))
    assert why_no_live_step(torch.optim.SGD([weight], lr=0.1)) is None
    # Adamax's dense step moves a dead weight's state (its infinity norm becomes eps): not the dense step's result.
    assert "Adamax is not one whose update" in why_no_live_step(torch.optim.Adamax([weight]))
    assert "LBFGS" in why_no_live_step(torch.optim.LBFGS([weight]))
    assert "differentiable" in why_no_live_step(torch.optim.SGD([weight], lr=0.1, differentiable=True))


class GradientSpy(pl.Callback):
    """At each optimizer step (after the sparse callback's hook): which sparse weights hold a ``.grad``."""

    def __init__(self) -> None:
        self.with_grad: list[set[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.with_grad.append({name for name, p in pl_module.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_between_updates_the_optimizer_steps_live_weights_only_and_trains_as_the_dense_step(optimizer: str) -> None:
    """RigL with updates at steps 4 and 8 of 12: a dense gradient exactly there (the decisions read it), live
    values on every other step; weights, masks and optimizer state as with ``live_step=False``."""
    runs = {}
    for live_step in (True, False):
        sparse, spy = RigL(sparsity=0.8, update_interval=4, start_at=4, stop_at=9, kernels="sparse",
                           live_step=live_step), GradientSpy()
        trainer = train([sparse, spy], model_factory=functools.partial(TinyNet, optimizer=optimizer), steps=12)
        runs[live_step] = sparse, spy, trainer
    (live, live_spy, live_trainer), (dense, _, dense_trainer) = runs[True], runs[False]
    assert (live.live_step_used, dense.live_step_used) == ("live weights", "dense (live_step=False)")
    assert live.num_updates == dense.num_updates == 2
    layer = "classifier.1.weight"  # the layer ERK makes sparse with kernels; "classifier.3.weight" stays dense
    assert live.kernels_used[layer] != "dense" and live.kernels_used["classifier.3.weight"].startswith("dense")
    assert [layer in grads for grads in live_spy.with_grad] == [step in (4, 8) for step in range(12)]
    for name, mask in dense.masks.items():
        assert torch.equal(live.masks[name], mask), name
    live_model, dense_model = live_trainer.lightning_module, dense_trainer.lightning_module
    for (name, a), b in zip(dense_model.named_parameters(), live_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    live_state = live_trainer.optimizers[0].state[live_model.get_parameter(layer)]
    dense_state = dense_trainer.optimizers[0].state[dense_model.get_parameter(layer)]
    for key, value in dense_state.items():
        torch.testing.assert_close(live_state[key], value, rtol=1e-4, atol=1e-6, msg=key)
        if isinstance(value, torch.Tensor) and value.dim():
            assert not live_state[key][~live.masks[layer]].any(), key


class AdamaxNet(TinyNet):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adamax(self.parameters())


class ClippingNet(TinyNet):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")


@pytest.mark.parametrize(("model", "trainer_kwargs", "options", "reason"), [
    (TinyNet, {"gradient_clip_val": 1.0}, {}, "gradient clipping reads every .grad"),
    (ClippingNet, {}, {}, "gradient clipping reads every .grad"),
    (AdamaxNet, {}, {}, "Adamax is not one whose update"),
    (TinyNet, {}, {"live_step": False}, "live_step=False"),
])
def test_where_code_reads_every_dense_gradient_the_live_step_turns_off(model, trainer_kwargs, options, reason) -> None:
    sparse, spy = Static(sparsity=0.8, kernels="sparse", **options), GradientSpy()
    train([sparse, spy], model_factory=model, steps=2, **trainer_kwargs)
    assert sparse.live_step_used.startswith("dense (") and reason in sparse.live_step_used
    assert all("classifier.1.weight" in grads for grads in spy.with_grad)


def test_live_step_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="live_step must be True or False, got 'yes'"):
        Static(sparsity=0.8, live_step="yes")


def test_a_tied_weight_takes_its_live_values_into_the_other_uses_gradient() -> None:
    """``classifier.weight`` is also read outside its layer: its live values join that dense gradient (and the
    masking and the optimizer's own step follow); ``head.weight`` steps live. Four steps of two micro-batches."""
    runs = {}
    for live_step in (True, False):
        sparse, spy = Static(distribution={"classifier.weight": 0.7, "head.weight": 0.5},
                             include=["classifier.weight", "head.weight"], kernels="sparse", live_step=live_step), \
            GradientSpy()
        trainer = train([sparse, spy], model_factory=TiedNet, steps=4, accumulate_grad_batches=2, batch_size=16)
        runs[live_step] = sparse, spy, dict(trainer.lightning_module.named_parameters())
    (live, spy, live_params), (_, _, dense_params) = runs[True], runs[False]
    assert all({"classifier.weight"} <= grads and "head.weight" not in grads for grads in spy.with_grad)
    for name, mask in live.masks.items():
        assert not live_params[name][~mask].any(), name
    for name, param in dense_params.items():
        torch.testing.assert_close(live_params[name], param, rtol=1e-5, atol=1e-6, msg=name)


class PrunesAtStepTwoUnannounced(Static):
    """A method that changes a mask on a step it declared unchanging: the live values must not step the weights
    the change made dead."""

    def update_masks(self, trainer, optimizer) -> None:
        if trainer.global_step == 2:
            name = "classifier.1.weight"
            mask = self.masks[name].clone()
            mask.view(-1)[mask.view(-1).nonzero()[:20]] = False
            self.masks[name] = mask
            self.live_counts[name] = int(mask.sum())
            self._apply_masks(None)
            self.training_kernels.masks_changed({name: mask})


def test_a_mask_change_on_a_live_step_makes_the_gradient_dense_first() -> None:
    sparse, spy = PrunesAtStepTwoUnannounced(sparsity=0.8, kernels="sparse"), GradientSpy()
    trainer = train([sparse, spy], steps=4)
    layer = "classifier.1.weight"
    assert [layer in grads for grads in spy.with_grad] == [False, False, True, False]
    weight = trainer.lightning_module.get_parameter(layer)
    assert not weight[~sparse.masks[layer]].any()



def test_an_update_that_replaces_its_optimizer_step_replaces_it_for_live_weights_too() -> None:
    """SET with update_placement="skip_step" reads no gradient at its updates, which change no weight: those
    steps must not keep live values (``may_change_masks``), or the change would hand them to the optimizer."""
    params = {}
    for live_step in (True, False):
        sparse, spy = SET(sparsity=0.8, update_interval=3, start_at=3, stop_at=1.0, update_placement="skip_step",
                          kernels="sparse", live_step=live_step), GradientSpy()
        trainer = train([sparse, spy], steps=8)
        assert sparse.num_updates == 2
        params[live_step] = dict(trainer.lightning_module.named_parameters())
    for name, param in params[False].items():
        torch.testing.assert_close(params[True][name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_auto_times_each_plan_with_its_optimizer_step_on_a_copy(monkeypatch) -> None:
    """With the live step on, "auto" times the dense plan with the optimizer's dense step and a plan with a sparse
    weight gradient with the live step: on a copy of the weight, so that the model and its optimizer are as
    before the timing."""
    from lightning_rigl.kernels import TrainingKernels
    from lightning_rigl.kernels import training

    torch.manual_seed(0)
    linear, mask = nn.Linear(32, 16), torch.rand(16, 32) < 0.2
    with torch.no_grad():
        linear.weight.mul_(mask)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9)
    kernels = TrainingKernels("auto", repeats=1)
    kernels.install({"weight": linear}, {"weight": mask})
    kernels.live_step(optimizer)
    kernels.begin_step(dense_weight_grad=False, keep_live_grad=True)  # the first step records its tensors
    linear(torch.randn(8, 32)).backward(torch.randn(8, 16))
    before = linear.weight.detach().clone()
    steps = {"live": 0, "dense": 0}
    live_step, dense_step = training.step_live, torch.optim.SGD.step

    def count_live(*args, **kwargs):
        steps["live"] += 1
        return live_step(*args, **kwargs)

    def count_dense(self, *args, **kwargs):
        steps["dense"] += 1
        return dense_step(self, *args, **kwargs)

    monkeypatch.setattr(training, "step_live", count_live)
    monkeypatch.setattr(torch.optim.SGD, "step", count_dense)
    kernels.decide()
    assert steps["live"] > 0 and steps["dense"] > steps["live"]  # step_live runs an SGD step of its own too
    assert torch.equal(linear.weight, before) and not optimizer.state
