"""analysis/method_sweep.py: the frontier of hand-made (L0, MSE) points, the table over seeds, and the
shipped sweeps' expansion into methods x settings x seeds with the right overrides."""

import json
from collections import Counter
from pathlib import Path

import pytest

from analysis.method_sweep import (frontier_table, index_ranges, mark_frontiers, on_frontier, plot_frontier, run_all,
                                   setting)
from sae_baseline import SAEConfig
from spd_config import SPDError, load_config
from sweep import Run, load_sweep
from tms_decomposition import TMSConfig

ROOT = Path(__file__).resolve().parents[1]


def test_frontier_is_the_points_no_other_point_beats_in_both_l0_and_mse():
    pts = [(1, 0.5), (2, 0.1), (2, 0.3), (0.5, 1.0), (3, 0.1), (1, 0.5), (1.5, 0.5)]
    # (2, 0.3) loses to (2, 0.1) on MSE, (3, 0.1) to it on L0, (1.5, 0.5) to (1, 0.5); equal points both stay
    assert on_frontier(pts) == [True, True, False, True, False, True, False]


def row(method, setting, seed, l0, mse, recovered=5):
    return {"toy": "tms_5-2", "method": method, "setting": setting, "seed": seed, "l0": l0,
            "output_mse_over_var": mse, "recovered": recovered, "n_features": 5, "dead": 1, "latents": 10}


def test_frontiers_are_per_method_and_the_table_averages_over_seeds(tmp_path):
    rows = [row("topk", "dictionary.k=1", 0, 1.0, 0.2, 4), row("topk", "dictionary.k=1", 1, 1.0, 0.4, 5),
            row("topk", "dictionary.k=2", 0, 2.0, 0.1), row("topk", "dictionary.k=2", 1, 2.0, 0.3),
            row("SPD", "spd.importance_minimality_coeff=1e-3", 0, 3.0, 0.5),  # beaten by topk, alone in SPD
            row("batchtopk", "dictionary.k=0.5", 0, 0.5, 0.6), row("batchtopk", "dictionary.k=1", 0, 1.0, 0.7)]
    mark_frontiers(rows)
    assert [r["frontier"] for r in rows] == [True, False, True, False, True, True, False]
    md = frontier_table(rows).splitlines()
    # SPD before the dictionaries (METHOD_ORDER), then settings in the rows' order; std over 2 seeds of
    # 0.2, 0.4 is 0.1414
    assert md[2] == "| tms_5-2 | SPD | spd.importance_minimality_coeff=1e-3 | 1 | 3 | 0.5 | 5 (min 5) / 5 | 1 of 1 |"
    assert md[3] == "| tms_5-2 | topk | dictionary.k=1 | 2 | 1 ± 0 | 0.3 ± 0.14 | 4.5 (min 4) / 5 | 1 of 2 |"
    assert md[4] == "| tms_5-2 | topk | dictionary.k=2 | 2 | 2 ± 0 | 0.2 ± 0.14 | 5 (min 5) / 5 | 1 of 2 |"
    # batchtopk's settings in its own order, though topk's came first with dictionary.k=1
    assert [line.split(" | ")[2] for line in md[5:7]] == ["dictionary.k=0.5", "dictionary.k=1"]
    assert md[11] == "| tms_5-2 | topk | dictionary.k=1 | 0 | 1 | 0.2 | 4/5 | 1/10 | yes |"
    assert len(md) == 2 + 5 + 1 + 2 + 7  # header, 5 settings, a blank line, header, 7 runs
    plot_frontier(rows, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_setting_is_the_overrides_but_seed_activation_and_the_common_extras():
    assert setting(["spd.seed=2", "dictionary.activation=relu", "dictionary.l1_coeff=0.1", "spd.steps=100"],
                   ["spd.steps=100"]) == "dictionary.l1_coeff=0.1"
    assert setting(["spd.steps=100"], ["spd.steps=100"]) == "default"


def test_shipped_tms_5_2_sweep_is_each_method_at_its_settings_times_3_seeds():
    runs = load_sweep(ROOT / "configs/sweep_methods_tms_5-2.yaml")
    points = Counter()
    for r in runs:
        if r.script == "sae_baseline.py":
            cfg = load_config(SAEConfig, ROOT / r.config, r.overrides)
            d = cfg.dictionary
            key, seed = (d.activation, d.l1_coeff if d.activation == "relu" else d.k), cfg.spd.seed
        else:
            assert r.script == "tms_decomposition.py"
            spd = load_config(TMSConfig, ROOT / r.config, r.overrides).spd
            key, seed = ("SPD", spd.importance_minimality_coeff), spd.seed
        points[key, (setting(r.overrides), seed)] += 1
    expected = {("SPD", b): f"spd.importance_minimality_coeff={b}" for b in ("1e-3", "3e-3", "1e-2")}
    expected |= {("relu", c): f"dictionary.l1_coeff={c}" for c in ("1e-2", "3e-2", "1e-1")}
    expected |= {(m, k): f"dictionary.k={k}" for m, ks in [("topk", "123"), ("abstopk", "123")] for k in ks}
    expected |= {("batchtopk", k): f"dictionary.k={k}" for k in ("0.25", "0.5", "1")}
    assert len(runs) == 45 and set(points.values()) == {1}  # 15 settings x 3 seeds, no run twice
    assert {(m, float(v), (s, seed)) for (m, v), (s, seed) in points} == \
        {(m, float(v), (s, seed)) for (m, v), s in expected.items() for seed in (0, 1, 2)}


@pytest.mark.parametrize("sweep", ["sweep_methods_tms_40-10", "sweep_methods_resid_mlp1"])
def test_shipped_sweep_expands_to_4_settings_x_3_seeds_per_method(sweep):
    runs = load_sweep(ROOT / f"configs/{sweep}.yaml")
    methods = Counter(load_config(SAEConfig, ROOT / r.config, r.overrides).dictionary.activation
                      if r.script == "sae_baseline.py" else "SPD" for r in runs)
    assert methods == {m: 12 for m in ("SPD", "relu", "topk", "batchtopk", "abstopk")}


def test_a_run_dir_left_by_another_sweep_is_refused_before_anything_runs(tmp_path):
    run = Run("tms_decomposition.py", "configs/tms_5-2.yaml", ["spd.seed=1"])
    (tmp_path / "0-tms_5-2").mkdir()
    (tmp_path / "0-tms_5-2" / "launch.json").write_text(json.dumps({"overrides": ["spd.seed=0"]}))
    with pytest.raises(SPDError, match="was run with spd.seed=0, not spd.seed=1: the sweep changed"):
        run_all([run], tmp_path, "sweep.yaml")


def test_finished_reads_the_finished_runs_and_starts_none(tmp_path, capsys):
    runs = [Run("tms_decomposition.py", "configs/tms_5-2.yaml", [f"spd.seed={s}"]) for s in (0, 1, 2)]
    for i in (0, 2):  # run 1 is still under way: a dir, no results.json
        (tmp_path / runs[i].name(i)).mkdir()
        (tmp_path / runs[i].name(i) / "results.json").write_text("{}")
    (tmp_path / runs[1].name(1)).mkdir()
    done = run_all(runs, tmp_path, "sweep.yaml", finished_only=True)
    assert [(r.overrides, d.name) for r, d in done] == [(["spd.seed=0"], "0-tms_5-2"), (["spd.seed=2"], "2-tms_5-2")]
    assert "1 of 3 runs not finished, left out: 1\n" in capsys.readouterr().out
    assert not (tmp_path / "1-tms_5-2" / "config.yaml").exists()  # nothing was started
    with pytest.raises(SPDError, match="no run of sweep.yaml has finished"):
        run_all(runs, tmp_path / "empty", "sweep.yaml", finished_only=True)


def test_index_ranges_join_consecutive_runs():
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert index_ranges([3]) == "3"
