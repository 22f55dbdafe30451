"""The shared machinery of every sparse callback: masks, gradient masking, checkpoints, DDP agreement, logging."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_rigl.callbacks.agreement import check_digests_agree, check_masks_agree
from lightning_rigl.checkpoints import SHARDED_TENSORS, load_sharded_tensors, sharded_key
from lightning_rigl.errors import ConfigError
from lightning_rigl.flops import TrainingFlops, model_size_bytes
from lightning_rigl.kernels import KERNEL_MODES, TrainingKernels
from lightning_rigl.kernels.live_step import why_no_live_step
from lightning_rigl.kernels.training import plan_from_state, plan_state
from lightning_rigl.sparsity.distributions import (
    GLOBAL,
    Distribution,
    check_distribution,
    densities_for_shapes,
    global_live_total,
    live_count,
)
from lightning_rigl.sparsity.masks import apply_mask, mask_digest, random_masks, top_masks
from lightning_rigl.sparsity.parallel import for_each_layer
from lightning_rigl.sparsity.sharding import (
    gather,
    is_sharded,
    local,
    shard_like,
    unsupported_sharding,
    write_local,
)
from lightning_rigl.sparsity.structure import Structure, oriented, parse_structure
from lightning_rigl.sparsity.targets import (
    neurons_in_columns,
    resolve_custom,
    resolve_patterns,
    sparsifiable_parameters,
)
from lightning_rigl.sparsity.updates import prune_globally
from lightning_rigl.sparsity.wanda import input_norms, linear_layers, wanda_score

Result = TypeVar("Result")

# Strategies that shard or wrap parameters in ways the callbacks cannot mask; ModelParallelStrategy with
# fully_shard (FSDP2) is supported.
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")

# The key of every lightning-rigl callback's state in a checkpoint: stable across renames and shared by all
# methods, so that a LotteryTicket (or a resumed run) finds the masks whatever class wrote them.
STATE_KEY = "lightning_rigl"
# Where a fresh run's masks come from: random positions, or the largest scores of trained weights.
STARTS = ("random", "magnitude", "wanda")


# Names of the logged metrics, also read back from metrics.csv by the command and the report.
GLOBAL_DENSITY = "sparsity/density"
LAYER_DENSITY = "sparsity/density/"  # followed by the parameter's name
FORWARD_RATIO = "flops/forward_ratio"
TRAIN_RATIO = "flops/train_ratio"
SIZE_BYTES = "size/bytes"


def saved_state(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The lightning-rigl state (masks, densities, ...) in a loaded Lightning checkpoint; None without one."""
    return checkpoint.get("callbacks", {}).get(STATE_KEY)


class SparseTraining(Callback, ABC):
    """The machinery every method shares; a method states only when and how its masks change.

    This class owns the masks (``masks``: parameter name → bool tensor, True for a live weight), the per-layer
    targets (``densities``), keeps dead weights at exactly 0 (gradients masked with ``torch.where`` before
    every optimizer step, optimizer state zeroed wherever a mask changes), stores masks and densities in
    checkpoints and checks that DDP ranks agree. A method overrides ``update_masks`` (called once per
    optimizer step, on the accumulated, all-reduced, unscaled gradients, before the gradients are masked),
    and optionally ``start_densities`` (dense-start methods) or ``initial_masks``.

    Under FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``) each mask is a DTensor
    sharded like its parameter, as is every per-weight state of a method (``per_weight_state``); a method reads
    a layer whole inside ``whole_layer`` and decides exactly as one process would.

    Args:
        sparsity: target fraction of zeros over all sparsified weights, 0 <= S < 1. Leave unset (None) when
            ``distribution`` is a mapping.
        distribution: "uniform" (every layer at S, the first sparsified layer dense), "er", "erk", or a
            mapping from parameter name to that layer's sparsity.
        dense: glob patterns over parameter names kept dense. Under ER/ERK they still count against the
            sparsity budget, so the other layers become sparser.
        include: glob patterns that replace the default selection (every conv and linear ``weight``).
        exclude: glob patterns removed from the selection: dense, and outside the budget.
        custom_sparsity: glob pattern -> sparsity for layers whose sparsity is fixed, outside the budget; the
            distribution spreads the sparsity over the other layers (the official ``custom_sparsity_map``).
        erk_power_scale: exponent on the raw ERK score (the official flag): 1 is ERK, 0 puts every layer at the
            sparsity, values in between interpolate. Only with distribution="erk" (the official code ignores it
            under ER).
        structure: where live weights may sit in each sparse layer: None (anywhere), "N:M" (at most N live
            weights in every M consecutive weights of a neuron, "2:4" say) or "constant_fan_in" (every neuron
            holds the same number of live weights; a layer's count rounds down to a whole fan-in). Held at
            initialisation and by every mask change. Static, SET and RigL only; layers kept dense stay dense.
        start: where a fresh run's masks come from. "random": random positions (the paper's sparse
            initialisation, seeded by ``seed``). "magnitude": the largest |w| of the weights the model holds at the
            start of fit, such as pretrained ones (a one-shot magnitude pruning, then training that keeps the
            zeros: Static, or goes on with the method's updates): each layer keeps its count under the
            distribution (within the structure), or, with ``distribution="global"``, the largest |w| across all
            layers (each keeps at least one) decide each layer's share. "wanda": the same with Wanda's score
            |w|·‖x‖ (Sun et al., ICLR 2024), each weight times the L2 norm of the input feature it reads over the
            first ``calibration_batches`` training batches (run through ``training_step`` in eval mode without
            gradients, all processes' under DDP); linear layers only (``nn.Linear``, Hugging Face's ``Conv1D``). Wanda's
            paper compares weights within each output neuron: ``structure="constant_fan_in"`` does that. Methods
            that start dense (pruning, SNIP) or from a ticket take no ``start``.
        calibration_batches: training batches whose inputs give ``start="wanda"`` its norms (>= 1).
        rewind_step: keep a CPU copy of every parameter of the model as it is after this many optimizer steps
            (0: the initialisation) in the checkpoint, for a ``LotteryTicket`` to rewind to; None keeps none.
            Under FSDP2 each process keeps its shard of each parameter, on the parameter's device.
        seed: seeds the initial masks and every random choice; identical on all ranks.
        kernels: how the sparse layers compute between mask updates. "dense": the masked dense weight, as every
            peer does. "sparse": every masked ``nn.Linear`` and 1×1 convolution computes its output, its input's
            gradient and its weight's gradient from the live weights only (``lightning_rigl.kernels``); steps
            whose mask decision reads the dense gradient compute that gradient dense. "auto": each of those three
            parts of each layer runs whichever way, dense or sparse, was faster on this run's own tensors
            (timed at the first step, and again when a layer's live count moves by a tenth): never slower than
            dense. Same function to float tolerance; the module, its state dict and checkpoints are unchanged.
        live_step: with sparse kernels, on steps that neither read the dense gradient nor may change the masks,
            keep each sparse layer's weight gradient as its live values only and apply the optimizer's rule to
            the live weights only, right after the optimizer's own step (``lightning_rigl.kernels.live_step``): no
            dense gradient and no optimizer pass over the dead weights. The weight's ``.grad`` is then None on
            those steps. It turns itself off (dense gradients, as with False) for an optimizer whose rule is not
            per weight, under DDP (which all-reduces ``.grad``) and with Lightning's gradient clipping. Set False
            for code of your own that reads those ``.grad`` (clipping or logging in a hook).

    Raises:
        ValueError: sparsity outside [0, 1), an unknown distribution, a bad mapping or structure (here); a
            pattern that matches nothing, nothing to sparsify, or a request the distribution or the structure
            cannot hold (at setup, before training).
        ConfigError: the FSDP1 or DeepSpeed strategies, or tensor parallelism (at setup); kernels="sparse" where
            sparse kernels cannot run (FSDP2, torch.compile, a precision other than 32-bit, a method that reads
            the dense gradient at every step or starts dense; at fit start).
        RuntimeError: manual optimization (so there is one optimizer: Lightning refuses several under
            automatic optimization), or a sparsified parameter the optimizer does not train (before the first
            step).
        MaskDisagreementError: DDP processes hold different masks (at fit start or after a change): a bug,
            raised on every process at once instead of training replicas that drift apart.
    """

    supports_global: ClassVar[bool] = False  # whether distribution="global" means something for this method
    reads_gradients: ClassVar[bool] = False  # whether mask decisions read gradients (they must be unscaled)
    supports_structure: ClassVar[bool] = False  # whether the method can keep its masks within a ``structure``
    supports_start: ClassVar[bool] = True  # whether the method starts from a sparse mask of its own (``start``)

    def __init__(
        self,
        sparsity: float | None = None,
        distribution: Distribution = "erk",
        *,
        dense: Sequence[str] = (),
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        custom_sparsity: Mapping[str, float] | None = None,
        erk_power_scale: float = 1.0,
        structure: str | None = None,
        start: str = "random",
        calibration_batches: int = 8,
        rewind_step: int | None = None,
        seed: int = 0,
        kernels: str = "dense",
        live_step: bool = True,
    ) -> None:
        super().__init__()
        if start not in STARTS:
            raise ConfigError(f"start must be one of {STARTS}, got {start!r}.")
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) \
                or calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be an int >= 1 (training batches), got "
                              f"{calibration_batches!r}.")
        self.calibration_batches = calibration_batches
        if start != "random" and not self.supports_start:
            raise ConfigError(f"{type(self).__name__} does not start from a mask of its own (it starts dense, or "
                              f"from its ticket): start={start!r} is for Static, SET, RigL and the other methods "
                              "that start sparse. Leave start unset.")
        self.start = start
        check_distribution(sparsity, distribution, allow_global=self.supports_global or start != "random",
                           custom_sparsity=custom_sparsity, erk_power_scale=erk_power_scale)
        self.sparsity = sparsity
        self.distribution = distribution
        self.dense = tuple(dense)
        self.include = None if include is None else tuple(include)
        self.exclude = tuple(exclude)
        self.custom_sparsity = dict(custom_sparsity or {})
        self.erk_power_scale = float(erk_power_scale)
        self.structure: Structure | None = parse_structure(structure)
        self.neurons_in_columns: set[str] = set()  # the sparse weights stored (in, out): Hugging Face Conv1D
        if self.structure is not None and not self.supports_structure:
            raise ConfigError(f"{type(self).__name__} does not keep a structure: structure={structure!r} is for "
                              "Static, SET, RigL and SRigL. Leave structure unset.")
        if self.structure is not None and distribution == GLOBAL:
            raise ConfigError(f"structure={structure!r} fixes what each layer holds, and distribution='global' lets "
                              "one ranking across layers decide it: use 'erk', 'er' or 'uniform' with a structure.")
        if rewind_step is not None and (isinstance(rewind_step, bool) or not isinstance(rewind_step, int)
                                        or rewind_step < 0):
            raise ConfigError(f"rewind_step must be an optimizer step >= 0 (an int) or None, got {rewind_step!r}.")
        self.rewind_step = rewind_step
        self.seed = int(seed)
        if kernels not in KERNEL_MODES:
            raise ConfigError(f"kernels must be one of {KERNEL_MODES}, got {kernels!r}.")
        self.kernels = kernels
        if not isinstance(live_step, bool):
            raise ConfigError(f"live_step must be True or False, got {live_step!r}.")
        self.live_step = live_step
        self.live_step_used = ""  # how the optimizer steps the sparse layers: "live weights" or "dense (why)"
        self.masks: dict[str, Tensor] = {}
        self.targets: dict[str, float] = {}  # per-layer densities the configuration asks for in the end
        self.budgets: dict[str, int] = {}  # per-layer live counts of the distribution, before a structure rounds
        self.densities: dict[str, float] = {}  # per-layer densities now: the targets, unless the method moves them
        self.num_updates = 0  # mask changes made so far
        self.rewind: dict[str, Tensor] | None = None  # every parameter at rewind_step, on the CPU
        self.flops: TrainingFlops | None = None  # FLOPs spent, counted from the first batch's example shape
        self.dense_gradient_read = False  # set by a method when this step's decision read the dense gradient
        self._restored_flops: tuple[float, float] | None = None
        self._flops_unavailable = False
        self._params: dict[str, nn.Parameter] = {}
        self._zero: dict[torch.device, Tensor] = {}
        self._restored_targets: dict[str, float] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._all_params: dict[str, nn.Parameter] = {}  # every parameter of the model, during fit
        self._decided: dict[str, Tensor] = {}  # digest rows of the whole masks decided since the last agreement check
        # Layers gathered ahead by for_each_whole_layer: the whole weight, the per-weight state dicts, their shards.
        self._gathered: dict[str, tuple[Tensor, list[dict[str, Tensor]], list[Tensor]]] = {}
        # Of each whole mask, noted whenever it changes: what any single process reports (logs, results) without
        # gathering shards.
        self.live_counts: dict[str, int] = {}  # live weights
        self.empty_rows: dict[str, int] = {}  # neurons (rows) without a live weight
        self.training_kernels: TrainingKernels | None = None  # the sparse kernels installed during fit
        self.kernels_used: dict[str, str] = {}  # each sparse layer's kernels, as reported ("csr", "dense (why)")
        self._restored_plans: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return STATE_KEY

    # ------------------------------------------------------------------------------------------ policy

    @abstractmethod
    def update_masks(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Change the masks (and ``densities``) before this optimizer step, if the method does so now.

        Gradients are fully accumulated, all-reduced by DDP and unscaled under 16-mixed; dead positions still
        hold their dense gradient, which is masked right after this call. Change masks through
        ``apply_change`` so that the weights and the optimizer state follow.
        """

    def start_densities(self) -> dict[str, float]:
        """Per-layer densities at the first step: the targets; dense-start methods return all ones."""
        return dict(self.targets)

    def start_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[str], Tensor] | None:
        """What a start from trained weights keeps the largest of: a function giving a sparse layer's whole
        scores in float32, |w| or Wanda's |w|·‖x‖ (whose input norms are measured here first); None for a random
        start."""
        if self.start == "random":
            return None
        if self.start == "magnitude":
            return lambda name: gather(self._params[name].detach()).abs().float()
        layers = linear_layers(pl_module, list(self._params))
        norms = input_norms(trainer, pl_module, layers, self.calibration_batches)
        return lambda name: wanda_score(layers[name], norms[name])

    def initial_masks(self, score: Callable[[str], Tensor] | None = None) -> dict[str, Tensor]:
        """Masks at the first step of a fresh run, whole (the base class shards them), exactly ``live_count``
        live per layer: at random positions, or where the layer's ``score`` (``start_scores``) is largest,
        within each layer (one layer's scores at a time), or across the layers under ``distribution="global"``,
        which then sets each layer's density (``densities``)."""
        if score is None:
            return random_masks(self._params, self.densities, self.seed, self.structure, self.neurons_in_columns)
        if self.distribution != GLOBAL:
            return {name: top_masks({name: score(name)}, self.densities, self.structure, self.neurons_in_columns)[name]
                    for name in self._params}
        scores = {name: score(name) for name in self._params}
        masks = {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
        pool = [name for name, density in self.densities.items() if density < 1]  # the layers outside ``dense``
        n_keep = sum(live_count(masks[name].numel(), self.densities[name]) for name in pool)
        prune_globally({name: masks[name] for name in pool}, {name: scores[name] for name in pool}, n_keep)
        self.densities = {name: int(mask.sum()) / mask.numel() for name, mask in masks.items()}
        return masks

    def reads_dense_gradient(self, step: int) -> bool:
        """Whether the mask decision of optimizer step ``step`` reads the gradient at dead positions too (then its
        weight gradients are computed dense). By default every step of a method that reads gradients."""
        return self.reads_gradients

    def may_change_masks(self, step: int) -> bool:
        """Whether ``update_masks`` may change a mask at optimizer step ``step``; by default at every step. Only
        other steps keep sparse weight gradients as live values (``live_step``), so that a change always finds a
        dense gradient to mask."""
        return True

    def why_not_sparse_kernels(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Why the method cannot train with kernels="sparse" (None: it can); "auto" still times its layers, and
        steps that read the dense gradient compute it dense."""
        return None

    def per_weight_state(self) -> list[dict[str, Tensor]]:
        """The method's tensors kept per sparse weight, by parameter name, sharded like the parameter under FSDP2
        and whole inside ``whole_layer``: the masks, and whatever a method adds (a moving average, say)."""
        return [self.masks]

    def saved_tensors(self) -> dict[str, dict[str, Tensor]]:
        """The tensors a checkpoint holds per weight, by kind (a key of the saved state) and parameter name: the
        masks, the rewind copy once taken, and whatever a method adds."""
        return {"masks": self.masks, **({} if self.rewind is None else {"rewind": self.rewind})}

    @contextmanager
    def whole_layer(self, name: str) -> Iterator[Tensor]:
        """The layer as a single process holds it, for a decision: yields its whole weight (a detached tensor
        whose ``.grad`` is the whole gradient) while ``masks[name]`` and every ``per_weight_state`` entry hold
        whole tensors; afterwards each process writes its rows of them back into its shards. Without sharding it
        yields the parameter itself and gathers nothing. Under FSDP2 every process gathers the layer (a
        collective: every process enters it for the same layers in the same order) unless ``for_each_whole_layer``
        gathered it ahead; the transient memory is the layer's weight, gradient and per-weight state, whole."""
        param = self._params[name]
        if not is_sharded(param):
            yield param
            self._record(name, self.masks[name])
            return
        if name not in self._gathered:
            self._gather_layer(name)
        whole, states, shards = self._gathered.pop(name)
        try:
            yield whole
            self._record(name, self.masks[name])
            for state, shard in zip(states, shards):
                write_local(shard, state[name])
        finally:
            for state, shard in zip(states, shards):
                state[name] = shard

    def for_each_whole_layer(self, fn: Callable[[int, str, Tensor], Result], names: Iterable[str]) -> dict[str, Result]:
        """``fn(index, name, whole)`` inside ``whole_layer`` for each of ``names`` (index: the layer's position
        among all sparse layers), two layers at a time. Under FSDP2 this thread gathers the layers in order,
        at most three ahead of those decided (their transient memory, at once); ``fn`` runs on a worker thread
        and must not communicate."""
        positions = {name: index for index, name in enumerate(self._params)}

        def decide(_: int, name: str, param: Tensor) -> Result:
            with self.whole_layer(name) as whole:
                return fn(positions[name], name, whole)

        params = {name: self._params[name] for name in names}
        sharded = any(is_sharded(param) for param in params.values())
        return for_each_layer(decide, params, self._gather_layer if sharded else None)

    def _gather_layer(self, name: str) -> None:
        """Gather a sharded layer for ``whole_layer`` (collectives), putting the whole per-weight state in place;
        nothing for a plain one."""
        param = self._params[name]
        if not is_sharded(param):
            return
        states = [state for state in self.per_weight_state() if name in state]
        shards = [state[name] for state in states]
        whole = gather(param.detach())
        whole.grad = None if param.grad is None else gather(param.grad)
        for state in states:
            state[name] = gather(state[name])
        self._gathered[name] = (whole, states, shards)

    def check_agreement(self, step: int) -> None:
        """Stop every process at once if they hold different masks (see ``check_masks_agree``): the masks
        themselves without sharding, the whole masks decided since the last check under FSDP2."""
        if not any(is_sharded(mask) for mask in self.masks.values()):
            check_masks_agree(self.masks, step)
            return
        decided, self._decided = self._decided, {}
        names = [name for name in self.masks if name in decided]  # layers finish in any order: compare in one
        if names:
            check_digests_agree(torch.stack([decided[name] for name in names]), names, step)

    # ------------------------------------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        _check_supported(trainer, pl_module)
        params = self._select(pl_module)
        if self.start == "wanda":
            linear_layers(pl_module, list(params))  # Wanda's score is a linear layer's: refuse others now
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        distributed = self.target_densities(shapes)
        self.budgets = {name: live_count(math.prod(shape), distributed[name]) for name, shape in shapes.items()}
        self.targets = self._structured(shapes, distributed)
        if not self.masks:  # masks kept from an earlier fit carry their densities with them
            self.densities = self.start_densities()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning itself refuses several optimizers under automatic optimization, and _check_supported manual.
        optimizer = trainer.optimizers[0]
        self._params = self._select(pl_module)
        self._check_fit(trainer, optimizer)
        self._optimizer = optimizer
        self._zero = {p.device: torch.zeros((), dtype=p.dtype, device=p.device) for p in self._params.values()}
        self._all_params = dict(pl_module.named_parameters())
        if self.masks:
            self._place_restored_state(trainer.global_step)
        else:
            # A run resumed under FSDP2 reads its masks after this hook: these are placeholders, drawn at random.
            resuming = trainer.ckpt_path is not None
            whole = self.initial_masks(None if resuming else self.start_scores(trainer, pl_module))
            for name, mask in whole.items():
                self._record(name, mask)
            self.masks = {name: shard_like(mask, self._params[name]) for name, mask in whole.items()}
            self._apply_masks(trainer.global_step)
        self._install_kernels(trainer, pl_module)
        rank_zero_info(
            f"{type(self).__name__}: {len(self.masks)} sparse layers, global density {self.global_density():.4f}"
        )
        self._log(trainer, self.density_metrics())

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients here are fully accumulated, all-reduced by DDP and unscaled under 16-mixed.
        if self.training_kernels is not None:
            self.training_kernels.merge_shared_gradients()
        if self.rewind is None and trainer.global_step == self.rewind_step:
            self.rewind = {name: _rewind_copy(p.detach(), p) for name, p in pl_module.named_parameters()}
        # The forward and backward of this step ran at the densities before any update.
        trained_forward = self.flops.forward(self.densities) if self.flops is not None else 0.0
        updates = self.num_updates
        self.update_masks(trainer, optimizer)
        if self.training_kernels is not None:
            self._follow_masks(trainer, updates)
        self._mask_gradients()
        if self.training_kernels is not None:
            self.training_kernels.end_step()
        if self.flops is not None:
            self.flops.add_step(trained_forward, self.dense_gradient_read)
            if self.num_updates != updates or trainer.global_step % trainer.log_every_n_steps == 0:
                self._log(trainer, self.cost_metrics(pl_module))
        self.dense_gradient_read = False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.flops is None and not self._flops_unavailable:
            self._start_counting_flops(trainer, pl_module, batch)
        if self.training_kernels is not None:
            step = trainer.global_step
            self.training_kernels.begin_step(self.reads_dense_gradient(step), not self.may_change_masks(step))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The final costs at the final step, whatever the logging interval: the logs end where the run ended.
        if self.flops is not None:
            self._log(trainer, self.cost_metrics(pl_module))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_kernels()
        self._params, self._all_params, self._gathered = {}, {}, {}  # drop references to the model
        self._optimizer = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_kernels()  # the user's model goes back plain whatever happened

    @override
    def state_dict(self) -> dict[str, Any]:
        # Sharded tensors (FSDP2) are left to on_save_checkpoint, which knows the checkpoint's form.
        state = {kind: {name: value.cpu() for name, value in tensors.items() if not is_sharded(value)}
                 for kind, tensors in self.saved_tensors().items()}
        state |= {"densities": dict(self.densities), "targets": dict(self.targets), "num_updates": self.num_updates}
        if self.flops is not None:
            state["train_flops"] = (self.flops.spent, self.flops.dense_spent)
        if self.training_kernels is not None and self.kernels == "auto":
            state["kernel_plans"] = {name: plan_state(plan, live)
                                     for name, (plan, live) in self.training_kernels.plans().items() if live is not None}
        return state

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning keeps rank 0's callback state alone, so sharded tensors cannot go there as shards. A folder of
        # shards (the model's state dict holds DTensors) takes them with the model's: each process writes its rows.
        # A single file takes them whole, gathered one tensor at a time (every process runs this hook).
        state = saved_state(checkpoint)
        sharded = {kind: {name: value for name, value in tensors.items() if is_sharded(value)}
                   for kind, tensors in self.saved_tensors().items()}
        if state is None or not any(sharded.values()):
            return
        if any(is_sharded(value) for value in checkpoint["state_dict"].values()):
            state[SHARDED_TENSORS] = {kind: list(tensors) for kind, tensors in sharded.items()}
            checkpoint["state_dict"].update({sharded_key(STATE_KEY, kind, name): value
                                             for kind, tensors in sharded.items() for name, value in tensors.items()})
            return
        for kind, tensors in sharded.items():
            for name, value in tensors.items():
                whole = gather(value).cpu()
                if trainer.is_global_zero:
                    state[kind][name] = whole

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Tensors saved as shards come back as shards: each process reads its rows from the folder. Only
        # ModelParallelStrategy writes them, and it restores once the model is sharded.
        state = saved_state(checkpoint)
        if state is None or SHARDED_TENSORS not in state:
            return
        names = state.pop(SHARDED_TENSORS)
        params = dict(pl_module.named_parameters())  # sharded as when saved (test and validate restore too)
        missing = sorted({name for tensors in names.values() for name in tensors} - set(params))
        if missing:
            raise RuntimeError(f"The checkpoint {trainer.ckpt_path} holds sharded state for parameters this model "
                               f"lacks: {missing}.")
        like = {kind: {name: params[name] for name in tensors} for kind, tensors in names.items()}
        for kind, tensors in load_sharded_tensors(Path(trainer.ckpt_path), STATE_KEY, like).items():
            state.setdefault(kind, {}).update(tensors)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Under DDP this runs after setup and before the model is on its device; on_fit_start checks the masks
        # against this configuration and moves them next to their parameters. Strategies that restore after
        # setup (ModelParallelStrategy) call it after on_fit_start: the restored state is placed here then.
        self.masks = dict(state_dict["masks"])
        self.densities = dict(state_dict["densities"])
        self._restored_targets = dict(state_dict["targets"])
        self.num_updates = state_dict["num_updates"]
        self.rewind = state_dict.get("rewind")
        self._restored_flops = state_dict.get("train_flops")
        self._restored_plans = state_dict.get("kernel_plans")
        if self._params:
            self._place_restored_state(None)

    # ----------------------------------------------------------------------------------------- helpers

    def target_densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        """The per-layer densities this configuration asks for, for the selected parameters' shapes. Under
        ``distribution="global"`` the scores decide each layer's share, so the layers outside ``dense`` all
        get their mean density."""
        dense = resolve_patterns(list(shapes), self.dense, "dense")
        if self.distribution == GLOBAL:
            pool = [name for name in shapes if name not in dense]
            mean = global_live_total(shapes, self.sparsity, dense) / sum(math.prod(shapes[n]) for n in pool)
            return {name: 1.0 if name in dense else mean for name in shapes}
        custom = resolve_custom(list(shapes), self.custom_sparsity)
        return densities_for_shapes(shapes, self.sparsity, self.distribution, dense, custom_sparsity=custom,
                                    erk_power_scale=self.erk_power_scale)

    def _structured(self, shapes: dict[str, tuple[int, ...]], densities: dict[str, float]) -> dict[str, float]:
        """The densities rounded to what the structure holds (a whole fan-in); dense layers stay dense."""
        if self.structure is None:
            return densities
        rounded = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            budget = self.budgets[name]
            structure = self.layer_structure(name)
            rounded[name] = 1.0 if budget == numel else structure.layer_count(name, shape, budget) / numel
        return rounded

    def global_density(self) -> float:
        """Fraction of live weights over all sparsified parameters."""
        return sum(self.live_counts.values()) / sum(mask.numel() for mask in self.masks.values())

    def achieved_densities(self) -> dict[str, float]:
        """Each sparse layer's fraction of live weights now, from its mask (``densities`` holds the targets)."""
        return {name: self.live_counts[name] / mask.numel() for name, mask in self.masks.items()}

    def ablated_neurons(self) -> int:
        """Neurons (rows of the sparse weights; columns of those stored (in, out)) without a live weight, over
        every layer."""
        return sum(self.empty_rows.values())

    def _record(self, name: str, whole: Tensor) -> None:
        """Note what the layer's whole mask, just decided, holds (``live_counts``, ``empty_rows``) and, for a
        sharded layer, its digest for the agreement check."""
        rows = self.neuron_matrix(name, whole)
        self.live_counts[name] = int(rows.sum())
        self.empty_rows[name] = int((~rows.any(1)).sum())
        if is_sharded(self._params[name]):
            self._decided[name] = mask_digest({name: whole})[0]

    def density_metrics(self) -> dict[str, float]:
        """Global and per-layer densities, as logged."""
        metrics = {GLOBAL_DENSITY: self.global_density()}
        metrics.update({LAYER_DENSITY + name: d for name, d in self.achieved_densities().items()})
        return metrics

    def cost_metrics(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Forward FLOPs of the current masks over dense (per example), training FLOPs spent over dense training's
        in the same steps, and the model size in bytes as the official README counts it; as logged."""
        assert self.flops is not None
        return {
            FORWARD_RATIO: self.flops.forward(self.densities) / self.flops.dense_flops,
            TRAIN_RATIO: self.flops.train_ratio,
            SIZE_BYTES: model_size_bytes(pl_module, self.densities),
        }

    def _start_counting_flops(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Counts the model's FLOPs on the first example of the first batch (images or token ids alike); warns
        once if it cannot."""
        example = _first_tensor(batch)
        try:
            if example is None:
                raise ValueError("the batch holds no tensor")
            with self.training_kernels.paused() if self.training_kernels is not None else nullcontext():
                self.flops = TrainingFlops.of(pl_module, example[:1], list(self._params))
        except Exception as error:  # a forward that takes more than one input, say: training goes on
            self._flops_unavailable = True
            rank_zero_warn(f"FLOPs are not counted: a forward pass on the first example of the first batch failed "
                           f"({type(error).__name__}: {error}).")
            return
        if self._restored_flops is not None:
            self.flops.spent, self.flops.dense_spent = self._restored_flops
        self._log(trainer, self.cost_metrics(pl_module))

    def _install_kernels(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Give the sparse layers their sparse kernels (kernels="sparse" or "auto"), where they can run; note in
        ``kernels_used`` why a layer keeps dense ones."""
        self.kernels_used = dict.fromkeys(self._params, "dense")
        if self.kernels == "dense":
            return
        reason = _why_no_sparse_kernels(trainer, pl_module, self._params)
        refusal = reason or (self.why_not_sparse_kernels(trainer.optimizers[0]) if self.kernels == "sparse" else None)
        if refusal is not None and self.kernels == "sparse":
            raise ConfigError(f"kernels='sparse' cannot run here: {refusal}. Use kernels='auto' (dense where sparse "
                              "kernels cannot run or do not gain) or kernels='dense'.")
        if reason is not None:
            self.kernels_used = dict.fromkeys(self._params, f"dense ({reason})")
            return
        plans = {name: plan_from_state(state) for name, state in (self._restored_plans or {}).items()}
        self._restored_plans = None
        self.training_kernels = TrainingKernels(self.kernels)
        self.training_kernels.install(self._kernel_modules(pl_module), self.masks, plans)
        self._note_kernels()
        why_dense = "live_step=False" if not self.live_step else _why_no_live_step(trainer, pl_module)
        if why_dense is None:
            self.training_kernels.live_step(trainer.optimizers[0])
        self.live_step_used = "live weights" if why_dense is None else f"dense ({why_dense})"

    def _kernel_modules(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        """The modules whose sparse weight may take sparse kernels, by the weight's name; ``kernels_used`` notes
        why the others keep dense ones."""
        modules, self.kernels_used = {}, {}
        for name in self._params:
            module_name, _, attribute = name.rpartition(".")
            if self.targets[name] >= 1.0:
                self.kernels_used[name] = "dense (the configuration keeps the layer dense)"
            elif attribute == "weight":
                modules[name] = pl_module.get_submodule(module_name)
            else:
                self.kernels_used[name] = f"dense ({attribute} is not a module's weight)"
        return modules

    def _follow_masks(self, trainer: pl.Trainer, updates_before: int) -> None:
        """After this step's decision: new patterns where masks changed; under "auto", the kernels timed on this
        step's tensors, the timings summed over processes so that all choose alike."""
        kernels = self.training_kernels
        if self.num_updates != updates_before:
            kernels.masks_changed(self.masks)
        if kernels.timing_pending():
            kernels.decide(lambda times: trainer.strategy.reduce(times, reduce_op="sum"))
            self._note_kernels()

    def _note_kernels(self) -> None:
        kernels = self.training_kernels
        self.kernels_used.update({name: f"dense ({why})" for name, why in kernels.why_dense.items()})
        self.kernels_used.update({name: plan.describe() for name, (plan, _) in kernels.plans().items()})

    def _remove_kernels(self) -> None:
        if self.training_kernels is not None:
            self.training_kernels.remove()
            self.training_kernels = None

    def _check_fit(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        """What can only be checked once the optimizer and the run's length are known."""
        for name, param in self._params.items():
            reason = unsupported_sharding(param)
            if reason is not None:
                raise ConfigError(f"{name!r} cannot be masked: {reason}.")
        _check_optimized(self._params, optimizer)
        if self.reads_gradients:
            _check_unscaled(trainer, optimizer)
        total = trainer.estimated_stepping_batches
        if self.rewind_step is not None and self.rewind_step >= total:
            rank_zero_warn(f"rewind_step {self.rewind_step} is not within the run ({total} optimizer steps): no copy "
                           "will be kept. Lower it (0 keeps the initial weights).")

    def _select(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        params = sparsifiable_parameters(pl_module, include=self.include, exclude=self.exclude)
        self.neurons_in_columns = neurons_in_columns(pl_module, params)
        return params

    def layer_structure(self, name: str) -> Structure | None:
        """The structure as the sparse layer ``name`` holds it: read transposed where neurons are columns."""
        return oriented(self.structure, name in self.neurons_in_columns)

    def neuron_matrix(self, name: str, whole: Tensor) -> Tensor:
        """The whole mask (or any tensor of the shape) of sparse layer ``name`` as (neurons, weights per neuron)."""
        matrix = whole.t() if name in self.neurons_in_columns else whole
        return matrix.reshape(matrix.shape[0], -1)

    def _place_restored_state(self, step: int | None) -> None:
        """Masks and state restored from a checkpoint (whole tensors), or kept from an earlier fit: checked
        against this configuration, placed next to their parameters (sharded like them), applied; the processes
        checked to agree at ``step`` (None: after on_fit_start, where every process read rank 0's state)."""
        self._adopt_existing_masks()
        if self.rewind is not None:
            self.rewind = {name: _rewind_copy(value, self._all_params.get(name)) for name, value in self.rewind.items()}
        self._apply_masks(step)

    def _apply_masks(self, step: int | None) -> None:
        """Zero every weight and optimizer state outside its mask; check that the processes agree (at ``step``:
        on masks this process decided; None for restored ones, which every process read from one file)."""
        if step is not None:
            self.check_agreement(step)
        for name, param in self._params.items():
            apply_mask(param, self.masks[name], self._optimizer)

    def _adopt_existing_masks(self) -> None:
        """Masks restored from a checkpoint (or kept from an earlier fit): check, then place on device."""
        restored, self._restored_targets = self._restored_targets, None
        if restored is not None and restored != self.targets:
            raise RuntimeError(
                "The target densities in the checkpoint do not fit this configuration (another sparsity, "
                "distribution or dense list). Resume with the sparsity, distribution and layer selection the "
                "checkpoint was trained with."
            )
        for name, mask in self.masks.items():
            if name in self._params:
                self._record(name, gather(mask))  # one layer whole at a time; restored as shards, or whole
        self._decided = {}  # restored masks: every process read the same file
        for name, param in self._params.items():
            mask = self.masks.get(name)
            expected = live_count(param.numel(), self.densities.get(name, 1.0))
            broken = None if mask is None or self.structure is None or expected == param.numel() else \
                self.layer_structure(name).violation(gather(mask))
            if mask is None or mask.shape != param.shape or self.live_counts[name] != expected or broken:
                raise RuntimeError(
                    f"The masks in the checkpoint do not fit this configuration (parameter {name!r}: expected "
                    f"{expected} live weights of shape {tuple(param.shape)}"
                    f"{'' if broken is None else f' within the structure {self.structure}, but {broken}'}). "
                    "Resume with the sparsity, distribution, structure and layer selection the checkpoint was "
                    "trained with."
                )
        unknown = sorted(set(self.masks) - set(self._params))
        if unknown:
            raise RuntimeError(f"The checkpoint has masks for parameters this model lacks: {unknown}.")
        self.masks = {name: shard_like(self.masks[name].bool(), param) for name, param in self._params.items()}

    def _mask_gradients(self) -> None:
        # torch.where, not a multiplication: a NaN or inf at a dead position must not survive as NaN. Gradients that
        # sparse kernels alone computed hold 0 at every dead position already, and a layer without one has none.
        clean = self.training_kernels.clean_gradients() if self.training_kernels is not None else ()
        for name, param in self._params.items():
            if param.grad is not None and name not in clean and self.live_counts[name] < param.numel():
                grad = local(param.grad)
                torch.where(local(self.masks[name]), grad, self._zero[grad.device], out=grad)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


def _check_supported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            "Sparse training callbacks need automatic optimization; this LightningModule sets "
            "automatic_optimization = False. Use automatic optimization."
        )
    strategy = type(trainer.strategy).__name__
    if any(cls.__name__ in _UNSUPPORTED_STRATEGIES for cls in type(trainer.strategy).__mro__):
        raise ConfigError(
            f"{strategy} is not supported: it flattens or partitions parameters where masks cannot follow them. "
            "Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard (FSDP2) "
            "applied in configure_model, or strategy='ddp'."
        )
    mesh = trainer.strategy.device_mesh if strategy == "ModelParallelStrategy" else None
    if mesh is not None and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            "Tensor parallelism is not supported: masks follow fully_shard's row shards only. Use "
            f"ModelParallelStrategy(data_parallel_size={trainer.world_size}, tensor_parallel_size=1)."
        )


def _why_no_sparse_kernels(trainer: pl.Trainer, pl_module: pl.LightningModule,
                           params: Mapping[str, nn.Parameter]) -> str | None:
    """Why no layer of this run can train with sparse kernels (None: they can)."""
    if any(is_sharded(param) for param in params.values()):
        return "FSDP2 shards the weights, and the kernels read whole ones"
    if getattr(pl_module, "_compiler_ctx", None) is not None or any(
            isinstance(module, torch._dynamo.eval_frame.OptimizedModule) for module in pl_module.modules()):
        return "the model is compiled with torch.compile, which does not trace the sparse products"
    if str(trainer.precision) not in ("32-true", "64-true", "32", "64"):
        return (f"precision {trainer.precision!r}: the CPU sparse kernels compute in float32 or float64, and "
                "autocast's lower precision stays with the dense layers")
    return None


def _why_no_live_step(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """Why the optimizer must step the sparse layers densely in this run (None: it can step live weights alone)."""
    reason = why_no_live_step(trainer.optimizers[0])
    if reason is not None:
        return reason
    if trainer.world_size > 1:
        return "DDP all-reduces the dense .grad"
    if trainer.gradient_clip_val or (type(pl_module).configure_gradient_clipping
                                     is not pl.LightningModule.configure_gradient_clipping):
        return "gradient clipping reads every .grad"
    return None


def _rewind_copy(value: Tensor, param: Tensor | None) -> Tensor:
    """A copy of ``value`` (a parameter's values, whole or sharded like ``param``) for the rewind state: on the CPU,
    or sharded like a sharded parameter (each process its rows, on the parameter's device)."""
    if param is not None and is_sharded(param):
        return shard_like(value, param).clone()
    return gather(value).detach().cpu().clone()


def _first_tensor(batch: Any) -> Tensor | None:
    """The first tensor of a batch (a tensor, or a sequence or mapping holding one): the inputs, by convention."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (str, bytes)):
        return None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, Sequence) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _check_unscaled(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
    # Lightning unscales fp16 gradients before on_before_optimizer_step, except for optimizers that unscale
    # inside their own step (fused ones): decisions would then read scaled gradients.
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        raise ConfigError(
            f"{type(optimizer).__name__} unscales fp16 gradients inside its own step (fused), so mask updates would "
            "read scaled gradients. Use it with fused=False, or train in bf16-mixed or 32-bit."
        )


def _check_optimized(params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in trained or not p.requires_grad]
    if missing:
        raise RuntimeError(
            f"Sparsified parameters not trained by the optimizer (or frozen): {missing}. Add them to the "
            "optimizer or leave them out with exclude=[...]."
        )


def gradients_ready(optimizer: torch.optim.Optimizer) -> bool:
    """True if this step has gradients and every one is finite: no mask decision may read a step whose
    gradients hold an inf or NaN (an fp16 overflow) or that has none (``training_step`` returned None).

    A sum propagates inf and NaN, reads each gradient once and allocates nothing gradient-sized: ten times
    faster than ``isfinite().all()`` on ResNet-50. It accumulates in fp32 so that fp16 gradients cannot
    overflow it; only finite gradients summing past 3.4e38 would read as non-finite, and postponing is right
    then. Sums are combined per device, so parameters may live on several devices.
    """
    sums: dict[torch.device, list[Tensor]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                sums.setdefault(param.grad.device, []).append(param.grad.sum(dtype=torch.float32))
    return bool(sums) and all(bool(torch.stack(device_sums).sum().isfinite()) for device_sums in sums.values())
