"""Data parallel training through torch.distributed: the same loop on one CPU, one GPU, or many
processes on many machines (started by torchrun, or by `train.devices: N` on one machine).

Each step's batch_size examples are dealt out across ranks (rank r takes every world-th one), so
the effective batch is the same as on one device. Every rank divides its summed loss by the
supervised-token count of the whole step across all ranks, and gradients are summed (not
averaged) across ranks: the update equals the single-process one, whatever the split.

Two strategies. ddp (torch's DistributedDataParallel): every rank holds the whole model; the
trainable gradients are summed bucket by bucket while the step's last micro batch runs backward
(the micro batches before it accumulate under no_sync). fsdp (FSDP2, full fine-tunes): every rank holds 1/world of each weight, its
gradient and its optimizer state; a layer's weights are all-gathered just before it runs and freed
after, and gradients are reduce-scattered (summed) back into the shards.
"""

from __future__ import annotations

import contextlib
import os
import signal
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

    def broadcast_parameters(self, parameters: list[torch.nn.Parameter]) -> None:
        """Start every rank from rank 0's trainable weights."""
        if self.active:
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


_replicas: dict[int, torch.nn.Module] = {}  # model id → its DDP root: one per model (finder and loop share it)


def replicate(model) -> torch.nn.Module:
    """DistributedDataParallel over all ranks, around the model and its loss (PackedLoss), so a call
    of the root prepares the gradient reduction and every weight of the loss takes part. Gradients
    are summed, not averaged (each rank's loss is already divided by the whole step's targets).
    Models with experts may leave some weights out of a rank's step: DDP looks for them."""
    if id(model) in _replicas:
        return _replicas[id(model)]
    from torch.nn.parallel import DistributedDataParallel

    from tunesmith.train.loss import PackedLoss, unwrap

    root = DistributedDataParallel(PackedLoss(model), init_sync=False, broadcast_buffers=False,
                                   gradient_as_bucket_view=True,
                                   find_unused_parameters=has_experts(unwrap(model).config))
    root.register_comm_hook(None, _summed)
    _replicas[id(model)] = root
    return root


def _summed(state, bucket):
    """DDP's communication hook: all-reduce a bucket of gradients as a sum. The reduction is waited
    for here and the result handed back in a finished future: a Python callback chained on gloo's
    future (`.then`) is released in gloo's own thread, which needs the GIL for it; when the process
    group was destroyed at that moment (the end of a run, with the GIL held), the two threads waited
    for each other for ever (seen in the suite). On CUDA, NCCL still queues the reduction on its
    stream and the host does not wait for the GPU."""
    dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM)
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def has_experts(hf_config) -> bool:
    names = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(isinstance(getattr(hf_config, name, None), int) and getattr(hf_config, name) > 1 for name in names)


def accumulating(model, more_to_come: bool):
    """Around a micro batch's forward and backward: gradients stay on this rank (DDP's no_sync) while
    more micro batches of the step follow; the last one sums them across ranks."""
    return model.no_sync() if more_to_come and hasattr(model, "no_sync") else contextlib.nullcontext()


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


def agreed_signal(group: Group, name: str | None, device) -> str | None:
    """The stop request every rank acts on: a signal any rank has received by the end of this step
    (each rank gets its own signal, not always in the same step; ranks that disagreed would part
    ways inside the checkpoint's collectives and hang). SIGTERM wins over SIGINT."""
    if not group.active:
        return name
    number = torch.tensor(signal.Signals[name].value if name else 0, device=device)
    dist.all_reduce(number, op=dist.ReduceOp.MAX)
    return signal.Signals(int(number)).name if int(number) else None


SHUTDOWN_SECONDS = 300  # after a stop request, the ranks' time to save a checkpoint before they are killed


def launch(ranks: int, args: list[str]) -> int:
    """Start `ranks` processes of `python -m tunesmith ARGS` on this machine, as torchrun --standalone
    would, with torch's elastic agent inside this process; returns their exit code.

    A SIGINT or SIGTERM here is passed on to every rank once (a Ctrl-C in a terminal reaches the
    ranks directly too; they take the two as one request), and the ranks agree on the step at which
    they stop, save one checkpoint and exit 130. The agent's own traceback and log lines are kept
    out of the way: the ranks say what happened."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=ranks, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          shutdown_timeout=SHUTDOWN_SECONDS)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "tunesmith", *args)
    except SignalException:
        return 130  # what each rank exits with after its checkpoint (the loop's Interrupted)
    except ChildFailedError as failed:
        codes = [failure.exitcode for failure in failed.failures.values()]
        return next((code for code in codes if code > 0), 1)
    return 0


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_first_rank() -> bool:
    """True in a single process and in rank 0 of several; usable before the process group starts."""
    return not under_torchrun() or int(os.environ.get("RANK", "0")) == 0


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
