"""Start or continue one run in a fixed run dir, through slurm/torchrun.sh (what slurm/run.sbatch runs).

    python slurm/launch.py [--out RUN_DIR] SCRIPT CONFIG [key.sub=value ...]

RUN_DIR defaults to runs/slurm/<SLURM_JOB_ID>, which a requeued job keeps. Rerunning the same command is
safe: a finished run (results.json) is left alone, one with a checkpoint continues with --resume, and one
that stopped before its first checkpoint starts over. SIGUSR1 (what run.sbatch asks SLURM to send before
the time limit) checkpoints the run and, inside a SLURM job, requeues the job; SIGTERM checkpoints it.
When the run's processes end, launch.json records the script, config and overrides in RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from spd_config import SPDError  # noqa: E402 (needs ROOT on the path)
from spd_run import EXIT_PREEMPTED, check_resumable, run_main  # noqa: E402 (needs ROOT on the path)


def run_args(run_dir: Path, config: str, overrides: list[str]) -> list[str] | None:
    """The script's arguments that start or continue the run in `run_dir`; None if it has finished."""
    if (run_dir / "results.json").exists():
        return None
    try:
        check_resumable(run_dir)
        return ["--resume", str(run_dir)]
    except SPDError:
        if (run_dir / "config.yaml").exists():  # a run that stopped before its first checkpoint: start over
            shutil.rmtree(run_dir)
        return [config, *overrides, "--out", str(run_dir)]


def launch(script: str, config: str, overrides: list[str], run_dir: Path, record: dict | None = None) -> int:
    """Run (or continue) `script config overrides` in `run_dir` via torchrun.sh; its exit code, or
    EXIT_PREEMPTED if a signal stopped it before it finished."""
    args = run_args(run_dir, config, overrides)
    if args is None:
        print(f"{run_dir / 'results.json'} exists: the run has finished, nothing to do", flush=True)
        return 0
    cmd = [str(ROOT / "slurm" / "torchrun.sh"), script, *args]
    print(shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    caught: list[int] = []

    def forward(signum: int, _frame) -> None:  # torchrun.sh passes SIGTERM on to every worker
        caught.append(signum)
        proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if (run_dir / "config.yaml").exists():  # not before: a fresh run refuses a run dir holding other files
        (run_dir / "launch.json").write_text(json.dumps(
            {"script": script, "config": config, "overrides": overrides, **(record or {})}, indent=2))
    if not caught or (run_dir / "results.json").exists():
        return rc
    job = os.environ.get("SLURM_JOB_ID")
    if signal.SIGUSR1 in caught and job:  # the time limit is near: run again from the checkpoint
        print(f"requeueing job {job} to continue {run_dir}", flush=True)
        subprocess.run(["scontrol", "requeue", job], check=False)
    return EXIT_PREEMPTED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("script", help="experiment script, e.g. tms_decomposition.py")
    ap.add_argument("config", help="YAML config, e.g. configs/tms_5-2.yaml")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ap.add_argument("--out", help="run dir (default runs/slurm/<SLURM_JOB_ID>)")
    args = ap.parse_intermixed_args()
    job = os.environ.get("SLURM_JOB_ID")
    if args.out is None and job is None:
        raise SPDError("no run dir: pass --out RUN_DIR (the default, runs/slurm/<job id>, needs a SLURM job)")
    run_dir = Path(args.out if args.out is not None else f"runs/slurm/{job}")
    sys.exit(launch(args.script, args.config, args.overrides, run_dir))


if __name__ == "__main__":
    run_main(main)
