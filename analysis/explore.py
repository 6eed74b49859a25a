"""A local web app for browsing a decomposition's components: a table, a page per component, and a prompt box.

    python analysis/explore.py RUN_DIR [--port 8000] [--out DIR]

Serves http://127.0.0.1:PORT/ (this machine only) until Ctrl-C; open it in any browser. One page with inline
CSS and JS: no build step, no CDN, no network. The standard library's HTTP server is enough for one user
and a handful of JSON endpoints, so there is no web framework to install.

  - Components: every alive subcomponent (fired on the harvested batches) with its module, firing density,
    mean CI, weight norm and, when analysis/autointerp.py has run, its label and detection score;
    searchable (module, index or label) and sortable by any column.
  - A component's page: for language models its top activating contexts from harvest.json, each token
    coloured by the component's CI on it, and the next tokens it promotes and suppresses. For other
    experiments the top activating held-out inputs (token ids, the non-zero features of a sparse vector, or
    an image), and for vector inputs the CI it gets on each one-hot input.
  - Prompt: type a text (LMs), token ids (other sequence models), `3 7:0.5` (feature 3 at 1, feature 7 at
    0.5) or `#k` (the k-th harvested input); the decomposed model runs on the server and the page shows,
    per token, the components with CI > spd.ci_threshold. A link `URL#/prompt/TEXT` runs TEXT on opening.

Reads OUT/harvest.json (OUT defaults to RUN_DIR/analysis), harvesting first when it is missing or older than
the newest checkpoint, and OUT/autointerp.json when present. `--port 0` picks a free port.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from analysis.autointerp import load_labels  # noqa: E402
from analysis.harvest import CONTEXT_AFTER, CONTEXT_BEFORE, harvested  # noqa: E402
from spd_config import SPDError  # noqa: E402
from spd_run import load_run, run_main  # noqa: E402

TOP_K = 12  # top activating inputs per component (non-LM experiments; LMs show harvest.json's)
MAX_PROMPT_TOKENS = 512
MAX_ONE_HOT = 4096  # vector inputs up to this width also get the one-hot sweep


class IdTokens:
    """Stands in for a tokenizer where the inputs are token ids without one (e.g. the induction-head task)."""

    def decode(self, ids: list[int]) -> str:
        return f"{ids[0]} "


def input_kind(x: Any, tokenizer: Any) -> str:
    """text (an LM with a tokenizer), tokens (integer ids), vector (batch, d), image (batch, ch, h, w), other."""
    if tokenizer is not None:
        return "text"
    if not isinstance(x, Tensor):
        return "other"
    if not x.is_floating_point():
        return "tokens" if x.dim() == 2 else "other"
    return {2: "vector", 4: "image"}.get(x.dim(), "other")


def show_input(x: Tensor, dense: bool) -> dict:
    """One input as the page draws it: the pixels of an image (or of a dense square vector, e.g. 8x8 digits),
    else a vector's largest non-zero entries [[index, value]]."""
    if x.dim() == 3:  # (channels, h, w): drawn in grey, channels averaged
        x = x.float().mean(0)
    elif dense and math.isqrt(x.numel()) ** 2 == x.numel():
        x = x.reshape(math.isqrt(x.numel()), -1)
    if x.dim() == 2:
        lo, hi = x.min().item(), x.max().item()
        return {"pixels": [[round(v, 3) for v in row] for row in ((x - lo) / max(hi - lo, 1e-9)).tolist()]}
    nz = x.nonzero().flatten()
    nz = nz[x[nz].abs().argsort(descending=True)][:16]
    return {"entries": [[int(i), round(float(x[i]), 3)] for i in nz]}


class Explorer:
    """The run, its harvest and labels, and what the endpoints compute from them."""

    def __init__(self, run_dir: Path, out: Path):
        self.cfg, self.exp = load_run(run_dir)
        self.h = harvested(run_dir, out, (self.cfg, self.exp))
        self.out, self.run_dir = out, run_dir
        self._labels: tuple[float, dict] = (-1.0, {})  # (mtime, labels) of out/autointerp.json
        self.model = self.exp.model.eval()
        self.device = next(self.model.parameters()).device
        self.threshold = self.h["ci_threshold"]
        self.lock = threading.Lock()  # one forward pass at a time; the server answers on several threads
        self.xs = [self.exp.input_fn(self.exp.eval_batch(i)) for i in range(self.h["n_batches"])]
        self.kind = input_kind(self.xs[0], self.exp.tokenizer)
        self.top: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # module -> top (values, rows) (K, C), rows' CI
        self.one_hot: dict[str, Tensor] = {}  # module -> CI on each one-hot input (d, C)
        if self.kind in ("tokens", "vector", "image"):
            self.inputs_and_tops()

    @torch.no_grad()
    def inputs_and_tops(self) -> None:
        """Top activating held-out inputs per component (the harvested batches), and the one-hot sweep."""
        cis = [self.model.ci_of(x) for x in self.xs]
        self.X = torch.cat(self.xs).cpu()
        self.dense = bool((self.X != 0).float().mean() > 0.25)
        for n in self.model.names:
            rows = torch.cat([ci[n].flatten(0, -2) for ci in cis]).float().clamp(0, 1).cpu()  # (rows, C)
            top = rows.topk(min(TOP_K, rows.shape[0]), dim=0)
            self.top[n] = (top.values, top.indices, rows)
        if self.kind == "vector" and self.X.shape[1] <= MAX_ONE_HOT:
            eye = torch.eye(self.X.shape[1], device=self.device)
            self.one_hot = {n: g.float().clamp(0, 1).cpu() for n, g in self.model.ci_of(eye).items()}

    @property
    def labels(self) -> dict[str, dict[str, dict]]:
        """autointerp.json's labels, read again when it changes: labels written while the explorer runs show up
        on the next page load."""
        path = self.out / "autointerp.json"
        mtime = path.stat().st_mtime if path.is_file() else 0.0
        if mtime != self._labels[0]:
            self._labels = (mtime, load_labels(self.out))
        return self._labels[1]

    def label(self, module: str, c: int) -> dict:
        return self.labels.get(module, {}).get(str(c), {})

    def summary(self) -> dict:
        h = self.h
        return {"run_dir": str(self.run_dir.resolve()), "kind": self.kind, "ci_threshold": self.threshold,
                "n_examples": h["n_examples"], "checkpoint": h["checkpoint"], "labelled": bool(self.labels),
                "modules": {n: {"C": m["C"], "alive": len(m["alive"])} for n, m in h["modules"].items()},
                "width": self.X.shape[1] if self.kind == "vector" else None}

    def components(self) -> list[dict]:
        rows = []
        for n, m in self.h["modules"].items():
            for c in m["alive"]:
                lab = self.label(n, c)
                rows.append({"module": n, "c": c, "density": m["density"][c], "mean_ci": m["mean_ci"][c],
                             "weight_norm": m["weight_norm"][c], "label": lab.get("label"),
                             "score": lab.get("balanced_accuracy")})
        return rows

    def component(self, module: str, c: int) -> dict:
        m = self.h["modules"].get(module)
        if m is None or not 0 <= c < m["C"]:
            raise KeyError(f"no component {module}:{c}")
        d = {"module": module, "c": c, "density": m["density"][c], "mean_ci": m["mean_ci"][c],
             "weight_norm": m["weight_norm"][c], **self.label(module, c)}
        if self.kind == "text":
            d.update(m.get("lm", {}).get(str(c), {}))
        elif module in self.top:
            d["examples"] = self.top_examples(module, c)
            if module in self.one_hot:
                g = self.one_hot[module][:, c]
                order = g.argsort(descending=True)[:16]
                d["one_hot"] = [[int(i), round(float(g[i]), 3)] for i in order if g[i] > 0.01]
        return d

    def top_examples(self, module: str, c: int) -> list[dict]:
        values, index, rows = self.top[module]
        per_input = rows.shape[0] // self.X.shape[0]  # positions per input: a sequence's tokens, or 1
        out = []
        for v, r in zip(values[:, c].tolist(), index[:, c].tolist()):
            if v <= self.threshold:
                break
            e, pos = divmod(r, per_input)
            if self.kind == "tokens":
                start = max(pos - CONTEXT_BEFORE, 0)
                ids = self.X[e, start: pos + CONTEXT_AFTER + 1].tolist()
                ci = rows[e * per_input + start: e * per_input + start + len(ids), c]
                out.append({"tokens": [f"{t} " for t in ids], "pos": pos - start, "ci": round(v, 4),
                            "token_ci": [round(x, 3) for x in ci.tolist()], "input": e})
            else:
                out.append({"ci": round(v, 4), "input": e, "pos": pos if per_input > 1 else None,
                            **show_input(self.X[e], self.dense)})
        return out

    def parse_prompt(self, text: str) -> tuple[Any, list[str], dict]:
        """The model input for a prompt, the names of its positions, and what the page draws of it."""
        text = text.strip()
        if not text:
            raise ValueError("empty prompt")
        m = re.fullmatch(r"#(\d+)", text)
        if self.kind == "text":
            ids = self.exp.tokenizer(text)["input_ids"][:MAX_PROMPT_TOKENS]
            return (torch.tensor([ids], device=self.device), [self.exp.tokenizer.decode([t]) for t in ids], {})
        if self.kind == "other":
            raise ValueError("this experiment's inputs are neither text, token ids, vectors nor images")
        if m:
            k = int(m.group(1))
            if k >= self.X.shape[0]:
                raise ValueError(f"#{k}: there are {self.X.shape[0]} harvested inputs (#0 to #{self.X.shape[0] - 1})")
            x = self.X[k: k + 1]
        elif self.kind == "tokens":
            x = torch.tensor([[int(t) for t in re.split(r"[\s,]+", text)]])
        elif self.kind == "vector":
            x = torch.zeros(1, self.X.shape[1])
            for item in re.split(r"[\s,]+", text):
                i, _, v = item.partition(":")
                if not i.isdigit() or int(i) >= x.shape[1]:
                    raise ValueError(f"'{item}': expected INDEX or INDEX:VALUE with INDEX < {x.shape[1]}")
                x[0, int(i)] = float(v) if v else 1.0
        else:
            raise ValueError("type #k for the k-th harvested input")
        names = [f"{t} " for t in x[0].tolist()] if self.kind == "tokens" else ["input"]
        shown = {} if self.kind == "tokens" else show_input(x[0], self.dense)
        return x.to(self.device), names, shown

    @torch.no_grad()
    def prompt(self, text: str) -> dict:
        x, names, shown = self.parse_prompt(text)
        with self.lock:
            ci = self.model.ci_of(x)
        firing: list[list[dict]] = [[] for _ in names]
        for n, g in ci.items():  # (1, positions..., C) -> (tokens, positions within a token, C)
            g = g[0].float().clamp(0, 1).cpu().reshape(len(names), -1, ci[n].shape[-1])
            for t, pos, c in (g > self.threshold).nonzero().tolist():
                firing[t].append({"module": n, "c": c, "ci": round(float(g[t, pos, c]), 3),
                                  "pos": pos if g.shape[1] > 1 else None, "label": self.label(n, c).get("label")})
        for f in firing:
            f.sort(key=lambda e: -e["ci"])
        return {"tokens": names, "firing": firing, **shown}


PAGE = r"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>SPD explorer</title><style>
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { background: #2d5e46; color: #fff; padding: 0.6em 1.2em; display: flex; gap: 1.5em; align-items: baseline; }
header a { color: #fff; text-decoration: none; font-weight: 600; } header a.on { text-decoration: underline; }
header .run { font-size: 12px; opacity: 0.8; margin-left: auto; }
main { padding: 1em 1.2em; }
table { border-collapse: collapse; font-size: 13px; } th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { cursor: pointer; background: #eef5f0; position: sticky; top: 0; user-select: none; }
tr.row:hover { background: #f3f8f5; cursor: pointer; } td.num { text-align: right; font-family: monospace; }
input[type=search] { font-size: 14px; padding: 4px 8px; width: 28em; margin-bottom: 0.6em; }
textarea { width: 100%; max-width: 60em; height: 5em; font: 14px monospace; }
.ctx { font-family: monospace; white-space: pre; font-size: 13px; margin: 3px 0; }
.tok { border-radius: 2px; padding: 1px 0; } .tok.fire { outline: 1.5px solid #c60; }
.chip { display: inline-block; border: 1px solid #ccc; border-radius: 3px; padding: 1px 5px; margin: 1px; font-size: 12px; cursor: pointer; }
.note { color: #666; font-size: 13px; } .label { font-style: italic; color: #2d5e46; }
.cols { display: flex; gap: 3em; flex-wrap: wrap; } h2 { margin: 0.3em 0; } h3 { margin: 1em 0 0.3em; }
img.px { image-rendering: pixelated; border: 1px solid #ccc; vertical-align: middle; margin-right: 0.5em; }
.err { color: #b00; }
</style></head><body>
<header><a href="#/" id="nav-table">Components</a><a href="#/prompt" id="nav-prompt">Prompt</a><span class="run" id="run"></span></header>
<main id="main">loading…</main>
<script>
"use strict";
let S = null, ROWS = null, sortKey = "density", sortDir = -1, query = "", lastPrompt = null, lastResult = null, pick = null,
  minCI = null, prefix = "";
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const vis = (t) => esc(t.replace(/\n/g, "⏎"));
const num = (v, d = 4) => (v === null || v === undefined) ? "" : Number(v).toPrecision(d);
const signed = (v) => (v > 0 ? "+" : "") + (Math.abs(v) < 1e-3 && v !== 0 ? v.toExponential(1) : v.toFixed(4));
const bg = (ci) => `background: rgba(255, 140, 0, ${Math.min(Math.max(ci, 0), 1).toFixed(2)})`;
const cid = (m, c) => `${m}:${c}`;
const short = (m) => m.startsWith(prefix) ? m.slice(prefix.length) : m;  // the module names' common prefix dropped
function commonPrefix(names) {  // up to a dot, e.g. "model.layers."
  let p = names[0] || ""; for (const n of names) while (!n.startsWith(p)) p = p.slice(0, -1);
  return names.length > 1 ? p.slice(0, p.lastIndexOf(".") + 1) : "";
}
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {method: "POST", body: JSON.stringify(body)});
  const j = await r.json(); if (!r.ok) throw new Error(j.error || r.statusText); return j;
}
function pixels(p, scale = 6) {  // grey levels in [0, 1] (1 = dark) as an <img>
  const c = document.createElement("canvas"); c.width = p[0].length; c.height = p.length;
  const g = c.getContext("2d"), im = g.createImageData(c.width, c.height);
  p.forEach((row, y) => row.forEach((v, x) => { const i = 4 * (y * c.width + x), k = Math.round(255 * (1 - v));
    im.data[i] = im.data[i + 1] = im.data[i + 2] = k; im.data[i + 3] = 255; }));
  g.putImageData(im, 0, 0);
  return `<img class="px" src="${c.toDataURL()}" style="width: ${c.width * scale}px">`;
}
function shown(x) {
  if (x.pixels) return pixels(x.pixels);
  if (x.entries) return `<span class="ctx">${x.entries.map(([i, v]) => `x[${i}]=${v}`).join("  ") || "all zero"}</span>`;
  return "";
}
function context(x) {  // tokens coloured by CI; the firing one outlined
  const cis = x.token_ci || x.tokens.map((_, i) => i === x.pos ? x.ci : 0);
  return `<div class="ctx">${x.tokens.map((t, i) => `<span class="tok${i === x.pos ? " fire" : ""}" style="${bg(cis[i])}" title="CI ${num(cis[i], 3)}">${vis(t)}</span>`).join("")}   <span class="note">CI ${num(x.ci, 3)}</span></div>`;
}
function nav(which) { $("nav-table").className = which === "table" ? "on" : ""; $("nav-prompt").className = which === "prompt" ? "on" : ""; }

function tableView() {
  nav("table");
  const cols = [["module", "module"], ["c", "c"], ["density", "firing density"], ["mean_ci", "mean CI"], ["weight_norm", "weight norm"]]
    .concat(S.labelled ? [["label", "label"], ["score", "detection (bal. acc.)"]] : []);
  const q = query.toLowerCase();
  const rows = ROWS.filter((r) => !q || cid(r.module, r.c).toLowerCase().includes(q) || (r.label || "").toLowerCase().includes(q));
  rows.sort((a, b) => { const x = a[sortKey], y = b[sortKey]; return sortDir * (x === y ? 0 : x === null ? -1 : y === null ? 1 : x < y ? -1 : 1); });
  const mods = Object.entries(S.modules).map(([m, v]) => `${esc(m)} ${v.alive}/${v.C}`).join(" · ");
  $("main").innerHTML = `<input type="search" id="q" placeholder="search module, index or label" value="${esc(query)}">
    <span class="note" id="count">${rows.length} of ${ROWS.length} alive components</span>
    <p class="note">alive / C per module: ${mods}. Firing: CI &gt; ${S.ci_threshold} on ${S.n_examples} harvested ${S.kind === "text" || S.kind === "tokens" ? "tokens" : "inputs"}.${S.labelled ? "" : " No labels yet: run analysis/autointerp.py."}</p>
    <table id="components"><tr>${cols.map(([k, t]) => `<th data-k="${k}">${t}${k === sortKey ? (sortDir > 0 ? " ▲" : " ▼") : ""}</th>`).join("")}</tr>
    ${rows.map((r) => `<tr class="row" data-m="${esc(r.module)}" data-c="${r.c}"><td>${esc(r.module)}</td><td class="num">${r.c}</td><td class="num">${num(r.density)}</td><td class="num">${num(r.mean_ci)}</td><td class="num">${num(r.weight_norm)}</td>${S.labelled ? `<td class="label">${esc(r.label || "")}</td><td class="num">${num(r.score, 3)}</td>` : ""}</tr>`).join("")}</table>`;
  $("q").oninput = (e) => { query = e.target.value; const pos = e.target.selectionStart; tableView(); $("q").focus(); $("q").setSelectionRange(pos, pos); };
  document.querySelectorAll("th").forEach((th) => th.onclick = () => { const k = th.dataset.k; sortDir = k === sortKey ? -sortDir : (k === "module" || k === "label" ? 1 : -1); sortKey = k; tableView(); });
  document.querySelectorAll("tr.row").forEach((tr) => tr.onclick = () => location.hash = `#/c/${encodeURIComponent(tr.dataset.m)}/${tr.dataset.c}`);
}

async function componentView(module, c) {
  nav("");
  const d = await api(`/api/component?module=${encodeURIComponent(module)}&c=${c}`);
  let h = `<h2 id="title">${esc(cid(module, c))}</h2>${d.label ? `<p class="label" id="label">“${esc(d.label)}”${d.balanced_accuracy != null ? ` <span class="note">detection balanced accuracy ${num(d.balanced_accuracy, 3)}</span>` : ""}</p>` : ""}
    <p class="note">firing density ${num(d.density)} · mean CI ${num(d.mean_ci)} · weight norm ||U[:, c]|| ||V[c]|| ${num(d.weight_norm)}</p>`;
  if (d.contexts) {
    h += `<h3>Top activating contexts</h3><p class="note">each token shaded by this component's CI on it; the top-CI token outlined</p><div id="contexts">${d.contexts.map(context).join("")}</div>`;
    const list = (xs) => xs.map((e) => `<div class="ctx">${esc(JSON.stringify(e.token))} <span class="note">${signed(e.delta_prob)}</span></div>`).join("");
    h += `<div class="cols"><div><h3>Promotes</h3><p class="note">next-token probability drops most when it is ablated where it fires</p><div id="promotes">${list(d.promotes)}</div></div>
      <div><h3>Suppresses</h3><p class="note">rises most</p><div id="suppresses">${list(d.suppresses)}</div></div></div>`;
  }
  if (d.examples) {
    h += `<h3>Top activating inputs</h3><div id="contexts">${d.examples.map((x) => x.tokens ? context(x) :
      `<div class="ctx-in">${shown(x)} <span class="note">#${x.input}${x.pos !== null ? ` at position ${x.pos}` : ""} · CI ${num(x.ci, 3)}</span></div>`).join("") || "<p class='note'>none above the threshold</p>"}</div>`;
  }
  if (d.one_hot) {
    h += `<h3>One-hot inputs</h3><p class="note">CI on the input with x[i] = 1 and every other entry 0</p>
      <table id="onehot"><tr><th>i</th><th>CI</th></tr>${d.one_hot.map(([i, v]) => `<tr><td class="num">${i}</td><td class="num" style="${bg(v)}">${num(v, 3)}</td></tr>`).join("") || "<tr><td colspan=2 class='note'>none</td></tr>"}</table>`;
  }
  $("main").innerHTML = h;
}

function promptHelp() {
  return {text: "Type any text.", tokens: "Token ids separated by spaces, or #k for the k-th harvested input.",
    vector: `Feature indices below ${S.width}, each optionally with a value (3 7:0.5 sets x[3] = 1, x[7] = 0.5), or #k for the k-th harvested input.`,
    image: "#k for the k-th harvested input.", other: "This experiment's inputs cannot be typed."}[S.kind];
}
function promptView() {
  nav("prompt");
  $("main").innerHTML = `<p class="note">${promptHelp()} The decomposed model runs on the server; each token lists the components with CI &gt; ${S.ci_threshold}. Click a component to shade every token by its CI.</p>
    <textarea id="prompt">${esc(lastPrompt ?? (S.kind === "text" ? "Once upon a time, there was a little cat." : "#0"))}</textarea><br><button id="go">Run</button> <span id="status" class="note"></span><div id="out"></div>`;
  $("go").onclick = runPrompt; $("prompt").onkeydown = (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) runPrompt(); };
  if (lastResult) drawPrompt();
}
async function runPrompt() {
  lastPrompt = $("prompt").value; $("status").textContent = "running…";
  try { lastResult = await api("/api/prompt", {text: lastPrompt}); pick = null; $("status").textContent = ""; drawPrompt(); }
  catch (e) { $("status").innerHTML = `<span class="err">${esc(e.message)}</span>`; }
}
function drawPrompt() {
  const r = lastResult, most = Math.max(1, ...r.firing.map((f) => f.length)), ciOf = (f) => { const e = pick && f.find((e) => cid(e.module, e.c) === pick); return e ? e.ci : 0; };
  const chip = (e) => `<span class="chip" data-id="${esc(cid(e.module, e.c))}" style="${bg(e.ci)}" title="${esc(cid(e.module, e.c) + (e.label ? ": " + e.label : ""))}">${esc(cid(short(e.module), e.c))}${e.pos !== null ? `@${e.pos}` : ""} ${num(e.ci, 2)}${e.label ? ` <span class="label">${esc(e.label)}</span>` : ""}</span>`;
  $("out").innerHTML = (r.pixels || r.entries ? `<p>${shown(r)}</p>` : "") +
    `<p class="ctx" id="shaded">${r.tokens.map((t, i) => `<span class="tok" style="${bg(pick ? ciOf(r.firing[i]) : r.firing[i].length / most)}" title="${r.firing[i].length} firing">${vis(t)}</span>`).join("")}</p>
    <p class="note">${pick ? `shaded by the CI of ${esc(pick)} (<a href="#/c/${pick.split(":").slice(0, -1).join(":")}/${pick.split(":").pop()}">its page</a>)` : "shaded by how many components fire, relative to the token with most"}</p>
    <p class="note">showing components with CI ≥ <input id="minci" type="number" step="0.05" min="0" max="1" style="width: 4.5em" value="${minCI ?? S.ci_threshold}">${prefix ? `; module names without their common prefix "${esc(prefix)}"` : ""}</p>
    <table id="per-token"><tr><th>#</th><th>token</th><th>firing components (CI)</th></tr>${r.tokens.map((t, i) => `<tr><td class="num">${i}</td><td class="ctx">${vis(JSON.stringify(t))}</td><td>${r.firing[i].filter((e) => e.ci >= (minCI ?? 0)).map(chip).join("") || "<span class='note'>none</span>"}</td></tr>`).join("")}</table>`;
  $("minci").onchange = (e) => { minCI = Number(e.target.value); drawPrompt(); };
  document.querySelectorAll(".chip").forEach((el) => el.onclick = () => { pick = el.dataset.id === pick ? null : el.dataset.id; drawPrompt(); });
}

async function route() {
  const h = decodeURIComponent(location.hash || "#/");
  try {
    const m = h.match(/^#\/c\/(.+)\/(\d+)$/);
    const p = h.match(/^#\/prompt\/(.+)$/s);  // #/prompt/TEXT: a link that runs TEXT
    if (m) await componentView(m[1], Number(m[2]));
    else if (p) { lastPrompt = p[1]; lastResult = null; promptView(); await runPrompt(); }
    else if (h === "#/prompt") promptView(); else tableView();
  } catch (e) { $("main").innerHTML = `<p class="err">${esc(e.message)}</p>`; }
}
(async () => {
  S = await api("/api/summary"); ROWS = await api("/api/components"); $("run").textContent = S.run_dir;
  prefix = commonPrefix(Object.keys(S.modules));
  window.onhashchange = route; route();
})();
</script></body></html>
"""


def make_handler(ex: Explorer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def reply(self, fn) -> None:
            try:
                self.send(200, json.dumps(fn()).encode(), "application/json")
            except (KeyError, ValueError) as e:  # a bad request: the page shows the message
                self.send(400, json.dumps({"error": str(e).strip("'\"")}).encode(), "application/json")
            except Exception as e:  # the model refused the input (e.g. a token id out of range)
                self.send(500, json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), "application/json")

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/":
                self.send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/summary":
                self.reply(ex.summary)
            elif url.path == "/api/components":
                self.reply(ex.components)
            elif url.path == "/api/component":
                self.reply(lambda: ex.component(q.get("module", ""), int(q.get("c", -1))))
            else:
                self.send(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            if urlparse(self.path).path != "/api/prompt":
                return self.send(404, b"not found", "text/plain")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.reply(lambda: ex.prompt(json.loads(body or b"{}").get("text", "")))

        def log_message(self, *args: Any) -> None:  # quiet: the terminal shows the URL, not every request
            pass

    return Handler


def serve(run_dir: Path, out: Path, port: int = 8000) -> tuple[ThreadingHTTPServer, str]:
    """The explorer's server bound to 127.0.0.1:port (0: any free port), not yet serving, and its URL."""
    if not (run_dir / "config.yaml").is_file():
        raise SPDError(f"{run_dir} is not a run dir (no config.yaml); pass the directory a decomposition wrote")
    ex = Explorer(run_dir, out)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(ex))
    except OSError as e:
        raise SPDError(f"cannot listen on 127.0.0.1:{port} ({e.strerror}); pass another --port") from e
    server.daemon_threads = True
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a decomposition's run dir (holds config.yaml and checkpoints/)")
    ap.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0: any free port)")
    ap.add_argument("--out", type=Path, default=None, help="where harvest.json / autointerp.json live (default RUN_DIR/analysis)")
    args = ap.parse_args()
    server, url = serve(args.run_dir, args.out or args.run_dir / "analysis", args.port)
    print(f"exploring {args.run_dir} at {url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    run_main(main)
