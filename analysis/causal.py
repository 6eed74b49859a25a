"""How the subcomponents of one decomposed layer drive those of a later one: ablate each, watch the next.

    python analysis/causal.py RUN_DIR [--layers A B] [--min-effect 0.1] [--n-batches 4] [--out DIR]

The forward pass: every decomposed module runs its components masked by its own CI, computed from the
input it receives in this very pass ("self-consistent CI masks"; the weight residual W - UV is left out, as
in CI-masked evaluation). Ablating subcomponent c of module A sets its mask to 0 on top of that, so every
module after A recomputes its CI from the changed activations. For each alive c of A (CI > spd.ci_threshold
on at least --min-density of the inputs), on the inputs (positions, for sequence models; images, when A or
B is a conv, whose CI then counts as its max over locations) where c fires in the unablated pass:
  - delta CI of every subcomponent d of B: mean of CI_B[d] (ablated) - CI_B[d] (unablated); an edge
    c -> d is kept when |delta| >= --min-effect (negative: c is needed to switch d on), with the mean
    unablated CI of d on those inputs beside it;
  - output change: mean squared change of the output on those inputs over the unablated output's mean
    square there (1 = as far off as an output of zeros).

Default pairs: modules with the same role in consecutive blocks (names equal up to the layer number:
layers.0.mlp_in -> layers.1.mlp_in, which is where a feature's W_in subcomponent of one layer should drive
its own in the next); in a model without such pairs (TMS), each module -> the next one in forward order.

Writes causal.json (per pair: each ablated subcomponent's inputs, output change and edges) and causal.png
(per pair, a bipartite graph: edge width ~ |delta CI|, red = ablation lowers CI, blue = raises it) to
--out (default RUN_DIR/analysis).

Also here, for mnist_decomposition.py's fc1 -> fc2 analysis and any other pair of layers: the regressions
of the later layer's CI on the earlier one's (Lasso, forward stepwise least squares), the barycentric node
order of a bipartite effect graph with its crossing count, and the sign flips between effects and weights.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.common import alive, out_dir, parser  # noqa: E402 (needs ROOT on the path)
from spd_common import ComponentModel  # noqa: E402
from spd_config import SPDError  # noqa: E402
from spd_run import load_run, run_main  # noqa: E402


@contextmanager
def self_consistent_masks(model: ComponentModel, ablate: tuple[str, int] | None = None):
    """Inside, each forward masks every decomposed module with the CI of the input it receives (component
    `ablate` = (module, c) masked to 0 as well); yields {module: CI (..., C)} of the latest forward."""
    cis: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(mod, args):
            cis[name] = model.module_ci(name, args[0])[0]
            mask = cis[name]
            if ablate is not None and ablate[0] == name:
                mask = mask.clone()
                mask[..., ablate[1]] = 0
            mod.mask = mask
        return hook

    handles = [mod.register_forward_pre_hook(hook_for(n)) for n, mod in model.decomposed.items()]
    try:
        with model.masked({}):  # clears every mask on the way out
            yield cis
    finally:
        for h in handles:
            h.remove()


def forward_order(model: ComponentModel, x: Tensor) -> list[str]:
    """Decomposed module names in the order a forward pass calls them."""
    order: list[str] = []
    handles = [mod.register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n, mod in model.decomposed.items()]
    try:
        model.run_target(x)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def default_pairs(order: list[str]) -> list[tuple[str, str]]:
    """Same role in consecutive blocks (names equal up to their numeric segments), else consecutive modules."""
    role = {n: re.sub(r"(^|\.)\d+(?=\.|$)", r"\1#", n) for n in order}  # layers.3.mlp_in -> layers.#.mlp_in
    pairs = []
    for i, a in enumerate(order):
        later = [b for b in order[i + 1:] if role[b] == role[a]]
        if later:
            pairs.append((a, later[0]))
    return pairs or list(zip(order[:-1], order[1:]))


def edges(delta: Tensor, min_effect: float) -> list[tuple[int, float]]:
    """(d, delta_d) for the later-layer subcomponents whose mean CI change |delta_d| >= min_effect,
    largest first. delta (C_B,)."""
    keep = (delta.abs() >= min_effect).nonzero().flatten()
    return sorted(((int(d), float(delta[d])) for d in keep), key=lambda e: -abs(e[1]))


@torch.no_grad()
def ablate_pair(model: ComponentModel, output_fn, x: Tensor, a: str, b: str, threshold: float, min_density: float,
                min_effect: float) -> list[dict]:
    """Ablate each alive subcomponent of module `a` on x (its firing inputs only); effects on module `b`.
    When either is a conv, both CIs are compared per image, a conv's as its max over locations (`per_input`)."""
    per_image = model.decomposed[a].is_conv or model.decomposed[b].is_conv
    reduce = model.per_input if per_image else (lambda cis: cis)  # noqa: E731
    with self_consistent_masks(model) as cis:
        base_out = output_fn(model(x))
        base = reduce({a: cis[a], b: cis[b]})
    n_batch = x.shape[0]
    results = []
    for c in alive({a: base[a].flatten(0, -2)}, threshold, min_density)[a].tolist():
        fires = base[a][..., c] > threshold  # (batch,) or (batch, seq)
        rows = fires.reshape(n_batch, -1).any(1)
        with self_consistent_masks(model, ablate=(a, c)) as cis:
            out = output_fn(model(x[rows]))
            ci_b = reduce({b: cis[b]})[b]
        pos = fires[rows]  # the positions where c fired, among the selected rows
        before = base[b][rows][pos]
        delta = (ci_b[pos] - before).mean(0)
        change = (out - base_out[rows]).pow(2).mean() / base_out[rows].pow(2).mean().clamp_min(1e-12)
        results.append({"component": f"{a}:{c}", "n_inputs": int(pos.sum()), "output_change": round(change.item(), 4),
                        "edges": [{"to": f"{b}:{d}", "delta_ci": round(v, 4),
                                   "ci_unablated": round(before[:, d].mean().item(), 4)}
                                  for d, v in edges(delta, min_effect)]})
    return results


# ------------------------------------------------------------------------------------------------
# Regressions and the effect graph between two layers (mnist_decomposition.py's fc1 -> fc2): pure functions
# of CI, effects and weights, checked by hand in tests/test_analysis_structure.py
# ------------------------------------------------------------------------------------------------
def r2(y: Tensor, y_hat: Tensor) -> float | None:
    """1 - SSE / SST of predictions y_hat (N,) of y (N,); None when y is constant."""
    sst = (y - y.mean()).pow(2).sum().item()
    return None if sst == 0 else 1 - (y - y_hat).pow(2).sum().item() / sst


def forward_stepwise(X: Tensor, y: Tensor) -> list[int]:
    """Forward stepwise regression: the columns of X (N, I) in the order a greedy least-squares fit of y
    (N,), with an intercept, adds them, each the one that lowers the residual sum of squares most (raises
    R² most). Each step projects the chosen column out of the residual and of the other columns, so the
    gain of column c is (r · x_c)² / |x_c|² in that projected space (constant columns are never added)."""
    Xc, r = (X - X.mean(0)).double(), (y - y.mean()).double()
    order: list[int] = []
    for _ in range(X.shape[1]):
        norm2 = Xc.pow(2).sum(0)
        gain = (Xc.T @ r).pow(2) / norm2.clamp_min(1e-30)
        gain[norm2 <= 1e-12 * X.shape[0]] = -1  # constant, or a combination of those already chosen
        gain[order] = -1
        if gain.max() < 0:
            break
        c = int(gain.argmax())
        q = Xc[:, c] / norm2[c].sqrt()
        r = r - (q @ r) * q
        Xc = Xc - torch.outer(q, q @ Xc)
        order.append(c)
    return order


def r2_curve(X: Tensor, y: Tensor, X_eval: Tensor, y_eval: Tensor, order: list[int]) -> list[float | None]:
    """R² on (X_eval, y_eval) of least-squares fits on (X, y) with an intercept and the first 1, 2, ...
    columns of `order`. X, X_eval (N, I), y, y_eval (N,)."""
    ones, ones_eval = X.new_ones(len(X), 1).double(), X.new_ones(len(X_eval), 1).double()
    curve = []
    for k in range(1, len(order) + 1):
        A, A_eval = torch.cat([ones, X[:, order[:k]].double()], 1), torch.cat([ones_eval, X_eval[:, order[:k]].double()], 1)
        coef = torch.linalg.lstsq(A, y.double()[:, None], driver="gelsd").solution
        curve.append(r2(y_eval.double(), (A_eval @ coef)[:, 0]))
    return curve


def n_to_reach(curve: list[float | None], level: float) -> int | None:
    """How many inputs the R² curve needs to reach `level` (None: it never does)."""
    return next((k + 1 for k, v in enumerate(curve) if v is not None and v >= level), None)


def lasso(X: Tensor, y: Tensor, X_eval: Tensor, y_eval: Tensor, seed: int = 0) -> tuple[Tensor, float | None]:
    """Lasso of y (N,) on the columns of X (N, I), each scaled to unit variance on X (constant ones left
    out), its penalty chosen by 5-fold cross-validation (sklearn's LassoCV). Returns the coefficients (I,)
    per standard deviation of each input (0: not used) and the fit's R² on (X_eval, y_eval)."""
    from sklearn.linear_model import LassoCV  # scikit-learn: imported only where a regression is run

    mean, std = X.mean(0), X.std(0)
    used = std > 0
    coef = torch.zeros(X.shape[1], dtype=torch.float64)
    if not used.any():
        return coef, r2(y_eval.double(), torch.full_like(y_eval, y.mean().item()).double())
    scale = lambda A: ((A[:, used] - mean[used]) / std[used]).double().numpy()  # noqa: E731
    fit = LassoCV(cv=5, random_state=seed).fit(scale(X), y.double().numpy())
    coef[used] = torch.from_numpy(fit.coef_)
    return coef, r2(y_eval.double(), torch.from_numpy(fit.predict(scale(X_eval))))


def crossings(adj: Tensor, left: Tensor, right: Tensor) -> int:
    """Edge crossings of a two-column drawing of the bipartite graph adj (I, J) (bool), the left nodes
    top to bottom in the order `left` (I,) and the right ones in `right` (J,): the pairs of edges (a, b),
    (c, d) with a above c and b below d."""
    lpos, rpos = left.argsort(), right.argsort()
    i, j = adj.nonzero().unbind(1)
    p, q = lpos[i], rpos[j]
    return int(((p[:, None] - p[None]) * (q[:, None] - q[None]) < 0).sum()) // 2


def barycentric_order(adj: Tensor, sweeps: int = 4) -> tuple[Tensor, Tensor]:
    """Node orders (left (I,), right (J,)) of the bipartite graph adj (I, J) with few edge crossings, by the
    barycentric heuristic (Sugiyama et al. 1981): from the identity order, each sweep moves every right
    node to the mean position of its left neighbours, then every left node to the mean of its right ones
    (a node without any keeps its place; ties keep the current order). The order with the fewest crossings
    seen, the identity included, is returned: never more crossings than the identity."""
    w = adj.double()
    left, right = torch.arange(adj.shape[0]), torch.arange(adj.shape[1])
    best = (crossings(adj, left, right), left, right)

    def resort(order: Tensor, w: Tensor, other: Tensor) -> Tensor:
        pos, other_pos = order.argsort().double(), other.argsort().double()
        deg = w.sum(1)
        bary = torch.where(deg > 0, (w @ other_pos) / deg.clamp_min(1), pos)
        return order[bary[order].argsort(stable=True)]

    for _ in range(sweeps):
        right = resort(right, w.T, left)
        left = resort(left, w, right)
        best = min(best, (crossings(adj, left, right), left, right), key=lambda b: b[0])
    return best[1], best[2]


def firing_sign(inner: Tensor, ci: Tensor, threshold: float) -> Tensor:
    """(C,): the sign (+1 / -1) of each subcomponent's mean inner act over the inputs where its CI >
    threshold (+1 where it never fires). A rank-one U[:, c] V[c] is unchanged by flipping the signs of
    both factors; orienting each c so that it mostly fires with a positive inner act fixes that sign.
    inner, ci (N, C)."""
    fires = (ci > threshold).to(inner.dtype)
    return torch.where((inner * fires).sum(0) < 0, -1.0, 1.0)


def sign_flips(effect: Tensor, path: Tensor, min_effect: float) -> Tensor:
    """(I, J) bool: the edges (|effect| >= min_effect) whose measured effect and weight path have
    opposite signs. effect, path (I, J)."""
    return (effect.abs() >= min_effect) & (effect * path < 0)


def plot_effect_graph(effect: Tensor, flips: Tensor, left: Tensor, right: Tensor, labels: tuple[list[str], list[str]],
                      min_effect: float, title: str, path) -> None:
    """A bipartite graph of the edges |effect| >= min_effect of effect (I, J): left nodes (rows) in the order
    `left`, right nodes (columns) in `right`, top to bottom; edge width ~ |effect|, red positive, blue
    negative, dashed where `flips` (I, J) marks a sign flip against the weight path."""
    adj = effect.abs() >= min_effect
    lpos, rpos = left.argsort().tolist(), right.argsort().tolist()
    scale = lambda n: (lambda k: k / max(n - 1, 1))  # noqa: E731
    ly, ry = scale(len(left)), scale(len(right))
    fig, ax = plt.subplots(figsize=(6, max(5.0, 0.14 * max(len(left), len(right)))))
    for i, j in adj.nonzero().tolist():
        e = effect[i, j].item()
        ax.plot([0, 1], [ly(lpos[i]), ry(rpos[j])], color="tab:red" if e > 0 else "tab:blue", lw=0.4 + 3 * abs(e),
                ls="--" if flips[i, j] else "-", alpha=0.7)
    for x, order, ys, names, ha in ((0, left, ly, labels[0], "right"), (1, right, ry, labels[1], "left")):
        ax.scatter([x] * len(order), [ys(k) for k in range(len(order))], s=10, color="black", zorder=3)
        for k, n in enumerate(order.tolist()):
            ax.text(x - 0.03 if x == 0 else x + 0.03, ys(k), names[n], ha=ha, va="center", fontsize=6)
    ax.set(title=title, xlim=(-0.25, 1.25))
    ax.invert_yaxis()
    ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot(pairs: dict[str, list[dict]], path) -> None:
    """Per pair, a bipartite graph: ablated subcomponents left, the later layer's subcomponents with an
    edge right, each beside its strongest driver."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 8), squeeze=False)
    for ax, (title, results) in zip(axes[0], pairs.items()):
        # drivers grouped by the subcomponent they drive most (edges are sorted by |delta|), silent ones last
        left = [r["component"] for r in sorted(results, key=lambda r: r["edges"][0]["to"] if r["edges"] else "~")]
        ly = {n: i / max(len(left) - 1, 1) for i, n in enumerate(left)}
        strongest: dict[str, tuple[float, float]] = {}  # right node -> (|delta|, y of its strongest driver)
        for r in results:
            for e in r["edges"]:
                strongest[e["to"]] = max(strongest.get(e["to"], (0.0, 0.0)), (abs(e["delta_ci"]), ly[r["component"]]))
        right = sorted(strongest, key=lambda n: strongest[n][1])  # one-to-one drive shows as parallel lines
        ry = {n: i / max(len(right) - 1, 1) for i, n in enumerate(right)}
        for r in results:
            for e in r["edges"]:
                ax.plot([0, 1], [ly[r["component"]], ry[e["to"]]], color="tab:red" if e["delta_ci"] < 0 else "tab:blue",
                        lw=0.5 + 3 * abs(e["delta_ci"]), alpha=0.7)
        ax.scatter([0] * len(left), list(ly.values()), s=12, color="black", zorder=3)
        ax.scatter([1] * len(right), list(ry.values()), s=12, color="black", zorder=3)
        for x, ys, ha in ((-0.03, ly, "right"), (1.03, ry, "left")):
            if len(ys) <= 60:  # beyond that, subcomponent numbers overlap
                for n, y in ys.items():
                    ax.text(x, y, n.rsplit(":", 1)[1], ha=ha, va="center", fontsize=7)
        n_edges = sum(len(r["edges"]) for r in results)
        ax.set(title=f"{title}\n{len(left)} ablated, {n_edges} edges (red: CI drops)", xlim=(-0.3, 1.3))
        ax.invert_yaxis()
        ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = parser(__doc__.splitlines()[0], ["RUN_DIR"])
    ap.add_argument("--layers", nargs=2, metavar=("A", "B"),
                    help="ablate A's subcomponents, watch B's (default: see above)")
    ap.add_argument("--min-effect", type=float, default=0.1, help="keep an edge when |mean delta CI| >= this")
    args = ap.parse_args()
    cfg, exp = load_run(args.run_dir)
    model = exp.model
    x = torch.cat([exp.input_fn(exp.eval_batch(i)) for i in range(args.n_batches)])
    order = forward_order(model, x[:1])
    if args.layers:
        a, b = args.layers
        for n in (a, b):
            if n not in order:
                raise SPDError(f"--layers: '{n}' is not a decomposed module of {args.run_dir}; "
                               f"its modules, in forward order: {', '.join(order)}")
        if order.index(a) >= order.index(b):
            raise SPDError(f"--layers {a} {b}: {b} does not come after {a} in the forward pass; swap them")
        pairs = [(a, b)]
    else:
        pairs = default_pairs(order)
    out = out_dir(args.out, args.run_dir)
    results = {f"{a} -> {b}": ablate_pair(model, exp.output_fn, x, a, b, cfg.spd.ci_threshold, args.min_density,
                                          args.min_effect) for a, b in pairs}
    (out / "causal.json").write_text(json.dumps(
        {"run_dir": str(args.run_dir), "n_inputs": len(x), "ci_threshold": cfg.spd.ci_threshold,
         "min_density": args.min_density, "min_effect": args.min_effect, "pairs": results}, indent=1))
    plot(results, out / "causal.png")

    for title, res in results.items():
        n_edges = [len(r["edges"]) for r in res]
        print(f"{title}: {len(res)} alive subcomponents ablated, {sum(n_edges)} edges with |delta CI| >= "
              f"{args.min_effect} ({sum(n == 1 for n in n_edges)} ablations drive exactly one), mean output change "
              f"{sum(r['output_change'] for r in res) / max(len(res), 1):.3f}")
    print(out / "causal.json")


if __name__ == "__main__":
    run_main(main)
