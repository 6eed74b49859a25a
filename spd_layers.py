"""Components and the layers they stand in for: the first half of the SPD method (spd_common.py has
the second: CI functions, masks, losses and the `optimize` loop).

- `Components`: C rank-one subcomponents U (d_out, C) @ V (C, d_in) of one weight matrix.
- Which target modules can be decomposed (`decomposable_modules`): nn.Linear, nn.Embedding, GPT-2's
  Conv1D, nn.Conv2d, subclasses with their own forward (Gemma's scaled embedding, OPT's positions), and each
  matrix of a transformers MoE experts module.
- `DecomposedModule`: what stands in a target module's place, running its masked forward
  (`DecomposedExperts` for an MoE experts module).

Shapes: `...` is any batch shape (batch, or batch x seq); a module's weight is seen as a (d_out, d_in)
matrix W, approximated by U (d_out, C) @ V (C, d_in).

nn.Conv2d: a linear map applied to every input patch, so W is its weight (out_channels, in_channels,
kH, kW) seen as (out_channels, in_channels * kH * kW): V[c] is a filter (in_channels, kH, kW) and U[:, c]
its output direction. Its inner acts, CI and masks are channels-last, (batch, H_out, W_out, C): every
output location is an example, as every token is in a language model, so the CI functions, masks and
losses need no special case. The masked forward is a conv to C channels, the per-location mask, then a
1x1 conv (U) to out_channels, plus the delta term and the bias.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from spd_config import SPDError


class Components(nn.Module):
    """C rank-one subcomponents of one weight matrix W (d_out, d_in): W ≈ U @ V.

    `tied_to` makes these the transposes of another module's components (U = V_src^T, V = U_src^T),
    sharing parameters; such a module has no parameters of its own.
    """

    def __init__(self, d_in: int, d_out: int, C: int, tied_to: Components | None = None):
        super().__init__()
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self._tied_to = [tied_to] if tied_to is not None else []  # a list hides it from nn.Module
        if tied_to is None:
            # Unit-variance inner acts and an initial UV of the same scale as a unit-norm W.
            self.V = nn.Parameter(torch.randn(C, d_in) / math.sqrt(d_in))
            self.U = nn.Parameter(torch.randn(d_out, C) / math.sqrt(C))

    @property
    def tied(self) -> bool:
        return bool(self._tied_to)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(U (d_out, C), V (C, d_in))."""
        if self._tied_to:
            src = self._tied_to[0]
            return src.V.T, src.U.T
        return self.U, self.V

    def weight(self) -> Tensor:
        """UV (d_out, d_in)."""
        U, V = self.factors()
        return U @ V


def decomposable_types() -> tuple[type, ...]:
    """Layer types that can be decomposed: nn.Linear, nn.Embedding, GPT-2's Conv1D, nn.Conv2d and one expert's
    matrix."""
    from transformers.pytorch_utils import Conv1D  # imported here: transformers is slow to import

    return nn.Linear, nn.Embedding, Conv1D, nn.Conv2d, ExpertLinear


def is_experts(module: nn.Module) -> bool:
    """A transformers MoE experts module (`@use_experts_implementation`): one 3-D parameter per matrix,
    (n_experts, d_out, d_in), or (n_experts, d_in, d_out) where `is_transposed`."""
    return hasattr(module, "has_gate") and hasattr(module, "num_experts") and hasattr(module, "down_proj")


def expert_params(experts: nn.Module) -> tuple[str, str]:
    """The names of an experts module's (input, output) 3-D matrices."""
    return "gate_up_proj" if experts.has_gate else "up_proj", "down_proj"


class ExpertLinear(nn.Module):
    """Expert `e`'s slice of one 3-D parameter of an MoE experts module, as a linear layer (no copy)."""

    def __init__(self, experts: nn.Module, param: str, e: int):
        super().__init__()
        self._experts = [experts]  # a list hides it from nn.Module: it stays where the target has it
        self.param, self.e = param, e

    @property
    def weight(self) -> Tensor:
        """(d_out, d_in)."""
        w = getattr(self._experts[0], self.param)[self.e]
        return w.T if self._experts[0].is_transposed else w

    @property
    def bias(self) -> Tensor | None:
        ex = self._experts[0]
        return getattr(ex, f"{self.param}_bias")[self.e] if ex.has_bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def decomposable_modules(target: nn.Module) -> dict[str, nn.Module]:
    """Every decomposable layer of the target by name. Expert e's matrix of an experts module M is
    `M.P.e` for P its 3-D parameter, e.g. `model.layers.0.mlp.experts.gate_up_proj.3`."""
    found: dict[str, nn.Module] = {}
    for n, m in target.named_modules():
        if isinstance(m, decomposable_types()):
            found[n] = m
        elif is_experts(m):
            found.update({f"{n}.{p}.{e}": ExpertLinear(m, p, e)
                          for p in expert_params(m) for e in range(m.num_experts)})
    return found


def base_layer(module: nn.Module) -> type:
    """The decomposable type a layer is an instance of (a subclass, e.g. Gemma's scaled embedding, gives its base)."""
    return next(t for t in decomposable_types() if isinstance(module, t))


def weight_out_in(module: nn.Module) -> Tensor:
    """A decomposable layer's weight as (d_out, d_in). nn.Linear stores it so; nn.Embedding stores
    (vocab, d) = (d_in, d_out) for one-hot inputs, and Conv1D (d_in, d_out) (it computes x @ W + b);
    nn.Conv2d (out, in, kH, kW), flattened to (out, in * kH * kW), the patch order of F.unfold."""
    if isinstance(module, nn.Conv2d):
        return module.weight.flatten(1)
    return module.weight if isinstance(module, (nn.Linear, ExpertLinear)) else module.weight.T


def check_decomposable(name: str, module: nn.Module) -> None:
    """Refuse, in one line, a layer whose components could not reproduce it: a grouped Conv2d (its weight
    is not one matrix over the whole patch) or a Conv2d subclass with its own forward."""
    if not isinstance(module, nn.Conv2d):
        return
    if module.groups != 1:
        raise SPDError(f"module '{name}' is a Conv2d with groups = {module.groups}; only groups = 1 is decomposable: "
                       "leave it out of spd.modules")
    if type(module).forward is not nn.Conv2d.forward:
        raise SPDError(f"module '{name}' ({type(module).__name__}) overrides Conv2d.forward; "
                       "leave it out of spd.modules")


class BaseLayerCall(torch.overrides.TorchFunctionMode):
    """Within a layer subclass's own forward, replaces the base layer's call (F.linear or F.embedding on
    `weight`) by `fn(input)`, and counts such calls."""

    def __init__(self, weight: Tensor, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.weight, self.fn, self.calls = weight, fn, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.linear, F.embedding) and len(args) > 1 and args[1] is self.weight:
            self.calls += 1
            return self.fn(args[0])  # the mode is off in here: fn's own F.linear / F.embedding run as usual
        return func(*args, **(kwargs or {}))


def runs_own_forward(name: str, module: nn.Module) -> bool:
    """Whether a decomposed layer must run its own forward around the components (True), or is its base
    layer's computation (False). A subclass overriding forward is probed on a small input: one F.linear /
    F.embedding call on its weight (Gemma's embedding scale after it, OPT's position offset before it) runs
    the override with the components in that call; the base layer's output (Falcon's FalconLinear computes
    x @ W.T + b by hand) is plain; anything else is refused."""
    base = base_layer(module)
    if type(module).forward is base.forward:
        return False
    w = module.weight
    d_in = w.shape[0] if base is not nn.Linear else w.shape[1]
    x = (torch.ones(1, 2, dtype=torch.long, device=w.device) if base is nn.Embedding
         else torch.randn(1, 2, d_in, dtype=w.dtype, device=w.device))  # OPT's position embedding reads 1s as a mask
    probe = BaseLayerCall(w, lambda a: base.forward(module, a))
    where = f"module '{name}' ({type(module).__name__}) overrides {base.__name__}.forward"
    try:
        with torch.no_grad():
            with probe:
                out = module(x)
            plain = base.forward(module, x)
    except Exception as e:  # its forward takes other inputs: we cannot know what they mean
        raise SPDError(f"{where} and fails on a probe input ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       "leave it out of spd.modules") from None
    if probe.calls == 1:
        return True
    if isinstance(out, Tensor) and out.shape == plain.shape and torch.allclose(out, plain):
        return False
    raise SPDError(f"{where} without one F.linear / F.embedding call on its weight, so its components cannot "
                   "stand in for it; leave it out of spd.modules")


class DecomposedModule(nn.Module):
    """Stands in for a decomposable layer (see `decomposable_types`) inside the target model.

    With no mask set it runs the original module. With a mask (..., C) it runs the masked
    components instead: `((a V^T) * m) U^T (+ delta_mask * a (W - UV)^T) + bias` (a conv: per patch a,
    mask (batch, H_out, W_out, C)). A layer with its own forward (`runs_own_forward`) runs it, extra
    arguments and all, with that computation in its base call.
    """

    def __init__(self, original: nn.Module, components: Components, own_forward: bool = False):
        super().__init__()
        self.original = original
        self._components = [components]
        self.base = base_layer(original)
        self.own_forward = own_forward
        self.is_embedding = isinstance(original, nn.Embedding)
        self.is_conv = isinstance(original, nn.Conv2d)
        self.mask: Tensor | None = None
        self.delta_mask: Tensor | None = None
        self.inner: Tensor | None = None  # inner acts of the target's input here, when the caller has them
        self.rows: Tensor | None = None  # bool, (batch,) or the mask's (batch, positions..): routing's choice
        self.cache_input = False
        self.last_input: Tensor | None = None

    @property
    def components(self) -> Components:
        return self._components[0]

    def target_weight(self) -> Tensor:
        """The frozen target weight as a (d_out, d_in) matrix (spd.fsdp_blocks: gathered when read outside its
        block's forward, for the faithfulness loss, in the same order on every rank)."""
        W = weight_out_in(self.original)
        return W.full_tensor() if isinstance(W, DTensor) else W

    def _conv(self, x: Tensor, W: Tensor) -> Tensor:
        """The target conv's patch map (stride, padding and its mode, dilation) with the (k, in * kH * kW)
        matrix W as filters, channels-last: x (batch, in, H, W) -> (batch, H_out, W_out, k)."""
        filters = W.view(W.shape[0], *self.original.weight.shape[1:])
        # nn.Conv2d's own conv with other filters: its padding modes and 'same' padding come with it
        return self.original._conv_forward(x, filters, None).movedim(1, -1)

    def inner_acts(self, x: Tensor) -> Tensor:
        """h_c = V[c] · a: (..., C). For an embedding `a` is the one-hot token, so h = V[:, token]; for a
        conv, `a` is each input patch and h is (batch, H_out, W_out, C)."""
        return self._times(x, self.components.factors()[1])

    def matrix_input(self, x: Tensor) -> Tensor:
        """The input as rows the (d_out, d_in) weight multiplies, (..., d_in): x itself, or for a conv its
        patches (batch, H_out, W_out, in * kH * kW). What `vector_mlp` / `shared_mlp` CI functions read."""
        if not self.is_conv:
            return x
        conv = self.original
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)  # what _conv_forward pads, 'same' too
        patches = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (B, d_in, L)
        H_out, W_out = ((n - d * (k - 1) - 1) // s + 1 for n, k, s, d in
                        zip(padded.shape[-2:], conv.kernel_size, conv.stride, conv.dilation))
        return patches.view(x.shape[0], -1, H_out, W_out).movedim(1, -1)

    def _times(self, x: Tensor, W: Tensor) -> Tensor:
        """The layer's input map with the (d_out, d_in) matrix W in place of its weight, no bias: (..., d_out),
        a conv's channels-last."""
        if self.is_conv:
            return self._conv(x, W)
        return F.embedding(x, W.T) if self.is_embedding else x @ W.T

    def _masked_forward(self, x: Tensor, mask: Tensor, delta_mask: Tensor | None, inner: Tensor | None) -> Tensor:
        U, _ = self.components.factors()
        inner = inner if inner is not None else self.inner_acts(x)  # a conv's: channels-last
        if delta_mask is None:
            out = (inner * mask) @ U.T
        else:
            # (h * m) U^T + d a (W - UV)^T with h = a V^T is (h * (m - d)) U^T + d a W^T: the same, without
            # forming UV (C d_in d_out flops and its backward), and a W^T needs no weight gradient.
            d = delta_mask.unsqueeze(-1)
            out = (inner * (mask - d)) @ U.T + d * self._times(x, self.target_weight())
        bias = getattr(self.original, "bias", None)
        out = out if bias is None else out + bias
        return out.movedim(-1, 1) if self.is_conv else out  # (batch, out, H_out, W_out), as the target's

    MASK_STATE = ("mask", "delta_mask", "inner", "rows")  # what `ComponentModel.masked` sets for one forward

    def mask_state(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, a) for a in self.MASK_STATE)

    def set_mask_state(self, state: tuple[Tensor | None, ...]) -> None:
        for a, v in zip(self.MASK_STATE, state):
            setattr(self, a, v)

    def _layer(self, x: Tensor) -> Tensor:
        """The base layer's computation on its input x (..., d_in): the target's, or the masked components'."""
        if self.cache_input:
            self.last_input = x
        if self.mask is None:
            return self.base.forward(self.original, x)
        if self.rows is None:
            return self._masked_forward(x, self.mask, self.delta_mask, self.inner)
        # Routed: the target everywhere, the components on this module's examples or positions only.
        r, target = self.rows, self.base.forward(self.original, x)
        if self.is_conv and r.dim() > 1:  # per output location: its patch is not a row of x, so mask everywhere
            return torch.where(r.unsqueeze(1), self._masked_forward(x, self.mask, self.delta_mask, self.inner), target)
        idx = r.nonzero(as_tuple=True)  # once: each boolean index would sync with the GPU again
        rows_of = lambda t: None if t is None else t[idx]  # noqa: E731
        return target.index_put(idx, self._masked_forward(x[idx], self.mask[idx], rows_of(self.delta_mask),
                                                          rows_of(self.inner)))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if not self.own_forward:
            return self._layer(*args, **kwargs)
        if self.mask is None and not self.cache_input:
            return self.original(*args, **kwargs)
        with BaseLayerCall(self.original.weight, self._layer):
            return self.original(*args, **kwargs)


class DecomposedExperts(nn.Module):
    """Stands in for an MoE experts module (`is_experts`) some of whose expert matrices are decomposed.

    While none of them is masked or caching its input, the original runs (any experts implementation).
    Otherwise every expert runs on every token, with input 0 where the router did not pick it: each
    expert matrix then has inputs, CI and masks per token like any other layer, at n_experts / top_k
    times the expert FLOPs. The gate, activation and post-norm are the module's own.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.matrices: dict[tuple[str, int], nn.Module] = {  # DecomposedModules replace the decomposed ones
            (p, e): ExpertLinear(original, p, e) for p in expert_params(original) for e in range(original.num_experts)}

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states (N, d), top_k_index and top_k_weights (N, top_k) -> (N, d)."""
        ex = self.original
        if not any(isinstance(m, DecomposedModule) and (m.mask is not None or m.cache_input)
                   for m in self.matrices.values()):
            return ex(hidden_states, top_k_index, top_k_weights)
        up, down = expert_params(ex)
        out = torch.zeros_like(hidden_states)
        for e in range(ex.num_experts):
            picked = top_k_index == e  # (N, top_k)
            routed = picked.any(-1, keepdim=True).to(hidden_states.dtype)
            h = self.matrices[up, e](hidden_states * routed)
            h = ex._apply_gate(h) if ex.has_gate else ex.act_fn(h)
            h = self.matrices[down, e](h * routed)  # * routed: a bias or gate may be nonzero at input 0
            if ex.has_post_expert_norm:
                h = ex.post_expert_norm(h)
            out = out + h * (top_k_weights * picked).sum(-1, keepdim=True)
        return out.to(hidden_states.dtype)
