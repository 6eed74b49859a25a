"""torchrun: N processes with global batch B train exactly what one process with batch B does."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spd_run import Dist
from test_reliability import assert_same_state

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


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


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_torchrun_equals_one_process(tmp_path, fsdp):
    """DDP (replicated parameters) and spd.fsdp (sharded) train what one process does."""
    args = [str(ROOT / "configs/tms_5-2.yaml"), "spd.steps=50", "spd.batch_size=512", "spd.eval_batch_size=512",
            "spd.eval_every=20", "spd.log_every=10", "spd.faithfulness_warmup_steps=10", "spd.checkpoint_every=25",
            "target.steps=300", "target.min_column_norm=0", f"target.path={tmp_path / 't.pt'}"]
    script = str(ROOT / "tms_decomposition.py")
    # torchrun first: rank 0 trains the missing target, the other rank waits and loads it
    proc = run([*TORCHRUN, script, *args, f"spd.fsdp={fsdp}", "--out", str(tmp_path / "two")], tmp_path)
    run([sys.executable, script, *args, "--out", str(tmp_path / "one")], tmp_path)
    assert proc.stdout.strip().splitlines()[-1].endswith("two/results.json")  # printed once, by rank 0

    one = torch.load(tmp_path / "one/checkpoints/final.pt", weights_only=True)
    two = torch.load(tmp_path / "two/checkpoints/final.pt", weights_only=True)
    # The all-reduce sums gradients in another order: float drift grows over the 50 steps, to 1.2e-5 on one
    # machine's CPU. One step trained differently (other noise, a skipped or doubled step) moves the
    # parameters by ~lr = 3e-3.
    for part in ("components", "ci_fns"):
        assert one[part].keys() == two[part].keys()
        for k in one[part]:
            torch.testing.assert_close(two[part][k], one[part][k], atol=5e-5, rtol=0, msg=f"{part}.{k}")
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
    # parameters + Adam's moments per rank: all of them under DDP, half under FSDP
    assert r2["train_state_mb"] == pytest.approx(r1["train_state_mb"] / (2 if fsdp else 1), rel=0.02)


def test_collectives_see_only_training_device_tensors(monkeypatch, tmp_path):
    """NCCL reduces CUDA tensors only: every tensor `optimize` hands a collective must be on the
    training device. The default device is set to `meta` so that a tensor created without an explicit
    device (on a GPU node: a CPU tensor) shows up as one; the collective is mocked as 2 equal ranks."""
    import torch.distributed as dist

    import spd_common
    from spd_common import ComponentModel, SPDConfig, optimize

    seen = []

    def fake_all_reduce(t, *args, **kwargs):  # two ranks holding the same values
        seen.append(t.device)
        assert t.device == torch.device("cpu"), f"a collective got a tensor on {t.device}, not the training device"
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(spd_common, "init_distributed", lambda: Dist(rank=0, world_size=2))
    torch.manual_seed(0)
    model = ComponentModel(torch.nn.Sequential(torch.nn.Linear(4, 3)), {"0": 5}, {}, "mlp", [4])
    cfg = SPDConfig(steps=3, batch_size=8, eval_every=2, log_every=1, checkpoint_every=2)
    batch = lambda step: torch.randn(8, 4, generator=torch.Generator().manual_seed(step), device="cpu")  # noqa: E731
    torch.set_default_device("meta")
    try:
        optimize(model, cfg, batch, batch, tmp_path)
    finally:
        torch.set_default_device(None)
    assert len(seen) >= 3 * 3  # per step: the gradients, the nan flag and the preemption flag


def test_gpu_nodes_get_a_group_for_cpu_and_cuda_tensors(monkeypatch):
    import torch.distributed as dist

    from spd_run import init_distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert init_distributed() == Dist(1, 2)
    # an hour: rank 0's evaluation, which the others wait out, can outlast NCCL's default 10 minutes
    assert calls == [("set_device", 1), ("cpu:gloo,cuda:nccl", datetime.timedelta(hours=1))]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_lm_run_equals_one_process_in_training_and_evals(tmp_path, fsdp):
    """The LM evaluation draws its stochastic masks on rank 0 alone: from a generator of its own, so
    that the ranks' shared training stream stays in step and 2 processes train what 1 does (also with
    the components and the target's layers sharded, the faithfulness loss reading the gathered weights)."""
    t = tmp_path / "tl"
    args = [str(ROOT / "configs/tiny_llama.yaml"), f"model={t}", f"target.path={t}", "target.n_train_stories=300",
            "target.n_test_stories=40", "target.d_model=16", "target.d_mlp=32", "target.n_heads=2",
            "target.seq_len=32", "target.steps=3", "target.batch_size=4", "target.vocab_size=300",
            f"data.data_files={{train: {t}/corpus/train.jsonl, test: {t}/corpus/test.jsonl}}", "data.seq_len=32",
            "spd.steps=6", "spd.eval_every=2", "spd.log_every=1", "spd.batch_size=4", "spd.eval_batch_size=4",
            "spd.faithfulness_warmup_steps=2", "spd.modules={model.layers.*.mlp.*: 8}", "n_eval_batches=1",
            f"spd.faithfulness_coeff={1.0 if fsdp else 'null'}"]
    script = str(ROOT / "lm_decomposition.py")
    # torchrun first: rank 0 builds the missing tiny Llama, the other rank waits and loads it
    sharded = ["spd.fsdp=true", "spd.fsdp_blocks=model.layers.*"] if fsdp else []
    run([*TORCHRUN, script, *args, *sharded, "--out", str(tmp_path / "two")], tmp_path)
    run([sys.executable, script, *args, "--out", str(tmp_path / "one")], tmp_path)
    one, two = (torch.load(tmp_path / f"{r}/checkpoints/final.pt", weights_only=True) for r in ("one", "two"))
    for k in one["components"]:
        torch.testing.assert_close(two["components"][k], one["components"][k], atol=1e-5, rtol=0, msg=k)
    evals = [[json.loads(l) for l in (tmp_path / f"{r}/metrics.jsonl").read_text().splitlines()
              if "eval/ce/stochastic" in l] for r in ("one", "two")]
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [2, 4, 6]
    for a, b in zip(*evals):
        for k in ("eval/ce/stochastic", "eval/kl/stochastic", "eval/ce/ci_masked", "eval/recon/stochastic"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    if fsdp:  # each rank holds half of the layers' weights, all of the embedding, norm and unembedding
        from transformers import AutoModelForCausalLM

        layers_mb = sum(p.numel() * 4 for n, p in AutoModelForCausalLM.from_pretrained(t).named_parameters()
                        if n.startswith("model.layers.")) / 2 ** 20
        r1, r2 = (json.loads((tmp_path / f"{r}/results.json").read_text()) for r in ("one", "two"))
        assert r2["target_mb"] == pytest.approx(r1["target_mb"] - layers_mb / 2, abs=2e-3)


# The script with every data batch delayed by 50 ms (numerics unchanged), so that the test can interrupt it.
SLOW_TMS = """import sys, time
sys.path.insert(0, {root!r})
sys.argv[0] = "tms_decomposition.py"
import tms_decomposition as m
batch = m.tms_batch
m.tms_batch = lambda *a, **k: (time.sleep(0.05), batch(*a, **k))[1]
m.run_main(m.main)
"""


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_process_run_preempted_and_resumed_equals_uninterrupted(tmp_path, fsdp):
    """SIGTERM to torchrun reaches both ranks, which stop at the same step (the flag is all-reduced);
    rank 0 checkpoints (under FSDP, the gathered shards); a 2-process --resume then ends bit-identical to an
    uninterrupted 2-process run."""
    args = [str(ROOT / "configs/tms_5-2.yaml"), f"spd.fsdp={fsdp}", "spd.steps=40", "spd.batch_size=256", "spd.eval_batch_size=256",
            "spd.eval_every=15", "spd.log_every=5", "spd.faithfulness_warmup_steps=10", "spd.checkpoint_every=10",
            "target.steps=200", "target.min_column_norm=0", f"target.path={tmp_path / 't.pt'}"]
    script = str(ROOT / "tms_decomposition.py")
    run([*TORCHRUN, script, *args, "--out", str(tmp_path / "ref")], tmp_path)
    slow = tmp_path / "slow_tms.py"
    slow.write_text(SLOW_TMS.format(root=str(ROOT)))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*TORCHRUN, str(slow), *args, "--out", str(run_dir)], cwd=tmp_path,
                            env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints/step_10.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, stderr = proc.communicate(timeout=120)
    assert "preempted: SIGTERM at step" in stderr, stderr[-3000:]
    assert not (run_dir / "checkpoints/final.pt").exists()

    done = run([*TORCHRUN, script, "--resume", str(run_dir)], tmp_path)
    assert "resuming from" in done.stdout
    assert_same_state(torch.load(run_dir / "checkpoints/final.pt", weights_only=True),
                      torch.load(tmp_path / "ref/checkpoints/final.pt", weights_only=True))
    assert (run_dir / "metrics.jsonl").read_text() == (tmp_path / "ref/metrics.jsonl").read_text()
