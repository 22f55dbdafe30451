"""Sharding a registered model with FSDP2 (``fully_shard``), for ``ModelParallelStrategy``: one group per block,
so that a process gathers one block's weights at a time for its forward and backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from lightning_rigl.models.wide_resnet import PreActBlock

# The repeated units of the registry's networks: ResNet's residual blocks, WRN's, ViT's encoder blocks. Networks
# without one (LeNet, the small CNN, MobileNet) form a single group.
BLOCKS: tuple[type[nn.Module], ...] = (Bottleneck, BasicBlock, PreActBlock, EncoderBlock)


def shard_blocks(model: nn.Module, mesh: DeviceMesh) -> int:
    """``fully_shard`` every block of ``model`` (see ``BLOCKS``) over ``mesh``, in place; the caller shards the root
    last, which takes the parameters outside the blocks (stem, head, embeddings). Returns the number of blocks."""
    blocks = [module for module in model.modules() if isinstance(module, BLOCKS)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return len(blocks)
