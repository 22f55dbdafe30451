"""Agreement (DDP and FSDP2): every rank must hold the same masks, and a rank that does not stops the run on every rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_rigl.sparsity.masks import mask_digest


class MaskDisagreementError(RuntimeError):
    """Processes of one distributed run hold different masks: a defect, never a configuration mistake."""


def check_masks_agree(masks: Mapping[str, Tensor], step: int) -> None:
    """Under torch.distributed, compare every process's ``masks`` by digest and raise on all of them at once
    if any differs from rank 0's; nothing to do in a single process.

    Masks agree by construction (decisions read the all-reduced gradient, random draws are seeded
    independently of the rank), so a difference is a bug. It is not repaired: copying rank 0's masks would
    leave the weights and the optimizer state of the other ranks apart, and DDP never re-syncs parameters.

    Raises:
        MaskDisagreementError: on every process, naming the ranks and layers that differ.
    """
    if _several_processes():
        check_digests_agree(mask_digest(masks), list(masks), step)


def check_digests_agree(digest: Tensor, names: Sequence[str], step: int) -> None:
    """``check_masks_agree`` on digests already taken (``mask_digest``, one row per name): under FSDP2 each
    process holds only its rows of a mask, so what must agree is the whole mask each process decided on, digested
    before it kept its rows."""
    if not _several_processes():
        return
    if dist.get_backend() == dist.Backend.GLOO:
        digest = digest.cpu()
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if not differing:
        return
    rows = torch.stack([(gathered[rank] != gathered[0]).any(dim=1) for rank in differing]).any(dim=0)
    layers = [name for name, differs in zip(names, rows.tolist()) if differs]
    raise MaskDisagreementError(
        f"Masks differ between processes at optimizer step {step}: rank(s) {differing} disagree with rank 0 on "
        f"{layers}. Every mask decision is identical on every rank by construction (seeded independently of the "
        "rank, read from the reduced gradient): give every process the same callback configuration, seed "
        "included. If they had the same, this is a bug: please report it with your configuration. The run stops "
        "here because the processes would otherwise train different networks."
    )


def _several_processes() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
