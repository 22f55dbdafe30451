"""Structured masks (N:M, constant fan-in) and SRigL's neuron ablation: hand-computed selections, then real runs."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TinyNet, train
from pytorch_lightning.loggers import CSVLogger
from test_callbacks import Recorder

from lightning_rigl import SET, SNFS, SNIP, GradualMagnitudePruning, RigL, SRigL, Static
from lightning_rigl.callbacks.srigl import ABLATED_NEURONS
from lightning_rigl.errors import ConfigError
from lightning_rigl.results import method_label
from lightning_rigl.sparsity.ablation import constant_fan_in_update, neurons_to_keep, salient_per_neuron
from lightning_rigl.sparsity.structure import NM, ConstantFanIn, parse_structure
from lightning_rigl.sparsity.updates import drop_and_grow


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _positions(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).nonzero().squeeze(1).tolist()


SCORES = torch.tensor([[8, 7, 6, 5, 1, 2, 3, 4], [0, 0, 0, 0, 9, 9, 9, 9]], dtype=torch.float)


def test_n_m_growth_takes_the_best_of_each_group_then_the_best_overall():
    empty = torch.zeros(2, 8, dtype=torch.bool)
    # Candidates, two per group of four: 8, 7 | 3, 4 | 0, 0 (ties: lower column) | 9, 9 (positions 12, 13).
    assert sorted(NM(2, 4).grow(empty, SCORES, 4).tolist()) == [0, 1, 12, 13]
    assert sorted(NM(2, 4).grow(empty, SCORES, 6).tolist()) == [0, 1, 6, 7, 12, 13]
    # Group 0 of row 0 is full: its free 6 and 5 may not grow; 3 and 4 lose to the 9s.
    full_group = _mask([[1, 1, 0, 0, 0, 0, 0, 0], [0] * 8])
    assert sorted(NM(2, 4).grow(full_group, SCORES, 3).tolist()) == [7, 12, 13]
    with pytest.raises(ValueError, match="room"):
        NM(2, 4).grow(full_group, SCORES, 7)  # 2 + 2 + 2 free slots


def test_n_m_ties_go_to_the_lower_position_and_short_groups_hold_what_fits():
    tied = NM(1, 2).grow(torch.zeros(1, 6, dtype=torch.bool), torch.zeros(1, 6), 2).tolist()
    assert len(tied) == 2 and set(tied) <= {0, 2, 4}  # each group's lower column; across groups, top_k's rule
    assert NM(2, 4).capacity((3, 6)) == 3 * (2 + 2)  # a group of four and a group of two per row
    assert NM(1, 4).capacity((2, 5)) == 2 * (1 + 1)
    mask = NM(1, 4).random_mask(torch.Size([2, 5]), 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert mask[:, :4].sum(1).tolist() == [1, 1] and mask[:, 4].all()


def test_constant_fan_in_growth_fills_every_neuron_to_the_same_count():
    empty = torch.zeros(2, 8, dtype=torch.bool)
    assert sorted(ConstantFanIn().grow(empty, SCORES, 6).tolist()) == [0, 1, 2, 12, 13, 14]
    uneven = _mask([[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]])
    # Three per neuron: row 0 grows two (7, 6), row 1 one (the first free 9, column 6).
    assert sorted(ConstantFanIn().grow(uneven, SCORES, 3).tolist()) == [1, 2, 14]


def test_drop_and_grow_within_a_structure():
    weights = torch.tensor([[0.9, 0.0, 0.0, 0.5], [0.0, 0.3, 0.2, 0.0]])
    mask = weights != 0  # 1:2 holds: one live weight in each group (0, 1), (2, 3) of each row
    grads = torch.tensor([[0.0, 0.0, 5.0, 0.0], [4.0, 0.0, 0.0, 3.0]])
    # Drop the two smallest |w|, 0.2 (6) and 0.3 (5). Row 0's groups are still full, so its 5.0 may not grow;
    # each group of row 1 grows its best: 4.0 (4) and 3.0 (7).
    structured = mask.clone()
    change = drop_and_grow(structured, weights, grads, 2, 2, NM(1, 2))
    assert _positions(structured) == [0, 3, 4, 7]
    assert sorted(change.removed.tolist()) == [5, 6] and sorted(change.added.tolist()) == [4, 7]
    free = mask.clone()  # unstructured, the same update grows 5.0 and 4.0
    drop_and_grow(free, weights, grads, 2, 2)
    assert _positions(free) == [0, 2, 3, 4]


def test_random_structured_masks_are_exact_and_reproducible():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    for structure, n_live in [(NM(2, 4), 25), (ConstantFanIn(), 30)]:
        a = structure.random_mask(torch.Size([6, 3, 2, 2]), n_live, gen(), torch.device("cpu"))
        b = structure.random_mask(torch.Size([6, 3, 2, 2]), n_live, gen(), torch.device("cpu"))
        assert int(a.sum()) == n_live and structure.violation(a) is None and torch.equal(a, b)
    assert (ConstantFanIn().random_mask(torch.Size([6, 12]), 30, gen(), "cpu").sum(1) == 5).all()


def test_layer_counts_and_violations():
    assert ConstantFanIn().layer_count("w", (3, 10), 10) == 9  # a whole fan-in of 3, rounded down
    with pytest.raises(ConfigError, match="at least one per neuron"):
        ConstantFanIn().layer_count("w", (3, 10), 2)
    assert NM(2, 4).layer_count("w", (3, 8), 12) == 12
    with pytest.raises(ConfigError, match="more than 2:4 allows"):
        NM(2, 4).layer_count("w", (3, 8), 13)
    assert "groups of 4" in NM(2, 4).violation(_mask([[1, 1, 1, 0]]))
    assert NM(2, 4).violation(_mask([[1, 1, 0, 0, 1, 0, 1, 0]])) is None
    assert ConstantFanIn().violation(_mask([[1, 1, 0], [0, 0, 0], [0, 1, 1]])) is None  # an ablated neuron
    assert "different fan-ins" in ConstantFanIn().violation(_mask([[1, 1, 0], [1, 0, 0]]))


@pytest.mark.parametrize("value", ["4:4", "0:4", "5:4", "2-4", "fan_in", 3])
def test_structure_values_are_checked(value):
    with pytest.raises(ConfigError, match="Unknown structure"):
        parse_structure(value)


# ------------------------------------------------------------------------------------------ SRigL's rule

def test_salient_weights_are_what_unstructured_rigl_keeps_or_grows():
    mask = _mask([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    weights = torch.tensor([[0.9, 0.1, 0, 0], [0, 0, 0.05, 0.02], [0.5, 0, 0.4, 0]])
    grads = torch.tensor([[0, 0, 0.3, 0], [0, 0, 0, 0], [0, 0.6, 0, 0.2]])
    # Dropping 2 (0.02, 0.05 in row 1) and growing 2 (0.6 in row 2, 0.3 in row 0): 3, 0 and 3 per neuron.
    assert salient_per_neuron(mask, weights, grads, 2).tolist() == [3, 0, 3]


def test_neurons_with_too_few_salient_weights_are_ablated_but_never_too_many():
    salient = torch.tensor([5, 1, 3, 0])
    assert neurons_to_keep(salient, budget=6, fan_in=4, min_salient=2).tolist() == [True, False, True, False]
    # Threshold 4 would leave one neuron for 6 weights (more than its 4 columns): the threshold falls to the
    # count of the second most salient neuron, 3.
    assert neurons_to_keep(salient, budget=6, fan_in=4, min_salient=4).tolist() == [True, False, True, False]
    # 12 weights need all four neurons at a fan-in of 4 or less... at least 4 of them: nothing is ablated.
    assert neurons_to_keep(salient, budget=12, fan_in=4, min_salient=4).all()
    assert neurons_to_keep(salient, budget=6, fan_in=4, min_salient=0).all()


def test_ablation_drops_the_neuron_first_and_gives_its_fan_in_to_the_others():
    weights = torch.tensor([[0.9, 0.1, 0, 0], [0.5, 0, 0.4, 0], [0, 0.3, 0, 0.8], [0, 0, 0.05, 0.02]])
    mask = weights != 0
    grads = torch.tensor([[0, 0.2, 0.7, 0.6], [0, 0.9, 0, 0.1], [0.5, 0.4, 0.3, 0], [1.0, 1.0, 1.0, 1.0]])
    active = torch.tensor([True, True, True, False])
    # Budget 9: fan-in 9 // 3 = 3. Of the 4 to drop, neuron 3's two weights go first, then the two smallest
    # |w| of the rest: 0.1 (row 0) and 0.3 (row 2). Each active neuron grows back to 3 by gradient: row 0 takes
    # 0.7 and 0.6, row 1 0.9, row 2 0.5 and 0.4 (the dropped 0.3 again: kept, neither removed nor added).
    change = constant_fan_in_update(mask, weights, grads, 4, active, budget=9)
    assert mask.int().tolist() == [[1, 0, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 0]]
    assert sorted(change.removed.tolist()) == [1, 14, 15]
    assert sorted(change.added.tolist()) == [2, 3, 5, 8]


def test_a_returning_neuron_shrinks_the_others_to_their_largest_weights():
    weights = torch.tensor([[0.9, 0.1, 0.5, 0], [0.2, 0.2, 0.6, 0], [0.3, 0.8, 0.1, 0], [0, 0, 0, 0]])
    mask = weights != 0
    grads = torch.tensor([[0.0] * 4, [0.0] * 4, [0.0] * 4, [0.1, 0.4, 0.3, 0.2]])
    # Four active neurons share 9 weights: fan-in 2. The three full neurons keep their two largest |w| (ties to
    # the lower column: 0.2 at column 0 over column 1); the returning one grows its two largest gradients.
    change = constant_fan_in_update(mask, weights, grads, 0, torch.ones(4, dtype=torch.bool), budget=9)
    assert mask.int().tolist() == [[1, 0, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]]
    assert sorted(change.removed.tolist()) == [1, 5, 10] and sorted(change.added.tolist()) == [13, 14]


# ---------------------------------------------------------------------------------------------- real runs

@pytest.mark.parametrize("structure", ["1:4", "constant_fan_in"])
@pytest.mark.parametrize("method", [Static, SET])
def test_static_and_set_keep_their_structure(method, structure):
    kwargs = {} if method is Static else {"update_interval": 2, "drop_fraction": 0.5, "stop_at": 1.0}
    sparse = method(sparsity=0.8, structure=structure, **kwargs)
    train([sparse, Recorder(sparse)], steps=5)  # the Recorder checks the structure after every step
    assert sparse.num_updates == (0 if method is Static else 2)


def test_srigl_defaults_follow_the_official_configuration():
    srigl = SRigL(sparsity=0.9)
    assert srigl.min_salient_fraction == 0.3 and srigl.no_ablation is None
    assert isinstance(srigl.structure, ConstantFanIn) and srigl.redistribution == "none"
    train([srigl], steps=1)
    assert srigl._ablating == {"features.0.weight", "features.3.weight", "classifier.1.weight"}  # not the last


def test_srigl_logs_and_records_its_ablated_neurons(tmp_path):
    srigl = SRigL(sparsity=0.9, min_salient_fraction=0.95, update_interval=2, drop_fraction=0.5, stop_at=1.0)
    train([srigl], steps=5, logger=CSVLogger(tmp_path, name="run"))
    with open(next(tmp_path.rglob("metrics.csv"))) as file:
        logged = [float(r[ABLATED_NEURONS]) for r in csv.DictReader(file) if r[ABLATED_NEURONS]]
    by_hand = sum(int((m.reshape(m.shape[0], -1).sum(1) == 0).sum()) for m in srigl.masks.values())
    assert len(logged) == 3 and logged[0] == 0 and logged[-1] == by_hand > 0  # at the start, then each update
    assert method_label(srigl) == "SRigL"
    assert method_label(SRigL(sparsity=0.9, min_salient_fraction=0)) == "SRigL (no ablation)"
    assert method_label(RigL(sparsity=0.9, structure="2:4")) == "RigL 2:4"


def test_resuming_with_a_structure_the_masks_do_not_hold_is_refused(tmp_path):
    trainer = train([RigL(sparsity=0.8, distribution="uniform")], steps=2)
    trainer.save_checkpoint(tmp_path / "free.ckpt")
    with pytest.raises(RuntimeError, match="within the structure 2:4"):
        train([RigL(sparsity=0.8, distribution="uniform", structure="2:4")], steps=4,
              ckpt_path=str(tmp_path / "free.ckpt"))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SNIP(sparsity=0.9, structure="2:4"), "does not keep a structure"),
        (lambda: GradualMagnitudePruning(sparsity=0.9, structure="2:4"), "does not keep a structure"),
        (lambda: RigL(sparsity=0.9, structure="2:4", redistribution="gradient"), "redistribution"),
        (lambda: SNFS(sparsity=0.9, structure="constant_fan_in"), "redistribution"),
        (lambda: SRigL(sparsity=0.9, structure="2:4"), "constant fan-in"),
        (lambda: SRigL(sparsity=0.9, min_salient_fraction=1.5), "min_salient_fraction"),
    ],
)
def test_structure_configuration_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RigL(sparsity=0.3, structure="2:4"), "more than 2:4 allows"),
        (lambda: Static(distribution={"features.0.weight": 0.0, "features.3.weight": 0.5,
                                      "classifier.1.weight": 0.999, "classifier.3.weight": 0.5},
                        structure="constant_fan_in"), "at least one per neuron"),
        (lambda: SRigL(sparsity=0.9, no_ablation=["head.*"]), "no_ablation"),
    ],
)
def test_structures_the_model_cannot_hold_fail_before_training(make, message):
    model = TinyNet()
    with pytest.raises(ConfigError, match=message):
        train([make()], model=model, steps=1)
    assert model.trainer.global_step == 0
