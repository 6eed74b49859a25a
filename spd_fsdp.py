"""spd.fsdp: the trained parameters (components, CI functions), their gradients and their optimizer state
sharded over the ranks of a torchrun job with FSDP2, instead of replicated on every rank as under DDP.

    torchrun --nproc_per_node 4 lm_decomposition.py configs/smollm2.yaml spd.fsdp=true

How it fits the rest: every rank still trains on its shard of the global batch, so a sharded run equals a
one-process run as a DDP one does. The whole training loss of a (micro-)batch is the forward of one FSDP
module (`ShardedLoss`): FSDP2 all-gathers the components and CI functions before it, keeps them whole through
its backward and reduce-scatters (averages) their gradients after it; between steps each rank holds 1/N of
them and of Adam's moments. The frozen target stays whole on every rank (it needs no gradient nor optimizer
state). Checkpoints hold the gathered state, so they load into a sharded run, an unsharded one, or analysis.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


class ShardedLoss(nn.Module):
    """`loss_fn(model, *args)` as this module's forward, with `model`'s trained parameters sharded by FSDP2
    (in place: outside this forward, `model.components` and `model.ci_fns` hold DTensor shards).

    `blocks` (spd.fsdp_blocks): target modules whose frozen weights are sharded too, each its own FSDP unit,
    gathered for each of its forwards (and backwards) only; the rest of the target stays whole on every rank.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., dict[str, Tensor]], world_size: int,
                 blocks: list[nn.Module] = ()):
        super().__init__()
        self.model, self.loss_fn, self.blocks = model, loss_fn, list(blocks)
        device = next(model.components.parameters()).device
        mesh = init_device_mesh(device.type, (world_size,))
        outside = set(model.target.parameters()) - {p for b in blocks for p in b.parameters()}
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh, ignored_params=outside)

    def forward(self, model: nn.Module, *args: Any) -> dict[str, Tensor]:
        """loss_fn(model, *args), called as loss_fn is (`model` is this module's)."""
        # A backward inside the loss (the PGD adversary's) ends in FSDP's end-of-backward callback once it has
        # passed through a block: that must not shard the components midway through the loss.
        self.set_reshard_after_backward(False)
        try:
            return self.loss_fn(model, *args)
        finally:
            self.set_reshard_after_backward(True)

    def gather(self) -> None:
        """From now on every rank holds the whole components, CI functions and blocks as plain tensors
        (all-gathers: every rank calls it), and forwards and backwards outside this module's own forward
        (rank 0 evaluating alone, the script's analysis) keep them whole."""
        for unit in (self, *self.blocks):
            unit.unshard()
            unit.set_reshard_after_backward(False)
        for block in self.blocks:
            block.set_reshard_after_forward(False)

    def scatter(self) -> None:
        """Back to each rank's shards, as in training (no traffic)."""
        for block in self.blocks:
            block.set_reshard_after_forward(True)
        for unit in (self, *self.blocks):
            unit.set_reshard_after_backward(True)
            unit.reshard()

    @contextmanager
    def whole(self) -> Iterator[None]:
        """`gather` inside (every rank enters), `scatter` after."""
        self.gather()
        try:
            yield
        finally:
            self.scatter()


def gathered(state: Any) -> Any:
    """`state` (nested dicts, lists and tuples of tensors) with each DTensor replaced by the whole tensor.
    A collective when there is a DTensor: every rank calls it."""
    if isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gathered(v) for v in state)
    return state


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of `whole` laid out as the DTensor `like` (every rank holds `whole`: no traffic);
    `whole` itself if `like` is a plain tensor."""
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def sharded_state(whole: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """A gathered state_dict with each entry sharded as its namesake in `like` (the module's own state_dict)."""
    return {k: shard_like(v, like[k]) if k in like else v for k, v in whole.items()}


def sharded_optimizer_state(whole: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A (gathered) optimizer state_dict with each per-parameter tensor of its parameter's shape (Adam's
    moments) sharded as the parameter; scalars (its step count) stay whole."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state = {i: {k: shard_like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
                 for k, v in s.items()} for i, s in whole["state"].items()}
    return {**whole, "state": state}


def local_megabytes(tensors: list[Tensor]) -> float:
    """Memory of this rank's part of `tensors` (a DTensor's local shard), in MB."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local) / 2 ** 20
