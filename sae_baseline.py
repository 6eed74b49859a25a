"""Sparse dictionaries (SAEs, transcoders) on one module of any experiment's target: SPD's baselines.

    python sae_baseline.py configs/sae_tms_5-2.yaml [key.sub=value ...] [--out DIR]
    python sae_baseline.py --resume RUN_DIR   # continue an interrupted run (README: Resuming)

The story:
  1. Load the config and build the experiment it names (`experiment:`, e.g. configs/tms_5-2.yaml)
     through that experiment script's `build()`: its target (trained and cached if missing) and its
     step-indexed data. The decomposition `build()` attaches is never trained here.
  2. Read one module's activations on each step's batch (`dictionary.module`): its input or output
     (`sae`), or input -> output (`transcoder`), each scaled to a mean squared norm of its width. With
     `dictionary.inputs`, the encoder reads instead the concatenation of several locations (e.g. the
     pixels and the hidden layer, for a transcoder on fc2), one scale for all; the decoder still writes
     the module's.
  3. Train a dictionary y^ = z(x) W_dec + b_dec, z = f(x W_enc + b_enc), f one of: ReLU + L1, TopK,
     BatchTopK, JumpReLU, AbsTopK (the last four in sparse_activations.py), or `stochastic` (ReLU
     latents masked with SPD's CI function and masks, under importance minimality); options in
     `DictionaryConfig` (unit-norm decoder rows, a dead-latent auxiliary loss, normalisation).
  4. Evaluate: L0, dead latents, fraction of variance unexplained, and the target's output with the
     dictionary spliced in for the module, relative to the target output's variance.
  5. Figures: latent firing densities, and each alive latent's largest cosine with another.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sparse_activations import JumpReLU, abs_topk, batch_topk_relu, topk_relu
from spd_ci import make_ci_fn
from spd_common import (Experiment, SPDConfig, TrainingRun, importance_minimality_loss, lr_at, output_loss,
                        run_results, sample_masks)
from spd_config import SPDError, config_to_dict, load_config, option
from spd_run import (ROOT, checkpoint_paths, clip_grad_norm, config_class, device_here, figures_dir, import_script,
                     load_checkpoint, nonfinite_term, parse_cli, run_main, script_for, target_digest, write_results)

Activation = Literal["relu", "topk", "batchtopk", "jumprelu", "abstopk", "stochastic"]


@dataclass
class DictionaryConfig:
    module: str = option(doc="target module whose activations are read, e.g. linear1 or layers.0")
    mode: Literal["sae", "transcoder"] = option("sae", "sae: reconstruct the module's `site`; transcoder: "
                                                "map the module's input to its output")
    site: Literal["input", "output"] = option("output", "sae mode: which of the module's activations to reconstruct")
    inputs: list[str] = option([], "the encoder reads these locations, concatenated: 'name' (a module's input) or "
                                   "'name:output', each reached before `module` is; []: what mode and site say")
    n_latents: int = option(64, "dictionary size", ge=1)
    activation: Activation = option("topk", "sparse activation f (stochastic: ReLU latents under SPD masks)")
    k: float = option(4, "topk / abstopk: latents kept per example (whole); batchtopk: round(k x batch) kept over "
                         "the batch, so it may be below 1 for sparse data", gt=0)
    k_min: Optional[int] = option(None, "abstopk: in training each example keeps its own k, log-uniform in "
                                        "k_min..k_max (one dictionary for a range of sparsities; eval: k); null: k", ge=1)
    k_max: Optional[int] = option(None, "abstopk: the largest per-example k in training (set with k_min)", ge=1)
    l1_coeff: float = option(1e-3, "relu: weight of sum_c z_c ||W_dec[c]||", ge=0)
    l0_coeff: float = option(1e-3, "jumprelu: weight of the L0 (straight-through to the thresholds)", ge=0)
    threshold_init: float = option(0.1, "jumprelu: initial threshold of every latent", gt=0)
    bandwidth: float = option(0.05, "jumprelu: width of the straight-through window around the threshold", gt=0)
    unit_norm_decoder: bool = option(True, "keep decoder rows at norm 1, gradients projected onto that sphere")
    aux_coeff: float = option(1 / 32, "weight of the dead-latent auxiliary loss (0 = off)", ge=0)
    aux_k: int = option(16, "dead latents (largest pre-activations) the auxiliary loss uses per example", ge=1)
    dead_steps: int = option(200, "a latent that has not fired for this many steps counts as dead", ge=1)
    normalize: bool = option(True, "scale input and output to a mean squared norm equal to their width")
    threshold_momentum: float = option(0.99, "batchtopk: EMA momentum of the inference threshold", ge=0, le=1)
    n_eval_batches: int = option(4, "held-out batches for the final metrics", ge=1)


@dataclass
class SAEConfig:
    experiment: str = option(doc="the experiment config whose target and data are used, e.g. configs/tms_5-2.yaml")
    dictionary: DictionaryConfig = option(doc="what the dictionary reads and how it is sparse")
    spd: SPDConfig = option(doc="training settings (steps, batch_size, lr, lr_schedule, seed, device, threads, "
                                "checkpoints); stochastic: also ci_fn, ci_hidden, sampling, "
                                "importance_minimality_coeff, p, ci_threshold. Also set in the experiment's build")
    experiment_overrides: list[str] = option([], "key.sub=value overrides of the experiment config")
    experiment_script: Optional[str] = option(None, "the script that runs the experiment config (null: the one "
                                                    "*_decomposition.py whose config class reads it)")


# ------------------------------------------------------------------------------------------------
# The dictionary
# ------------------------------------------------------------------------------------------------
class Dictionary(nn.Module):
    """Encoder W_enc (d_in, n), decoder W_dec (n, d_out): rows of W_dec are the latents' directions.

    `decomposition_state` / `load_decomposition_state` let spd_run's checkpoints and resume carry it."""

    def __init__(self, d_in: int, d_out: int, cfg: DictionaryConfig, spd: SPDConfig):
        super().__init__()
        self.cfg, self.spd, n = cfg, spd, cfg.n_latents
        W_dec = F.normalize(torch.randn(n, d_out), dim=-1)
        W_enc = W_dec.T.clone() if d_in == d_out else torch.randn(d_in, n) / d_in ** 0.5
        self.W_enc, self.W_dec = nn.Parameter(W_enc), nn.Parameter(W_dec)
        self.b_enc, self.b_dec = nn.Parameter(torch.zeros(n)), nn.Parameter(torch.zeros(d_out))
        if cfg.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), float(cfg.threshold_init)).log())
        if cfg.activation == "stochastic":
            self.ci_fn = make_ci_fn(spd.ci_fn, n, d_in, spd.ci_hidden)
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        self.register_buffer("steps_since_fired", torch.zeros(n, dtype=torch.long))
        self.register_buffer("batch_threshold", torch.zeros(()))  # batchtopk at inference

    def pre(self, x: Tensor) -> Tensor:
        """Pre-activations (..., n); an SAE first subtracts the decoder bias (its estimate of the mean)."""
        if self.cfg.mode == "sae":
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Latents z (..., n) and the activation's own terms (penalty, ci) for `losses`."""
        cfg, pre = self.cfg, self.pre(x)
        if cfg.activation == "relu":
            z = pre.relu()
            return z, {"sparsity": (z * self.W_dec.norm(dim=-1)).sum(-1).mean()}
        if cfg.activation == "abstopk" and cfg.k_min is not None and self.training:
            return abs_topk(pre, self.sample_k(pre.shape[:-1])), {}
        if cfg.activation in ("topk", "abstopk"):
            return (topk_relu if cfg.activation == "topk" else abs_topk)(pre, int(cfg.k)), {}
        if cfg.activation == "batchtopk":
            if not self.training:  # per example, at the threshold learned in training
                return pre.relu() * (pre > self.batch_threshold), {}
            z = batch_topk_relu(pre.flatten(0, -2), cfg.k).view_as(pre)
            kept = z[z > 0]
            if kept.numel():
                m = cfg.threshold_momentum
                self.batch_threshold.mul_(m).add_((1 - m) * kept.min().detach())
            return z, {}
        if cfg.activation == "jumprelu":
            theta = self.log_threshold.exp()
            z = JumpReLU.apply(pre, theta, cfg.bandwidth)
            return z, {"sparsity": JumpReLU.apply(pre, theta, cfg.bandwidth, True).sum(-1).mean()}
        ci, ci_upper = self.ci_fn.ci(pre if self.spd.ci_fn == "mlp" else x, self.spd.sigmoid)  # stochastic
        mask = sample_masks({"z": ci}, self.spd.sampling, use_delta=False)[0]["z"] if self.training else ci
        return pre.relu() * mask, {"ci": ci, "sparsity": importance_minimality_loss({"z": ci_upper}, self.spd.p)}

    def sample_k(self, shape: torch.Size) -> Tensor:
        """Per-example k (shape), log-uniform: floor(e^u), u uniform in [log k_min, log(k_max + 1)), so
        P(k) = log((k + 1) / k) / log((k_max + 1) / k_min): each doubling of k is about equally likely."""
        lo, hi = math.log(self.cfg.k_min), math.log(self.cfg.k_max + 1)
        u = torch.rand(shape, device=self.W_enc.device) * (hi - lo) + lo
        return u.exp().floor().long().clamp(self.cfg.k_min, self.cfg.k_max)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Normalised space is internal: raw input (..., d_in) -> raw output (..., d_out)."""
        return self.decode(self.encode(x * self.in_scale)[0]) / self.out_scale

    def active(self, z: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """Which latents are on (bool, like z): z != 0; for `stochastic` also CI above spd.ci_threshold
        (in training z is masked by noise, not by CI)."""
        return (z != 0) & (terms["ci"] > self.spd.ci_threshold) if "ci" in terms else z != 0

    def losses(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Unweighted loss terms and `total` on one normalised batch x (B, d_in) -> y (B, d_out)."""
        cfg = self.cfg
        z, terms = self.encode(x)
        y_hat = self.decode(z)
        losses = {"recon": F.mse_loss(y_hat, y)}
        coeff = {"relu": cfg.l1_coeff, "jumprelu": cfg.l0_coeff,
                 "stochastic": self.spd.importance_minimality_coeff or 0.0}.get(cfg.activation, 0.0)
        if "sparsity" in terms:
            losses["sparsity"] = terms["sparsity"]
        fired = self.active(z, terms).flatten(0, -2).any(0)
        self.steps_since_fired.add_(1).masked_fill_(fired, 0)
        dead = self.steps_since_fired >= cfg.dead_steps
        if cfg.aux_coeff and dead.any():  # dead latents reconstruct what the live ones miss (Gao et al. 2024)
            residual = (y - y_hat).detach()
            pre_dead = self.pre(x).masked_fill(~dead, -float("inf"))
            z_aux = topk_relu(pre_dead, min(cfg.aux_k, int(dead.sum()))).nan_to_num(0.0)
            losses["aux"] = F.mse_loss(z_aux @ self.W_dec, residual) / residual.pow(2).mean().clamp_min(1e-12)
        losses["total"] = (losses["recon"] + coeff * losses.get("sparsity", 0.0)
                           + cfg.aux_coeff * losses.get("aux", 0.0))
        return losses

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the part of each decoder row's gradient along the row: a step then moves along the sphere."""
        if self.cfg.unit_norm_decoder and self.W_dec.grad is not None:
            W = self.W_dec
            W.grad -= (W.grad * W).sum(-1, keepdim=True) * W

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def decomposition_state(self) -> dict[str, Any]:
        return {"components": self.state_dict(), "ci_fns": {}}

    def load_decomposition_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["components"])


# ------------------------------------------------------------------------------------------------
# The target's activations, and the dictionary spliced in
# ------------------------------------------------------------------------------------------------
def encoder_locations(cfg: DictionaryConfig) -> list[tuple[str, str]]:
    """The (module, "input" | "output") locations the encoder reads, in the order it concatenates them."""
    if not cfg.inputs:
        return [(cfg.module, "input" if cfg.mode == "transcoder" else cfg.site)]
    locs = [(n, "input") if ":" not in n else tuple(n.rsplit(":", 1)) for n in cfg.inputs]
    bad = [f"{n}:{site}" for n, site in locs if site not in ("input", "output")]
    if bad:
        raise SPDError(f"dictionary.inputs: {', '.join(bad)} names no location; write 'module' (its input) or "
                       f"'module:output'")
    return locs


@torch.no_grad()
def module_io(exp: Experiment, cfg: DictionaryConfig, batch: Any, dic: Callable[[Tensor], Tensor] | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """The target's output on a batch (what its output loss compares), and what the dictionary reads and
    must produce there, flattened to (N, d): the module's input and output (transcoder), or its `site`
    twice (sae); what it reads is the concatenation of `cfg.inputs`' locations when given. With `dic` (the
    Dictionary, or a map standing in for it, e.g. with a latent ablated), that is spliced in for the
    module's `site` (sae) or output (transcoder)."""
    seen: dict[tuple[str, str], Tensor] = {}
    reads = encoder_locations(cfg)
    splice_input = dic is not None and cfg.mode == "sae" and cfg.site == "input"

    def encoder_input() -> Tensor:
        late = [f"{n}:{site}" for n, site in reads if (n, site) not in seen]
        if late:
            raise SPDError(f"dictionary.inputs: {', '.join(late)} comes after {cfg.module}'s "
                           f"{'input' if splice_input else 'output'}, where the dictionary is spliced in; the "
                           f"encoder reads only what the forward pass reaches first")
        return torch.cat([seen[r] for r in reads], -1)

    def read_input(name: str):
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            # the main input: the first positional argument, or the first keyword tensor (e.g. hidden_states)
            seen[name, "input"] = x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            if name != cfg.module or not splice_input:
                return None
            new = dic(encoder_input())
            if args:  # the module itself runs on the reconstruction
                return (new, *args[1:]), kwargs
            return args, {k: new if v is x else v for k, v in kwargs.items()}
        return hook

    def read_output(name: str):
        def hook(m: nn.Module, args: tuple, out: Any) -> Any:
            seen[name, "output"] = out[0] if isinstance(out, tuple) else out  # attention layers: (output, ...)
            if name != cfg.module or dic is None or splice_input:
                return None
            new = dic(encoder_input())
            return (new, *out[1:]) if isinstance(out, tuple) else new
        return hook

    hooks = []
    try:
        for name in dict.fromkeys([cfg.module] + [n for n, _ in reads]):
            try:
                mod = exp.model.target.get_submodule(name)
            except AttributeError:
                names = [n for n, _ in exp.model.target.named_modules() if n and ".original" not in n]
                field = "module" if name == cfg.module else "inputs"
                raise SPDError(f"dictionary.{field}: '{name}' is not a module of the target; its modules: "
                               f"{', '.join(names)}") from None
            hooks += [mod.register_forward_pre_hook(read_input(name), with_kwargs=True),
                      mod.register_forward_hook(read_output(name))]
        out = exp.output_fn(exp.model(exp.input_fn(batch)))
    finally:
        for hook in hooks:
            hook.remove()
    y = seen[cfg.module, "output" if cfg.mode == "transcoder" else cfg.site]
    return out, encoder_input().flatten(0, -2), y.flatten(0, -2)


@torch.no_grad()
def evaluate_dictionary(exp: Experiment, cfg: SAEConfig, dic: Dictionary) -> tuple[dict[str, float], Tensor]:
    """Metrics on held-out batches, and each latent's firing density (n,)."""
    dic.eval()
    d = cfg.dictionary
    fires, n, err, var, out_err, out_var, out_loss = 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for i in range(d.n_eval_batches):
        batch = exp.eval_batch(i)
        out, x, y = module_io(exp, d, batch)
        z, terms = dic.encode(x * dic.in_scale)
        fires, n = fires + dic.active(z, terms).sum(0), n + len(x)
        err += (dic.decode(z) / dic.out_scale - y).pow(2).sum().item()
        var += (y - y.mean(0)).pow(2).sum().item()
        spliced = module_io(exp, d, batch, dic)[0]
        out_err += (spliced - out).pow(2).mean().item()
        out_var += out.var().item()
        out_loss += output_loss(spliced, out, cfg.spd.output_loss).item() / d.n_eval_batches
    density = fires.float() / n
    dic.train()
    return {"l0": density.sum().item(), "n_dead": int((density == 0).sum()), "fvu": err / var,
            "spliced_output_loss": out_loss, "spliced_mse_over_target_var": out_err / out_var}, density


# ------------------------------------------------------------------------------------------------
# Building and training
# ------------------------------------------------------------------------------------------------
def experiment_config(cfg: SAEConfig) -> tuple[Any, Any]:
    """(the experiment script as a module, its config with this run's batch sizes, seed and device)."""
    module = import_script(ROOT / (cfg.experiment_script or script_for(cfg.experiment)))
    exp_cfg = load_config(config_class(module), cfg.experiment, cfg.experiment_overrides)
    for key in ("batch_size", "eval_batch_size", "seed", "device"):
        setattr(exp_cfg.spd, key, getattr(cfg.spd, key))
    return module, exp_cfg


def build(cfg: SAEConfig) -> tuple[Experiment, Dictionary]:
    """The experiment and a fresh dictionary sized to its module, with the normalisation scales set."""
    d = cfg.dictionary
    check_sae_fields(cfg.spd)
    check_k(d)
    module, exp_cfg = experiment_config(cfg)
    exp = module.build(exp_cfg)
    _, x, y = module_io(exp, d, exp.train_batch(0))  # a wrong module name stops here, listing the target's
    torch.manual_seed(cfg.spd.seed)
    dic = Dictionary(x.shape[-1], y.shape[-1], d, cfg.spd).to(x.device)
    if d.inputs:  # an input the forward pass reaches after the splice point stops here, not after training
        module_io(exp, d, exp.train_batch(0), lambda a: torch.zeros(*a.shape[:-1], y.shape[-1], device=a.device))
    if d.normalize:  # a constant per side, from the first training batch, so that resume sees the same
        dic.in_scale.fill_((x.shape[-1] / x.pow(2).sum(-1).mean().clamp_min(1e-12)) ** 0.5)
        dic.out_scale.fill_((y.shape[-1] / y.pow(2).sum(-1).mean().clamp_min(1e-12)) ** 0.5)
    with torch.no_grad():  # start from the mean output: a constant part (an MLP's bias) would take Adam long to learn
        dic.b_dec.copy_(y.mean(0) * dic.out_scale)
    return exp, dic


def load_sae_run(run_dir: str | Path) -> tuple[SAEConfig, Experiment, Dictionary]:
    """A finished (or checkpointed) run of this script: its config, experiment and trained dictionary
    (final.pt, else the newest periodic checkpoint)."""
    run_dir = Path(run_dir)
    cfg = load_config(SAEConfig, run_dir / "config.yaml")
    device_here(cfg, run_dir)
    paths = checkpoint_paths(run_dir / "checkpoints")
    if not paths:
        raise SPDError(f"{run_dir} holds no checkpoint; pass the run dir of a finished sae_baseline.py run")
    exp, dic = build(cfg)
    state = load_checkpoint(paths[-1], required=("components", "target_digest"))
    if state["target_digest"] != target_digest(exp.model):
        raise SPDError(f"{paths[-1]} was trained against a different target than the one {cfg.experiment} "
                       f"builds now (retrained since?); restore the run's original target file")
    dic.load_decomposition_state(state)
    return cfg, exp, dic.eval()


# The spd: fields a dictionary's training reads (the rest are SPD's own): any other one set away from its
# default is refused, not silently ignored.
SAE_SPD_FIELDS = {"steps", "batch_size", "eval_batch_size", "eval_every", "log_every", "lr", "lr_schedule",
                  "lr_warmup_frac", "lr_final_frac", "optimizer", "weight_decay", "grad_clip", "on_nan", "seed",
                  "device", "threads", "checkpoint_every", "keep_checkpoints", "wandb_project", "output_loss",
                  # the `stochastic` activation's CI function, masks and importance minimality
                  "ci_fn", "ci_hidden", "sigmoid", "sampling", "importance_minimality_coeff", "p", "ci_threshold"}


def check_k(d: DictionaryConfig) -> None:
    """k, k_min and k_max must be whole numbers of latents the activation can keep."""
    if d.activation in ("topk", "abstopk") and (d.k != int(d.k) or d.k > d.n_latents):
        raise SPDError(f"dictionary.k = {d.k}: {d.activation} keeps a whole number of latents per example, "
                       f"1 to n_latents = {d.n_latents}; set k to one")
    if (d.k_min is None) != (d.k_max is None) or (d.k_min is not None and (
            d.activation != "abstopk" or not d.k_min <= d.k_max <= d.n_latents)):
        raise SPDError(f"dictionary.k_min = {d.k_min}, k_max = {d.k_max}: a per-example k needs both, "
                       f"k_min <= k_max <= n_latents = {d.n_latents}, and activation abstopk (not {d.activation})")


def check_sae_fields(spd: SPDConfig) -> None:
    default = SPDConfig()
    ignored = [f.name for f in dataclasses.fields(spd)
               if f.name not in SAE_SPD_FIELDS and getattr(spd, f.name) != getattr(default, f.name)]
    if ignored:
        raise SPDError(f"sae_baseline.py does not use spd.{', spd.'.join(ignored)} (SPD's own settings); remove "
                       f"{'it' if len(ignored) == 1 else 'them'} from the config")


def train(exp: Experiment, cfg: SAEConfig, dic: Dictionary, run_dir: Path) -> dict[str, Any]:
    """The dictionary trained in the shell every trainer shares (spd_common.TrainingRun): its optimizer,
    lr schedule, gradient clipping, on_nan, checkpoints, resume and preemption."""
    spd, d = cfg.spd, cfg.dictionary
    run = TrainingRun.start(dic, list(dic.parameters()), target_digest(exp.model), spd, run_dir, config_to_dict(cfg),
                            lambda step: evaluate_dictionary(exp, cfg, dic)[0])

    def train_step(step: int) -> tuple[dict[str, Tensor], tuple[str, float] | None]:
        """Adam (or spd.optimizer) on the dictionary's losses, decoder rows kept at norm 1; nothing on nan."""
        run.opt.param_groups[0]["lr"] = lr_at(step, spd)
        _, x, y = module_io(exp, d, exp.train_batch(step))
        losses = dic.losses(x * dic.in_scale, y * dic.out_scale)
        run.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        dic.project_decoder_grad()
        bad = nonfinite_term(losses, clip_grad_norm(list(dic.parameters()), spd.grad_clip))
        if bad is None:
            run.opt.step()
            dic.normalize_decoder()
        return losses | {"n_dead": (dic.steps_since_fired >= d.dead_steps).sum().float()}, bad

    try:
        with run.loop() as steps:
            for step in steps:
                run.end_step(step, *train_step(step))
        final = run.finish()
    finally:
        run.logger.close()
    density = evaluate_dictionary(exp, cfg, dic)[1]
    return run_results(spd, run.state, run.wall, dic.W_dec.device) | run.state.train_metrics | final | {
        "density": density.tolist()}


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def plot_latents(dic: Dictionary, density: list[float], path: Path) -> None:
    """Left: firing density of each latent (log10; dead at the left edge). Right: each alive latent's
    largest cosine with another alive latent's decoder row (near 1: duplicates)."""
    dens = torch.tensor(density)
    alive = dens > 0
    W = F.normalize(dic.W_dec[alive.to(dic.W_dec.device)].float(), dim=-1).cpu()
    cos = (W @ W.T).fill_diagonal_(-1).max(1).values if len(W) > 1 else torch.zeros(0)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(dens.clamp_min(1e-6).log10().numpy(), bins=40)
    axes[0].set(xlabel="log10 firing density (dead: -6)", ylabel="latents",
                title=f"{int(alive.sum())} alive of {len(dens)}")
    axes[1].hist(cos.numpy(), bins=40, range=(-1, 1))
    axes[1].set(xlabel="largest cosine with another alive latent's decoder row", ylabel="latents")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    cfg, run_dir = parse_cli(SAEConfig, __doc__.splitlines()[0])
    exp, dic = build(cfg)
    results = train(exp, cfg, dic, run_dir)
    figures = figures_dir(run_dir)
    plot_latents(dic, results["density"], figures / "latents.png")
    print(f"{cfg.dictionary.mode} {cfg.dictionary.activation} on {cfg.dictionary.module}: L0 {results['l0']:.2f}  "
          f"dead {results['n_dead']}/{cfg.dictionary.n_latents}  FVU {results['fvu']:.4g}  spliced output MSE / "
          f"target var {results['spliced_mse_over_target_var']:.4g}  ({results['steps']} steps, {results['wall_s']} s)")
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
