"""Reliability: bit-exact resume after kill -9 or SIGTERM, verified and rotated checkpoints, the nan
guard, and one clear line for every kind of bad input, with existing results left untouched."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import spd_common
import tms_decomposition
from spd_common import ComponentModel, SPDConfig, optimize
from spd_config import SPDError
from spd_run import (EXIT_PREEMPTED, device_here, get_device, load_checkpoint, rng_state, run_main,
                     set_rng_state)
from train_targets.train_tms import TMSModel, tms_batch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tms_5-2.yaml")
TINY = ["spd.steps=40", "spd.batch_size=256", "spd.eval_batch_size=256", "spd.checkpoint_every=10",
        "spd.eval_every=15", "spd.log_every=5", "spd.faithfulness_warmup_steps=20", "target.steps=200",
        "target.min_column_norm=0"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # bit-exactness holds for one thread count
# The script with every data batch delayed by 50 ms (numerics unchanged), so a test can interrupt it mid-way.
SLOW = ("import sys, time; sys.path.insert(0, sys.argv.pop(1)); sys.argv[0] = 'tms_decomposition.py'; "
        "import tms_decomposition as m; f = m.tms_batch; "
        "m.tms_batch = lambda *a, **k: (time.sleep(0.05), f(*a, **k))[1]; m.run_main(m.main)")


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tms_decomposition.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def start_slow(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW, str(ROOT), *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before the test could interrupt it: {proc.communicate()}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


def assert_same_state(a, b, key: str = "") -> None:
    """Nested checkpoint contents are equal; tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), key
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            assert_same_state(a[k], b[k], f"{key}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{key}[{i}]")
    else:
        assert a == b, key


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints/final.pt", weights_only=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A cached target and one uninterrupted reference run, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("shared")
    target = root / "target.pt"
    overrides = [*TINY, f"target.path={target}"]
    proc = run_script([CONFIG, *overrides, "--out", str(root / "ref")], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "target": target, "ref": root / "ref", "overrides": overrides}


def interrupted_copy(ref: Path, dst: Path) -> Path:
    """The reference run as if killed just before final.pt: checkpoints step_10/20/30, metrics to the end."""
    shutil.copytree(ref, dst)
    for name in ["results.json", "checkpoints/final.pt"]:
        (dst / name).unlink()
    shutil.rmtree(dst / "figures")
    return dst


# ------------------------------------------------------------------------------------------------
# Resume, preemption, corrupt checkpoints (end to end)
# ------------------------------------------------------------------------------------------------
def test_kill9_then_resume_equals_uninterrupted_run(shared, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_slow([CONFIG, *shared["overrides"], "--out", str(run_dir)], cwd=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    # kill once step 20 is logged, after step_20.pt: metrics.jsonl then holds lines past the newest checkpoint
    wait_until(lambda: metrics.exists() and '"step": 20' in metrics.read_text(), proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (run_dir / "checkpoints/final.pt").exists()

    done = run_script(["--resume", str(run_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"resuming from .*step_20\.pt \(step 20 of 40\)", done.stdout)
    assert_same_state(final_state(run_dir), final_state(shared["ref"]))
    # no duplicated or missing lines: exactly what the uninterrupted run logged
    assert metrics.read_text() == (shared["ref"] / "metrics.jsonl").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_from_step"] == 20 and results["mmcs"] == json.loads(
        (shared["ref"] / "results.json").read_text())["mmcs"]


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(shared, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_slow([CONFIG, *shared["overrides"], "--out", str(run_dir)], cwd=tmp_path)
    wait_until(lambda: (run_dir / "checkpoints/step_10.pt").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED == 75
    m = re.fullmatch(r"preempted: SIGTERM at step (\d+) of 40: saved (\S+); continue with "
                     r"python tms_decomposition.py --resume \S+\n", stderr)
    assert m, stderr
    assert Path(m[2]) == run_dir / "checkpoints" / f"step_{m[1]}.pt" and Path(m[2]).is_file()
    assert load_checkpoint(Path(m[2]))["step"] == int(m[1])

    done = run_script(["--resume", str(run_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_state(final_state(run_dir), final_state(shared["ref"]))
    assert (run_dir / "metrics.jsonl").read_text() == (shared["ref"] / "metrics.jsonl").read_text()


def test_sigusr1_also_preempts(shared, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_slow([CONFIG, *shared["overrides"], "--out", str(run_dir)], cwd=tmp_path)
    wait_until(lambda: (run_dir / "checkpoints/step_10.pt").exists(), proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED and stderr.startswith("preempted: SIGUSR1 at step ")
    assert not (run_dir / "results.json").exists()


def test_ctrl_c_checkpoints_like_sigterm_and_resumes_exactly(shared, tmp_path):
    """A first Ctrl-C (SIGINT) saves a checkpoint at the step boundary and exits 75 with the resume line,
    instead of a traceback that loses the steps since the last periodic checkpoint."""
    run_dir = tmp_path / "run"
    proc = start_slow([CONFIG, *shared["overrides"], "--out", str(run_dir)], cwd=tmp_path)
    wait_until(lambda: (run_dir / "checkpoints/step_10.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "Ctrl-C: saving a checkpoint" in stderr and "Traceback" not in stderr
    assert re.search(r"preempted: SIGINT at step \d+ of 40: saved \S+; continue with", stderr), stderr
    done = run_script(["--resume", str(run_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_state(final_state(run_dir), final_state(shared["ref"]))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(shared, tmp_path):
    run_dir = interrupted_copy(shared["ref"], tmp_path / "run")
    newest = run_dir / "checkpoints/step_30.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn write
    done = run_script(["--resume", str(run_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert re.search(r"warning: checkpoint \S*step_30\.pt is truncated or corrupt .*; falling back", done.stderr)
    assert "resuming from" in done.stdout and "step_20.pt (step 20 of 40)" in done.stdout
    assert_same_state(final_state(run_dir), final_state(shared["ref"]))
    assert (run_dir / "metrics.jsonl").read_text() == (shared["ref"] / "metrics.jsonl").read_text()


def test_run_killed_after_final_checkpoint_resumes_to_the_same_results(shared, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(shared["ref"], run_dir)
    (run_dir / "results.json").unlink()  # killed between final.pt and results.json
    done = run_script(["--resume", str(run_dir)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "final.pt (step 40 of 40)" in done.stdout
    ref = json.loads((shared["ref"] / "results.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    assert {k: v for k, v in results.items() if k.startswith(("eval", "train", "mmcs", "ml2r", "l0", "recon"))} \
        == {k: v for k, v in ref.items() if k.startswith(("eval", "train", "mmcs", "ml2r", "l0", "recon"))}
    assert (run_dir / "metrics.jsonl").read_text() == (shared["ref"] / "metrics.jsonl").read_text()


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "garbage", "empty", "old_format"])
def test_damaged_checkpoints_are_detected(shared, tmp_path, damage):
    good = shared["ref"] / "checkpoints/step_10.pt"
    data = bytearray(good.read_bytes())
    path = tmp_path / "c.pt"
    if damage == "truncated":
        data = data[:-100]
    elif damage == "bit_flip":  # inside the tensor data, which torch.load alone would not notice
        data[len(data) // 2] ^= 0xFF
    elif damage == "garbage":
        data = b"not a checkpoint"
    elif damage == "empty":
        data = b""
    else:
        ckpt = torch.load(good, weights_only=True)
        torch.save({k: ckpt[k] for k in ["step", "components", "ci_fns", "optimizer"]}, path)
    if damage != "old_format":
        path.write_bytes(bytes(data))
    with pytest.raises(SPDError, match=r"checkpoint \S+ is truncated or corrupt \(.+\)$") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# Checkpoint rotation and the nan guard (in process, tiny)
# ------------------------------------------------------------------------------------------------
def tiny_optimize(run_dir: Path, eval_fn=None, **spd) -> tuple[dict, ComponentModel]:
    torch.manual_seed(0)
    model = ComponentModel(TMSModel(5, 2), {"linear1": 6, "linear2": 6}, {"linear2": "linear1"}, "mlp", [4])
    cfg = SPDConfig(**{"modules": {"linear1": 6, "linear2": 6}, "tied": {"linear2": "linear1"}, "steps": 12,
                       "batch_size": 64, "eval_batch_size": 64, "eval_every": 5, "log_every": 1,
                       "checkpoint_every": 2, **spd})

    def batch(step: int) -> torch.Tensor:
        return tms_batch(5, 0.05, 64, 0, step)

    return optimize(model, cfg, batch, batch, run_dir, eval_fn=eval_fn), model


def test_checkpoints_are_rotated_and_temp_files_cleaned(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/.step_2.pt.tmp").write_bytes(b"torn")  # left by a kill mid-write
    tiny_optimize(tmp_path, keep_checkpoints=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["final.pt", "step_10.pt", "step_6.pt", "step_8.pt"]
    assert load_checkpoint(tmp_path / "checkpoints/step_8.pt")["step"] == 8


def test_cuda_rng_is_the_training_devices_and_every_rank_resumes_rank_0s(monkeypatch):
    """Under torchrun rank r draws masks from GPU r's generator, all ranks in one state. A checkpoint (written by
    rank 0) keeps its training device's generator, and each rank restores that one into its own GPU's: every
    GPU's states of rank 0's process would give rank r GPU r's untouched initial state. (No GPU here: the
    torch.cuda calls are recorded.)"""
    gpu_states = {0: torch.tensor([7], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu_states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device.index, state))
    state = rng_state(torch.device("cuda", 0))  # rank 0, on GPU 0, writes the checkpoint
    assert state["cuda"].tolist() == [7]
    for rank in (0, 1):
        set_rng_state(state, torch.device("cuda", rank))
    assert {r: t.tolist() for r, t in restored.items()} == {0: [7], 1: [7]}
    old_format = state | {"cuda": [gpu_states[0], gpu_states[1]]}  # older checkpoints: every GPU's of the writer
    monkeypatch.setenv("WORLD_SIZE", "2")
    set_rng_state(old_format, torch.device("cuda", 1))  # rank 1 takes rank 0's GPU 0
    assert restored[1].tolist() == [7]
    monkeypatch.setenv("WORLD_SIZE", "1")
    set_rng_state(old_format, torch.device("cuda", 1))  # one process on cuda:1 drew from GPU 1
    assert restored[1].tolist() == [1]
    cpu = rng_state(torch.device("cpu"))
    assert cpu["cuda"] is None
    restored.clear()
    set_rng_state(cpu, torch.device("cpu"))
    assert restored == {}


def test_a_run_from_a_gpu_this_machine_lacks_loads_on_what_it_has(capsys):
    cfg = SimpleNamespace(spd=SimpleNamespace(device="cuda:99"))
    device_here(cfg, Path("runs/x"))
    assert cfg.spd.device == "auto" and "runs/x ran on cuda:99, which this machine lacks" in capsys.readouterr().err
    for device in ("cpu", "banana"):  # nothing to do, or get_device's one-line error later
        cfg = SimpleNamespace(spd=SimpleNamespace(device=device))
        device_here(cfg, Path("runs/x"))
        assert cfg.spd.device == device
    device_here(SimpleNamespace(), Path("runs/x"))  # a config without an spd section


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch):
    """spd.device=cuda:0 under torchrun would put every rank on GPU 0 (NCCL then fails on a duplicate GPU)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SPDError, match="would put every torchrun rank on that one GPU; set spd.device=cuda"):
        get_device("cuda:0")
    assert get_device("cpu") == torch.device("cpu")


def nan_at(monkeypatch, steps: set[int], grad_only: bool = False) -> None:
    """Make the importance-minimality loss nan at the given steps (or only its gradient, with the loss finite)."""
    orig, calls = spd_common.importance_minimality_loss, []

    def patched(ci_upper, p):
        out = orig(ci_upper, p)
        calls.append(1)
        if len(calls) - 1 not in steps:  # called once per training step
            return out
        g = next(iter(ci_upper.values())).sum()
        return out + 0 * torch.sqrt(g - g) if grad_only else out * float("nan")  # sqrt'(0) = inf

    monkeypatch.setattr(spd_common, "importance_minimality_loss", patched)


def test_nan_loss_stops_naming_the_term_and_step(tmp_path, monkeypatch):
    nan_at(monkeypatch, {7})
    with pytest.raises(SPDError, match=r"^loss term 'importance_minimality' is nan at step 7; stopped, keeping the "
                                       r"last good checkpoint \(\S+step_6\.pt\); .*spd\.on_nan=skip$"):
        tiny_optimize(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2.pt", "step_4.pt", "step_6.pt"]


def test_nan_gradient_with_finite_loss_stops(tmp_path, monkeypatch):
    nan_at(monkeypatch, {3}, grad_only=True)
    with pytest.raises(SPDError, match=r"^the gradient norm is nan at step 3; .*step_2\.pt"):
        tiny_optimize(tmp_path)


def test_nan_steps_are_skipped_with_on_nan_skip(tmp_path, monkeypatch):
    nan_at(monkeypatch, {3, 7})
    results, model = tiny_optimize(tmp_path, on_nan="skip")
    assert results["skipped_steps"] == 2 and results["steps"] == 12
    assert all(torch.isfinite(p).all() for p in model.parameters())
    final = load_checkpoint(tmp_path / "checkpoints/final.pt")
    assert final["skipped_steps"] == 2
    assert all(s["step"].item() == 10 for s in final["optimizer"]["state"].values())  # 12 steps - 2 skipped
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["train/skipped_steps"]) for m in lines if "train/skipped_steps" in m] == [(3, 1), (7, 2)]


def test_nonfinite_parameters_are_never_checkpointed(tmp_path):
    def poison(model: ComponentModel) -> dict[str, float]:  # runs at the eval of step 5
        with torch.no_grad():
            next(model.components.parameters())[0, 0] = float("inf")
        return {}

    with pytest.raises(SPDError, match=r"^parameters are not finite after step 5; not saving step_6\.pt"):
        tiny_optimize(tmp_path, eval_fn=poison)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2.pt", "step_4.pt"]


def test_signal_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    tiny_optimize(tmp_path)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing existing modified
# ------------------------------------------------------------------------------------------------
GOOD = "target: {n_features: 5, n_hidden: 2, path: t.pt}\nspd: {modules: {linear1: 20}}\n"
RUN = ["{cfg}", *TINY, "target.path={target}"]


def edit_config(run_dir: Path, **changes) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def other_target(tmp: Path, shared: dict) -> Path:
    saved = torch.load(shared["target"], weights_only=True)
    saved["state_dict"]["linear1.weight"] += 0.01
    torch.save(saved, tmp / "other.pt")
    return tmp / "other.pt"


SETUPS = {  # prepare files in the test's tmp dir before the bad input is tried
    "interrupted": lambda tmp, sh: interrupted_copy(sh["ref"], tmp / "run"),
    "no_config": lambda tmp, sh: (interrupted_copy(sh["ref"], tmp / "run") / "config.yaml").unlink(),
    "no_checkpoint": lambda tmp, sh: shutil.rmtree(interrupted_copy(sh["ref"], tmp / "run") / "checkpoints"),
    "all_corrupt": lambda tmp, sh: [p.write_bytes(p.read_bytes()[:100]) for p in
                                    (interrupted_copy(sh["ref"], tmp / "run") / "checkpoints").glob("*.pt")],
    "bad_yaml": lambda tmp, sh: (interrupted_copy(sh["ref"], tmp / "run") / "config.yaml").write_text("spd: {"),
    "other_target": lambda tmp, sh: edit_config(interrupted_copy(sh["ref"], tmp / "run"),
                                                target__path=str(other_target(tmp, sh))),
    "other_C": lambda tmp, sh: edit_config(interrupted_copy(sh["ref"], tmp / "run"),
                                           spd__modules={"linear1": 10, "linear2": 10}),
    "garbage_target": lambda tmp, sh: (tmp / "garbage.pt").write_bytes(b"not a model"),
    "dir_target": lambda tmp, sh: (tmp / "dir.pt").mkdir(),
    "a_file": lambda tmp, sh: (tmp / "a_file").write_text("x"),
    "malformed": lambda tmp, sh: (tmp / "c.yaml").write_text("target: {n_features: 5\nspd: {}\n"),
    "list": lambda tmp, sh: (tmp / "c.yaml").write_text("- a\n- b\n"),
    "empty": lambda tmp, sh: (tmp / "c.yaml").write_text(""),
    "unknown_top": lambda tmp, sh: (tmp / "c.yaml").write_text(GOOD + "extra: 1\n"),
    "spd_list": lambda tmp, sh: (tmp / "c.yaml").write_text("target: {n_features: 5}\nspd: [1, 2]\n"),
    "no_target": lambda tmp, sh: (tmp / "c.yaml").write_text("spd: {modules: {linear1: 3}}\n"),
}

BAD_INPUTS = [
    # config files
    ("missing_file", None, ["{tmp}/nope.yaml"], r"config file \S+nope.yaml not found; pass the path of a YAML"),
    ("malformed_yaml", "malformed", ["{tmp}/c.yaml"], r"c.yaml: malformed YAML at line 2: .*; fix the file's syntax"),
    ("top_level_list", "list", ["{tmp}/c.yaml"], r"c.yaml: expected a mapping of keys to values at the top level"),
    ("empty_file", "empty", ["{tmp}/c.yaml"], r"c.yaml: missing required key 'target'"),
    ("unknown_top_key", "unknown_top", ["{tmp}/c.yaml"], r"unknown key 'extra'; valid keys at the top level: target"),
    ("spd_not_mapping", "spd_list", ["{tmp}/c.yaml"], r"'spd': expected a mapping of keys to values, got \[1, 2\]"),
    ("missing_section", "no_target", ["{tmp}/c.yaml"], r"missing required key 'target'"),
    # overrides: unknown keys, types, ranges
    ("unknown_spd_key", None, [*RUN, "spd.learning_rate=1"], r"unknown key 'spd.learning_rate'; valid keys at 'spd'"),
    ("unknown_target_key", None, [*RUN, "target.n_feature=5"], r"unknown key 'target.n_feature'"),
    ("int_as_word", None, [*RUN, "spd.steps=ten"],
     r"\(with overrides\): key 'spd.steps': expected int or one of 'auto', got 'ten'"),
    ("int_as_float", None, [*RUN, "spd.steps=1.5"], r"key 'spd.steps': expected int or one of 'auto', got 1.5"),
    ("float_as_word", None, [*RUN, "spd.lr=fast"], r"key 'spd.lr': expected float or one of 'auto', got 'fast'"),
    ("seed_as_word", None, [*RUN, "spd.seed=abc"], r"key 'spd.seed': expected int, got 'abc'"),
    ("bool", None, [*RUN, "spd.use_delta_component=maybe"], r"key 'spd.use_delta_component': expected bool"),
    ("list", None, [*RUN, "spd.ci_hidden=16"], r"key 'spd.ci_hidden': expected a list of int, got 16"),
    ("literal", None, [*RUN, "spd.ci_fn=transformer"], r"key 'spd.ci_fn': expected one of 'mlp', 'vector_mlp'"),
    ("on_nan", None, [*RUN, "spd.on_nan=ignore"], r"key 'spd.on_nan': expected one of 'stop', 'skip', got 'ignore'"),
    ("negative_lr", None, [*RUN, "spd.lr=-1"], r"key 'spd.lr' = -1.0 is out of range: must be > 0 \(peak"),
    ("zero_p", None, [*RUN, "spd.p=0"], r"key 'spd.p' = 0.0 is out of range: must be > 0"),
    ("zero_batch", None, [*RUN, "spd.batch_size=0"], r"key 'spd.batch_size' = 0 is out of range: must be >= 1"),
    ("warmup_frac", None, [*RUN, "spd.lr_warmup_frac=1.5"], r"key 'spd.lr_warmup_frac' = 1.5 .* must be <= 1"),
    ("zero_keep", None, [*RUN, "spd.keep_checkpoints=0"], r"key 'spd.keep_checkpoints' = 0 is out of range"),
    ("zero_ckpt_every", None, [*RUN, "spd.checkpoint_every=0"], r"key 'spd.checkpoint_every' = 0 is out of range"),
    ("zero_C", None, [*RUN, "spd.modules.linear1=0"], r"key 'spd.modules.linear1' = 0: C must be >= 1"),
    ("feature_prob", None, [*RUN, "target.feature_probability=0"], r"key 'target.feature_probability' = 0.0 is out"),
    ("anneal_order", None, [*RUN, "spd.p_anneal_start_frac=0.8", "spd.p_anneal_end_frac=0.5"],
     r"'spd': p_anneal_start_frac = 0.8 must be <= p_anneal_end_frac = 0.5"),
    ("beta3_anneal_order", None, [*RUN, "spd.importance_minimality_anneal_start_frac=0.8"],
     r"'spd': importance_minimality_anneal_start_frac = 0.8 must be <= importance_minimality_anneal_end_frac = 0.65"),
    ("beta3_anneal_to_off", None, [*RUN, "spd.importance_minimality_coeff=0",
                                   "spd.importance_minimality_coeff_initial=1e-3"],
     r"'spd': spd.importance_minimality_coeff_initial anneals towards spd.importance_minimality_coeff, which is off"),
    ("no_loss_term", None, [*RUN, "spd.stochastic_recon_coeff=0", "spd.stochastic_recon_layerwise_coeff=null",
                            "spd.importance_minimality_coeff=0"], r"'spd': no loss term is on: set at least one of"),
    ("override_no_equals", None, [*RUN, "spd"], r"override 'spd' must look like key.sub=value"),
    ("override_into_value", None, [*RUN, "spd.eval_every.x=1"],
     r"override 'spd.eval_every.x=1': 'eval_every' is not a section"),
    ("device_name", None, [*RUN, "spd.device=banana"], r"spd.device = 'banana' is not a device; use auto, cpu"),
    ("device_absent", None, [*RUN, "spd.device=cuda:7"], r"spd.device = 'cuda:7' but this machine has \d CUDA"),
    # the model and its target
    ("pattern_matches_nothing", None, [*RUN, "spd.modules={layers.*.fc1: 5}", "spd.tied={}"],
     r"module pattern 'layers.\*.fc1' matches no nn.Linear/nn.Embedding/Conv1D .* linear1, linear2"),
    ("tied_to_nothing", None, [*RUN, "spd.tied={linear2: linear9}"], r"tied module 'linear9' is not among"),
    ("tied_other_C", None, [*RUN, "spd.modules={linear1: 20, linear2: 10}"], r"'linear2' and 'linear1' need the same"),
    ("target_shape", None, [*RUN, "target.n_features=6"], r"target checkpoint \S+ has shape \[5, 2, 0\] but the "
                                                          r"config asks for \[6, 2, 0\] .* set target.path to a new"),
    ("target_garbage", "garbage_target", [*RUN, "target.path={tmp}/garbage.pt"], r"garbage.pt is unreadable .*retrain"),
    ("target_is_dir", "dir_target", [*RUN, "target.path={tmp}/dir.pt"], r"dir.pt is unreadable \(IsADirectoryError"),
    # the command line and run dirs
    ("no_arguments", None, [], r"no config given: pass CONFIG.yaml .* or --resume RUN_DIR \(usage: "),
    ("unknown_flag", None, [*RUN, "--frobnicate"], r"unrecognized arguments: --frobnicate \(usage: "),
    ("out_holds_a_run", None, [*RUN, "--out", "{ref}"], r"output dir \S+ref already holds files; .* --resume"),
    ("out_is_a_file", "a_file", [*RUN, "--out", "{tmp}/a_file"], r"--out \S+a_file is a file, not a directory"),
    ("resume_missing_dir", None, ["--resume", "{tmp}/nope"], r"--resume \S+nope: no such directory"),
    ("resume_no_config", "no_config", ["--resume", "{tmp}/run"], r"no config.yaml there, so it is not a run dir"),
    ("resume_finished", None, ["--resume", "{ref}"], r"the run already finished \(results.json exists\)"),
    ("resume_and_config", "interrupted", ["{cfg}", "--resume", "{tmp}/run"], r"continues the run with its own "
                                                                              r"config.yaml; drop CONFIG, overrides"),
    ("resume_no_checkpoint", "no_checkpoint", ["--resume", "{tmp}/run"], r"no checkpoint to resume from"),
    ("resume_all_corrupt", "all_corrupt", ["--resume", "{tmp}/run"], r"none of the 3 checkpoints in \S+ is readable"),
    ("resume_bad_yaml", "bad_yaml", ["--resume", "{tmp}/run"], r"run/config.yaml: malformed YAML"),
    ("resume_other_target", "other_target", ["--resume", "{tmp}/run"], r"step_30.pt was trained against a "
                                                                        r"different target .*restore the original"),
    ("resume_edited_config", "other_C", ["--resume", "{tmp}/run"], r"step_30.pt does not fit this model \(.*size "
                                                                    r"mismatch.*\); was \S+config.yaml edited\?"),
]


def tree_hashes(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup,args,message", [pytest.param(*c[1:], id=c[0]) for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_changes_nothing(shared, tmp_path, monkeypatch, capsys, setup, args, message):
    if setup:
        SETUPS[setup](tmp_path, shared)
    fill = {"{cfg}": CONFIG, "{tmp}": tmp_path, "{ref}": shared["ref"], "{target}": shared["target"]}
    for placeholder, value in fill.items():  # not str.format: YAML overrides hold braces
        args = [a.replace(placeholder, str(value)) for a in args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tms_decomposition.py", *args])
    before = tree_hashes(shared["root"], tmp_path)
    with pytest.raises(SystemExit) as exit_:
        run_main(tms_decomposition.main)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("warning: ") for line in lines[:-1]), lines
    assert lines[-1].startswith("error: ") and re.search(message, lines[-1]), lines[-1]
    after = tree_hashes(shared["root"], tmp_path)
    assert {p: after.get(p) for p in before} == before  # nothing existing changed or vanished
    new = [p.relative_to(tmp_path).parts for p in after.keys() - before.keys()]
    assert all(parts[0] == "runs" and parts[-1] in ("config.yaml", "run.json") for parts in new), new  # a fresh dir
