"""Group the alive subcomponents of a decomposition (all modules together) by co-activation.

    python analysis/clustering.py RUN_DIR [--threshold 0.15] [--n-batches 4] [--out DIR]

Firing: subcomponent c fires on an input when its CI > spd.ci_threshold. Similarity of two subcomponents
(or clusters): Jaccard |A and B| / |A or B| of their firing sets, the fraction of the inputs where either
fires on which both do. Clusters: average-linkage agglomerative merging (scipy), which stops when no two
clusters have a mean pairwise Jaccard >= --threshold.

Why Jaccard, and why 0.15. On inputs with ~1 active feature, a per-feature subcomponent fires on ~1% of
inputs and shares almost none of them with another feature's (Jaccard ~0.01); it also shares little with a
subcomponent that fires on 20% of inputs even when it always co-fires with it (Jaccard <= 0.01/0.2), so
rare and frequent subcomponents stay apart even when one implies the other. Subcomponents of a dense
mechanism, used together on a large share of all inputs (resid_mlp1's W_out: ~12 of ~50 on each input,
each on ~20% of inputs), overlap far more than that: their pairwise Jaccard is 0.17-0.34 (mean ~0.22), so
at 0.15 they merge into one cluster while no per-feature subcomponent joins them (at most 0.03).
Components that fire on the very same inputs (TMS's encoder and decoder subcomponent of one feature,
Jaccard ~0.7) merge first. A conditional measure (P(B | A)) would instead glue each per-feature W_in
subcomponent to every dense one its feature uses.

Writes to --out (default RUN_DIR/analysis): clusters.json (clusters, largest first, with their members,
module counts, firing density and mean internal Jaccard), dendrogram.png and coactivation.png (the
Jaccard matrix in dendrogram order, clusters boxed).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.cluster.hierarchy import dendrogram, fcluster, linkage
from scipy.spatial.distance import squareform
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.common import alive, collect_ci, out_dir, parser  # noqa: E402 (needs ROOT on the path)
from spd_config import SPDError  # noqa: E402
from spd_run import load_run, run_main  # noqa: E402


def jaccard(fires: Tensor) -> Tensor:
    """fires (N, K) bool -> (K, K) Jaccard of the columns' firing sets (1 on the diagonal)."""
    f = fires.double()
    both = f.T @ f
    count = f.sum(0)
    return both / (count[:, None] + count[None, :] - both).clamp_min(1)


def cluster(sim: Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Average-linkage clusters of a (K, K) similarity, merged while the mean similarity between two
    clusters is >= threshold. Returns (labels (K,) in 0..n_clusters-1, scipy linkage matrix)."""
    if len(sim) == 1:
        return np.zeros(1, dtype=int), np.zeros((0, 4))
    dist = (1 - sim).numpy()
    np.fill_diagonal(dist, 0)
    Z = linkage(squareform(dist, checks=False), "average")
    labels = fcluster(Z, 1 - threshold + 1e-12, "distance") - 1  # + 1e-12: a merge at exactly threshold happens
    return labels, Z


def describe(labels: np.ndarray, names: list[str], fires: Tensor, sim: Tensor) -> list[dict]:
    """One dict per cluster, largest first: members, per-module counts, density (share of inputs where
    any member fires) and mean internal Jaccard (null for a singleton)."""
    out = []
    for k in np.unique(labels):
        idx = np.nonzero(labels == k)[0]
        modules: dict[str, int] = {}
        for i in idx:
            module = names[i].rsplit(":", 1)[0]
            modules[module] = modules.get(module, 0) + 1
        inner = sim[np.ix_(idx, idx)]
        mean_inner = (inner.sum() - len(idx)) / (len(idx) * (len(idx) - 1)) if len(idx) > 1 else None
        out.append({"size": len(idx), "members": [names[i] for i in idx], "modules": modules,
                    "density": round(fires[:, idx].any(1).float().mean().item(), 4),
                    "mean_jaccard": None if mean_inner is None else round(float(mean_inner), 4)})
    return sorted(out, key=lambda c: -c["size"])


def plot(sim: Tensor, labels: np.ndarray, Z: np.ndarray, names: list[str], threshold: float, out) -> None:
    K = len(names)
    order = dendrogram(Z, no_plot=True)["leaves"] if len(Z) else [0]
    show_names = K <= 60  # beyond that, tick labels are unreadable
    fig, ax = plt.subplots(figsize=(min(16, max(8, 0.18 * K)), 5))
    if len(Z):
        dendrogram(Z, ax=ax, labels=names if show_names else None, color_threshold=1 - threshold,
                   no_labels=not show_names, leaf_font_size=7, leaf_rotation=90)
    ax.axhline(1 - threshold, color="grey", ls="--", lw=1, label=f"stop: mean Jaccard < {threshold}")
    ax.set(ylabel="1 - mean Jaccard (average linkage)", title=f"{K} alive subcomponents, {labels.max() + 1} clusters")
    ax.legend(fontsize=8)
    fig.savefig(out / "dendrogram.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(sim[np.ix_(order, order)], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    start = 0
    for _, group in itertools.groupby(labels[order]):
        n = len(list(group))
        if n > 1:
            ax.add_patch(plt.Rectangle((start - 0.5, start - 0.5), n, n, fill=False, ec="red", lw=1.2))
        start += n
    if show_names:
        ax.set_xticks(range(K), [names[i] for i in order], rotation=90, fontsize=6)
        ax.set_yticks(range(K), [names[i] for i in order], fontsize=6)
    ax.set(title="Jaccard of firing sets (dendrogram order, clusters boxed)")
    fig.colorbar(im, ax=ax, label="Jaccard")
    fig.savefig(out / "coactivation.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = parser(__doc__.splitlines()[0], ["RUN_DIR"])
    ap.add_argument("--threshold", type=float, default=0.15, help="stop merging below this mean Jaccard")
    args = ap.parse_args()
    cfg, exp = load_run(args.run_dir)
    out = out_dir(args.out, args.run_dir)
    ci = collect_ci(exp, args.n_batches)
    live = alive(ci, cfg.spd.ci_threshold, args.min_density)
    names = [f"{n}:{c}" for n, idx in live.items() for c in idx.tolist()]
    if not names:
        raise SPDError(f"no subcomponent of {args.run_dir} fires on {args.min_density} of the inputs; "
                       f"lower --min-density or check the run")
    fires = torch.cat([ci[n][:, idx] > cfg.spd.ci_threshold for n, idx in live.items()], dim=1)  # (N, K)
    sim = jaccard(fires)
    labels, Z = cluster(sim, args.threshold)
    clusters = describe(labels, names, fires, sim)
    (out / "clusters.json").write_text(json.dumps(
        {"run_dir": str(args.run_dir), "n_inputs": fires.shape[0], "ci_threshold": cfg.spd.ci_threshold,
         "min_density": args.min_density, "similarity": "jaccard", "linkage": "average",
         "stop_below_mean_jaccard": args.threshold, "n_alive": len(names), "n_clusters": len(clusters),
         "clusters": clusters}, indent=1))
    plot(sim, labels, Z, names, args.threshold, out)

    print(f"{len(names)} alive subcomponents on {fires.shape[0]} inputs -> {len(clusters)} clusters "
          f"({sum(c['size'] == 1 for c in clusters)} singletons); the multi-member ones:")
    for c in clusters:
        if c["size"] > 1:
            print(f"  {c['size']:3d}  mean Jaccard {c['mean_jaccard']:.2f}  density {c['density']:.3f}  "
                  + (", ".join(c["members"]) if c["size"] <= 6 else str(c["modules"])))
    print(out / "clusters.json")


if __name__ == "__main__":
    run_main(main)
