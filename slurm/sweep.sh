#!/usr/bin/env bash
# A sweep as a SLURM job array, one run per array task. From the repository root:
#   python slurm/sweep.py SWEEP.yaml --list     # prints the N runs
#   sbatch --array=0-$((N-1)) [--gpus-per-node=...] slurm/sweep.sh SWEEP.yaml [key.sub=value ...] [--out DIR]
# Runs go to runs/sweeps/<sweep name>/<array job id>/<i>-<config name> unless --out DIR is given. Like
# run.sbatch, each task checkpoints and requeues itself before its time limit, then continues.
#SBATCH --job-name=spd-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%A_%a.out
[ -f slurm/sweep.py ] || { echo "error: submit from the repository root (no slurm/sweep.py in $PWD)" >&2; exit 2; }
exec python slurm/sweep.py "$@" --index "$SLURM_ARRAY_TASK_ID"
