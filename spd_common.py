"""The Stochastic Parameter Decomposition (SPD) method, shared by every experiment script. The components
and the layer types they stand in for are in spd_layers.py; what a run needs around the method (run dirs,
CLI, torchrun, checkpoints, resume) is in spd_run.py; typed YAML loading in spd_config.py.

Sections, in reading order (the causal-importance (CI) functions are in spd_ci.py):
  1. The SPD config: every generic hyperparameter, with one-line docs.
  2. ComponentModel: attaches components to an unmodified target model by module-name pattern.
  3. Masks and losses.
  4. Evaluation metrics.
  5. The `optimize` loop: `train_step` and the loop around it (its checkpoints: spd_run.py).

Shapes: `...` is any batch shape (batch, or batch x seq); C is the number of subcomponents of a
module; a module's weight is seen as a (d_out, d_in) matrix W, approximated by U (d_out, C) @ V (C, d_in).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor
from tqdm import tqdm

from spd_config import SPDError, config_to_dict, option
from spd_ci import GlobalCI, hard_sigmoids, make_ci_fn
from spd_kernels import KLDivLogits, counter_uniform
from spd_layers import (Components, DecomposedExperts, DecomposedModule, ExpertLinear, check_decomposable,
                        decomposable_modules, runs_own_forward, weight_out_in)
from spd_fsdp import ShardedLoss, local_megabytes
from spd_run import (Batch, Decomposition, Dist, MetricsLogger, Preempted, TrainState, average_gradients,
                     checkpoint_paths, clip_grad_norm, init_distributed, nonfinite_term, peak_rss_mb,
                     preemption_signals, rebalance_threads, resume_training, save_training_checkpoint, set_seed,
                     split_batch, step_batches, step_generator, target_digest)


# ================================================================================================
# 1. The SPD config
# ================================================================================================


@dataclass
class SPDConfig:
    """Everything generic about one decomposition; experiment configs hold one under `spd:`."""

    modules: dict[str, int] = option({}, "module-name pattern (fnmatch) -> C, subcomponents per matched module")
    tied: dict[str, str] = option({}, "module -> module whose components it reuses transposed (TMS decoder)")
    ci_fn: Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp", "global_transformer"] = option(
        "mlp", "CI function: per subcomponent, per module, or one for all modules (global_*)")
    ci_hidden: list[int] = option([16], "hidden widths of the CI MLPs (global_transformer: [d_model])")
    ci_transformer_layers: int = option(2, "global_transformer: transformer blocks", ge=1)
    ci_transformer_heads: int = option(2, "global_transformer: attention heads (must divide d_model)", ge=1)
    ci_transformer_causal: bool = option(False, "global_transformer: causal attention (the reference's: bidirectional)")
    sigmoid: Literal["leaky_forward", "clamp_forward_leaky_backward"] = option(
        "leaky_forward", "CI for the masks: leaks below 0 (the paper's), or clamped, leaking in backward only")
    sampling: Literal["continuous", "binomial"] = option("continuous", "mask noise r ~ U(0,1) or {0,1}")
    n_mask_samples: int = option(1, "stochastic mask samples S per step", ge=1)
    use_delta_component: bool = option(True, "add W - UV as one extra stochastically masked component")
    faithfulness_warmup_steps: int = option(0, "steps fitting UV to W before training", ge=0)
    faithfulness_warmup_lr: float = option(0.01, "learning rate of the faithfulness warm-up", gt=0)
    faithfulness_warmup_weight_decay: float = option(0.1, "AdamW weight decay of the warm-up", ge=0)
    faithfulness_coeff: Optional[float] = option(None, "weight of ||W - UV||^2 (null = not computed)", ge=0)
    stochastic_recon_coeff: Optional[float] = option(1.0, "weight of the all-layers stochastic recon loss", ge=0)
    stochastic_recon_layerwise_coeff: Optional[float] = option(1.0, "weight of the one-module-at-a-time recon loss",
                                                              ge=0)
    layerwise_routed: bool = option(False, "layerwise loss in one forward, each example masking one random module")
    stochastic_recon_routing: Literal["all", "uniform_k_subset"] = option(
        "all", "modules the stochastic recon loss masks per position: all, or a random k ~ U{1..M} of them")
    routing_unit: Literal["position", "example"] = option(
        "position", "routing draws its modules per position (token; the reference's) or per example (sequence)")
    pgd_recon_coeff: Optional[float] = option(None, "weight of the recon loss under adversarial (PGD) masks", ge=0)
    pgd_routing: Literal["all", "uniform_k_subset"] = option(
        "all", "modules the PGD recon loss masks per position: all, or a random k ~ U{1..M} (PGD recon subset)")
    pgd_steps: int = option(1, "adversary's ascent steps per training step (persistent: before the loss)", ge=0)
    pgd_step_size: float = option(0.1, "PGD sign step on the mask sources in [0, 1] (persistent: Adam's lr)", gt=0)
    pgd_init: Literal["random", "ci"] = option("random", "adversary's start: uniform sources, or masks = CI")
    pgd_scope: Literal["all", "layerwise"] = option("all", "adversarial masks on all modules jointly, or one at a time")
    pgd_source_scope: Literal["shared_across_batch", "per_example", "per_position"] = option(
        "per_position", "one adversarial source per component for the whole batch, per example, or per position")
    pgd_persistent: bool = option(False, "carry the sources across steps (param-decomp's persistent PGD, own Adam)")
    pgd_lr_warmup_frac: float = option(0.01, "persistent PGD: fraction of training with linear lr warm-up", ge=0, le=1)
    pgd_lr_final_frac: float = option(0.1, "persistent PGD: the lr falls by cosine to this fraction of pgd_step_size",
                                      ge=0, le=1)
    pgd_eval_steps: int = option(20, "PGD steps of the recon/pgd_* evaluation (0 = not evaluated)", ge=0)
    pgd_eval_step_size: float = option(0.1, "PGD sign step of the evaluation adversary", gt=0)
    pgd_eval_source_scope: Literal["shared_across_batch", "per_example", "per_position"] = option(
        "shared_across_batch", "source scope of the evaluation adversary (the reference's: shared)")
    ci_masked_recon_coeff: Optional[float] = option(None, "weight of the recon loss with masks = CI", ge=0)
    importance_minimality_coeff: Optional[float] = option(3e-3, "weight of sum_c |g_c|^p", ge=0)
    importance_minimality_coeff_initial: Optional[float] = option(
        None, "start the weight of sum_c |g_c|^p here, linearly reaching importance_minimality_coeff (null = fixed)",
        ge=0)
    importance_minimality_anneal_start_frac: float = option(
        0.0, "fraction of training where that weight starts to fall from importance_minimality_coeff_initial",
        ge=0, le=1)
    importance_minimality_anneal_end_frac: float = option(
        0.5, "fraction of training where that weight reaches importance_minimality_coeff", ge=0, le=1)
    importance_minimality_beta: Optional[float] = option(
        None, "beta of the reference's frequency term: + beta sum_c mean_c log2(1 + sum_c) on (g + eps)^p", ge=0)
    factor_l1_coeff: Optional[float] = option(None, "weight of the mean |entry| of the factors U and V", ge=0)
    factor_l2_coeff: Optional[float] = option(None, "weight of the mean squared entry of the factors U and V", ge=0)
    p: float = option(1.0, "exponent p of the importance-minimality loss", gt=0)
    p_anneal_final: Optional[float] = option(None, "anneal p linearly to this value (null = no annealing)", gt=0)
    p_anneal_start_frac: float = option(0.0, "fraction of training where p annealing starts", ge=0, le=1)
    p_anneal_end_frac: float = option(1.0, "fraction of training where p annealing ends", ge=0, le=1)
    output_loss: Literal["mse", "kl"] = option("mse", "output distance: MSE (toys) or KL of next-token dists (LMs)")
    optimizer: Literal["adam", "adamw"] = option("adam", "optimizer")
    lr: float = option(1e-3, "peak learning rate", gt=0)
    weight_decay: float = option(0.0, "weight decay: decoupled under adamw, an L2 term in the gradient under adam",
                                 ge=0)
    lr_schedule: Literal["constant", "cosine", "cosine_quarter", "linear"] = option(
        "cosine", "decay after warm-up: cosine = half period, cosine_quarter = cos(0.5 pi t), both to lr_final_frac")
    lr_warmup_frac: float = option(0.0, "fraction of steps with linear lr warm-up", ge=0, le=1)
    lr_final_frac: float = option(0.0, "cosine / linear decay ends at this fraction of lr (the reference's LM: 0.1)",
                                  ge=0, le=1)
    grad_clip: Optional[float] = option(None, "clip the global grad norm to this (null = off)", gt=0)
    steps: int = option(10_000, "optimisation steps", ge=1)
    batch_size: int = option(4096, "examples per step", ge=1)
    eval_every: int = option(1000, "evaluate every N steps (and at the end)", ge=1)
    eval_batch_size: int = option(4096, "examples per evaluation batch", ge=1)
    grad_accum_steps: int = option(1, "split each step's batch into this many micro-batches (less memory)", ge=1)
    autocast_bf16: bool = option(False, "run forward passes under bf16 autocast (for CUDA; slow on CPU)")
    compile: bool = option(False, "torch.compile the target model (the forward every loss runs through)")
    checkpoint_blocks: Optional[str] = option(None, "recompute these target modules' activations in backward "
                                                    "(fnmatch pattern, e.g. model.layers.*): less memory, more time")
    checkpoint_ci: bool = option(False, "recompute the CI functions' activations in backward: less memory, more time")
    fsdp: bool = option(False, "under torchrun: shard components, CI functions and optimizer state (FSDP2)")
    fsdp_blocks: Optional[str] = option(None, "with fsdp: also shard these target modules' frozen weights (fnmatch, "
                                              "e.g. model.layers.*)")
    log_every: int = option(100, "write training losses to metrics.jsonl every N steps", ge=1)
    ci_threshold: float = option(0.1, "CI above this counts a subcomponent as active (L0, alive)", ge=0, le=1)
    checkpoint_every: Optional[int] = option(1000, "save a checkpoint every N steps, for --resume (null = none)", ge=1)
    keep_checkpoints: int = option(3, "keep the newest N periodic checkpoints (final.pt is always kept)", ge=1)
    on_nan: Literal["stop", "skip"] = option("stop", "a nan/inf loss or gradient stops the run, or skips that step")
    seed: int = option(0, "seed of parameters, data and masks")
    device: str = option("auto", "'auto' (cuda if available), 'cpu' or 'cuda[:i]' (under torchrun: not cuda:i)")
    threads: Optional[int] = option(None, "torch CPU threads (null: OMP_NUM_THREADS if set, else an equal share "
                                          "of the cores with the other spd runs here)", ge=1)
    wandb_project: Optional[str] = option(None, "log to this wandb project (null = no wandb)")

    def __post_init__(self) -> None:
        """Checks that involve more than one field or value (single-field bounds are in the metadata)."""
        for pattern, C in self.modules.items():
            if C < 1:
                raise SPDError(f"key 'spd.modules.{pattern}' = {C}: C must be >= 1")
        for anneal in ("p_anneal", "importance_minimality_anneal"):
            start, end = getattr(self, f"{anneal}_start_frac"), getattr(self, f"{anneal}_end_frac")
            if start > end:
                raise SPDError(f"{anneal}_start_frac = {start} must be <= {anneal}_end_frac = {end}")
        if self.importance_minimality_coeff_initial is not None and not self.importance_minimality_coeff:
            raise SPDError("spd.importance_minimality_coeff_initial anneals towards spd.importance_minimality_coeff, "
                           "which is off; set it to a positive value or importance_minimality_coeff_initial=null")
        if self.pgd_routing != "all" and self.pgd_scope != "all":
            raise SPDError("spd.pgd_routing picks the modules the adversary masks together; it needs spd.pgd_scope=all")
        if self.pgd_persistent and self.grad_accum_steps > 1:
            raise SPDError("spd.pgd_persistent keeps one adversary per batch position, which micro-batches would "
                           "share; set spd.grad_accum_steps=1 or spd.pgd_persistent=false")
        coeffs = [f.name for f in dataclasses.fields(self) if f.name.endswith("_coeff")]
        if not any(getattr(self, c) for c in coeffs):
            raise SPDError(f"no loss term is on: set at least one of {', '.join(coeffs)} to a positive value")


# ================================================================================================
# 2. ComponentModel
# ================================================================================================
def _key(name: str) -> str:
    return name.replace(".", "-")  # ModuleDict keys may not contain dots


def _swap(target: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` in the target where module `name` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(target.get_submodule(parent_name) if parent_name else target, child, new)
    return new


class ComponentModel(nn.Module):
    """A frozen target model with some modules decomposed into components, each with a CI function.

    `patterns` maps fnmatch patterns over module names (`decomposable_modules`) to C. The target's code is
    untouched, but its module tree is not: each matched module is swapped, in place, for a `DecomposedModule`
    that runs the original unless masks are set (an MoE expert's matrix: its experts module for a
    `DecomposedExperts`). `restore_target()` swaps the originals back; `factors(name)` gives U and V.
    """

    def __init__(self, target: nn.Module, patterns: dict[str, int], tied: dict[str, str],
                 ci_fn: str, ci_hidden: list[int], ci_layers: int = 2, ci_heads: int = 2,
                 sigmoid: str = "leaky_forward", ci_causal: bool = False):
        super().__init__()
        target.requires_grad_(False)
        target.eval()
        self.target = target
        found = decomposable_modules(target)
        if not patterns:
            raise SPDError(f"no modules to decompose: set spd.modules, e.g. {{{next(iter(found), 'fc1')}: 20}}")
        self.C: dict[str, int] = {}
        for pattern, C in patterns.items():
            matches = [n for n in found if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                raise SPDError(f"module pattern '{pattern}' matches no nn.Linear/nn.Embedding/Conv1D (or nn.Conv2d, "
                               f"or MoE expert matrix) of the target; its modules are: {', '.join(found) or '(none)'}")
            for n in matches:
                self.C.setdefault(n, C)
        for name, src in tied.items():
            for n in (name, src):
                if n not in self.C:
                    raise SPDError(f"tied module '{n}' is not among the decomposed modules {list(self.C)}")
            if self.C[name] != self.C[src]:
                raise SPDError(f"tied modules '{name}' and '{src}' need the same C")
        self.ci_reads_inner_acts = ci_fn == "mlp"
        self.checkpoint_ci = False  # spd.checkpoint_ci: see ci_call
        self.sigmoid = sigmoid
        self.components = nn.ModuleDict()
        self.ci_fns = nn.ModuleDict()
        self.decomposed: dict[str, DecomposedModule] = {}
        self.global_ci = ci_fn.startswith("global")
        ci_in: dict[str, int] = {}  # what each module's CI function reads: d_in (an embedding: C)
        # Sources before the modules tied to them, so that their components exist.
        for name in [n for n in self.C if n not in tied] + [n for n in self.C if n in tied]:
            original = found[name]
            check_decomposable(name, original)
            d_out, d_in = weight_out_in(original).shape
            src = self.components[_key(tied[name])] if name in tied else None
            comps = Components(d_in, d_out, self.C[name], tied_to=src)
            self.components[_key(name)] = comps
            ci_in[name] = self.C[name] if isinstance(original, nn.Embedding) else d_in
            if not self.global_ci:
                self.ci_fns[_key(name)] = make_ci_fn(ci_fn, self.C[name], ci_in[name], ci_hidden)
            wrapper = DecomposedModule(original, comps, runs_own_forward(name, original))
            if isinstance(original, ExpertLinear):  # its experts module, wrapped once, runs it in the expert's place
                experts_name = name.rsplit(".", 2)[0]
                experts = target.get_submodule(experts_name)
                if not isinstance(experts, DecomposedExperts):
                    experts = _swap(target, experts_name, DecomposedExperts(experts))
                experts.matrices[original.param, original.e] = wrapper
            else:
                _swap(target, name, wrapper)
            self.decomposed[name] = wrapper
        self.names = list(self.decomposed)
        if self.global_ci:  # ci_in is in the order of self.names
            self.ci_fns["global"] = GlobalCI(ci_fn, ci_in, {n: self.C[n] for n in self.names}, ci_hidden, ci_layers,
                                             ci_heads, ci_causal)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Module `name`'s subcomponents: U (d_out, C) and V (C, d_in); the c-th is U[:, c] V[c]."""
        return self.decomposed[name].components.factors()

    def restore_target(self) -> nn.Module:
        """Put the target's original modules back where the wrappers are and return the target, as it was
        before decomposition (still frozen); this ComponentModel no longer runs it afterwards."""
        for name, wrapper in self.decomposed.items():
            if isinstance(wrapper.original, ExpertLinear):
                experts_name = name.rsplit(".", 2)[0]
                experts = self.target.get_submodule(experts_name)
                if isinstance(experts, DecomposedExperts):
                    _swap(self.target, experts_name, experts.original)
            else:
                _swap(self.target, name, wrapper.original)
        return self.target

    @classmethod
    def from_config(cls, target: nn.Module, spd: SPDConfig) -> ComponentModel:
        """Decompose `target` as the config's `spd:` section says (modules, tied, CI function)."""
        return cls(target, spd.modules, spd.tied, spd.ci_fn, spd.ci_hidden, spd.ci_transformer_layers,
                   spd.ci_transformer_heads, spd.sigmoid, spd.ci_transformer_causal)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The target's forward (masks, if any, were set by `masked`). One dict argument is passed as
        keyword arguments (e.g. a transformers model's input_ids and attention_mask)."""
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            args, kwargs = (), args[0]
        return self.target(*args, **kwargs)

    @contextmanager
    def masked(self, masks: dict[str, Tensor], delta_masks: dict[str, Tensor] | None = None,
               inner: dict[str, Tensor] | None = None, rows: dict[str, Tensor] | None = None):
        """Within the block, module n runs its components with mask masks[n] (the others: the target).
        `inner[n]`, if given, are module n's inner acts, reused instead of recomputed: valid only when
        n's input is the target's (e.g. n alone is masked). `rows[n]` (batch,) bool, if given: only
        those examples run n's components, the others its target weight."""
        try:
            for n, m in masks.items():
                mod = self.decomposed[n]
                mod.mask = m
                mod.delta_mask = delta_masks[n] if delta_masks else None
                mod.inner = inner.get(n) if inner else None
                mod.rows = rows[n] if rows else None
            yield
        finally:
            for mod in self.decomposed.values():
                mod.set_mask_state((None,) * len(mod.MASK_STATE))

    def blocks(self, pattern: str, option: str) -> list[tuple[str, nn.Module]]:
        """(name, module) of the outermost target modules matching `pattern` (fnmatch's * crosses dots);
        SPDError naming spd.`option` if none."""
        blocks: list[tuple[str, nn.Module]] = []
        for n, m in self.target.named_modules():
            if n and fnmatch.fnmatchcase(n, pattern) and not any(n.startswith(f"{b}.") for b, _ in blocks):
                blocks.append((n, m))
        if not blocks:
            raise SPDError(f"spd.{option} = '{pattern}' matches no module of the target; e.g. model.layers.*")
        return blocks

    def checkpoint_blocks(self, pattern: str) -> list[str]:
        """Activation checkpointing: the target modules matching `pattern` keep only their inputs for
        backward and run again there, under the masks they ran with (a forward's masks are gone by
        the time the step's one backward runs). Returns the names of the modules."""
        from torch.utils.checkpoint import checkpoint

        blocks = self.blocks(pattern, "checkpoint_blocks")

        def masks_as_now() -> tuple[Any, Any]:  # (forward context, recomputation context)
            then = {mod: mod.mask_state() for mod in self.decomposed.values()}

            @contextmanager
            def restored():
                now = {mod: mod.mask_state() for mod in then}
                for mod, state in then.items():
                    mod.set_mask_state(state)
                try:
                    yield
                finally:
                    for mod, state in now.items():
                        mod.set_mask_state(state)
            return contextlib.nullcontext(), restored()

        for _, block in blocks:
            def forward(*args: Any, _forward: Callable = block.forward, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                return checkpoint(_forward, *args, use_reentrant=False, context_fn=masks_as_now, **kwargs)
            block.forward = forward
        return [n for n, _ in blocks]

    @torch.no_grad()
    def run_target(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """Target output and the input of every decomposed module."""
        for mod in self.decomposed.values():
            mod.cache_input = True
        try:
            out = self(*args, **kwargs)
        finally:
            for mod in self.decomposed.values():
                mod.cache_input = False
        inputs = {n: mod.last_input for n, mod in self.decomposed.items()}
        for mod in self.decomposed.values():
            mod.last_input = None
        return out, inputs

    def inner_acts(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inner acts (..., C) of every module on its target input (with gradients to V)."""
        return {n: mod.inner_acts(inputs[n]) for n, mod in self.decomposed.items()}

    def causal_importances(self, inputs: dict[str, Tensor], inner: dict[str, Tensor] | None = None
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """CI per module (..., C): (lower-leaky for masks, upper-leaky for importance minimality).
        `inner`: the modules' inner acts on `inputs`, if already computed."""
        if self.global_ci:
            ci_inputs = {n: self.ci_input(n, inputs[n], None if inner is None else inner[n]) for n in self.names}
            pre = self.ci_call(self.ci_fns["global"], ci_inputs)
            pairs = {n: hard_sigmoids(p, self.sigmoid) for n, p in pre.items()}
            return {n: lo for n, (lo, _) in pairs.items()}, {n: up for n, (_, up) in pairs.items()}
        lower, upper = {}, {}
        for n in self.decomposed:
            lower[n], upper[n] = self.module_ci(n, inputs[n], None if inner is None else inner[n])
        return lower, upper

    def ci_input(self, name: str, x: Tensor, inner: Tensor | None = None) -> Tensor:
        """What module `name`'s CI function reads on its input x: its inner acts (ci_fn = mlp, and any
        embedding, whose input is token ids) or x itself (a conv's: its input patches)."""
        mod = self.decomposed[name]
        if self.ci_reads_inner_acts or mod.is_embedding:
            return inner if inner is not None else mod.inner_acts(x)
        return mod.matrix_input(x)  # a conv's: its patches, channels-last

    def module_ci(self, name: str, x: Tensor, inner: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """CI (..., C) of one module on its input x, (lower-leaky, upper-leaky); `inner`: its inner
        acts on x, if already computed."""
        if self.global_ci:
            raise SPDError("a global CI function reads every module's input at once: use causal_importances")
        return self.ci_call(lambda z: self.ci_fns[_key(name)].ci(z, self.sigmoid), self.ci_input(name, x, inner))

    def ci_call(self, ci_fn: Callable, x: Any) -> Any:
        """ci_fn(x); with checkpoint_ci, its activations are not kept for backward but recomputed there."""
        if self.checkpoint_ci and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(ci_fn, x, use_reentrant=False)
        return ci_fn(x)

    def per_input(self, ci: dict[str, Tensor]) -> dict[str, Tensor]:
        """CI with a conv module's locations reduced: (batch, H_out, W_out, C) -> (batch, C) by the max over
        locations, so that a subcomponent fires on an image when it fires at some location, and every
        module of a CNN has one row per image. Other modules' CI (tokens of a sequence model included) is
        returned unchanged."""
        return {n: g.amax(dim=(1, 2)) if self.decomposed[n].is_conv else g for n, g in ci.items()}

    @torch.no_grad()
    def ci_of(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """CI (lower-leaky, the one masks use) of every decomposed module on one input batch."""
        _, inputs = self.run_target(*args, **kwargs)
        return self.causal_importances(inputs)[0]

    def untied_names(self) -> list[str]:
        return [n for n in self.names if not self.decomposed[n].components.tied]

    def weight_deltas(self) -> dict[str, Tensor]:
        """W - UV per untied module (a tied module's delta is its source's, transposed)."""
        return {n: self.decomposed[n].target_weight() - self.decomposed[n].components.weight()
                for n in self.untied_names()}

    def decomposition_state(self) -> dict[str, Any]:
        """What a checkpoint holds of the model: components and CI functions, not the (frozen) target."""
        return {"components": self.components.state_dict(), "ci_fns": self.ci_fns.state_dict()}

    def load_decomposition_state(self, state: dict[str, Any]) -> None:
        self.components.load_state_dict(state["components"])
        self.ci_fns.load_state_dict(state["ci_fns"])


# ================================================================================================
# 3. Masks and losses
# ================================================================================================
def global_uniform(shape: torch.Size, like: Tensor, ddp: Dist = Dist(), generator: torch.Generator | None = None
                   ) -> Tensor:
    """U(0, 1) noise of this rank's `shape` (rows first), of like's dtype and device: this rank's rows of
    one counter-based draw for the global batch (spd_kernels.counter_uniform), so N processes sample
    exactly what one process with the same global batch does, and every machine the same numbers."""
    return counter_uniform(shape, ddp.rank * math.prod(shape), generator, like.device).to(like.dtype)


def sample_masks(ci: dict[str, Tensor], sampling: str, use_delta: bool, generator: torch.Generator | None = None,
                 ddp: Dist = Dist()) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """m = g + (1 - g) r with r ~ U(0, 1) (continuous) or {0, 1} (binomial); the delta mask is r alone.
    The noise is drawn for the global batch (global_uniform)."""
    def noise(shape: torch.Size, like: Tensor) -> Tensor:
        r = global_uniform(shape, like, ddp, generator)
        return (r < 0.5).to(like.dtype) if sampling == "binomial" else r

    masks = {n: torch.lerp(g, g.new_ones(()), noise(g.shape, g)) for n, g in ci.items()}  # one op, same to an ulp
    deltas = {n: noise(g.shape[:-1], g) for n, g in ci.items()} if use_delta else None
    return masks, deltas


def output_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """MSE: mean over all elements. KL(target || pred) of softmax over the last dim, mean over positions
    (differentiable in pred; it keeps one logits-sized tensor for backward, not two: `KLDivLogits`)."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    return KLDivLogits.apply(pred, target)


def faithfulness_loss(model: ComponentModel) -> Tensor:
    """sum ||W - UV||^2 / (number of decomposed parameters), over untied modules."""
    deltas = model.weight_deltas().values()
    return sum((d ** 2).sum() for d in deltas) / sum(d.numel() for d in deltas)


def factor_penalty(model: ComponentModel, power: int) -> Tensor:
    """Mean of |entry|^power over every entry of the untied modules' factors U and V (the research notes'
    L1 / L2 regularisers of the components, weighed against importance minimality)."""
    factors = [f for n in model.untied_names() for f in model.factors(n)]
    return sum(f.abs().pow(power).sum() for f in factors) / sum(f.numel() for f in factors)


def importance_minimality_loss(ci_upper: dict[str, Tensor], p: float, eps: float = 1e-12) -> Tensor:
    """sum over modules and subcomponents of (g + eps)^p, each module's mean over its examples (batch and seq
    positions, or a conv's output locations: a conv module counts as much per image as a linear one)."""
    return sum(((g + eps) ** p).sum() / g.shape[:-1].numel() for g in ci_upper.values())


def linear_anneal(start: float, end: float, frac: float, start_frac: float, end_frac: float) -> float:
    """`start` until start_frac of training, then linearly to `end` at end_frac, then `end`."""
    t = min(max((frac - start_frac) / max(end_frac - start_frac, 1e-12), 0.0), 1.0)
    return start + t * (end - start)


def annealed_p(cfg: SPDConfig, frac: float) -> float:
    """p, linearly annealed towards p_anneal_final between the start and end fractions of training."""
    if cfg.p_anneal_final is None:
        return cfg.p
    return linear_anneal(cfg.p, cfg.p_anneal_final, frac, cfg.p_anneal_start_frac, cfg.p_anneal_end_frac)


def annealed_importance_coeff(cfg: SPDConfig, frac: float) -> float | None:
    """beta3: importance_minimality_coeff_initial until importance_minimality_anneal_start_frac of training,
    then linearly to importance_minimality_coeff at importance_minimality_anneal_end_frac, then held.
    Starting high prices out the cheap subcomponents shared by several inputs before they form; ending
    low lets the CI values of the remaining ones settle at 1."""
    if cfg.importance_minimality_coeff_initial is None:
        return cfg.importance_minimality_coeff
    return linear_anneal(cfg.importance_minimality_coeff_initial, cfg.importance_minimality_coeff, frac,
                         cfg.importance_minimality_anneal_start_frac, cfg.importance_minimality_anneal_end_frac)


def masked_recon_loss(model: ComponentModel, x: Tensor, target_out: Tensor, masks: dict[str, Tensor],
                      delta_masks: dict[str, Tensor] | None, kind: str, output_fn: Callable[[Any], Tensor],
                      inner: dict[str, Tensor] | None = None, rows: dict[str, Tensor] | None = None) -> Tensor:
    with model.masked(masks, delta_masks, inner, rows):
        return output_loss(output_fn(model(x)), target_out, kind)


@dataclass
class StepBatch:
    """One (micro-)batch as every loss of a step reads it, built once by `StepBatch.of`: the model and its
    input, the target's output and the decomposed modules' inputs, how outputs are compared, the
    process group, and (where computed once for several losses) the modules' inner acts."""
    model: ComponentModel
    x: Any  # the model's input
    target_out: Tensor  # output_fn of the target's output
    inputs: dict[str, Tensor]  # each decomposed module's input in the target pass
    output_fn: Callable[[Any], Tensor]  # model output -> what the output loss compares
    output_loss: str = "mse"  # spd.output_loss
    ddp: Dist = dataclasses.field(default_factory=Dist)
    inner: dict[str, Tensor] | None = None  # inner acts (..., C) on `inputs`, with gradients to V

    @classmethod
    def of(cls, model: ComponentModel, x: Any, output_fn: Callable[[Any], Tensor], output_loss: str,
           ddp: Dist = Dist(), with_inner: bool = False) -> StepBatch:
        target_out, inputs = model.run_target(x)
        inner = model.inner_acts(inputs) if with_inner else None
        return cls(model, x, output_fn(target_out), inputs, output_fn, output_loss, ddp, inner)

    def recon(self, masks: dict[str, Tensor], deltas: dict[str, Tensor] | None = None,
              rows: dict[str, Tensor] | None = None, inner: dict[str, Tensor] | None = None) -> Tensor:
        """The output loss against the target when module n runs its components masked by masks[n]
        (on rows[n] only, if routed) and every other module the target."""
        return masked_recon_loss(self.model, self.x, self.target_out, masks, deltas, self.output_loss, self.output_fn,
                                 inner, rows)


def layerwise_recon_loss(b: StepBatch, masks: dict[str, Tensor], deltas: dict[str, Tensor] | None,
                         inner: dict[str, Tensor] | None = None, route: Tensor | None = None) -> Tensor:
    """Mean over modules of the loss when only that module is masked (the others run the target):
    one forward per module. A module masked alone sees the target's input, so `inner` (its inner acts
    there) can be reused. With `route` (module indices per example or per position), one forward instead,
    in which example (position) b masks module route[b] alone: for a loss that is a mean over them and a
    route drawn uniformly, an unbiased estimate of the same mean, at a cost that does not grow with the
    modules."""
    if route is not None:
        return b.recon(masks, deltas, route_rows(route, list(masks)), inner)
    losses = [b.recon({n: m}, {n: deltas[n]} if deltas else None, inner=inner) for n, m in masks.items()]
    return sum(losses) / len(losses)


def mask_samples(ci: dict[str, Tensor], cfg: SPDConfig, ddp: Dist) -> list[tuple[dict[str, Tensor], dict | None]]:
    """spd.n_mask_samples draws of (masks, delta masks) from the CI (see sample_masks)."""
    return [sample_masks(ci, cfg.sampling, cfg.use_delta_component, ddp=ddp) for _ in range(cfg.n_mask_samples)]


def stochastic_recon_loss(b: StepBatch, samples: list[tuple[dict[str, Tensor], dict | None]], routing: str,
                          unit: str) -> Tensor:
    """The paper's stochastic recon loss, its mean over the mask samples; with `routing`, each sample masks
    a random subset of the modules at each position (or example: `unit`), the others running the target."""
    losses = [b.recon(masks, deltas, draw_rows(masks, routing, unit, b.ddp)) for masks, deltas in samples]
    return sum(losses) / len(losses)


def stochastic_recon_layerwise_loss(b: StepBatch, samples: list[tuple[dict[str, Tensor], dict | None]], routed: bool,
                                    unit: str) -> Tensor:
    """The paper's layerwise stochastic recon loss (one module masked at a time), its mean over the mask
    samples; `routed`: each position (or example) masks one random module, in one forward."""
    return sum(layerwise_recon_loss(b, masks, deltas, b.inner, draw_route(masks, unit, b.ddp) if routed else None)
               for masks, deltas in samples) / len(samples)


def routing_positions(masks: dict[str, Tensor], unit: str, ddp: Dist) -> tuple[int, ...]:
    """The shape of what routing draws its modules for, in the global batch (drawn whole on every rank, like
    the mask noise, so that N processes route as one does): every position (batch, seq, ... : the masks'
    leading axes, which every module must share) or every example (batch,)."""
    shapes = {tuple(m.shape[:-1]) for m in masks.values()}
    if unit == "example":
        if len({s[0] for s in shapes}) > 1:
            raise SPDError("routing modules per example needs masks whose first axis is the batch (MoE expert "
                           "matrices see tokens); set spd.stochastic_recon_routing=all and spd.pgd_routing=all")
        shapes = {s[:1] for s in shapes}
    elif len(shapes) > 1:
        raise SPDError(f"routing modules per position needs the same positions in every module, not {sorted(shapes)} "
                       f"(a conv's locations differ from a linear layer's); set spd.routing_unit=example")
    n, *rest = next(iter(shapes))
    return (n * ddp.world_size, *rest)


def draw_route(masks: dict[str, Tensor], unit: str, ddp: Dist = Dist()) -> Tensor:
    """A module index per position (or per example), uniform, this rank's part of the global draw."""
    g = next(iter(masks.values()))
    return ddp.shard(torch.randint(len(masks), routing_positions(masks, unit, ddp), device=g.device))


def route_rows(route: Tensor, names: list[str]) -> dict[str, Tensor]:
    """Bool per module from a route of module indices: the positions (or examples) that mask that module."""
    return {n: route == i for i, n in enumerate(names)}


def subset_rows(masks: dict[str, Tensor], k: Tensor, ddp: Dist = Dist()) -> dict[str, Tensor]:
    """Bool per module: global position b masks a uniformly random k[b] of the M modules.
    k: (global positions..., 1) in 1..M; the subsets are drawn for the global batch on every rank."""
    g = next(iter(masks.values()))
    rank_in_row = torch.rand(*k.shape[:-1], len(masks), device=g.device).argsort(-1).argsort(-1)  # a permutation each
    chosen = ddp.shard(rank_in_row < k)
    return {n: chosen[..., i] for i, n in enumerate(masks)}


def draw_rows(masks: dict[str, Tensor], routing: str, unit: str, ddp: Dist = Dist()) -> dict[str, Tensor] | None:
    """Which modules each position (`unit` = position) or example masks (the others run the target):
    all (None), or a uniformly random k ~ U{1..M} of the M (`uniform_k_subset`), so that one sequence
    mixes masked and unmasked modules across its tokens."""
    if routing == "all":
        return None
    g = next(iter(masks.values()))
    k = torch.randint(1, len(masks) + 1, (*routing_positions(masks, unit, ddp), 1), device=g.device)
    return subset_rows(masks, k, ddp)


def importance_frequency_loss(ci_upper: dict[str, Tensor], p: float, ddp: Dist = Dist(), eps: float = 1e-12
                              ) -> Tensor:
    """The reference's frequency part of importance minimality: per module, with a = (g + eps)^p summed
    over the N positions of the global batch, s_c = sum a_c, the sum over c of (s_c / N) log2(1 + s_c).
    It grows with how widely a subcomponent is used: one on every input costs more than two on half
    each, so many rarely used subcomponents are cheaper than a few always-on ones. The batch sums are
    global under torchrun (one all-reduce for all modules)."""
    local = torch.cat([((g + eps) ** p).flatten(0, -2).sum(0) for g in ci_upper.values()])
    n_positions = [g.shape[:-1].numel() * ddp.world_size for g in ci_upper.values()]
    sums = ddp.global_sum(local).split([g.shape[-1] for g in ci_upper.values()])
    return sum((s / n * torch.log2(1 + s)).sum() for s, n in zip(sums, n_positions))


# Adversarial (PGD) masks: m = g + (1 - g) s for a source s in [0, 1], and the delta mask is its source
# itself; any source in [0, 1] keeps m within [CI, 1]. A source is per component and, by its scope,
# shared by the whole batch, one per example or one per position (broadcast over the rest). The
# adversary ascends the recon loss in the sources with the CI and components held fixed; training then
# descends the loss at the adversary's masks, with gradients into the components and CI functions only.
# Sources are one dict: "mask/<module>" (..., C) and "delta/<module>" (...).
@dataclass(frozen=True)
class PGD:
    """One adversary's settings: the training one (`PGD.training(cfg)`) or the evaluation one."""
    steps: int  # ascent steps
    step_size: float  # sign step (persistent PGD: Adam's peak lr)
    init: str = "random"  # "random": uniform sources; "ci": 0, masks = CI and delta off
    source_scope: str = "per_position"  # "shared_across_batch" | "per_example" | "per_position"
    module_scope: str = "all"  # all modules masked together, or one at a time ("layerwise")

    @classmethod
    def training(cls, cfg: SPDConfig) -> PGD:
        return cls(cfg.pgd_steps, cfg.pgd_step_size, cfg.pgd_init, cfg.pgd_source_scope, cfg.pgd_scope)

    @classmethod
    def evaluation(cls, cfg: SPDConfig) -> PGD:
        """The reference's evaluation adversary: uniform start, all modules together, pgd_eval_* settings."""
        return cls(cfg.pgd_eval_steps, cfg.pgd_eval_step_size, "random", cfg.pgd_eval_source_scope, "all")

    @property
    def shared(self) -> bool:
        return self.source_scope == "shared_across_batch"

    def source_shape(self, mask_shape: torch.Size) -> tuple[int, ...]:
        """A mask source's shape for masks (..., C): (1, 1.., C) shared, (batch, 1.., C) per example."""
        if self.source_scope == "per_position":
            return tuple(mask_shape)
        return (1 if self.shared else mask_shape[0], *[1] * (len(mask_shape) - 2), mask_shape[-1])

    def initial_sources(self, ci: dict[str, Tensor], use_delta: bool, ddp: Dist = Dist(),
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Uniform sources (per example / position: drawn for the global batch, like the mask noise; shared:
        the same on every rank), or 0: masks = CI, delta off."""
        def start(shape: tuple[int, ...], like: Tensor) -> Tensor:
            if self.init == "ci":
                return like.new_zeros(shape)
            return global_uniform(torch.Size(shape), like, Dist() if self.shared else ddp, generator)
        sources = {f"mask/{n}": start(self.source_shape(g.shape), g) for n, g in ci.items()}
        if use_delta:
            sources |= {f"delta/{n}": start(self.source_shape(g.shape)[:-1], g) for n, g in ci.items()}
        return sources

    def global_mean_gradients(self, grads: list[Tensor], ddp: Dist) -> list[Tensor]:
        """Gradients of this rank's mean loss -> those of the global-batch mean loss (this rank's rows of
        them; shared sources: all of it, the same on every rank), so that N processes see what one does."""
        return [ddp.mean(g) if self.shared else g / ddp.world_size for g in grads]


def masks_from_sources(ci: dict[str, Tensor], sources: dict[str, Tensor]
                       ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    masks = {n: torch.lerp(g, g.new_ones(()), sources[f"mask/{n}"]) for n, g in ci.items()}  # broadcasts a source
    if f"delta/{next(iter(ci))}" not in sources:
        return masks, None
    return masks, {n: sources[f"delta/{n}"].expand(g.shape[:-1]) for n, g in ci.items()}


def scoped_recon_loss(b: StepBatch, masks: dict[str, Tensor], deltas: dict[str, Tensor] | None, pgd: PGD,
                      rows: dict[str, Tensor] | None = None, inner: dict[str, Tensor] | None = None) -> Tensor:
    """The recon loss with all (routed) modules masked together, or (module_scope layerwise) one at a time."""
    if pgd.module_scope == "layerwise":
        return layerwise_recon_loss(b, masks, deltas, inner)
    return b.recon(masks, deltas, rows)


def adversary_gradient(b: StepBatch, ci: dict[str, Tensor], sources: dict[str, Tensor], pgd: PGD,
                       rows: dict[str, Tensor] | None = None) -> list[Tensor]:
    """d(global-batch mean recon loss)/d(source) for each source, the CI and components held fixed."""
    leaves = {k: s.detach().requires_grad_() for k, s in sources.items()}
    masks, deltas = masks_from_sources({n: g.detach() for n, g in ci.items()}, leaves)
    inner = None if b.inner is None else {n: h.detach() for n, h in b.inner.items()}
    loss = scoped_recon_loss(b, masks, deltas, pgd, rows, inner)
    return pgd.global_mean_gradients(list(torch.autograd.grad(loss, list(leaves.values()))), b.ddp)


def pgd_sources(b: StepBatch, ci: dict[str, Tensor], pgd: PGD, use_delta: bool,
                generator: torch.Generator | None = None, rows: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """`pgd.steps` of projected sign-gradient ascent from pgd.init, each source kept in [0, 1]."""
    sources = pgd.initial_sources(ci, use_delta, b.ddp, generator)
    for _ in range(pgd.steps):
        grads = adversary_gradient(b, ci, sources, pgd, rows)
        sources = {k: (s + pgd.step_size * g.sign()).clamp(0, 1) for (k, s), g in zip(sources.items(), grads)}
    return sources


class PersistentAdversary:
    """param-decomp's persistent PGD: sources carried from step to step, ascended by their own Adam
    (betas (0.5, 0.99)) at a warm-up-then-cosine lr (peak pgd_step_size): pgd_steps warm-up ascents on
    all modules before the loss, then one more after the backward pass, from the training loss's own
    gradient (no extra forward). Per-example and per-position sources of the whole global batch live on
    every rank, which applies the same update from the gathered gradient, so that the state rank 0
    checkpoints is complete and a resumed run continues bit for bit."""

    betas, eps = (0.5, 0.99), 1e-8

    def __init__(self, state: dict[str, Tensor]) -> None:
        # "source/<k>", "adam_m/<k>", "adam_v/<k>" (global batch), "t": updated in place, so that `state`
        # (TrainState.adversary) is what every checkpoint saves
        self.state = state
        self.in_loss: dict[str, Tensor] = {}  # this step's sources as the training loss read them (their .grad)

    def local_sources(self, ci: dict[str, Tensor], pgd: PGD, use_delta: bool, ddp: Dist) -> dict[str, Tensor]:
        """This rank's sources, started on the first step (or for a new batch shape)."""
        g = next(iter(ci.values()))
        shape = pgd.source_shape(torch.Size((g.shape[0] * (1 if pgd.shared else ddp.world_size), *g.shape[1:])))
        source = self.state.get(f"source/mask/{next(iter(ci))}")
        if source is None or source.shape != shape:
            self.state.clear()
            self.state["t"] = torch.zeros((), device=g.device)
            for k, s in pgd.initial_sources(ci, use_delta, ddp).items():
                self.state[f"source/{k}"] = s if pgd.shared else ddp.gather(s)
                self.state[f"adam_m/{k}"] = torch.zeros_like(self.state[f"source/{k}"])
                self.state[f"adam_v/{k}"] = torch.zeros_like(self.state[f"source/{k}"])
        keys = [k.removeprefix("source/") for k in self.state if k.startswith("source/")]
        return {k: self.state[f"source/{k}"] if pgd.shared else ddp.shard(self.state[f"source/{k}"]) for k in keys}

    def ascend(self, grads: dict[str, Tensor], pgd: PGD, lr: float, ddp: Dist) -> None:
        """One Adam ascent step from this rank's part of the global-mean-loss gradients, clamped to [0, 1]."""
        (b1, b2), t = self.betas, self.state["t"].add_(1)
        for k, g in grads.items():
            g = g if pgd.shared else ddp.gather(g)
            m = self.state[f"adam_m/{k}"].lerp_(g, 1 - b1)
            v = self.state[f"adam_v/{k}"].mul_(b2).addcmul_(g, g, value=1 - b2)
            step = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + self.eps)
            self.state[f"source/{k}"].add_(lr * step).clamp_(0, 1)  # ascent: + the step

    def ascend_from_training_gradient(self, cfg: SPDConfig, step: int, ddp: Dist) -> None:
        """After the backward pass: the ascent step from the gradient the training loss left on the sources
        (pgd_recon_coeff times that of this rank's mean loss)."""
        pgd = PGD.training(cfg)
        grads = pgd.global_mean_gradients([s.grad / cfg.pgd_recon_coeff for s in self.in_loss.values()], ddp)
        self.ascend(dict(zip(self.in_loss, grads)), pgd, persistent_pgd_lr(cfg, step), ddp)
        self.in_loss = {}

    def snapshot(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def restore(self, snapshot: dict[str, Tensor]) -> None:
        self.state.clear()
        self.state.update(snapshot)


def persistent_pgd_lr(cfg: SPDConfig, step: int) -> float:
    """The persistent adversary's Adam lr: linear warm-up, then cosine from pgd_step_size to pgd_lr_final_frac of it."""
    return scheduled(cfg.pgd_step_size, step, cfg.steps, cfg.pgd_lr_warmup_frac, "cosine", cfg.pgd_lr_final_frac)


def pgd_recon_loss(b: StepBatch, ci: dict[str, Tensor], cfg: SPDConfig, adversary: PersistentAdversary | None = None,
                   step: int = 0) -> Tensor:
    """The recon loss at the adversary's masks (spd.pgd_persistent: `adversary`'s; else a fresh one), over a random
    subset of the modules per position with pgd_routing = uniform_k_subset (the reference's "PGD recon
    subset": the same subsets for the ascent and the loss), differentiable in the CI and components but
    not through the adversary's ascent."""
    pgd = PGD.training(cfg)
    rows = draw_rows(ci, cfg.pgd_routing, cfg.routing_unit, b.ddp)
    if cfg.pgd_persistent:
        for _ in range(pgd.steps):  # warm-up ascents, on all modules as in param-decomp
            sources = adversary.local_sources(ci, pgd, cfg.use_delta_component, b.ddp)
            grads = adversary_gradient(b, ci, sources, pgd)
            adversary.ascend(dict(zip(sources, grads)), pgd, persistent_pgd_lr(cfg, step), b.ddp)
        sources = adversary.local_sources(ci, pgd, cfg.use_delta_component, b.ddp)
        adversary.in_loss = sources = {k: s.detach().requires_grad_() for k, s in sources.items()}
    else:
        sources = pgd_sources(b, ci, pgd, cfg.use_delta_component, rows=rows)
        sources = {k: s.detach() for k, s in sources.items()}
    masks, deltas = masks_from_sources(ci, sources)
    return scoped_recon_loss(b, masks, deltas, pgd, rows, b.inner)


def loss_coefficients(cfg: SPDConfig, frac: float) -> dict[str, float]:
    """The weight of each loss term that is on at this fraction of training (the others are not computed)."""
    beta3 = annealed_importance_coeff(cfg, frac)
    coeffs = {"faithfulness": cfg.faithfulness_coeff, "stochastic_recon": cfg.stochastic_recon_coeff,
              "stochastic_recon_layerwise": cfg.stochastic_recon_layerwise_coeff,
              "ci_masked_recon": cfg.ci_masked_recon_coeff, "pgd_recon": cfg.pgd_recon_coeff,
              "importance_minimality": beta3, "factor_l1": cfg.factor_l1_coeff, "factor_l2": cfg.factor_l2_coeff,
              "importance_frequency": (beta3 or 0) * (cfg.importance_minimality_beta or 0)}
    return {k: c for k, c in coeffs.items() if c}


def training_losses(model: ComponentModel, cfg: SPDConfig, x: Any, frac: float, output_fn: Callable[[Any], Tensor],
                    ddp: Dist = Dist(), adversary: PersistentAdversary | None = None) -> dict[str, Tensor]:
    """The loss of one step on this rank's (micro-)batch x, at `frac` of training: every term whose
    coefficient is on, unweighted, and `total`, their weighted sum; each a mean over this rank's
    examples. `adversary`: persistent PGD's state (spd.pgd_persistent)."""
    coeffs = loss_coefficients(cfg, frac)
    # Inner acts on the target's inputs, computed once: the CI functions and the layerwise losses (where
    # each module sees the target's input) share them, which saves a (batch, d_in) x (d_in, C) matmul
    # and its backward per module and mask sample.
    reuse_inner = "stochastic_recon_layerwise" in coeffs or ("pgd_recon" in coeffs and cfg.pgd_scope == "layerwise")
    b = StepBatch.of(model, x, output_fn, cfg.output_loss, ddp, with_inner=model.ci_reads_inner_acts or reuse_inner)
    ci, ci_upper = model.causal_importances(b.inputs, b.inner)
    p = annealed_p(cfg, frac)
    # The masks, m = g + (1 - g) r: n_mask_samples draws for each stochastic loss
    stochastic = mask_samples(ci, cfg, ddp) if "stochastic_recon" in coeffs else []
    layerwise = mask_samples(ci, cfg, ddp) if "stochastic_recon_layerwise" in coeffs else []

    losses: dict[str, Tensor] = {}
    if "faithfulness" in coeffs:
        losses["faithfulness"] = faithfulness_loss(model)
    if "stochastic_recon" in coeffs:
        losses["stochastic_recon"] = stochastic_recon_loss(b, stochastic, cfg.stochastic_recon_routing,
                                                           cfg.routing_unit)
    if "stochastic_recon_layerwise" in coeffs:
        losses["stochastic_recon_layerwise"] = stochastic_recon_layerwise_loss(b, layerwise, cfg.layerwise_routed,
                                                                               cfg.routing_unit)
    if "ci_masked_recon" in coeffs:
        losses["ci_masked_recon"] = b.recon(ci)
    if "pgd_recon" in coeffs:
        losses["pgd_recon"] = pgd_recon_loss(b, ci, cfg, adversary, round(frac * cfg.steps))
    if "importance_minimality" in coeffs:
        losses["importance_minimality"] = importance_minimality_loss(ci_upper, p)
    if "importance_frequency" in coeffs:
        losses["importance_frequency"] = importance_frequency_loss(ci_upper, p, ddp)
    for power in (1, 2):
        if f"factor_l{power}" in coeffs:
            losses[f"factor_l{power}"] = factor_penalty(model, power)
    losses["total"] = sum(coeffs[k] * v for k, v in losses.items())  # the paper's weighted sum
    return losses


# ================================================================================================
# 4. Evaluation
# ================================================================================================
def pgd_eval_key(cfg: SPDConfig) -> str:
    """The evaluation adversary's metric, named by its scope and steps (comparable only at both), e.g.
    recon/pgd_shared_20."""
    scope = {"shared_across_batch": "shared"}.get(cfg.pgd_eval_source_scope, cfg.pgd_eval_source_scope)
    return f"recon/pgd_{scope}_{cfg.pgd_eval_steps}"


@torch.no_grad()
def evaluate(model: ComponentModel, cfg: SPDConfig, x: Tensor, output_fn: Callable[[Any], Tensor],
             generator: torch.Generator | None = None) -> dict[str, float]:
    """Generic metrics on one batch: per-module L0, fraction of CI >= 0.99, alive count, minimum CI; and the
    output loss against the target with masks = CI, masks = 1, stochastic masks (no delta) and
    adversarial masks (`recon/pgd_<scope>_<steps>`, a fresh adversary: `PGD.evaluation`); noise from
    `generator`, so that evaluating leaves the training's random stream untouched."""
    b = StepBatch.of(model, x, output_fn, cfg.output_loss)
    ci, _ = model.causal_importances(b.inputs)
    out: dict[str, float] = {}
    for n, g in ci.items():
        active = g > cfg.ci_threshold
        out[f"l0/{n}"] = active.sum(-1).float().mean().item()
        out[f"frac_ci_ge_0.99/{n}"] = (g >= 0.99).float().mean().item()
        out[f"n_alive/{n}"] = int(active.flatten(0, -2).any(0).sum().item())
        out[f"min_ci/{n}"] = g.min().item()
    ones = {n: torch.ones_like(g) for n, g in ci.items()}
    stoch, _ = sample_masks(ci, cfg.sampling, use_delta=False, generator=generator)
    for key, masks in (("ci_masked", ci), ("masks_one", ones), ("stochastic", stoch)):
        out[f"recon/{key}"] = b.recon(masks).item()
    if cfg.pgd_eval_steps:  # the worst case a fresh adversary finds (the reference's: 20 steps of 0.1, shared)
        pgd = PGD.evaluation(cfg)
        with torch.enable_grad():
            sources = pgd_sources(b, ci, pgd, cfg.use_delta_component, generator=generator)
        out[pgd_eval_key(cfg)] = b.recon(*masks_from_sources(ci, sources)).item()
    out["faithfulness"] = faithfulness_loss(model).item()
    return out


# ================================================================================================
# 5. optimize
# ================================================================================================
def scheduled(peak: float, step: int, steps: int, warmup_frac: float, schedule: str, final_frac: float) -> float:
    """Linear warm-up to `peak` over warmup_frac of the steps, then constant / cosine / quarter-cosine / linear
    decay from `peak` to final_frac * peak."""
    warmup = int(warmup_frac * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(steps - warmup, 1)
    decay = {"cosine": lambda: 0.5 * (1 + math.cos(math.pi * t)),
             "cosine_quarter": lambda: math.cos(0.5 * math.pi * t),  # the paper's TMS code: above `cosine` throughout
             "linear": lambda: 1 - t}.get(schedule)
    return peak if decay is None else peak * (final_frac + (1 - final_frac) * decay())


def lr_at(step: int, cfg: SPDConfig) -> float:
    """The components' and CI functions' learning rate at `step` (lr, lr_schedule, lr_warmup_frac, lr_final_frac)."""
    return scheduled(cfg.lr, step, cfg.steps, cfg.lr_warmup_frac, cfg.lr_schedule, cfg.lr_final_frac)


def autocast(cfg: SPDConfig, device: torch.device):
    """bf16 autocast of forward passes if cfg.autocast_bf16, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)


def faithfulness_warmup(model: ComponentModel, cfg: SPDConfig) -> float:
    """Fit UV to W alone for a few steps (AdamW) so training starts from a faithful decomposition."""
    params = list(model.components.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.faithfulness_warmup_lr, weight_decay=cfg.faithfulness_warmup_weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.faithfulness_warmup_steps):
        loss = faithfulness_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if not math.isfinite(loss.item()):
        raise SPDError(f"the faithfulness warm-up loss is {loss.item()}; lower spd.faithfulness_warmup_lr")
    return loss.item()


@dataclass
class Experiment:
    """What an experiment script's `build(cfg)` makes: the target wrapped for decomposition, and its data."""
    model: ComponentModel  # the target with its decomposed modules, CI functions attached
    train_batch: Callable[[int], Batch]  # step -> that training step's batch (a pure function of the step)
    eval_batch: Callable[[int], Batch]  # step -> a held-out batch
    output_fn: Callable[[Any], Tensor] = lambda out: out  # target output -> what the output loss compares
    input_fn: Callable[[Batch], Any] = lambda batch: batch  # batch -> the model's input (a dict: keyword args)
    tokenizer: Any = None  # language models only: decodes token ids (analysis shows contexts)

    @classmethod
    def fresh(cls, target: nn.Module, spd: SPDConfig, make: Callable[[int, int, int], Batch], **kw: Any) -> Experiment:
        """`target` wrapped in fresh components (seeded by spd.seed, on the target's device), trained on
        `make(batch_size, seed, step)`'s stream and evaluated on its held-out one (see step_batches)."""
        set_seed(spd.seed)
        model = ComponentModel.from_config(target, spd).to(next(target.parameters()).device)
        return cls(model, *step_batches(make, spd), **kw)


def train_step(model: ComponentModel, cfg: SPDConfig, opt: torch.optim.Optimizer, x: Any, step: int,
               output_fn: Callable[[Any], Tensor], ddp: Dist, adversary: PersistentAdversary | None = None,
               loss_fn: Callable[..., dict[str, Tensor]] = training_losses
               ) -> tuple[dict[str, Tensor], tuple[str, float] | None]:
    """One optimisation step on this rank's batch `x`: the loss and its backward (in grad_accum_steps
    micro-batches), the gradients averaged over ranks, clipped, and the optimizer step, unless a loss term
    or the gradient is nan/inf on some rank, in which case nothing changes. Returns the batch's mean losses
    and (name, value) of what was not finite (None: the step was taken). `loss_fn`: training_losses, or
    (spd.fsdp) a `ShardedLoss`, whose backward averages the gradients itself."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    adversary_before = adversary.snapshot() if adversary is not None and cfg.on_nan == "skip" else None
    losses: dict[str, Tensor] = {}
    for micro_batch in split_batch(x, cfg.grad_accum_steps):
        with autocast(cfg, params[0].device):
            micro = loss_fn(model, cfg, micro_batch, step / cfg.steps, output_fn, ddp, adversary)
        (micro["total"] / cfg.grad_accum_steps).backward()
        for k, v in micro.items():  # the mean over micro-batches is the batch's loss
            losses[k] = losses.get(k, 0) + v.detach() / cfg.grad_accum_steps
    if not cfg.fsdp:
        average_gradients(params, ddp)  # every rank now holds the gradient of the global batch's loss
    bad = nonfinite_term(losses, clip_grad_norm(params, cfg.grad_clip))
    if ddp.any(bad is not None, params[0].device) and bad is None:  # every rank must take the same branch
        bad = ("total (on another rank)", float("nan"))
    if bad is None:
        opt.step()
        if adversary is not None:
            adversary.ascend_from_training_gradient(cfg, step, ddp)
    elif adversary_before is not None:
        adversary.restore(adversary_before)
    return losses, bad


def make_optimizer(params: list[Tensor], cfg: SPDConfig) -> torch.optim.Optimizer:
    """spd.optimizer over `params` at spd.lr and spd.weight_decay."""
    # fused: one kernel for all parameters; the default loops over them (1.5 ms of a 20 ms TMS step on CPU)
    return (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=params[0].device.type in ("cpu", "cuda"))


@dataclass
class TrainingRun:
    """The training shell every trainer shares (`optimize`, sae_baseline.py): the optimizer, where training
    stands (resumed or fresh), the metrics log, and around each trainer's own step (`loop`, `end_step`,
    `finish`) its logging, evaluation, checkpoints, preemption and nan handling."""
    model: Decomposition  # what checkpoints hold (its decomposition_state)
    cfg: SPDConfig
    run_dir: Path
    opt: torch.optim.Optimizer
    state: TrainState
    logger: MetricsLogger
    ddp: Dist
    digest: str  # the target's: a checkpoint resumes against this target only
    evaluate: Callable[[int], dict[str, float]]  # step -> metrics (rank 0)
    sharded: ShardedLoss | None = None  # spd.fsdp: the loss module whose parameters are sharded
    caught: list[str] = dataclasses.field(default_factory=list)  # signals caught inside `loop`
    bar: Any = None  # `loop`'s progress bar
    wall: float = 0.0  # seconds `loop` ran

    @classmethod
    def start(cls, model: Decomposition, params: list[Tensor], digest: str, cfg: SPDConfig, run_dir: Path,
              full_config: dict | None, evaluate: Callable[[int], dict[str, float]],
              sharded: ShardedLoss | None = None) -> TrainingRun:
        """The optimizer of `params` (spd.optimizer, lr, weight_decay) and the state to start from: fresh, or
        (`--resume`) the newest readable checkpoint in run_dir, loaded into `model` and the optimizer."""
        ddp = init_distributed()
        opt = make_optimizer(params, cfg)
        state = resume_training(run_dir, model, opt, digest, ddp.is_main, cfg.steps)
        logger = MetricsLogger(run_dir, cfg.wandb_project, full_config or {"spd": config_to_dict(cfg)}, ddp.is_main)
        return cls(model, cfg, run_dir, opt, state, logger, ddp, digest, evaluate, sharded)

    @contextmanager
    def loop(self) -> Iterator[tqdm]:
        """The steps still to train, as a progress bar, with SIGTERM / SIGUSR1 caught for `end_step`."""
        with preemption_signals() as self.caught:
            t0 = time.time()
            self.bar = tqdm(range(self.state.step, self.cfg.steps), initial=self.state.step, total=self.cfg.steps,
                            desc="spd", mininterval=2.0, disable=None if self.ddp.is_main else True)
            yield self.bar
            self.wall = time.time() - t0  # the training loop's own time, for results.json

    def end_step(self, step: int, losses: dict[str, Tensor], bad: tuple[str, float] | None) -> None:
        """After training step `step`: log it (or stop or count it if not finite), evaluate every eval_every
        steps, checkpoint every checkpoint_every, and on a signal save and stop (`Preempted`)."""
        self.log_step(step, losses, bad)
        if step > 0 and step % self.cfg.eval_every == 0:
            with self.sharded.whole() if self.sharded else contextlib.nullcontext():  # every rank gathers
                if self.ddp.is_main:
                    self.evaluate_and_log(step)
        self.state.step = step + 1  # a checkpoint now resumes at the next step
        self.checkpoint()

    def finish(self) -> dict[str, float]:
        """final.pt and the final evaluation on rank 0 (its metrics; {} on the others), and leave torchrun."""
        final = {}
        self.save("final.pt")  # before the final evaluation: a run killed after it resumes to the same results
        if self.sharded:
            self.sharded.gather()  # whole on every rank from here on, for the evaluation and the script's analysis
        if self.ddp.is_main:  # rank 0 alone evaluates, and (in the experiment script) makes figures and writes results
            final = self.evaluate_and_log(self.cfg.steps)
        self.ddp.close()
        return final

    def evaluate_and_log(self, step: int) -> dict[str, float]:
        metrics = self.evaluate(step)
        self.logger.log(step, {f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def log_step(self, step: int, losses: dict[str, Tensor], bad: tuple[str, float] | None) -> None:
        """Stop on a nan/inf (on_nan=stop) or count the skipped step; every log_every steps, log the losses."""
        cfg, state = self.cfg, self.state
        if bad is not None and cfg.on_nan == "stop":
            what = "the gradient norm" if bad[0] == "gradient" else f"loss term '{bad[0]}'"
            raise SPDError(f"{what} is {bad[1]} at step {step}; stopped, keeping the last good checkpoint "
                           f"({state.last_ckpt}); lower spd.lr, set spd.grad_clip, or set spd.on_nan=skip")
        if bad is not None:  # on_nan=skip: no optimizer step, counted
            state.skipped += 1
            self.logger.log(step, {"train/skipped_steps": state.skipped})
        elif step % cfg.log_every == 0 or step == cfg.steps - 1:
            means = self.ddp.mean(torch.stack([v.float() for v in losses.values()])).tolist()
            state.train_metrics = {f"train/{k}": v for k, v in zip(losses, means)} | {"train/lr": lr_at(step, cfg)}
            if cfg.importance_minimality_coeff_initial is not None:
                state.train_metrics["train/importance_minimality_coeff"] = annealed_importance_coeff(
                    cfg, step / cfg.steps)
            self.logger.log(step, state.train_metrics)
            self.bar.set_postfix(loss=f"{state.train_metrics['train/total']:.3g}")
        if step % cfg.log_every == 0:
            rebalance_threads()  # other runs here may have started or finished

    def save(self, name: str) -> None:
        save_training_checkpoint(self.run_dir / "checkpoints" / name, self.model, self.opt, self.state, self.digest,
                                 self.ddp.is_main, self.cfg.keep_checkpoints)

    def checkpoint(self) -> None:
        """After state.step steps: the periodic checkpoint, and on a signal to any rank, one to resume from
        and `Preempted`."""
        steps, done, caught = self.cfg.steps, self.state.step, self.caught
        periodic = bool(self.cfg.checkpoint_every) and done % self.cfg.checkpoint_every == 0 and done < steps
        if periodic:
            self.save(f"step_{done}.pt")
        device = self.opt.param_groups[0]["params"][0].device
        if self.ddp.any(bool(caught), device) and not caught:  # a signal to any rank stops them all
            caught.append("a signal to another rank")
        if caught and done < steps:
            if not periodic:
                self.save(f"step_{done}.pt")
            raise Preempted(f"{caught[0]} at step {done} of {steps}: saved {self.state.last_ckpt}; "
                            f"continue with python {sys.argv[0]} --resume {self.run_dir}")


def optimize(model: ComponentModel, cfg: SPDConfig, train_batch: Callable[[int], Batch],
             eval_batch: Callable[[int], Batch],
             run_dir: Path, eval_fn: Callable[[ComponentModel], dict[str, float]] | None = None,
             output_fn: Callable[[Any], Tensor] = lambda out: out, full_config: dict | None = None,
             input_fn: Callable[[Batch], Any] = lambda batch: batch) -> dict | None:
    """Train the components and CI functions of `model`; return the final results (None on ranks > 0).

    `train_batch(step)` / `eval_batch(step)` give the data of each step (indexed, not streamed, so
    that a run is reproducible from its step alone) and `input_fn(batch)` the model's input. Every
    `eval_every` steps (and at the end) logs `evaluate` on `eval_batch(step)` plus `eval_fn(model)`.
    Writes metrics.jsonl, checkpoints/step_N.pt (after N steps; the newest keep_checkpoints) and
    checkpoints/final.pt.
    Resume: if run_dir already holds checkpoints (`--resume`), continues from the newest readable
    one, skipping the faithfulness warm-up; the result is bit-identical to an uninterrupted run's on
    the same machine and thread count.
    Preemption: SIGTERM / SIGUSR1 save step_N.pt at the next step boundary and raise `Preempted`.
    A nan/inf loss term or gradient raises SPDError (on_nan=stop) or skips that step (on_nan=skip).
    Under torchrun each rank trains on its shard of the global batch and gradients are averaged, so
    the result equals a one-process run's; rank 0 alone evaluates (on the whole eval batch), logs
    and writes results, and the other ranks return None when training ends.
    """
    device = next(model.components.parameters()).device
    if cfg.checkpoint_blocks:
        model.checkpoint_blocks(cfg.checkpoint_blocks)
    model.checkpoint_ci = cfg.checkpoint_ci
    if cfg.compile:
        model.target.compile()  # in place: every (masked or not) forward goes through the compiled target

    def evaluate_at(step: int) -> dict[str, float]:
        noise = step_generator(cfg.seed, step, device)  # its own noise: the training stream stays put
        with autocast(cfg, device):
            metrics = evaluate(model, cfg, input_fn(eval_batch(step)), output_fn, noise)
            return metrics | (eval_fn(model) if eval_fn is not None else {})

    # The warm-up steps the whole components, before any sharding (a resumed run loads them instead).
    fresh = not checkpoint_paths(run_dir / "checkpoints")
    warmup = faithfulness_warmup(model, cfg) if fresh and cfg.faithfulness_warmup_steps else None
    ddp, digest = init_distributed(), target_digest(model)
    sharded = None
    if cfg.fsdp and ddp.world_size > 1:
        blocks = [m for _, m in model.blocks(cfg.fsdp_blocks, "fsdp_blocks")] if cfg.fsdp_blocks else []
        sharded = ShardedLoss(model, training_losses, ddp.world_size, blocks)
    params = [*model.components.parameters(), *model.ci_fns.parameters()]
    run = TrainingRun.start(model, params, digest, cfg, run_dir, full_config, evaluate_at, sharded)
    state = run.state
    adversary = PersistentAdversary(state.adversary) if cfg.pgd_persistent else None

    try:
        if warmup is not None:
            run.logger.log(0, {"warmup/faithfulness": warmup})
        with run.loop() as steps:
            for step in steps:
                x = input_fn(ddp.shard(train_batch(step)))
                losses, bad = train_step(model, cfg, run.opt, x, step, output_fn, ddp, adversary,
                                         sharded or training_losses)
                run.end_step(step, losses, bad)
        state_mb = local_megabytes([*params, *(t for s in run.opt.state.values() for t in s.values() if t.dim())])
        target_mb = local_megabytes(list(model.target.parameters()))
        final = run.finish()
    finally:
        run.logger.close()
    if not ddp.is_main:
        return None
    results = run_results(cfg, state, run.wall, device) | {"train_state_mb": round(state_mb, 3),
                                                            "target_mb": round(target_mb, 3)}
    return results | state.train_metrics | final


def run_results(cfg: SPDConfig, state: TrainState, wall: float, device: torch.device) -> dict[str, Any]:
    """The generic part of results.json: steps, time, speed, peak memory."""
    ran = cfg.steps - (state.resumed_from or 0)
    results = {"steps": cfg.steps, "resumed_from_step": state.resumed_from, "skipped_steps": state.skipped,
               "wall_s": round(wall, 2), "steps_per_s": round(ran / max(wall, 1e-9), 2),
               "peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        results["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    return results
