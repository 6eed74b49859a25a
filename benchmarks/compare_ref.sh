#!/usr/bin/env bash
# Developer-only benchmark (not part of the tests): the public SPD implementation (goodfire-ai/spd at
# 3f0bb61e, "the reference") and ours side by side on the same toy, one thread each, running at the same time.
#
#   bash benchmarks/compare_ref.sh tms_5-2    [--steps 1000] [--small 200]
#   bash benchmarks/compare_ref.sh resid_mlp1 [--steps 500]
#   bash benchmarks/compare_ref.sh tms_5-2 --full   # both default runs to completion, with quality
#   bash benchmarks/compare_ref.sh lm         [--steps 500]   # configs/tiny_llama.yaml's decomposition
#   bash benchmarks/compare_ref.sh lm --config configs/smollm2.yaml --steps 40 --small 0 \
#        train_on=logits spd.output_loss=kl spd.batch_size=4   # the real model; key=value: our config's
#   options: --src GIT_URL_OR_PATH (env REF_SRC, default https://github.com/goodfire-ai/spd)
#            --work DIR (env REF_BENCH_DIR, default ~/.cache/spd/ref-bench: checkout, venv, targets, runs)
#            env PYTHON: the Python 3.11 that builds the venv (default python3); OURS_PY: ours (default python)
#
# Setup, once per work dir: clone REF_SRC, check out 3f0bb61e, make a venv (--system-site-packages, to
# reuse the installed CPU torch), pip install its imports at the pins of ../shared/ref-bench.md and the
# reference itself with --no-deps --ignore-requires-python, add a .pth that aliases typing.override, and
# rewrite its PEP 695 generics (def f[T], class C[T: B], [**P, T]) into module-level TypeVar/ParamSpec
# so that it runs on Python 3.11. Then each side trains its own target once (cached in the work dir).
# Nothing of the reference enters this repo.
#
# Per-step time: the fixed costs (imports, warm-up, evals, figures) differ between the two, so they are
# kept out of it. The pair (reference + ours, OMP/MKL_NUM_THREADS=1, ours started once the reference's
# loop runs) runs N steps with one eval (ours: spd.eval_every=N, at the end; the reference:
# eval_freq=slow_eval_freq=N, at steps 0 and N), and each side's training loop is timed by itself: ours from results.json (wall_s / steps),
# the reference from the times its log lines "--- Step K ---" (every 100 steps; the script timestamps
# its output) arrive: (t_last - t_100) / (last - 100), so N >= 200. Fixed cost = process wall - N x
# s/step. Cross-check: the pair also runs at n steps first (default N/5; --small 0 skips it), and
# (wall_N - wall_n) / (N - n) of the whole processes is printed too; under load it is much noisier.
# The reference starts training 30-130 s after launch, ours after 10-20 s: at small N the two loops
# hardly overlap, so use N >= 1000 (tms_5-2) / 500 (resid_mlp1) for a ratio measured under equal load.
# Time to the default result (estimate) = s/step x default steps (read from each side's default config)
# + fixed cost; the default runs' extra evals (every 1000 / 500 steps) are not in it. --full runs both
# default configs to completion, together, and reports their real wall times and quality instead.
# Target training is timed once and not counted. Each side runs its default config's batch size (both
# printed): the ratio is per step, and per sample only where the two match.
# lm: both sides decompose the same offline tiny Llama (our targets/tiny_llama, a Hugging Face directory
# the reference loads with LlamaForCausalLM.from_pretrained) on the same local text (its corpus directory,
# which the reference's load_dataset reads as train/test splits), with configs/tiny_llama.yaml's modules,
# C, CI functions, losses (stochastic + CI-masked recon, importance minimality), KL, lr schedule, batch and
# sequence length, written into a config of the reference's own; each side tokenises and packs the text
# its own way. Reported too: tokens/s, and each side's CE / KL at the same step (held-out batches).
# lm --config C [key.sub=value ...]: another LM config of ours (its model a Hugging Face directory that
# lm_decomposition.py builds or fetches when missing, e.g. the real SmolLM2 of configs/smollm2.yaml), with
# overrides; the reference has no residual stop, so such a config needs train_on=logits spd.output_loss=kl.
# For LM runs the reference logs every N/10 steps (at most 100), so N >= 20 suffices there.
set -euo pipefail

REF_COMMIT=3f0bb61e
EXP=${1:?usage: compare_ref.sh tms_5-2|resid_mlp1|lm [--steps N] [--small n] [--full] [--src S] [--work D]}
shift
STEPS= SMALL= FULL=0 LM_CFG=configs/tiny_llama.yaml LM_OVERRIDES=()
REF_SRC=${REF_SRC:-https://github.com/goodfire-ai/spd}
WORK=${REF_BENCH_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/spd/ref-bench}
while [[ $# -gt 0 ]]; do
  case $1 in
    --steps) STEPS=$2; shift 2 ;;
    --small) SMALL=$2; shift 2 ;;
    --full) FULL=1; shift ;;
    --src) REF_SRC=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --config) LM_CFG=$2; shift 2 ;;
    *=*) LM_OVERRIDES+=("$1"); shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case $EXP in
  tms_5-2) KIND=tms; TARGET_FILE=tms.pth; STEPS=${STEPS:-1000} ;;
  resid_mlp1) KIND=resid_mlp; TARGET_FILE=resid_mlp.pth; STEPS=${STEPS:-500} ;;
  lm) KIND=lm; STEPS=${STEPS:-500} ;;
  *) echo "experiment must be tms_5-2, resid_mlp1 or lm" >&2; exit 2 ;;
esac
SMALL=${SMALL:-$((STEPS / 5))}
MIN_STEPS=200; [[ $EXP == lm ]] && MIN_STEPS=20
(( FULL || (STEPS >= MIN_STEPS && SMALL < STEPS) )) || { echo "need --steps >= $MIN_STEPS and --small < --steps" >&2; exit 2; }
[[ $EXP == lm || ($LM_CFG == configs/tiny_llama.yaml && ${#LM_OVERRIDES[@]} -eq 0) ]] \
  || { echo "--config and key=value overrides are for lm only" >&2; exit 2; }
OURS=$(cd "$(dirname "$0")/.." && pwd)
OURS_PY=${OURS_PY:-python}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
SRC=$WORK/src VENV=$WORK/venv
RPY=$VENV/bin/python
REF_CFG=$SRC/spd/experiments/$KIND/${EXP}_config.yaml
[[ $EXP == lm ]] && REF_CFG=$WORK/ref_lm.yaml   # written below from our LM config
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 LC_NUMERIC=C  # C: $EPOCHREALTIME with a dot
cleanup() { for p in $(jobs -p); do pkill -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done; }
trap cleanup EXIT; trap 'exit 130' INT TERM   # a failed or interrupted side takes the other one down
elapsed() { python3 -c "print(f'{$EPOCHREALTIME - $1:.1f}')"; }   # seconds since $EPOCHREALTIME was $1

# ---- 1. the reference: checkout, venv, patches (once) ---------------------------------------------
if [[ ! -f $WORK/.installed-$REF_COMMIT ]]; then
  t0=$EPOCHREALTIME
  [[ -d $SRC/.git ]] || git clone -q --no-checkout "$REF_SRC" "$SRC"
  git -C "$SRC" checkout -q --force --detach "$REF_COMMIT"
  "${PYTHON:-python3}" -m venv --system-site-packages "$VENV"
  # torch is not named: the installed CPU wheel is used (a plain `torch` here would pull CUDA wheels)
  "$RPY" -m pip install -q "pydantic>=2.11,<2.12" "transformers>=4.57,<4.58" "wandb==0.23.1" \
    "wandb-workspaces==0.1.12" fire tqdm jaxtyping einops matplotlib numpy python-dotenv sympy datasets \
    scipy zstandard pyyaml typing_extensions
  "$RPY" -m pip install -q --no-deps --ignore-requires-python -e "$SRC"
  # the .pth below runs before the system site-packages join sys.path: typing_extensions must be in the venv
  "$RPY" -m pip install -q --no-deps --ignore-installed typing_extensions
  echo 'import typing, typing_extensions; typing.override = getattr(typing, "override", typing_extensions.override)' \
    > "$("$RPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/typing_override_alias.pth"
  "$RPY" - "$SRC/spd" <<'PY'
# PEP 695 -> TypeVar: drop the [..] type-parameter list of def/class lines, declare each parameter at
# module level just before the first top-level def/class, and make a class without a base Generic[..].
import ast, pathlib, re, sys
HEAD = re.compile(r"^(\s*(?:async\s+)?(def|class)\s+\w+)\[")

def split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "[(") - (ch in "])")
        if ch == "," and depth == 0:
            parts.append(cur); cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]

for path in sorted(pathlib.Path(sys.argv[1]).rglob("*.py")):
    lines = path.read_text().splitlines(keepends=True)
    decls = {}
    for i, line in enumerate(lines):
        m = HEAD.match(line)
        if not m:
            continue
        j, depth = m.end(), 1
        while depth:
            depth += (line[j] == "[") - (line[j] == "]"); j += 1
        names = []
        for p in split_top(line[m.end():j - 1]):
            if p.startswith("**"):
                name, decl = p[2:], f'ParamSpec("{p[2:]}")'
            elif p.startswith("*"):
                name, decl = p[1:], f'TypeVarTuple("{p[1:]}")'
            else:
                name, _, bound = (s.strip() for s in p.partition(":"))
                decl = f'TypeVar("{name}"' + (f", bound={bound})" if bound else ")")
            if decls.setdefault(name, decl) != decl:
                sys.exit(f"{path}: type parameter {name} declared two ways")
            names.append(name)
        rest = line[j:]
        if m.group(2) == "class":
            generic = f"Generic[{', '.join(names)}]"
            if not rest.startswith("("):
                rest = f"({generic})" + rest
            elif not any(re.search(rf"\b{n}\b", rest) for n in names):
                rest = rest[:rest.rindex(")")] + f", {generic}" + rest[rest.rindex(")"):]
        lines[i] = m.group(1) + rest
    if not decls:
        continue
    body = ast.parse("".join(lines)).body
    first = min(min([n.lineno] + [d.lineno for d in n.decorator_list]) for n in body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    block = ["from typing import Generic, ParamSpec, TypeVar, TypeVarTuple\n"]
    block += [f"{n} = {d}\n" for n, d in decls.items()] + ["\n"]
    lines[first - 1:first - 1] = block
    path.write_text("".join(lines))
    ast.parse(path.read_text())
    print(f"patched {path.relative_to(sys.argv[1])}: {', '.join(decls)}")
PY
  touch "$WORK/.installed-$REF_COMMIT"
  echo "reference installed in $WORK in $(elapsed "$t0") s"
fi

# ---- 2. targets (once per work dir), both sides trained together ----------------------------------
# WANDB_ENTITY: its resid_mlp target training asks wandb for the entity (and a login) even when disabled
refenv() { env PYTHONUNBUFFERED=1 WANDB_MODE=disabled WANDB_ENTITY=none MPLBACKEND=Agg CUDA_VISIBLE_DEVICES= \
  SPD_OUT_DIR="$1" "${@:2}"; }
if [[ $EXP == lm ]]; then  # one target for both: our LM config's model, built or fetched once in this checkout
  OURS_CFG=$WORK/ours_lm.yaml   # the LM config with the overrides applied
  (cd "$OURS" && "$OURS_PY" - "$LM_CFG" "$OURS_CFG" "${LM_OVERRIDES[@]}") <<'PY'
import sys, yaml
from lm_decomposition import LMConfig, build
from spd_config import config_to_dict, load_config
src, dst, *overrides = sys.argv[1:]
cfg = load_config(LMConfig, src, overrides)  # a typo in an override stops here, in one line
if cfg.train_on != "logits" or cfg.spd.output_loss != "kl":
    raise SystemExit(f"{src}: the reference compares logits by KL only; add train_on=logits spd.output_loss=kl")
build(cfg)  # builds (tiny Llama) or fetches (registry) a missing model
yaml.safe_dump(config_to_dict(cfg), open(dst, "w"), sort_keys=False)  # resolved, as a run's config.yaml
PY
  MODEL=$(cd "$OURS" && "$OURS_PY" -c 'import os, sys, yaml; print(os.path.abspath(yaml.safe_load(open(sys.argv[1]))["model"]))' \
    "$OURS_CFG")
  # the reference's copy: its transformers 4.57 knows the fast tokenizer by its older class name
  REF_TARGET=$WORK/targets/$(basename "$MODEL")
  rm -rf "$REF_TARGET"; mkdir -p "$WORK/targets"; cp -r "$MODEL" "$REF_TARGET"
  sed -i 's/"tokenizer_class": "TokenizersBackend"/"tokenizer_class": "PreTrainedTokenizerFast"/' \
    "$REF_TARGET/tokenizer_config.json"
  "$OURS_PY" - "$OURS_CFG" "$REF_TARGET" "$REF_CFG" <<'PY'
import sys, yaml
ours, target, dst = sys.argv[1:]
cfg = yaml.safe_load(open(ours))
spd, data = cfg["spd"], cfg["data"]
assert spd["ci_fn"] == "mlp" and spd["output_loss"] == "kl" and not spd.get("stochastic_recon_layerwise_coeff")
ref = {
    "wandb_project": None, "seed": spd["seed"], "n_mask_samples": 1, "ci_fn_type": "mlp",
    "ci_fn_hidden_dims": spd["ci_hidden"], "sampling": "continuous",
    "sigmoid_type": "leaky_hard",  # = our clamp_forward_leaky_backward
    "module_info": [{"module_pattern": p, "C": C} for p, C in spd["modules"].items()],
    "use_delta_component": spd["use_delta_component"],
    "loss_metric_configs": [
        {"classname": "ImportanceMinimalityLoss", "coeff": float(spd["importance_minimality_coeff"]),
         "pnorm": float(spd["p"]), "beta": 0.0},
        {"classname": "StochasticReconLoss", "coeff": float(spd["stochastic_recon_coeff"])},
        {"classname": "CIMaskedReconLoss", "coeff": float(spd["ci_masked_recon_coeff"])}],
    "output_loss_type": "kl",
    "lr_schedule": {"start_val": float(spd["lr"]), "fn_type": spd["lr_schedule"], "warmup_pct": 0.0,
                    "final_val_frac": 0.0},
    "steps": spd["steps"], "batch_size": spd["batch_size"], "autocast_bf16": False,
    "faithfulness_warmup_steps": spd["faithfulness_warmup_steps"],
    "train_log_freq": 100, "eval_freq": spd["steps"], "slow_eval_freq": spd["steps"],
    "eval_batch_size": spd["eval_batch_size"], "n_eval_steps": cfg.get("n_eval_batches", 8),
    "slow_eval_on_first_step": False, "save_freq": None,
    "eval_metric_configs": [{"classname": "CEandKLLosses", "rounding_threshold": 0.0},
                            {"classname": "CI_L0", "groups": None}],
    "pretrained_model_class": "transformers.LlamaForCausalLM", "pretrained_model_name": target,
    "pretrained_model_output_attr": "logits", "tokenizer_name": target,
    "task_config": {"task_name": "lm", "max_seq_len": data["seq_len"], "buffer_size": 1000,
                    "dataset_name": f"{target}/corpus", "column_name": data["column"],
                    "train_data_split": data["split"], "eval_data_split": data["eval_split"],
                    "shuffle_each_epoch": True, "is_tokenized": False, "streaming": False}}
yaml.safe_dump(ref, open(dst, "w"), sort_keys=False)
PY
else
  # our target's cache file is named by the config's target settings: a changed target block trains anew
  TARGET_KEY=$(sed -n '/^target:/,/^[a-z]/p' "$OURS/configs/$EXP.yaml" | grep -v '^  path:' | sha1sum | cut -c1-8)
  OURS_TARGET=$WORK/targets/ours_${EXP}_$TARGET_KEY.pt
  OURS_CFG=$WORK/ours_$EXP.yaml   # our default config with the target cached in the work dir
  sed "s#^\(  path: \).*#\1$OURS_TARGET#" "$OURS/configs/$EXP.yaml" > "$OURS_CFG"
  if [[ ! -f $OURS_TARGET || ! -f $WORK/targets/ref_$EXP.path ]]; then
    mkdir -p "$WORK/targets"; rm -rf "$WORK/targets/ref_$EXP"
    t0=$EPOCHREALTIME
    (cd "$SRC" && refenv "$WORK/targets/ref_$EXP" "$RPY" "spd/experiments/$KIND/train_$KIND.py" \
      > "$WORK/targets/ref_$EXP.log" 2>&1; elapsed "$t0" > "$WORK/targets/ref_$EXP.s") & p1=$!
    (cd "$OURS" && "$OURS_PY" -m "train_targets.train_$KIND" "$OURS_CFG" > "$WORK/targets/ours_$EXP.log" 2>&1
      elapsed "$t0" > "$WORK/targets/ours_$EXP.s") & p2=$!
    wait $p1 || { tail -20 "$WORK/targets/ref_$EXP.log"; exit 1; }
    wait $p2 || { tail -20 "$WORK/targets/ours_$EXP.log"; exit 1; }
    find "$WORK/targets/ref_$EXP" -name "$TARGET_FILE" | head -1 > "$WORK/targets/ref_$EXP.path"
    [[ -s $WORK/targets/ref_$EXP.path ]] || { echo "no $TARGET_FILE from the reference's training" >&2; exit 1; }
    echo "targets trained together: reference $(cat "$WORK/targets/ref_$EXP.s") s, ours $(cat "$WORK/targets/ours_$EXP.s") s"
  fi
  REF_TARGET=$(cat "$WORK/targets/ref_$EXP.path")
fi

# ---- 3. runs: the pair at the same time, one thread each ------------------------------------------
RUNS=$WORK/runs/$EXP-$(date +%Y%m%d-%H%M%S); mkdir -p "$RUNS"
echo "runs in $RUNS"
stamp() { python3 -uc 'import sys, time
for line in sys.stdin: sys.stdout.write(f"{time.time():.3f} {line}")'; }
run_pair() {  # run_pair TAG STEPS|default: writes $RUNS/{ref,ours}_TAG/{log,wall}
  local tag=$1 n=$2 r=$RUNS/ref_$1 o=$RUNS/ours_$1 over=()
  mkdir -p "$r"
  "$RPY" - "$REF_CFG" "$r/config.yaml" "$REF_TARGET" "$n" <<'PY'
import sys, yaml
src, dst, target, n = sys.argv[1:]
cfg = yaml.safe_load(open(src))
cfg.update(wandb_project=None, autocast_bf16=False)
if not cfg.get("pretrained_model_name"):
    cfg["pretrained_model_path"] = target
if n != "default":
    cfg.update(steps=int(n), eval_freq=int(n), slow_eval_freq=int(n))
    if cfg["task_config"]["task_name"] == "lm":  # its "--- Step K ---" lines time the loop: N/10 of them
        cfg["train_log_freq"] = max(1, min(100, int(n) // 10))
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PY
  [[ $n == default ]] || over=("spd.steps=$n" "spd.eval_every=$n")
  local t0=$EPOCHREALTIME
  (cd "$SRC" && refenv "$r" "$RPY" "spd/experiments/$KIND/${KIND}_decomposition.py" "$r/config.yaml" \
    2>&1 | stamp > "$r/log"; elapsed "$t0" > "$r/wall") & local p1=$!
  # ours starts once the reference's loop runs (its step-100 line): ours starts up in seconds, the reference
  # in tens of seconds, and started together ours would train beside the reference's start-up, not its loop
  until grep -qE -- "--- Step [1-9][0-9]* ---" "$r/log" 2>/dev/null || ! kill -0 $p1 2>/dev/null; do sleep 0.2; done
  local t1=$EPOCHREALTIME
  (cd "$OURS" && "$OURS_PY" "${KIND}_decomposition.py" "$OURS_CFG" "${over[@]}" spd.threads=1 --out "$o" \
    > "$RUNS/ours_$tag.log" 2>&1; elapsed "$t1" > "$o/wall") & local p2=$!
  wait $p1 || { tail -30 "$r/log"; echo "reference run $tag failed (log: $r/log)" >&2; exit 1; }
  wait $p2 || { tail -30 "$RUNS/ours_$tag.log"; echo "our run $tag failed" >&2; exit 1; }
  echo "  $tag: reference $(cat "$r/wall") s, ours $(cat "$o/wall") s (whole processes)"
}
if (( FULL )); then
  echo "running both default configs to completion (tens of minutes)"; run_pair full default
else
  (( SMALL == 0 )) || { echo "running the pair at $SMALL steps"; run_pair small "$SMALL"; }
  echo "running the pair at $STEPS steps"
  run_pair big "$STEPS"
fi

# ---- 4. report ------------------------------------------------------------------------------------
"$OURS_PY" - "$EXP" "$RUNS" "$REF_CFG" "$OURS_CFG" "$FULL" "$SMALL" "$STEPS" "$OURS" <<'PY'
import glob, json, re, sys, yaml
exp, runs, ref_cfg, ours_cfg, full, n, N, ours_dir = sys.argv[1:]
full, n, N = full == "1", int(n), int(N)
ref_default = yaml.safe_load(open(ref_cfg))
ours_default = yaml.safe_load(open(ours_cfg))["spd"]
steps = {"ref": ref_default["steps"], "ours": ours_default["steps"]}
batch = {"ref": ref_default["batch_size"], "ours": ours_default["batch_size"]}
wall = lambda side, tag: float(open(f"{runs}/{side}_{tag}/wall").read())
fmt = lambda s: f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"
per, ttr = {}, {}
if full:
    for side in ("ref", "ours"):
        ttr[side] = wall(side, "full"); per[side] = ttr[side] / steps[side]
else:
    log = open(f"{runs}/ref_big/log", newline="").read()  # "<time> ...\r--- Step K ---": first, last after 0
    marks = [(int(k), float(t)) for t, k in re.findall(r"^(\S+) .*--- Step (\d+) ---", log, re.M) if int(k) > 0]
    (a, ta), (b, tb) = marks[0], marks[-1]
    per["ref"] = (tb - ta) / (b - a)
    per["ours"] = (res := json.load(open(f"{runs}/ours_big/results.json")))["wall_s"] / res["steps"]
    for side in ("ref", "ours"):
        fixed = wall(side, "big") - N * per[side]
        ttr[side] = per[side] * steps[side] + fixed
        diff = (f", whole processes differenced {(wall(side, 'big') - wall(side, 'small')) / (N - n) * 1e3:.1f}"
                if n else "")
        print(f"{side}: {per[side] * 1e3:.1f} ms/step in its loop{diff}; fixed cost {fixed:.1f} s; default "
              f"{steps[side]} steps at batch {batch[side]}")
if exp == "lm":  # tokens/s and each side's held-out CE / KL at the end of the same number of steps
    tag, seq = ("full" if full else "big"), yaml.safe_load(open(ours_cfg))["data"]["seq_len"]
    print(f"tokens/s in the loop: reference {batch['ref'] * seq / per['ref']:.0f}, ours {batch['ours'] * seq / per['ours']:.0f}"
          f" (batch {batch['ours']} x {seq} tokens)")
    res = json.load(open(f"{runs}/ours_{tag}/results.json"))
    print("ours:", ", ".join(f"{k} {res[k]:.4g}" for k in sorted(res) if k.split("/")[0] in ("ce", "kl", "ce_unrecovered")))
    evals = {}
    for f in glob.glob(f"{runs}/ref_{tag}/**/metrics.jsonl", recursive=True):
        for line in open(f):
            evals.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float)) and
                          any(w in k.lower() for w in ("ce", "kl", "l0"))})
    print("reference, last eval:", ", ".join(f"{k} {v:.4g}" for k, v in sorted(evals.items())) or "none found")
if full and exp != "lm":  # quality, best effort
    res = json.load(open(f"{runs}/ours_full/results.json"))
    keys = ["mmcs", "ml2r", "mmcs_nonnegligible", "ml2r_nonnegligible"] if exp.startswith("tms") else \
           ["n_monosemantic_features", "ci_masked_mse_over_target_var"]
    print("ours:", ", ".join(f"{k} {res[k]:.4g}" for k in keys if k in res))
    evals = {}  # the reference's metrics.jsonl: its eval records, the last one per key
    for f in glob.glob(f"{runs}/ref_full/spd/*/metrics.jsonl"):
        for line in open(f):
            evals.update({k: v for k, v in json.loads(line).items() if k.split("/")[0] in
                          ("target_solution_error", "l0", "loss")})
    print("reference, last eval:", ", ".join(f"{k} {v:.4g}" for k, v in sorted(evals.items())) or "none found")
    if exp.startswith("tms"):  # our MMCS / ML2R on its final components (its W^T = V U, ours W = U V)
        import torch; sys.path.insert(0, ours_dir); from tms_decomposition import mmcs_ml2r
        last = max(glob.glob(f"{runs}/ref_full/spd/*/model_*.pth"), key=lambda p: int(p[p.rindex("_") + 1:-4]))
        sd = torch.load(last, map_location="cpu", weights_only=True)
        W, U, V = sd["target_model.linear1.weight"], sd["_components.linear1.U"].T, sd["_components.linear1.V"].T
        print("reference: mmcs {:.4g}, ml2r {:.4g}, mmcs_nonnegligible {:.4g}, ml2r_nonnegligible {:.4g}".format(
            *mmcs_ml2r(W, U, V), *mmcs_ml2r(W, U, V, 0.1)))
what = "whole runs (wall / steps)" if full else f"training loops of the {N}-step runs"
print(f"\n| experiment | ref ms/step | ours ms/step | per-step ratio (ref/ours) | ref time to default result "
      f"({steps['ref']} steps) | ours ({steps['ours']} steps) | ratio |")
print("|---|---|---|---|---|---|---|")
print(f"| {exp} | {per['ref'] * 1e3:.1f} | {per['ours'] * 1e3:.1f} | {per['ref'] / per['ours']:.2f} | "
      f"{fmt(ttr['ref'])}{'' if full else ' (est.)'} | {fmt(ttr['ours'])}{'' if full else ' (est.)'} | "
      f"{ttr['ref'] / ttr['ours']:.2f} |")
print(f"\nms/step: {what}; one thread each, ours started once the reference trains; batch ref {batch['ref']}, ours {batch['ours']}.")
PY
