#!/usr/bin/env bash
# What to run first on any machine with one CUDA GPU: the CUDA paths that the CPU test suite cannot
# reach, one line per check, under 5 minutes in all (the tiny Llama target is built on the way).
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      # default: a fresh temporary directory
#
# Checks: TMS 5-2 on CUDA; tiny_llama under `torchrun --nproc_per_node 1` (the launcher; one process forms no
# group), 100 steps; on 2+ GPUs, 2 ranks data-parallel and spd.fsdp (NCCL; on one GPU spd.fsdp over 2 CPU
# processes, gloo); a CUDA run interrupted and resumed,
# bit-identical to an uninterrupted one; bf16 autocast off/on, spd.compile and spd.checkpoint_ci on
# tiny_llama, each with tokens/s and peak GPU memory. Exit code: failed checks.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA device: torch.cuda.is_available() is False"; exit 1; }
python -c "import torch; print(f'torch {torch.__version__}, {torch.cuda.get_device_name()}')"
failed=0

# check NAME CMD...: run CMD (its output in $OUT/NAME.log), then print one line from its results.json.
check() {
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    printf '%-22s ok   %4ds  %s\n' "$name" $((SECONDS - t0)) "$(summary "$(tail -n1 "$OUT/$name.log")")"
  else
    printf '%-22s FAIL %4ds  %s\n' "$name" $((SECONDS - t0)) "$(tail -n1 "$OUT/$name.log")"
    failed=$((failed + 1))
  fi
}

summary() {  # the figures that matter from a results.json
  python - "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
keys = ["mmcs", "ml2r", "ml2r_nonnegligible", "ce_unrecovered", "steps_per_s", "tokens_per_s", "peak_gpu_mem_mb",
        "train_state_mb"]
print("  ".join(f"{k}={r[k]:.4g}" for k in keys if k in r))
EOF
}

LM=(configs/tiny_llama.yaml spd.steps=100 spd.eval_every=100 spd.faithfulness_warmup_steps=20 spd.checkpoint_every=null)
check tms_5-2_cuda python tms_decomposition.py configs/tms_5-2.yaml spd.device=cuda --out "$OUT/tms"
check torchrun_lm torchrun --standalone --nproc_per_node 1 lm_decomposition.py "${LM[@]}" --out "$OUT/lm_torchrun"
check lm_fp32 python lm_decomposition.py "${LM[@]}" --out "$OUT/lm_fp32"
check lm_bf16 python lm_decomposition.py "${LM[@]}" spd.autocast_bf16=true --out "$OUT/lm_bf16"
check lm_compile python lm_decomposition.py "${LM[@]}" spd.compile=true --out "$OUT/lm_compile"
check lm_checkpoint_ci python lm_decomposition.py "${LM[@]}" spd.checkpoint_ci=true --out "$OUT/lm_checkpoint_ci"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then  # 2 ranks (batch 16 and eval batch 32 must divide by the ranks), NCCL
  check ddp_nccl_lm torchrun --standalone --nproc_per_node 2 lm_decomposition.py "${LM[@]}" --out "$OUT/lm_ddp"
  check fsdp_nccl_lm torchrun --standalone --nproc_per_node 2 lm_decomposition.py "${LM[@]}" spd.fsdp=true \
    --out "$OUT/lm_fsdp"
else
  check fsdp_gloo_lm torchrun --standalone --nproc_per_node 2 lm_decomposition.py "${LM[@]}" spd.fsdp=true \
    spd.device=cpu --out "$OUT/lm_fsdp"
fi

# Resume: a run stopped after step 200 of 400 (its final checkpoint and results removed, as if
# killed there) and continued with --resume must end exactly where an uninterrupted run does.
TMS=(configs/tms_5-2.yaml spd.steps=400 spd.checkpoint_every=200 spd.eval_every=200 spd.device=cuda)
resume_check() {
  python tms_decomposition.py "${TMS[@]}" --out "$OUT/resume_ref" &&
  python tms_decomposition.py "${TMS[@]}" --out "$OUT/resume" &&
  rm "$OUT/resume/results.json" "$OUT/resume/checkpoints/final.pt" &&
  python tms_decomposition.py --resume "$OUT/resume" &&
  python - "$OUT" <<'EOF'
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{r}/checkpoints/final.pt", weights_only=True) for r in ("resume_ref", "resume"))
diff = max((a[p][k] - b[p][k]).abs().max().item() for p in ("components", "ci_fns") for k in a[p])
assert diff == 0, f"resumed run differs from the uninterrupted one by up to {diff:.3g}"
EOF
  [ $? -eq 0 ] && echo "$OUT/resume/results.json"
}
check resume_cuda resume_check
echo "logs and run dirs: $OUT"
exit $failed
