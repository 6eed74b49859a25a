"""SPD and sparse dictionaries at several sparsities and seeds on one toy: the L0-vs-MSE frontier.

    python analysis/method_sweep.py SWEEP.yaml [key.sub=value ...] [--out DIR] [--min-cosine 0.9] [--finished]

SWEEP.yaml is a sweep in slurm/sweep.py's format (e.g. configs/sweep_methods_tms_5-2.yaml): a section
for the SPD config (its sparsity: spd.importance_minimality_coeff, beta3), a section for the dictionary
config (`script: sae_baseline.py`, one grid per activation: dictionary.l1_coeff or dictionary.k), and a
global seed axis. Overrides on the command line are appended to every run.
  1. Each run I goes to DIR/I-<config name> (DIR defaults to runs/method_sweeps/<sweep name>) through
     slurm/launch.py: a finished run (results.json) is reused, an interrupted one continued, so rerunning
     resumes. The runs of `sbatch slurm/sweep.sh SWEEP.yaml --out DIR` are read the same way; with
     --finished nothing starts, and the frontier is that of the runs finished so far.
  2. Each run is measured as analysis/compare_methods.py does (features recovered, output MSE / target
     variance, L0); its method is SPD or the dictionary's activation, its setting its overrides but the
     seed and the activation, its seed its config's spd.seed.
  3. A run is on its method's frontier if no other run of that method has L0 and MSE both at most its own
     (one of them less). Written to DIR/frontier/: frontier.json (every run), frontier.md (per method and
     setting, mean ± std over seeds; then every run) and frontier.png (per toy: MSE against L0, log
     scales, one colour per method, a point per run, SPD as stars, each method's frontier as a line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "slurm")]
from analysis.compare_methods import METHOD_ORDER, sae_row, spd_row, toys_in  # noqa: E402
from launch import launch  # noqa: E402
from spd_config import SPDError  # noqa: E402
from spd_run import run_main  # noqa: E402
from sweep import Run, load_sweep  # noqa: E402

SEED_KEY, ACTIVATION_KEY = "spd.seed", "dictionary.activation"


def setting(overrides: list[str], extra: list[str] = ()) -> str:
    """A run's overrides but the seed, the activation and the `extra` ones every run has."""
    drop = {SEED_KEY, ACTIVATION_KEY, *(o.split("=", 1)[0] for o in extra)}
    return " ".join(o for o in overrides if o.split("=", 1)[0] not in drop) or "default"


def on_frontier(points: list[tuple[float, float]]) -> list[bool]:
    """Per (L0, MSE) point: no other point has both at most its own, one of them less."""
    return [not any(a <= l0 and b <= mse and (a, b) != (l0, mse) for a, b in points) for l0, mse in points]


def mark_frontiers(rows: list[dict]) -> None:
    """Set each row's `frontier`: on the frontier of its toy and method's runs."""
    for key in {(r["toy"], r["method"]) for r in rows}:
        group = [r for r in rows if (r["toy"], r["method"]) == key]
        for r, f in zip(group, on_frontier([(r["l0"], r["output_mse_over_var"]) for r in group])):
            r["frontier"] = f


def groups(rows: list[dict]) -> list[tuple[str, str, str, list[dict]]]:
    """(toy, method, setting, its runs by seed) in toy order, METHOD_ORDER, then the method's settings'
    order in rows."""
    out = []
    for toy in toys_in(rows):
        for m in METHOD_ORDER:
            runs = [r for r in rows if (r["toy"], r["method"]) == (toy, m)]
            for s in dict.fromkeys(r["setting"] for r in runs):
                out.append((toy, m, s, sorted((r for r in runs if r["setting"] == s), key=lambda r: r["seed"])))
    return out


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3g} ± {statistics.stdev(xs):.2g}" if len(xs) > 1 else f"{xs[0]:.3g}"


def frontier_table(rows: list[dict]) -> str:
    """Markdown: per toy, method and setting, mean ± std over seeds; then every run."""
    lines = ["| target | method | setting | seeds | L0 | output MSE / var | features recovered | on frontier |",
             "|---|---|---|---|---|---|---|---|"]
    for toy, m, s, runs in groups(rows):
        rec = [r["recovered"] for r in runs]
        lines.append(f"| {toy} | {m} | {s} | {len(runs)} | {mean_std([r['l0'] for r in runs])} | "
                     f"{mean_std([r['output_mse_over_var'] for r in runs])} | "
                     f"{statistics.mean(rec):.3g} (min {min(rec)}) / {runs[0]['n_features']} | "
                     f"{sum(r['frontier'] for r in runs)} of {len(runs)} |")
    lines += ["", "| target | method | setting | seed | L0 | output MSE / var | features recovered | dead | frontier |",
              "|---|---|---|---|---|---|---|---|---|"]
    for toy, m, s, runs in groups(rows):
        lines += [f"| {toy} | {m} | {s} | {r['seed']} | {r['l0']:.3g} | {r['output_mse_over_var']:.3g} | "
                  f"{r['recovered']}/{r['n_features']} | {r['dead']}/{r['latents']} | {'yes' if r['frontier'] else ''} |"
                  for r in runs]
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Per toy: output MSE / target variance against L0, a point per run, each method's frontier a line."""
    toys = toys_in(rows)
    fig, axes = plt.subplots(1, len(toys), figsize=(6 * len(toys), 4.5), squeeze=False)
    for ax, toy in zip(axes[0], toys):
        for i, m in enumerate(METHOD_ORDER):
            runs = [r for r in rows if r["toy"] == toy and r["method"] == m]
            if not runs:
                continue
            color, marker = ("black", "*") if m == "SPD" else (f"C{i}", "o")
            ax.scatter([r["l0"] for r in runs], [r["output_mse_over_var"] for r in runs], color=color, marker=marker,
                       s=90 if m == "SPD" else 25, alpha=0.7, label=m)
            front = sorted((r["l0"], r["output_mse_over_var"]) for r in runs if r["frontier"])
            ax.plot(*zip(*front), color=color, lw=1)
        l0s = [r["l0"] for r in rows if r["toy"] == toy]
        positive = min(l0s) > 0
        ax.set(xlabel="L0 (active latents / subcomponents per input)", ylabel="output MSE / target output variance",
               xscale="log" if positive else "linear", yscale="log", title=f"{toy}: a point per run (seed)")
        if positive:  # plain numbers, at 1, 2 and 5 per decade where at most two decades leave room for them
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            if max(l0s) / min(l0s) <= 100:
                ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5)))
                ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
            else:
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def index_ranges(indices: list[int]) -> str:
    """Sorted run indices as ranges: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def run_all(runs: list[Run], out: Path, sweep: str, finished_only: bool = False) -> list[tuple[Run, Path]]:
    """Start, continue or reuse each run in out/I-<config name>; (run, its dir) for each. `finished_only`:
    start nothing, (run, dir) for the runs that have finished (results.json), and say how many have not."""
    done, failed, unfinished = [], [], []
    for i, r in enumerate(runs):
        run_dir = out / r.name(i)
        record = run_dir / "launch.json"
        if record.is_file() and (old := json.loads(record.read_text()))["overrides"] != r.overrides:
            raise SPDError(f"{run_dir} was run with {' '.join(old['overrides'])}, not {' '.join(r.overrides)}: "
                           "the sweep changed; pass another --out")
        if finished_only:
            if (run_dir / "results.json").is_file():
                done.append((r, run_dir))
            else:
                unfinished.append(i)
            continue
        rc = launch(r.script, r.config, r.overrides, run_dir, {"sweep": sweep, "index": i})
        if rc == 0:
            done.append((r, run_dir))
        else:
            failed.append(f"{i} (exit code {rc})")
    if failed:
        raise SPDError(f"{len(failed)} of {len(runs)} runs failed: {', '.join(failed)}; their output is above; "
                       "rerun to continue")
    if unfinished:
        print(f"--finished: {len(unfinished)} of {len(runs)} runs not finished, left out: {index_ranges(unfinished)}")
    if finished_only and not done:
        raise SPDError(f"no run of {sweep} has finished in {out}: run the sweep first (without --finished)")
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep YAML, e.g. configs/sweep_methods_tms_5-2.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides appended to every run")
    ap.add_argument("--out", help="sweep dir (default runs/method_sweeps/<sweep name>)")
    ap.add_argument("--min-cosine", type=float, default=0.9, help="a feature is recovered at this cosine or more")
    ap.add_argument("--finished", action="store_true",
                    help="start nothing: the frontier of the runs finished so far (an array job under way)")
    args = ap.parse_intermixed_args()
    sweep = Path(args.sweep)
    out = Path(args.out or Path("runs/method_sweeps") / sweep.stem)
    rows = []
    for r, run_dir in run_all(load_sweep(sweep, args.overrides), out, args.sweep, args.finished):
        row = (sae_row if r.script == "sae_baseline.py" else spd_row)(run_dir, args.min_cosine)
        row["setting"] = setting(r.overrides, args.overrides)
        row["seed"] = yaml.safe_load((run_dir / "config.yaml").read_text())["spd"]["seed"]
        rows.append(row)
    mark_frontiers(rows)
    figs = out / "frontier"
    figs.mkdir(parents=True, exist_ok=True)
    (figs / "frontier.json").write_text(json.dumps(rows, indent=2))
    md = frontier_table(rows)
    (figs / "frontier.md").write_text(md + "\n")
    plot_frontier(rows, figs / "frontier.png")
    print(md)
    print(figs / "frontier.md", figs / "frontier.png")


if __name__ == "__main__":
    run_main(main)
