"""SPD on a CNN that names the shape, colour and size of a drawn shape: atomic features or combinations?

    python shapes_decomposition.py configs/shapes.yaml [key.sub=value ...] [--out DIR]   # offline

The story:
  1. Load the config; get the target, a CNN (3 conv + 2 fc layers) with three 3-way heads (shape,
     colour, size), trained and cached if missing, on images generated from a seed.
  2. Decompose all five layers together with `spd_common.optimize`: conv subcomponents are filters with an
     output direction, their CI and masks per output location; the output loss is the KL of each head.
  3. Evaluate on held-out images: accuracy per attribute of the target and of the CI-masked model.
  4. The question: a subcomponent fires on an image when its CI > spd.ci_threshold there (for a conv, at
     some location: the max over locations). For each alive one, find the set of images that best
     describes where it fires, among the 343 product sets {shape in A, colour in B, size in D} (A, B, D
     nonempty subsets of the 3 values), by the F1 of its firing against membership. It is atomic when that
     set restricts exactly one attribute (e.g. "colour = red", or "size != small"), a combination when it
     restricts two or three ("red circles"), dense when it restricts none (fires on every image), and
     unexplained when the best F1 is below `min_f1`. Beside it, the mutual information between its firing
     and each attribute, in bits (at most log2 3 = 1.58). A conv subcomponent also gets its coverage (the
     share of an image's locations where it fires, over the images where it fires) and spread
     (analysis/harvest.py's definitions): a dense one with coverage <= LOCAL_COVERAGE is a local detector,
     firing on every image but on a part of it, which "fires on this image" cannot show.
  5. Figures: mean CI per attribute value of every alive subcomponent, the top images of a few
     subcomponents per layer, and conv1's V filters as RGB patches.

Copying this for a new experiment: change the target and data (`train_targets/train_shapes.py` and
`build`), the metrics (section "Metrics") and the figures (section "Figures"); keep the config's
`spd:` section, `optimize`, and the shape of `main` (parse_cli -> build -> optimize -> metrics ->
figures -> write_results), which gives the run directory, checkpoints, --resume and torchrun for free.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

from analysis.harvest import LOCAL_COVERAGE, locality, location_counts
from spd_common import ComponentModel, Experiment, SPDConfig, optimize
from spd_config import config_to_dict, option
from spd_run import figures_dir, get_device, parse_cli, run_main, step_generator, write_results
from train_targets.train_shapes import ATTRIBUTES, ShapesTargetConfig, heldout, load_or_train_shapes, shapes_batch

VALUES = [f"{a}={v}" for a, vs in ATTRIBUTES.items() for v in vs]  # the 9 attribute values, in label order


# COPYING THIS SCRIPT? Change: the config below (keep its `spd: SPDConfig`), the target and data in
# build(), the metrics and the figures. Keep: build's signature and main's skeleton.
@dataclass
class ShapesConfig:
    target: ShapesTargetConfig = option(doc="the target model, its data and how to train it")
    spd: SPDConfig = option(doc="the decomposition")
    n_images: int = option(2000, "held-out images the metrics and figures read", ge=27)
    min_f1: float = option(0.7, "a subcomponent whose best product set fits its firing below this F1 is unexplained",
                           ge=0, le=1)
    n_top_components: int = option(4, "top-images figure: subcomponents per layer (most specific first)", ge=1)
    n_top_images: int = option(6, "top-images figure: images per subcomponent (highest CI first)", ge=1)


# ------------------------------------------------------------------------------------------------
# Metrics: first pure functions of firing and labels (tested by hand), then those running the model
# ------------------------------------------------------------------------------------------------
def product_sets() -> Tensor:
    """(343, 3, 3) bool: every {shape in A, colour in B, size in D} with A, B, D nonempty; [s, a, v] says
    whether set s allows value v of attribute a."""
    subsets = [torch.tensor([(k >> v) & 1 for v in range(3)], dtype=torch.bool) for k in range(1, 8)]
    return torch.stack([torch.stack(combo) for combo in itertools.product(subsets, repeat=3)])


def best_product_set(fires: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For each column c of fires (N, C) bool: the index (C,) into `product_sets()` whose members (images
    with labels (N, 3) inside the set) best match the images where c fires, by F1, and that F1 (C,)."""
    sets = product_sets()
    member = sets[:, torch.arange(3), labels].all(-1).T.float()  # (N, 343): sets[s, a, labels[n, a]] for all a
    f = fires.float()
    tp = f.T @ member  # (C, 343)
    f1 = 2 * tp / (f.sum(0)[:, None] + member.sum(0)[None, :]).clamp_min(1)
    best = f1.max(1)
    return best.indices, best.values


def describe(s: Tensor) -> tuple[str, int]:
    """A product set (3, 3) bool as text ("colour=red", "shape!=circle & size=large", "any image") and the
    number of attributes it restricts."""
    parts = []
    for (attr, names), allowed in zip(ATTRIBUTES.items(), s.tolist()):
        if sum(allowed) == 1:
            parts.append(f"{attr}={names[allowed.index(True)]}")
        elif sum(allowed) == 2:
            parts.append(f"{attr}!={names[allowed.index(False)]}")
    return " & ".join(parts) or "any image", len(parts)


def kind(n_restricted: int, f1: float, min_f1: float) -> str:
    if f1 < min_f1:
        return "unexplained"
    return {0: "dense", 1: "atomic"}.get(n_restricted, "combination")


def mutual_information(fires: Tensor, labels: Tensor) -> Tensor:
    """(C, 3): I(fires_c; attribute a) in bits, from the empirical joint over N images. fires (N, C) bool,
    labels (N, 3)."""
    f = fires.float()
    out = torch.zeros(f.shape[1], 3)
    for a in range(3):
        onehot = torch.nn.functional.one_hot(labels[:, a], 3).float()  # (N, 3)
        p_on = onehot.T @ f / len(f)  # (3 values, C): P(value, fires)
        joint = torch.stack([onehot.mean(0)[:, None] - p_on, p_on])  # (off/on, 3, C)
        indep = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        out[:, a] = torch.where(joint > 0, joint * (joint / indep.clamp_min(1e-12)).log2(), 0.0).sum((0, 1))
    return out


def mean_ci_per_value(ci: Tensor, labels: Tensor) -> Tensor:
    """(9, C): mean CI of each subcomponent over the images with each attribute value (rows in VALUES order).
    ci (N, C) per image, labels (N, 3)."""
    onehot = torch.cat([torch.nn.functional.one_hot(labels[:, a], 3) for a in range(3)], 1).float()  # (N, 9)
    return onehot.T @ ci / onehot.sum(0).clamp_min(1)[:, None]


@torch.no_grad()
def accuracy_metrics(model: ComponentModel, x: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy per attribute of the target and of the CI-masked model on images x with labels y (N, 3)."""
    ci = model.ci_of(x)
    out = {}
    for key, masks in (("target", None), ("ci_masked", ci)):
        with model.masked(masks or {}):
            acc = (model(x).argmax(-1) == y).float().mean(0).tolist()
        out |= {f"acc_{key}/{a}": v for a, v in zip(ATTRIBUTES, acc)}
    return out


@torch.no_grad()
def attribute_analysis(model: ComponentModel, cfg: ShapesConfig, x: Tensor, y: Tensor) -> tuple[dict, dict]:
    """Per alive subcomponent: its best product set, F1, kind and mutual information with each attribute;
    the counts per kind; a conv one also its coverage and spread. Returns (results entries, what the figures
    need)."""
    full = model.ci_of(x)
    ci = {n: g.clamp(0, 1) for n, g in model.per_input(full).items()}  # (N, C) per image
    # how much of an image needs c (a conv's mean over locations): ranks the top images, whose max often ties at 1
    share = {n: g.clamp(0, 1).mean((1, 2)) if g.dim() == 4 else ci[n] for n, g in full.items()}
    sets = product_sets()
    components, counts = {}, {k: 0 for k in ("atomic", "combination", "dense", "unexplained")}
    n_one_value = 0  # atomic ones firing on one value ("colour=red"), not on all but one ("colour!=red")
    n_dense_conv, n_dense_local = 0, 0
    alive = {}
    for n, g in ci.items():
        fires = g > cfg.spd.ci_threshold
        alive[n] = fires.any(0).nonzero().flatten()
        best, f1 = best_product_set(fires[:, alive[n]], y)
        mi = mutual_information(fires[:, alive[n]], y)
        conv = full[n].dim() == 4
        if conv:
            coverage, spread = locality(location_counts(full[n].float(), cfg.spd.ci_threshold)[1], fires.sum(0).float(),
                                        len(fires))
        for c, s, score, bits in zip(alive[n].tolist(), best.tolist(), f1.tolist(), mi.tolist()):
            text, n_restricted = describe(sets[s])
            k = kind(n_restricted, score, cfg.min_f1)
            counts[k] += 1
            n_one_value += k == "atomic" and "!=" not in text
            components[f"{n}:{c}"] = {"fires_on": text, "f1": round(score, 3), "kind": k,
                                      "density": round(fires[:, c].float().mean().item(), 4),
                                      "mi_bits": dict(zip(ATTRIBUTES, (round(b, 3) for b in bits)))}
            if conv:
                components[f"{n}:{c}"] |= {"coverage": round(coverage[c].item(), 4),
                                           "spread": round(spread[c].item(), 4)}
                n_dense_conv += k == "dense"
                n_dense_local += k == "dense" and coverage[c].item() <= LOCAL_COVERAGE
    out = {f"n_{k}": v for k, v in counts.items()} | {"n_atomic_one_value": n_one_value, "n_dense_conv": n_dense_conv,
                                                     "n_dense_conv_local": n_dense_local, "components": components}
    return out, {"ci": ci, "share": share, "alive": alive}


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------
def plot_ci_per_value(ci: dict[str, Tensor], alive: dict[str, Tensor], y: Tensor, path) -> None:
    """One heatmap per layer: mean CI per attribute value (rows) of each alive subcomponent (columns),
    sorted by the value they serve most."""
    fig, axes = plt.subplots(1, len(ci), figsize=(4.5 * len(ci), 3.5), squeeze=False)
    for ax, (n, g) in zip(axes[0], ci.items()):
        idx = alive[n]
        m = mean_ci_per_value(g[:, idx], y)
        order = m.argmax(0).argsort()
        im = ax.imshow(m[:, order], vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(idx)), [str(c) for c in idx[order].tolist()], fontsize=5, rotation=90)
        ax.set_yticks(range(9), VALUES if ax is axes[0][0] else [""] * 9, fontsize=7)
        ax.set(title=f"{n} ({len(idx)} alive)", xlabel="subcomponent")
    fig.colorbar(im, ax=axes[0].tolist(), label="mean causal importance (max over locations)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_top_images(x: Tensor, ci: dict[str, Tensor], share: dict[str, Tensor], alive: dict[str, Tensor],
                    components: dict, n_comp: int, n_img: int, path) -> None:
    """Rows: the n_comp most specific subcomponents of each layer (not dense, best F1 first); columns: the
    n_img images with the highest CI (ties, as at CI 1, broken by `share`), each titled with CI and share."""
    def specificity(n: str, c: int) -> tuple[bool, float]:
        info = components[f"{n}:{c}"]
        return info["kind"] != "dense", info["f1"]
    rows = [(n, c) for n in ci
            for c in sorted(alive[n].tolist(), key=lambda c: specificity(n, c), reverse=True)[:n_comp]]
    fig, axes = plt.subplots(len(rows), n_img, figsize=(1.3 * n_img, 1.45 * len(rows)), squeeze=False)
    for r, (n, c) in enumerate(rows):
        top = (ci[n][:, c] + 1e-3 * share[n][:, c]).argsort(descending=True)[:n_img]  # both in [0, 1]
        info = components[f"{n}:{c}"]
        axes[r, 0].set_ylabel(f"{n}:{c}\n{info['fires_on']}\nF1 {info['f1']:.2f}", fontsize=6, rotation=0,
                              ha="right", va="center")
        for ax, i in zip(axes[r], top.tolist()):
            ax.imshow(x[i].permute(1, 2, 0).clamp(0, 1).cpu())
            ax.set_title(f"{ci[n][i, c]:.2f} / {share[n][i, c]:.2f}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_filters(V: Tensor, kernel: tuple[int, int], alive: Tensor, components: dict, path) -> None:
    """conv1's V[c] (3 colours x kH x kW) of the alive subcomponents as RGB patches: grey is 0, each
    colour channel brighter where the filter weights that colour positively."""
    cols = min(8, len(alive)) or 1
    rows = -(-len(alive) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c in zip(axes.flat, alive.tolist()):
        f = V[c].detach().view(3, *kernel).cpu()
        ax.imshow((0.5 + f / (2 * f.abs().max().clamp_min(1e-12))).permute(1, 2, 0))
        ax.set_title(f"{c}: {components[f'conv1:{c}']['fires_on']}", fontsize=5)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def build(cfg: ShapesConfig) -> Experiment:
    """The target (trained first if missing) wrapped in fresh components, and its step-indexed images."""
    device = get_device(cfg.spd.device)

    def images(n: int, seed: int, step: int) -> Tensor:
        return shapes_batch(n, step_generator(seed, step), cfg.target.noise)[0].to(device)

    return Experiment.fresh(load_or_train_shapes(cfg.target).to(device), cfg.spd, images)


def main() -> None:
    cfg, run_dir = parse_cli(ShapesConfig, __doc__.splitlines()[0])
    exp = build(cfg)
    model = exp.model
    device = get_device(cfg.spd.device)
    x, y = (t.to(device) for t in heldout(cfg.n_images, cfg.target.noise))
    results = optimize(model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir,
                       eval_fn=lambda m: accuracy_metrics(m, x, y), full_config=config_to_dict(cfg))
    if results is None:  # a torchrun rank > 0: rank 0 alone evaluates, plots and writes the results
        return
    analysis, fig_data = attribute_analysis(model, cfg, x, y)
    results |= analysis
    results["l0_per_image"] = {n: round((g > cfg.spd.ci_threshold).sum(-1).float().mean().item(), 2)
                               for n, g in fig_data["ci"].items()}

    figures = figures_dir(run_dir)
    plot_ci_per_value(fig_data["ci"], fig_data["alive"], y.cpu(), figures / "ci_per_attribute_value.png")
    plot_top_images(x, fig_data["ci"], fig_data["share"], fig_data["alive"], analysis["components"],
                    cfg.n_top_components, cfg.n_top_images, figures / "top_images.png")
    if "conv1" in model.decomposed:
        conv1 = model.decomposed["conv1"]
        plot_filters(conv1.components.factors()[1], conv1.original.kernel_size, fig_data["alive"]["conv1"],
                     analysis["components"], figures / "conv1_filters.png")

    print("accuracy (target -> CI-masked): " + ", ".join(
        f"{a} {results[f'acc_target/{a}']:.4f} -> {results[f'acc_ci_masked/{a}']:.4f}" for a in ATTRIBUTES))
    print(f"alive subcomponents: {results['n_atomic']} atomic ({results['n_atomic_one_value']} on one value), "
          f"{results['n_combination']} combinations, "
          f"{results['n_dense']} dense, {results['n_unexplained']} unexplained (best F1 < {cfg.min_f1}); "
          "L0 per image " + ", ".join(f"{n} {v}" for n, v in results["l0_per_image"].items()))
    print(f"dense conv subcomponents: {results['n_dense_conv']}, of which {results['n_dense_conv_local']} local "
          f"(firing on at most {LOCAL_COVERAGE:.0%} of an image's locations)")
    print(f"{results['steps']} steps in {results['wall_s']} s ({results['steps_per_s']} steps/s), "
          f"peak RSS {results['peak_rss_mb']} MB; max possible MI per attribute {math.log2(3):.2f} bits")
    write_results(run_dir, results)


if __name__ == "__main__":
    run_main(main)
