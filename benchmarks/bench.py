"""Speed and quality of default runs: one row per config (and seed, and set of overrides).

    python benchmarks/bench.py [configs/tms_5-2.yaml ...] [--steps N] [--seeds 0 1 2] [--script S.py]
                               [--set key=value ...] [--set ...]

Each run goes through the experiment's own script (as a user would run it) into a temporary run
dir; the table shows steps/s, ms/step, peak RSS and the quality metrics from results.json. Each
`--set` is one more row per config with those overrides (e.g. `--set spd.batch_size=32 data.seq_len=256`).

For a language model the row also shows tokens/s against a cost model of one training step, as a
fraction of what this machine's measured fp32 matmul FLOP/s would allow. The cost model, in FLOPs
per token (backward passes counted as twice their forward):
  F     target forward: 2 * (the target's Linear / Conv1D weights, lm_head included) + 4 * layers * T * d
        (attention scores and mixing, computed over the full T x T square);
  E_m   what masking module m adds to a forward: 2 C (d_in + d_out) for the components, plus
        2 d_in d_out for the delta component, minus the 2 d_in d_out of the weight it replaces
        (an embedding's lookups count 0);
  I_m   its inner acts and CI function: 2 C d_in, plus 2 C (1 h1 + h1 h2 + ... + hk 1) for the
        per-subcomponent MLPs (vector_mlp: d_in h1 + ...; shared_mlp: (d_in h1 + ... + hk C) / C).
  step  = F (the target's outputs and module inputs, no grad) + 3 sum_m I_m
        + 3 S (F + sum_m E_m)                       stochastic recon, S mask samples
        + 3 S sum_m (F + E_m)                       layerwise recon, one forward per module
          or 3 S (F + sum_m (E_m + 2 d_in d_out) / M)   with spd.layerwise_routed (one forward)
        + 3 (F + sum_m E_m without the delta)        CI-masked recon
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spd_run import load_run, run_main, script_for  # noqa: E402 (needs ROOT on the path)

QUALITY = ["mmcs", "ml2r", "mmcs_nonnegligible", "ml2r_nonnegligible", "n_nonnegligible/", "n_alive/", "min_ci/",
           "n_monosemantic_features", "n_monosemantic_per_layer", "w_out_summed_rank/", "ci_masked_mse_over_target_var",
           "ce_unrecovered", "acc_ci_masked", "acc_without_top_", "ce/target", "ce/ci_masked", "kl/ci_masked",
           "tokens_per_s", "peak_gpu_mem_mb"]  # keys, or key prefixes ending in / or _


def matmul_flops_per_s(n: int = 1024, reps: int = 10) -> float:
    """This machine's fp32 matmul FLOP/s at torch's thread count (the best of `reps` n x n products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def training_flops_per_token(model, spd, seq_len: int) -> float:
    """The cost model of the module docstring for one ComponentModel and SPDConfig."""
    from spd_common import decomposable_modules

    target, hf = model.target, getattr(model.target, "config", None)
    layers = decomposable_modules(target).values()  # a decomposed layer is found as the wrapper's .original
    F = 2 * sum(m.weight.numel() for m in layers if not isinstance(m, torch.nn.Embedding))
    if hf is not None and hasattr(hf, "num_hidden_layers"):
        F += 4 * hf.num_hidden_layers * seq_len * hf.hidden_size
    E, E_no_delta, routed, inner = 0.0, 0.0, 0.0, 0.0
    for name, mod in model.decomposed.items():
        d_out, d_in = mod.target_weight().shape
        C, emb = model.C[name], mod.is_embedding
        own = 0 if emb else 2 * d_in * d_out
        comps = 2 * C * d_out + (0 if emb else 2 * C * d_in)
        E_no_delta += comps - own
        E += comps + (own if spd.use_delta_component else 0) - own
        routed += (comps + (own if spd.use_delta_component else 0)) / len(model.decomposed)
        widths = [1, *spd.ci_hidden, 1] if spd.ci_fn == "mlp" else [d_in, *spd.ci_hidden, 1]
        mlp = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        if spd.ci_fn == "shared_mlp":
            mlp = sum(a * b for a, b in zip([d_in, *spd.ci_hidden], [*spd.ci_hidden, C])) / C
        inner += (0 if emb else 2 * C * d_in) + 2 * C * mlp
    M, S = len(model.decomposed), spd.n_mask_samples
    step = F + 3 * inner
    if spd.stochastic_recon_coeff:
        step += 3 * S * (F + E)
    if spd.stochastic_recon_layerwise_coeff:
        step += 3 * S * ((F + routed) if spd.layerwise_routed else (M * F + E))
    if spd.ci_masked_recon_coeff:
        step += 3 * (F + E_no_delta)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", default=["configs/tms_5-2.yaml"])
    ap.add_argument("--steps", type=int, default=None, help="override spd.steps (default: the config's)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[None], help="spd.seed values (default: the config's)")
    ap.add_argument("--script", help="the experiment script (default: the one *_decomposition.py that reads each config)")
    ap.add_argument("--set", nargs="*", action="append", default=None, metavar="KEY=VALUE",
                    help="one row per --set with these overrides (repeatable)")
    args = ap.parse_args()
    peak = matmul_flops_per_s()
    print(f"fp32 matmul: {peak / 1e9:.1f} GFLOP/s at {torch.get_num_threads()} threads")
    header = f"{'config':<22}{'seed':>5}{'steps':>7}{'wall s':>8}{'steps/s':>9}{'ms/step':>9}{'RSS MB':>8}  quality"
    print(header)
    print("-" * len(header))
    for config in map(Path, args.configs):
        for sets in args.set or [[]]:
            for seed in args.seeds:
                overrides = ([f"spd.steps={args.steps}"] if args.steps else []) + \
                            ([f"spd.seed={seed}"] if seed is not None else []) + sets
                if sets:
                    print(" ".join(sets))
                with tempfile.TemporaryDirectory() as tmp:
                    script = ROOT / (args.script or script_for(config))
                    proc = subprocess.run([sys.executable, str(script), str(config), *overrides, "--out", tmp],
                                          cwd=ROOT, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(f"{config.stem:<22} failed: {proc.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads((Path(tmp) / "results.json").read_text())
                    if "tokens_per_s" in r:
                        cfg, exp = load_run(tmp)
                        r["model_flops_per_token"] = training_flops_per_token(exp.model, cfg.spd, cfg.data.seq_len)
                        r["pct_of_matmul_peak"] = 100 * r["tokens_per_s"] * r["model_flops_per_token"] / peak
                keys = [k for q in QUALITY + ["model_flops_per_token", "pct_of_matmul_peak"] for k in r
                        if k == q or (q[-1] in "/_" and k.startswith(q))]
                quality = "  ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys)
                print(f"{config.stem:<22}{'-' if seed is None else seed:>5}{r['steps']:>7}{r['wall_s']:>8.1f}"
                      f"{r['steps_per_s']:>9.1f}{1000 / r['steps_per_s']:>9.1f}{r['peak_rss_mb']:>8.0f}  {quality}",
                      flush=True)


if __name__ == "__main__":
    run_main(main)
