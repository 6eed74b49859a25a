"""Language-model recipes side by side: each row a config (plus overrides) run over several seeds, two runs
at a time at one thread each, and one table of mean +- std over the seeds.

    python benchmarks/lm_recipes.py [--seeds 0 1 2] [--jobs 2] [--out runs/lm_recipes] [--only classic,recipe]

Rows (ROWS below): our classic default (configs/tiny_llama.yaml), the reference's current LM recipe
(configs/lm_recipe.yaml), and that recipe with the reference's global transformer CI function. The
configs' step counts (700 and 465) give the rows about the same wall time here.
Columns: CE unrecovered (CI masks), KL of the CI-masked model to the target, adversarial KL under the
reference's evaluation adversary (a fresh 20-step PGD of step 0.1, sources shared across the batch:
recon/pgd_shared_20), mean L0 per module (active subcomponents per token), subcomponents alive (all
modules), and the wall time of training. Finished runs (results.json present) are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS = {  # name -> config and overrides
    "classic": ["configs/tiny_llama.yaml"],
    "recipe": ["configs/lm_recipe.yaml"],
    "recipe_global_transformer": ["configs/lm_recipe.yaml", "spd.ci_fn=global_transformer", "spd.ci_hidden=[64]"],
}


def run(name: str, seed: int, out: Path, extra: list[str]) -> Path:
    run_dir = out / f"{name}_seed{seed}"
    if not (run_dir / "results.json").exists():
        cmd = [sys.executable, str(ROOT / "lm_decomposition.py"), *ROWS[name], *extra, f"spd.seed={seed}",
               "spd.threads=1", "--out", str(run_dir)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return run_dir / "results.json"


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="key.sub=value, applied to every row")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--only", help="comma-separated row names (default: all)")
    ap.add_argument("--out", type=Path, default=Path("runs/lm_recipes"))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(ROWS)
    jobs = [(n, s) for n in names for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        paths = dict(zip(jobs, pool.map(lambda job: run(*job, args.out, args.overrides), jobs)))
    print("| row | steps | CE unrecovered | KL (CI masks) | adversarial KL (pgd_shared_20) | mean L0 | alive | wall s |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in names:
        rs = [json.loads(paths[name, s].read_text()) for s in args.seeds]
        cols = {"ce": [r["ce_unrecovered"] for r in rs], "kl": [r["kl/ci_masked"] for r in rs],
                "pgd": [r["recon/pgd_shared_20"] for r in rs],
                "l0": [statistics.mean(v for k, v in r.items() if k.startswith("l0/")) for r in rs],
                "alive": [sum(v for k, v in r.items() if k.startswith("n_alive/")) for r in rs],
                "wall": [r["wall_s"] for r in rs]}
        print(f"| {name} | {rs[0]['steps']} | {mean_std(cols['ce'], '.4f')} | {mean_std(cols['kl'], '.4f')} | "
              f"{mean_std(cols['pgd'], '.3f')} | {mean_std(cols['l0'], '.2f')} | {mean_std(cols['alive'], '.0f')} | "
              f"{mean_std(cols['wall'], '.0f')} |", flush=True)


if __name__ == "__main__":
    main()
