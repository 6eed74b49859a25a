"""Match the subcomponents of two decompositions of the same target: did two seeds find the same ones?

    python analysis/compare_models.py RUN_A RUN_B [--min-cosine 0.9] [--n-batches 4] [--out DIR]

Per decomposed module, among the alive subcomponents of each run (CI > spd.ci_threshold on at least
--min-density of the inputs):
  - weight cosine: cosine similarity of the rank-one matrices U[:, a] V[a] and U'[:, b] V'[b] (flattened),
    which factorises as cos(U_a, U'_b) cos(V_a, V'_b), so a sign flip of both factors is the same matrix;
  - CI correlation: Pearson correlation of the two subcomponents' CI over the same inputs (run A's
    held-out batches, through both decompositions);
  - Hungarian matching (scipy's linear_sum_assignment) maximising the total weight cosine; a matched pair
    counts as a match if its cosine >= --min-cosine. Match rate = matches / max(alive in A, alive in B),
    so a subcomponent that one run has and the other lacks counts against it.

Writes compare.json (per module: alive counts, matched pairs with cosine and CI correlation, match rate)
and compare.png (per module: the cosine and CI-correlation matrices, rows and columns in matched order)
to --out (default RUN_A/analysis).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.common import alive, collect_ci, out_dir, parser  # noqa: E402 (needs ROOT on the path)
from spd_config import SPDError  # noqa: E402
from spd_run import load_run, run_main, target_digest  # noqa: E402


def rank_one_cosines(U_a: Tensor, V_a: Tensor, U_b: Tensor, V_b: Tensor) -> Tensor:
    """(Ka, Kb) cosine of the flattened rank-one matrices U_a[:, i] V_a[i] and U_b[:, j] V_b[j].
    U (d_out, K), V (K, d_in): <u v^T, u' v'^T>_F = (u.u')(v.v'), and the norms factorise the same way."""
    cu = F.normalize(U_a, dim=0).T @ F.normalize(U_b, dim=0)
    cv = F.normalize(V_a, dim=1) @ F.normalize(V_b, dim=1).T
    return cu * cv


def correlations(x: Tensor, y: Tensor) -> Tensor:
    """(Ka, Kb) Pearson correlation of the columns of x (N, Ka) and y (N, Kb); 0 for a constant column."""
    x, y = x - x.mean(0), y - y.mean(0)
    return F.normalize(x, dim=0).T @ F.normalize(y, dim=0)


def match(cos: Tensor, min_cosine: float) -> list[tuple[int, int, float]]:
    """Hungarian matching of rows to columns maximising the total cosine; the pairs (i, j, cos) with
    cos >= min_cosine."""
    rows, cols = linear_sum_assignment(-cos.numpy())
    return [(int(i), int(j), float(cos[i, j])) for i, j in zip(rows, cols) if cos[i, j] >= min_cosine]


def plot(panels: list[tuple[str, Tensor, Tensor, Tensor, Tensor, list[tuple[int, int, float]]]], path) -> None:
    """One row per module (name, alive indices of A and B, cosine, CI correlation, matches): weight cosine
    and CI correlation, matched pairs first, on the diagonal."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 4.2 * len(panels)), squeeze=False)
    for (name, a, b, cos, corr, pairs), row in zip(panels, axes):
        rows = [i for i, _, _ in pairs] + [i for i in range(cos.shape[0]) if i not in {p[0] for p in pairs}]
        cols = [j for _, j, _ in pairs] + [j for j in range(cos.shape[1]) if j not in {p[1] for p in pairs}]
        for ax, mat, what in zip(row, (cos, corr), ("weight cosine", "CI correlation")):
            im = ax.imshow(mat[np.ix_(rows, cols)], vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
            ax.set(title=f"{name}: {what} ({len(pairs)} matches)", xlabel="run B subcomponent",
                   ylabel="run A subcomponent")
            if len(rows) <= 40 and len(cols) <= 40:
                ax.set_xticks(range(len(cols)), [str(int(b[j])) for j in cols], fontsize=7)
                ax.set_yticks(range(len(rows)), [str(int(a[i])) for i in rows], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = parser(__doc__.splitlines()[0], ["RUN_A", "RUN_B"])
    ap.add_argument("--min-cosine", type=float, default=0.9,
                    help="a matched pair counts as a match at this weight cosine")
    args = ap.parse_args()
    cfg_a, exp_a = load_run(args.run_a)
    cfg_b, exp_b = load_run(args.run_b)
    if exp_a.model.names != exp_b.model.names:
        raise SPDError(f"{args.run_a} and {args.run_b} decompose different modules ({exp_a.model.names} vs "
                       f"{exp_b.model.names}); compare two decompositions of the same target and modules")
    if target_digest(exp_a.model) != target_digest(exp_b.model):
        raise SPDError(f"{args.run_a} and {args.run_b} decompose different targets (their weights differ); "
                       f"compare two decompositions of the same target")
    out = out_dir(args.out, args.run_a)
    ci_a = collect_ci(exp_a, args.n_batches)
    ci_b = collect_ci(exp_a, args.n_batches, model=exp_b.model)  # the same inputs through run B
    live_a = alive(ci_a, cfg_a.spd.ci_threshold, args.min_density)
    live_b = alive(ci_b, cfg_b.spd.ci_threshold, args.min_density)

    modules, panels = {}, []
    for name in exp_a.model.names:
        a, b = live_a[name], live_b[name]
        U_a, V_a = exp_a.model.factors(name)
        U_b, V_b = exp_b.model.factors(name)
        with torch.no_grad():
            cos = rank_one_cosines(U_a[:, a], V_a[a], U_b[:, b], V_b[b]).cpu()
        corr = correlations(ci_a[name][:, a], ci_b[name][:, b])
        pairs = match(cos, args.min_cosine) if len(a) and len(b) else []
        n = max(len(a), len(b))
        mean_corr = float(np.mean([corr[i, j] for i, j, _ in pairs])) if pairs else None
        modules[name] = {"n_alive_a": len(a), "n_alive_b": len(b), "n_matched": len(pairs),
                         "match_rate": len(pairs) / n if n else None, "mean_ci_corr_of_matches": mean_corr,
                         "matches": [{"a": int(a[i]), "b": int(b[j]), "cosine": round(c, 4),
                                      "ci_corr": round(float(corr[i, j]), 4)} for i, j, c in pairs]}
        panels.append((name, a, b, cos, corr, pairs))
    n_alive = sum(max(m["n_alive_a"], m["n_alive_b"]) for m in modules.values())
    overall = sum(m["n_matched"] for m in modules.values()) / n_alive if n_alive else None
    (out / "compare.json").write_text(json.dumps(
        {"run_a": str(args.run_a), "run_b": str(args.run_b), "n_inputs": len(next(iter(ci_a.values()))),
         "min_cosine": args.min_cosine, "min_density": args.min_density, "match_rate": overall,
         "modules": modules}, indent=1))
    plot(panels, out / "compare.png")

    for name, m in modules.items():
        corr = m["mean_ci_corr_of_matches"]
        print(f"{name}: {m['n_matched']} of {m['n_alive_a']} / {m['n_alive_b']} alive matched at cosine >= "
              f"{args.min_cosine} (rate {m['match_rate'] or 0:.2f})"
              + (f", mean CI correlation of the matches {corr:.3f}" if corr is not None else ""))
    print(f"overall match rate {overall or 0:.3f}")
    print(out / "compare.json")


if __name__ == "__main__":
    run_main(main)
