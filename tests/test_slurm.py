"""slurm/run.sbatch and slurm/sweep.sh through real `sbatch`: a run, a preempted and requeued run, and a
4-run sweep as a job array. Needs a SLURM cluster that answers here, e.g. `slurm/local_cluster.sh start`
(root); skipped otherwise. Checks read the runs' files only (no sacct)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from spd_config import config_to_dict, load_config
from tms_decomposition import TMSConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slurm"))
from sweep import load_sweep  # noqa: E402

TINY = ["spd.steps=30", "spd.batch_size=256", "spd.eval_batch_size=256", "spd.eval_every=15",
        "spd.faithfulness_warmup_steps=10", "target.steps=300", "target.min_column_norm=0"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # sbatch passes it on to the jobs


pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip unless a SLURM node is up (checked only when a test here is selected: sinfo can take 10 s to fail)."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: apt-get install slurm-wlm munge, then slurm/local_cluster.sh start (as root)")
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or not {"idle", "mix", "alloc"} & set(proc.stdout.split()):
        pytest.skip(f"no SLURM node is up (sinfo: {(proc.stdout + proc.stderr).strip()[:200]}); "
                    f"start a local cluster with slurm/local_cluster.sh start (as root)")


def sbatch(args: list[str], log_dir: Path) -> str:
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={log_dir}/%j.out", *args],
                          env=ENV, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def wait_for(condition, what: str, log_dir: Path, timeout: float = 300) -> None:
    """Poll until condition(); on timeout fail with the jobs' logs."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("*.out")))
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
        time.sleep(0.5)


def job_state(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout


def test_run_sbatch_runs_one_tiny_tms_decomposition(tmp_path):
    run = tmp_path / "run"
    overrides = [*TINY, f"target.path={tmp_path / 't.pt'}"]
    sbatch(["slurm/run.sbatch", "tms_decomposition.py", "configs/tms_5-2.yaml", *overrides, "--out", str(run)],
           tmp_path)
    wait_for(lambda: (run / "launch.json").exists(), "the run to end", tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 30 and 0 < results["mmcs"] <= 1 and results["resumed_from_step"] is None
    assert json.loads((run / "launch.json").read_text())["overrides"] == overrides


@pytest.mark.slow  # ~30 s on an idle machine, but timed out under heavy load: kept out of the default suite
def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes_to_the_same_result(tmp_path):
    run, direct = tmp_path / "run", tmp_path / "direct"
    overrides = [*TINY, "spd.steps=1500", "spd.log_every=50", "spd.eval_every=500",
                 f"target.path={tmp_path / 't.pt'}"]
    job = sbatch(["slurm/run.sbatch", "tms_decomposition.py", "configs/tms_5-2.yaml", *overrides,
                  "--out", str(run)], tmp_path)
    metrics = run / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and '"train/' in metrics.read_text(), "training to start", tmp_path)
    # What --signal=B:USR1@120 does 120 s before the time limit: USR1 to the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: "Restarts=1" in job_state(job) and "JobState=PENDING" in job_state(job),
             "the job to requeue itself", tmp_path)
    # SLURM holds a requeued job for 2 minutes (BeginTime); let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    # Meanwhile the same run uninterrupted, without SLURM or torchrun, for comparison.
    subprocess.run([sys.executable, "tms_decomposition.py", "configs/tms_5-2.yaml", *overrides, "--out",
                    str(direct)], cwd=ROOT, env=ENV, check=True, capture_output=True)
    wait_for(lambda: (run / "results.json").exists(), "the requeued job to finish", tmp_path)
    results = json.loads((run / "results.json").read_text())
    assert 0 < results["resumed_from_step"] < 1500 and results["steps"] == 1500
    resumed, uninterrupted = (torch.load(d / "checkpoints/final.pt", weights_only=True) for d in (run, direct))
    for key in ("components", "ci_fns"):
        for name, tensor in uninterrupted[key].items():
            assert torch.equal(resumed[key][name], tensor), f"{key}.{name} differs after the requeue"


def test_sweep_array_runs_every_point_of_the_shipped_sweep(tmp_path):
    sweep = "configs/sweep_tms.yaml"
    extra = [*TINY, f"target.path={tmp_path / 't.pt'}"]
    runs = load_sweep(ROOT / sweep, extra)
    assert len(runs) == 4
    sbatch([f"--array=0-{len(runs) - 1}", "slurm/sweep.sh", sweep, *extra,
            "--out", str(tmp_path / "sweep")], tmp_path)
    dirs = [tmp_path / "sweep" / run.name(i) for i, run in enumerate(runs)]
    wait_for(lambda: all((d / "launch.json").exists() for d in dirs), "all 4 array tasks to end", tmp_path)
    for i, (run, d) in enumerate(zip(runs, dirs)):
        assert json.loads((d / "results.json").read_text())["steps"] == 30
        assert json.loads((d / "launch.json").read_text()) == {
            "script": "tms_decomposition.py", "config": "configs/tms_5-2.yaml", "overrides": run.overrides,
            "sweep": sweep, "index": i}
        assert yaml.safe_load((d / "config.yaml").read_text()) == \
            config_to_dict(load_config(TMSConfig, ROOT / run.config, run.overrides))
