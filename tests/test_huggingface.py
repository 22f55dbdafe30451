"""Hugging Face models: which weights the default selection takes (GPT-2's Conv1D, stored (in, out); Llama's
Linear), every method on them with the shared invariants, and structure along each neuron's inputs whichever way
the weight is stored."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyGPT2, TinyHuggingFace, TinyLlama, tiny_huggingface_lm, train
from fake_datasets import write_text_folder
from methods import METHODS, assert_masks_hold
from test_callbacks import _assert_resume_matches

from lightning_rigl import RigL, SRigL, Static
from lightning_rigl.export import load_sparse, save_sparse, sparse_inference
from lightning_rigl.flops import weight_flops
from lightning_rigl.sparsity import sparsifiable_parameters
from lightning_rigl.sparsity.targets import neurons_in_columns

GPT2_WEIGHTS = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
LLAMA_WEIGHTS = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"] + [
    f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
MODELS = {"gpt2": TinyGPT2, "llama": TinyLlama}
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arch, tie_head, expected", [("gpt2", True, GPT2_WEIGHTS), ("llama", False, LLAMA_WEIGHTS),
                                                      ("llama", True, LLAMA_WEIGHTS)])
def test_the_default_selection_takes_the_projections_and_keeps_embeddings_and_the_head_dense(
        arch: str, tie_head: bool, expected: list[str]) -> None:
    model = tiny_huggingface_lm(arch, tie_head)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie_head
    chosen = sparsifiable_parameters(model)
    assert list(chosen) == expected
    assert neurons_in_columns(model, chosen) == (set(expected) if arch == "gpt2" else set())
    # Named, the head is sparsified: the untied one as itself, a tied one as the embedding it reads.
    head = "lm_head.weight" if not tie_head else "transformer.wte.weight" if arch == "gpt2" else \
        "model.embed_tokens.weight"
    assert list(sparsifiable_parameters(model, include=[head])) == [head]


def test_a_conv1d_weight_costs_its_products_flops() -> None:
    model = tiny_huggingface_lm("gpt2")
    tokens = torch.zeros(1, 16, dtype=torch.long)
    flops = weight_flops(model, tokens).per_weight
    for name in GPT2_WEIGHTS:
        assert flops[name] == 2 * 16 * model.get_parameter(name).numel(), name  # a multiply and an add per token


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", [name for name in METHODS if name != "lottery"])  # its ticket is TinyNet's
def test_every_method_trains_a_huggingface_model_with_exact_counts_dead_weights_and_clean_optimizer_state(
        method: str, arch: str) -> None:
    sparse = METHODS[method]()
    trainer = train([sparse], model_factory=MODELS[arch], steps=13)
    model = trainer.lightning_module
    expected = GPT2_WEIGHTS if arch == "gpt2" else LLAMA_WEIGHTS
    assert list(sparse.masks) == [f"classifier.{name}" for name in expected]
    assert sparse.num_updates > 0 or method == "static"
    assert_masks_hold(sparse, model, trainer.optimizers[0])


def _neurons(model: TinyHuggingFace, name: str, mask: torch.Tensor) -> torch.Tensor:
    """The mask as (neurons, inputs): a Conv1D weight's neurons are its columns."""
    return mask.t() if "transformer.h" in name else mask


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", ["srigl", "rigl_constant_fan_in"])
def test_under_a_constant_fan_in_every_output_neuron_has_the_same_fan_in(arch: str, method: str) -> None:
    """A GPT-2 neuron is a column of its Conv1D weight: the columns hold one fan-in (or none, ablated), the rows
    do not; for Llama's Linear weights, the rows."""
    sparse = SRigL(sparsity=0.8, min_salient_fraction=0.9, update_interval=3, drop_fraction=0.5, stop_at=1.0) \
        if method == "srigl" else RigL(sparsity=0.8, structure="constant_fan_in", update_interval=3,
                                       drop_fraction=0.5, stop_at=1.0)
    trainer = train([sparse], model_factory=MODELS[arch], steps=13)
    assert sparse.num_updates > 0
    for name, mask in sparse.masks.items():
        per_neuron = _neurons(trainer.lightning_module, name, mask).sum(1)
        assert per_neuron[per_neuron > 0].unique().numel() == 1, name
        per_input = _neurons(trainer.lightning_module, name, mask).sum(0)
        assert per_input.unique().numel() > 1, name  # the other way holds no constant count
        assert sparse.empty_rows[name] == int((per_neuron == 0).sum()), name
    if method == "srigl" and arch == "gpt2":
        assert sparse.ablated_neurons() > 0  # the threshold ablates neurons (columns) of this tiny model


@pytest.mark.parametrize("arch", MODELS)
def test_two_of_four_groups_run_along_each_neurons_inputs(arch: str) -> None:
    sparse = RigL(sparsity=0.5, distribution="uniform", structure="2:4", update_interval=3, drop_fraction=0.5,
                  stop_at=1.0)
    trainer = train([sparse], model_factory=MODELS[arch], steps=13)
    assert sparse.num_updates > 0
    sparse_layers = {name: mask for name, mask in sparse.masks.items() if sparse.densities[name] < 1}
    assert len(sparse_layers) == len(sparse.masks) - 1  # "uniform" keeps the first layer dense
    for name, mask in sparse_layers.items():
        neurons = _neurons(trainer.lightning_module, name, mask)
        groups = neurons.reshape(neurons.shape[0], -1, 4).sum(2)
        assert int(groups.max()) <= 2, name
        assert int(groups.sum()) == mask.numel() // 2, name  # 2:4 at 50%: every group full


@pytest.mark.parametrize("arch", MODELS)
def test_a_huggingface_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_one_does(tmp_path,
                                                                                          arch: str) -> None:
    _assert_resume_matches(tmp_path, lambda: SRigL(sparsity=0.8, min_salient_fraction=0.9, update_interval=3,
                                                   drop_fraction=0.5, stop_at=1.0),
                           crash_step=5, model_factory=MODELS[arch])


def test_sparse_kernels_run_llamas_linear_layers_and_say_why_gpt2s_conv1d_stays_dense() -> None:
    for factory, expected in ((TinyLlama, "native"), (TinyGPT2, "dense (Conv1D has no sparse training kernel")):
        sparse = RigL(sparsity=0.9, update_interval=3, kernels="sparse")
        train([sparse], model_factory=factory, steps=6)
        assert sparse.live_step_used == "live weights"
        assert all(used.startswith(expected) for used in sparse.kernels_used.values()), sparse.kernels_used


@pytest.mark.parametrize("method, kernel", [("rigl", "csr"), ("srigl", "condensed")])
def test_sparse_inference_converts_conv1d_as_its_transpose_and_gives_the_same_logits(method: str,
                                                                                    kernel: str) -> None:
    sparse = METHODS[method]()
    model = train([sparse], model_factory=TinyGPT2, steps=7).lightning_module.eval()
    images = torch.randn(3, 1, 8, 8)
    inference = sparse_inference(model, sparse.masks, mode="sparse")
    choices = {choice.name: choice for choice in inference.sparse_layers}
    assert set(choices) == {name.removesuffix(".weight") for name in sparse.masks}
    assert all(c.kind == "linear (Conv1D)" and c.kernel == kernel for c in choices.values()), choices
    with torch.no_grad():
        torch.testing.assert_close(inference(images), model(images), rtol=1e-5, atol=1e-5)


def test_the_compact_file_of_a_huggingface_model_loads_with_its_zeros(tmp_path) -> None:
    sparse = METHODS["srigl"]()
    model = train([sparse], model_factory=TinyGPT2, steps=7).lightning_module
    path = save_sparse(model, tmp_path / "gpt2.safetensors", sparse.masks)
    fresh = TinyGPT2()
    load_sparse(path, fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh.classifier.lm_head.weight is fresh.classifier.transformer.wte.weight  # still tied


@pytest.mark.parametrize("factory", [TinyGPT2, TinyLlama])
def test_save_pretrained_and_from_pretrained_keep_every_zero(tmp_path, factory: type[TinyHuggingFace]) -> None:
    sparse = METHODS["rigl"]()
    model = train([sparse], model_factory=factory, steps=7).lightning_module
    model.classifier.save_pretrained(tmp_path / "sparse")
    loaded = type(model.classifier).from_pretrained(tmp_path / "sparse")
    for name, mask in sparse.masks.items():
        weight = loaded.get_parameter(name.removeprefix("classifier."))
        assert torch.equal(weight, model.get_parameter(name)) and not weight[~mask].any(), name
    tokens = torch.arange(8).view(1, 8)
    torch.testing.assert_close(loaded(input_ids=tokens).logits, model.classifier(input_ids=tokens).logits)


def test_the_huggingface_example_script_runs(tmp_path) -> None:
    """docs/examples/huggingface_causal_lm.py, which the README shows, shortened, on a small text folder."""
    write_text_folder(tmp_path / "corpus", documents=40)
    result = subprocess.run([sys.executable, str(REPO / "docs/examples/huggingface_causal_lm.py"), "--text-dir",
                             str(tmp_path / "corpus"), "--pretrain-steps", "2", "--max-steps", "3", "--output",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"fine-tuned at sparsity 0\.\d{4} of 8 layers: validation loss \d+\.\d{4}", result.stdout)
    assert "loaded back with every zero: True" in result.stdout
    assert (tmp_path / "out" / "config.json").exists()


def test_a_get_output_embeddings_that_is_not_implemented_leaves_the_selection_alone() -> None:
    class Unfinished(torch.nn.Module):  # as some models' own code leaves the method
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def get_output_embeddings(self) -> torch.nn.Module:
            raise NotImplementedError

    assert list(sparsifiable_parameters(Unfinished())) == ["proj.weight"]


def test_a_magnitude_start_under_a_constant_fan_in_keeps_each_gpt2_neurons_largest_inputs() -> None:
    """Each column of a Conv1D weight (a neuron) keeps the same number of its largest |w|, read down the column."""
    pretrained = train([], model_factory=TinyGPT2, steps=4).lightning_module
    weights = {name: pretrained.get_parameter(f"classifier.{name}").detach().clone() for name in GPT2_WEIGHTS}
    sparse = Static(sparsity=0.5, structure="constant_fan_in", start="magnitude")
    train([sparse], model=pretrained, steps=1)
    for name, weight in weights.items():
        mask = sparse.masks[f"classifier.{name}"]
        per_column = mask.sum(0)
        assert per_column.unique().numel() == 1, name
        k = int(per_column[0])
        expected = torch.zeros_like(mask).scatter_(0, weight.abs().topk(k, dim=0).indices, True)
        assert torch.equal(mask, expected), name
