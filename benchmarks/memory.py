"""Peak memory of SPD at size: configs/smollm2_135m.yaml's decomposition (the MLP and attention
matrices of 3 of 30 layers, C = 512, 512-token sequences) of a randomly initialised model of
SmolLM2-135M's shape (a transformers config, no download), with each memory option on and off.

    python benchmarks/memory.py [--steps 2] [--batch 8] [--device cpu]   # --batch: a multiple of 2
    python benchmarks/memory.py --fit-gb 20 [--steps 2]   # the largest batch that fits in 20 GB, per option
    (a second step peaks ~0.75 GB above the first on the 135M shape: use at least 2)

Each row is a fresh process (peak RSS is per process) that builds the model and runs `--steps`
training steps on random tokens; it prints peak RSS (and on CUDA the allocator's peak reserved memory)
and s/step (the first step left out when there are more).
--fit-gb G runs each row at batch 2 and 4 instead: peak memory is a fixed part plus a part per sequence,
so the two give both, and the row's largest batch within G GB (an estimate; checked where it is small).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lm_decomposition import LMConfig  # noqa: E402 (needs ROOT on the path)
from spd_common import ComponentModel, make_optimizer, train_step  # noqa: E402
from spd_config import load_config  # noqa: E402
from spd_run import Dist, get_device  # noqa: E402

ROWS = {"baseline": ["spd.grad_accum_steps=1", "spd.checkpoint_blocks=null", "spd.autocast_bf16=false"],
        "grad_accum_steps=2": ["spd.grad_accum_steps=2", "spd.checkpoint_blocks=null", "spd.autocast_bf16=false"],
        "checkpoint_blocks": ["spd.grad_accum_steps=1", "spd.autocast_bf16=false"],
        "both of those": ["spd.grad_accum_steps=2", "spd.autocast_bf16=false"],
        "checkpoint_ci": ["spd.grad_accum_steps=1", "spd.checkpoint_blocks=null", "spd.autocast_bf16=false",
                          "spd.checkpoint_ci=true"],
        "checkpoint_ci + _blocks": ["spd.grad_accum_steps=1", "spd.autocast_bf16=false", "spd.checkpoint_ci=true"],
        "autocast_bf16": ["spd.grad_accum_steps=1", "spd.checkpoint_blocks=null"],  # emulated on most CPUs: slow
        "all three": ["spd.grad_accum_steps=2"]}


def smollm2_135m_shaped() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True))


def run_row(overrides: list[str], steps: int, batch: int, device_name: str) -> dict:
    cfg = load_config(LMConfig, ROOT / "configs/smollm2_135m.yaml", [*overrides, f"spd.batch_size={batch}",
                                                                       f"spd.device={device_name}"])
    device = get_device(cfg.spd.device)
    model = ComponentModel.from_config(smollm2_135m_shaped().to(device), cfg.spd).to(device)
    if cfg.spd.checkpoint_blocks:
        model.checkpoint_blocks(cfg.spd.checkpoint_blocks)
    model.checkpoint_ci = cfg.spd.checkpoint_ci
    opt = make_optimizer([*model.components.parameters(), *model.ci_fns.parameters()], cfg.spd)  # as training's
    tokens = torch.randint(0, 49152, (batch, cfg.data.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for step in range(steps):
        t0 = time.time()
        train_step(model, cfg.spd, opt, tokens, step, lambda out: out.logits, Dist())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.time() - t0)
    timed = times[1:] or times  # the first step's one-off start-up (allocations, CUDA kernels) left out
    out = {"s_per_step": round(sum(timed) / len(timed), 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device.type == "cuda":  # what the caching allocator held: what must fit on the card
        out["peak_gpu_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2 ** 20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (spd.batch_size)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fit-gb", type=float, default=None, help="report each option's largest batch within this many GB")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args()
    if args.row:
        print(json.dumps(run_row(ROWS[args.row], args.steps, args.batch, args.device)))
        return
    def row(name: str, batch: int) -> dict | str:
        proc = subprocess.run([sys.executable, __file__, "--row", name, "--steps", str(args.steps), "--batch",
                               str(batch), "--device", args.device], capture_output=True, text=True)
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else proc.stderr.strip()[-300:]

    if args.fit_gb is None:
        print(f"SmolLM2-135M-shaped model, batch {args.batch} x 512 tokens, {args.steps} steps per row")
        for name in ROWS:
            print(f"{name:<24} {row(name, args.batch)}", flush=True)
        return
    key = "peak_gpu_reserved_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    print(f"SmolLM2-135M-shaped model, 512 tokens per sequence: {key} at batch 2 and 4, and the largest batch "
          f"within {args.fit_gb} GB (fixed + per-sequence memory, fitted to the two)")
    print("| option | batch 2 | batch 4 | s/step at 4 | MB per sequence | largest batch in "
          f"{args.fit_gb} GB |\n|---|---|---|---|---|---|")
    for name in ROWS:
        if not args.device.startswith("cuda") and ("bf16" in name or name == "all three"):
            continue  # bf16 is emulated on most CPUs: minutes per step
        two, four = row(name, 2), row(name, 4)
        if isinstance(two, str) or isinstance(four, str):
            print(f"| {name} | failed: {two if isinstance(two, str) else four} |", flush=True)
            continue
        per_seq = (four[key] - two[key]) / 2
        fixed = two[key] - 2 * per_seq
        largest = int((args.fit_gb * 1024 - fixed) // per_seq) if per_seq > 0 else "any"
        print(f"| {name} | {two[key]} MB | {four[key]} MB | {four['s_per_step']} | {per_seq:.0f} | {largest} |", flush=True)


if __name__ == "__main__":
    main()
