"""SPD on an MLP digit classifier: which few rank-one pieces of each layer classify each digit.

    python mnist_decomposition.py configs/digits.yaml [key.sub=value ...] [--out DIR]   # offline, 8x8 digits
    python mnist_decomposition.py configs/digits_cnn.yaml                               # the same with a CNN
    python mnist_decomposition.py configs/mnist.yaml                                    # 28x28 MNIST from the hub

The story:
  1. Load the config; get the target, an MLP images -> fc1 -> ReLU -> fc2 -> ReLU -> fc3 -> 10 logits, or a
     CNN images -> conv1 -> conv2 -> fc1 -> fc2 (trained and cached if missing), and its fixed training and
     held-out images.
  2. Decompose every layer with `spd_common.optimize`, the output loss comparing logits.
  3. Evaluate on the held-out images: accuracy of the target, of the CI-masked model and with each
     layer's components all ablated (that layer's masks 0, the other layers the target's); L0 per
     layer (mean active subcomponents per image) comes with optimize's generic results.
  4. Causal analysis, fc1 -> fc2: the effect of each fc1 component i on each fc2 component j,
     E[CI_j | i on] - E[CI_j | i off] over the images where CI_j > 0.1 (i's mask 1 or 0, fc1's other
     masks at their CI, fc2's CI recomputed from the activations that result); beside it the weight
     path V2[j] · U1[:, i], and how many fc1 components carry 80% of each fc2 component's effect.
     Beside it, two regressions predict each alive fc2 component's CI from the alive fc1 components' CIs
     (fitted on the training images, R² on the held-out ones): a Lasso (its top inputs) and forward
     stepwise least squares (the R² curve as inputs are added greedily; how many reach R² 0.8). Written
     to regression.md and regression.json in the run dir.
  5. Figures: mean CI per digit class, the first layer's top components' V rows as images (fc1's read
     pixels, conv1's are 3x3 filters), the causal analysis, and the causal graph fc1 -> fc2: the edges
     |effect| >= graph_min_effect, nodes ordered to cross few edges (analysis/causal.py's barycentric
     sweeps), dashed where the effect's sign is not the weight path's (a sign flip: the ReLU between the
     layers, or the CI function's shape, turns the weights' push around).
A conv module's CI is one per output location; per image it counts as its max over locations
(`ComponentModel.per_input`).

Copying this for a new experiment: change the target and data (`train_targets/train_mnist.py` and
`build`), the metrics (section "Metrics") and the figures (section "Figures"); keep the config's
`spd:` section, `optimize`, and the shape of `main` (parse_cli -> build -> optimize -> metrics ->
figures -> write_results), which gives the run directory, checkpoints, --resume and torchrun for free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from analysis.causal import (barycentric_order, crossings, firing_sign, forward_stepwise, lasso, n_to_reach,
                             plot_effect_graph, r2_curve, sign_flips)
from spd_common import ComponentModel, Experiment, SPDConfig, optimize
from spd_config import config_to_dict, option
from spd_run import figures_dir, get_device, parse_cli, run_main, set_seed, write_results
from train_targets.train_mnist import MNISTTargetConfig, image_batch, load_images, load_or_train_mnist

N_CLASSES = 10


@dataclass
class MNISTConfig:
    target: MNISTTargetConfig = option(doc="the target model, its data and how to train it")
    spd: SPDConfig = option(doc="the decomposition")
    effect_ci_threshold: float = option(0.1, "causal analysis: average over images where the fc2 component's CI > this",
                                    ge=0, le=1)
    effect_share: float = option(0.8, "causal analysis: count the fc1 components carrying this share of an effect",
                             gt=0, le=1)
    n_component_images: int = option(16, "first-layer components (highest mean CI) drawn as images", ge=1)
    n_lasso_top: int = option(5, "regression: the largest Lasso coefficients listed per fc2 component", ge=1)
    graph_min_effect: float = option(0.1, "causal graph: draw the edges with |effect| >= this", ge=0, le=1)


# ------------------------------------------------------------------------------------------------
# Metrics: first pure functions of CI, effects and weights (tested by hand), then those running the model
# ------------------------------------------------------------------------------------------------
def mean_ci_per_class(ci: Tensor, labels: Tensor, n_classes: int = N_CLASSES) -> Tensor:
    """(n_classes, C): mean CI of each subcomponent over the images of each class (0 for an absent class).
    ci (N, C), labels (N,)."""
    onehot = torch.nn.functional.one_hot(labels, n_classes).to(ci.dtype)  # (N, n_classes)
    return onehot.T @ ci / onehot.sum(0).clamp_min(1)[:, None]


def causal_effects(ci_on: Tensor, ci_off: Tensor, ci_base: Tensor, threshold: float) -> Tensor:
    """(I, J): effect[i, j] = mean of ci_on[i, n, j] - ci_off[i, n, j] over the images n whose
    unablated ci_base[n, j] > threshold (0 where there are none).
    ci_on, ci_off (I, N, J): later-layer CI with earlier component i's mask 1 / 0; ci_base (N, J)."""
    keep = (ci_base > threshold).to(ci_on.dtype)
    return torch.einsum("inj,nj->ij", ci_on - ci_off, keep) / keep.sum(0).clamp_min(1)


def weight_path(U1: Tensor, V2: Tensor) -> Tensor:
    """(C1, C2): V2[j] · U1[:, i], how strongly (and with which sign) component i's output direction feeds
    component j's input direction (ignoring the ReLU between them). U1 (d_hidden, C1), V2 (C2, d_hidden)."""
    return (V2 @ U1).T


def n_carrying(effect: Tensor, share: float) -> Tensor:
    """(J,): for each column j, the fewest rows whose |effect| together reach `share` of the column's
    total |effect| (0 for a column without any effect). effect (I, J)."""
    cum = effect.abs().sort(0, descending=True).values.cumsum(0)
    total = cum[-1]
    return ((cum < share * total).sum(0) + 1) * (total > 0)


@torch.no_grad()
def masked_accuracy(model: ComponentModel, x: Tensor, y: Tensor, masks: dict[str, Tensor]) -> float:
    with model.masked(masks):
        return (model(x).argmax(-1) == y).float().mean().item()


@torch.no_grad()
def mnist_metrics(model: ComponentModel, x: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracies on images x (N, d_in) with labels y (N,): target, CI-masked, each layer ablated; and
    how often the CI-masked model predicts what the target predicts."""
    ci = model.ci_of(x)
    pred = model(x).argmax(-1)
    out = {"acc_target": (pred == y).float().mean().item(),
           "acc_ci_masked": masked_accuracy(model, x, y, ci),
           "agreement_ci_masked": masked_accuracy(model, x, pred, ci)}  # same prediction as the target
    for n, g in ci.items():
        out[f"acc_ablated/{n}"] = masked_accuracy(model, x, y, {n: torch.zeros_like(g)})
    return out


@torch.no_grad()
def fc1_to_fc2_effects(model: ComponentModel, x: Tensor, alive1: Tensor, threshold: float) -> Tensor:
    """(len(alive1), C2) causal effects (see `causal_effects`) of the fc1 components alive1 on every
    fc2 component, on images x. Measured on fc2's CI rather than the logits: it asks whether j still
    counts as needed without i, in the units SPD itself uses, bounded in [-1, 1] for every pair."""
    ci = model.ci_of(x)
    on_off = []
    for value in (1.0, 0.0):
        per_i = []
        for i in alive1.tolist():
            masks = ci["fc1"].clone()
            masks[:, i] = value
            with model.masked({"fc1": masks}):
                _, inputs = model.run_target(x)
            per_i.append(model.module_ci("fc2", inputs["fc2"])[0])
        on_off.append(torch.stack(per_i))
    return causal_effects(*on_off, ci["fc2"], threshold)


def alive(ci: Tensor, threshold: float) -> Tensor:
    """Indices of the subcomponents with CI > threshold on at least one image. ci (N, C)."""
    return (ci > threshold).any(0).nonzero().flatten()


def fc1_to_fc2_regressions(fit: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], a1: Tensor, a2: Tensor,
                           share: float, n_top: int) -> list[dict]:
    """Per alive fc2 component j (a2), its CI predicted from the CIs of the alive fc1 components a1 by a
    Lasso and by forward stepwise least squares, fitted on `fit` and scored (R²) on `held_out`, each a
    pair of fc1 and fc2 CIs (N, C1), (N, C2): the Lasso's top inputs and R², the stepwise order and R²
    curve, and the inputs the curve needs to reach R² = share and `share` of its final R² (all of a1)."""
    (X, Y), (X_eval, Y_eval) = [(c1[:, a1].cpu(), c2[:, a2].cpu()) for c1, c2 in (fit, held_out)]
    rows = []
    for k, j in enumerate(a2.tolist()):
        coef, lasso_r2 = lasso(X, Y[:, k], X_eval, Y_eval[:, k])
        top = coef.abs().argsort(descending=True)[: min(n_top, int((coef != 0).sum()))].tolist()
        order = forward_stepwise(X, Y[:, k])
        curve = r2_curve(X, Y[:, k], X_eval, Y_eval[:, k], order)
        full = curve[-1] if curve else None
        rows.append({"fc2": j, "lasso_r2": lasso_r2, "lasso_n_inputs": int((coef != 0).sum()),
                     "lasso_top": [[int(a1[i]), round(coef[i].item(), 4)] for i in top],
                     "stepwise_order": [int(a1[i]) for i in order], "stepwise_r2": curve,
                     "n_for_r2": n_to_reach(curve, share),
                     "n_for_share_of_full_r2": n_to_reach(curve, share * full) if full and full > 0 else None})
    return rows


def regression_tables(rows: list[dict], n_causal: Tensor, share: float) -> str:
    """Markdown: the Lasso table and the stepwise table, a row per fc2 component; n_causal (J,): the fc1
    components carrying `share` of each one's causal effect (`n_carrying`)."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["## Lasso: fc2 CI from the alive fc1 components' CIs (R² on held-out images)", "",
             "| fc2 | R² | inputs used | top inputs (coefficient per standard deviation) |", "|---|---|---|---|"]
    lines += [f"| {r['fc2']} | {f(r['lasso_r2'])} | {r['lasso_n_inputs']} | "
              + ", ".join(f"fc1:{i} {c:+.3f}" for i, c in r["lasso_top"]) + " |" for r in rows]
    lines += ["", "## Forward stepwise least squares (R² on held-out images)", "",
              f"| fc2 | R² with 1 / 2 / 5 / 10 inputs | all alive fc1 | inputs to R² {share} | "
              f"to {share:.0%} of all's R² | causal: fc1 carrying {share:.0%} of the effect | first inputs |",
              "|---|---|---|---|---|---|---|"]
    for r, n in zip(rows, n_causal.tolist()):
        c = r["stepwise_r2"]
        lines.append(f"| {r['fc2']} | {' / '.join(f(c[k - 1]) if k <= len(c) else '-' for k in (1, 2, 5, 10))} | "
                     f"{f(c[-1] if c else None)} | {r['n_for_r2'] or '-'} | {r['n_for_share_of_full_r2'] or '-'} | "
                     f"{n} | {', '.join(map(str, r['stepwise_order'][:5]))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def plot_ci_per_class(per_class: dict[str, Tensor], alive_idx: dict[str, Tensor], path) -> None:
    """One heatmap per layer: mean CI per digit class (rows) of each alive subcomponent (columns),
    subcomponents sorted by the class they serve most."""
    fig, axes = plt.subplots(1, len(per_class), figsize=(5 * len(per_class), 3.5), squeeze=False)
    for ax, (n, m) in zip(axes[0], per_class.items()):
        idx = alive_idx[n]
        m = m[:, idx].cpu()
        order = m.argmax(0).argsort()
        im = ax.imshow(m[:, order], vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(idx)), [str(c) for c in idx[order].tolist()], fontsize=5, rotation=90)
        ax.set_yticks(range(N_CLASSES))
        ax.set(title=f"{n} ({len(idx)} alive)", xlabel="subcomponent", ylabel="digit")
    fig.colorbar(im, ax=axes[0].tolist(), label="mean causal importance")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_component_images(V: Tensor, top: Tensor, per_class: Tensor, side: int, path) -> None:
    """The first layer's V rows (the pixel pattern each component reads: the image for fc1, a filter for
    conv1) of the components `top`, as side x side images (red positive, blue negative), titled with the
    digit whose images use it most."""
    cols = min(8, len(top))
    rows = -(-len(top) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c in zip(axes.flat, top.tolist()):
        img = V[c].reshape(side, side).cpu()
        lim = img.abs().max().item()
        ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{c}: digit {per_class[:, c].argmax().item()}", fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_causal(effect: Tensor, path_w: Tensor, n80: Tensor, curves: list[list], alive1: Tensor, alive2: Tensor,
                share: float, path) -> None:
    """Causal effect of fc1 components (rows) on fc2 components (columns), the weight path beside it,
    how many fc1 components carry `share` of each fc2 component's effect, and the stepwise R² curves."""
    fig, axes = plt.subplots(1, 4, figsize=(21, 5), gridspec_kw={"width_ratios": [1, 1, 0.7, 0.7]})
    for ax, m, title in ((axes[0], effect, "E[CI_j | i on] - E[CI_j | i off]"),
                         (axes[1], path_w, "weight path V2[j] · U1[:, i] (oriented: see firing_sign)")):
        lim = m.abs().max().item() or 1.0
        im = ax.imshow(m.cpu(), aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(alive2)), [str(c) for c in alive2.tolist()], fontsize=5, rotation=90)
        ax.set_yticks(range(len(alive1)), [str(c) for c in alive1.tolist()], fontsize=5)
        ax.set(title=title, xlabel="fc2 component j", ylabel="fc1 component i")
        fig.colorbar(im, ax=ax)
    axes[2].bar(range(len(alive2)), n80.cpu())
    axes[2].set_xticks(range(len(alive2)), [str(c) for c in alive2.tolist()], fontsize=5, rotation=90)
    axes[2].set(title=f"fc1 components carrying {share:.0%} of the effect", xlabel="fc2 component j")
    for c in curves:
        axes[3].plot(range(1, len(c) + 1), [float("nan") if v is None else v for v in c], color="grey", lw=0.6)
    axes[3].axhline(share, color="black", lw=0.8)
    axes[3].set(title="stepwise regression, one line per fc2 component", xlabel="fc1 inputs (greedy order)",
                ylabel="R² on held-out images", ylim=(-0.1, 1), xscale="log")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return torch.tensor(values, dtype=torch.float64).median().item() if values else None


@torch.no_grad()
def analyse(model: ComponentModel, cfg: MNISTConfig, x: Tensor, y: Tensor, x_train: Tensor, run_dir) -> dict:
    """The causal analysis and regressions fc1 -> fc2 between the alive components of both, on held-out
    images x (N, d_in) with labels y (N,) (the regressions fitted on x_train), and every figure; returns
    the analysis' results."""
    figures, thr = figures_dir(run_dir), cfg.spd.ci_threshold
    inner, raw_ci = model.inner_acts(model.run_target(x)[1]), model.ci_of(x)
    ci = model.per_input(raw_ci)  # (N, C) per module
    alive_idx = {n: alive(g, thr) for n, g in ci.items()}
    a1, a2 = alive_idx["fc1"], alive_idx["fc2"]
    effect = fc1_to_fc2_effects(model, x, a1, cfg.effect_ci_threshold)[:, a2]
    (U1, _), (_, V2) = model.factors("fc1"), model.factors("fc2")
    sign1, sign2 = (firing_sign(inner[n].flatten(0, -2), raw_ci[n].flatten(0, -2), thr) for n in ("fc1", "fc2"))
    path_w = (weight_path(U1, V2) * sign1[:, None] * sign2)[a1][:, a2]
    n80 = n_carrying(effect, cfg.effect_share)
    top_edges = effect.abs().flatten().argsort(descending=True)[:10].tolist()
    ci_train = model.per_input(model.ci_of(x_train))
    rows = fc1_to_fc2_regressions((ci_train["fc1"], ci_train["fc2"]), (ci["fc1"], ci["fc2"]), a1, a2,
                                  cfg.effect_share, cfg.n_lasso_top)
    (run_dir / "regression.json").write_text(json.dumps(rows, indent=1))
    (run_dir / "regression.md").write_text(regression_tables(rows, n80, cfg.effect_share))
    flips = sign_flips(effect, path_w, cfg.graph_min_effect)
    adj = effect.abs() >= cfg.graph_min_effect
    left, right = barycentric_order(adj)
    out = {
        "causal/n_fc1_components_for_80pct": dict(zip(map(str, a2.tolist()), n80.tolist())),
        "causal/median_n_fc1_components_for_80pct": n80.float().median().item() if len(n80) else None,
        "causal/corr_abs_effect_weight_path": torch.corrcoef(torch.stack([effect.abs().flatten(),
                                                                          path_w.abs().flatten()]))[0, 1].item(),
        "causal/top_edges": [f"fc1:{a1[k // len(a2)]} -> fc2:{a2[k % len(a2)]} {effect.flatten()[k]:+.3f}"
                             for k in top_edges],
        "graph/n_edges": int(adj.sum()),
        "graph/n_sign_flips": int(flips.sum()),
        "graph/sign_flips": [f"fc1:{a1[i]} -> fc2:{a2[j]} effect {effect[i, j]:+.3f} path {path_w[i, j]:+.3f}"
                             for i, j in flips.nonzero().tolist()],
        "graph/crossings": crossings(adj, left, right),
        "graph/crossings_unordered": crossings(adj, torch.arange(len(a1)), torch.arange(len(a2))),
        "regression/median_lasso_r2": median([r["lasso_r2"] for r in rows]),
        "regression/median_lasso_n_inputs": median([r["lasso_n_inputs"] for r in rows]),
        "regression/median_stepwise_r2_all_inputs": median([r["stepwise_r2"][-1] for r in rows if r["stepwise_r2"]]),
        "regression/median_n_fc1_for_80pct_r2": median([r["n_for_r2"] for r in rows]),
        "regression/n_fc2_reaching_80pct_r2": sum(r["n_for_r2"] is not None for r in rows),
        "regression/median_n_fc1_for_80pct_of_full_r2": median([r["n_for_share_of_full_r2"] for r in rows]),
    }
    per_class = {n: mean_ci_per_class(g, y) for n, g in ci.items()}
    plot_ci_per_class(per_class, alive_idx, figures / "ci_per_class.png")
    first = model.decomposed[model.names[0]]
    side = first.original.kernel_size[0] if first.is_conv else cfg.target.image_side
    n_top = min(cfg.n_component_images, len(alive_idx[model.names[0]]))
    top = ci[model.names[0]].mean(0).argsort(descending=True)[:n_top]
    plot_component_images(model.factors(model.names[0])[1].detach(), top, per_class[model.names[0]], side,
                          figures / f"{model.names[0]}_components.png")
    plot_causal(effect, path_w, n80, [r["stepwise_r2"] for r in rows], a1, a2, cfg.effect_share,
                figures / "causal_fc1_fc2.png")
    plot_effect_graph(effect, flips, left, right, ([f"fc1:{c}" for c in a1.tolist()], [f"fc2:{c}" for c in a2.tolist()]),
                      cfg.graph_min_effect, f"fc1 -> fc2, |effect| >= {cfg.graph_min_effect}: {out['graph/n_edges']} "
                      f"edges (red: raises CI, dashed: {out['graph/n_sign_flips']} sign flips), {out['graph/crossings']} "
                      f"crossings", figures / "causal_graph_fc1_fc2.png")
    return out


# ------------------------------------------------------------------------------------------------
def build(cfg: MNISTConfig) -> Experiment:
    """The target (trained first if missing) wrapped in fresh components, and its step-indexed data."""
    device = get_device(cfg.spd.device)
    target = load_or_train_mnist(cfg.target).to(device)
    data = load_images(cfg.target)
    set_seed(cfg.spd.seed)
    model = ComponentModel.from_config(target, cfg.spd).to(device)
    x_train, x_test = data.x_train.to(device), data.x_test.to(device)

    def train_batch(step: int) -> Tensor:
        return image_batch(x_train, cfg.spd.batch_size, cfg.spd.seed, step)

    def eval_batch(step: int) -> Tensor:  # the same held-out images every time: curves comparable over steps
        return x_test[: cfg.spd.eval_batch_size]

    return Experiment(model, train_batch, eval_batch)


def main() -> None:
    cfg, run_dir = parse_cli(MNISTConfig, __doc__.splitlines()[0])
    exp = build(cfg)
    model = exp.model
    data = load_images(cfg.target)
    x, y = data.x_test.to(get_device(cfg.spd.device)), data.y_test.to(get_device(cfg.spd.device))
    results = optimize(model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir,
                       eval_fn=lambda m: mnist_metrics(m, x, y), full_config=config_to_dict(cfg))
    if results is None:  # a torchrun rank > 0: rank 0 alone evaluates, plots and writes the results
        return
    results["mean_l0"] = sum(results[f"l0/{n}"] for n in model.names) / len(model.names)

    results |= analyse(model, cfg, x, y, data.x_train.to(x.device), run_dir)

    print(f"accuracy: target {results['acc_target']:.4f}, CI-masked {results['acc_ci_masked']:.4f} (agreeing with "
          f"the target on {results['agreement_ci_masked']:.4f}), "
          + ", ".join(f"{k.removeprefix('acc_ablated/')} ablated {v:.3f}" for k, v in results.items()
                      if k.startswith("acc_ablated/"))
          + "; L0 " + ", ".join(f"{n} {results[f'l0/{n}']:.2f}" for n in model.names))
    print(f"causal fc1 -> fc2 ({results['n_alive/fc1']} x {results['n_alive/fc2']} alive): fc1 components carrying {cfg.effect_share:.0%} of an "
          f"fc2 component's effect: median {results['causal/median_n_fc1_components_for_80pct']}; by stepwise "
          f"regression to R² {cfg.effect_share}: median {results['regression/median_n_fc1_for_80pct_r2']} "
          f"({results['regression/n_fc2_reaching_80pct_r2']} reach it); {results['graph/n_sign_flips']} of "
          f"{results['graph/n_edges']} edges flip sign against the weight path")
    print(f"{results['steps']} steps in {results['wall_s']} s ({results['steps_per_s']} steps/s), "
          f"peak RSS {results['peak_rss_mb']} MB")
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
