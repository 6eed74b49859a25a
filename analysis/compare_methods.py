"""SPD against sparse dictionaries on targets whose features we know: one table and one figure.

    python analysis/compare_methods.py RUN [RUN ...] [--min-cosine 0.9] [--out DIR]

RUN is a run dir of an SPD script (tms_decomposition.py, resid_mlp_decomposition.py) or of
sae_baseline.py on the same targets. Per run:
  - features recovered out of n: one-to-one (Hungarian) matches at cosine >= --min-cosine between a
    true feature and an alive latent / subcomponent. TMS: a latent's decoder row, or a subcomponent's
    column U_c V[c, j], against column j of W. Residual MLP: a transcoder latent's decoder row against
    the MLP's response to the feature alone, MLP(W_E[i]) - MLP(0); SPD: its own monosemanticity
    criterion (resid_mlp_decomposition.py: x_i = 0.75 gives CI >= 0.5 to exactly one W_in
    subcomponent, used by no other feature), since a subcomponent has no decoder row there.
  - duplicates: alive latents at cosine >= --min-cosine with a feature that another one matched;
  - dead: latents that never fire on the held-out batches (SPD: subcomponents never active, which
    SPD shrinks away by design: reported, not a fault);
  - output MSE / target output variance, with the dictionary spliced in for its module or with SPD's
    CI masks; L0 = active latents per input (SPD: active subcomponents summed over the modules that
    the dictionary stands in for: linear1, or mlp_in + mlp_out).
Writes methods.json (every run), methods.md (the table: per target and method, the run with the most
features recovered, then the lowest output MSE) and l0_vs_mse.png (per target: output MSE against L0,
one line per method) to --out (default: analysis/methods).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.compare_models import match  # noqa: E402 (needs ROOT on the path)
from spd_common import ComponentModel, Experiment  # noqa: E402
from spd_config import SPDError  # noqa: E402
from spd_run import RUN_RECORD, import_script, load_run, run_main, run_script  # noqa: E402

METHOD_ORDER = ["SPD", "relu", "topk", "batchtopk", "jumprelu", "abstopk", "stochastic"]
TOYS = ["tms_5-2", "tms_40-10", "resid_mlp1"]


def recovered(cos: Tensor, min_cosine: float) -> tuple[int, int]:
    """(features recovered, duplicate latents) from cos (latents, features): Hungarian matches at
    >= min_cosine, and the unmatched latents that reach min_cosine with some feature anyway."""
    if cos.numel() == 0:
        return 0, 0
    pairs = match(cos, min_cosine)
    matched = {i for i, _, _ in pairs}
    near = (cos >= min_cosine).any(1).nonzero().flatten().tolist()
    return len(pairs), sum(i not in matched for i in near)


@torch.no_grad()
def true_directions(exp: Experiment, toy: str) -> Tensor:
    """(n_features, d) what each true feature writes where the dictionary reads or writes: TMS, the
    columns of W; the residual MLP, the MLP's response to the feature alone (one unit in the stream)."""
    target = exp.model.target
    if toy.startswith("tms"):
        return exp.model.decomposed["linear1"].target_weight().T
    mlp = target.layers[0]
    return mlp(target.W_E) - mlp(torch.zeros_like(target.W_E[:1]))


@torch.no_grad()
def spd_output_mse(model: ComponentModel, exp: Experiment, n_batches: int) -> float:
    """Output MSE of the CI-masked model over the target output's variance, on held-out batches."""
    err = var = 0.0
    for i in range(n_batches):
        x = exp.input_fn(exp.eval_batch(i))
        out, inputs = model.run_target(x)
        with model.masked(model.causal_importances(inputs)[0]):
            err += (exp.output_fn(model(x)) - exp.output_fn(out)).pow(2).mean().item()
        var += exp.output_fn(out).var().item()
    return err / var


def toy_of(target_path: str) -> str:
    return Path(target_path).stem


@torch.no_grad()
def spd_row(run_dir: Path, min_cosine: float) -> dict:
    cfg, exp = load_run(run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    model, toy = exp.model, toy_of(cfg.target.path)
    if toy.startswith("tms"):
        names = ["linear1"]
        tms = import_script(run_script(run_dir))
        U, V = model.decomposed["linear1"].components.factors()
        keep = tms.subcomponent_norms(U, V) > cfg.norm_threshold
        n_rec, dup = recovered(tms.column_cosines(true_directions(exp, toy).T, U, V)[keep].cpu(), min_cosine)
    else:
        names = [n for n in model.names if n.endswith(("mlp_in", "mlp_out"))]
        n_rec, dup = res["n_monosemantic_features"], None
    return {"run": str(run_dir), "toy": toy, "method": "SPD", "n_features": cfg.target.n_features,
            "recovered": n_rec, "duplicates": dup, "latents": sum(model.C[n] for n in names),
            "dead": sum(model.C[n] - res[f"n_alive/{n}"] for n in names),
            "output_mse_over_var": spd_output_mse(model, exp, 4), "l0": sum(res[f"l0/{n}"] for n in names),
            "wall_s": res["wall_s"], "steps": res["steps"]}


@torch.no_grad()
def sae_row(run_dir: Path, min_cosine: float) -> dict:
    from sae_baseline import experiment_config, load_sae_run

    cfg, exp, dic = load_sae_run(run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    toy = toy_of(experiment_config(cfg)[1].target.path)
    alive = torch.tensor(res["density"]) > 0
    rows = F.normalize(dic.W_dec[alive.to(dic.W_dec.device)], dim=-1)
    cos = rows @ F.normalize(true_directions(exp, toy), dim=-1).T
    if cfg.dictionary.activation == "abstopk":  # signed latents: a row along -feature serves it too
        cos = cos.abs()
    n_rec, dup = recovered(cos.cpu(), min_cosine)
    return {"run": str(run_dir), "toy": toy, "method": cfg.dictionary.activation, "mode": cfg.dictionary.mode,
            "n_features": len(true_directions(exp, toy)), "recovered": n_rec, "duplicates": dup,
            "latents": cfg.dictionary.n_latents, "dead": res["n_dead"],
            "output_mse_over_var": res["spliced_mse_over_target_var"], "l0": res["l0"], "fvu": res["fvu"],
            "wall_s": res["wall_s"], "steps": res["steps"]}


def table(rows: list[dict]) -> str:
    """Markdown: a row per target, a column per method; per cell the run with the most features
    recovered, then the lowest output MSE."""
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    toys = [t for t in TOYS if any(r["toy"] == t for r in rows)] + sorted({r["toy"] for r in rows} - set(TOYS))
    lines = ["| target | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for toy in toys:
        cells = []
        for m in methods:
            runs = [r for r in rows if r["toy"] == toy and r["method"] == m]
            if not runs:
                cells.append("-")
                continue
            r = max(runs, key=lambda r: (r["recovered"], -r["output_mse_over_var"]))
            cells.append(f"{r['recovered']}/{r['n_features']}, {r['dead']}/{r['latents']} dead, "
                         f"MSE {r['output_mse_over_var']:.3g}, L0 {r['l0']:.2f}")
        lines.append(f"| {toy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per target: output MSE / target variance against L0, one line per method (points sorted by L0)."""
    toys = [t for t in TOYS if any(r["toy"] == t for r in rows)] + sorted({r["toy"] for r in rows} - set(TOYS))
    fig, axes = plt.subplots(1, len(toys), figsize=(5 * len(toys), 4), squeeze=False)
    for ax, toy in zip(axes[0], toys):
        for m in METHOD_ORDER:
            pts = sorted((r["l0"], r["output_mse_over_var"]) for r in rows if r["toy"] == toy and r["method"] == m)
            if pts:
                ax.plot(*zip(*pts), marker="*" if m == "SPD" else "o", ms=12 if m == "SPD" else 5, label=m,
                        color="black" if m == "SPD" else None)
        ax.set(xlabel="L0 (active latents / subcomponents per input)", ylabel="output MSE / target output variance",
               yscale="log", title=toy)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run dirs of SPD scripts and of sae_baseline.py")
    ap.add_argument("--min-cosine", type=float, default=0.9, help="a feature is recovered at this cosine or more")
    ap.add_argument("--out", default="analysis/methods", help="output dir")
    args = ap.parse_args()
    rows = []
    for run in map(Path, args.runs):
        if not (run / "results.json").is_file():
            raise SPDError(f"{run} has no results.json; pass the run dirs of finished runs")
        is_sae = json.loads((run / RUN_RECORD).read_text())["script"].endswith("sae_baseline.py")
        rows.append((sae_row if is_sae else spd_row)(run, args.min_cosine))
        print(f"{rows[-1]['toy']:>10} {rows[-1]['method']:>10}: {rows[-1]['recovered']}/{rows[-1]['n_features']} "
              f"recovered, {rows[-1]['dead']} dead, MSE {rows[-1]['output_mse_over_var']:.3g}, L0 {rows[-1]['l0']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(rows, indent=2))
    md = table(rows)
    (out / "methods.md").write_text(md + "\n")
    plot(rows, out / "l0_vs_mse.png")
    print(md)
    print(out / "methods.md")


if __name__ == "__main__":
    run_main(main)
