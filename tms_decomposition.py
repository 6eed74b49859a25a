"""SPD on a toy model of superposition (TMS): recover one subcomponent per column of W.

    python tms_decomposition.py configs/tms_5-2.yaml [key.sub=value ...] [--out DIR]
    python tms_decomposition.py --resume RUN_DIR   # continue an interrupted run (README: Resuming)

The story:
  1. Load the config; get the target x̂ = ReLU(W^T H W x + b) (trained and cached if missing).
  2. Decompose the encoder W (linear1), the decoder W^T (linear2, tied to the encoder's components
     but with its own CI function) and any fixed identity layers H, with `spd_common.optimize`.
  3. Evaluate against the ground truth: each column W[:, j] should be matched by exactly one
     subcomponent U[:, c] V[c, j] (MMCS ≈ 1) at full length (ML2R ≈ 1); an identity layer should
     split into exactly m subcomponents that always fire together.
  4. Figures: CI of every subcomponent on each one-hot input, and subcomponents vs W's columns.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from spd_common import ComponentModel, Experiment, SPDConfig, optimize
from spd_config import config_to_dict, option
from spd_run import figures_dir, get_device, parse_cli, run_main, write_results
from train_targets.train_tms import TMSTargetConfig, load_or_train_tms, tms_batch


# ------------------------------------------------------------------------------------------------
# The size rule: what the decomposition of a TMS of n features needs
# ------------------------------------------------------------------------------------------------
def size_rule(n_features: int) -> dict:
    """C (per matrix), batch_size, steps, importance_minimality_coeff (beta3), its start before an anneal
    (importance_minimality_coeff_initial: None = held), p and lr for n features.

    Three tuned sizes anchor it: n = 5 (5-2, 5-2+ID: C 20, batch 4096, 2000 steps, beta3 3e-3, p 1, lr 3e-3),
    n = 40 (40-10, 40-10+ID: C 200, batch 1024, 10k steps, beta3 1e-4, p 2, lr 1e-3) and n = 100 (100-20:
    C 2200, beta3 1.5e-4 falling to 3e-5, the rest as at 40). Between two anchors each value moves geometrically
    in log n (p linearly); below 5 and above 100 (untried) C, steps and beta3 follow the nearest pair's trend and
    batch, p and lr stay at the nearest anchor's value.
    From 5 to 40:
      - C grows a little faster than n (4 per feature at 5, 5 at 40): at 40-10, C = 100 left 3 features
        sharing subcomponents, so spare subcomponents are kept as n grows;
      - steps grow as n^0.77: more features take longer to separate (40-10 recovered from step 4000 on);
      - beta3 falls as n^-1.6: the reconstruction loss is a mean over the n outputs, so each feature's pull
        against the importance penalty weakens as n grows, and p = 2 at 40 penalises CI below 1 less;
      - batch falls from 4096 to 1024 as C grows (a step's cost is batch x C; at 40-10, batch 4096 left
        features sharing), never below, so every feature is on in ~50 examples per step; p goes from 1 to 2;
        lr from 3e-3 to 1e-3.
    From 40 to 100 the trend above breaks (each point measured on 100-20):
      - carried on (C 552, 20300 steps, beta3 2.2e-5), it collapses to ~24 dense subcomponents, each on for
        most inputs (L0 ~20 per matrix = n_hidden, where ~5 features are on): a dense basis of the hidden
        space that beta3 must price out and only a wider pool of starting subcomponents escapes. beta3 4e-5 to
        5e-4 at C 552 keeps 34-75 subcomponents, C 1100 at 2.2e-5 collapses too, C 1100 at 1.5e-4 gives all 100;
      - at C 1100, seeds 1-4 left 1-11 subcomponents each holding two or more features, formed by step 2000-4000
        and never undone (each pair anti-aligned in W, cosine -0.4: read as x_i - x_j, told apart again by the
        output ReLU); C 2200 (22 per feature; 5 at 40) leaves none on seeds 0-2 and one pair on seeds 3 and 4
        (C 4400 on seed 4: still one at step 4000);
      - beta3 starts at 1.5e-4 and falls to 3e-5 over 35-65% of training (TMSSPDConfig's anneal fractions),
        after the features have separated: held, it kept the CI of active features below 1 and the
        subcomponents grew to make up for it (ML2R 1.009 at step 3000, 1.037 at 10k; annealed, 1.006);
      - steps stay at 40's 10k (a 6000-step schedule left 8 features split on seed 1); batch, p, lr as at 40.
    n_hidden does not enter: the anchors grow n and m together, so they cannot tell the two apart; n sets
    how many subcomponents are needed. The identity layer (+ID) needs nothing more: 5-2+ID recovers its 5
    and 2 with 5-2's values (SPD seeds 0-2), as 40-10+ID with 40-10's.
    """
    anchors = {5: {"C": 20, "batch_size": 4096, "steps": 2000, "importance_minimality_coeff": 3e-3,
                   "importance_minimality_coeff_initial": 3e-3, "p": 1.0, "lr": 3e-3},
               40: {"C": 200, "batch_size": 1024, "steps": 10000, "importance_minimality_coeff": 1e-4,
                    "importance_minimality_coeff_initial": 1e-4, "p": 2.0, "lr": 1e-3},
               100: {"C": 2200, "batch_size": 1024, "steps": 10000, "importance_minimality_coeff": 3e-5,
                     "importance_minimality_coeff_initial": 1.5e-4, "p": 2.0, "lr": 1e-3}}
    lo, hi = (5, 40) if n_features <= 40 else (40, 100)
    t = math.log(n_features / lo) / math.log(hi / lo)  # 0 at lo, 1 at hi; outside 5-100, the nearest pair's trend
    tc = min(max(t, 0.0), 1.0)  # batch, p and lr stay within their anchors' range

    def between(key: str, t: float) -> float:
        return anchors[lo][key] * (anchors[hi][key] / anchors[lo][key]) ** t

    p = anchors[lo]["p"] + (anchors[hi]["p"] - anchors[lo]["p"]) * tc  # p moves linearly, not geometrically
    beta3, beta3_start = (round_2(between(k, t)) for k in ("importance_minimality_coeff",
                                                            "importance_minimality_coeff_initial"))
    return {"C": round(between("C", t)), "batch_size": 2 ** round(math.log2(between("batch_size", tc))),
            "steps": 100 * round(between("steps", t) / 100), "importance_minimality_coeff": beta3,
            "importance_minimality_coeff_initial": beta3_start if beta3_start != beta3 else None, "p": round(p, 2),
            "lr": round_2(between("lr", tc))}


def round_2(x: float) -> float:
    """x to two significant digits (a readable config value)."""
    return float(f"{x:.2g}")


Auto = Literal["auto"]


@dataclass
class TMSSPDConfig(SPDConfig):
    """SPDConfig whose size-dependent fields default to `auto`: size_rule decides them from n_features."""

    modules: dict[str, int] = option({}, "module pattern -> C ({}: linear1, linear2 and each identity layer, C by "
                                         "size_rule)")
    importance_minimality_coeff: float | Auto | None = option("auto", "weight of sum_c |g_c|^p (auto: size_rule)",
                                                              ge=0)
    p: float | Auto = option("auto", "exponent p of the importance-minimality loss (auto: size_rule)", gt=0)
    lr: float | Auto = option("auto", "peak learning rate (auto: size_rule)", gt=0)
    steps: int | Auto = option("auto", "optimisation steps (auto: size_rule)", ge=1)
    batch_size: int | Auto = option("auto", "examples per step (auto: size_rule)", ge=1)
    importance_minimality_coeff_initial: float | None = option(
        None, "beta3 before it falls to importance_minimality_coeff (null: size_rule's start when that is auto, "
              "which anneals past 40 features, else held)", ge=0)
    importance_minimality_anneal_start_frac: float = option(
        0.35, "fraction of training where beta3 starts to fall (features have separated by then)", ge=0, le=1)
    importance_minimality_anneal_end_frac: float = option(0.65, "fraction of training where beta3 reaches "
                                                                "importance_minimality_coeff", ge=0, le=1)


# COPYING THIS SCRIPT? Change: the config below (keep its `spd: SPDConfig`), the target and data in
# build(), the metrics and the figures. Keep: build's signature and main's skeleton.
@dataclass
class TMSConfig:
    target: TMSTargetConfig = option(doc="the target model and how to train it")
    spd: TMSSPDConfig = option(doc="the decomposition (fields left `auto`: size_rule)")
    norm_threshold: float = option(0.1, "a subcomponent with ||U_c|| ||V_c|| above this counts as non-negligible "
                                   "(n_nonnegligible, mmcs_nonnegligible)", ge=0)

    def __post_init__(self) -> None:
        """The size rule's values for every spd field left `auto` (and for empty modules); set ones win."""
        rule = size_rule(self.target.n_features)
        C, beta3_start = rule.pop("C"), rule.pop("importance_minimality_coeff_initial")
        fill = {k: v for k, v in rule.items() if getattr(self.spd, k) == "auto"}
        if self.spd.importance_minimality_coeff == "auto" and self.spd.importance_minimality_coeff_initial is None:
            fill["importance_minimality_coeff_initial"] = beta3_start  # the rule's anneal goes with its beta3
        if not self.spd.modules:
            identity = {"hidden_layers.*": C} if self.target.n_hidden_layers else {}
            fill["modules"] = {"linear1": C, "linear2": C} | identity
        self.spd = dataclasses.replace(self.spd, **fill)


# ------------------------------------------------------------------------------------------------
# Ground-truth metrics
# ------------------------------------------------------------------------------------------------
def subcomponent_norms(U: Tensor, V: Tensor) -> Tensor:
    """||U_c V_c||_F = ||U_c|| ||V_c|| per subcomponent (C,)."""
    return U.norm(dim=0) * V.norm(dim=1)


def column_cosines(W: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """cos[c, j] between subcomponent c's part of column j, U[:, c] V[c, j], and W[:, j]: (C, n).

    W (m, n) target; U (m, C), V (C, n).
    """
    return (U.T @ W) * V / (U.norm(dim=0)[:, None] * V.abs() * W.norm(dim=0)[None, :]).clamp_min(1e-12)


def mmcs_ml2r(W: Tensor, U: Tensor, V: Tensor, min_norm: float = 0.0) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio of the best-matching subcomponent per column.

    min_norm = 0 is the paper's definition: every subcomponent competes. With min_norm > 0 (the
    `_nonnegligible` metrics) only those with ||U_c|| ||V_c|| > min_norm do. The two differ when a
    dead subcomponent, shrunk to ~0, points exactly along a column: it wins that column's cosine by a
    hair over the full-length one and reads as an L2 ratio of ~0 (TMS 5-2+ID once read ML2R 0.80 by the
    paper's definition, 1.004 non-negligible only).
    """
    cos = column_cosines(W, U, V)
    real = subcomponent_norms(U, V) > min_norm
    if min_norm > 0 and real.any():
        cos = cos.masked_fill(~real[:, None], -float("inf"))
    best_cos, best_c = cos.max(dim=0)  # (n,)
    ratio = U.norm(dim=0)[best_c] * V[best_c, torch.arange(W.shape[1])].abs() / W.norm(dim=0)
    return best_cos.mean().item(), ratio.mean().item()


def one_hot_ci(model: ComponentModel, n_features: int) -> dict[str, Tensor]:
    """CI (n_features, C) of every decomposed module when exactly feature i is on (value 1)."""
    return model.ci_of(torch.eye(n_features, device=next(model.components.parameters()).device))


@torch.no_grad()
def tms_metrics(model: ComponentModel, cfg: TMSConfig) -> dict[str, float]:
    U, V = model.factors("linear1")
    W = model.decomposed["linear1"].target_weight()
    out = dict(zip(["mmcs", "ml2r"], mmcs_ml2r(W, U, V)))
    out |= dict(zip(["mmcs_nonnegligible", "ml2r_nonnegligible"], mmcs_ml2r(W, U, V, cfg.norm_threshold)))
    carried = U.norm(dim=0)[:, None] * V.abs()  # (C, n): how much of W[:, j] subcomponent c carries
    part = carried > cfg.norm_threshold  # a non-negligible part
    out["n_split_features"] = int((part.sum(0) > 1).sum())  # columns carried by two or more subcomponents
    out["n_shared_subcomponents"] = int((part.sum(1) > 1).sum())  # subcomponents carrying two or more columns
    # Features merged: two or more columns mostly on one subcomponent (at 100-20, anti-aligned pairs read as
    # x_i - x_j and told apart again by the output ReLU; docs/results.md)
    column_norms = W.norm(dim=0)  # (n,)
    most = carried > 0.5 * column_norms
    out["n_merged_features"] = int(most[most.sum(1) > 1].any(0).sum())
    out["target_min_column_norm"] = column_norms.min().item()  # near 0: a feature the target left dead
    for name in model.untied_names():
        U, V = model.factors(name)
        out[f"n_nonnegligible/{name}"] = int((subcomponent_norms(U, V) > cfg.norm_threshold).sum())
    for name, ci in one_hot_ci(model, cfg.target.n_features).items():
        out[f"n_alive_one_hot/{name}"] = int((ci > cfg.spd.ci_threshold).any(0).sum())
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def plot_ci_per_feature(model: ComponentModel, cfg: TMSConfig, path) -> None:
    """One heatmap per module: CI of each alive subcomponent (columns) on each one-hot input (rows)."""
    ci = one_hot_ci(model, cfg.target.n_features)
    fig, axes = plt.subplots(1, len(ci), figsize=(4 * len(ci), 3.5), squeeze=False)
    for ax, (name, g) in zip(axes[0], ci.items()):
        alive = (g > cfg.spd.ci_threshold).any(0).nonzero().flatten()
        g = g[:, alive].cpu()
        order = g.argmax(0).argsort()  # sort subcomponents by the feature they serve
        im = ax.imshow(g[:, order], vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_xticks(range(len(alive)), [str(c) for c in alive[order].tolist()], fontsize=6, rotation=90)
        ax.set(title=name, xlabel="subcomponent", ylabel="input feature (one-hot)")
    fig.colorbar(im, ax=axes[0].tolist(), label="causal importance")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def plot_weights(model: ComponentModel, cfg: TMSConfig, path) -> None:
    """Cosine of each non-negligible subcomponent's columns U_c V[c, j] with W[:, j]; for m = 2 also arrows."""
    U, V = model.factors("linear1")
    W = model.decomposed["linear1"].target_weight()
    keep = (subcomponent_norms(U, V) > cfg.norm_threshold).nonzero().flatten()
    cos = column_cosines(W, U, V)[keep].cpu()
    order = cos.argmax(1).argsort()
    two_d = W.shape[0] == 2
    fig, axes = plt.subplots(1, 2 if two_d else 1, figsize=(10 if two_d else 6, 4), squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(cos[order], vmin=-1, vmax=1, cmap="RdBu", aspect="auto")
    ax.set_yticks(range(len(keep)), [str(c) for c in keep[order].tolist()], fontsize=6)
    ax.set(title="cos(U_c V[c, j], W[:, j])", xlabel="column j of W", ylabel="subcomponent c")
    fig.colorbar(im, ax=ax)
    if two_d:
        ax = axes[0, 1]
        for j in range(W.shape[1]):
            ax.arrow(0, 0, *W[:, j].tolist(), color="black", width=0.01, alpha=0.4, length_includes_head=True)
        for c in keep.tolist():
            j = V[c].abs().argmax().item()
            ax.arrow(0, 0, *(U[:, c] * V[c, j]).tolist(), color="tab:red", width=0.004, length_includes_head=True)
        lim = W.norm(dim=0).max().item() * 1.2
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
               title="W columns (grey) and subcomponents U_c V[c, j] (red)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# KEEP build(cfg: YourConfig) -> Experiment at module level: --resume and the analysis tools import it.
def build(cfg: TMSConfig) -> Experiment:
    """The target (trained first if missing) wrapped in fresh components, and its step-indexed data."""
    device = get_device(cfg.spd.device)
    n, p = cfg.target.n_features, cfg.target.feature_probability
    return Experiment.fresh(load_or_train_tms(cfg.target).to(device), cfg.spd,
                            lambda size, seed, step: tms_batch(n, p, size, seed, step, device))


# KEEP main's skeleton: parse_cli, build, optimize, figures, write_results (last line), run_main.
def main() -> None:
    cfg, run_dir = parse_cli(TMSConfig, __doc__.splitlines()[0])
    exp = build(cfg)
    model = exp.model
    results = optimize(model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir, eval_fn=lambda m: tms_metrics(m, cfg),
                       full_config=config_to_dict(cfg))
    if results is None:  # a torchrun rank > 0: rank 0 alone evaluates, plots and writes the results
        return

    figures = figures_dir(run_dir)
    plot_ci_per_feature(model, cfg, figures / "ci_per_feature.png")
    plot_weights(model, cfg, figures / "weights.png")

    print(f"MMCS {results['mmcs']:.4f}  ML2R {results['ml2r']:.4f}  (non-negligible only: MMCS "
          f"{results['mmcs_nonnegligible']:.4f}  ML2R {results['ml2r_nonnegligible']:.4f})  "
          + "  ".join(f"{k} {v}" for k, v in results.items() if k.startswith("n_")))
    print(f"{results['steps']} steps in {results['wall_s']} s ({results['steps_per_s']} steps/s), "
          f"peak RSS {results['peak_rss_mb']} MB")
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
