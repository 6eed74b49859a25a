"""Causal-importance (CI) functions: the small networks that predict, per input, how much each
subcomponent may not be ablated, and the leaky hard sigmoids that turn their outputs into CI.

Per module: `mlp` (one scalar MLP per subcomponent, reading its own inner act), `vector_mlp` (one MLP per
subcomponent reading the module's input), `shared_mlp` (one MLP per module, input -> C). Global: one
network for all modules (`GlobalCI`), an MLP or a transformer over positions.
Shapes: `...` is any batch shape (batch, or batch x seq); C is the number of subcomponents of a module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from spd_config import SPDError
from spd_kernels import ScalarGeluCI, ScalarGeluMLP, use_ci_kernel


class HardSigmoids(torch.autograd.Function):
    """Both CIs from a CI function's pre-activations x: (lower, for the masks; upper, for importance minimality).

    lower, `leaky_forward` (the paper's): slope·x below 0, x on [0, 1], 1 above (no gradient there).
    lower, `clamp_forward_leaky_backward`: x clamped to [0, 1]; in the backward pass the gradient on
    [0, 1], and slope times it below 0 only where it pushes x up (a descent step then raises x): a dead
    subcomponent can revive, but neither CI nor the masks ever go negative.
    upper: 0 below 0 (no gradient there), x on [0, 1], 1 + slope·(x - 1) above.
    One function for both, its gradient a product of 0/1 masks: on CPU torch.where costs about 25
    multiplications, and the two sigmoids' autograd graphs (six of them) took a quarter of a TMS step.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str, slope: float) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x)
        ctx.kind, ctx.slope = kind, slope
        lower = torch.maximum(x, slope * x) if kind == "leaky_forward" else x.clamp(min=0.0)
        return lower.clamp_(max=1.0), torch.minimum(x, 1 + slope * (x - 1)).clamp_(min=0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_lower: Tensor, g_upper: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        below, above = (x < 0).to(x.dtype), (x > 1).to(x.dtype)
        leak = below if ctx.kind == "leaky_forward" else below * (g_lower < 0)
        inside = 1 - below - above
        return inside * (g_lower + g_upper) + ctx.slope * (leak * g_lower + above * g_upper), None, None


LEAK = 0.01  # the slope of the hard sigmoids' leaky parts


def hard_sigmoids(x: Tensor, kind: str = "leaky_forward", slope: float = LEAK) -> tuple[Tensor, Tensor]:
    """(lower, upper) CI of pre-activations x: see HardSigmoids; `kind` is spd.sigmoid."""
    return HardSigmoids.apply(x, kind, slope)


def _init_stack(C: int | None, widths: list[int]) -> nn.ParameterList:
    """Weights (C, w_in, w_out) and biases (C, 1, w_out) (no C axis when C is None), He-initialised."""
    params = nn.ParameterList()
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        gain = 1.0 if i == len(widths) - 2 else 2.0  # GELU hidden layers, linear output
        lead = () if C is None else (C,)
        params.append(nn.Parameter(torch.randn(*lead, w_in, w_out) * math.sqrt(gain / w_in)))
        params.append(nn.Parameter(torch.zeros(*lead, 1, w_out)))
    return params


def _per_component_mlp(x: Tensor, layers: nn.ParameterList, start: int = 0) -> Tensor:
    """C independent MLPs as batched matmuls: x (C, N, d) -> (C, N, 1), from layer `start` on.

    baddbmm keeps both passes as single BLAS calls per layer, and its output is contiguous (GELU
    on a strided (C, N, H) view is ~10x slower); GELU is the only elementwise work.
    """
    for i in range(start, len(layers), 2):
        x = torch.baddbmm(layers[i + 1], x, layers[i])
        if i < len(layers) - 2:
            x = F.gelu(x)
    return x


class CIFunction(nn.Module):
    """A per-module CI function: forward gives the pre-activations (..., C), `ci` the two CIs from them."""

    def ci(self, x: Tensor, sigmoid: str) -> tuple[Tensor, Tensor]:
        """(lower, upper) CI (..., C) of input x; `sigmoid` is spd.sigmoid (see HardSigmoids)."""
        return hard_sigmoids(self(x), sigmoid)


class ScalarMLPs(CIFunction):
    """`mlp`: each subcomponent c has its own MLP 1 -> hidden -> 1 reading its own h_c. (..., C) -> (..., C)."""

    def __init__(self, C: int, hidden: list[int]):
        super().__init__()
        self.layers = _init_stack(C, [1, *hidden, 1])

    def fused(self, h: Tensor, sigmoid: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """(pre, lower, upper) from the C kernel, which also applies the sigmoids (the default: one
        hidden layer, float32 on CPU); None where it does not run."""
        if len(self.layers) != 4 or not use_ci_kernel(h, *self.layers):
            return None
        C, H = h.shape[-1], self.layers[0].shape[-1]
        w1, b1, w2, b2 = self.layers
        outs = ScalarGeluCI.apply(h.reshape(-1, C), w1.view(C, H), b1.view(C, H), w2.view(C, H), b2.view(C),
                                  sigmoid == "clamp_forward_leaky_backward", LEAK)
        return tuple(o.view(h.shape) for o in outs)

    def forward(self, h: Tensor) -> Tensor:
        if (fused := self.fused(h, "leaky_forward")) is not None:
            return fused[0]
        C = h.shape[-1]
        if len(self.layers) == 4:  # one hidden layer (the default): fused elementwise
            w1, b1, w2, b2 = self.layers
            H = w1.shape[-1]
            out = ScalarGeluMLP.apply(h.reshape(-1, C), w1.view(C, H), b1.view(C, H), w2.view(C, H), b2.view(C))
            return out.view(h.shape)
        x = h.reshape(-1, C).T.unsqueeze(-1)  # (C, N, 1)
        return _per_component_mlp(x, self.layers)[..., 0].T.reshape(h.shape)

    def ci(self, h: Tensor, sigmoid: str) -> tuple[Tensor, Tensor]:
        if (fused := self.fused(h, sigmoid)) is not None:
            return fused[1], fused[2]
        return super().ci(h, sigmoid)


class VectorMLPs(CIFunction):
    """`vector_mlp`: each subcomponent has its own MLP d_in -> hidden -> 1 reading the whole input."""

    def __init__(self, C: int, d_in: int, hidden: list[int]):
        super().__init__()
        self.C = C
        self.layers = _init_stack(C, [d_in, *hidden, 1])

    def forward(self, a: Tensor) -> Tensor:
        a2 = a.reshape(-1, a.shape[-1])  # (N, d_in), shared by all C MLPs without a copy
        x = _per_component_mlp(a2.expand(self.C, *a2.shape), self.layers)  # (C, N, 1)
        return x[..., 0].T.reshape(*a.shape[:-1], self.C)


class SharedMLP(CIFunction):
    """`shared_mlp`: one MLP per module mapping the input d_in -> hidden -> C."""

    def __init__(self, C: int, d_in: int, hidden: list[int]):
        super().__init__()
        self.layers = _init_stack(None, [d_in, *hidden, C])

    def forward(self, a: Tensor) -> Tensor:
        x = a
        for i in range(0, len(self.layers), 2):
            x = x @ self.layers[i] + self.layers[i + 1][0]
            if i < len(self.layers) - 2:
                x = F.gelu(x)
        return x


def rope(x: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary positions on queries or keys x: (..., seq, d_head), d_head even. Position t rotates the pair
    (x_i, x_{i + d_head/2}) by the angle t * base^(-2i/d_head) (the "rotate half" pairing, as the reference's),
    so that q_s . k_t depends on the offset s - t only."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * inv_freq  # (seq, half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Block(nn.Module):
    """Pre-norm transformer block on (..., seq, d_model): x + attn(rms(x)), then x + mlp(rms(x)). The norms
    have no learnable scale (as the reference's); attention has no biases, the MLP (d -> 4d -> d, GELU) has."""

    def __init__(self, d_model: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        d = x.shape[-1]
        qkv = self.qkv(F.rms_norm(x, (d,))).unflatten(-1, (3, self.heads, d // self.heads))  # (..., seq, 3, h, d_h)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2)  # each (..., heads, seq, d_head)
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=self.causal)  # (..., heads, seq, d_head)
        x = x + self.attn_out(y.transpose(-3, -2).flatten(-2))
        return x + self.mlp(F.rms_norm(x, (d,)))


class CITransformer(nn.Module):
    """The global transformer CI function (the reference's): proj_in (d_in -> d_model), `layers` pre-norm
    blocks with RoPE self-attention, proj_out (d_model -> d_out). (..., seq, d_in) -> (..., seq, d_out).

    Bidirectional by default, as the reference's: a position's CI may read later tokens (the CI function only
    serves to train the decomposition; the target never runs it). `causal=True` limits each position to itself
    and earlier ones.
    As in the reference, there is no norm after the last block: proj_out reads the residual stream directly.
    A 2-D input (N, d_in) -> (N, d_out) is N sequences of length 1: the toys (TMS, resid_mlp), and MoE or
    conv+fc mixes whose modules' inputs are aligned per row (token, or image) rather than per sequence."""

    def __init__(self, d_in: int, d_out: int, d_model: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        if d_model % heads or (d_model // heads) % 2:
            raise SPDError(f"spd.ci_transformer_heads={heads} must divide spd.ci_hidden[0]={d_model} into heads of "
                           f"even width (RoPE rotates pairs)")
        self.proj_in = nn.Linear(d_in, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, causal) for _ in range(layers))
        self.proj_out = nn.Linear(d_model, d_out)

    def forward(self, a: Tensor) -> Tensor:
        x = self.proj_in(a if a.dim() > 2 else a.unsqueeze(-2))  # (..., seq, d_model); a 2-D input: seq = 1
        for block in self.blocks:
            x = block(x)
        out = self.proj_out(x)
        return out if a.dim() > 2 else out.squeeze(-2)


class GlobalCI(nn.Module):
    """One CI function for all modules (`global_shared_mlp`, `global_transformer`): it reads every module's
    CI input (its input; an embedding's: its inner acts), RMS-normed and concatenated per position,
    (..., sum d_in), and outputs every module's CI pre-activations, (..., sum C)."""

    def __init__(self, kind: str, d_ins: dict[str, int], Cs: dict[str, int], hidden: list[int], layers: int,
                 heads: int, causal: bool = False):
        super().__init__()
        self.kind, self.d_ins, self.Cs = kind, d_ins, Cs
        d_in, C = sum(d_ins.values()), sum(Cs.values())
        self.net = (SharedMLP(C, d_in, hidden) if kind == "global_shared_mlp"
                    else CITransformer(d_in, C, hidden[0], layers, heads, causal))

    def forward(self, ci_inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        shapes = {n: tuple(a.shape[:-1]) for n, a in ci_inputs.items()}
        if len(set(shapes.values())) > 1:
            raise SPDError(f"spd.ci_fn={self.kind} reads all modules' inputs at each position, but their positions "
                           f"differ ({shapes}); use a per-module ci_fn (mlp, vector_mlp, shared_mlp)")
        a = torch.cat([F.rms_norm(ci_inputs[n], (d,)) for n, d in self.d_ins.items()], -1)
        return dict(zip(self.Cs, self.net(a).split(list(self.Cs.values()), -1)))


def make_ci_fn(kind: str, C: int, d_in: int, hidden: list[int]) -> CIFunction:
    if kind == "mlp":
        return ScalarMLPs(C, hidden)
    if kind == "vector_mlp":
        return VectorMLPs(C, d_in, hidden)
    return SharedMLP(C, d_in, hidden)
