"""Bring your own experiment: a copied and renamed experiment script, outside the repository, trains,
is recorded in its run dirs, and works with every analysis tool, with no shared file changed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["spd.steps=60", "spd.eval_every=30", "spd.faithfulness_warmup_steps=20", "spd.eval_batch_size=512",
        "target.steps=300", "target.min_column_norm=0"]


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    """toy_decomposition.py: tms_decomposition.py copied with its config class renamed, and two seeds of it."""
    tmp = tmp_path_factory.mktemp("own")
    script = tmp / "toy_decomposition.py"
    script.write_text((ROOT / "tms_decomposition.py").read_text().replace("TMSConfig", "ToyConfig"))
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for seed in (0, 1):
        proc = subprocess.run([sys.executable, str(script), str(ROOT / "configs/tms_5-2-id.yaml"), *TINY,
                               f"target.path={tmp / 'target.pt'}", f"spd.seed={seed}", "--out", str(tmp / f"run{seed}")],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    return tmp, env


def tool(args, tmp, env):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def test_run_dir_records_its_script(copied):
    tmp, _ = copied
    assert json.loads((tmp / "run0/run.json").read_text())["script"] == str(tmp / "toy_decomposition.py")


@pytest.mark.parametrize("args", [["report.py", "run0"], ["harvest.py", "run0", "--batches", "2"],
                                  ["clustering.py", "run0"], ["compare_models.py", "run0", "run1"],
                                  ["causal.py", "run0", "--layers", "linear1", "hidden_layers.0"]])
def test_every_analysis_tool_reads_a_copied_experiments_runs(copied, args):
    tmp, env = copied
    out = tool([ROOT / "analysis" / args[0], *args[1:], "--out", tmp / f"out_{Path(args[0]).stem}"], tmp, env)
    assert out.is_file() and out.parent == tmp / f"out_{Path(args[0]).stem}"


def test_resume_with_another_script_is_refused(copied):
    tmp, env = copied
    shutil.copytree(tmp / "run0", tmp / "stopped")
    (tmp / "stopped/results.json").unlink()
    proc = subprocess.run([sys.executable, str(ROOT / "tms_decomposition.py"), "--resume", str(tmp / "stopped")],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "was made by toy_decomposition.py, not tms_decomposition.py" in proc.stderr, proc.stderr


def test_resume_with_the_same_script_in_another_checkout_continues(copied):
    tmp, env = copied
    shutil.copytree(tmp / "run0", tmp / "stopped_elsewhere")
    (tmp / "stopped_elsewhere/results.json").unlink()
    clone = tmp / "clone"
    clone.mkdir()
    shutil.copy(tmp / "toy_decomposition.py", clone)  # e.g. a second clone of the repo, or a git worktree
    proc = subprocess.run([sys.executable, str(clone / "toy_decomposition.py"), "--resume",
                           str(tmp / "stopped_elsewhere")], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "stopped_elsewhere/results.json").is_file()
