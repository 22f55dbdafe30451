"""What defines each method, on small exact cases and real Trainer runs."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import SPARSE_NAMES, TinyNet, train
from methods import ticket_checkpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins import MixedPrecision

from lightning_rigl import SNFS, SNIP, GradualMagnitudePruning, LotteryTicket, RigL, Static
from lightning_rigl.sparsity import live_count, prune
from lightning_rigl.sparsity.redistribution import apportion, grow_counts
from lightning_rigl.sparsity.updates import prune_globally

# ------------------------------------------------------------------------------------ redistribution maths


def test_apportion_is_proportional_within_bounds():
    assert apportion(10, [1.0, 1.0], [0, 0], [10, 10]) == [5, 5]
    assert apportion(10, [3.0, 1.0], [0, 0], [10, 10]) == [8, 2]  # 7.5 and 2.5: the tie goes to the first
    # The first layer can take 4 only; its excess goes to the others in proportion to their shares.
    assert apportion(20, [10.0, 1.0, 1.0], [0, 0, 0], [4, 100, 100]) == [4, 8, 8]
    assert apportion(7, [0.0, 0.0], [1, 0], [5, 5]) == [4, 3]  # no information: in proportion to the room
    assert apportion(6, [1.0, float("nan")], [0, 2], [9, 9]) == [4, 2]  # a NaN share counts as 0


def test_apportion_refuses_impossible_bounds():
    with pytest.raises(ValueError, match="Cannot apportion"):
        apportion(30, [1.0, 1.0], [0, 0], [10, 10])


def test_grow_counts_move_live_weights_toward_the_larger_share_and_keep_the_total():
    live, dropped, numel = [100, 100], [30, 30], [1000, 1000]
    grown = grow_counts(live, dropped, numel, shares=[3.0, 1.0])
    assert grown == [45, 15] and sum(grown) == sum(dropped)
    # Every layer keeps at least one live weight and at most all of its weights.
    assert grow_counts([10, 100], [10, 0], [10, 110], shares=[0.0, 1.0]) == [1, 9]
    assert grow_counts([10, 100], [5, 50], [10, 110], shares=[1.0, 0.0]) == [5, 50]  # first layer is full
    assert grow_counts([10, 10], [3, 3], [50, 50], shares=[0.0, 0.0]) == [3, 3]  # no signal: densities stay


# ------------------------------------------------------------------------------------------ pruning maths


def test_prune_keeps_exactly_the_largest_scores():
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0, 0] = False
    scores = torch.arange(16.0).view(4, 4)
    change = prune(mask, scores, n_keep=5)
    assert int(mask.sum()) == 5 and mask.view(-1)[11:].all()
    assert sorted(change.removed.tolist()) == list(range(1, 11))


def test_prune_globally_ranks_all_layers_together_and_keeps_one_per_layer():
    masks = {"a": torch.ones(10, dtype=torch.bool), "b": torch.ones(5, dtype=torch.bool)}
    scores = {"a": torch.arange(10.0) + 10, "b": torch.arange(5.0)}  # every score of "a" beats every one of "b"
    changes = prune_globally(masks, scores, n_keep=4)
    assert masks["a"].tolist() == [False] * 7 + [True] * 3  # the three best overall...
    assert masks["b"].tolist() == [False] * 4 + [True]  # ...and "b" keeps its best
    assert sorted(changes["b"].removed.tolist()) == [0, 1, 2, 3]


def global_ranking(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], n_keep: int) -> set[tuple[str, int]]:
    """The live (layer, flat position) that global pruning keeps, by its definition in plain Python: each layer's
    first best live score counts as infinite, then the ``n_keep`` largest over the layers in order, ties lowest
    position first."""
    ranked = []
    for order, name in enumerate(masks):
        live = masks[name].reshape(-1).nonzero().squeeze(1).tolist()
        values = [float(scores[name].reshape(-1)[i]) for i in live]
        best = values.index(max(values))
        ranked += [(-math.inf if j == best else -v, order, i, name) for j, (i, v) in enumerate(zip(live, values))]
    return {(name, i) for _, _, i, name in sorted(ranked)[:n_keep]}


@pytest.mark.parametrize("numel", [12, 40_000])  # a direct top-k, and the sampled path of top_k_indices
def test_prune_globally_takes_ties_lowest_position_first(numel: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        shapes = {"a": (numel // 4, 4), "b": (3, 2), "c": (numel // 3, 3)}
        masks = {n: torch.rand(s, generator=gen) < 0.8 for n, s in shapes.items()}
        scores = {n: torch.randint(0, 3, s, generator=gen).float() for n, s in shapes.items()}  # ties everywhere
        n_keep = int(torch.randint(3, sum(int(m.sum()) for m in masks.values()) + 1, (1,), generator=gen))
        expected = global_ranking(masks, scores, n_keep)
        prune_globally(masks, scores, n_keep)
        kept = {(n, i) for n, m in masks.items() for i in m.reshape(-1).nonzero().squeeze(1).tolist()}
        assert kept == expected, f"trial {trial}"


def test_global_pruning_refuses_nan_scores() -> None:
    masks = {"a": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(RuntimeError, match=r"The pruning scores of 'a' hold NaN"):
        prune_globally(masks, {"a": torch.tensor([1.0, math.nan, 0.5, 2.0])}, n_keep=2)
    assert masks["a"].all()  # nothing pruned


# --------------------------------------------------------------------------------------------------- SNFS


class MomentumSpy(pl.Callback):
    """Before SNFS: remembers the moving average and densities just before each update step."""

    def __init__(self, snfs: SNFS, step: int) -> None:
        self.snfs, self.step = snfs, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.densities = dict(self.snfs.densities)
            self.masks = {n: m.clone() for n, m in self.snfs.masks.items()}


def test_snfs_moves_density_toward_the_layer_with_larger_momentum_and_keeps_the_total():
    snfs = SNFS(sparsity=0.8, distribution="uniform", update_interval=4, drop_fraction=0.5, drop_schedule="constant",
                stop_at=100)
    spy = MomentumSpy(snfs, 4)
    train([spy, snfs], steps=5)
    live_before = {n: int(m.sum()) for n, m in spy.masks.items()}
    live_after = {n: int(m.sum()) for n, m in snfs.masks.items()}
    assert live_before == {SPARSE_NAMES[0]: 72, SPARSE_NAMES[1]: 231, SPARSE_NAMES[2]: 1639, SPARSE_NAMES[3]: 26}
    # Uniform keeps the first layer dense: it takes no part. The others drop floor(0.5 · live): 115 + 819 + 13.
    assert live_after[SPARSE_NAMES[0]] == 72
    kept = {n: live_before[n] - live_before[n] // 2 for n in SPARSE_NAMES[1:]}
    to_grow = sum(live_before[n] // 2 for n in SPARSE_NAMES[1:])
    assert sum(live_after.values()) == sum(live_before.values())
    # Shares: each layer's mean |moving average| over its live weights (the average includes step 4's gradient).
    share = {n: snfs.moving_average[n].abs()[spy.masks[n]].mean().item() for n in SPARSE_NAMES[1:]}
    last = SPARSE_NAMES[3]  # 128 weights and by far the largest share: its proportional part overflows it
    assert to_grow * share[last] / sum(share.values()) > 128 - kept[last]
    assert live_after[last] == 128
    # The rest goes to the two other layers in proportion to their shares, up to rounding.
    rest = to_grow - (128 - kept[last])
    for name in SPARSE_NAMES[1:3]:
        proportional = rest * share[name] / (share[SPARSE_NAMES[1]] + share[SPARSE_NAMES[2]])
        assert abs(live_after[name] - kept[name] - proportional) <= 1, name
    assert snfs.densities == {n: live_after[n] / snfs.masks[n].numel() for n in SPARSE_NAMES}


def test_snfs_grows_where_the_moving_average_is_largest():
    snfs = SNFS(sparsity=0.8, redistribution="none", update_interval=4, drop_fraction=0.3, stop_at=100)
    spy = MomentumSpy(snfs, 4)
    train([spy, snfs], steps=5)
    name = "classifier.1.weight"
    old, new, average = spy.masks[name], snfs.masks[name], snfs.moving_average[name].abs()
    grown = new & ~old
    assert grown.any() and average[grown].min() >= average[~new].max()


def test_redistribution_logs_the_moving_densities(tmp_path):
    rigl = RigL(sparsity=0.8, redistribution="gradient", update_interval=2, stop_at=1.0)
    train([rigl], steps=5, logger=CSVLogger(tmp_path, name="run"))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    column = "sparsity/density/features.3.weight"
    logged = [float(r[column]) for r in rows if r[column]]
    assert len(logged) == 3 and len(set(logged)) > 1  # at the start, and after each update
    assert float([r for r in rows if r[column]][-1]["sparsity/density"]) == pytest.approx(rigl.global_density())


# --------------------------------------------------------------------------------- when updates happen


def test_start_at_zero_updates_at_step_zero_and_skip_step_replaces_the_optimizer_step():
    class StepSpy(pl.Callback):
        """After RigL: the weights and Adam's step counts right after the update and after the step."""

        def __init__(self):
            self.before, self.after, self.steps = {}, {}, {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.before[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            self.after[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            optimizer = trainer.optimizers[0]
            self.steps[step] = [int(optimizer.state[p].get("step", 0)) for p in pl_module.parameters()]

    rigl = RigL(sparsity=0.8, update_interval=3, start_at=0, stop_at=1.0, update_placement="skip_step")
    spy = StepSpy()
    train([rigl, spy], model=TinyNet(optimizer="adam"), steps=7)
    assert rigl.num_updates == 3  # steps 0, 3, 6
    for step in range(7):
        unchanged = all(torch.equal(spy.before[step][n], spy.after[step][n]) for n in spy.before[step])
        assert unchanged == (step in (0, 3, 6)), f"step {step}"
    assert spy.steps[5] == spy.steps[6]  # Adam counted no step at the update of step 6
    assert spy.steps[4] != spy.steps[5]


# ----------------------------------------------------------------------------------------------- pruning


class DensitySpy(pl.Callback):
    """After the sparse callback: the global live count after every optimizer step."""

    def __init__(self, sparse: pl.Callback) -> None:
        self.sparse, self.live = sparse, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.live[trainer.global_step - 1] = sum(int(m.sum()) for m in self.sparse.masks.values())


@pytest.mark.parametrize("distribution", ["erk", "global"])
def test_gradual_pruning_follows_the_cubic_schedule(distribution):
    pruning = GradualMagnitudePruning(sparsity=0.9, distribution=distribution, update_interval=3, start_at=2,
                                      stop_at=14)
    spy = DensitySpy(pruning)
    train([pruning, spy], steps=16)
    total = sum(m.numel() for m in pruning.masks.values())
    final_zeros = total - sum(live_count(pruning.masks[n].numel(), d) for n, d in pruning.targets.items())
    for step in range(16):
        pruned_at = min(14, 2 + 3 * ((step - 2) // 3))  # the last pruning step so far: 2, 5, 8, 11, 14
        progress = min(1.0, max(0.0, (pruned_at - 2) / 12))
        scale = 1 - (1 - progress) ** 3
        if distribution == "global":  # one budget: floor(s_t · N) zeros over the selection
            expected = total - math.floor(0.9 * scale * total)
        else:  # each layer to its own target: floor(s_l · scale · N_l) zeros
            expected = sum(live_count(pruning.masks[n].numel(), 1 - (1 - d) * scale)
                           for n, d in pruning.targets.items())
        assert spy.live[step] == expected, f"step {step}"
    if distribution == "erk":
        assert total - spy.live[15] == final_zeros  # the targets, exactly
    assert pruning.num_updates == 4  # steps 5, 8, 11, 14: step 2 is still at sparsity 0
    assert [s for s in range(16) if spy.live[s] != spy.live.get(s - 1, total)] == [5, 8, 11, 14]


def test_gradual_pruning_keeps_the_largest_magnitudes():
    class WeightSpy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 6:
                self.weights = {n: pl_module.get_parameter(n).detach().abs().clone() for n in SPARSE_NAMES}

    spy = WeightSpy()
    pruning = GradualMagnitudePruning(sparsity=0.8, distribution="uniform", update_interval=6, start_at=0, stop_at=6)
    train([spy, pruning], steps=7)
    for name in SPARSE_NAMES[1:]:
        mask, weights = pruning.masks[name], spy.weights[name]
        assert weights[mask].min() >= weights[~mask].max(), name


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_snip_keeps_exactly_the_largest_connection_sensitivity(distribution):
    class SaliencySpy(pl.Callback):
        """Before SNIP: |g·w| of the first step."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                self.scores = {n: (p.grad * p.detach()).abs() for n, p in pl_module.named_parameters()
                               if n in SPARSE_NAMES}

    spy = SaliencySpy()
    snip = SNIP(sparsity=0.8, distribution=distribution)
    train([spy, snip], steps=3)
    if distribution == "global":
        kept = torch.cat([spy.scores[n][snip.masks[n]] for n in SPARSE_NAMES])
        lost = torch.cat([spy.scores[n][~snip.masks[n]] for n in SPARSE_NAMES])
        total = sum(m.numel() for m in snip.masks.values())
        assert kept.numel() == total - math.floor(0.8 * total)
        assert kept.min() >= lost.max()
    else:
        for name in SPARSE_NAMES:
            mask = snip.masks[name]
            assert int(mask.sum()) == live_count(mask.numel(), snip.targets[name])
            if not mask.all():
                assert spy.scores[name][mask].min() >= spy.scores[name][~mask].max(), name
    assert snip.num_updates == 1


# ------------------------------------------------------------------------------------------ lottery ticket


def test_ticket_takes_the_source_masks_and_rewound_weights():
    source = torch.load(ticket_checkpoint(), weights_only=True)["callbacks"]["lightning_rigl"]

    class StartSpy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    ticket, spy = LotteryTicket(checkpoint=ticket_checkpoint()), StartSpy()
    torch.manual_seed(5)
    train([ticket, spy], model=TinyNet(), steps=2)
    for name, mask in source["masks"].items():
        assert torch.equal(ticket.masks[name], mask), name
    for name, value in spy.params.items():
        expected = source["rewind"][name] * source["masks"][name] if name in source["masks"] else source["rewind"][name]
        assert torch.equal(value, expected), name


def test_ticket_needs_a_rewind_copy(tmp_path):
    trainer = train([Static(sparsity=0.8)], steps=1)
    trainer.save_checkpoint(tmp_path / "static.ckpt")
    with pytest.raises(ValueError, match="rewind_step"):
        LotteryTicket(checkpoint=str(tmp_path / "static.ckpt"))
    with pytest.raises(ValueError, match="no checkpoint"):
        LotteryTicket(checkpoint=str(tmp_path / "missing.ckpt"))


def test_ticket_refuses_another_model():
    class Wider(TinyNet):
        def __init__(self):
            super().__init__()
            self.classifier[1] = torch.nn.Linear(256, 48)
            self.classifier[3] = torch.nn.Linear(48, 4)

    with pytest.raises(ValueError, match="another model"):
        train([LotteryTicket(checkpoint=ticket_checkpoint())], model=Wider(), steps=1)


def test_rewind_copy_is_taken_at_the_chosen_step():
    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    spy = Spy()
    rigl = RigL(sparsity=0.8, update_interval=2, stop_at=1.0, rewind_step=3)
    train([spy, rigl], steps=6)
    assert set(rigl.rewind) == set(spy.params)
    assert all(torch.equal(rigl.rewind[n], spy.params[n]) for n in spy.params)


# ------------------------------------------------------------------------------------- edge cases (review)


def test_a_postponed_last_update_runs_after_stop_at_and_then_frees_the_moving_average():
    class InfAt(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 9:  # the last update before stop_at
                pl_module.get_parameter("classifier.3.weight").grad[0, 0] = float("inf")

    class Skip(pl.Callback):  # after SNFS: a skipped step, as the GradScaler would make it
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 9:
                for p in pl_module.parameters():
                    p.grad = None

    snfs = SNFS(sparsity=0.8, update_interval=3, stop_at=10)
    with pytest.warns(UserWarning, match="postponed"):
        train([InfAt(), snfs, Skip()], steps=13)
    assert snfs.num_updates == 3  # steps 3, 6, and the one of step 9 made at step 10
    assert snfs.moving_average is None


class ChangeLog(pl.Callback):
    """The optimizer steps whose decision changed the masks."""

    def __init__(self, sparse: pl.Callback) -> None:
        self.sparse, self.steps = sparse, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {n: m.clone() for n, m in self.sparse.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if any(not torch.equal(self.before[n], m) for n, m in self.sparse.masks.items()):
            self.steps.append(trainer.global_step - 1)


@pytest.mark.parametrize(
    ("make", "changes"),
    # Updates are due at steps 2 and 4 (SNIP: its step 0); the step without gradients (0 and 2) moves its
    # decision to the next step, and the decision due after that still comes on time.
    [(lambda: RigL(sparsity=0.8, update_interval=2, drop_schedule="constant", stop_at=1.0), [3, 4]),
     (lambda: SNFS(sparsity=0.8, update_interval=2, drop_schedule="constant", stop_at=1.0), [3, 4]),
     (lambda: SNIP(sparsity=0.8), [1])],
    ids=["rigl", "snfs", "snip"],
)
def test_a_step_without_gradients_postpones_the_decision(make, changes):
    class SkipsBatches(TinyNet):
        def training_step(self, batch, batch_idx):  # Lightning skips the step when this returns None
            return None if self.trainer.global_step in (0, 2) else super().training_step(batch, batch_idx)

    sparse = make()
    log = ChangeLog(sparse)
    with pytest.warns(UserWarning, match="missing or not finite"):
        train([sparse, log], model=SkipsBatches(), steps=6)
    assert log.steps == changes
    assert sparse.num_updates == len(changes)


@pytest.mark.parametrize("redistribution", ["gradient", "momentum"])
def test_redistribution_keeps_layers_the_configuration_keeps_dense(redistribution):
    rigl = RigL(sparsity=0.5, distribution="uniform", dense=["classifier.1.weight"], redistribution=redistribution,
                update_interval=2, drop_fraction=0.5, stop_at=1.0)
    train([rigl], steps=9)
    assert rigl.num_updates == 4
    for name in ("features.0.weight", "classifier.1.weight"):  # uniform's first layer, and the dense pattern
        assert rigl.masks[name].all() and rigl.densities[name] == 1.0, name
    assert rigl.densities["features.3.weight"] != 0.5 or rigl.densities["classifier.3.weight"] != 0.5


def test_fused_optimizer_under_fp16_is_refused():
    class Fused(TinyNet):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, fused=True)

    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="fused=False"):
        train([RigL(sparsity=0.8)], model=Fused(), steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    train([Static(sparsity=0.8)], model=Fused(), steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])


def test_start_at_after_stop_at_fails_before_training():
    with pytest.raises(ValueError, match="is not before stop_at"):
        train([RigL(sparsity=0.8, start_at=18, stop_at=10)], steps=12)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GradualMagnitudePruning(sparsity=0.8, start_at=2, stop_at=40), "target sparsity will not be reached"),
        (lambda: RigL(sparsity=0.8, rewind_step=12), "rewind_step 12 is not within the run"),
    ],
)
def test_schedules_past_the_end_of_the_run_warn(make, message):
    with pytest.warns(UserWarning, match=message):
        train([make()], steps=12)


def test_fractions_of_a_run_too_short_for_an_update_only_warn():
    rigl = RigL(sparsity=0.8, stop_at=0.75)
    with pytest.warns(UserWarning, match="no mask will be updated"):
        train([rigl], steps=2)
    assert rigl.num_updates == 0


def test_global_pruning_ranks_in_the_scores_own_precision():
    masks = {"a": torch.ones(2, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}
    scores = {"a": torch.tensor([1.0, 5.0], dtype=torch.float64),
              "b": torch.tensor([1.0 + 1e-12, 5.0], dtype=torch.float64)}
    # Each layer keeps its best; the third place goes to 1 + 1e-12, which beats 1.0 only in fp64 (in fp32 the
    # two tie and the lower position, in "a", would win).
    prune_globally(masks, scores, n_keep=3)
    assert masks["a"].tolist() == [False, True] and masks["b"].tolist() == [True, True]
