"""Ground truth on sizes and seeds nobody tuned for: one table of pass/fail per cell (issue 41).

    python benchmarks/robustness.py [--only tms|resid] [--seeds S ...] [--jobs N] [--cells PATTERN]
                                    [--out DIR] [--table] [key.sub=value ...]

The cells: TMS (n_features, n_hidden) = (5, 2), (10, 3), (20, 5), (40, 10), (100, 20), each with and without
the identity layer, from configs/tms.yaml, where tms_decomposition.size_rule decides C, batch, steps, beta3,
p and lr; and resid_mlp1, resid_mlp2 from their own configs. Seed s of a cell is both its target's seed and
its SPD seed (target.seed = spd.seed = s, each target trained into DIR/targets): seeds 0-4 for TMS, 0-2 for
the residual MLPs (--seeds replaces both). Nothing else is set per cell; key.sub=value overrides go to every
cell (e.g. spd.steps=100 for a quick look), and the TMS cells keep targets with a dead feature
(target.min_column_norm=0) so that the table can say so instead of losing the cell.

Each cell is one run of its experiment script into DIR/cells/<cell> (output appended to DIR/cells/<cell>.log),
cheapest first (steps x batch x C x the decomposed matrices' width). Rerunning continues: a cell with
results.json is not run again, one with a checkpoint continues with --resume, one without starts over.
Invocations side by side (and --jobs N) never run a cell twice: its runner holds an flock on
DIR/cells/<cell>.lock, shared with the run itself, which the OS releases when both have exited.

A cell passes when
  TMS:   MMCS >= 0.999 and |ML2R - 1| <= 0.02 (the non-negligible-only pair: a dead subcomponent along a
         column would read as ML2R ~0, docs/results.md), exactly n_features non-negligible subcomponents in W,
         and exactly n_hidden in the identity layer if there is one;
  resid: >= 98% of the features monosemantic per layer, every W_out's summed rank = d_mlp, and CI-masked
         MSE <= 0.01 of the output variance.
A TMS failure names what went wrong: split features (a column of W carried by two or more subcomponents),
shared subcomponents (one carrying two or more columns). A TMS target with a column of W shorter than
train_tms's min_column_norm (0.5) has a dead feature: the cell reads "target-dead", not an SPD failure, and is
left out of the pass fraction. After every cell DIR/robustness.md and DIR/robustness.json are rewritten
(--table: only that, running nothing); the last line printed is the json's path.
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slurm"))
from launch import run_args  # noqa: E402 (launch puts ROOT on sys.path for spd_run)
from spd_config import SPDError, load_config  # noqa: E402
from spd_run import config_class, import_script, run_main  # noqa: E402
from train_targets.train_tms import TMSTargetConfig  # noqa: E402

TMS_SIZES = [(5, 2), (10, 3), (20, 5), (40, 10), (100, 20)]
DEAD_NORM = TMSTargetConfig().min_column_norm  # a column of W shorter than this: a feature the target left dead


@dataclass
class Cell:
    name: str
    kind: str  # "tms" or "resid"
    script: str
    config: str
    overrides: list[str]


def grid(only: str | None, seeds: list[int] | None, out: Path) -> list[Cell]:
    """Every cell of the grid, in a fixed order (not yet by cost)."""
    cells = []
    if only in (None, "tms"):
        for (n, m), identity, s in ((size, i, s) for size in TMS_SIZES for i in (0, 1) for s in seeds or range(5)):
            name = f"tms_{n}-{m}{'-id' if identity else ''}_s{s}"
            cells.append(Cell(name, "tms", "tms_decomposition.py", "configs/tms.yaml", [
                f"target.n_features={n}", f"target.n_hidden={m}", f"target.n_hidden_layers={identity}",
                f"target.seed={s}", f"spd.seed={s}", f"target.path={out / 'targets' / name}.pt",
                "target.min_column_norm=0"]))
    if only in (None, "resid"):
        for layers, s in ((k, s) for k in (1, 2) for s in seeds or range(3)):
            name = f"resid_mlp{layers}_s{s}"
            cells.append(Cell(name, "resid", "resid_mlp_decomposition.py", f"configs/resid_mlp{layers}.yaml", [
                f"target.seed={s}", f"spd.seed={s}", f"target.path={out / 'targets' / name}.pt"]))
    return cells


def cost(cell: Cell, extra: list[str]) -> float:
    """Roughly what the cell's run costs: steps x batch x sum of C x the decomposed matrices' width."""
    cfg = load_config(config_class(import_script(ROOT / cell.script)), ROOT / cell.config, cell.overrides + extra)
    t = cfg.target
    width = t.n_features + t.n_hidden if cell.kind == "tms" else t.n_layers * (t.d_embed + t.d_mlp)
    return cfg.spd.steps * cfg.spd.batch_size * sum(cfg.spd.modules.values()) * width


def run_cell(cell: Cell, out: Path, extra: list[str]) -> str:
    """Start, continue or skip one cell; what happened, in a word or two."""
    cells = out / "cells"
    with open(cells / f"{cell.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running elsewhere"
        args = run_args(cells / cell.name, str(ROOT / cell.config), cell.overrides + extra)
        if args is None:
            return "done before"
        print(f"{cell.name}: {'resuming' if args[0] == '--resume' else 'starting'}", flush=True)
        with open(cells / f"{cell.name}.log", "a") as log:  # the run holds the lock too, should this one die
            rc = subprocess.run([sys.executable, str(ROOT / cell.script), *args], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),)).returncode
        return "finished" if rc == 0 else f"exit code {rc} (see {cells / cell.name}.log)"


# ------------------------------------------------------------------------------------------------
# Judging a finished cell
# ------------------------------------------------------------------------------------------------
def judge(kind: str, results: dict, config: dict) -> tuple[str, list[str]]:
    """("pass" | "fail" | "target-dead", what went wrong) for a cell's results.json and resolved config.yaml."""
    t = config["target"]
    wrong = []
    if kind == "tms":
        if results["target_min_column_norm"] < DEAD_NORM:
            return "target-dead", [f"a column of W has norm {results['target_min_column_norm']:.2f}"]
        if results["mmcs_nonnegligible"] < 0.999:
            wrong.append(f"MMCS {results['mmcs_nonnegligible']:.4f}")
        if abs(results["ml2r_nonnegligible"] - 1) > 0.02:
            wrong.append(f"ML2R {results['ml2r_nonnegligible']:.3f}")
        expected = {"linear1": t["n_features"]} | {f"hidden_layers.{i}": t["n_hidden"]
                                                   for i in range(t["n_hidden_layers"])}
        for name, n in expected.items():
            if results[f"n_nonnegligible/{name}"] != n:
                wrong.append(f"{results[f'n_nonnegligible/{name}']} non-negligible in {name} (not {n})")
    else:
        n = t["n_features"]
        if results["n_monosemantic_per_layer"] < 0.98 * n:
            wrong.append(f"{results['n_monosemantic_per_layer']} of {n} monosemantic per layer")
        for key in sorted(k for k in results if k.startswith("w_out_summed_rank/")):
            if results[key] != t["d_mlp"]:
                wrong.append(f"{key} {results[key]} (not {t['d_mlp']})")
        if results["ci_masked_mse_over_target_var"] > 0.01:
            wrong.append(f"CI-masked MSE {results['ci_masked_mse_over_target_var']:.4f} of the output variance")
    if wrong:  # the causes, where the run measured them (resid runs from before 2026-12-07 did not)
        wrong += [f"{what}: {results[k]}" for k, what in [("n_split_features", "split features"),
                                                          ("n_shared_subcomponents", "shared subcomponents"),
                                                          ("n_merged_features", "features merged in pairs or more"),
                                                          ("n_unused_features", "features no subcomponent takes")]
                  if results.get(k)]
    return ("fail" if wrong else "pass"), wrong


def headline(kind: str, results: dict) -> str:
    """The numbers the criteria look at, in one short string."""
    if kind == "tms":
        counts = "/".join(str(v) for k, v in results.items() if k.startswith("n_nonnegligible/"))
        return (f"MMCS {results['mmcs_nonnegligible']:.4f}, ML2R {results['ml2r_nonnegligible']:.3f}, "
                f"non-negligible {counts}")
    ranks = "/".join(str(v) for k, v in results.items() if k.startswith("w_out_summed_rank/"))
    return (f"{results['n_monosemantic_per_layer']} monosemantic per layer, W_out rank {ranks}, "
            f"MSE {results['ci_masked_mse_over_target_var']:.4f}")


def mean_std(values: list[float], digits: int) -> str:
    """'mean ± std' over seeds (the sample std; one value: just it; none: blank)."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else ""
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


HEADERS = {"tms": "| size | pass | target-dead | not done | MMCS | ML2R | W / identity subcomponents |",
           "resid": "| size | pass | target-dead | not done | monosemantic per layer | CI-masked MSE / output var | "
                    "identity_ci_error per W_in (the reference's) |"}


def by_size(rows: list[dict]) -> list[str]:
    """Per kind, a table of one line per size (cells differing only in seed): pass count and the headline
    metrics' mean ± std over the seeds whose target is alive (the paper's Table 1 gives mean ± std over seeds)."""
    lines = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        lines += [*([""] if lines else []), HEADERS[kind], "|---|---|---|---|---|---|---|"]
        for size in dict.fromkeys(r["cell"].rsplit("_s", 1)[0] for r in rows if r["kind"] == kind):
            mine = [r for r in rows if r["cell"].rsplit("_s", 1)[0] == size]
            judged = [r["results"] for r in mine if r["status"] in ("pass", "fail")]
            count = {s: sum(r["status"] == s for r in mine) for s in ("pass", "target-dead", "not done")}
            if kind == "tms":
                metrics = [mean_std([r["mmcs_nonnegligible"] for r in judged], 4),
                           mean_std([r["ml2r_nonnegligible"] for r in judged], 3),
                           ", ".join(sorted({"/".join(str(v) for k, v in r.items() if k.startswith("n_nonnegligible/"))
                                             for r in judged}))]
            else:
                layers = sorted({k for r in judged for k in r if k.startswith("identity_ci_error/")})
                metrics = [mean_std([r["n_monosemantic_per_layer"] for r in judged], 1),
                           mean_std([r["ci_masked_mse_over_target_var"] for r in judged], 4),
                           " / ".join(mean_std([r[k] for r in judged if k in r], 1) for k in layers)]
            lines.append(f"| {size} | {count['pass']} of {len(judged)} | {count['target-dead']} | "
                         f"{count['not done']} | " + " | ".join(metrics) + " |")
    return lines


def table(cells: list[Cell], out: Path) -> Path:
    """Write DIR/robustness.md and .json from the cells' results; print the pass fractions; the json's path."""
    rows = []
    for cell in cells:
        run_dir = out / "cells" / cell.name
        row = {"cell": cell.name, "kind": cell.kind, "status": "not done", "why": [], "headline": "",
               "wall_s": None, "run_dir": str(run_dir)}
        if (run_dir / "results.json").exists():
            results = json.loads((run_dir / "results.json").read_text())
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
            row["status"], row["why"] = judge(cell.kind, results, config)
            row |= {"headline": headline(cell.kind, results), "wall_s": results.get("wall_s"), "results": results}
        rows.append(row)
    lines = ["| cell | result | numbers | time (s) | what went wrong |", "|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['status']} | {r['headline']} | {r['wall_s'] or ''} | {'; '.join(r['why'])} |"
              for r in rows]
    summary = []
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        count = {s: sum(r["status"] == s for r in mine) for s in ("pass", "fail", "target-dead", "not done")}
        judged = count["pass"] + count["fail"]
        summary.append(f"{kind}: {count['pass']} of {judged} cells pass"
                       + (f" ({count['pass'] / judged:.0%})" if judged else "")
                       + f"; {count['target-dead']} target-dead (not counted), {count['not done']} not done")
    (out / "robustness.md").write_text("\n".join(["\n".join(summary), "", *by_size(rows), "", *lines]) + "\n")
    path = out / "robustness.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    os.replace(tmp, path)  # another invocation may be reading it
    print("\n".join(summary), flush=True)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides for every cell")
    ap.add_argument("--only", choices=["tms", "resid"], help="only these cells")
    ap.add_argument("--seeds", type=int, nargs="+", help="target and SPD seeds (default: 0-4 TMS, 0-2 resid)")
    ap.add_argument("--cells", default="*", help="only cells whose name matches this pattern (e.g. 'tms_5-2_*')")
    ap.add_argument("--jobs", type=int, default=1, help="cells run side by side by this invocation")
    ap.add_argument("--out", default="runs/robustness", help="grid dir (default runs/robustness)")
    ap.add_argument("--table", action="store_true", help="only write the table of what has finished")
    args = ap.parse_intermixed_args(argv)
    if args.jobs < 1:
        raise SPDError(f"--jobs {args.jobs}: must be at least 1")
    out = Path(args.out).resolve()
    cells = [c for c in grid(args.only, args.seeds, out) if fnmatch.fnmatch(c.name, args.cells)]
    if not cells:
        raise SPDError(f"--cells {args.cells!r} matches no cell of the grid (names like tms_5-2-id_s0, resid_mlp1_s0)")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    if not args.table:
        cells.sort(key=lambda c: cost(c, args.overrides))  # also checks every cell's config before any runs
        written = threading.Lock()

        def run(cell: Cell) -> None:
            what = run_cell(cell, out, args.overrides)
            print(f"{cell.name}: {what}", flush=True)
            if what == "finished":
                with written:
                    table(cells, out)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, cells))
    print(table(cells, out))


if __name__ == "__main__":
    run_main(main)
