"""Speed and quality of default runs: one row per config.

    python benchmarks/bench.py [configs/tms_5-2.yaml ...] [--steps N] [--seeds 0 1 2] [--script S.py]

Each run goes through the experiment's own script (as a user would run it) into a temporary run
dir; the table shows steps/s, ms/step, peak RSS and the quality metrics from results.json.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spd_run import run_main, script_for  # noqa: E402 (needs ROOT on the path)

QUALITY = ["mmcs", "ml2r", "mmcs_nonnegligible", "ml2r_nonnegligible", "n_nonnegligible/", "n_monosemantic_features", "n_monosemantic_per_layer",
           "w_out_summed_rank/", "ci_masked_mse_over_target_var", "ce_unrecovered", "acc_ci_masked", "acc_without_top_",
           "ce/target", "ce/ci_masked", "kl/ci_masked", "tokens_per_s", "peak_gpu_mem_mb"]  # keys, or key prefixes ending in / or _


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=["configs/tms_5-2.yaml"])
    ap.add_argument("--steps", type=int, default=None, help="override spd.steps (default: the config's)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[None], help="spd.seed values (default: the config's)")
    ap.add_argument("--script", help="the experiment script (default: the one *_decomposition.py that reads each config)")
    args = ap.parse_args()
    header = f"{'config':<22}{'seed':>5}{'steps':>7}{'wall s':>8}{'steps/s':>9}{'ms/step':>9}{'RSS MB':>8}  quality"
    print(header)
    print("-" * len(header))
    for config in map(Path, args.configs):
        for seed in args.seeds:
            overrides = ([f"spd.steps={args.steps}"] if args.steps else []) + \
                        ([f"spd.seed={seed}"] if seed is not None else [])
            with tempfile.TemporaryDirectory() as tmp:
                script = ROOT / (args.script or script_for(config))
                proc = subprocess.run([sys.executable, str(script), str(config), *overrides, "--out", tmp], cwd=ROOT,
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{config.stem:<22} failed: {proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads((Path(tmp) / "results.json").read_text())
            keys = [k for q in QUALITY for k in r if k == q or (q[-1] in "/_" and k.startswith(q))]
            quality = "  ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys)
            print(f"{config.stem:<22}{'-' if seed is None else seed:>5}{r['steps']:>7}{r['wall_s']:>8.1f}"
                  f"{r['steps_per_s']:>9.1f}{1000 / r['steps_per_s']:>9.1f}{r['peak_rss_mb']:>8.0f}  {quality}",
                  flush=True)


if __name__ == "__main__":
    run_main(main)
