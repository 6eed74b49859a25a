"""torchrun: N processes with global batch B train exactly what one process with batch B does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spd_common import Dist

ROOT = Path(__file__).resolve().parents[1]


def test_shard_splits_rows_and_refuses_uneven_batches():
    x = torch.arange(12).view(6, 2)
    assert torch.equal(torch.cat([Dist(r, 3).shard(x) for r in range(3)]), x)
    with pytest.raises(Exception, match="does not split over 4 processes"):
        Dist(0, 4).shard(x)


def run(cmd, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_torchrun_equals_one_process(tmp_path):
    args = [str(ROOT / "configs/tms_5-2.yaml"), "spd.steps=50", "spd.batch_size=512", "spd.eval_batch_size=512",
            "spd.eval_every=20", "spd.log_every=10", "spd.faithfulness_warmup_steps=10", "spd.checkpoint_every=25",
            "target.steps=300", "target.min_column_norm=0", f"target.path={tmp_path / 't.pt'}"]
    script = str(ROOT / "tms_decomposition.py")
    run([sys.executable, script, *args, "--out", str(tmp_path / "one")], tmp_path)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args,
                "--out", str(tmp_path / "two")], tmp_path)
    assert proc.stdout.strip().splitlines()[-1].endswith("two/results.json")  # printed once, by rank 0

    one = torch.load(tmp_path / "one/checkpoints/final.pt", weights_only=True)
    two = torch.load(tmp_path / "two/checkpoints/final.pt", weights_only=True)
    for part in ("components", "ci_fns"):
        assert one[part].keys() == two[part].keys()
        for k in one[part]:
            torch.testing.assert_close(two[part][k], one[part][k], atol=1e-5, rtol=0, msg=f"{part}.{k}")
    # losses logged are global-batch means, evals on the whole eval batch, each line written once
    lines_one = [json.loads(l) for l in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    lines_two = [json.loads(l) for l in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines_one] == [l["step"] for l in lines_two]
    for a, b in zip(lines_one, lines_two):
        for k in a:
            if k.startswith(("train/total", "eval/mmcs", "eval/recon/ci_masked")):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k
    r1 = json.loads((tmp_path / "one/results.json").read_text())
    r2 = json.loads((tmp_path / "two/results.json").read_text())
    assert r2["mmcs"] == pytest.approx(r1["mmcs"], abs=1e-5)
