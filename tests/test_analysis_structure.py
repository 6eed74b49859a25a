"""The structure tools in analysis/: clustering, compare_models, causal. Pure functions on hand-made
inputs, then each script end to end on a tiny TMS+ID run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.causal import (ablate_pair, barycentric_order, crossings, default_pairs, edges, firing_sign,
                             forward_stepwise, lasso, n_to_reach, plot_effect_graph, r2, r2_curve, sign_flips)
from analysis.clustering import cluster, jaccard
from analysis.compare_models import match, rank_one_cosines
from spd_common import ComponentModel

ROOT = Path(__file__).resolve().parents[1]


def test_clustering_keeps_a_dense_mechanism_whole_and_per_feature_components_apart():
    gen = torch.Generator().manual_seed(0)
    N = 20_000
    feature = torch.randint(0, 100, (N,), generator=gen)  # one active feature per input (of 100, ~1% each)
    per_feature = torch.nn.functional.one_hot(feature, 100)[:, :10].bool()  # 10 per-feature subcomponents
    encoder_decoder = per_feature[:, :2].clone()  # two more that fire on exactly features 0 and 1
    dense = torch.rand(N, 6, generator=gen) < 0.3  # a dense mechanism: 6 subcomponents, each on 30% of inputs
    fires = torch.cat([per_feature, encoder_decoder, dense], 1)
    labels, _ = cluster(jaccard(fires), threshold=0.15)
    assert len(set(labels[12:])) == 1  # the dense mechanism is one cluster
    assert labels[0] == labels[10] and labels[1] == labels[11]  # same inputs -> same cluster
    assert len(set(labels[:10])) == 10 and labels[2] != labels[12]  # per-feature ones stay apart
    assert len(set(labels)) == 11
    assert jaccard(fires).diagonal().tolist() == [1.0] * 18


def test_hungarian_recovers_a_permutation_and_rejects_unrelated_components():
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(30, 6, generator=gen), torch.randn(6, 20, generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    sign = torch.tensor([1.0, -1, 1, -1, 1, 1])
    # run B: the same rank-one matrices, permuted, rescaled between U and V, and with both factors' signs flipped
    U_b, V_b = 2 * U[:, perm] * sign, 0.5 * V[perm] * sign[:, None]
    cos = rank_one_cosines(U, V, U_b, V_b)
    pairs = match(cos, 0.9)
    assert [(i, j) for i, j, _ in sorted(pairs)] == [(int(perm[j]), j) for j in perm.argsort().tolist()]
    assert all(c == pytest.approx(1.0, abs=1e-5) for _, _, c in pairs)
    flat = lambda U, V: torch.stack([torch.outer(U[:, c], V[c]).flatten() for c in range(V.shape[0])])
    direct = torch.nn.functional.cosine_similarity(flat(U, V)[:, None], flat(U_b, V_b)[None], dim=-1)
    assert torch.allclose(cos, direct, atol=1e-5)  # the factorised cosine is the flattened matrices' cosine
    unrelated = rank_one_cosines(U, V, torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen))
    assert match(unrelated, 0.9) == []


def test_causal_edges_and_default_pairs():
    delta = torch.tensor([0.02, -0.8, 0.15, -0.05, 0.3])
    assert edges(delta, 0.1) == [(1, pytest.approx(-0.8)), (4, pytest.approx(0.3)), (2, pytest.approx(0.15))]
    assert edges(torch.zeros(3), 0.1) == []
    order = ["layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in", "layers.1.mlp_out"]
    assert default_pairs(order) == [("layers.0.mlp_in", "layers.1.mlp_in"), ("layers.0.mlp_out", "layers.1.mlp_out")]
    # TMS: linear1 and linear2 are different roles, not layers 1 and 2 of one
    assert default_pairs(["linear1", "hidden_layers.0", "linear2"]) == [("linear1", "hidden_layers.0"),
                                                                      ("hidden_layers.0", "linear2")]


def test_ablation_recomputes_the_later_layers_ci():
    """Two identity layers, each split into its two coordinates (U = V = I), with CI_c = GELU(h_c)
    clipped to [0, 1] (~1 for h_c = 2, 0 for h_c = 0): coordinate c of the first layer switches on
    coordinate c of the second, and nothing else."""
    target = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        for layer in target:
            layer.weight.copy_(torch.eye(2))
    model = ComponentModel(target, {"0": 2, "1": 2}, {}, "mlp", [1])
    with torch.no_grad():
        for p in model.components.parameters():
            p.copy_(torch.eye(2))
        for fn in model.ci_fns.values():  # 1 -> 1 -> 1 MLPs with weights 1 and biases 0: CI = GELU(h)
            for i, p in enumerate(fn.layers):
                p.fill_(1.0 if i % 2 == 0 else 0.0)
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    results = ablate_pair(model, lambda out: out, x, "0", "1", threshold=0.1, min_density=0.0, min_effect=0.1)
    assert [r["component"] for r in results] == ["0:0", "0:1"]
    for c, r in enumerate(results):
        assert r["n_inputs"] == 2  # the one-hot input and the input with both on
        assert [e["to"] for e in r["edges"]] == [f"1:{c}"]
        assert r["edges"][0]["delta_ci"] == pytest.approx(-1.0, abs=1e-3)
        # outputs (2, 0) and (2, 2) lose coordinate c: squared change 4 + 4 over squared norm 4 + 8
        assert r["output_change"] == pytest.approx(8 / 12, abs=1e-3)
    assert all(mod.mask is None for mod in model.decomposed.values())  # masks and hooks are gone afterwards
    assert torch.equal(model(x), x)


def test_r2_and_n_to_reach_by_hand():
    # SSE (4 - 3)^2 = 1 over SST (1 - 2)^2 + 0 + (3 - 2)^2 = 2
    assert r2(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(0.5)
    assert r2(torch.ones(3), torch.zeros(3)) is None  # a constant target has no variance to explain
    assert n_to_reach([0.3, 0.79, 0.85, 0.9], 0.8) == 3
    assert n_to_reach([0.3, None, 0.5], 0.8) is None


def two_column_data():
    """200 samples of 6 inputs uniform in [0, 1] and y = 3 x1 - 2 x4 (+ noise 0.01): only columns 1 and 4
    matter, column 1 the more (variance 9 / 12 against 4 / 12 of y's 13 / 12)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(400, 6, generator=gen)
    y = 3 * X[:, 1] - 2 * X[:, 4] + 0.01 * torch.randn(400, generator=gen)
    return X[:200], y[:200], X[200:], y[200:]


def test_forward_stepwise_adds_the_two_columns_y_depends_on_first():
    X, y, X_eval, y_eval = two_column_data()
    order = forward_stepwise(X, y)
    assert order[:2] == [1, 4] and sorted(order) == list(range(6))
    curve = r2_curve(X, y, X_eval, y_eval, order)
    assert curve[0] == pytest.approx(9 / 13, abs=0.06)  # x1 alone explains its share of y's variance
    assert curve[1] > 0.999 and n_to_reach(curve, 0.8) == 2
    # a constant column, and a copy of column 1, add nothing: never chosen
    X2 = torch.cat([X, torch.ones(200, 1), X[:, 1:2]], 1)
    assert forward_stepwise(X2, y)[:2] == [1, 4] and not {6, 7} & set(forward_stepwise(X2, y))


def test_lasso_picks_the_two_columns_y_depends_on():
    X, y, X_eval, y_eval = two_column_data()
    X = torch.cat([X, torch.full((200, 1), 0.5)], 1)  # a constant column: left out, coefficient 0
    coef, score = lasso(X, y, torch.cat([X_eval, torch.full((200, 1), 0.5)], 1), y_eval)
    assert coef.abs().argsort(descending=True)[:2].tolist() == [1, 4]
    # per standard deviation (1 / sqrt(12) for uniform inputs): about 3 / sqrt(12) and -2 / sqrt(12)
    assert coef[1].item() == pytest.approx(3 / 12 ** 0.5, abs=0.05) and coef[4].item() == pytest.approx(-2 / 12 ** 0.5, abs=0.05)
    assert coef[[0, 2, 3, 5]].abs().max() < 0.02 and coef[6] == 0 and score > 0.99


def test_barycentric_order_uncrosses_a_hand_made_graph():
    adj = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in [(0, 3), (1, 0), (2, 3), (3, 0)]:
        adj[i, j] = True
    ident = torch.arange(4)
    # identity order: (0,3) crosses (1,0) and (3,0); (2,3) crosses (3,0); edges sharing an end do not cross
    assert crossings(adj, ident, ident) == 3
    # right nodes at their left neighbours' mean place: 0 -> 2, 3 -> 1 (1, 2 keep theirs): order 1, 3, 0, 2;
    # then left 0 -> 1, 1 -> 2, 2 -> 1, 3 -> 2: order 0, 2, 1, 3, which crosses nothing
    left, right = barycentric_order(adj)
    assert left.tolist() == [0, 2, 1, 3] and right.tolist() == [1, 3, 0, 2] and crossings(adj, left, right) == 0
    # right reversed (3 on top): edges at (left, right) places (0,0), (1,3), (2,0), (3,3); only (1,3)-(2,0) cross
    assert crossings(adj, ident, torch.tensor([3, 2, 1, 0])) == 1
    reversal = torch.eye(3, dtype=torch.bool).flip(1)  # 0-2, 1-1, 2-0: every pair crosses
    assert crossings(reversal, torch.arange(3), torch.arange(3)) == 3
    assert crossings(reversal, *barycentric_order(reversal)) == 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # never worse than the identity
        adj = torch.rand(12, 9, generator=gen) < 0.2
        assert crossings(adj, *barycentric_order(adj)) <= crossings(adj, torch.arange(12), torch.arange(9))


def test_sign_flips_and_firing_sign(tmp_path):
    effect = torch.tensor([[0.5, -0.2], [0.05, -0.3]])
    path = torch.tensor([[1.0, 1.0], [-1.0, -2.0]])
    # (0,0) and (1,1) agree; (0,1) flips; (1,0) would flip but its effect is below 0.1
    assert sign_flips(effect, path, 0.1).tolist() == [[False, True], [False, False]]
    inner = torch.tensor([[2.0, -1.0, 5.0], [-1.0, -3.0, 0.0], [-5.0, 1.0, 0.0]])
    ci = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # c0 fires on inputs 0, 1: mean inner (2 - 1) / 2 > 0 (input 2's -5 does not count); c1: (-1 - 3) / 2 < 0;
    # c2 never fires: +1
    assert firing_sign(inner, ci, 0.5).tolist() == [1.0, -1.0, 1.0]
    plot_effect_graph(effect, sign_flips(effect, path, 0.1), torch.tensor([1, 0]), torch.arange(2),
                      (["a", "b"], ["c", "d"]), 0.1, "graph", tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 60-step TMS 5-2+ID decomposition of a 300-step target, in a temporary dir."""
    tmp = tmp_path_factory.mktemp("tiny")
    overrides = ["spd.steps=60", "spd.eval_every=30", "spd.faithfulness_warmup_steps=20", "spd.eval_batch_size=512",
                 "target.steps=300", f"target.path={tmp / 'target.pt'}", "target.min_column_norm=0"]
    proc = subprocess.run([sys.executable, str(ROOT / "tms_decomposition.py"), str(ROOT / "configs/tms_5-2-id.yaml"),
                           *overrides, "--out", str(tmp / "run")], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def analysis(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "analysis" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_clustering_script(tiny_run):
    proc = analysis("clustering.py", tiny_run, cwd=tiny_run.parent)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == tiny_run / "analysis/clusters.json"
    result = json.loads(path.read_text())
    members = [m for c in result["clusters"] for m in c["members"]]
    assert len(members) == len(set(members)) == result["n_alive"] > 0
    assert (tiny_run / "analysis/dendrogram.png").is_file() and (tiny_run / "analysis/coactivation.png").is_file()


def test_compare_script(tiny_run, tmp_path):
    proc = analysis("compare_models.py", tiny_run, tiny_run, "--out", tmp_path, cwd=tiny_run.parent)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert result["match_rate"] == pytest.approx(1.0)  # a run matches itself
    for m in result["modules"].values():
        assert all(p["a"] == p["b"] and p["ci_corr"] == pytest.approx(1.0, abs=1e-4) for p in m["matches"])
    assert (tmp_path / "compare.png").is_file()


def test_causal_script_and_bad_input(tiny_run, tmp_path):
    proc = analysis("causal.py", tiny_run, "--layers", "linear1", "hidden_layers.0", "--out", tmp_path,
                    cwd=tiny_run.parent)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert list(result["pairs"]) == ["linear1 -> hidden_layers.0"]
    for r in result["pairs"]["linear1 -> hidden_layers.0"]:
        assert r["component"].startswith("linear1:") and r["n_inputs"] > 0 and r["output_change"] >= 0
    assert (tmp_path / "causal.png").is_file()
    for script, args, message in [
            ("causal.py", [tiny_run, "--layers", "linear1", "fc9"], "'fc9' is not a decomposed module"),
            ("causal.py", [tiny_run, "--layers", "linear2", "linear1"], "does not come after"),
            ("clustering.py", [tmp_path], "is not a run dir"),
            ("compare_models.py", [tiny_run, tmp_path / "nowhere"], "nowhere is not a run dir")]:
        proc = analysis(script, *args, cwd=tiny_run.parent)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    # a run whose target is not where its config says (a relative path, run from elsewhere) is refused,
    # rather than built by training a new target there
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run / "checkpoints", moved / "checkpoints")
    (moved / "config.yaml").write_text((tiny_run / "config.yaml").read_text().replace(
        str(tiny_run.parent / "target.pt"), "targets/target.pt"))
    proc = analysis("clustering.py", moved, cwd=tmp_path)
    assert proc.returncode == 2 and "targets/target.pt, is not there" in proc.stderr, proc.stderr
    assert not (tmp_path / "targets").exists()



def decompose(config, tmp, *overrides):
    """A TMS decomposition run in tmp/<name>, from the repository root (targets/ as the config says)."""
    out = tmp / "_".join([Path(config).stem, *overrides]).replace("=", "").replace(".", "")
    proc = subprocess.run([sys.executable, str(ROOT / "tms_decomposition.py"), str(ROOT / config), *overrides,
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_two_tms_seeds_match(tmp_path):
    """Ground truth (about 2 minutes): two seeds of TMS 5-2's default run match all their alive subcomponents."""
    a, b = (decompose("configs/tms_5-2.yaml", tmp_path, f"spd.seed={s}") for s in (0, 1))
    proc = analysis("compare_models.py", a, b, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert result["match_rate"] == 1.0 and result["modules"]["linear1"]["n_matched"] == 5


@pytest.mark.slow
def test_the_identity_is_one_cluster(tmp_path):
    """Ground truth (about 3 minutes): TMS 5-2+ID's identity subcomponents come out in one cluster (with
    the encoder and decoder subcomponents of the features that need both of them)."""
    run = decompose("configs/tms_5-2-id.yaml", tmp_path)
    proc = analysis("clustering.py", run, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    clusters = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())["clusters"]
    with_identity = [c for c in clusters if c["modules"].get("hidden_layers.0", 0) >= 2]
    assert len(with_identity) == 1
    others = [c for c in clusters if "hidden_layers.0" in c["modules"] and c not in with_identity]
    assert all(c["size"] == 1 and c["density"] < 0.01 for c in others)  # at most stragglers about to die
