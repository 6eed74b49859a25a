"""The sparse activations of sae_baseline.py's dictionaries: (..., n) pre-activations -> (..., n) latents.

Pure functions of the pre-activations (JumpReLU with its straight-through threshold gradient), each
checked by hand in tests/test_sae_baseline.py.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """The k largest pre-activations of each example, ReLU'd; the rest 0 (gradient to the kept only)."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def batch_topk_relu(pre: Tensor, k: float) -> Tensor:
    """The round(k x batch) largest ReLU'd pre-activations over the whole batch (B, n): an example may
    keep more or fewer than k. The smallest kept value feeds the threshold used at inference."""
    flat = pre.relu().flatten()
    vals, idx = flat.topk(min(max(round(k * pre.shape[0]), 1), flat.numel()))
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)


def abs_topk(pre: Tensor, k: int | Tensor) -> Tensor:
    """The k pre-activations of largest magnitude per example, with their sign (no ReLU). k: one int for
    every example, or each example's own (pre.shape[:-1], integers)."""
    k_max = k if isinstance(k, int) else int(k.max())
    idx = pre.abs().topk(k_max, dim=-1).indices
    vals = pre.gather(-1, idx)
    if not isinstance(k, int):  # example e keeps its first k[e] of the k_max largest
        vals = vals * (torch.arange(k_max, device=pre.device) < k[..., None])
    return torch.zeros_like(pre).scatter(-1, idx, vals)


class JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta), or with `l0` its L0 term H(pre - theta). d/dpre: H (the L0: 0, it pushes
    thresholds only); d/dtheta, straight through a window of width eps around theta: -(theta / eps)
    K((pre - theta) / eps) (the L0: -(1 / eps) K(...)), K the unit rectangle (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float, l0: bool = False) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps, ctx.l0 = eps, l0
        return (pre > theta).to(pre.dtype) if l0 else pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, theta = ctx.saved_tensors
        window = (((pre - theta) / ctx.eps).abs() < 0.5).to(pre.dtype)
        d_theta = -((1 if ctx.l0 else theta) / ctx.eps) * window * grad
        d_pre = torch.zeros_like(pre) if ctx.l0 else grad * (pre > theta)
        return d_pre, d_theta.reshape(-1, theta.shape[-1]).sum(0), None, None
