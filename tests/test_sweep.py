"""Sweeps and the launcher without SLURM: expansion of sweep YAMLs (grids, lists, global vs per-experiment),
the start/continue/skip decision of slurm/launch.py, and `sweep.py --local` end to end through torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spd_config import SPDError, load_config
from spd_run import script_for
from tms_decomposition import TMSConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "slurm"))
from launch import run_args  # noqa: E402
from sweep import expand, load_sweep  # noqa: E402

TINY = ["spd.steps=30", "spd.batch_size=256", "spd.eval_batch_size=256", "spd.eval_every=15",
        "spd.faithfulness_warmup_steps=10", "target.steps=300", "target.min_column_norm=0"]


def points(runs) -> list[tuple[str, list[str]]]:
    return [(run.config, run.overrides) for run in runs]


def test_script_for_finds_the_one_script_whose_config_class_reads_the_config(tmp_path):
    assert script_for(ROOT / "configs/tms_5-2.yaml") == "tms_decomposition.py"
    assert script_for(ROOT / "configs/resid_mlp2.yaml") == "resid_mlp_decomposition.py"
    assert script_for(ROOT / "configs/ih.yaml") == "ih_decomposition.py"
    assert script_for(ROOT / "configs/ss_llama.yaml") == "lm_decomposition.py"
    renamed = tmp_path / "my_toy.yaml"  # the file name plays no part
    renamed.write_text((ROOT / "configs/tms_5-2.yaml").read_text())
    assert script_for(renamed) == "tms_decomposition.py"
    with pytest.raises(SPDError, match="is read by no .*_decomposition.py script; name the experiment script"):
        script_for(ROOT / "configs/sweep_tms.yaml")  # not an experiment config: never a silent LM fallback


def test_a_sweep_section_can_name_its_script():
    runs = expand({"tms_5-2": {"script": "my_decomposition.py", "spd.seed": {"values": [0, 1]}}})
    assert [(r.script, r.overrides) for r in runs] == [("my_decomposition.py", ["spd.seed=0"]),
                                                        ("my_decomposition.py", ["spd.seed=1"])]


def test_grid_is_the_cartesian_product_with_the_last_axis_fastest():
    runs = expand({"global": {"spd.seed": {"values": [0, 1]}, "spd.steps": 30},
                   "tms_5-2": {"spd": {"lr": {"values": [1e-3, "3e-3"]}}}}, ["target.steps=5"])
    assert [r.script for r in runs] == ["tms_decomposition.py"] * 4
    assert points(runs) == [
        ("configs/tms_5-2.yaml", ["spd.seed=0", "spd.steps=30", "spd.lr=0.001", "target.steps=5"]),
        ("configs/tms_5-2.yaml", ["spd.seed=0", "spd.steps=30", "spd.lr=3e-3", "target.steps=5"]),
        ("configs/tms_5-2.yaml", ["spd.seed=1", "spd.steps=30", "spd.lr=0.001", "target.steps=5"]),
        ("configs/tms_5-2.yaml", ["spd.seed=1", "spd.steps=30", "spd.lr=3e-3", "target.steps=5"])]


def test_experiment_values_replace_global_ones_and_lists_of_grids_concatenate():
    runs = expand({"global": {"spd.seed": {"values": [0, 1]}, "spd.steps": 30},
                   "tms_5-2": {"spd.seed": 7},  # a fixed value replaces the global axis: one run
                   "resid_mlp1": [{"spd.steps": 50}, {"spd.lr": {"values": [1, 2]}}],
                   "ih": None})  # no parameters of its own: the global grid
    assert points(runs) == [
        ("configs/tms_5-2.yaml", ["spd.seed=7", "spd.steps=30"]),
        ("configs/resid_mlp1.yaml", ["spd.seed=0", "spd.steps=50"]),
        ("configs/resid_mlp1.yaml", ["spd.seed=1", "spd.steps=50"]),
        ("configs/resid_mlp1.yaml", ["spd.seed=0", "spd.steps=30", "spd.lr=1"]),
        ("configs/resid_mlp1.yaml", ["spd.seed=0", "spd.steps=30", "spd.lr=2"]),
        ("configs/resid_mlp1.yaml", ["spd.seed=1", "spd.steps=30", "spd.lr=1"]),
        ("configs/resid_mlp1.yaml", ["spd.seed=1", "spd.steps=30", "spd.lr=2"]),
        ("configs/ih.yaml", ["spd.seed=0", "spd.steps=30"]),
        ("configs/ih.yaml", ["spd.seed=1", "spd.steps=30"])]
    assert [r.script for r in runs] == ["tms_decomposition.py"] + ["resid_mlp_decomposition.py"] * 6 + \
        ["ih_decomposition.py"] * 2


def test_override_values_reach_the_config_as_written(tmp_path):
    """Lists, mappings, strings that look like numbers, null and booleans survive the trip through argv."""
    runs = expand({"tms_5-2": {"spd.ci_hidden": [8, 4], "spd.importance_minimality_coeff": "1e-3",
                               "spd.modules": {"values": [{"linear1": 3, "linear2": 3}]},
                               "spd.grad_clip": None, "spd.use_delta_component": False,
                               "target.path": str(tmp_path / "a b.pt")}})
    cfg = load_config(TMSConfig, ROOT / runs[0].config, runs[0].overrides)
    assert cfg.spd.ci_hidden == [8, 4] and cfg.spd.importance_minimality_coeff == 1e-3
    assert cfg.spd.modules == {"linear1": 3, "linear2": 3} and cfg.spd.grad_clip is None
    assert cfg.spd.use_delta_component is False and cfg.target.path == str(tmp_path / "a b.pt")


def test_shipped_sweep_is_four_distinct_valid_tms_runs():
    runs = load_sweep(ROOT / "configs/sweep_tms.yaml")
    assert len(runs) == 4 and len({tuple(r.overrides) for r in runs}) == 4
    configs = [load_config(TMSConfig, ROOT / r.config, r.overrides) for r in runs]
    assert {(c.spd.seed, c.spd.importance_minimality_coeff) for c in configs} == \
        {(0, 1e-3), (0, 3e-3), (1, 1e-3), (1, 3e-3)}


@pytest.mark.parametrize("sweep, message", [
    ({"tms_5-2": {"spd.seed": {"values": []}}}, "values must be a non-empty list"),
    ({"tms_5-2": {"spd": {"seed": 1}, "spd.seed": 2}}, "'spd.seed' is given twice"),
    ({"tms_9-9": {"spd.seed": 1}}, "no configs/tms_9-9.yaml"),
    ({"global": {"spd.seed": 1}}, "no experiment sections"),
    ({"tms_5-2": [3]}, "expected a mapping of parameters or a list of them"),
    ([1, 2], "maps experiment names"),
])
def test_bad_sweeps_are_one_clear_error(sweep, message):
    with pytest.raises(SPDError, match=message):
        expand(sweep)


def test_run_args_start_continue_or_skip(tmp_path):
    run = tmp_path / "run"
    fresh = ["configs/tms_5-2.yaml", "spd.seed=1", "--out", str(run)]
    assert run_args(run, "configs/tms_5-2.yaml", ["spd.seed=1"]) == fresh  # no run dir yet
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("spd: {}\n")
    (run / "metrics.jsonl").write_text("")
    assert run_args(run, "configs/tms_5-2.yaml", ["spd.seed=1"]) == fresh  # stopped before its first checkpoint
    assert not run.exists()  # ... so it starts over in an empty run dir
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("spd: {}\n")
    (run / "checkpoints/step_10.pt").write_bytes(b"")
    assert run_args(run, "configs/tms_5-2.yaml", ["spd.seed=1"]) == ["--resume", str(run)]
    (run / "results.json").write_text("{}")
    assert run_args(run, "configs/tms_5-2.yaml", ["spd.seed=1"]) is None  # finished
    other = tmp_path / "other"  # not a run dir (no config.yaml): never deleted, the script refuses it
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run_args(other, "c.yaml", []) == ["c.yaml", "--out", str(other)] and (other / "notes.txt").exists()


def test_local_sweep_runs_every_point_records_it_and_reruns_as_a_no_op(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"tms_5-2": {"spd.seed": {"values": [0, 1]}}}))
    cmd = [sys.executable, "slurm/sweep.py", str(sweep), "--local", *TINY, f"target.path={tmp_path / 't.pt'}",
           "--out", str(tmp_path / "out")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for i in range(2):
        run = tmp_path / "out" / f"{i}-tms_5-2"
        assert json.loads((run / "results.json").read_text())["steps"] == 30
        record = json.loads((run / "launch.json").read_text())
        assert record["overrides"][0] == f"spd.seed={i}" and record["index"] == i
        assert yaml.safe_load((run / "config.yaml").read_text())["spd"]["seed"] == i
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("the run has finished, nothing to do") == 2, again.stdout
