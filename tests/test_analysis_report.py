"""analysis/harvest.py and analysis/report.py: harvest statistics against a hand computation on a short
TMS run, the HTML report rendered in headless Chromium, bad input, and the LM-only parts on hand-made inputs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch

from analysis.harvest import context_window, location_counts, locality, merge_top_k, next_token_effects
from analysis.report import SECTIONS, components_html
from spd_common import ComponentModel
from spd_run import load_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV,
                          timeout=300)


@pytest.fixture(scope="module")
def tms_run(tmp_path_factory):
    """A 60-step TMS 5-2 run on a tiny target, its harvest (2 batches) and its report, all in a tmp dir."""
    tmp = tmp_path_factory.mktemp("tms")
    overrides = ["spd.steps=60", "spd.eval_every=30", "spd.faithfulness_warmup_steps=20", "spd.eval_batch_size=512",
                 "target.steps=300", f"target.path={tmp / 'target.pt'}", "target.min_column_norm=0"]
    proc = run([ROOT / "tms_decomposition.py", ROOT / "configs/tms_5-2.yaml", *overrides, "--out", tmp / "run"], tmp)
    assert proc.returncode == 0, proc.stderr
    proc = run([ROOT / "analysis/harvest.py", tmp / "run", "--batches", "2"], tmp)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp / "run/analysis/harvest.json")
    proc = run([ROOT / "analysis/report.py", tmp / "run", "--out", tmp / "out"], tmp)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp / "out/report.html")
    return tmp


def test_harvest_matches_hand_computation(tms_run):
    h = json.loads((tms_run / "run/analysis/harvest.json").read_text())
    cfg, exp = load_run(tms_run / "run")
    model = exp.model
    cis = [model.ci_of(exp.eval_batch(i)) for i in range(2)]
    assert h["lm"] is False and h["n_batches"] == 2 and h["n_examples"] == 2 * 512
    assert h["checkpoint"] == "final.pt" and h["ci_threshold"] == cfg.spd.ci_threshold
    assert list(h["modules"]) == model.names == ["linear1", "linear2"]
    for name, m in h["modules"].items():
        g = torch.cat([ci[name] for ci in cis])  # (examples, C)
        assert m["C"] == model.C[name] == len(m["density"]) == len(m["mean_ci"]) == len(m["weight_norm"])
        density = (g > cfg.spd.ci_threshold).float().mean(0)
        assert torch.allclose(torch.tensor(m["density"]), density)
        assert torch.allclose(torch.tensor(m["mean_ci"]), g.clamp(0, 1).mean(0), atol=1e-6)
        U, V = model.decomposed[name].components.factors()
        assert torch.allclose(torch.tensor(m["weight_norm"]), U.norm(dim=0) * V.norm(dim=1))
        assert sorted(m["alive"]) == density.nonzero().flatten().tolist()
        assert [density[c] for c in m["alive"]] == sorted((density[c] for c in m["alive"]), reverse=True)
        assert "lm" not in m
    # linear2 shares linear1's (transposed) components: same weight norms
    assert h["modules"]["linear1"]["weight_norm"] == h["modules"]["linear2"]["weight_norm"]


def test_report_is_self_contained(tms_run):
    html = (tms_run / "out/report.html").read_text()
    assert (tms_run / "out/harvest.json").is_file()  # the report harvested first: there was none in --out
    for s in SECTIONS:
        assert f"<h2>{s}</h2>" in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    n_figures = len(list((tms_run / "run/figures").glob("*.png")))
    assert html.count('src="data:image/png;base64,') == n_figures + 1  # + the training curves
    assert "ci_per_feature.png" in html and "mmcs" in html and "linear1" in html
    # it opens with the summary (headline metrics, the per-module table) and ends with the folded config
    assert SECTIONS[0] == "Summary" and SECTIONS[-1] == "Config"
    results = json.loads((tms_run / "run/results.json").read_text())
    summary = html[html.index("<h2>Summary</h2>"):html.index("<h2>Training curves</h2>")]
    assert f"<th>mmcs</th><td class='num'>{results['mmcs']:.4g}</td>" in summary
    assert "<td>linear1</td><td class='num'>20</td>" in summary and "<th>l0</th>" in summary
    assert f"<td class='num'>{results['l0/linear1']:.4g}</td>" in summary  # L0 per module
    assert "<details><summary>config.yaml</summary>" in html[html.index("<h2>Config</h2>"):]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_report_renders_in_chromium(tms_run):
    html = tms_run / "out/report.html"
    shot = tms_run / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    proc = subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1400,3000", html.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr
    assert "CONSOLE" not in proc.stderr and "Uncaught" not in proc.stderr  # no page (script) errors
    pixels = matplotlib.image.imread(shot)[..., :3]  # (height, width, RGB) in [0, 1]
    assert (pixels.min(-1) < 0.9).mean() > 0.05  # text, tables and figures: not a blank page
    dom = subprocess.run(["chromium", *flags[:4], "--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    for s in SECTIONS:
        assert f"<h2>{s}</h2>" in dom
    assert dom.count("<img") == html.read_text().count("<img") and "<h3>linear1</h3>" in dom


def test_bad_run_dir_is_one_line(tmp_path):
    for script in ("report.py", "harvest.py"):
        proc = run([ROOT / "analysis" / script, tmp_path], tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "not a run dir (no config.yaml)" in proc.stderr
    (tmp_path / "config.yaml").write_text((ROOT / "configs/tms_5-2.yaml").read_text())
    proc = run([ROOT / "analysis/harvest.py", tmp_path], tmp_path)
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr and proc.stderr.count("\n") == 1


class CharTokenizer:
    """Decodes token id t as chr(97 + t): 0 -> 'a'."""

    def decode(self, ids):
        return "".join(chr(97 + t) for t in ids)


def test_context_window_marks_the_firing_token():
    tokens = torch.arange(20)
    assert context_window(tokens, 12, CharTokenizer(), before=3, after=2) == (list("jklmno"), 3)
    assert context_window(tokens, 1, CharTokenizer(), before=3, after=2) == (list("abcd"), 1)  # clipped at the start
    assert context_window(tokens, 19, CharTokenizer(), before=2, after=4) == (list("rst"), 2)  # and at the end


def test_merge_top_k_over_batches():
    a, b = torch.tensor([[0.1, 0.9], [0.5, 0.2]]), torch.tensor([[0.7, 0.3], [0.0, 0.8]])  # (rows, C)
    best = merge_top_k(None, a, torch.tensor([[0, 0], [1, 1]]), k=2)
    values, index = merge_top_k(best, b, torch.tensor([[2, 2], [3, 3]]), k=2)
    assert torch.equal(values, torch.tensor([[0.7, 0.9], [0.5, 0.8]])) and index.tolist() == [[2, 0], [1, 3]]


def test_conv_location_maps_and_locality_by_hand():
    """4 images, 2 x 2 locations, threshold 0.1. c0 is global: CI 0.8 everywhere on images 0-2, 0 on image 3.
    c1 is local: CI 0.5 at (0, 0) on images 0 and 1, 2.0 (clipped to 1) at (1, 1) on image 2, and 0.05 (below
    the threshold) at (0, 1) on image 3."""
    ci = torch.zeros(4, 2, 2, 2)
    ci[:3, :, :, 0] = 0.8
    ci[0, 0, 0, 1] = ci[1, 0, 0, 1] = 0.5
    ci[2, 1, 1, 1] = 2.0
    ci[3, 0, 1, 1] = 0.05
    ci_sum, fired_at = location_counts(ci, 0.1)
    assert (ci_sum[..., 0] / 4).flatten().tolist() == pytest.approx([0.6] * 4)
    assert (ci_sum[..., 1] / 4).flatten().tolist() == pytest.approx([0.25, 0.0125, 0.0, 0.25])  # (0, 0), (0, 1), ...
    assert fired_at[..., 0].tolist() == [[3, 3], [3, 3]] and fired_at[..., 1].tolist() == [[2, 0], [0, 1]]
    fired = (ci.amax((1, 2)) > 0.1).sum(0).float()  # images where each fires somewhere: 3 and 3
    coverage, spread = locality(fired_at, fired, 4)
    # c0: 12 firings over 3 images of 4 locations; c1: 3 firings over 3 images, one location each
    assert coverage.tolist() == pytest.approx([1.0, 0.25])
    # a location counts once c fires there on >= 5% of 4 images, i.e. on one: c1 at (0, 0) and (1, 1)
    assert spread.tolist() == [1.0, 0.5]


def test_report_shows_a_conv_modules_location_maps():
    """A hand-made harvest: conv1 (2 x 2 locations) with the two subcomponents above, and a linear fc."""
    loc = {"shape": [2, 2], "coverage": [1.0, 0.25], "spread": [1.0, 0.5],
           "mean_ci": {"0": [[0.6, 0.6], [0.6, 0.6]], "1": [[0.25, 0.0125], [0.0, 0.25]]},
           "density": {"0": [[0.75, 0.75], [0.75, 0.75]], "1": [[0.5, 0.0], [0.0, 0.25]]}}
    stats = {"density": [0.75, 0.75], "mean_ci": [0.6, 0.13], "weight_norm": [1.0, 2.0], "alive": [0, 1]}
    h = {"n_examples": 4, "n_batches": 1, "checkpoint": "step_10.pt", "ci_threshold": 0.1, "lm": False,
         "modules": {"conv1": {"C": 2, **stats, "locations": loc}, "fc": {"C": 2, **stats}}}
    html = components_html(h)
    assert html.count('alt="conv1 location maps" src="data:image/png;base64,') == 1
    assert "location maps" not in html.split("<h3>fc</h3>")[1]  # a linear module has no locations
    assert html.count("<th>coverage</th><th>spread</th>") == 1  # conv1's table alone
    assert '<td class="num">0.250</td><td class="num">0.500</td>' in html  # c1: local, in half the locations


def test_next_token_effects_on_a_tiny_llama():
    """The cached one-token reruns equal ablating c at each firing position alone in a whole forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    name = "model.layers.0.mlp.down_proj"
    model = ComponentModel(target.eval(), {name: 4}, {}, "mlp", [4])
    x = torch.randint(0, 30, (2, 6))
    ci = torch.rand(2, 6, 4) * 0.8 + 0.2
    ci[..., 1] = 0.0  # never fires
    ci[0, :3, 2] = 0.0  # fires at 9 of 12 positions
    with torch.no_grad():
        model.decomposed[name].components.U[:, 3] = 0  # fires, but writes nothing
    logits = lambda out: out.logits  # noqa: E731
    effects = next_token_effects(model, logits, x, name, ci, [0, 1, 2, 3], 0.1, chunk=5)
    assert sorted(effects) == [0, 2, 3]
    assert effects[0][1] == 12 and effects[2][1] == 9
    for total, _ in effects.values():
        assert total.shape == (30,) and abs(total.sum()) < 1e-5  # probability changes sum to 0
    assert effects[0][0].abs().max() > 1e-4 and effects[3][0].abs().max() < 1e-6

    def ablated_alone(c: int, b: int, p: int) -> torch.Tensor:  # the definition, by whole forwards
        delta = {name: torch.ones(2, 6)}
        with torch.no_grad(), model.masked({name: ci}, delta):
            base = model(x).logits[b, p].softmax(-1)
        ablated = ci.clone()
        ablated[b, p, c] = 0.0
        with torch.no_grad(), model.masked({name: ablated}, delta):
            return model(x).logits[b, p].softmax(-1) - base

    for c in (0, 2):
        expected = sum(ablated_alone(c, b, p) for b, p in (ci[..., c] > 0.1).nonzero().tolist())
        assert torch.allclose(effects[c][0], expected, atol=1e-6)
    capped = next_token_effects(model, logits, x, name, ci, [0], 0.1, per_component=3)
    top3 = ci[..., 0].flatten().topk(3).indices.tolist()  # its three highest-CI positions
    assert capped[0][1] == 3
    assert torch.allclose(capped[0][0], sum(ablated_alone(0, i // 6, i % 6) for i in top3), atol=1e-6)
