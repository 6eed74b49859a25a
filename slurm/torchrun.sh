#!/usr/bin/env bash
# torchrun on every node of a SLURM job: slurm/torchrun.sh SCRIPT [ARGS ...]
#
# Inside a job (sbatch or salloc, one node or many), srun starts one torchrun per node; they meet at the
# job's first node, which hosts the rendezvous store; node i runs RANK i*NPROC to (i+1)*NPROC-1.
# Outside SLURM it is one standalone torchrun. Processes per node: $NPROC, else the GPUs SLURM gave
# each node, else 1 (a CPU-only node). SIGTERM to this script reaches every worker on every node.
set -uo pipefail

nproc=${NPROC:-${SLURM_GPUS_ON_NODE:-1}}
if [ -z "${SLURM_JOB_ID:-}" ]; then
  exec torchrun --standalone --nproc_per_node="$nproc" "$@"
fi

host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}  # one per job: array tasks may share a node
cpus=${SLURM_JOB_CPUS_PER_NODE%%[(,]*}  # "8(x2)" or "8,4": the first node's CPUs
# --cpus-per-task: srun (22.05+) no longer inherits the job's, and a 1-CPU step would squeeze all workers onto one core.
# No --kill-on-bad-exit: every torchrun exits non-zero on SIGTERM, and the first to do so would get rank 0's node
# killed while it writes the checkpoint; a node that crashes makes the others fail at their next collective instead.
# A static rendezvous, not c10d: c10d may host its store on a node other than rank 0's, and that node can
# leave before rank 0 has written the results (pytorch issues 69520, 118891).
# shellcheck disable=SC2016  # single quotes on purpose: $SLURM_NODEID is each node's own, expanded there
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" \
  bash -c 'exec torchrun --node_rank="$SLURM_NODEID" "$@"' torchrun --nnodes="$SLURM_NNODES" \
  --nproc_per_node="$nproc" --master_addr="$host" --master_port="$port" "$@" &
pid=$!
# srun answers SIGTERM by killing its step at once; instead signal every process of the job's steps (not
# this batch shell): each torchrun and each worker, which checkpoints at its next step and exits.
trap 'scancel --signal=TERM "$SLURM_JOB_ID"' TERM
wait "$pid"
rc=$?
while kill -0 "$pid" 2>/dev/null; do  # wait returned early to run the trap: wait for srun itself
  wait "$pid"
  rc=$?
done
exit "$rc"
