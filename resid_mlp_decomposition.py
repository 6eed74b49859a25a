"""SPD on a residual MLP doing compressed computation: one W_in subcomponent per feature.

    python resid_mlp_decomposition.py configs/resid_mlp1.yaml [key.sub=value ...] [--out DIR]

The story:
  1. Load the config; get the target (100 features in a 1000-wide residual stream, ReLU MLPs with
     fewer neurons than features computing y_i = x_i + ReLU(x_i)), trained and cached if missing.
  2. Decompose every W_in and W_out with `spd_common.optimize`.
  3. Evaluate against the ground truth: a one-hot input x_i = 0.75 should give causal importance to
     exactly one W_in subcomponent, its own (a "monosemantic" feature; `n_monosemantic_per_layer`
     also counts a feature whose computation is split over layers, one own subcomponent in each; where
     one is not, `n_split_features`, `n_shared_subcomponents` and `n_unused_features` say why);
     the W_out subcomponents together should form one dense mechanism of full rank (50 for the
     1-layer model). Beside these, the reference's own measures: `identity_ci_error/<W_in>` and
     `dense_ci_error/<W_out>` (0 = the ideal pattern), and W_out subcomponents alive on random inputs
     (`w_out_alive_random`: CI > ci_threshold on any of alive_samples inputs; `w_out_dense_random`: on
     more than 1e-3 of them). Also: how well the CI-masked model reproduces the target's output, and the
     components alone (masks 1).
  4. Figures: CI heatmaps (features x subcomponents) and target vs decomposed output on a sweep of
     each feature's value.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from spd_common import ComponentModel, Experiment, SPDConfig, optimize
from spd_config import config_to_dict, option
from spd_run import figures_dir, get_device, parse_cli, run_main, write_results
from train_targets.train_resid_mlp import ResidMLPTargetConfig, labels, load_or_train_resid_mlp, resid_mlp_batch


# COPYING THIS SCRIPT? Change: the config below (keep its `spd: SPDConfig`), the target and data in
# build(), the metrics and the figures. Keep: build's signature and main's skeleton.
@dataclass
class ResidMLPConfig:
    target: ResidMLPTargetConfig = option(doc="the target model and how to train it")
    spd: SPDConfig = option(doc="the decomposition")
    one_hot_value: float = option(0.75, "value of the single active feature in the one-hot probes")
    monosemantic_ci: float = option(0.5, "CI at or above which a subcomponent counts as used by a one-hot input",
                                    gt=0, le=1)
    rank_rtol: float = option(1e-2, "singular values below rtol * the largest do not count towards a rank", gt=0)
    n_eval_batches: int = option(4, "eval batches for the CI-masked output error", ge=1)
    alive_samples: int = option(204_800, "random inputs (the training distribution) on which W_out subcomponents "
                                "count as alive, as the reference judges them", ge=1)


def layer_names(model: ComponentModel, kind: str) -> list[str]:
    """Decomposed module names ending in `kind` ('mlp_in' or 'mlp_out'), in layer order."""
    return [n for n in model.names if n.endswith(kind)]


# ------------------------------------------------------------------------------------------------
# Ground-truth metrics (pure functions of CI matrices and weights, so they can be tested by hand)
# ------------------------------------------------------------------------------------------------
def monosemantic(ci: Tensor, threshold: float) -> Tensor:
    """(n_features,) bool: feature i uses exactly one subcomponent (CI >= threshold) and no other
    feature uses that subcomponent. `ci` is (n_features, n_subcomponents), all W_in layers side by side."""
    used = ci >= threshold
    exclusive = used.sum(0) == 1  # subcomponents used by exactly one feature
    return (used.sum(1) == 1) & (used & exclusive).any(1)


def monosemantic_per_layer(ci_layers: list[Tensor], threshold: float) -> Tensor:
    """(n_features,) bool: feature i is monosemantic (see above) in every layer that uses it, and at
    least one layer does: its computation may be split over layers, each part its own subcomponent.
    `ci_layers`: one (n_features, C) CI matrix per layer's W_in."""
    used = [(ci >= threshold).any(1) for ci in ci_layers]
    clean = [monosemantic(ci, threshold) | ~u for ci, u in zip(ci_layers, used)]
    return torch.stack(clean).all(0) & torch.stack(used).any(0)


def why_not_monosemantic(ci_layers: list[Tensor], threshold: float) -> dict[str, int]:
    """What keeps features from being monosemantic per layer: features with CI >= threshold on several
    subcomponents of one layer (`split`), subcomponents that several features use (`shared`), both summed
    over the W_in layers, and features that no layer uses (`unused`). `ci_layers`: (n_features, C) each."""
    used = [ci >= threshold for ci in ci_layers]
    return {"split": sum(int((u.sum(1) > 1).sum()) for u in used),
            "shared": sum(int((u.sum(0) > 1).sum()) for u in used),
            "unused": int((~torch.stack([u.any(1) for u in used]).any(0)).sum())}


def identity_ci_error(ci: Tensor, tolerance: float = 0.1) -> int:
    """The reference's IdentityCIError of one layer: permute the subcomponents (columns of the one-hot
    CI matrix `ci`, (n_features, C)) so that the diagonal's sum is largest (Hungarian), then count the
    entries off the diagonal above `tolerance` and the diagonal entries below 1 - tolerance. 0: each
    feature has its own subcomponent with CI >= 0.9, and no other CI > 0.1."""
    rows = min(ci.shape)
    _, cols = linear_sum_assignment(-ci[:rows].detach().cpu().numpy())
    order = list(cols) + sorted(set(range(ci.shape[1])) - set(cols.tolist()))
    permuted = ci[:, order]
    off = torch.ones_like(permuted, dtype=torch.bool)
    off[:rows, :rows].fill_diagonal_(False)
    return int((permuted[off] > tolerance).sum() + (permuted[:rows, :rows].diagonal() < 1 - tolerance).sum())


def dense_ci_error(ci: Tensor, k: int, tolerance: float = 0.1) -> int:
    """The reference's error of a layer expected to use k dense subcomponents (W_out: k = d_mlp): with the
    columns of `ci` (n_features, C) sorted by their sum, each of the first k without one entry >= 1 - tolerance
    counts once, and every entry > tolerance in the other columns counts."""
    ordered = ci[:, ci.sum(0).argsort(descending=True)]
    missing = ((ordered >= 1 - tolerance).sum(0) < 1)[:k].sum()
    return int(missing + (ordered[:, k:] > tolerance).sum())


def summed_rank(U: Tensor, V: Tensor, which: Tensor, rtol: float) -> int:
    """Rank of sum_{c in which} U[:, c] V[c, :], the matrix the chosen subcomponents form together."""
    if which.sum() == 0:
        return 0
    return int(torch.linalg.matrix_rank(U[:, which] @ V[which], rtol=rtol))


@torch.no_grad()
def random_input_firing(model: ComponentModel, cfg: ResidMLPConfig, eval_batch) -> dict[str, Tensor]:
    """Per W_out module, (C,) how many of the first `alive_samples` held-out inputs (the training
    distribution) give each subcomponent CI > spd.ci_threshold."""
    counts = {name: 0 for name in layer_names(model, "mlp_out")}
    seen, i = 0, 0
    while seen < cfg.alive_samples:
        x = eval_batch(i)[: cfg.alive_samples - seen]
        ci = model.ci_of(x)
        for name in counts:
            counts[name] = counts[name] + (ci[name] > cfg.spd.ci_threshold).sum(0)
        seen, i = seen + len(x), i + 1
    return counts


@torch.no_grad()
def resid_mlp_metrics(model: ComponentModel, cfg: ResidMLPConfig, eval_batch) -> dict[str, float]:
    device = model.target.W_E.device
    n = cfg.target.n_features
    ci = model.ci_of(cfg.one_hot_value * torch.eye(n, device=device))
    ci_in = torch.cat([ci[name] for name in layer_names(model, "mlp_in")], dim=1)
    out = {"n_monosemantic_features": int(monosemantic(ci_in, cfg.monosemantic_ci).sum()),
           "n_monosemantic_per_layer": int(monosemantic_per_layer([ci[n] for n in layer_names(model, "mlp_in")],
                                                                  cfg.monosemantic_ci).sum())}
    why = why_not_monosemantic([ci[n] for n in layer_names(model, "mlp_in")], cfg.monosemantic_ci)
    out |= {"n_split_features": why["split"], "n_shared_subcomponents": why["shared"],
            "n_unused_features": why["unused"]}
    for name in layer_names(model, "mlp_in"):
        out[f"identity_ci_error/{name}"] = identity_ci_error(ci[name])
    fired = random_input_firing(model, cfg, eval_batch)
    for name in layer_names(model, "mlp_out"):
        alive = (ci[name] > cfg.spd.ci_threshold).any(0)
        U, V = model.factors(name)
        out[f"dense_ci_error/{name}"] = dense_ci_error(ci[name], cfg.target.d_mlp)
        out[f"w_out_alive/{name}"] = int(alive.sum())
        out[f"w_out_summed_rank/{name}"] = summed_rank(U, V, alive, cfg.rank_rtol)
        out[f"w_out_alive_random/{name}"] = int((fired[name] > 0).sum())
        out[f"w_out_dense_random/{name}"] = int((fired[name] / cfg.alive_samples > 1e-3).sum())
    # CI-masked model vs target: MSE relative to the variance of the target's output. Beside it, the
    # components alone (every mask 1, no delta term): the part of that error no CI function can remove.
    err = components_err = var = 0.0
    for i in range(cfg.n_eval_batches):
        x = eval_batch(i)
        target_out, inputs = model.run_target(x)
        ci = model.causal_importances(inputs)[0]
        with model.masked(ci):
            err += (model(x) - target_out).pow(2).mean().item()
        with model.masked({name: torch.ones_like(c) for name, c in ci.items()}):
            components_err += (model(x) - target_out).pow(2).mean().item()
        var += target_out.var().item()
    out["ci_masked_mse_over_target_var"] = err / var
    out["components_mse_over_target_var"] = components_err / var
    return out


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def plot_ci_heatmaps(model: ComponentModel, cfg: ResidMLPConfig, path) -> None:
    """CI on each one-hot input (rows: features) of every alive subcomponent (columns), per matrix
    kind, all layers side by side, subcomponents sorted by the feature they serve."""
    n = cfg.target.n_features
    ci = model.ci_of(cfg.one_hot_value * torch.eye(n, device=model.target.W_E.device))
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, kind in zip(axes, ["mlp_in", "mlp_out"]):
        g = torch.cat([ci[name] for name in layer_names(model, kind)], dim=1).cpu()
        g = g[:, (g > cfg.spd.ci_threshold).any(0)]
        g = g[:, g.argmax(0).argsort()]
        im = ax.imshow(g, vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set(title=f"{kind}: CI on one-hot x_i = {cfg.one_hot_value} ({g.shape[1]} alive subcomponents)",
               xlabel="subcomponent (sorted)", ylabel="feature i")
    fig.colorbar(im, ax=list(axes), label="causal importance")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def plot_feature_sweeps(model: ComponentModel, cfg: ResidMLPConfig, path, n_shown: int = 6) -> None:
    """For a few features i: output_i of the target and of the CI-masked decomposition as x_i sweeps
    [-1, 1] with every other feature off, with the label x_i + ReLU(x_i) for reference."""
    device = model.target.W_E.device
    sweep = torch.linspace(-1, 1, 101, device=device)
    fig, axes = plt.subplots(1, n_shown, figsize=(3 * n_shown, 3), sharey=True)
    for i, ax in enumerate(axes):
        x = torch.zeros(len(sweep), cfg.target.n_features, device=device)
        x[:, i] = sweep
        target_out, inputs = model.run_target(x)
        with model.masked(model.causal_importances(inputs)[0]):
            spd_out = model(x)
        s = sweep.cpu()
        ax.plot(s, labels(x)[:, i].cpu(), color="grey", ls=":", label="x + ReLU(x)")
        ax.plot(s, target_out[:, i].cpu(), color="black", label="target")
        ax.plot(s, spd_out[:, i].cpu(), color="tab:red", ls="--", label="SPD (CI masks)")
        ax.set(title=f"feature {i}", xlabel=f"x_{i}")
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# KEEP build(cfg: YourConfig) -> Experiment at module level: --resume and the analysis tools import it.
def build(cfg: ResidMLPConfig) -> Experiment:
    """The target (trained first if missing) wrapped in fresh components, and its step-indexed data."""
    device = get_device(cfg.spd.device)
    n, p = cfg.target.n_features, cfg.target.feature_probability
    target = load_or_train_resid_mlp(cfg.target).to(device)
    return Experiment.fresh(target, cfg.spd, lambda size, seed, step: resid_mlp_batch(n, p, size, seed, step, device))


# KEEP main's skeleton: parse_cli, build, optimize, figures, write_results (last line), run_main.
def main() -> None:
    cfg, run_dir = parse_cli(ResidMLPConfig, __doc__.splitlines()[0])
    exp = build(cfg)
    model, n = exp.model, cfg.target.n_features
    results = optimize(model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir,
                       eval_fn=lambda m: resid_mlp_metrics(m, cfg, exp.eval_batch), full_config=config_to_dict(cfg))
    if results is None:  # a torchrun rank > 0: rank 0 alone evaluates, plots and writes the results
        return

    figures = figures_dir(run_dir)
    plot_ci_heatmaps(model, cfg, figures / "ci_heatmaps.png")
    plot_feature_sweeps(model, cfg, figures / "feature_sweeps.png")

    print(f"monosemantic features {results['n_monosemantic_features']}/{n} (per layer: "
          f"{results['n_monosemantic_per_layer']}/{n})  "
          + "  ".join(f"{k} {v}" for k, v in results.items() if k.startswith(("w_out", "identity_ci", "dense_ci")))
          + f"  CI-masked MSE / target var {results['ci_masked_mse_over_target_var']:.3g}"
          + f" (components alone: {results['components_mse_over_target_var']:.3g})")
    print(f"{results['steps']} steps in {results['wall_s']} s ({results['steps_per_s']} steps/s), "
          f"peak RSS {results['peak_rss_mb']} MB")
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
