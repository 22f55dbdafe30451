"""A start from trained weights (``start="magnitude"``): the masks keep each layer's largest |w| (or the
largest across layers under ``distribution="global"``), on a hand-made case and on a Hugging Face model trained
briefly first, whose fine-tuning then keeps every zero."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyGPT2, TinyViT, make_data, train
from test_callbacks import _assert_resume_matches
from torch import nn
from torch.utils.data import TensorDataset

from lightning_rigl import SET, GradualMagnitudePruning, RigL, Static
from lightning_rigl.errors import ConfigError
from lightning_rigl.sparsity.masks import top_masks


class TwoLayers(pl.LightningModule):
    """Two linear layers with hand-set weights (a: 4×4, b: 2×4) on TinyNet's data (its first 4 pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[0.1, -0.9, 0.2, 0.0], [0.5, 0.3, -0.8, 0.05],
                                              [-0.7, 0.15, 0.25, 0.6], [0.35, -0.45, 0.02, -0.3]]))
            self.b.weight.copy_(torch.tensor([[1.0, -0.01, 0.4, -0.2], [0.03, -2.0, 0.04, 0.65]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(self.b(self.a(x.flatten(1)[:, :4])), (0, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay as set: the masks are what we check


def _masks_after_one_step(callback: pl.Callback) -> dict[str, torch.Tensor]:
    train([callback], model=TwoLayers(), steps=1)
    return {name: mask.int() for name, mask in callback.masks.items()}


def test_each_layer_keeps_its_largest_weights() -> None:
    # a keeps 8 of 16: 0.9 0.8 0.7 0.6 0.5 0.45 0.35 and, of the two 0.3, the lower position; b keeps 2.0 and 1.0.
    masks = _masks_after_one_step(Static(distribution={"a.weight": 0.5, "b.weight": 0.75}, start="magnitude"))
    assert masks["a.weight"].tolist() == [[0, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]]
    assert masks["b.weight"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]


def test_a_global_start_ranks_the_weights_of_every_layer_together() -> None:
    # 24 weights at 75% sparsity: the 6 largest overall are 2.0, 1.0 and 0.65 of b and 0.9, 0.8 and 0.7 of a: the
    # layers' densities follow (3/16 and 3/8, where each layer at the sparsity would hold 4/16 and 2/8).
    sparse = Static(sparsity=0.75, distribution="global", start="magnitude")
    masks = _masks_after_one_step(sparse)
    assert masks["a.weight"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert masks["b.weight"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 1]]
    assert sparse.densities == {"a.weight": 3 / 16, "b.weight": 3 / 8}


def test_under_two_of_four_each_group_keeps_its_two_largest() -> None:
    masks = _masks_after_one_step(Static(distribution={"a.weight": 0.5, "b.weight": 0.5}, structure="2:4",
                                         start="magnitude"))
    assert masks["a.weight"].tolist() == [[0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]]
    assert masks["b.weight"].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]


def test_a_pretrained_huggingface_model_fine_tuned_from_its_magnitude_masks_keeps_every_zero() -> None:
    """GPT-2 from a tiny config, trained dense first (the "pretrained" model); Static from its magnitudes keeps
    those masks and their zeros through fine-tuning, RigL goes on from them with its updates."""
    pretrained = train([], model_factory=TinyGPT2, steps=6).lightning_module
    state = {name: value.clone() for name, value in pretrained.state_dict().items()}
    static = Static(sparsity=0.5, start="magnitude")
    model = train([static], model=pretrained, steps=6).lightning_module
    weights = {name: state[name] for name in static.masks}
    expected = top_masks({name: w.abs() for name, w in weights.items()}, static.densities)
    for name, mask in static.masks.items():
        assert torch.equal(mask, expected[name]), name
        assert not model.get_parameter(name)[~mask].any(), name  # every zero kept
        assert model.get_parameter(name)[mask].ne(weights[name][mask]).any(), name  # and the rest fine-tuned
    fresh = TinyGPT2()
    fresh.load_state_dict(state)
    rigl = RigL(sparsity=0.5, start="magnitude", update_interval=2, drop_fraction=0.3, stop_at=1.0)
    train([rigl], model=fresh, steps=6)
    assert rigl.num_updates > 0


def test_methods_that_start_dense_or_an_unknown_start_are_refused() -> None:
    with pytest.raises(ConfigError, match="starts dense"):
        GradualMagnitudePruning(sparsity=0.9, start="magnitude")
    with pytest.raises(ConfigError, match="start must be one of"):
        SET(sparsity=0.9, start="largest")
    with pytest.raises(ConfigError, match="ranks all layers together"):
        Static(sparsity=0.9, distribution="global")  # a random start has no ranking
    with pytest.raises(ConfigError, match="fixes what each layer holds"):
        Static(sparsity=0.9, distribution="global", structure="2:4", start="magnitude")


def test_a_run_from_a_global_start_resumes_with_its_own_layer_densities(tmp_path) -> None:
    _assert_resume_matches(tmp_path, lambda: RigL(sparsity=0.8, distribution="global", start="magnitude",
                                                  update_interval=3, drop_fraction=0.5, stop_at=1.0), crash_step=5)


def _two_examples() -> TensorDataset:
    """Two images whose first four pixels, the input of layer a, are (3, 1, 0, 0) and (4, 0, 2, 0)."""
    x = torch.zeros(2, 1, 8, 8)
    x.view(2, -1)[:, :4] = torch.tensor([[3.0, 1.0, 0.0, 0.0], [4.0, 0.0, 2.0, 0.0]])
    return TensorDataset(x, torch.tensor([0, 1]))


def test_wanda_keeps_the_largest_weight_times_input_norm() -> None:
    """a's inputs have norms (5, 1, 2, 0); b's inputs, a's outputs (-0.6, 1.8, -1.95, 0.6) and (0.8, 0.4, -2.3,
    1.44), have norms (1, √3.4, √9.0925, √2.4336). So a keeps |w|·norm of 3.5 2.5 1.75 1.6 0.9 0.5 0.5 0.45, none
    of its last column (norm 0, where magnitude kept 0.6); b keeps 2.0·√3.4 and 0.4·√9.0925, not 1.0·1."""
    sparse = Static(distribution={"a.weight": 0.5, "b.weight": 0.75}, start="wanda", calibration_batches=1)
    train([sparse], model=TwoLayers(), steps=1, data=_two_examples())
    masks = {name: mask.int().tolist() for name, mask in sparse.masks.items()}
    assert masks["a.weight"] == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0]]
    assert masks["b.weight"] == [[0, 0, 1, 0], [0, 1, 0, 0]]


def test_wanda_reads_a_conv1d_weights_input_features_as_its_rows() -> None:
    """GPT-2 trained briefly first: each Conv1D weight's score is |w| times its row's input norm, the norms of
    the inputs the layer received from the calibration batch (caught here by a hook of the test's own)."""
    pretrained = train([], model_factory=TinyGPT2, steps=4).lightning_module
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
             for name, module in pretrained.named_modules() if type(module).__name__ == "Conv1D"]
    with torch.no_grad():
        pretrained.training_step(next(iter(torch.utils.data.DataLoader(make_data(), batch_size=32))), 0)
    for hook in hooks:
        hook.remove()
    weights = {f"{name}.weight": pretrained.get_parameter(f"{name}.weight").detach().clone() for name in inputs}
    sparse = Static(sparsity=0.5, start="wanda", calibration_batches=1)
    train([sparse], model=pretrained, steps=1)
    norms = {f"{name}.weight": x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).sqrt() for name, x in inputs.items()}
    expected = top_masks({name: w.abs() * norms[name].float()[:, None] for name, w in weights.items()},
                         sparse.densities)
    assert set(sparse.masks) == set(expected)
    for name, mask in sparse.masks.items():
        assert torch.equal(mask, expected[name]), name


def test_wanda_refuses_a_convolution_before_training() -> None:
    with pytest.raises(ConfigError, match="linear layers .*features.0.weight"):
        train([Static(sparsity=0.5, start="wanda")], steps=1)


class DropoutFirst(TwoLayers):
    """TwoLayers behind a dropout that would change every input norm in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(self.b(self.a(self.drop(x.flatten(1)[:, :4]))), (0, 2))


def test_wanda_calibrates_in_eval_mode_and_gives_the_module_its_mode_back() -> None:
    sparse = Static(distribution={"a.weight": 0.5, "b.weight": 0.75}, start="wanda", calibration_batches=1)

    class Mode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.training = pl_module.drop.training

    mode = Mode()
    train([sparse, mode], model=DropoutFirst(), steps=1, data=_two_examples())
    assert sparse.masks["a.weight"].int().tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0]]
    assert mode.training  # training goes on in train mode


def test_wanda_takes_its_batches_without_taking_them_from_training() -> None:
    """A loader with a persistent worker: the first epoch still starts at its first batch."""
    first = []

    class First(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            first.append(batch[1].tolist())

    data = make_data(8)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=1, persistent_workers=True)
    sparse = Static(sparsity=0.5, start="wanda", calibration_batches=2, include=["a.weight", "b.weight"])
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", callbacks=[sparse, First()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TwoLayers(), loader)
    assert first == [data.tensors[1][:2].tolist()]


def test_wanda_refuses_a_linear_layer_whose_module_never_runs() -> None:
    """nn.MultiheadAttention reads its out_proj's weight itself: no input reaches the module, no norm exists."""
    with pytest.raises(ConfigError, match="saw no input reach .*out_proj.weight"):
        train([Static(sparsity=0.5, start="wanda", calibration_batches=1, include=["*out_proj.weight"])],
              model_factory=TinyViT, steps=1)
