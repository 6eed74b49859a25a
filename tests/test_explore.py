"""analysis/explore.py on a tiny Llama run: its JSON endpoints against the harvest and a direct forward
pass, and the page rendered in headless Chromium (component table, a component page, a prompt's tokens)."""

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from urllib.parse import quote

import matplotlib.image
import pytest
import torch

from analysis.explore import input_kind, serve, show_input
from spd_run import load_run


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


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not on PATH (Debian: apt-get install chromium; .ci/run installs it)")
def test_pages_render_in_chromium(tiny_lm_run, explorer, tmp_path):
    url, _ = explorer
    top = max(get(url + "api/components"), key=lambda r: r["density"])
    views = {"table": ("#/", ['id="components"', 'class="row"']),
             "component": (f"#/c/{top['module']}/{top['c']}", ['id="contexts"', 'class="tok fire"', 'id="promotes"']),
             "prompt": ("#/prompt/" + quote("Once upon a time there was a cat."), ['id="per-token"', 'class="chip"'])}
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000",
             "--window-size=1400,900"]
    for name, (route, needles) in views.items():
        shot = tmp_path / f"explore_{name}.png"
        proc = subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--dump-dom", url + route],
                              capture_output=True, text=True, timeout=120)
        dom = proc.stdout
        for needle in needles:
            assert needle in dom.split("<script")[0], (name, needle)
        page = dom.split("<script")[0]  # what the script drew, not its source
        assert 'id="main">loading' not in page and 'class="err"' not in page, name
        pixels = matplotlib.image.imread(shot)[..., :3]  # (height, width, RGB) in [0, 1]
        assert (pixels.min(-1) < 0.9).mean() > 0.03, name  # text and shading: not a blank page
    r = get(url + "api/prompt", {"text": "Once upon a time there was a cat."})
    assert page.count("<tr>") == 1 + len(r["tokens"])  # header + one row per token
    assert page.count('class="chip"') == sum(len(f) for f in r["firing"])  # one chip per firing component
