"""What each optional loss buys: one short run per option, one after another, and a table of quality and cost.

    python benchmarks/loss_options.py configs/tiny_llama.yaml spd.steps=300 [--only base,pgd] [--out DIR]
    python benchmarks/loss_options.py configs/resid_mlp1.yaml spd.steps=2000

Each row is the experiment's own script run on CONFIG with the shared overrides plus the option's:
adversarial masks (PGD, fresh or persistent), subset routing of the stochastic loss, the
importance-frequency term, the two global CI functions, and the hard sigmoid clamped in the forward
pass. Columns: the recon loss under CI masks and under adversarial masks (`recon/pgd_<scope>_<steps>`,
the evaluation adversary, the same for every row), mean L0 per module, the
experiment's headline metric, and seconds per step (wall time of training alone, so only comparable
between rows run on an equally loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spd_run import script_for  # noqa: E402

OPTIONS = {
    "base": [],
    "pgd": ["spd.pgd_recon_coeff=1.0", "spd.pgd_steps=1"],
    "pgd_persistent": ["spd.pgd_recon_coeff=1.0", "spd.pgd_steps=1", "spd.pgd_persistent=true"],
    "subset_routing": ["spd.stochastic_recon_routing=uniform_k_subset"],
    "frequency": ["spd.importance_minimality_beta=0.1"],
    "global_shared_mlp": ["spd.ci_fn=global_shared_mlp", "spd.ci_hidden=[128]"],
    "global_transformer": ["spd.ci_fn=global_transformer", "spd.ci_hidden=[64]"],
    "clamped_sigmoid": ["spd.sigmoid=clamp_forward_leaky_backward"],
}
HEADLINE = {"lm_decomposition.py": "ce_unrecovered", "resid_mlp_decomposition.py": "ci_masked_mse_over_target_var",
            "tms_decomposition.py": "ml2r"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value, applied to every row")
    ap.add_argument("--only", help="comma-separated option names (default: all that apply)")
    ap.add_argument("--out", type=Path, default=Path("runs/loss_options"))
    args = ap.parse_args()
    script = script_for(args.config)
    names = args.only.split(",") if args.only else list(OPTIONS)
    headline = HEADLINE.get(script, "recon/ci_masked")
    print(f"| option | recon/ci_masked | recon/pgd_* | mean L0 | {headline} | alive per module | s/step |\n"
          "|---|---|---|---|---|---|---|")
    for name in names:
        out = args.out / name
        cmd = [sys.executable, str(ROOT / script), args.config, *args.overrides, *OPTIONS[name], "spd.threads=1",
               "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            print(f"| {name} | failed: {proc.stderr.strip().splitlines()[-1][:120]} ||||||")
            continue
        r = json.loads((out / "results.json").read_text())
        pgd = next((v for k, v in r.items() if k.startswith("recon/pgd_")), float("nan"))
        l0 = [v for k, v in r.items() if k.startswith("l0/")]
        alive = "/".join(str(v) for k, v in r.items() if k.startswith("n_alive/"))
        print(f"| {name} | {r['recon/ci_masked']:.4g} | {pgd:.4g} | {sum(l0) / len(l0):.2f} | "
              f"{r[headline]:.4g} | {alive} | {1 / r['steps_per_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
