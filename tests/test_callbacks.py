"""The invariants every method keeps, on a real Trainer (CPU): exact counts, dead weights at 0, clean new
connections, resume, accumulation, mixed precision, errors. Parametrized over every method in methods.py."""

from __future__ import annotations

import csv
import functools
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import SPARSE_NAMES, TinyNet, make_data, train
from methods import CHANGING, METHODS, sparse_kernels_for
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from lightning_rigl import (
    SET,
    SNFS,
    SNIP,
    DynamicSparseTraining,
    GradualMagnitudePruning,
    RigL,
    SparseTraining,
    SRigL,
    Static,
)
from lightning_rigl.callbacks.sparse_training import _check_supported
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity import GLOBAL, MaskChange, densities_for_shapes, live_count
from lightning_rigl.sparsity.masks import param_state_tensors
from lightning_rigl.sparsity.schedules import cubic_sparsity, is_pruning_step
from lightning_rigl.sparsity.structure import NM

DYNAMIC_CLASSES = {"rigl": RigL, "set": SET}


class Recorder(pl.Callback):
    """Listed after the sparse callback: checks the invariants and keeps each step's masks."""

    def __init__(self, sparse: pl.Callback) -> None:
        self.sparse = sparse
        self.masks: list[dict[str, torch.Tensor]] = []
        self.previous: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        assert_budget(self.sparse, trainer.global_step - 1)
        self.previous = {n: m.clone() for n, m in self.sparse.masks.items()}
        self.initial = self.previous

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Runs right after the sparse callback's update: new connections must start clean.
        for name, mask in self.sparse.masks.items():
            param = pl_module.get_parameter(name)
            new = mask & ~self.previous[name]
            assert (param.detach()[new] == 0).all(), f"{name}: a new connection has a non-zero weight"
            for state in param_state_tensors(optimizer, param):
                assert (state[new] == 0).all(), f"{name}: a new connection has stale optimizer state"
            if param.grad is not None:  # None where update_placement="skip_step" skips this step
                assert (param.grad[~mask] == 0).all(), f"{name}: a dead weight has a gradient"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, mask in self.sparse.masks.items():
            param = pl_module.get_parameter(name).detach()
            assert (param[~mask] == 0).all(), f"{name}: a dead weight moved at step {trainer.global_step}"
            # The callback's own record (logged, checkpointed) must describe its masks...
            assert int(mask.sum()) == live_count(param.numel(), self.sparse.densities[name]), name
            assert self.sparse.live_counts[name] == int(mask.sum()), f"{name}: the reported live count is stale"
            assert self.sparse.empty_rows[name] == int((~mask.reshape(mask.shape[0], -1).any(1)).sum()), name
        # ...and the masks must hold what the configuration asks for, whatever that record says.
        assert_budget(self.sparse, trainer.global_step - 1)
        self.previous = {n: m.clone() for n, m in self.sparse.masks.items()}
        self.masks.append(self.previous)


def assert_budget(sparse: SparseTraining, step: int) -> None:
    """The live counts after optimizer ``step`` against the configuration, never against the callback's running
    count: each layer's target count (``targets``; the dense start and the cubic ramp for pruning), the global
    total where a method moves density between layers or ranks them together, and that total against the
    configured sparsity."""
    numel = {name: mask.numel() for name, mask in sparse.masks.items()}
    live = {name: int(mask.sum()) for name, mask in sparse.masks.items()}
    target = {name: live_count(numel[name], sparse.targets[name]) for name in numel}
    ramp = 1.0  # the fraction of each layer's target zeros due now
    if isinstance(sparse, GradualMagnitudePruning):
        done = [t for t in range(step + 1) if is_pruning_step(t, sparse.update_interval, sparse.start_step,
                                                               sparse.stop_step)]
        ramp = cubic_sparsity(done[-1], 1.0, sparse.start_step, sparse.stop_step) if done else 0.0
    elif isinstance(sparse, SNIP) and sparse.num_updates == 0:  # postponed: still dense
        ramp = 0.0
    if sparse.structure is not None:
        _assert_structure(sparse, numel, live, step)
        return
    total = sum(numel.values())
    if sparse.distribution == GLOBAL:  # the whole selection keeps N - floor(ramp·S·N), each layer at least one
        assert sum(live.values()) == total - math.floor(ramp * sparse.sparsity * total), f"step {step}"
        assert all(n >= 1 for n in live.values()), f"step {step}: a layer without live weights"
        return
    if isinstance(sparse, DynamicSparseTraining) and sparse.redistribution != "none":
        assert sum(live.values()) == sum(target.values()), f"step {step}: the global count moved"
        assert all(1 <= live[n] <= numel[n] for n in live), f"step {step}: a layer outside [1, numel]"
        assert all(live[n] == numel[n] for n in live if sparse.targets[n] == 1.0), "a dense layer lost weights"
    else:
        zeros = {name: numel[name] - target[name] for name in numel}
        expected = {name: numel[name] - math.floor(ramp * zeros[name] + 1e-9) for name in numel}
        assert live == expected, f"step {step}: live counts {live}, targets {expected}"
    if ramp == 1.0 and sparse.distribution in ("er", "erk") and not sparse.custom_sparsity:
        # The official budget: the layers share sum(N - floor(S·N)) live weights; each floors its own zeros.
        budget = sum(n - math.floor(sparse.sparsity * n) for n in numel.values())
        assert budget <= sum(live.values()) <= budget + len(numel), f"step {step}: total against the sparsity"


def _assert_structure(sparse: SparseTraining, numel: dict[str, int], live: dict[str, int], step: int) -> None:
    """Structured masks, read here from the masks: N:M groups hold at most N; under a constant fan-in every
    neuron holds k = floor(L / active neurons) or nothing, for the distribution's budget L, and only SRigL
    ablates (never in its last layer, never so many that k passes the dense fan-in)."""
    shapes = {name: tuple(mask.shape) for name, mask in sparse.masks.items()}
    budget = {name: live_count(numel[name], d) for name, d in
              densities_for_shapes(shapes, sparse.sparsity, sparse.distribution).items()}
    for name, mask in sparse.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        if budget[name] == numel[name]:
            assert rows.all(), f"step {step}: {name} is kept dense"
            continue
        if isinstance(sparse.structure, NM):
            n, m = sparse.structure.n, sparse.structure.m
            padded = torch.nn.functional.pad(rows, (0, -rows.shape[1] % m))
            assert padded.reshape(rows.shape[0], -1, m).sum(2).max() <= n, f"step {step}: {name} breaks {n}:{m}"
            assert live[name] == budget[name], f"step {step}: {name}"
            continue
        fan_ins = rows.sum(1)
        active = int((fan_ins > 0).sum())
        if not isinstance(sparse, SRigL) or name == list(sparse.masks)[-1]:
            assert active == rows.shape[0], f"step {step}: {name} lost a neuron"
        assert active > budget[name] // rows.shape[1], f"step {step}: {name} ablated too many neurons"
        assert set(fan_ins.tolist()) <= {0, budget[name] // active}, f"step {step}: {name} fan-ins {fan_ins}"


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int((a[n] != b[n]).sum()) for n in a)


@pytest.mark.parametrize(("optimizer", "kernels"), [("sgd", "dense"), ("adam", "dense"), ("adamw", "dense"),
                                                    ("sgd", "sparse"), ("adamw", "sparse")])
@pytest.mark.parametrize("method", list(METHODS))
def test_dead_weights_stay_zero_and_counts_stay_exact(method, optimizer, kernels, auto_picks_sparse):
    sparse = METHODS[method](kernels=kernels if kernels == "dense" else sparse_kernels_for(method))
    recorder = Recorder(sparse)
    torch.manual_seed(0)  # the same weights whatever ran before
    train([sparse, recorder], model=TinyNet(optimizer=optimizer), steps=13)
    history = [recorder.initial, *recorder.masks]
    changes = [_changed(a, b) for a, b in zip(history, history[1:])]
    assert any(changes) == (method in CHANGING)
    if method == "srigl":  # the run must exercise ablation, and a neuron's return
        ablated = [{(n, int(r)) for n, m in masks.items() for r in (m.reshape(m.shape[0], -1).sum(1) == 0).nonzero()}
                   for masks in history]
        assert any(ablated), "no neuron was ablated"
        assert any(a - b for a, b in zip(ablated, ablated[1:])), "no ablated neuron came back"


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_masks_change_exactly_at_update_steps(method):
    sparse = DYNAMIC_CLASSES[method](sparsity=0.8, update_interval=3, drop_fraction=0.5, stop_at=1.0)
    recorder = Recorder(sparse)
    train([sparse, recorder], steps=13)
    assert sparse.num_updates == 4  # steps 3, 6, 9, 12
    changes = [_changed(a, b) for a, b in zip(recorder.masks, recorder.masks[1:])]
    update_steps = [i + 1 for i, c in enumerate(changes) if c]
    assert update_steps == [3, 6, 9, 12], "masks must change exactly at update steps"


def test_masks_freeze_after_stop_at():
    sparse = RigL(sparsity=0.8, update_interval=2, drop_fraction=0.5, drop_schedule="constant", stop_at=0.5)
    recorder = Recorder(sparse)
    train([sparse, recorder], steps=12)
    assert sparse.stop_step == 6 and sparse.num_updates == 2  # steps 2 and 4
    assert all(_changed(a, b) == 0 for a, b in zip(recorder.masks[5:], recorder.masks[6:]))


def test_static_never_changes_and_keeps_dead_weights_zero():
    sparse = Static(sparsity=0.9, distribution="uniform")
    recorder = Recorder(sparse)
    train([sparse, recorder], model=TinyNet(optimizer="adamw"), steps=6)
    assert all(_changed(recorder.masks[0], m) == 0 for m in recorder.masks)
    assert sparse.masks["features.0.weight"].all()  # uniform keeps the first layer dense


def test_rigl_grows_where_the_accumulated_gradient_is_largest():
    class GrowthSpy(pl.Callback):
        """Before RigL: remembers the gradient RigL is about to read."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 4:
                self.grads = {n: pl_module.get_parameter(n).grad.clone() for n in SPARSE_NAMES}
                self.masks = {n: m.clone() for n, m in rigl.masks.items()}

    spy = GrowthSpy()
    rigl = RigL(sparsity=0.8, update_interval=4, drop_fraction=0.3, stop_at=100)
    train([spy, rigl], steps=5)
    name = "classifier.1.weight"
    old, new, grad = spy.masks[name], rigl.masks[name], spy.grads[name].abs()
    grown = new & ~old
    assert grown.any()
    # Every newly grown position beats every position that stayed dead.
    assert grad[grown].min() >= grad[~new].max()


# Methods whose mask decisions read this step's gradient (directly, or through momentum or a moving average).
READS_GRADIENT = ["rigl", "snfs", "rigl_sg", "rigl_sm", "rigl_skip_step", "snip", "snip_global"]


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
@pytest.mark.parametrize("method", list(METHODS))
def test_accumulated_micro_batches_update_like_one_large_batch(method, kernels):
    class RunningStatsBatchNorm(torch.nn.BatchNorm2d):
        def train(self, mode=True):  # batch statistics differ between micro-batches: normalise by running ones
            return super().train(False)

    class FixedNormNet(TinyNet):  # the same parameters (a lottery ticket's checkpoint fits it)
        def __init__(self):
            super().__init__()
            self.features[1] = RunningStatsBatchNorm(8)
            self.to(torch.float64)

    def run(accumulate, batch_size):
        sparse = METHODS[method](kernels=kernels if kernels == "dense" else sparse_kernels_for(method))
        trainer = train([sparse], model_factory=FixedNormNet, steps=6, batch_size=batch_size,
                        data=make_data(32, dtype=torch.float64), accumulate_grad_batches=accumulate)
        return sparse, dict(trainer.lightning_module.named_parameters())

    (full, full_params), (accumulated, accumulated_params) = run(1, 32), run(4, 8)
    assert full.num_updates == accumulated.num_updates >= (method in CHANGING)
    for name in SPARSE_NAMES:
        assert torch.equal(full.masks[name], accumulated.masks[name]), name
    for name, param in full_params.items():
        torch.testing.assert_close(accumulated_params[name], param, rtol=1e-9, atol=1e-12, msg=name)
    single_micro_batch, single_params = run(1, 8)  # the test tells one micro-batch from all four
    assert any(not torch.equal(full_params[n], single_params[n]) for n in full_params)
    if method in READS_GRADIENT:
        assert any(not torch.equal(full.masks[n], single_micro_batch.masks[n]) for n in SPARSE_NAMES)


class Crash(Exception):
    pass


class CrashAfter(pl.Callback):
    """Saves a checkpoint after optimizer step ``step``, then kills the run."""

    def __init__(self, step: int, path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Crash


STATE_KEYS = {"masks", "densities", "targets", "num_updates", "pending_step", "moving_average", "rewind",
              "train_flops", "kernel_plans"}


def _assert_resume_matches(tmp_path, make, crash_step, model_factory=TinyNet, steps=14):
    straight_cb = make()
    straight = train([straight_cb], model_factory=model_factory, steps=steps, max_epochs=-1).lightning_module

    ckpt = tmp_path / "crash.ckpt"
    with pytest.raises(Crash):
        train([make(), CrashAfter(crash_step, ckpt)], model_factory=model_factory, steps=steps, max_epochs=-1)

    resumed_cb = make()
    torch.manual_seed(1)  # fresh weights and a fresh callback: everything must come from the checkpoint
    resumed = model_factory()
    train([resumed_cb], model=resumed, steps=steps, max_epochs=-1, ckpt_path=str(ckpt))

    assert resumed_cb.num_updates == straight_cb.num_updates
    assert resumed_cb.densities == straight_cb.densities
    # A rewind copy taken before the crash travels in the checkpoint, unchanged.
    assert (resumed_cb.rewind is None) == (straight_cb.rewind is None)
    if straight_cb.rewind is not None:
        assert set(resumed_cb.rewind) == set(straight_cb.rewind)
        for name, copy in straight_cb.rewind.items():
            assert torch.equal(resumed_cb.rewind[name], copy), f"rewind copy of {name}"
    assert resumed_cb.flops.spent == straight_cb.flops.spent  # the FLOP account travels in the checkpoint
    assert list(resumed_cb.masks) == list(straight_cb.masks)
    for name, mask in straight_cb.masks.items():
        assert torch.equal(resumed_cb.masks[name], mask), name
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    state = torch.load(ckpt, weights_only=True)["callbacks"]["lightning_rigl"]
    # Masks, densities and counters, and only the tensors a method needs: no gradient buffer, no random state.
    assert set(state) <= STATE_KEYS
    assert all(mask.dtype == torch.bool for mask in state["masks"].values())
    return state


@pytest.fixture
def auto_picks_sparse(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" times as always but keeps the sparse kernel: its choice no longer depends on the machine's noise, so
    runs that time at different moments (a straight run and a resumed one, after a pruning step) choose alike."""
    monkeypatch.setattr("lightning_rigl.kernels.training.choose",
                        lambda times: next((k for k in ("native", "csr") if k in times), "dense"))


# Right after an update and between updates; sparse kernels (their plans under "auto") between updates.
@pytest.mark.parametrize(("crash_step", "kernels"), [(6, "dense"), (7, "dense"), (7, "sparse")])
@pytest.mark.parametrize("method", list(METHODS))
def test_resume_matches_uninterrupted_run(tmp_path, method, crash_step, kernels, auto_picks_sparse):
    rewind = {} if method == "lottery" else {"rewind_step": 2}  # a ticket consumes a copy, it keeps none
    kernels = kernels if kernels == "dense" else sparse_kernels_for(method)
    state = _assert_resume_matches(tmp_path, functools.partial(METHODS[method], kernels=kernels, **rewind), crash_step)
    assert ("moving_average" in state) == (method == "snfs")
    assert ("rewind" in state) == bool(rewind)
    # Under "auto" the plans travel with the masks: the resumed run keeps the kernels the first one timed.
    assert ("kernel_plans" in state) == (kernels == "auto")


def test_resume_keeps_the_moving_average_where_the_optimizer_has_no_momentum(tmp_path):
    def make():
        return RigL(sparsity=0.8, redistribution="momentum", update_interval=3, drop_fraction=0.5, stop_at=1.0)

    state = _assert_resume_matches(tmp_path, make, 7, model_factory=lambda: TinyNet(optimizer="sgd_plain"))
    assert set(state["moving_average"]) == set(SPARSE_NAMES)


@pytest.mark.parametrize("grow_init", ["normal", "uniform"])
def test_resume_with_random_grow_init(tmp_path, grow_init):
    _assert_resume_matches(tmp_path, lambda: SET(sparsity=0.8, grow_init=grow_init, update_interval=3, stop_at=1.0), 7)


class NaNInjector(pl.Callback):
    """Before the sparse callback: puts a NaN at one dead position of a gradient on chosen steps (at a live one
    while the network is dense)."""

    def __init__(self, sparse: pl.Callback, steps: set[int]) -> None:
        self.sparse, self.steps = sparse, steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            name = "classifier.1.weight"
            dead = (~self.sparse.masks[name]).nonzero()
            position = tuple(dead[0]) if len(dead) else (0, 0)
            pl_module.get_parameter(name).grad[position] = float("nan")


class NaNCleaner(pl.Callback):
    """After the sparse callback: zeroes non-finite gradients, as a GradScaler skipping the step would leave
    the weights untouched (a NaN at a live position would otherwise reach the weights)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for param in pl_module.parameters():
            if param.grad is not None:
                torch.nan_to_num_(param.grad, nan=0.0)


@pytest.mark.parametrize(
    ("make", "nan_steps", "first_change"),
    [
        (lambda: RigL(sparsity=0.8, update_interval=4, drop_fraction=0.5, stop_at=100), {4, 5}, 6),
        (lambda: RigL(sparsity=0.8, redistribution="gradient", update_interval=4, stop_at=100), {4, 5}, 6),
        (lambda: SNFS(sparsity=0.8, update_interval=4, drop_fraction=0.5, stop_at=100), {3, 4, 5}, 6),
        (lambda: SNIP(sparsity=0.8), {0, 1}, 2),
    ],
    ids=["rigl", "rigl_sg", "snfs", "snip"],
)
def test_non_finite_gradient_postpones_the_update(make, nan_steps, first_change):
    sparse = make()
    recorder = Recorder(sparse)
    with pytest.warns(UserWarning, match="postponed"):
        train([NaNInjector(sparse, nan_steps), sparse, NaNCleaner(), recorder], steps=8)
    history = [recorder.initial, *recorder.masks]
    changes = [_changed(a, b) for a, b in zip(history, history[1:])]
    assert [i for i, c in enumerate(changes) if c] == [first_change], "the update waits for the first finite step"
    assert sparse.num_updates == 1
    if isinstance(sparse, SNFS):  # the moving average skipped the non-finite steps
        assert all(bool(m.isfinite().all()) for m in sparse.moving_average.values())


def test_nan_at_dead_position_never_reaches_weights():
    rigl = Static(sparsity=0.8)
    model = TinyNet()
    train([NaNInjector(rigl, {1, 2, 3}), rigl], model=model, steps=5)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class GradientSpy(pl.Callback):
    """Listed before the sparse callback: records, per step, whether gradients are finite and one gradient."""

    def __init__(self) -> None:
        self.finite: list[bool] = []
        self.grads: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.finite.append(all(bool(torch.isfinite(g).all()) for g in grads))
        self.grads.append(pl_module.get_parameter("classifier.1.weight").grad.clone())


def test_fp16_grad_scaler_overflow_defers_update_to_first_finite_unscaled_gradient():
    # A huge initial loss scale overflows fp16 until the scaler has backed off; those steps are skipped.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-10, growth_interval=1000)
    spy, rigl = GradientSpy(), RigL(sparsity=0.8, update_interval=2, drop_fraction=0.5, stop_at=100)
    recorder = Recorder(rigl)
    with pytest.warns(UserWarning, match="postponed"):
        train([spy, rigl, recorder], steps=6, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    first_finite = spy.finite.index(True)
    assert first_finite >= 2, "the test needs at least one overflowing update step"
    changes = [_changed(a, b) for a, b in zip([recorder.masks[0]] + recorder.masks, recorder.masks)]
    assert [i for i, c in enumerate(changes) if c][0] == first_finite
    # Skipped steps left the weights at their start, so the first finite gradient is the fp32 one of step 0,
    # unscaled: it must match the fp32 run up to fp16 rounding, not be 2**k times larger.
    fp32_spy = GradientSpy()
    train([fp32_spy, Static(sparsity=0.8)], steps=1)
    reference = fp32_spy.grads[0]
    got = spy.grads[first_finite]
    assert (got - reference).abs().max() <= 1e-2 * reference.abs().max()


@pytest.mark.parametrize("method", list(METHODS))
def test_fp16_grad_scaler_overflows_are_never_read_and_invariants_hold(method):
    # An overflowing start as above, backing off more slowly so that it spans the first update step of every
    # method: no decision that reads gradients is taken on a step whose gradients are not finite, and counts, dead
    # weights and new connections stay exact throughout.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-5, growth_interval=1000)
    sparse = METHODS[method]()
    spy, recorder = GradientSpy(), Recorder(sparse)
    train([spy, sparse, recorder], steps=13, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert spy.finite[:4] == [False] * 4 and spy.finite[-1] is True
    history = [recorder.initial, *recorder.masks]
    changed = [step for step, (a, b) in enumerate(zip(history, history[1:])) if _changed(a, b)]
    if method in READS_GRADIENT:
        assert all(spy.finite[step] for step in changed), (changed, spy.finite)
    assert sparse.num_updates >= (method in CHANGING)


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_mixed_precision_runs_with_exact_invariants(method):
    sparse = METHODS[method]()
    train([sparse, Recorder(sparse)], steps=13, precision="bf16-mixed")
    assert sparse.num_updates >= (method in CHANGING)


def test_logs_densities_drop_fraction_and_changes(tmp_path):
    rigl = RigL(sparsity=0.8, update_interval=2, drop_fraction=0.3, stop_at=1.0)
    train([rigl], steps=5, logger=CSVLogger(tmp_path, name="run"))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    columns = set(rows[0])
    assert {"sparsity/density", "sparsity/drop_fraction", "sparsity/changed"} <= columns
    assert {f"sparsity/density/{n}" for n in SPARSE_NAMES} <= columns
    fractions = [float(r["sparsity/drop_fraction"]) for r in rows if r["sparsity/drop_fraction"]]
    assert fractions[0] == pytest.approx(0.15 * (1 + torch.cos(torch.tensor(torch.pi * 2 / 5)).item()))
    changed = [float(r["sparsity/changed"]) for r in rows if r["sparsity/changed"]]
    assert changed and all(c > 0 for c in changed)


def test_linear_schedule_starts_at_alpha_on_the_first_update(tmp_path):
    # The official linear anneal from a begin step t_0 = 3 to T_end = 9: α · (1 - (t - t_0) / (T_end - t_0)) at the
    # updates 3, 5 and 7 (counting from step 0 instead gives 0.25, 0.083 and 0).
    rigl = RigL(sparsity=0.8, update_interval=2, drop_fraction=0.5, drop_schedule="linear", start_at=3, stop_at=9)
    train([rigl], steps=9, logger=CSVLogger(tmp_path, name="run"))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {int(r["step"]): float(r["sparsity/drop_fraction"]) for r in rows if r["sparsity/drop_fraction"]}
    assert logged == pytest.approx({3: 0.5, 5: 0.5 * 4 / 6, 7: 0.5 * 2 / 6})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "in \\[0, 1\\)"),
        ({"sparsity": 0.9, "distribution": "gaussian"}, "Unknown distribution"),
        ({"sparsity": 0.9, "update_interval": 0}, "update_interval"),
        ({"sparsity": 0.9, "drop_fraction": 1.5}, "drop_fraction"),
        ({"sparsity": 0.9, "drop_schedule": "step"}, "drop_schedule"),
        ({"sparsity": 0.9, "stop_at": 1.5}, "stop_at"),
        ({"sparsity": 0.9, "stop_at": 0}, "stop_at"),
        ({"sparsity": 0.9, "grow_init": "ones"}, "grow_init"),
        ({"sparsity": 0.9, "start_at": -1}, "start_at"),
        ({"sparsity": 0.9, "start_at": 1.0}, "start_at"),
        ({"sparsity": 0.9, "redistribution": "flops"}, "redistribution"),
        ({"sparsity": 0.9, "update_placement": "after_step"}, "update_placement"),
        ({"sparsity": 0.9, "distribution": "global"}, "only SNIP, GradualMagnitudePruning and a start"),
        ({"sparsity": 0.9, "rewind_step": -1}, "rewind_step"),
        ({"sparsity": 0.9, "erk_power_scale": -0.5}, "erk_power_scale"),
        ({"sparsity": 0.9, "distribution": "er", "erk_power_scale": 0.5}, "applies to distribution='erk' only"),
        ({"sparsity": 0.9, "custom_sparsity": {"fc.*": 1.0}}, "custom_sparsity"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RigL(**kwargs)


def test_two_sparse_callbacks_fail_before_training():
    # They share one checkpoint entry (state_key), which Lightning refuses when the Trainer is built.
    with pytest.raises(RuntimeError, match="state_key"):
        train([RigL(sparsity=0.9), Static(sparsity=0.5)], steps=1)


def test_pattern_matching_nothing_fails_before_training():
    with pytest.raises(ValueError, match="matches no parameter"):
        train([RigL(sparsity=0.9, exclude=["encoder.*"])], steps=1)


def test_model_with_nothing_to_sparsify_fails():
    class NormOnly(TinyNet):
        def __init__(self):
            super().__init__()
            self.features, self.classifier = torch.nn.Flatten(), torch.nn.Sequential(torch.nn.BatchNorm1d(64))

    with pytest.raises(ValueError, match="nothing to sparsify"):
        train([Static(sparsity=0.9)], model=NormOnly(), steps=1)


def test_manual_optimization_fails():
    class Manual(TinyNet):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="automatic optimization"):
        train([RigL(sparsity=0.9)], model=Manual(), steps=1)


def test_lightning_refuses_two_optimizers_so_the_callbacks_see_one():
    # A Lightning fact the callbacks rely on when they read trainer.optimizers[0]: several optimizers need manual
    # optimization, which the callbacks refuse (test_manual_optimization_fails).
    class TwoOptimizers(TinyNet):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.features.parameters(), lr=0.1),
                    torch.optim.SGD(self.classifier.parameters(), lr=0.1)]

    with pytest.raises(RuntimeError, match="multiple optimizers is only supported with manual optimization"):
        train([RigL(sparsity=0.9)], model=TwoOptimizers(), steps=1)


def test_a_run_without_an_optimizer_fails():
    class NoOptimizer(TinyNet):
        def configure_optimizers(self):
            return None  # Lightning trains on with a stand-in optimizer that holds no parameter

    with pytest.raises(RuntimeError, match="not trained by the optimizer"):
        train([RigL(sparsity=0.9)], model=NoOptimizer(), steps=1)


def test_parameter_outside_the_optimizer_fails():
    class Partial(TinyNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.classifier.parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match="not trained by the optimizer"):
        train([RigL(sparsity=0.9)], model=Partial(), steps=1)


def test_fraction_stop_at_needs_a_run_length():
    with pytest.raises(ValueError, match="no known length"):
        train([RigL(sparsity=0.9)], steps=-1, max_epochs=-1, max_time="00:00:00:01")


# DeepSpeed is not installed here; the check reads class names along the MRO, so a class of that name stands in.
@pytest.mark.parametrize("strategy", [FSDPStrategy(), type("DeepSpeedStrategy", (DDPStrategy,), {})()],
                         ids=["fsdp1", "deepspeed"])
def test_fsdp1_and_deepspeed_are_refused_with_what_to_use_instead(strategy):
    name = type(strategy).__name__
    with pytest.raises(ConfigError, match=f"^{name} is not supported: .* Use ModelParallelStrategy"
                                           r"\(data_parallel_size=N, tensor_parallel_size=1\) with fully_shard"):
        _check_supported(SimpleNamespace(strategy=strategy), TinyNet())


def test_resume_with_other_sparsity_fails(tmp_path):
    trainer = train([RigL(sparsity=0.8, stop_at=1.0)], steps=2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(RuntimeError, match="do not fit this configuration"):
        train([RigL(sparsity=0.5, stop_at=1.0)], steps=4, ckpt_path=str(tmp_path / "a.ckpt"))


class Snapshot(pl.Callback):
    """The sparse layers' weights and masks in ``on_before_optimizer_step`` of ``step``: before the sparse
    callback's update when listed in front of it, after the update (and before the optimizer step) when behind."""

    def __init__(self, sparse: pl.Callback, step: int) -> None:
        self.sparse, self.step = sparse, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.weights = {n: pl_module.get_parameter(n).detach().clone() for n in self.sparse.masks}
            self.masks = {n: m.clone() for n, m in self.sparse.masks.items()}


@pytest.mark.parametrize("grow_init", ["normal", "uniform"])
@pytest.mark.parametrize("method", [RigL, SET])
def test_grow_init_gives_new_connections_values_of_the_stated_distribution(method, grow_init):
    sparse = method(sparsity=0.5, grow_init=grow_init, update_interval=3, drop_fraction=0.5, drop_schedule="constant",
                    stop_at=1.0)
    before, after = Snapshot(sparse, 3), Snapshot(sparse, 3)
    train([before, sparse, after], steps=4)
    grown_counts = {}
    for name, mask in after.masks.items():
        old, weights, new_weights = before.masks[name], before.weights[name], after.weights[name]
        grown, kept = mask & ~old, mask & old
        assert torch.equal(new_weights[kept], weights[kept]), f"{name}: a kept connection changed"
        assert (new_weights[~mask] == 0).all(), f"{name}: a dropped or dead connection is not 0"
        values = new_weights[grown]
        grown_counts[name] = values.numel()
        if values.numel() < 1000:  # too few draws to test a distribution
            continue
        if grow_init == "normal":  # official: N(0, std of the layer's weights, zeros included)
            scale = weights.std().item()
            assert abs(values.mean().item()) < 4 * scale / math.sqrt(values.numel()), name
            assert values.std().item() == pytest.approx(scale, rel=0.08), name
        else:  # official: U(-b, b) with b the mean |w| of the layer, zeros included
            bound = weights.abs().mean().item()
            assert values.abs().max().item() <= bound and values.abs().max().item() > 0.95 * bound, name
            assert values.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.08), name
    assert max(grown_counts.values()) >= 1000, grown_counts


@pytest.mark.parametrize("grow_init", ["normal", "uniform"])
def test_grow_init_draws_follow_the_layer_statistics(grow_init):
    weights = torch.randn(200, 100, generator=torch.Generator().manual_seed(0)) * 0.3
    added = torch.arange(0, 20_000, 2)
    change = MaskChange(removed=torch.empty(0, dtype=torch.long), added=added)
    values = RigL(sparsity=0.5, grow_init=grow_init)._grow_values(weights, change, step=100, layer_index=0)
    assert values.shape == (added.numel(),)
    if grow_init == "normal":  # official: std of the layer's weights
        assert values.std().item() == pytest.approx(weights.std().item(), rel=0.05)
    else:  # official: uniform within ± mean |w|
        bound = weights.abs().mean().item()
        assert values.abs().max().item() <= bound and values.abs().max().item() > 0.95 * bound
    again = RigL(sparsity=0.5, grow_init=grow_init)._grow_values(weights, change, step=100, layer_index=0)
    assert torch.equal(values, again)  # seeded: the same on every rank and after a resume
