"""A Hugging Face causal language model in your own LightningModule: pruned one-shot from its weights (Wanda),
fine-tuned sparse with every zero kept, saved with ``save_pretrained`` and loaded back with its zeros.

    python docs/examples/huggingface_causal_lm.py [--model gpt2|llama|NAME] [--text-dir DIR] [--sparsity 0.5]
                                                 [--pretrain-steps 300] [--max-steps 300] [--output hf_sparse]

``--model gpt2`` or ``llama`` builds a small model from a config (no download) and first trains it dense for
``--pretrain-steps`` on the text, as a stand-in for pretrained weights; any other value is a model name or
folder that ``AutoModelForCausalLM.from_pretrained`` finds (the local Hugging Face cache), whose tokenizer then
reads the text. The text is ``--text-dir`` (a folder of text files), or this Python's standard library source.
Nothing here is specific to lightning-rigl but the callback: any LightningModule with one optimizer works.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from lightning_rigl import Static
from lightning_rigl.data import TextDataModule

SMALL_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                                               bos_token_id=0, eos_token_id=0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=256, max_position_embeddings=128, hidden_size=128,
                                                  intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                                                  bos_token_id=0, eos_token_id=0, pad_token_id=0)),
}


class HFCausalLM(pl.LightningModule):
    """Any ``transformers`` causal LM, trained on next-token cross-entropy with AdamW."""

    def __init__(self, model: PreTrainedModel, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, next_tokens = batch  # the data module's windows and the same shifted by one token
        logits = self.model(input_ids=tokens).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), next_tokens.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def trainer(max_steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      limit_val_batches=10, val_check_interval=max_steps, enable_model_summary=False,
                      accelerator="auto", devices=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="gpt2 or llama (small, from a config) or a model name")
    parser.add_argument("--text-dir", default=None, help="a folder of text files (default: the stdlib source)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pretrain-steps", type=int, default=300, help="dense training first (small models only)")
    parser.add_argument("--max-steps", type=int, default=300, help="sparse fine-tuning steps")
    parser.add_argument("--output", default="hf_sparse", help="where save_pretrained writes the model")
    args = parser.parse_args()

    small = args.model in SMALL_MODELS
    model = SMALL_MODELS[args.model]() if small else AutoModelForCausalLM.from_pretrained(args.model)
    data = TextDataModule(text_dir=args.text_dir, tokenizer="byte" if small else args.model, context=128,
                          batch_size=8)
    module = HFCausalLM(model)
    if small:
        trainer(args.pretrain_steps, []).fit(module, data)

    # One line: prune the trained weights by Wanda's score (8 calibration batches), then fine-tune, zeros kept.
    sparse = Static(sparsity=args.sparsity, start="wanda")
    fine_tuning = trainer(args.max_steps, [sparse])
    fine_tuning.fit(module, data)
    val_loss = float(fine_tuning.callback_metrics["val/loss"])
    print(f"fine-tuned at sparsity {1 - sparse.global_density():.4f} of {len(sparse.masks)} layers: "
          f"validation loss {val_loss:.4f} nats per token")

    module.model.save_pretrained(args.output)
    loaded = type(module.model).from_pretrained(args.output)
    zeros_kept = all(not loaded.get_parameter(name.removeprefix("model."))[~mask.cpu()].any()
                     for name, mask in sparse.masks.items())
    print(f"saved to {Path(args.output).resolve()}; loaded back with every zero: {zeros_kept}")


if __name__ == "__main__":
    main()
