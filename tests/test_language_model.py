"""Language models: the GPT decoders (causal masking, the tied head), the text data module (split by document,
the token cache, its errors) and `CausalLM` trained by a real Trainer with the sparse callbacks."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from fake_datasets import write_text_folder, write_tokenizer
from methods import METHODS, assert_masks_hold
from torch.nn import functional as F

from lightning_rigl import RigL, Static
from lightning_rigl.callbacks.sparse_training import saved_state
from lightning_rigl.data.text import (
    Document,
    TextDataModule,
    contiguous_splits,
    folder_documents,
    split_of,
    stdlib_documents,
)
from lightning_rigl.errors import ConfigError
from lightning_rigl.language_model import CausalLM
from lightning_rigl.models import create_model
from lightning_rigl.sparsity.targets import sparsifiable_parameters

PROJECTIONS = ("attention.query", "attention.key", "attention.value", "attention.output", "mlp.fc", "mlp.proj")


def test_a_later_token_cannot_change_an_earlier_logit() -> None:
    torch.manual_seed(0)
    model = create_model("gpt_tiny", 256, context=32).eval()
    tokens = torch.randint(0, 256, (2, 32))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :20], before[:, :20], rtol=0, atol=1e-6)
    assert (after[:, 20:] - before[:, 20:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


def test_a_sequence_longer_than_the_context_is_refused() -> None:
    model = create_model("gpt_tiny", 256, context=8)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_the_default_selection_takes_the_projections_and_keeps_the_tied_embedding_dense() -> None:
    model = create_model("gpt_tiny", 256)
    assert list(sparsifiable_parameters(model)) == [f"blocks.{b}.{p}.weight" for b in range(4) for p in PROJECTIONS]
    # The head is the token embedding's weight, read a second time: its gradient sums both uses.
    tokens = torch.randint(0, 256, (1, 8))
    model(tokens).sum().backward()
    unused_rows = torch.ones(256, dtype=torch.bool)
    unused_rows[tokens.flatten()] = False
    assert model.token_embedding.weight.grad[unused_rows].abs().sum() > 0  # from the head alone


def test_documents_go_to_one_split_each_by_a_seeded_hash_of_their_names(tmp_path) -> None:
    write_text_folder(tmp_path)
    documents, skipped = folder_documents(tmp_path)
    assert skipped == ["image.bin"] and len(documents) == 30
    assert all(not doc.name.startswith(".") for doc in documents)
    splits = [split_of(doc.name, 0, 0.2, 0.2) for doc in documents]
    assert set(splits) == {"train", "val", "test"}
    # The split of a document depends on its name and the seed alone: not on the other documents, nor on the order.
    assert [split_of(doc.name, 0, 0.2, 0.2) for doc in reversed(documents)] == splits[::-1]
    assert splits != [split_of(doc.name, 1, 0.2, 0.2) for doc in documents]


def _module(folder, cache, **kwargs) -> TextDataModule:
    options = {"text_dir": str(folder), "context": 16, "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2,
               "cache_dir": str(cache)}
    return TextDataModule(**{**options, **kwargs})


def test_the_token_files_hold_each_splits_documents_in_order_and_are_reused(tmp_path) -> None:
    write_text_folder(tmp_path / "corpus")
    data = _module(tmp_path / "corpus", tmp_path / "cache")
    data.prepare_data()
    data.setup("fit")
    documents, _ = folder_documents(tmp_path / "corpus")
    expected = b"".join(doc.read() for doc in documents if split_of(doc.name, 0, 0.2, 0.2) == "train")
    assert bytes(data.train_set.tokens) == expected
    inputs, targets = data.train_set[1]
    assert inputs.dtype == torch.long and torch.equal(inputs[1:], targets[:-1])
    assert bytes(inputs.tolist()) == expected[16:32]
    assert len(data.train_set) == (len(expected) - 1) // 16
    corpus = data.corpus
    assert corpus["files"] == 30 and corpus["splits"]["train"]["bytes_per_token"] == 1.0
    assert len(corpus["digest"]) == 64 and corpus["source"] == str(tmp_path / "corpus")
    # The same corpus again: the same digest and the same cache; a changed document: another of each.
    again = _module(tmp_path / "corpus", tmp_path / "cache")
    again.prepare_data()
    assert again.corpus == corpus and len(list((tmp_path / "cache").iterdir())) == 1
    (tmp_path / "corpus" / "doc00.py").write_text("changed")
    changed = _module(tmp_path / "corpus", tmp_path / "cache")
    changed.prepare_data()
    assert changed.corpus["digest"] != corpus["digest"] and len(list((tmp_path / "cache").iterdir())) == 2


def test_one_file_is_cut_into_documents_at_line_ends(tmp_path) -> None:
    text = "".join(f"line {index} " + "x" * 50 + "\n" for index in range(5000))  # about 300 KB
    (tmp_path / "book.txt").write_text(text)
    documents, _ = folder_documents(tmp_path / "book.txt")
    assert len(documents) > 3 and all(doc.read().endswith(b"\n") for doc in documents)
    assert b"".join(doc.read() for doc in documents) == text.encode()
    assert all(doc.size >= 1 << 16 for doc in documents[:-1])  # FILE_PIECE_BYTES and on to the line's end


@pytest.mark.parametrize("layout", ["files", "one file", "a folder of one file"])
def test_tokenizing_holds_one_document_at_a_time_not_the_corpus(tmp_path, layout: str) -> None:
    """A 4 MB corpus (40 files, one file cut into pieces of 64 KiB, or a folder holding one 4 MB document) is
    checked, digested and tokenized at byte level with well under a megabyte of Python memory at its peak: neither
    the corpus nor a document is read whole."""
    import tracemalloc

    line = "def f(x):  return x + 1  # " + "y" * 72 + "\n"  # 100 bytes
    (tmp_path / "corpus").mkdir()
    for index in range(40 if layout == "files" else 1):
        (tmp_path / "corpus" / f"doc{index:02d}.py").write_text(line * (1000 if layout == "files" else 40_000))
    data = _module(tmp_path / "corpus" / "doc00.py" if layout == "one file" else tmp_path / "corpus",
                   tmp_path / "cache", val_fraction=0.0, test_fraction=0.0)
    tracemalloc.start()
    try:
        data.prepare_data()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.corpus["bytes"] == 4_000_000
    assert peak < 1_000_000, peak


@pytest.mark.parametrize(("setup", "message"), [
    (lambda folder: None, "does not exist"),
    (lambda folder: folder.mkdir(), "holds no text"),
    (lambda folder: (folder.mkdir(), (folder / "a.bin").write_bytes(b"\x00\xff" * 10)), r"holds no text.*1 other"),
])
def test_a_missing_empty_or_binary_folder_is_a_clear_error(tmp_path, setup, message) -> None:
    setup(tmp_path / "corpus")
    with pytest.raises(ConfigError, match=message):
        _module(tmp_path / "corpus", tmp_path / "cache").prepare_data()


def test_a_split_without_a_window_says_what_to_change(tmp_path) -> None:
    write_text_folder(tmp_path / "corpus", documents=3, size=40)
    data = _module(tmp_path / "corpus", tmp_path / "cache", context=200, val_fraction=0.0, test_fraction=0.0)
    data.prepare_data()
    with pytest.raises(ConfigError, match="train split holds .* a smaller data.context"):
        data.setup("fit")


def test_a_held_out_split_without_a_window_is_refused_before_training(tmp_path) -> None:
    """A test split too small for one window is refused at setup for fit, not after training."""
    write_text_folder(tmp_path / "corpus", documents=30, size=40)
    data = _module(tmp_path / "corpus", tmp_path / "cache", context=64, val_fraction=0.0, test_fraction=0.04)
    data.prepare_data()
    assert 0 < data.corpus["splits"]["test"]["tokens"] <= 64 < data.corpus["splits"]["train"]["tokens"]
    with pytest.raises(ConfigError, match=r"test split holds .* a larger data.test_fraction.*or data.test_fraction 0 "
                       r"for no test split \(with --test_after_fit false\)"):
        data.setup("fit")


def test_without_a_test_split_the_command_refuses_to_test_after_fit(tmp_path, monkeypatch, capsys) -> None:
    write_text_folder(tmp_path / "corpus", documents=60)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train_recipe("dense", "--data.test_fraction", "0")
    assert exit_info.value.code == 2
    assert "data.test_fraction is 0" in capsys.readouterr().err and not Path("runs").exists()
    train_recipe("dense", "--data.test_fraction", "0", "--test_after_fit", "false")  # trains


def test_a_named_tokenizer_trains_through_the_command_with_its_vocabulary_and_separated_documents(
        tmp_path, monkeypatch) -> None:
    """A Hugging Face tokenizer (a local folder): the model's vocabulary is the tokenizer's, each document ends
    with its end-of-text token in the token files, and bits per byte are bits per token over bytes per token."""
    write_text_folder(tmp_path / "corpus", documents=60)
    tokenizer = write_tokenizer(tmp_path / "tokenizer")
    monkeypatch.chdir(tmp_path)
    folder = train_recipe("dense", "--data.tokenizer", "tokenizer", "--trainer.callbacks+",
                          "pytorch_lightning.callbacks.ModelCheckpoint")
    (checkpoint,) = (folder / "checkpoints").glob("*.ckpt")
    weights = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert weights["net.token_embedding.weight"].shape[0] == 14  # 12 words, unknown, end of text
    record = json.loads((folder / "results.json").read_text())
    test = record["corpus"]["splits"]["test"]
    assert record["test"]["test/bits_per_byte"] == pytest.approx(
        record["test"]["test/bits_per_token"] / test["bytes_per_token"], rel=1e-5)
    data = _module("corpus", "cache", tokenizer=str(tokenizer), context=32)
    data.prepare_data()
    data.setup("fit")
    from transformers import AutoTokenizer

    words = AutoTokenizer.from_pretrained(tokenizer)
    documents = [doc for doc in folder_documents(Path("corpus"))[0] if split_of(doc.name, 0, 0.2, 0.2) == "train"]
    expected = [token for doc in documents
                for token in words(doc.read().decode(), add_special_tokens=False)["input_ids"] + [1]]
    assert data.train_set.tokens.tolist() == expected and expected.count(1) == len(documents)


def test_a_contiguous_split_cuts_documents_read_as_one_text(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"0123456789")
    (tmp_path / "b").write_bytes(b"abcd\nfghij")
    (tmp_path / "c").write_bytes(b"one two three four")
    two = [Document("a", tmp_path / "a", 0, 10), Document("b", tmp_path / "b", 0, 10)]
    # A quarter each held out of 20 bytes: cuts at bytes 10 and 15; at spaces, at 15 and 20 (b's end, no space).
    for at_spaces, expected in ((False, [b"0123456789", b"abcd\n", b"fghij"]),
                                (True, [b"0123456789abcd\n", b"fghij", b""])):
        splits = contiguous_splits(two, 0.25, 0.25, at_spaces)
        assert [b"".join(doc.read() for doc in splits[split]) for split in ("train", "val", "test")] == expected
    # One line, as text8 is: 18 bytes, cuts at 9 and 14 move past the next space (at 13, and none: the end).
    splits = contiguous_splits([Document("c", tmp_path / "c", 0, 18)], 0.25, 0.25, at_spaces=True)
    assert [b"".join(doc.read() for doc in splits[split]) for split in ("train", "val", "test")] == [
        b"one two three ", b"four", b""]
    # Only the part of a document that reaches its end ends it (a named tokenizer's separator goes there).
    splits = contiguous_splits(two, 0.25, 0.25, at_spaces=False)
    assert [(doc.name, doc.ends_document) for split in ("train", "val", "test") for doc in splits[split]] == [
        ("a", True), ("b", False), ("b", True)]


def test_a_contiguous_split_gives_enwik8s_split_of_one_file(tmp_path) -> None:
    """One file of 100,000 bytes cut 90/5/5 at byte level, whatever its bytes (it ends inside a character, as
    enwik8 does); with a named tokenizer, each cut moves past the next space or line end, and the file, one text
    cut in pieces for its size, gets no separator; the seed plays no part."""
    rng = np.random.default_rng(0)
    text = b"".join(b" ".join(rng.choice([b"def", b"x", b"(", b")"], 9)) + b"\n" for _ in range(6000))
    data = (text[:99_999] + "é".encode())[:100_000]
    (tmp_path / "enwik").write_bytes(data)
    byte = _module(tmp_path / "enwik", tmp_path / "cache", split="contiguous", val_fraction=0.05, test_fraction=0.05)
    byte.prepare_data()
    byte.setup("fit")
    byte.setup("test")
    assert bytes(byte.train_set.tokens) == data[:90_000] and bytes(byte.val_set.tokens) == data[90_000:95_000]
    assert bytes(byte.test_set.tokens) == data[95_000:] and byte.corpus["split"] == "contiguous"
    other_seed = _module(tmp_path / "enwik", tmp_path / "cache", split="contiguous", val_fraction=0.05,
                         test_fraction=0.05, seed=1)
    other_seed.prepare_data()
    assert other_seed.corpus == byte.corpus and len(list((tmp_path / "cache").iterdir())) == 1
    (tmp_path / "text").write_bytes(text)
    named = _module(tmp_path / "text", tmp_path / "cache", split="contiguous", val_fraction=0.05,
                    test_fraction=0.05, tokenizer=str(write_tokenizer(tmp_path / "tokenizer")))
    named.prepare_data()
    named.setup("fit")
    sizes = [named.corpus["splits"][split]["bytes"] for split in ("train", "val", "test")]
    cuts = [sizes[0], sizes[0] + sizes[1]]
    assert all(text[:cut].endswith((b" ", b"\n")) and 0 <= cut - at < 4 for cut, at in zip(
        cuts, (round(0.9 * len(text)), round(0.95 * len(text)))))
    assert 1 not in named.train_set.tokens.tolist()


def test_the_cache_knows_a_tokenizer_by_what_it_does_not_by_its_name(tmp_path) -> None:
    """The same tokenizer in another folder shares the token files; one rewritten in place does not, and a run
    trained with the first does not resume with the second. Without an end-of-text token, documents are not
    separated, with a warning."""
    write_text_folder(tmp_path / "corpus")

    def prepared(tokenizer: Path) -> TextDataModule:
        data = _module(tmp_path / "corpus", tmp_path / "cache", tokenizer=str(tokenizer))
        data.prepare_data()
        return data

    first = prepared(write_tokenizer(tmp_path / "a"))
    assert prepared(write_tokenizer(tmp_path / "b")).corpus == first.corpus
    assert len(list((tmp_path / "cache").iterdir())) == 1
    rewritten = prepared(write_tokenizer(tmp_path / "a", reverse=True))
    assert len(list((tmp_path / "cache").iterdir())) == 2 and rewritten._identity() != first._identity()
    assert rewritten._identity()["tokenizer"] != first._identity()["tokenizer"]
    with pytest.warns(UserWarning, match="no end-of-sequence token: documents follow one another"):
        plain = prepared(write_tokenizer(tmp_path / "plain", eos=False))
    plain.setup("fit")
    assert 1 not in plain.train_set.tokens.tolist()  # nor the one its encoding with special tokens appends


def test_the_corpus_is_read_once_a_process(tmp_path, monkeypatch) -> None:
    import lightning_rigl.data.text as text

    digests = []
    monkeypatch.setattr(text, "_digest", lambda documents: digests.append(1) or "0" * 64)
    write_text_folder(tmp_path / "corpus")
    data = _module(tmp_path / "corpus", tmp_path / "cache")
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    assert len(digests) == 1


def test_a_tokenizer_that_cannot_be_loaded_is_refused_at_construction(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="could not load the tokenizer"):
        _module(tmp_path, tmp_path / "cache", tokenizer=str(tmp_path / "empty"))


def test_training_resumes_only_on_the_checkpoints_corpus(tmp_path) -> None:
    """A checkpoint of the corpus resumes on it; after a document changed, resuming training is refused with a
    message, while validating the checkpoint on the changed corpus is allowed."""
    trainer, model, data = _train(tmp_path, [], steps=2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")

    def trainer_for(steps: int) -> pl.Trainer:
        return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)

    trainer_for(3).fit(model, _module(tmp_path / "corpus", tmp_path / "cache"), ckpt_path=tmp_path / "two.ckpt")
    (tmp_path / "corpus" / "doc00.py").write_text("def x\n" * 200)
    with pytest.raises(ConfigError, match=r"other data than this run's \(digest '[0-9a-f]+' then, '[0-9a-f]+' now\)"):
        trainer_for(3).fit(model, _module(tmp_path / "corpus", tmp_path / "cache"), ckpt_path=tmp_path / "two.ckpt")
    with pytest.raises(ConfigError, match="seed 0 then, 1 now"):
        trainer_for(3).fit(model, _module(tmp_path / "corpus", tmp_path / "cache", seed=1),
                           ckpt_path=tmp_path / "two.ckpt")
    trainer_for(3).validate(model, _module(tmp_path / "corpus", tmp_path / "cache"), ckpt_path=tmp_path / "two.ckpt")


@pytest.mark.parametrize(("option", "value"), [("context", 0), ("val_fraction", 1.0), ("test_fraction", -0.1),
                                               ("split", "random")])
def test_bad_settings_fail_at_construction(tmp_path, option, value) -> None:
    with pytest.raises(ConfigError, match=f"data.{option}"):
        _module(tmp_path, tmp_path / "cache", **{option: value})


def test_the_default_corpus_is_the_standard_library_without_tests_or_packages() -> None:
    names = [doc.name for doc in stdlib_documents()]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(part in ("test", "tests", "site-packages") for name in names for part in name.split("/")[:-1])
    assert not any(name.split("/")[-1].startswith("test_") for name in names)


def _train(tmp_path, callbacks, steps: int = 6, **model_kwargs) -> tuple[pl.Trainer, CausalLM, TextDataModule]:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_text_folder(corpus)
    data = _module(corpus, tmp_path / "cache")
    torch.manual_seed(0)
    model = CausalLM(context=16, width=0.25, lr=3e-3, **model_kwargs)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                         val_check_interval=steps, num_sanity_val_steps=0, limit_val_batches=4)
    trainer.fit(model, data)
    return trainer, model, data


def test_causal_lm_reports_loss_perplexity_and_bits(tmp_path) -> None:
    trainer, model, data = _train(tmp_path, [])
    metrics = trainer.callback_metrics
    loss = float(metrics["val/loss"])
    assert 0 < loss < math.log(256) + 1  # about log(256) at the start, lower after a few steps
    assert float(metrics["val/perplexity"]) == pytest.approx(math.exp(loss), rel=1e-5)
    assert float(metrics["val/bits_per_token"]) == pytest.approx(loss / math.log(2), rel=1e-5)
    assert float(metrics["val/bits_per_byte"]) == pytest.approx(loss / math.log(2), rel=1e-5)  # a byte a token
    # The loss is the mean over every validation token: the batches' losses weighted by their token counts.
    losses, counts = [], []
    with torch.no_grad():
        for inputs, targets in trainer.val_dataloaders:
            losses.append(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), reduction="sum"))
            counts.append(targets.numel())
            if len(counts) == 4:
                break
    assert loss == pytest.approx(float(sum(losses)) / sum(counts), rel=1e-5)


@pytest.mark.parametrize("method", [name for name in METHODS if name != "lottery"])  # its ticket is TinyNet's
def test_every_method_trains_a_gpt_with_exact_counts_dead_weights_and_clean_optimizer_state(tmp_path,
                                                                                            method: str) -> None:
    sparse = METHODS[method]()
    trainer, model, _ = _train(tmp_path, [sparse], steps=10)
    assert set(sparse.masks) == {f"net.blocks.{b}.{p}.weight" for b in range(4) for p in PROJECTIONS}
    assert sparse.num_updates > 0 or method == "static"
    assert_masks_hold(sparse, model, trainer.optimizers[0])


def test_a_sparsified_tied_embedding_has_one_mask_for_both_uses(tmp_path) -> None:
    """Named with ``include``, the tied weight gets one mask; the lookup and the head read the same masked
    matrix, so a token's dead embedding entries are dead in its output row too."""
    sparse = Static(distribution={"net.token_embedding.weight": 0.5}, include=["net.token_embedding.weight"])
    _, model, _ = _train(tmp_path, [sparse], steps=4)
    assert list(sparse.masks) == ["net.token_embedding.weight"]
    mask, weight = sparse.masks["net.token_embedding.weight"], model.net.token_embedding.weight
    assert int(mask.sum()) == weight.numel() // 2 and not weight[~mask].any()
    hidden = torch.randn(1, 3, weight.shape[1])
    head = F.linear(hidden, weight)  # what GPT.forward computes from the last hidden state
    torch.testing.assert_close(head, hidden @ (weight * mask).t())


def test_sparse_kernels_and_the_live_step_train_a_gpt(tmp_path) -> None:
    sparse = RigL(sparsity=0.9, update_interval=4, kernels="sparse")
    _train(tmp_path, [sparse], steps=8)
    assert sparse.live_step_used == "live weights"
    assert all(used == "native" for used in sparse.kernels_used.values())


LM_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "python_gpt_tiny"


def train_recipe(recipe: str, *args: str) -> Path:
    """A recipe of python_gpt_tiny as written, shortened, through the command on the text folder ``corpus`` of
    the working folder: 8 steps of 4 windows of 32 bytes, validated twice. Returns the run's folder."""
    from lightning_rigl.cli import main

    dynamic = ["--trainer.callbacks.init_args.update_interval", "3", "--trainer.callbacks.init_args.stop_at", "7"] \
        if recipe.startswith(("set", "rigl", "srigl")) else []
    main(["fit", "--config", str(LM_RECIPES / f"{recipe}.yaml"), "--data.text_dir", "corpus", "--data.cache_dir",
          "cache", "--data.context", "32", "--data.batch_size", "4", "--trainer.max_steps", "8",
          "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
          "false", *dynamic, *args])
    version = next((value for key, value in zip(args, args[1:]) if key == "--trainer.logger.init_args.version"),
                   "version_0")
    return Path("runs", "python_gpt_tiny", recipe, version)


@pytest.mark.parametrize("recipe", ["dense", "static_erk_s90", "set_uniform_s75", "rigl_erk_s90", "srigl_erk_s90"])
def test_the_gpt_recipes_train_through_the_command(tmp_path, monkeypatch, capsys, recipe: str) -> None:
    """Each method's recipe as written, on a small text folder, shortened: the summary's language-model line,
    results.json's corpus and costs, and the checkpoint's masks exact with their weights 0."""
    write_text_folder(tmp_path / "corpus", documents=60)
    monkeypatch.chdir(tmp_path)
    train_recipe(recipe)
    out = capsys.readouterr().out
    assert re.search(r"test: loss \d+\.\d{4} nats per token, perplexity \d+\.\d{3}, \d+\.\d{4} bits per byte", out)
    folder = Path("runs", "python_gpt_tiny", recipe, "version_0")
    record = json.loads((folder / "results.json").read_text())
    assert record["corpus"]["source"] == "corpus" and len(record["corpus"]["digest"]) == 64
    assert record["test"]["test/bits_per_byte"] > 0 and record["forward_flops_per_token"] > 0
    # Dense runs are timed too: tokens per second is a batch's tokens over the median batch time.
    assert record["tokens_per_second"] == pytest.approx(4 * 32 / (record["step_ms"] / 1e3))  # 4 windows of 32
    per_token = re.search(r"per token: inference (\d+\.\d\d) MFLOPs, training (\d+\.\d\d) MFLOPs, ([\d,]+) tokens/s "
                          r"trained", out)
    assert per_token and float(per_token[1]) == pytest.approx(record["forward_flops_per_token"] / 1e6, abs=0.006)
    assert int(per_token[3].replace(",", "")) == round(record["tokens_per_second"])
    assert re.search(r"an optimizer step took \d+\.\d\d ms \(median of 8,", out)
    if recipe == "dense":
        assert record["forward_flops_per_token"] == pytest.approx(record["train_flops_per_token"] / 3)
        return
    assert record["forward_flops_per_token"] < record["train_flops_per_token"] / 3 * 1.01
    (checkpoint,) = (folder / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, weights_only=False)
    masks = saved_state(state)["masks"]
    assert len(masks) == 24
    for name, mask in masks.items():
        assert not state["state_dict"][name][~mask].any(), name


def test_under_gradient_accumulation_a_step_is_timed_with_all_its_batches(tmp_path, monkeypatch, capsys) -> None:
    """Two batches a step: eight optimizer steps timed from their first batch's start to their last's end, and
    tokens per second counting both batches' tokens."""
    write_text_folder(tmp_path / "corpus", documents=60)
    monkeypatch.chdir(tmp_path)
    record = json.loads((train_recipe("rigl_erk_s90", "--trainer.accumulate_grad_batches", "2") / "results.json")
                        .read_text())
    assert re.search(r"an optimizer step took \d+\.\d\d ms \(median of 8,", capsys.readouterr().out)
    assert record["tokens_per_second"] == pytest.approx(2 * 4 * 32 / (record["step_ms"] / 1e3))


def test_the_report_of_language_model_runs_shows_their_bits_per_byte_in_the_table_and_the_figures(
        tmp_path, monkeypatch) -> None:
    """Two seeds of a sparse recipe and a dense run: the report's language-model columns (the final validation's
    bits per byte read from the run's log, the test's from its record), no accuracy column, and figures of test
    bits per byte against sparsity and training FLOPs that plot each row's mean; the run records keep them."""
    from lightning_rigl.report import collect, figures, markdown_table, read_records, write_records

    write_text_folder(tmp_path / "corpus", documents=60)
    monkeypatch.chdir(tmp_path)
    dense = train_recipe("dense")
    sparse = [train_recipe("static_erk_s90", "--seed_everything", str(seed), "--trainer.callbacks.init_args.seed",
                           str(seed), "--trainer.logger.init_args.version", f"seed_{seed}") for seed in (0, 1)]
    report = collect(["runs"])
    dense_row, static_row = report.rows
    logged = [[float(line["val/bits_per_byte"]) for line in csv.DictReader((folder / "metrics.csv").open())
               if line["val/bits_per_byte"]] for folder in (dense, *sparse)]
    assert all(len(values) == 2 for values in logged)  # validated at steps 4 and 8: the report takes the last
    assert dense_row.mean_std("val_bits_per_byte")[0] == pytest.approx(logged[0][-1])
    assert static_row.mean_std("val_bits_per_byte")[:2] == pytest.approx(
        (statistics.fmean([logged[1][-1], logged[2][-1]]), statistics.stdev([logged[1][-1], logged[2][-1]])))
    header = markdown_table(report.rows).splitlines()[0]
    assert "val bits/byte" in header and "test bits/byte" in header and "test top-1" not in header
    drawn = figures(report.rows)
    assert {"bits_per_byte_vs_sparsity.png", "bits_per_byte_vs_training_flops.png",
            "bits_per_byte_over_training.png"} <= set(drawn)
    (over_training,) = drawn["bits_per_byte_over_training.png"].axes
    assert {drawn.get_label(): list(drawn.lines[0].get_ydata()) for drawn in over_training.containers} == {
        "Dense": pytest.approx(logged[0]),
        "Static erk": pytest.approx([statistics.fmean(pair) for pair in zip(logged[1], logged[2])])}
    assert not any(name.startswith("accuracy") for name in drawn)
    test_mean = static_row.mean_std("test_bits_per_byte")[0]
    for name in ("bits_per_byte_vs_sparsity.png", "bits_per_byte_vs_training_flops.png"):
        plotted = [float(y) for axes in drawn[name].axes for line in axes.get_lines() for y in line.get_ydata()]
        assert any(y == pytest.approx(test_mean) for y in plotted), name
    again = read_records(write_records([run for row in report.rows for run in row.runs], tmp_path / "records.json"))
    assert all(set(run.record["validation_curves"]) == {"bits_per_byte"} for run in again)  # what is drawn, no more
    for key in ("validation", "validation_curves"):
        assert [run.record[key] for run in again] == [run.record[key] for row in report.rows for run in row.runs]


def test_a_gpt_run_resumed_from_the_middle_ends_where_the_uninterrupted_one_does(tmp_path, monkeypatch) -> None:
    """The RigL recipe with dropout in every block, through the command: 8 steps straight, and 8 steps resumed
    from the checkpoint of step 4 (mask updates at 3 and 6, on both sides); the same weights bit for bit."""
    from lightning_rigl.cli import main

    write_text_folder(tmp_path / "corpus", documents=60)
    monkeypatch.chdir(tmp_path)
    for run in ("straight", "resumed"):
        overlay = tmp_path / f"{run}.yaml"
        overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [
            {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": f"{run}/checkpoints", "filename": "{step}", "every_n_train_steps": 4,
                           "save_top_k": -1}},
            {"class_path": "lightning_rigl.RigL",
             "init_args": {"sparsity": 0.9, "distribution": "erk", "update_interval": 3, "stop_at": 7}}]}}))
        resume = ["--ckpt_path", "straight/checkpoints/step=4.ckpt"] if run == "resumed" else []
        main(["fit", "--config", str(LM_RECIPES / "rigl_erk_s90.yaml"), "--config", str(overlay),
              "--data.text_dir", "corpus", "--data.cache_dir", "cache", "--data.context", "32",
              "--data.batch_size", "4", "--model.arch_kwargs", '{"dropout": 0.1}', "--trainer.max_steps", "8",
              "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false", "--test_after_fit",
              "false", "--trainer.logger.init_args.save_dir", f"{run}/runs", *resume])
    straight, resumed = (torch.load(f"{run}/checkpoints/step=8.ckpt", weights_only=False) for run in ("straight",
                                                                                                     "resumed"))
    assert saved_state(straight)["num_updates"] == 2
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def test_a_loader_worker_maps_the_token_file_instead_of_receiving_a_copy(tmp_path) -> None:
    import pickle

    write_text_folder(tmp_path / "corpus")
    data = _module(tmp_path / "corpus", tmp_path / "cache")
    data.prepare_data()
    data.setup("fit")
    windows = data.train_set
    first = windows[0]
    assert len(pickle.dumps(windows)) < 1000 < len(bytes(windows.tokens))
    copy = pickle.loads(pickle.dumps(windows))
    assert all(torch.equal(a, b) for a, b in zip(copy[0], first))
