"""Config loading: typed values, overrides, and one clear line for each kind of bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spd_config import SPDError, load_config
from spd_run import config_class, import_script, parse_cli, script_for
from tms_decomposition import TMSConfig

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
target: {n_features: 5, n_hidden: 2, path: targets/x.pt}
spd:
  modules: {linear1: 20}
  lr: 1e-3
"""


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_config_is_typed(tmp_path):
    cfg = load_config(TMSConfig, write(tmp_path, GOOD))
    assert cfg.spd.lr == 1e-3 and isinstance(cfg.spd.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.spd.modules == {"linear1": 20}
    assert cfg.target.n_features == 5 and cfg.spd.ci_hidden == [16]


def test_overrides_are_typed_by_the_dataclass(tmp_path):
    cfg = load_config(TMSConfig, write(tmp_path, GOOD),
                      ["spd.lr=2", "spd.steps=50", "spd.ci_hidden=[4, 4]", "spd.wandb_project=null",
                       "spd.modules.linear2=3", "target.seed=7"])
    assert cfg.spd.lr == 2.0 and isinstance(cfg.spd.lr, float)
    assert cfg.spd.steps == 50 and cfg.spd.ci_hidden == [4, 4] and cfg.spd.wandb_project is None
    assert cfg.spd.modules == {"linear1": 20, "linear2": 3} and cfg.target.seed == 7


@pytest.mark.parametrize("text,overrides,message", [
    (GOOD + "  learning_rate: 1\n", [], r"unknown key 'spd.learning_rate'; valid keys at 'spd': modules"),
    (GOOD, ["spd.lr=-1"], r"key 'spd.lr' = -1.0 is out of range: must be > 0"),
    (GOOD, ["spd.p=0"], r"key 'spd.p' = 0.0 is out of range: must be > 0"),
    (GOOD, ["spd.modules.linear1=0"], r"key 'spd.modules.linear1' = 0: C must be >= 1"),
    (GOOD, ["spd.steps=ten"], r"key 'spd.steps': expected int or one of 'auto', got 'ten'"),
    (GOOD, ["spd.steps=1.5"], r"key 'spd.steps': expected int or one of 'auto', got 1.5"),
    (GOOD, ["spd.ci_fn=transformer"], r"key 'spd.ci_fn': expected one of 'mlp', 'vector_mlp', 'shared_mlp'"),
    (GOOD, ["spd.use_delta_component=maybe"], r"key 'spd.use_delta_component': expected bool"),
    (GOOD, ["spd.ci_hidden=16"], r"key 'spd.ci_hidden': expected a list of int"),
    (GOOD, ["spd"], r"override 'spd' must look like key.sub=value"),
    ("spd: {modules: {a: 1}}\n", [], r"missing required key 'target'"),
    ("target: {n_features: 5}\nspd: [1, 2]\n", [], r"'spd': expected a mapping"),
    ("target: {n_features: 5\nspd: {}\n", [], r"malformed YAML at line \d+"),
    ("- just\n- a list\n", [], r"expected a mapping of keys to values at the top level"),
])
def test_bad_configs_give_one_clear_line(tmp_path, text, overrides, message):
    path = write(tmp_path, text)
    with pytest.raises(SPDError, match=message) as err:
        load_config(TMSConfig, path, overrides)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SPDError, match="not found"):
        load_config(TMSConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs/paper").glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_load(path):
    """Every configs/paper/*.yaml is read by exactly its experiment's config class, with the paper's schedule."""
    script = script_for(path)
    assert script == ("tms" if path.stem.startswith("tms") else "resid_mlp") + "_decomposition.py"
    cfg = load_config(config_class(import_script(ROOT / script)), path)
    assert cfg.spd.faithfulness_coeff == 1.0 and not cfg.spd.use_delta_component
    assert cfg.spd.lr_schedule == ("cosine_quarter" if path.stem.startswith("tms") else "constant")


def test_spd_threads_sets_torchs_thread_count(tmp_path, monkeypatch):
    import spd_run

    monkeypatch.setattr(spd_run, "RUNS_DIR", tmp_path / "runs")  # this process holds no cores of other tests' runs
    before = torch.get_num_threads()
    try:
        cfg, _ = parse_cli(TMSConfig, "", [str(ROOT / "configs/tms_5-2.yaml"), "spd.threads=1", "--out",
                                           str(tmp_path / "run")])
        assert cfg.spd.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="page-fault counts are read the Linux way")
def test_freed_activation_memory_is_reused_without_page_faults():
    """A step's large tensors, freed and allocated again, come back from malloc's heap: without
    `reuse_freed_memory` each round trip faults in every page anew (~10,000 faults per 40 MB)."""
    script = """
import resource, sys, torch
import spd_run
if sys.argv[1] == "reuse":
    spd_run.reuse_freed_memory()
for _ in range(2):  # warm-up: the first round always faults its pages in
    xs = [torch.ones(1 << 20) for _ in range(10)]; del xs
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # five steps' worth of ten 4 MB activations
    xs = [torch.ones(1 << 20) for _ in range(10)]; del xs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "reuse")}
    if faults["default"] < 20_000:  # ~50,000 under glibc's defaults; another allocator leaves nothing to fix
        pytest.skip(f"this malloc keeps freed memory by itself ({faults['default']} page faults)")
    assert faults["reuse"] < 0.1 * faults["default"], faults


def test_without_spd_threads_runs_share_the_cores(tmp_path, monkeypatch):
    """Each spd run here registers its pid (a fixed one with its thread count); a run without spd.threads
    or OMP_NUM_THREADS takes (cores - fixed runs' threads) // sharing runs threads, re-shared as runs
    finish (entries of dead processes are dropped)."""
    import spd_run

    monkeypatch.setattr(spd_run, "RUNS_DIR", tmp_path)
    monkeypatch.setattr(spd_run, "_sharing", False)
    monkeypatch.setattr(spd_run, "_registered", False)
    monkeypatch.setattr(spd_run.os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    (tmp_path / str(os.getppid())).touch()  # another run, alive
    (tmp_path / "999999999").touch()  # a run that died without cleaning up
    before = torch.get_num_threads()
    try:
        spd_run.share_threads(None)
        assert torch.get_num_threads() == 2 and not (tmp_path / "999999999").exists()
        (tmp_path / str(os.getppid())).unlink()  # the other run finished
        spd_run.rebalance_threads()
        assert torch.get_num_threads() == 4
        (tmp_path / str(os.getppid())).write_text("3")  # a run with a fixed 3 threads: one core left here
        spd_run.rebalance_threads()
        assert torch.get_num_threads() == 1
        (tmp_path / str(os.getppid())).unlink()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        spd_run.share_threads(None)
        assert torch.get_num_threads() == 1 and (tmp_path / str(os.getpid())).read_text() == "1"
    finally:
        (tmp_path / str(os.getpid())).unlink(missing_ok=True)
        torch.set_num_threads(before)
