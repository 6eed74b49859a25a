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

A digit classifier (mnist_decomposition.py, e.g. configs/digits.yaml) has no ground truth: each dictionary
run on one of its layers (configs/sae_digits.yaml: a transcoder on fc2) is set beside each SPD run of the
same target (configs/sae_digits_multi.yaml: a transcoder on fc2 reading the pixels too), on the held-out images:
  - <toy>_<module>_<activation>_<dictionary run>.png: mean activation per digit class of each alive SPD
    subcomponent of the layer (its CI) and of each live latent (its activation, over its largest class
    mean), side by side, and the matching below;
  - matching by effect: ablate one latent (its activation 0, the dictionary spliced in for the layer) or
    one subcomponent (its mask 0, the layer's other masks at their CI, the other layers the target's) and
    record the change of the 10 logits on every image; each latent's match is the subcomponent whose
    change has the largest cosine with its own, over all images x logits (same change on the same images).
    Counted: latents matched at cosine >= 0.5, 0.7 and --min-cosine, and the subcomponents some latent
    matched. Written to classifier.json and classifier.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.compare_models import match  # noqa: E402
from spd_common import ComponentModel, Experiment  # noqa: E402
from spd_config import SPDError, load_config  # noqa: E402
from spd_run import (RUN_RECORD, config_class, get_device, import_script, load_run, run_main, run_script,  # noqa: E402
                     target_digest)

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


# ------------------------------------------------------------------------------------------------
# Digit classifiers: SPD's subcomponents of a layer beside a dictionary's latents on it
# ------------------------------------------------------------------------------------------------
def effect_matches(latent_fx: Tensor, comp_fx: Tensor) -> dict[str, Tensor]:
    """Each latent's most alike subcomponent by effect. latent_fx (L, N, K), comp_fx (C, N, K): the change
    of the K outputs on N inputs when the latent / the subcomponent alone is ablated. Returns `cos`, the
    cosine over all N x K (L, C), and per latent its `best` subcomponent and that cosine, `best_cos` (L,)."""
    cos = F.normalize(latent_fx.flatten(1), dim=-1) @ F.normalize(comp_fx.flatten(1), dim=-1).T
    if cos.shape[1] == 0:  # no alive subcomponent: nothing to match
        return {"cos": cos, "best": torch.zeros(len(cos), dtype=torch.long), "best_cos": torch.full((len(cos),), -1.0)}
    best_cos, best = cos.max(1)
    return {"cos": cos, "best": best, "best_cos": best_cos}


def n_matched(m: dict[str, Tensor], min_cosine: float) -> tuple[int, int]:
    """(latents whose best cosine reaches min_cosine, subcomponents that are the best match of one of them)."""
    ok = m["best_cos"] >= min_cosine
    return int(ok.sum()), m["best"][ok].unique().numel()


@torch.no_grad()
def spd_ablation_effects(model: ComponentModel, name: str, x: Tensor, comps: Tensor, output_fn) -> Tensor:
    """(len(comps), N, K): the outputs with module `name` CI-masked (the other modules the target's), minus
    those with subcomponent c's mask 0 as well."""
    ci = model.ci_of(x)[name]
    with model.masked({name: ci}):
        base = output_fn(model(x))
    fx = []
    for c in comps.tolist():
        with model.masked({name: ci.index_fill(-1, torch.tensor([c], device=ci.device), 0.0)}):
            fx.append(base - output_fn(model(x)))
    return torch.stack(fx) if fx else base.new_zeros(0, *base.shape)


@torch.no_grad()
def dictionary_ablation_effects(exp: Experiment, cfg: Any, dic: Any, batch: Any, latents: Tensor) -> Tensor:
    """(len(latents), N, K): the outputs with the dictionary spliced in for its module (cfg: its
    DictionaryConfig), minus those with latent j's activation 0 as well."""
    from sae_baseline import module_io

    base = module_io(exp, cfg, batch, dic)[0]
    fx = []
    for j in latents.tolist():
        def without_j(a: Tensor, j: int = j) -> Tensor:
            z = dic.encode(a * dic.in_scale)[0]
            return dic.decode(z.index_fill(-1, torch.tensor([j], device=z.device), 0.0)) / dic.out_scale
        fx.append(base - module_io(exp, cfg, batch, without_j)[0])
    return torch.stack(fx) if fx else base.new_zeros(0, *base.shape)


def plot_classifier(spd_pc: Tensor, comps: Tensor, dict_pc: Tensor, latents: Tensor, m: dict, name: str,
                    min_cosine: float, path: Path) -> None:
    """Top: mean CI per digit (rows) of each alive subcomponent and mean activation per digit of each live
    latent (over its largest class mean), subcomponents sorted by the digit they serve most, latents by
    their best match's place among them (then by cosine), so that a latent stands below its match's column.
    Bottom: the effect cosines in those orders, and each latent's best."""
    c_order = spd_pc.argmax(0).argsort(stable=True)
    place = torch.empty_like(c_order)
    place[c_order] = torch.arange(len(c_order))
    l_order = (3.0 * place[m["best"]] - m["best_cos"]).argsort() if len(c_order) else torch.arange(len(latents))
    rel = dict_pc / dict_pc.abs().amax(0).clamp_min(1e-12)
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5), gridspec_kw={"height_ratios": [1, 1.4]})
    panels = ((axes[0, 0], spd_pc[:, c_order], [f"{c}" for c in comps[c_order].tolist()],
               f"SPD: {name} subcomponents ({len(comps)} alive)", "mean causal importance"),
              (axes[0, 1], rel[:, l_order], [f"{j}" for j in latents[l_order].tolist()],
               f"dictionary: {name} latents ({len(latents)} live)", "mean activation / largest class mean"))
    for ax, mat, labels, title, cbar in panels:
        im = ax.imshow(mat, vmin=min(0.0, float(mat.min())) if mat.numel() else 0, vmax=1, cmap="Blues",
                       aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, fontsize=6, rotation=90)
        ax.set_yticks(range(10))
        ax.set(title=title, ylabel="digit")
        fig.colorbar(im, ax=ax, label=cbar)
    im = axes[1, 0].imshow(m["cos"][l_order][:, c_order], vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto",
                           interpolation="nearest")
    axes[1, 0].set_xticks(range(len(comps)), [f"{c}" for c in comps[c_order].tolist()], fontsize=6, rotation=90)
    axes[1, 0].set_yticks(range(len(latents)), [f"{j}" for j in latents[l_order].tolist()], fontsize=6)
    axes[1, 0].set(xlabel="SPD subcomponent", ylabel="latent", title="cosine of the logit changes when ablated")
    fig.colorbar(im, ax=axes[1, 0])
    axes[1, 1].hist(m["best_cos"].numpy(), bins=20, range=(-1, 1))
    axes[1, 1].axvline(min_cosine, color="black", lw=0.8)
    n_lat, n_comp = n_matched(m, min_cosine)
    axes[1, 1].set(xlabel="each latent's best cosine with a subcomponent", ylabel="latents",
                   title=f"cosine >= {min_cosine}: {n_lat} of {len(latents)} latents matched, "
                         f"{n_comp} of {len(comps)} subcomponents")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def classifier_pair(spd_dir: Path, dict_dir: Path, min_cosine: float, out: Path) -> dict:
    """An SPD run and a dictionary run on a layer of the same digit classifier, on the held-out images:
    per-class activations (figure) and the effect matching."""
    from sae_baseline import load_sae_run, module_io
    from train_targets.train_mnist import load_images

    mnist = import_script(run_script(spd_dir))
    cfg, exp = load_run(spd_dir)
    dcfg, dexp, dic = load_sae_run(dict_dir)
    name, model = dcfg.dictionary.module, exp.model
    if name not in model.names:
        raise SPDError(f"{dict_dir} reads {name}, which {spd_dir} did not decompose ({', '.join(model.names)})")
    if target_digest(model) != target_digest(dexp.model):
        raise SPDError(f"{spd_dir} and {dict_dir} were trained on different targets")
    data, device = load_images(cfg.target), get_device(cfg.spd.device)
    x, y = data.x_test.to(device), data.y_test.to(device)
    ci = model.per_input(model.ci_of(x))[name]
    comps = mnist.alive(ci, cfg.spd.ci_threshold)
    _, a, _ = module_io(dexp, dcfg.dictionary, x)
    z, terms = dic.encode(a * dic.in_scale)
    latents = dic.active(z, terms).any(0).nonzero().flatten()
    spd_pc, dict_pc = mnist.mean_ci_per_class(ci[:, comps], y).cpu(), mnist.mean_ci_per_class(z[:, latents], y).cpu()
    m = effect_matches(dictionary_ablation_effects(dexp, dcfg.dictionary, dic, x, latents).cpu(),
                       spd_ablation_effects(model, name, x, comps, exp.output_fn).cpu())
    toy = toy_of(cfg.target.path)
    path = out / f"{toy}_{name}_{dcfg.dictionary.activation}_{dict_dir.name}.png"
    plot_classifier(spd_pc, comps.cpu(), dict_pc, latents.cpu(), m, name, min_cosine, path)
    res, dres = (json.loads((d / "results.json").read_text()) for d in (spd_dir, dict_dir))
    spliced = module_io(dexp, dcfg.dictionary, x, dic)[0]
    closest = {f"{name}:{c}": [int(latents[m["cos"][:, k].argmax()]), round(m["cos"][:, k].max().item(), 3)]
               for k, c in enumerate(comps.tolist())} if len(latents) else {}
    return {"spd_run": str(spd_dir), "dict_run": str(dict_dir), "toy": toy, "module": name,
            "activation": dcfg.dictionary.activation, "mode": dcfg.dictionary.mode, "figure": str(path),
            "inputs": dcfg.dictionary.inputs,
            "spd_alive": len(comps), "C": model.C[name], "live_latents": len(latents),
            "n_latents": dcfg.dictionary.n_latents, "l0_spd": res[f"l0/{name}"], "l0_dict": dres["l0"],
            "acc_target": res["acc_target"], "acc_ci_masked": res["acc_ci_masked"],
            "acc_spliced": (spliced.argmax(-1) == y).float().mean().item(),
            "matched": {str(t): n_matched(m, t) for t in sorted({0.5, 0.7, min_cosine})},
            "matches": {str(j): [f"{name}:{comps[c]}", round(float(v), 3)]
                        for j, c, v in zip(latents.tolist(), m["best"].tolist(), m["best_cos"].tolist())},
            "closest_latent_per_subcomponent": closest,
            "wall_s": {"spd": res["wall_s"], "dict": dres["wall_s"]}}


def toys_in(rows: list[dict]) -> list[str]:
    """The targets of rows: the known toys in TOYS's order, then the others by name."""
    return [t for t in TOYS if any(r["toy"] == t for r in rows)] + sorted({r["toy"] for r in rows} - set(TOYS))


def table(rows: list[dict]) -> str:
    """Markdown: a row per target, a column per method; per cell the run with the most features
    recovered, then the lowest output MSE."""
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    toys = toys_in(rows)
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
    toys = toys_in(rows)
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


def classifier_target(run: Path, is_sae: bool) -> str | None:
    """The target path of a run on a digit classifier (mnist_decomposition.py's), else None."""
    if is_sae:
        from sae_baseline import SAEConfig, experiment_config

        module, exp_cfg = experiment_config(load_config(SAEConfig, run / "config.yaml"))
        script = Path(module.__file__)
    else:
        script = run_script(run)
        exp_cfg = load_config(config_class(import_script(script)), run / "config.yaml")
    return exp_cfg.target.path if script.name == "mnist_decomposition.py" else None


def classifier_table(pairs: list[dict]) -> str:
    """Markdown: a row per (SPD run, dictionary run) pair of a digit classifier."""
    ts = list(pairs[0]["matched"])
    lines = ["| target | module | SPD: alive / C, L0, CI-masked accuracy | dictionary: live / latents, L0, "
             f"spliced accuracy | latents matched (cos >= {' / '.join(ts)}) | SPD subcomponents matched |",
             "|---|---|---|---|---|---|"]
    for r in pairs:
        lines.append(f"| {r['toy']} | {r['module']} | {r['spd_alive']}/{r['C']}, {r['l0_spd']:.2f}, "
                     f"{r['acc_ci_masked']:.3f} (target {r['acc_target']:.3f}) | {r['mode']} {r['activation']}"
                     f"{' reading ' + ' + '.join(r['inputs']) if r['inputs'] else ''}: "
                     f"{r['live_latents']}/{r['n_latents']}, {r['l0_dict']:.2f}, {r['acc_spliced']:.3f} | "
                     + " / ".join(str(r["matched"][t][0]) for t in ts) + f" of {r['live_latents']} | "
                     + " / ".join(str(r["matched"][t][1]) for t in ts) + f" of {r['spd_alive']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run dirs of SPD scripts and of sae_baseline.py")
    ap.add_argument("--min-cosine", type=float, default=0.9,
                    help="a feature is recovered (a classifier's latent matched) at this cosine or more")
    ap.add_argument("--out", default="analysis/methods", help="output dir")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, classifier_runs = [], {True: [], False: []}  # is_sae -> [(run, target path)]
    for run in map(Path, args.runs):
        if not (run / "results.json").is_file():
            raise SPDError(f"{run} has no results.json; pass the run dirs of finished runs")
        is_sae = json.loads((run / RUN_RECORD).read_text())["script"].endswith("sae_baseline.py")
        target = classifier_target(run, is_sae)
        if target is not None:
            classifier_runs[is_sae].append((run, target))
            continue
        rows.append((sae_row if is_sae else spd_row)(run, args.min_cosine))
        print(f"{rows[-1]['toy']:>10} {rows[-1]['method']:>10}: {rows[-1]['recovered']}/{rows[-1]['n_features']} "
              f"recovered, {rows[-1]['dead']} dead, MSE {rows[-1]['output_mse_over_var']:.3g}, L0 {rows[-1]['l0']:.2f}")
    if rows:
        (out / "methods.json").write_text(json.dumps(rows, indent=2))
        md = table(rows)
        (out / "methods.md").write_text(md + "\n")
        plot(rows, out / "l0_vs_mse.png")
        print(md)
        print(out / "methods.md")
    pairs = [classifier_pair(spd, dic, args.min_cosine, out) for spd, t in classifier_runs[False]
             for dic, u in classifier_runs[True] if t == u]
    if any(classifier_runs.values()) and not pairs:
        raise SPDError("a digit classifier's runs are compared in pairs: pass an SPD run and a dictionary run "
                       "of the same target")
    if pairs:
        (out / "classifier.json").write_text(json.dumps(pairs, indent=2))
        md = classifier_table(pairs)
        (out / "classifier.md").write_text(md + "\n")
        print(md)
        print("\n".join(r["figure"] for r in pairs))
        print(out / "classifier.md")


if __name__ == "__main__":
    run_main(main)
