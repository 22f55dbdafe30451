import math
import threading
import time

import pytest
import torch

from lightning_rigl.sparsity import (
    MaskChange,
    apply_change,
    drop_and_grow,
    drop_fraction,
    global_density,
    is_update_step,
    mask_densities,
    mask_digest,
    random_mask,
    top_k_indices,
)
from lightning_rigl.sparsity.masks import Stream, generator
from lightning_rigl.sparsity.parallel import for_each_layer
from lightning_rigl.sparsity.schedules import cubic_sparsity, is_pruning_step, resolve_step

# A 4×4 layer with 6 live weights; dropping 2 removes the smallest |w| (0.1 at (0,1), -0.2 at (2,2)).
WEIGHTS = torch.tensor(
    [[0.9, 0.1, 0.0, 0.0], [0.0, -0.7, 0.0, 0.0], [0.0, 0.0, -0.2, 0.0], [0.5, 0.0, 0.0, -0.4]]
)
MASK = WEIGHTS != 0
GRADS = torch.tensor(
    [[0.0, 0.3, 0.8, 0.1], [0.2, 0.0, 0.1, -0.9], [0.1, 0.0, 5.0, 0.1], [0.0, 0.2, -0.6, 0.0]]
)


def _flat(*cells):
    return sorted(r * 4 + c for r, c in cells)


def test_drop_smallest_magnitude_grow_largest_gradient():
    mask = MASK.clone()
    change = drop_and_grow(mask, WEIGHTS, GRADS.abs(), n_drop=2, n_grow=2)
    # (2,2) has the largest |g| overall but was just dropped: it is regrown and keeps its weight, so the
    # second grown position is the largest |g| elsewhere among non-kept positions: -0.9 at (1,3).
    assert sorted(change.removed.tolist()) == _flat((0, 1))
    assert sorted(change.added.tolist()) == _flat((1, 3))
    expected = MASK.clone()
    expected[0, 1], expected[1, 3] = False, True
    assert torch.equal(mask, expected)


def test_count_is_preserved_and_grown_come_from_non_kept():
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(300, 400, generator=gen)
    mask = random_mask(weights.shape, 12_000, gen, torch.device("cpu"))
    before = mask.clone()
    change = drop_and_grow(mask, weights * mask, torch.rand(weights.shape, generator=gen), 3_000, 3_000)
    assert int(mask.sum()) == 12_000
    assert before.view(-1)[change.removed].all() and not mask.view(-1)[change.removed].any()
    assert not before.view(-1)[change.added].any() and mask.view(-1)[change.added].all()


def _scores(kind: str, numel: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(numel, generator=gen)
    if kind == "90% zeros":  # like the gradient of a 3×3 conv that sees a 1×1 feature map, and ReLU
        scores[torch.rand(numel, generator=gen) < 0.9] = 0.0
    elif kind == "all zero":
        scores.zero_()
    elif kind == "few values":  # equal weights: many ties at every rank
        scores = torch.randint(0, 4, (numel,), generator=gen).float()
    elif kind == "misleading sample":  # every sampled entry is large; the true top-k lies between them
        scores.zero_()
        scores[::7] = 1.0
        scores[1:400:2] = 5.0
    return scores.abs()


def _check_top_k(scores: torch.Tensor, k: int, largest: bool, exclude: torch.Tensor | None) -> None:
    got = top_k_indices(scores, k, largest=largest, exclude=exclude)
    assert got.numel() == k and got.unique().numel() == k
    if exclude is not None:
        assert not exclude[got].any(), "an excluded position was chosen"
        allowed = scores[~exclude]
    else:
        allowed = scores
    expected = torch.topk(allowed, k, largest=largest).values.sort().values
    assert torch.equal(scores[got].sort().values, expected), "not the k best scores"


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["random", "90% zeros", "all zero", "few values", "misleading sample"])
@pytest.mark.parametrize(
    ("numel", "k"), [(100, 7), (300_000, 1), (300_000, 9_000), (300_000, 60_000), (300_000, 140_000)]
)
def test_top_k_indices_is_exact(numel, k, kind, largest):
    _check_top_k(_scores(kind, numel, numel + k), k, largest, exclude=None)


@pytest.mark.parametrize("kind", ["random", "90% zeros", "all zero", "few values"])
@pytest.mark.parametrize("k", [1, 2_000, 30_000])
def test_top_k_indices_never_chooses_an_excluded_position(kind, k):
    gen = torch.Generator().manual_seed(k)
    scores = _scores(kind, 400_000, k)
    exclude = torch.rand(400_000, generator=gen) < 0.1
    exclude[scores > scores.quantile(0.99)] = True  # the best scores are the kept connections
    _check_top_k(scores, k, True, exclude)


def test_top_k_indices_breaks_ties_by_lowest_position():
    # 300k zeros and a few ones: the ones, then the lowest-indexed zeros.
    scores = torch.zeros(300_000)
    scores[[5, 70_000, 299_999]] = 1.0
    got = top_k_indices(scores, 10).sort().values
    assert got.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 70_000, 299_999]


@pytest.mark.parametrize("weights_kind", ["random", "equal"])
@pytest.mark.parametrize("gradient_kind", ["random", "90% zeros", "all zero"])
def test_drop_and_grow_is_exact_with_ties(gradient_kind, weights_kind):
    gen = torch.Generator().manual_seed(0)
    shape = (256, 128, 3, 3)  # 294,912 weights, 10% live: large enough for the sampled selection
    mask = random_mask(torch.Size(shape), 29_491, gen, torch.device("cpu"))
    weights = torch.randn(shape, generator=gen) if weights_kind == "random" else torch.full(shape, 0.5)
    weights *= mask
    grads = _scores(gradient_kind, weights.numel(), 1).view(shape)
    before = mask.clone()
    change = drop_and_grow(mask, weights, grads, n_drop=8_000, n_grow=8_000)
    assert int(mask.sum()) == 29_491
    flat_before, flat_after = before.view(-1), mask.view(-1)
    # Dropped: among the 8,000 smallest |w| of the live ones (some of which may be regrown).
    assert torch.equal(change.removed.sort().values, (flat_before & ~flat_after).nonzero().squeeze(1))
    eighth_thousandth = torch.kthvalue(weights.view(-1).abs()[flat_before], 8_000).values
    assert weights.view(-1).abs()[change.removed].max() <= eighth_thousandth
    # Grown: the largest |g| among positions not kept; no position left dead beats a grown one.
    grown = flat_after & ~flat_before
    assert torch.equal(change.added.sort().values, grown.nonzero().squeeze(1))
    still_dead = ~flat_after
    if change.added.numel():
        assert grads.view(-1)[change.added].min() >= grads.view(-1)[still_dead].max()


def test_apply_change_resets_weights_and_every_state_tensor():
    param = torch.nn.Parameter(torch.ones(3, 4))
    optimizer = torch.optim.Adam([param], amsgrad=True)
    param.grad = torch.ones(3, 4)
    optimizer.step()
    change = MaskChange(removed=torch.tensor([0, 5]), added=torch.tensor([7]))
    apply_change(param, change, optimizer, grow_values=torch.tensor([0.25]))
    flat = param.detach().view(-1)
    assert flat[0] == 0 and flat[5] == 0 and flat[7] == 0.25
    state = optimizer.state[param]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert (state[key].view(-1)[[0, 5, 7]] == 0).all(), key
        assert (state[key].view(-1)[[1, 2, 3]] != 0).all(), key


def test_apply_change_works_on_channels_last():
    param = torch.nn.Parameter(torch.ones(2, 3, 2, 2).to(memory_format=torch.channels_last))
    apply_change(param, MaskChange(removed=torch.tensor([1]), added=torch.tensor([], dtype=torch.long)), None)
    assert param.detach().reshape(-1)[1] == 0 and param.detach().sum() == 23


def test_random_mask_has_exact_count_and_depends_on_seed_only():
    a = random_mask(torch.Size([50, 7]), 33, generator(3, Stream.INITIAL_MASK, 0, 1), torch.device("cpu"))
    b = random_mask(torch.Size([50, 7]), 33, generator(3, Stream.INITIAL_MASK, 0, 1), torch.device("cpu"))
    c = random_mask(torch.Size([50, 7]), 33, generator(4, Stream.INITIAL_MASK, 0, 1), torch.device("cpu"))
    assert int(a.sum()) == 33 and torch.equal(a, b) and not torch.equal(a, c)


def test_drop_fraction_schedules():
    assert drop_fraction(0, 0.3, 1000, "cosine") == pytest.approx(0.3)
    assert drop_fraction(500, 0.3, 1000, "cosine") == pytest.approx(0.15)
    assert drop_fraction(250, 0.3, 1000, "cosine") == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction(250, 0.3, 1000, "linear") == pytest.approx(0.225)
    assert drop_fraction(999, 0.3, 1000, "constant") == 0.3
    assert drop_fraction(1000, 0.3, 1000, "constant") == 0.0
    # With a first update step t_0 the official cosine runs over T_end - t_0 steps of the raw step, and
    # reaches 0 once t >= T_end - t_0.
    assert drop_fraction(250, 0.3, 1000, "cosine", start_step=500) == pytest.approx(0.15)
    assert drop_fraction(600, 0.3, 1000, "cosine", start_step=500) == 0.0


@pytest.mark.parametrize(
    ("alpha", "begin", "end", "expected"),
    # The official linear anneal (sparse_optimizers_base ``exponential`` with power 1, restated as data):
    # α · (1 - (t - t_0) / (T_end - t_0)), α at the begin step and positive until T_end.
    [(0.3, 1000, 5000, {1000: 0.3, 2000: 0.225, 3000: 0.15, 4000: 0.075, 4900: 0.0075, 5000: 0.0}),
     (0.5, 250, 1000, {250: 0.5, 500: 1 / 3, 750: 1 / 6, 999: 0.5 / 750, 1000: 0.0}),
     (0.3, 0, 1000, {0: 0.3, 250: 0.225, 750: 0.075})],
)
def test_official_linear_schedule_decays_from_the_begin_step(alpha, begin, end, expected):
    assert {t: drop_fraction(t, alpha, end, "linear", start_step=begin) for t in expected} == pytest.approx(expected)


def test_update_cadence_and_stop_step():
    assert [s for s in range(500) if is_update_step(s, 100, 100, 350)] == [100, 200, 300]
    assert [s for s in range(500) if is_update_step(s, 100, 0, 350)] == [0, 100, 200, 300]
    # The official maskupdate_begin_step: updates at t_0, t_0 + ΔT, ...
    assert [s for s in range(500) if is_update_step(s, 100, 150, 350)] == [150, 250]
    assert resolve_step("stop_at", 0.75, 1000) == 750
    assert resolve_step("stop_at", 300, 1000) == 300
    assert resolve_step("start_at", 0.0, 1000) == 0
    with pytest.raises(ValueError, match="no known length"):
        resolve_step("stop_at", 0.75, float("inf"))


def test_cubic_schedule_and_pruning_steps():
    # Zhu & Gupta with s_0 = 0: s_t = s_f · (1 - (1 - p)³).
    assert cubic_sparsity(100, 0.9, 200, 800) == 0.0
    assert cubic_sparsity(200, 0.9, 200, 800) == 0.0
    assert cubic_sparsity(500, 0.9, 200, 800) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(800, 0.9, 200, 800) == pytest.approx(0.9)
    assert cubic_sparsity(900, 0.9, 200, 800) == pytest.approx(0.9)
    assert [s for s in range(1000) if is_pruning_step(s, 250, 200, 800)] == [200, 450, 700, 800]


def test_densities_of_masks_per_layer_and_over_all() -> None:
    masks = {"a": WEIGHTS != 0, "b": torch.tensor([True, False, False, False])}
    assert mask_densities(masks) == {"a": 6 / 16, "b": 1 / 4}
    assert global_density(masks) == 7 / 20  # weighted by size, not the mean of the layers' densities


def _positions(*live: int, numel: int = 8) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[list(live)] = True
    return mask


def test_mask_digest_tells_apart_masks_with_other_live_positions() -> None:
    same = mask_digest({"a": _positions(1, 5, 6), "b": _positions(0, numel=3)})
    assert torch.equal(same, mask_digest({"a": _positions(1, 5, 6), "b": _positions(0, numel=3)}))
    assert same[:, 0].tolist() == [3, 1]  # the live counts
    # {1, 5, 6} and {2, 3, 7} share their count, sum and sum of squares (12 and 62): power sums would collide.
    assert not torch.equal(same[0], mask_digest({"a": _positions(2, 3, 7)})[0])
    assert not torch.equal(same[0], mask_digest({"a": _positions(1, 5, 7)})[0])  # one position moved
    # Positions are row-major, whatever the memory layout.
    grid = torch.rand(2, 3, 4, 5) > 0.5
    assert torch.equal(mask_digest({"w": grid}), mask_digest({"w": grid.to(memory_format=torch.channels_last)}))
    assert mask_digest({}).shape == (0, 3)


def test_prepared_layers_run_in_order_on_the_calling_thread_at_most_three_ahead() -> None:
    """What every process must do in the same order (gathers, under FSDP2) runs on this thread, in the layers'
    order, and never more than three layers are prepared and not yet finished (the transient memory bound)."""
    params = {f"layer{i}": torch.zeros(i + 1) for i in range(12)}
    lock, prepared, finished, ahead = threading.Lock(), [], [], []

    def prepare(name: str) -> None:
        assert threading.current_thread() is threading.main_thread()
        with lock:
            prepared.append(name)
            ahead.append(len(prepared) - len(finished))

    def decide(index: int, name: str, param: torch.Tensor) -> int:
        assert name in prepared  # prepared before it runs
        time.sleep(0.005 * (1 + index % 3))  # slower than preparing, and finishing out of order
        with lock:
            finished.append(name)
        return index

    results = for_each_layer(decide, params, prepare)
    assert prepared == list(params) and sorted(finished) == sorted(params)
    assert results == {name: index for index, name in enumerate(params)}
    assert max(ahead) <= 3
