"""What each run spends: training FLOPs per step as each method's rule says, counted from what happened."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
from conftest import TinyNet, train
from pytorch_lightning.loggers import CSVLogger

from lightning_rigl import SET, SNFS, SNIP, GradualMagnitudePruning, RigL, Static
from lightning_rigl.flops import TrainingFlops, model_size_bytes

INPUT = (1, 8, 8)


class DensitiesPerStep(pl.Callback):
    """Before the sparse callback: the densities each optimizer step trains with."""

    def __init__(self, sparse: pl.Callback) -> None:
        self.sparse, self.densities = sparse, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.densities.append(dict(self.sparse.densities))


def _expected_ratio(sparse, per_step_densities, dense_gradient_steps) -> float:
    account = TrainingFlops.of(TinyNet(), INPUT, list(sparse.densities))
    for step, densities in enumerate(per_step_densities):
        account.add_step(account.forward(densities), step in dense_gradient_steps)
    return account.train_ratio


@pytest.mark.parametrize(
    ("make", "dense_gradient_steps"),
    [
        (lambda: Static(sparsity=0.8), set()),
        (lambda: SET(sparsity=0.8, update_interval=3, stop_at=1.0), set()),  # random growth: no dense gradient
        (lambda: RigL(sparsity=0.8, update_interval=3, stop_at=1.0), {3, 6, 9, 12}),  # 2·f_S + f_D on updates
        (lambda: SNFS(sparsity=0.8, update_interval=3, stop_at=9), set(range(9))),  # every step until T_end
        (lambda: SNIP(sparsity=0.8), {0}),  # the dense first step
        (lambda: GradualMagnitudePruning(sparsity=0.8, update_interval=2, start_at=2, stop_at=10), set()),
    ],
    ids=["static", "set", "rigl", "snfs", "snip", "pruning"],
)
def test_train_ratio_follows_each_methods_per_step_cost(make, dense_gradient_steps):
    sparse = make()
    spy = DensitiesPerStep(sparse)
    train([spy, sparse], steps=13)
    assert len(spy.densities) == 13
    assert sparse.flops.train_ratio == pytest.approx(_expected_ratio(sparse, spy.densities, dense_gradient_steps))


def test_rigl_train_ratio_matches_the_formula_by_hand():
    rigl = RigL(sparsity=0.8, update_interval=3, stop_at=1.0)
    train([rigl], steps=13)
    sparse, dense = rigl.flops.forward(rigl.densities), rigl.flops.dense_flops
    by_hand = (13 * 3 * sparse + 4 * (dense - sparse)) / (13 * 3 * dense)  # 4 updates read the dense gradient
    assert rigl.flops.train_ratio == pytest.approx(by_hand)


def test_pruning_train_ratio_integrates_the_falling_density():
    pruning = GradualMagnitudePruning(sparsity=0.9, update_interval=2, start_at=0, stop_at=8)
    spy = DensitiesPerStep(pruning)
    train([spy, pruning], steps=12)
    account = pruning.flops
    forward = [account.forward(d) for d in spy.densities]
    assert forward[0] == account.dense_flops and forward[-1] < 0.5 * account.dense_flops
    assert account.train_ratio == pytest.approx(sum(forward) / (12 * account.dense_flops))


def test_costs_are_logged_and_summarised(tmp_path):
    rigl = RigL(sparsity=0.8, update_interval=3, stop_at=1.0)
    model = TinyNet()
    train([rigl], model=model, steps=7, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=2)
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r["flops/train_ratio"]]
    assert logged and float(logged[-1]["size/bytes"]) == model_size_bytes(model, rigl.densities)
    ratio = rigl.flops.forward(rigl.densities) / rigl.flops.dense_flops
    assert float(logged[-1]["flops/forward_ratio"]) == pytest.approx(ratio)
    assert 0 < float(logged[-1]["flops/train_ratio"]) < 1


def test_a_forward_that_cannot_run_on_one_example_only_warns():
    class TwoInputs(TinyNet):
        def forward(self, x, y):
            return super().forward(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return __import__("torch").nn.functional.cross_entropy(self(x, y), y)

    rigl = RigL(sparsity=0.8, update_interval=3, stop_at=1.0)
    with pytest.warns(UserWarning, match="FLOPs are not counted"):
        train([rigl], model=TwoInputs(), steps=4)
    assert rigl.flops is None and rigl.num_updates == 1
