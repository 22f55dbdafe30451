"""Sharding a registered model with FSDP2 (``fully_shard``), for ``ModelParallelStrategy``: one group per block,
so that a process gathers one block's weights at a time for its forward and backward."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vision_transformer import EncoderBlock

from lightning_rigl.models import gpt
from lightning_rigl.models.wide_resnet import PreActBlock

# The repeated units of the registry's networks: ResNet's residual blocks, WRN's, ViT's encoder blocks, GPT's
# blocks. Networks without one (LeNet, the small CNN, MobileNet) form a single group.
BLOCKS: tuple[type[nn.Module], ...] = (Bottleneck, BasicBlock, PreActBlock, EncoderBlock, gpt.Block)


def shard_module(root: nn.Module, net: nn.Module, mesh: DeviceMesh | None) -> None:
    """A LightningModule's ``configure_model`` under ``ModelParallelStrategy``: ``fully_shard`` the blocks of
    ``net`` and then ``root`` (the LightningModule) over ``mesh``'s data-parallel dimension. Nothing without a mesh
    (other strategies) or when ``root`` is sharded already (by an earlier fit)."""
    if mesh is None or isinstance(root, FSDPModule):
        return
    if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        mesh = mesh["data_parallel"]
    shard_blocks(net, mesh)
    fully_shard(root, mesh=mesh)


def shard_blocks(model: nn.Module, mesh: DeviceMesh) -> int:
    """``fully_shard`` every block of ``model`` (see ``BLOCKS``) over ``mesh``, in place; the caller shards the root
    last, which takes the parameters outside the blocks (stem, head, embeddings). Returns the number of blocks."""
    blocks = [module for module in model.modules() if isinstance(module, BLOCKS)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return len(blocks)
