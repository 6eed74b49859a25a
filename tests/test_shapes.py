"""Conv2d components (exact reconstruction, masks by hand, CI on patches) and the shapes experiment."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from analysis.causal import ablate_pair
from shapes_decomposition import (ShapesConfig, attribute_analysis, best_product_set, describe, kind, mean_ci_per_value,
                                  mutual_information, plot_ci_per_value, plot_filters, plot_top_images, product_sets)
from spd_common import ComponentModel, SPDConfig, StepBatch, evaluate, importance_minimality_loss, layerwise_recon_loss
from spd_config import SPDError
from train_targets.train_shapes import ShapesCNN, ShapesTargetConfig, shapes_batch

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


class ConvNet(nn.Module):
    """conv1 (the one under test) -> ReLU -> conv2 (3x3, same size, no bias) -> mean over locations -> fc."""

    def __init__(self, kernel, stride, padding, dilation=1, padding_mode="zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation,
                               padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv1(x))).mean((2, 3)))


GEOMETRIES = [(1, 1, 0), (3, 1, 1), (5, 2, 2), (4, 3, 1), (3, 2, 0, 2, "reflect"), (2, 1, "same"),
              (3, 1, 1, 1, "circular")]  # kernel, stride, padding[, dilation, padding mode]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch pads a copy: fine here
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("ci_fn", ["mlp", "vector_mlp"])
def test_conv_all_masks_one_with_delta_reproduces_target(geometry, ci_fn):
    torch.manual_seed(0)
    model = ComponentModel(ConvNet(*geometry), {"conv*": 6, "fc": 3}, {}, ci_fn, [4])
    x = torch.randn(2, 3, 11, 9)
    target_out, inputs = model.run_target(x)
    ci = model.ci_of(x)
    out_shape = model.target.conv1(x).shape  # (batch, 5, H_out, W_out)
    assert ci["conv1"].shape == (2, *out_shape[2:], 6)  # channels-last, one CI per output location
    assert ci["conv2"].shape == (2, *out_shape[2:], 6) and ci["fc"].shape == (2, 3)
    ones = {n: torch.ones_like(g) for n, g in ci.items()}
    with model.masked(ones, {n: torch.ones(g.shape[:-1]) for n, g in ci.items()}):
        torch.testing.assert_close(model(x), target_out, atol=1e-5, rtol=1e-5)
    with model.masked(ones):  # random U, V without the delta: not the target
        assert not torch.allclose(model(x), target_out, atol=1e-3)
    # U V = W exactly (C = 6 >= rank 5 of conv1, 4 of conv2): masks 1 alone reproduce the target
    with torch.no_grad():
        for n in ("conv1", "conv2"):
            mod = model.decomposed[n]
            u, s, vh = torch.linalg.svd(mod.target_weight(), full_matrices=False)
            mod.components.U.zero_()[:, :len(s)] = u * s
            mod.components.V.zero_()[:len(s)] = vh
    with model.masked({n: ones[n] for n in ("conv1", "conv2")}):
        torch.testing.assert_close(model(x), target_out, atol=1e-5, rtol=1e-5)
    # inner acts = each patch times V: the patches CI functions read are the ones the conv multiplies
    mod = model.decomposed["conv1"]
    patches = mod.matrix_input(inputs["conv1"])
    torch.testing.assert_close(mod.inner_acts(inputs["conv1"]), patches @ mod.components.V.T, atol=1e-5, rtol=1e-5)


def test_conv_masked_forward_by_hand():
    """One 1x1 conv, 2 -> 2 channels, U = V = identity, bias (1, -1). Mask 1 for subcomponent 0 at location
    (0, 1) only, 0 elsewhere: the output is the bias everywhere, plus x[0] at that location in channel 0."""
    conv = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([1.0, -1.0]))
    model = ComponentModel(nn.Sequential(conv), {"0": 2}, {}, "mlp", [4])
    with torch.no_grad():
        model.components["0"].U.copy_(torch.eye(2))
        model.components["0"].V.copy_(torch.eye(2))
    x = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: [[0, 1], [2, 3]], channel 1: [[4, 5], [6, 7]]
    mask = torch.zeros(1, 2, 2, 2)
    mask[0, 0, 1, 0] = 1.0
    with model.masked({"0": mask}):
        out = model(x)
    expected = torch.tensor([[[1.0, 2.0], [1.0, 1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    assert torch.equal(out[0], expected)


def test_grouped_conv_is_refused_in_one_line():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(SPDError, match=r"module '0' is a Conv2d with groups = 2; only groups = 1"):
        ComponentModel(net, {"0": 4}, {}, "mlp", [4])


def test_importance_minimality_is_a_mean_per_module_over_its_own_locations():
    """A conv module's CI (batch 2, 2 x 2 locations, C 1) and a linear one's (batch 2, C 1): each module's
    sum over its rows divided by its own row count, so the conv's 4 locations count as one image."""
    conv = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]).view(2, 2, 2, 1)  # sum 3 over 8 rows
    fc = torch.tensor([[0.2], [0.6]])  # sum 0.8 over 2 rows
    assert importance_minimality_loss({"conv": conv, "fc": fc}, 1.0).item() == pytest.approx(3 / 8 + 0.8 / 2)


def test_conv_generic_metrics_and_routed_layerwise_loss():
    torch.manual_seed(0)
    model = ComponentModel(ConvNet(3, 2, 1), {"conv*": 6, "fc": 3}, {}, "mlp", [4])
    x = torch.randn(4, 3, 8, 8)
    cfg = SPDConfig(modules={"conv*": 6, "fc": 3}, ci_threshold=0.0)
    metrics = evaluate(model, cfg, x, lambda out: out)
    ci = model.ci_of(x)
    # L0 of a conv: mean active subcomponents per output location, like per token in an LM
    assert metrics["l0/conv1"] == pytest.approx((ci["conv1"] > 0).sum(-1).float().mean().item())
    assert metrics["n_alive/conv1"] == int((ci["conv1"] > 0).flatten(0, 2).any(0).sum())
    masks = {n: torch.ones_like(g) for n, g in ci.items()}
    deltas = {n: torch.ones(g.shape[:-1]) for n, g in ci.items()}
    route = torch.tensor([0, 1, 2, 0])  # one module per image: the masks' first axis is the batch for a conv too
    loss = layerwise_recon_loss(StepBatch.of(model, x, lambda out: out, "mse"), masks, deltas, route=route)
    assert loss.item() < 1e-10  # masks 1 + delta on each image's module: the target


# ------------------------------------------------------------------------------------------------
# The shapes experiment: data, the atomic-vs-combination metric by hand, the script end to end
# ------------------------------------------------------------------------------------------------
def test_shapes_are_drawn_as_labelled():
    x, y = shapes_batch(300, torch.Generator().manual_seed(0))  # no noise: pixels are exactly 0 or a colour
    on = x.sum(1) > 0  # (N, SIDE, SIDE) pixels of the shape
    assert torch.equal(x.sum((2, 3)).argmax(1), y[:, 1])  # all the ink is in the labelled colour channel
    area = on.sum((1, 2)).float()
    for shape in range(3):  # each size is larger than the one below, for every shape
        means = [area[(y[:, 0] == shape) & (y[:, 2] == size)].mean() for size in range(3)]
        assert means[0] < means[1] < means[2], (shape, means)
    # the same size: a square fills its bounding box, a circle pi/4 of it, a triangle half of it
    box = on.any(1).sum(1) * on.any(2).sum(1)
    fill = {s: (area / box)[y[:, 0] == s].mean().item() for s in range(3)}
    assert fill[1] > 0.95 and 0.7 < fill[0] < 0.85 and 0.4 < fill[2] < 0.62, fill
    again = [shapes_batch(5, torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert torch.equal(*again)  # a pure function of the generator's seed


def test_product_sets_and_their_descriptions():
    sets = product_sets()
    assert sets.shape == (343, 3, 3) and sets.any(-1).all()  # every attribute allows some value
    assert len({tuple(s.flatten().tolist()) for s in sets}) == 343
    s = torch.ones(3, 3, dtype=torch.bool)
    assert describe(s) == ("any image", 0)
    s[1] = torch.tensor([True, False, False])
    assert describe(s) == ("colour=red", 1)
    s[0] = torch.tensor([False, True, True])
    assert describe(s) == ("shape!=circle & colour=red", 2)
    assert kind(1, 0.9, 0.7) == "atomic" and kind(2, 0.9, 0.7) == "combination" and kind(0, 0.9, 0.7) == "dense"
    assert kind(1, 0.5, 0.7) == "unexplained"


def test_best_product_set_finds_atomic_and_combination_firing():
    labels = torch.tensor([[s, c, z] for s in range(3) for c in range(3) for z in range(3)])  # all 27 once
    red = labels[:, 1] == 0
    red_circle = red & (labels[:, 0] == 0)
    noisy_red = red.clone()
    noisy_red[labels.tolist().index([1, 1, 1])] = True  # one green square too: F1 = 2*9 / (10 + 9)
    best, f1 = best_product_set(torch.stack([red, red_circle, noisy_red, torch.ones(27, dtype=torch.bool)], 1), labels)
    sets = product_sets()
    assert [describe(sets[i]) for i in best.tolist()] == [("colour=red", 1), ("shape=circle & colour=red", 2),
                                                          ("colour=red", 1), ("any image", 0)]
    assert f1.tolist() == pytest.approx([1.0, 1.0, 18 / 19, 1.0])


def test_mutual_information_by_hand():
    labels = torch.tensor([[s, c, z] for s in range(3) for c in range(3) for z in range(3)])
    red = (labels[:, 1] == 0)[:, None]
    # firing = "colour is red": I = H(fires) = H(1/3) bits with colour, 0 with shape and size
    h = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    assert mutual_information(red, labels)[0].tolist() == pytest.approx([0.0, h, 0.0], abs=1e-6)
    ci = red.float() * 0.8  # mean CI 0.8 over red images, 0 over the others
    per_value = mean_ci_per_value(ci, labels)[:, 0]
    assert per_value.tolist() == pytest.approx([0.8 / 3] * 3 + [0.8, 0, 0] + [0.8 / 3] * 3)


def test_attribute_analysis_and_figures_on_an_untrained_cnn(tmp_path):
    """In process, on a small untrained CNN: every alive subcomponent is classified once, and the three
    figures are drawn (the script end to end, and the analysis tools on its run dir: the slow tests below)."""
    torch.manual_seed(0)
    target = ShapesCNN(4, 8, 8)
    cfg = ShapesConfig(target=ShapesTargetConfig(c1=4, c2=8, d_hidden=8),
                       spd=SPDConfig(modules={"conv*": 4, "fc*": 4}, ci_threshold=0.0))
    model = ComponentModel.from_config(target, cfg.spd)
    x, y = shapes_batch(54, torch.Generator().manual_seed(0))
    out, fig = attribute_analysis(model, cfg, x, y)
    n_alive = sum(len(idx) for idx in fig["alive"].values())
    assert n_alive > 0 and len(out["components"]) == n_alive
    assert sum(out[f"n_{k}"] for k in ("atomic", "combination", "dense", "unexplained")) == n_alive
    assert all(g.shape == (54, 4) for g in fig["ci"].values())  # per image: conv CI reduced over locations
    conv = {k: v for k, v in out["components"].items() if k.startswith("conv")}
    assert conv and all(0 < v["coverage"] <= 1 and 0 <= v["spread"] <= 1 for v in conv.values())  # alive: fires
    assert not any("coverage" in v for k, v in out["components"].items() if k.startswith("fc"))
    assert out["n_dense_conv"] == sum(v["kind"] == "dense" for v in conv.values()) >= out["n_dense_conv_local"]
    plot_ci_per_value(fig["ci"], fig["alive"], y, tmp_path / "a.png")
    plot_top_images(x, fig["ci"], fig["share"], fig["alive"], out["components"], 2, 3, tmp_path / "b.png")
    plot_filters(model.components["conv1"].V, (4, 4), fig["alive"]["conv1"], out["components"], tmp_path / "c.png")
    assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in "abc")


def test_causal_ablation_from_a_conv_to_a_linear_layer_compares_images():
    torch.manual_seed(0)
    model = ComponentModel(ShapesCNN(4, 8, 8), {"conv3": 4, "fc1": 4}, {}, "mlp", [4])
    x, _ = shapes_batch(12, torch.Generator().manual_seed(1))
    results = ablate_pair(model, lambda out: out, x, "conv3", "fc1", threshold=0.0, min_density=0.0, min_effect=0.0)
    ci = model.per_input(model.ci_of(x))["conv3"]  # (12, 4): the max over conv3's 4 x 4 locations
    fired = {f"conv3:{c}": int((ci[:, c] > 0).sum()) for c in range(4) if (ci[:, c] > 0).any()}
    assert {r["component"]: r["n_inputs"] for r in results} == fired  # counted in images, not locations
    assert all(len(r["edges"]) == 4 for r in results)  # min_effect 0: an edge to every fc1 subcomponent


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A 20-step shapes run on a briefly trained target, in a tmp dir."""
    tmp = tmp_path_factory.mktemp("shapes")
    overrides = ["spd.steps=20", "spd.eval_every=10", "spd.faithfulness_warmup_steps=5", "spd.batch_size=8",
                 "spd.eval_batch_size=48", "n_images=96", "target.steps=60", "target.batch_size=32",
                 "target.min_accuracy=0", f"target.path={tmp / 'target.pt'}"]
    proc = run([ROOT / "shapes_decomposition.py", ROOT / "configs/shapes.yaml", *overrides, "--out", tmp / "run"], tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())


@pytest.mark.slow
def test_short_shapes_run_writes_the_metric_and_figures(shapes_run):
    tmp, results = shapes_run
    for a in ("shape", "colour", "size"):
        assert 0 <= results[f"acc_target/{a}"] <= 1 and 0 <= results[f"acc_ci_masked/{a}"] <= 1
    counts = [results[f"n_{k}"] for k in ("atomic", "combination", "dense", "unexplained")]
    assert sum(counts) == len(results["components"]) > 0  # every alive subcomponent (on the n_images) once
    assert {name.split(":")[0] for name in results["components"]} <= {"conv1", "conv2", "conv3", "fc1", "fc2"}
    assert all(c["kind"] in ("atomic", "combination", "dense", "unexplained") for c in results["components"].values())
    for name in ("ci_per_attribute_value.png", "top_images.png", "conv1_filters.png"):
        assert (tmp / "run/figures" / name).stat().st_size > 0, name


@pytest.mark.slow
def test_analysis_tools_run_on_a_conv_run(shapes_run):
    """harvest, report, clustering and causal on a run whose conv modules' CI has spatial axes: per image."""
    tmp, _ = shapes_run
    for script, args, last in (("report.py", [], "report.html"),
                               ("clustering.py", ["--min-density", "0"], "clusters.json"),
                               ("causal.py", ["--layers", "conv3", "fc1", "--n-batches", "1"], "causal.json")):
        proc = run([ROOT / "analysis" / script, tmp / "run", *args], tmp)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == str(tmp / "run/analysis" / last)
    h = json.loads((tmp / "run/analysis/harvest.json").read_text())
    assert h["n_examples"] == 4 * 48  # images, not output locations: the conv modules count per image
    report = (tmp / "run/analysis/report.html").read_text()
    assert "<h3>conv1</h3>" in report and all(f'alt="{n} location maps"' in report for n in ("conv1", "conv2", "conv3"))
    assert set(h["modules"]["conv1"]["locations"]["density"]) == set(map(str, h["modules"]["conv1"]["alive"]))
    clusters = json.loads((tmp / "run/analysis/clusters.json").read_text())
    assert clusters["n_inputs"] == 4 * 48
    causal = json.loads((tmp / "run/analysis/causal.json").read_text())
    assert list(causal["pairs"]) == ["conv3 -> fc1"] and causal["n_inputs"] == 48
    if shutil.which("chromium"):  # the report renders, conv modules' sections included
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                              (tmp / "run/analysis/report.html").as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        assert all(f"<h3>{n}</h3>" in dom for n in ("conv1", "conv2", "conv3", "fc1", "fc2"))
