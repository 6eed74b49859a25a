"""analysis/explore.py on a tiny Llama run: its JSON endpoints against the harvest and a direct forward
pass, and the page rendered in headless Chromium (component table, a component page, a prompt's tokens);
on a short shapes run: a conv subcomponent's page, its location maps and top images."""

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import matplotlib.image
import pytest
import torch

from analysis.explore import input_kind, serve, show_input
from spd_run import load_run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=10000", "--window-size=1400,900"]
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="chromium is not on PATH (Debian: apt-get install chromium; .ci/run installs it)")


@pytest.fixture(scope="module")
def explorer(tiny_lm_run):
    server, url = serve(tiny_lm_run, tiny_lm_run / "analysis", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield url, server
    server.shutdown()
    server.server_close()


def get(url, body=None):
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def render(url, shot):
    """The page at url as headless Chromium draws it: its DOM up to the script (what the script drew, not its
    source), after checking that it loaded without error and that the screenshot is not blank."""
    proc = subprocess.run([*CHROMIUM, f"--screenshot={shot}", "--dump-dom", url], capture_output=True, text=True,
                          timeout=120)
    page = proc.stdout.split("<script")[0]
    assert 'id="main">loading' not in page and 'class="err"' not in page, url
    pixels = matplotlib.image.imread(shot)[..., :3]  # (height, width, RGB) in [0, 1]
    assert (pixels.min(-1) < 0.9).mean() > 0.03, url  # text and shading: not a blank page
    return page


def test_endpoints_serve_the_harvest_and_run_the_model(tiny_lm_run, explorer):
    url, _ = explorer
    h = json.loads((tiny_lm_run / "analysis/harvest.json").read_text())
    rows = get(url + "api/components")
    assert {(r["module"], r["c"]) for r in rows} == {(n, c) for n, m in h["modules"].items() for c in m["alive"]}
    assert len(rows) > 0 and all(r["label"] is None for r in rows)  # no autointerp.json yet
    top = max(rows, key=lambda r: r["density"])
    d = get(url + f"api/component?module={top['module']}&c={top['c']}")
    assert d["density"] == h["modules"][top["module"]]["density"][top["c"]]
    assert d["contexts"] and d["promotes"] and d["suppresses"]
    for ctx in d["contexts"]:  # each token's CI, and the firing one is the context's own CI
        assert len(ctx["token_ci"]) == len(ctx["tokens"]) and abs(ctx["token_ci"][ctx["pos"]] - ctx["ci"]) < 1e-3

    _, exp = load_run(tiny_lm_run)
    text = "Once upon a time there was a cat."
    r = get(url + "api/prompt", {"text": text})
    ids = exp.tokenizer(text)["input_ids"]
    assert r["tokens"] == [exp.tokenizer.decode([t]) for t in ids]
    with torch.no_grad():
        ci = exp.model.ci_of(torch.tensor([ids]))
    threshold = h["ci_threshold"]
    for t in range(len(ids)):  # per token: exactly the components above the threshold, with their CI
        want = {(n, c): g[0, t, c].item() for n, g in ci.items() for c in range(g.shape[-1]) if g[0, t, c] > threshold}
        got = {(e["module"], e["c"]): e["ci"] for e in r["firing"][t]}
        assert got.keys() == want.keys() and all(abs(got[k] - min(want[k], 1)) < 1e-3 for k in want)
        assert [e["ci"] for e in r["firing"][t]] == sorted((e["ci"] for e in r["firing"][t]), reverse=True)

    for bad in (f"api/component?module={top['module']}&c=999", "api/component?module=nope&c=0"):
        with pytest.raises(urllib.error.HTTPError) as e:
            get(url + bad)
        assert e.value.code == 400 and "no component" in json.load(e.value)["error"]
    with pytest.raises(urllib.error.HTTPError) as e:
        get(url + "api/prompt", {"text": "  "})
    assert e.value.code == 400 and json.load(e.value)["error"] == "empty prompt"


def test_toy_inputs_are_shown_as_features_or_pixels():
    assert input_kind(torch.zeros(4, 5), None) == "vector" and input_kind(torch.zeros(4, 7, dtype=torch.long), None) == "tokens"
    assert input_kind(torch.zeros(2, 1, 8, 8), None) == "image" and input_kind({"x": 1}, None) == "other"
    assert input_kind(torch.zeros(4, 7, dtype=torch.long), object()) == "text"
    x = torch.tensor([0.0, 0.5, 0.0, -0.9, 0.0])
    assert show_input(x, dense=False) == {"entries": [[3, -0.9], [1, 0.5]]}  # largest magnitude first
    img = show_input(torch.arange(16.0), dense=True)["pixels"]  # a dense square vector: a 4x4 image in [0, 1]
    assert len(img) == 4 and img[0][0] == 0.0 and img[3][3] == 1.0 and img[1][0] == pytest.approx(4 / 15, abs=1e-3)
    x = torch.zeros(3, 2, 2)  # RGB: a red pixel at (0, 0), half-bright blue at (1, 1)
    x[0, 0, 0], x[2, 1, 1] = 2.0, 1.0
    assert show_input(x, dense=True) == {"rgb": [[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.5]]]}


@needs_chromium
def test_pages_render_in_chromium(tiny_lm_run, explorer, tmp_path):
    url, _ = explorer
    top = max(get(url + "api/components"), key=lambda r: r["density"])
    views = {"table": ("#/", ['id="components"', 'class="row"']),
             "component": (f"#/c/{top['module']}/{top['c']}", ['id="contexts"', 'class="tok fire"', 'id="promotes"']),
             "prompt": ("#/prompt/" + quote("Once upon a time there was a cat."), ['id="per-token"', 'class="chip"'])}
    for name, (route, needles) in views.items():
        page = render(url + route, tmp_path / f"explore_{name}.png")
        for needle in needles:
            assert needle in page, (name, needle)
    r = get(url + "api/prompt", {"text": "Once upon a time there was a cat."})
    assert page.count("<tr>") == 1 + len(r["tokens"])  # header + one row per token
    assert page.count('class="chip"') == sum(len(f) for f in r["firing"])  # one chip per firing component


@pytest.fixture(scope="module")
def shapes_explorer(tmp_path_factory):
    """A 20-step shapes run on a briefly trained target (in this process), its harvest (2 batches of 24
    images) and its explorer."""
    import shapes_decomposition
    from analysis.harvest import harvest
    from spd_common import optimize
    from spd_run import parse_cli

    tmp = tmp_path_factory.mktemp("shapes")
    cfg, run_dir = parse_cli(shapes_decomposition.ShapesConfig, "shapes", [
        str(ROOT / "configs/shapes.yaml"), "spd.steps=20", "spd.eval_every=10", "spd.faithfulness_warmup_steps=5",
        "spd.batch_size=8", "spd.eval_batch_size=24", "spd.threads=1", "target.steps=60", "target.batch_size=32",
        "target.min_accuracy=0", f"target.path={tmp / 'target.pt'}", "--out", str(tmp / "run")])
    exp = shapes_decomposition.build(cfg)
    optimize(exp.model, cfg.spd, exp.train_batch, exp.eval_batch, run_dir)
    harvest(run_dir, run_dir / "analysis", n_batches=2)
    server, url = serve(run_dir, run_dir / "analysis", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield url, run_dir
    server.shutdown()
    server.server_close()


def conv_component(url):
    """The densest alive subcomponent of conv2 (8 x 8 locations)."""
    return max((r for r in get(url + "api/components") if r["module"] == "conv2"), key=lambda r: r["density"])


def test_conv_component_serves_its_location_maps_and_top_images(shapes_explorer):
    url, run_dir = shapes_explorer
    top = conv_component(url)
    d = get(url + f"api/component?module=conv2&c={top['c']}")
    loc = json.loads((run_dir / "analysis/harvest.json").read_text())["modules"]["conv2"]["locations"]
    assert loc["shape"] == [8, 8] and d["locations"]["density"] == loc["density"][str(top["c"])]
    assert d["locations"]["coverage"] == loc["coverage"][top["c"]]
    _, exp = load_run(run_dir)
    x = torch.cat([exp.eval_batch(i) for i in range(2)])  # the 48 harvested images
    with torch.no_grad():
        ci = exp.model.ci_of(x)["conv2"][..., top["c"]].clamp(0, 1)  # (48, 8, 8)
    best = ci.amax((1, 2))
    assert [e["ci"] for e in d["examples"]] == pytest.approx(best.sort(descending=True).values[:len(d["examples"])]
                                                             .tolist(), abs=1e-4)  # ranked per image, not location
    assert len(d["examples"]) == min(12, int((best > 0.1).sum()))
    for e in d["examples"]:  # the image in colour, and c's CI at each of its locations
        assert len(e["rgb"]) == 32 and len(e["rgb"][0]) == 32 and len(e["rgb"][0][0]) == 3 and e["pos"] is None
        assert torch.tensor(e["map"]) == pytest.approx(ci[e["input"]], abs=1e-3)
        assert max(map(max, e["map"])) == pytest.approx(e["ci"], abs=1e-3)


@needs_chromium
def test_conv_component_page_renders_in_chromium(shapes_explorer, tmp_path):
    url, _ = shapes_explorer
    top = conv_component(url)
    d = get(url + f"api/component?module=conv2&c={top['c']}")
    page = render(url + f"#/c/conv2/{top['c']}", tmp_path / "conv.png")
    assert 'id="locations"' in page and "Where it fires" in page
    n = len(d["examples"])
    assert n > 0 and page.count('<img class="px" src="data:image/png;base64,') == n  # the top images
    assert page.count('<img class="map" src="data:image/png;base64,') == 2 + n  # 2 maps + one per image
