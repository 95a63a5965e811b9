"""Data parallel training through torch.distributed: the same loop on one CPU, one GPU, or many
processes on many machines (started by torchrun, or by `train.devices: N` on one machine).

Each step's batch_size examples are dealt out across ranks (rank r takes every world-th one), so
the effective batch is the same as on one device. Every rank divides its summed loss by the
supervised-token count of the whole step across all ranks, and gradients are summed (not
averaged) across ranks: the update equals the single-process one, whatever the split.

Two strategies. ddp: every rank holds the whole model; after backward one all-reduce sums the
trainable gradients. fsdp (FSDP2, full fine-tunes): every rank holds 1/world of each weight, its
gradient and its optimizer state; a layer's weights are all-gathered just before it runs and freed
after, and gradients are reduce-scattered (summed) back into the shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, indices: list[int]) -> list[int]:
        return indices[self.rank:: self.world_size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """One all-reduce over all gradients, flattened into a single buffer."""
        if not self.active:
            return
        grads = [p.grad for p in parameters if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def broadcast_parameters(self, parameters: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's trainable weights."""
        if self.active:
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def transformer_layers(hf_model) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model: its first ModuleList with more than one entry."""
    lists = [m for m in hf_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    return list(lists[0]) if lists else []


def shard(model, device: torch.device):
    """FSDP2 over all ranks: each transformer layer is its own unit; the rest (embeddings, final
    norm, output layer) belongs to the root, which is model and loss together (PackedLoss), so
    those weights stay gathered for the whole loss. Returns the root; train through it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tunesmith.train.loss import PackedLoss, unwrap

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    root = PackedLoss(model)
    units = [fully_shard(layer, mesh=mesh) for layer in transformer_layers(unwrap(model))]
    units.append(fully_shard(root, mesh=mesh))
    for unit in units:  # a plain sum, not an average: each rank's loss is already divided by the
        unit.set_gradient_divide_factor(1.0)  # whole step's targets (and gloo has no pre-scaled sums)
        unit.set_force_sum_reduction_for_comms(True)
    return root


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (a sharded weight's gradient norm, say); others unchanged."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gather_objects(group: Group, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a one-element list without a group)."""
    if not group.active:
        return [obj]
    everyone = [None] * group.world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device_request: str) -> tuple[Group, str]:
    """Join the process group torchrun set up (if any); returns the group and this rank's device."""
    if not under_torchrun():
        return Group(), device_request
    use_cuda = torch.cuda.is_available() and device_request in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if not use_cuda:  # ranks on one machine share its cores instead of each claiming all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return Group(dist.get_rank(), dist.get_world_size()), device


def stop(group: Group) -> None:
    if group.active and dist.is_initialized():
        dist.destroy_process_group()
